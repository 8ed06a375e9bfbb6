//! Applying transfers: a batch in one transaction, decided in memory with
//! checked arithmetic, its gifts announced to their rooms before it commits.

use livemesh_mesh::breaker::Guarded;
use livemesh_mesh::on_db;

use super::{Applied, Shard, Transfer, classify, sql_id};
use crate::error::LedgerError;

/// Tells a room's viewers of gifts before the batch that applies them
/// commits. A gift whose announcement is refused (the room's stream has
/// ended) or fails is left out of the batch and answered with the error
/// given here; so no gift commits without its event in the room's
/// history, and a gift's event is never refused after it committed.
pub trait Announce: Send + Sync {
    /// One result per transfer, in order.
    fn announce<'a>(
        &'a self,
        gifts: &'a [&'a Transfer],
    ) -> futures::future::BoxFuture<'a, Vec<Result<(), LedgerError>>>;
}

/// Announces nothing (deposits, settlement, tests of the ledger alone).
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Announce for Silent {
    fn announce<'a>(
        &'a self,
        gifts: &'a [&'a Transfer],
    ) -> futures::future::BoxFuture<'a, Vec<Result<(), LedgerError>>> {
        Box::pin(std::future::ready(gifts.iter().map(|_| Ok(())).collect()))
    }
}

/// `a + b`, or the refusal that names the limit it would pass.
fn credited(account: &str, balance: i64, amount: i64) -> Result<i64, LedgerError> {
    balance
        .checked_add(amount)
        .ok_or_else(|| LedgerError::BalanceLimit {
            account: account.to_owned(),
            direction: "above",
            limit: i64::MAX,
            what: "most",
        })
}

/// `a - b`, or the refusal that names the limit it would pass.
fn debited(account: &str, balance: i64, amount: i64) -> Result<i64, LedgerError> {
    balance
        .checked_sub(amount)
        .ok_or_else(|| LedgerError::BalanceLimit {
            account: account.to_owned(),
            direction: "below",
            limit: i64::MIN,
            what: "least",
        })
}

impl Shard {
    /// Applies `t` in one transaction, or replays its first result.
    pub async fn apply(&self, t: &Transfer) -> Result<Applied, LedgerError> {
        let mut results = self.apply_batch(std::slice::from_ref(t), &Silent).await?;
        results.pop().unwrap_or(Err(LedgerError::Conflict))
    }

    /// Applies transfers in ONE transaction (group commit: one commit, one
    /// log flush for all) with a few set-based statements whatever the
    /// batch's size: the batch's transfer ids, rooms and accounts are read
    /// (accounts locked, in key order), every transfer is decided in order
    /// in memory with checked arithmetic, the gifts among them are
    /// announced to their rooms (`announce`), then the new balances,
    /// transfers and entries are written in one multi-row statement each.
    /// A transfer refused for its own reason (funds, a balance limit, key
    /// reuse, room, a refused announcement) is left out and reported in
    /// its place; a database failure fails the whole batch.
    ///
    /// The batch runs behind the shard's circuit breaker: while it is open
    /// the batch fails at once with [`LedgerError::Unavailable`].
    #[tracing::instrument(name = "ledger.apply_batch", skip_all, fields(shard = self.index, transfers = batch.len()))]
    pub async fn apply_batch(
        &self,
        batch: &[Transfer],
        announce: &dyn Announce,
    ) -> Result<Vec<Result<Applied, LedgerError>>, LedgerError> {
        match self
            .breaker
            .run(self.apply_batch_unguarded(batch, announce))
            .await
        {
            Ok(results) => Ok(results),
            Err(Guarded::Failed(err)) => Err(err),
            Err(Guarded::Open(open)) => Err(LedgerError::Unavailable(open)),
        }
    }

    async fn apply_batch_unguarded(
        &self,
        batch: &[Transfer],
        announce: &dyn Announce,
    ) -> Result<Vec<Result<Applied, LedgerError>>, LedgerError> {
        use std::collections::{BTreeSet, HashMap, HashSet};
        let mysql = self.db.is_mysql();
        let placeholders = |n: usize| vec!["?"; n].join(", ");
        let ids: BTreeSet<&str> = batch.iter().map(|t| t.transfer_id.as_str()).collect();
        let rooms: BTreeSet<i64> = batch.iter().filter_map(|t| t.room_id.map(sql_id)).collect();
        let accounts: BTreeSet<&str> = batch
            .iter()
            .flat_map(|t| [t.debit.as_str(), t.credit.as_str(), t.report.as_str()])
            .collect();
        let lock = if mysql { " FOR UPDATE" } else { "" };
        let share = if mysql { " LOCK IN SHARE MODE" } else { "" };
        let seen_sql = format!(
            "SELECT transfer_id, request, balance_after FROM transfers WHERE transfer_id IN ({})",
            placeholders(ids.len())
        );
        let rooms_sql = format!(
            "SELECT room_id, status FROM room_accounts WHERE room_id IN ({}){share}",
            placeholders(rooms.len().max(1))
        );
        let accounts_sql = format!(
            "SELECT account, balance, may_go_negative FROM accounts WHERE account IN ({}) ORDER BY account{lock}",
            placeholders(accounts.len())
        );
        on_db!(&self.db, pool => {
            let mut tx = if mysql {
                pool.begin().await.map_err(classify)?
            } else {
                // Take the write lock up front: a deferred transaction that
                // reads then writes can fail with a stale snapshot.
                pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?
            };
            let mut query = sqlx::query_as::<_, (String, String, i64)>(sqlx::AssertSqlSafe(seen_sql));
            for id in &ids {
                query = query.bind(*id);
            }
            let seen: HashMap<String, (String, i64)> = query
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?
                .into_iter()
                .map(|(id, request, balance)| (id, (request, balance)))
                .collect();
            let mut status: HashMap<i64, String> = HashMap::new();
            if !rooms.is_empty() {
                let mut query = sqlx::query_as::<_, (i64, String)>(sqlx::AssertSqlSafe(rooms_sql));
                for room in &rooms {
                    query = query.bind(*room);
                }
                status = query.fetch_all(&mut *tx).await.map_err(classify)?.into_iter().collect();
            }
            let mut query = sqlx::query_as::<_, (String, i64, i32)>(sqlx::AssertSqlSafe(accounts_sql));
            for account in &accounts {
                query = query.bind(*account);
            }
            let stored: Held = query
                .fetch_all(&mut *tx)
                .await
                .map_err(classify)?
                .into_iter()
                .map(|(account, balance, negative)| (account, (balance, negative != 0, false)))
                .collect();
            // Decide, announce the gifts decided, and decide again without
            // the gifts whose announcement was refused, until every gift
            // applied has been announced. Leaving a transfer out never
            // lowers another's balance, so the rounds end (at most one per
            // refused gift).
            let mut refused: HashMap<usize, LedgerError> = HashMap::new();
            let mut announced: HashSet<usize> = HashSet::new();
            let (results, applied, held) = loop {
                let decided = decide(batch, &seen, &status, stored.clone(), &mut refused);
                let pending: Vec<usize> = decided
                    .1
                    .iter()
                    .map(|(i, _)| *i)
                    .filter(|i| batch[*i].gift.is_some() && !announced.contains(i))
                    .collect();
                if pending.is_empty() {
                    break decided;
                }
                let gifts: Vec<&Transfer> = pending.iter().map(|i| &batch[*i]).collect();
                let outcomes = announce.announce(&gifts).await;
                for (i, outcome) in pending.into_iter().zip(
                    outcomes.into_iter().chain(std::iter::repeat_with(|| {
                        Err(LedgerError::Unannounced("no answer for this gift".into()))
                    })),
                ) {
                    match outcome {
                        Ok(()) => {
                            announced.insert(i);
                        }
                        Err(err) => {
                            refused.insert(i, err);
                        }
                    }
                }
            };
            if !applied.is_empty() {
                let changed: Vec<(&String, &(i64, bool, bool))> =
                    held.iter().filter(|(_, h)| h.2).collect();
                let upsert = format!(
                    "INSERT INTO accounts (account, balance, may_go_negative) VALUES {} {}",
                    vec!["(?, ?, ?)"; changed.len()].join(", "),
                    if mysql {
                        "ON DUPLICATE KEY UPDATE balance = VALUES(balance)"
                    } else {
                        "ON CONFLICT (account) DO UPDATE SET balance = excluded.balance"
                    }
                );
                let mut query = sqlx::query(sqlx::AssertSqlSafe(upsert));
                for (account, (balance, negative, _)) in &changed {
                    query = query.bind(*account).bind(*balance).bind(i32::from(*negative));
                }
                query.execute(&mut *tx).await.map_err(classify)?;
                let transfers = format!(
                    "INSERT INTO transfers (transfer_id, kind, debit_account, credit_account, amount, \
                     request, balance_after, room_id, created_at_ms) VALUES {}",
                    vec!["(?, ?, ?, ?, ?, ?, ?, ?, ?)"; applied.len()].join(", ")
                );
                let mut query = sqlx::query(sqlx::AssertSqlSafe(transfers));
                for (i, balance) in &applied {
                    let t = &batch[*i];
                    query = query
                        .bind(&t.transfer_id)
                        .bind(t.kind)
                        .bind(&t.debit)
                        .bind(&t.credit)
                        .bind(t.amount)
                        .bind(&t.request)
                        .bind(*balance)
                        .bind(t.room_id.map(sql_id))
                        .bind(t.now_ms);
                }
                query.execute(&mut *tx).await.map_err(classify)?;
                let entries = format!(
                    "INSERT INTO entries (transfer_id, account, amount, kind, created_at_ms) VALUES {}",
                    vec!["(?, ?, ?, ?, ?)"; 2 * applied.len()].join(", ")
                );
                let mut query = sqlx::query(sqlx::AssertSqlSafe(entries));
                for (i, _) in &applied {
                    let t = &batch[*i];
                    // `decide` checked that the amount is positive, so its
                    // negation cannot overflow.
                    for (account, amount) in [(&t.debit, -t.amount), (&t.credit, t.amount)] {
                        query = query
                            .bind(&t.transfer_id)
                            .bind(account)
                            .bind(amount)
                            .bind(t.kind)
                            .bind(t.now_ms);
                    }
                }
                query.execute(&mut *tx).await.map_err(classify)?;
            }
            tx.commit().await.map_err(classify)?;
            Ok(results)
        })
    }
}

/// account -> (balance, may go negative, changed).
type Held = std::collections::BTreeMap<String, (i64, bool, bool)>;

/// What [`decide`] makes of a batch: the result per transfer, the applied
/// ones (index, reported balance), the balances after them.
type Decided = (Vec<Result<Applied, LedgerError>>, Vec<(usize, i64)>, Held);

/// Decides a batch in order against the balances read (`held`), leaving out
/// the transfers in `refused` (answered with their error): the result per
/// transfer, the applied ones (index, reported balance) and the balances
/// after them. Every balance is computed with checked arithmetic: a
/// transfer that would take one past what an i64 holds is refused alone.
fn decide(
    batch: &[Transfer],
    seen: &std::collections::HashMap<String, (String, i64)>,
    status: &std::collections::HashMap<i64, String>,
    mut held: Held,
    refused: &mut std::collections::HashMap<usize, LedgerError>,
) -> Decided {
    let mut done: std::collections::HashMap<&str, (&str, i64)> = std::collections::HashMap::new();
    let mut results = Vec::with_capacity(batch.len());
    let mut applied = Vec::new();
    for (i, t) in batch.iter().enumerate() {
        if let Some(err) = refused.remove(&i) {
            // Kept for the next round too.
            let answer = clone_refusal(&err);
            refused.insert(i, err);
            results.push(Err(answer));
            continue;
        }
        let first = seen
            .get(&t.transfer_id)
            .map(|(request, balance)| (request.as_str(), *balance))
            .or_else(|| done.get(t.transfer_id.as_str()).copied());
        if let Some((request, balance)) = first {
            results.push(if request == t.request {
                Ok(Applied {
                    transfer_id: t.transfer_id.clone(),
                    balance,
                    replayed: true,
                })
            } else {
                Err(LedgerError::KeyReused {
                    first: request.to_owned(),
                })
            });
            continue;
        }
        if let Some(room_id) = t.room_id {
            match status.get(&sql_id(room_id)).map(String::as_str) {
                None => {
                    results.push(Err(LedgerError::RoomNotOpen(room_id)));
                    continue;
                }
                Some("open") => {}
                Some(_) => {
                    results.push(Err(LedgerError::RoomEnded(room_id)));
                    continue;
                }
            }
        }
        if t.amount <= 0 {
            results.push(Err(LedgerError::Constraint(format!(
                "amount must be positive, not {}",
                t.amount
            ))));
            continue;
        }
        let debit = held
            .get(&t.debit)
            .copied()
            .unwrap_or((0, t.debit_may_go_negative, false));
        if !debit.1 && debit.0 < t.amount {
            results.push(Err(LedgerError::Insufficient {
                balance: debit.0,
                amount: t.amount,
            }));
            continue;
        }
        let credit = held.get(&t.credit).copied().unwrap_or((0, false, false));
        let balances = debited(&t.debit, debit.0, t.amount)
            .and_then(|d| credited(&t.credit, credit.0, t.amount).map(|c| (d, c)));
        let (debit_after, credit_after) = match balances {
            Ok(balances) => balances,
            Err(err) => {
                tracing::warn!(transfer_id = %t.transfer_id, %err, "transfer refused at a balance limit");
                results.push(Err(err));
                continue;
            }
        };
        held.insert(t.debit.clone(), (debit_after, debit.1, true));
        held.insert(t.credit.clone(), (credit_after, credit.1, true));
        let balance = held.get(&t.report).map_or(0, |h| h.0);
        done.insert(&t.transfer_id, (&t.request, balance));
        applied.push((i, balance));
        results.push(Ok(Applied {
            transfer_id: t.transfer_id.clone(),
            balance,
            replayed: false,
        }));
    }
    (results, applied, held)
}

/// The same refusal again (the error holds no source that cannot be copied).
fn clone_refusal(err: &LedgerError) -> LedgerError {
    match err {
        LedgerError::RoomEnded(room) => LedgerError::RoomEnded(*room),
        LedgerError::Unannounced(why) => LedgerError::Unannounced(why.clone()),
        other => LedgerError::Unannounced(other.to_string()),
    }
}
