//! One balance shard's ledger: accounts, transfers and their entries.
//!
//! **Invariant:** every transfer debits one account and credits another by
//! the same positive amount, and its two entries are appended in the
//! transaction that changes the two balances; so the sum of all balances of
//! a shard never changes, and the sum of a shard's entries per account is
//! that account's balance.
//!
//! **Invariant:** no balance goes negative except the external funding
//! account's (money entering from payment top-ups): the debit is a
//! conditional update inside the transaction, and a CHECK constraint backs it.
//!
//! **Invariant:** a transfer id is applied at most once (its row is the
//! primary key); asking again with the same content returns the first
//! result, with other content is refused.

use livemesh_mesh::breaker::{
    BreakerOpen, BreakerSettings, BreakerState, CallBreaker, Guarded, StoreFailure,
};
use livemesh_mesh::on_db;
use livemesh_mesh::sql::{Db, Migrations, SqlError, redact};

pub const MIGRATIONS: Migrations = Migrations {
    table: "_livemesh_gifts_migrations",
    sqlite: &[
        (
            1,
            "ledger",
            include_str!("../migrations/sqlite/0001_ledger.sql"),
        ),
        (
            2,
            "settlements",
            include_str!("../migrations/sqlite/0002_settlements.sql"),
        ),
    ],
    mysql: &[
        (
            1,
            "ledger",
            include_str!("../migrations/mysql/0001_ledger.sql"),
        ),
        (
            2,
            "settlements",
            include_str!("../migrations/mysql/0002_settlements.sql"),
        ),
        (
            3,
            "transfer ids exact",
            include_str!("../migrations/mysql/0003_transfer_ids_exact.sql"),
        ),
    ],
};

/// Where payment top-ups come from; the one account that may go negative.
pub const EXTERNAL: &str = "external:funding";

pub fn user_account(user_id: u64) -> String {
    format!("user:{user_id}")
}

pub fn room_account(room_id: u64, sub: u32) -> String {
    format!("room:{room_id}:{sub}")
}

/// One movement to apply.
#[derive(Debug, Clone)]
pub struct Transfer {
    pub transfer_id: String,
    pub kind: &'static str,
    pub debit: String,
    pub credit: String,
    pub amount: i64,
    /// The request's content (for idempotency-key reuse checks).
    pub request: String,
    /// Gifts: the room whose virtual account is credited; it must be open.
    pub room_id: Option<u64>,
    /// Whose balance the result reports (the viewer's, the depositor's).
    pub report: String,
    /// The debit may take the balance below zero (the external account).
    pub debit_may_go_negative: bool,
    pub now_ms: i64,
    /// Gifts: what the room's viewers are told. A batch announces its
    /// gifts before it commits (see [`Announce`]).
    pub gift: Option<GiftNotice>,
}

/// The viewer-facing part of a gift, announced to the room before the
/// gift commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GiftNotice {
    pub viewer_id: u64,
    pub gift_id: u64,
}

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

/// What an applied (or replayed) transfer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub transfer_id: String,
    pub balance: i64,
    /// True when the transfer had been applied before (same key, same content).
    pub replayed: bool,
}

/// Why a transfer was not applied.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient funds: the balance is {balance}, the transfer needs {amount}")]
    Insufficient { balance: i64, amount: i64 },
    #[error("this idempotency key was already used for a different request ({first})")]
    KeyReused { first: String },
    #[error("room {0} has ended; gifts are no longer accepted")]
    RoomEnded(u64),
    /// The room's virtual accounts are not open in this shard yet.
    #[error("room {0} is not open in this shard")]
    RoomNotOpen(u64),
    /// The transfer would take a balance past what an account can hold.
    #[error(
        "the transfer would take the balance of {account} {direction} {limit}, the {what} an \
         account can hold; it was not applied"
    )]
    BalanceLimit {
        account: String,
        direction: &'static str,
        limit: i64,
        what: &'static str,
    },
    /// The database refused the transfer for one of the ledger's
    /// constraints: permanent, a retry cannot help.
    #[error("the transfer breaks the ledger's constraint ({0}); it was not applied")]
    Constraint(String),
    /// The database refused the statement for another reason than a
    /// constraint or a conflict (a schema or permission problem): a retry
    /// cannot help, and it is the server's fault, not the caller's.
    #[error("the balance database refused the transfer: {0}")]
    Rejected(String),
    /// The room's viewers could not be told of the gift (the dispatcher
    /// did not answer); nothing was applied.
    #[error("the room's event stream did not take the gift's event: {0}")]
    Unannounced(String),
    /// A concurrent transaction won (same transfer id, a deadlock): try again.
    #[error("a concurrent transaction conflicted; try again")]
    Conflict,
    #[error("balance database: {0}")]
    Db(#[from] sqlx::Error),
    /// The shard's circuit breaker is open: it failed repeatedly just now.
    #[error(transparent)]
    Unavailable(BreakerOpen),
}

impl LedgerError {
    /// A refusal of the database that the same transfer would meet again.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Constraint(_) | Self::Rejected(_))
    }
}

impl StoreFailure for LedgerError {
    fn counts_as_failure(&self) -> bool {
        match self {
            LedgerError::Db(err) => err.counts_as_failure(),
            // Refusals and contention are not the database failing.
            _ => false,
        }
    }
}

/// Transient database conflicts that a retry resolves.
fn is_conflict(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            // MySQL's error numbers (its `code()` is the SQLSTATE): 1213
            // deadlock, 1205 lock wait timeout.
            let mysql_number = db
                .try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .map(sqlx::mysql::MySqlDatabaseError::number);
            db.is_unique_violation()
                || matches!(mysql_number, Some(1213 | 1205))
                // SQLSTATE serialization failure; SQLite: busy, busy snapshot.
                || matches!(db.code().as_deref(), Some("40001" | "5" | "517"))
                || db.message().contains("Deadlock")
                || db.message().contains("database is locked")
        }
        _ => false,
    }
}

/// A constraint of the schema refused a write (a CHECK: sqlx maps
/// SQLite's, MySQL's 3819 and MariaDB's 4025): the same transfer would be
/// refused again.
fn is_constraint(err: &sqlx::Error) -> bool {
    match err {
        sqlx::Error::Database(db) => {
            db.is_check_violation()
                || db.is_foreign_key_violation()
                // SQLSTATE 22003: a value out of a column's range.
                || db.code().as_deref() == Some("22003")
        }
        _ => false,
    }
}

fn classify(err: sqlx::Error) -> LedgerError {
    if is_conflict(&err) {
        LedgerError::Conflict
    } else if is_constraint(&err) {
        LedgerError::Constraint(err.to_string())
    } else if matches!(err, sqlx::Error::Database(_)) {
        LedgerError::Rejected(err.to_string())
    } else {
        LedgerError::Db(err)
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

/// One balance shard.
#[derive(Debug, Clone)]
pub struct Shard {
    pub index: u32,
    db: Db,
    /// Around the batch commits (the hot path): while the shard's database
    /// is unreachable, gifts fail at once with UNAVAILABLE instead of each
    /// waiting for the pool's timeout.
    breaker: CallBreaker,
}

impl Shard {
    /// Opens shard `index` at `url` with the default breaker settings.
    pub async fn open(index: u32, url: &str) -> Result<Self, SqlError> {
        Self::open_with(index, url, &BreakerSettings::default()).await
    }

    /// Opens shard `index` at `url`, its batch commits behind a breaker
    /// with `breaker` settings.
    pub async fn open_with(
        index: u32,
        url: &str,
        breaker: &BreakerSettings,
    ) -> Result<Self, SqlError> {
        let name = format!("balance shard {index}");
        let breaker = CallBreaker::new(breaker, &name, &redact(url), "sql")?;
        Ok(Self {
            index,
            db: Db::open(url, &MIGRATIONS).await?,
            breaker,
        })
    }

    /// The state of the shard's circuit breaker.
    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.breaker().state()
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

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

    /// The account's balance (0 for an account never used).
    pub async fn balance(&self, account: &str) -> Result<i64, sqlx::Error> {
        let row: Option<(i64,)> = on_db!(&self.db, pool => {
            sqlx::query_as("SELECT balance FROM accounts WHERE account = ?")
                .bind(account)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map_or(0, |(b,)| b))
    }

    /// Opens the room's virtual sub-accounts here (idempotent).
    #[tracing::instrument(name = "ledger.open_room", skip_all, fields(shard = self.index, room_id = room_id))]
    pub async fn open_room(
        &self,
        room_id: u64,
        subaccounts: u32,
        now_ms: i64,
    ) -> Result<(), sqlx::Error> {
        let mysql = self.db.is_mysql();
        let insert_room = if mysql {
            "INSERT IGNORE INTO room_accounts (room_id, status, opened_at_ms) VALUES (?, 'open', ?)"
        } else {
            "INSERT INTO room_accounts (room_id, status, opened_at_ms) VALUES (?, 'open', ?) \
             ON CONFLICT (room_id) DO NOTHING"
        };
        let insert_account = if mysql {
            "INSERT IGNORE INTO accounts (account, balance, may_go_negative) VALUES (?, 0, 0)"
        } else {
            "INSERT INTO accounts (account, balance, may_go_negative) VALUES (?, 0, 0) \
             ON CONFLICT (account) DO NOTHING"
        };
        on_db!(&self.db, pool => {
            let mut tx = pool.begin().await?;
            for sub in 0..subaccounts.max(1) {
                sqlx::query(insert_account)
                    .bind(room_account(room_id, sub))
                    .execute(&mut *tx)
                    .await?;
            }
            sqlx::query(insert_room)
                .bind(sql_id(room_id))
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(())
    }

    /// Stops the room taking gifts here (waits for gifts in flight).
    /// Records the end even for a room never opened here.
    #[tracing::instrument(name = "ledger.end_room", skip_all, fields(shard = self.index, room_id = room_id))]
    pub async fn end_room(&self, room_id: u64, now_ms: i64) -> Result<(), sqlx::Error> {
        let upsert = if self.db.is_mysql() {
            "INSERT INTO room_accounts (room_id, status, opened_at_ms, ended_at_ms) \
             VALUES (?, 'ended', ?, ?) \
             ON DUPLICATE KEY UPDATE ended_at_ms = IF(status = 'open', VALUES(ended_at_ms), ended_at_ms), \
             status = IF(status = 'open', 'ended', status)"
        } else {
            "INSERT INTO room_accounts (room_id, status, opened_at_ms, ended_at_ms) \
             VALUES (?, 'ended', ?, ?) \
             ON CONFLICT (room_id) DO UPDATE SET \
             ended_at_ms = CASE WHEN status = 'open' THEN excluded.ended_at_ms ELSE ended_at_ms END, \
             status = CASE WHEN status = 'open' THEN 'ended' ELSE status END"
        };
        on_db!(&self.db, pool => {
            sqlx::query(upsert)
                .bind(sql_id(room_id))
                .bind(now_ms)
                .bind(now_ms)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// The room's status here (`open`, `ended`), if it was ever opened or ended here.
    pub async fn room_status(&self, room_id: u64) -> Result<Option<String>, sqlx::Error> {
        let row: Option<(String,)> = on_db!(&self.db, pool => {
            sqlx::query_as("SELECT status FROM room_accounts WHERE room_id = ?")
                .bind(sql_id(room_id))
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(s,)| s))
    }

    /// Every account below zero, with its balance (only those that may go
    /// negative: the funding and clearing accounts).
    pub async fn negative_balances(&self) -> Result<Vec<(String, i64)>, sqlx::Error> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_as("SELECT account, balance FROM accounts WHERE balance < 0 ORDER BY account")
                .fetch_all(pool)
                .await?
        }))
    }

    /// The sum of every balance in the shard (zero: money is conserved).
    pub async fn total(&self) -> Result<i64, sqlx::Error> {
        let sql = format!("SELECT {} FROM accounts", self.split_sum("balance"));
        let halves: (Option<i64>, Option<i64>) = on_db!(&self.db, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql)).fetch_one(pool).await?
        });
        joined_sum(halves)
    }

    /// `SUM(column)` as two sums that cannot overflow whatever the rows
    /// hold (SQLite fails a sum past i64, MySQL's cast would clamp it): of
    /// the column's high half (`column / 2^32`, below 2^31 in size) and of
    /// its low half (the remainder, below 2^32), joined by [`joined_sum`].
    fn split_sum(&self, column: &str) -> String {
        if self.db.is_mysql() {
            format!(
                "CAST(SUM({column} DIV 4294967296) AS SIGNED), CAST(SUM({column} MOD 4294967296) AS SIGNED)"
            )
        } else {
            format!("SUM({column} / 4294967296), SUM({column} % 4294967296)")
        }
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

/// The sum that [`Shard::split_sum`]'s two halves stand for, or an error
/// when it does not fit an i64 (the contract's amounts are i64).
fn joined_sum((high, low): (Option<i64>, Option<i64>)) -> Result<i64, sqlx::Error> {
    let sum = i128::from(high.unwrap_or(0)) * (1 << 32) + i128::from(low.unwrap_or(0));
    i64::try_from(sum).map_err(|_| {
        sqlx::Error::Protocol(format!("a ledger sum, {sum}, does not fit a 64-bit amount"))
    })
}

/// Ids are u64 in the contract and BIGINT (signed) in SQL; ids stay below 2^63.
pub fn sql_id(id: u64) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

/// The account settlement moves money through between shards: a room's
/// shard sweeps into it, the streamer's shard pays out of it (going
/// negative there), so across shards it always sums to what is in transit.
pub const CLEARING: &str = "clearing:settlement";
/// Where the platform's cut goes.
pub const PLATFORM: &str = "platform";

/// A settlement record (kept by the coordinating shard).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementRow {
    pub room_id: u64,
    pub streamer_id: u64,
    pub state: String,
    pub gross: i64,
    pub platform_cut: i64,
    pub streamer_credit: i64,
    pub settled_at_ms: Option<i64>,
}

/// One ledger entry, for the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRow {
    pub entry_id: i64,
    pub transfer_id: String,
    pub account: String,
    pub amount: i64,
    pub kind: String,
    pub created_at_ms: i64,
}

impl Shard {
    /// Moves a room sub-account's whole balance to [`CLEARING`] as transfer
    /// `transfer_id`, once: a retry finds the transfer and returns its
    /// amount. The room must have ended here (no gift can change the
    /// balance meanwhile). Returns the amount moved (0: nothing to move).
    #[tracing::instrument(name = "ledger.sweep", skip_all, fields(shard = self.index, room_id = room_id, sub = sub))]
    pub async fn sweep(
        &self,
        room_id: u64,
        sub: u32,
        transfer_id: &str,
        now_ms: i64,
    ) -> Result<i64, LedgerError> {
        let mysql = self.db.is_mysql();
        let lock_balance = if mysql {
            "SELECT balance FROM accounts WHERE account = ? FOR UPDATE"
        } else {
            "SELECT balance FROM accounts WHERE account = ?"
        };
        let account = room_account(room_id, sub);
        on_db!(&self.db, pool => {
            let mut tx = if mysql {
                pool.begin().await.map_err(classify)?
            } else {
                pool.begin_with("BEGIN IMMEDIATE").await.map_err(classify)?
            };
            let done: Option<(i64,)> = sqlx::query_as("SELECT amount FROM transfers WHERE transfer_id = ?")
                .bind(transfer_id)
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
            if let Some((amount,)) = done {
                return Ok(amount);
            }
            let held: Option<(i64,)> = sqlx::query_as(lock_balance)
                .bind(&account)
                .fetch_optional(&mut *tx)
                .await
                .map_err(classify)?;
            let amount = held.map_or(0, |(b,)| b);
            if amount == 0 {
                return Ok(0);
            }
            sqlx::query("UPDATE accounts SET balance = balance - ? WHERE account = ?")
                .bind(amount)
                .bind(&account)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            let credited = sqlx::query("UPDATE accounts SET balance = balance + ? WHERE account = ?")
                .bind(amount)
                .bind(CLEARING)
                .execute(&mut *tx)
                .await
                .map_err(classify)?
                .rows_affected();
            if credited != 1 {
                sqlx::query("INSERT INTO accounts (account, balance, may_go_negative) VALUES (?, ?, 1)")
                    .bind(CLEARING)
                    .bind(amount)
                    .execute(&mut *tx)
                    .await
                    .map_err(classify)?;
            }
            sqlx::query(
                "INSERT INTO transfers (transfer_id, kind, debit_account, credit_account, amount, \
                 request, balance_after, room_id, created_at_ms) VALUES (?, 'settle-out', ?, ?, ?, ?, 0, ?, ?)",
            )
            .bind(transfer_id)
            .bind(&account)
            .bind(CLEARING)
            .bind(amount)
            .bind(format!("settle-out room={room_id} sub={sub}"))
            .bind(sql_id(room_id))
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(classify)?;
            for (entry_account, entry_amount) in [(account.as_str(), -amount), (CLEARING, amount)] {
                sqlx::query(
                    "INSERT INTO entries (transfer_id, account, amount, kind, created_at_ms) \
                     VALUES (?, ?, ?, 'settle-out', ?)",
                )
                .bind(transfer_id)
                .bind(entry_account)
                .bind(entry_amount)
                .bind(now_ms)
                .execute(&mut *tx)
                .await
                .map_err(classify)?;
            }
            tx.commit().await.map_err(classify)?;
            Ok(amount)
        })
    }

    /// The sum of the amounts of this shard's transfers of `kind` for the room.
    pub async fn room_transfers(&self, room_id: u64, kind: &str) -> Result<i64, sqlx::Error> {
        let sql = format!(
            "SELECT {} FROM transfers WHERE room_id = ? AND kind = ?",
            self.split_sum("amount")
        );
        let halves: (Option<i64>, Option<i64>) = on_db!(&self.db, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(sql_id(room_id))
                .bind(kind)
                .fetch_one(pool)
                .await?
        });
        joined_sum(halves)
    }

    /// The amount of one transfer (0 if it does not exist).
    pub async fn transfer_amount(&self, transfer_id: &str) -> Result<i64, sqlx::Error> {
        let row: Option<(i64,)> = on_db!(&self.db, pool => {
            sqlx::query_as("SELECT amount FROM transfers WHERE transfer_id = ?")
                .bind(transfer_id)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map_or(0, |(a,)| a))
    }

    /// Credits to the room's virtual sub-accounts here (ledger entries).
    pub async fn room_credits(&self, room_id: u64) -> Result<i64, sqlx::Error> {
        let pattern = format!("room:{room_id}:%");
        let sql = format!(
            "SELECT {} FROM entries WHERE account LIKE ? AND amount > 0",
            self.split_sum("amount")
        );
        let halves: (Option<i64>, Option<i64>) = on_db!(&self.db, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(&pattern)
                .fetch_one(pool)
                .await?
        });
        joined_sum(halves)
    }

    /// What the room's virtual sub-accounts hold here now.
    pub async fn room_balance(&self, room_id: u64) -> Result<i64, sqlx::Error> {
        let pattern = format!("room:{room_id}:%");
        let sql = format!(
            "SELECT {} FROM accounts WHERE account LIKE ?",
            self.split_sum("balance")
        );
        let halves: (Option<i64>, Option<i64>) = on_db!(&self.db, pool => {
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .bind(&pattern)
                .fetch_one(pool)
                .await?
        });
        joined_sum(halves)
    }

    /// Records that the room's settlement started (once; the first record stays).
    #[tracing::instrument(name = "ledger.begin_settlement", skip_all, fields(shard = self.index, room_id = room_id))]
    pub async fn begin_settlement(
        &self,
        room_id: u64,
        streamer_id: u64,
        now_ms: i64,
    ) -> Result<(), sqlx::Error> {
        let sql = if self.db.is_mysql() {
            "INSERT IGNORE INTO settlements (room_id, streamer_id, state, started_at_ms) VALUES (?, ?, 'in_progress', ?)"
        } else {
            "INSERT INTO settlements (room_id, streamer_id, state, started_at_ms) VALUES (?, ?, 'in_progress', ?) \
             ON CONFLICT (room_id) DO NOTHING"
        };
        on_db!(&self.db, pool => {
            sqlx::query(sql)
                .bind(sql_id(room_id))
                .bind(sql_id(streamer_id))
                .bind(now_ms)
                .execute(pool)
                .await?;
        });
        Ok(())
    }

    /// Records the room settled with its totals.
    #[tracing::instrument(name = "ledger.finish_settlement", skip_all, fields(shard = self.index, room_id = room_id))]
    pub async fn finish_settlement(
        &self,
        room_id: u64,
        gross: i64,
        platform_cut: i64,
        streamer_credit: i64,
        now_ms: i64,
    ) -> Result<(), sqlx::Error> {
        on_db!(&self.db, pool => {
            sqlx::query(
                "UPDATE settlements SET state = 'settled', gross = ?, platform_cut = ?, \
                 streamer_credit = ?, settled_at_ms = ? WHERE room_id = ? AND state = 'in_progress'",
            )
            .bind(gross)
            .bind(platform_cut)
            .bind(streamer_credit)
            .bind(now_ms)
            .bind(sql_id(room_id))
            .execute(pool)
            .await?;
        });
        Ok(())
    }

    #[tracing::instrument(name = "ledger.settlement", skip_all, fields(shard = self.index, room_id = room_id))]
    pub async fn settlement(&self, room_id: u64) -> Result<Option<SettlementRow>, sqlx::Error> {
        type Row = (i64, String, i64, i64, i64, Option<i64>);
        let row: Option<Row> = on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT streamer_id, state, gross, platform_cut, streamer_credit, settled_at_ms \
                 FROM settlements WHERE room_id = ?",
            )
            .bind(sql_id(room_id))
            .fetch_optional(pool)
            .await?
        });
        Ok(
            row.map(|(streamer, state, gross, cut, credit, at)| SettlementRow {
                room_id,
                streamer_id: streamer.unsigned_abs(),
                state,
                gross,
                platform_cut: cut,
                streamer_credit: credit,
                settled_at_ms: at,
            }),
        )
    }

    /// Rooms whose settlement started and did not finish.
    pub async fn unfinished_settlements(&self) -> Result<Vec<u64>, sqlx::Error> {
        let rows: Vec<(i64,)> = on_db!(&self.db, pool => {
            sqlx::query_as("SELECT room_id FROM settlements WHERE state = 'in_progress'")
                .fetch_all(pool)
                .await?
        });
        Ok(rows.into_iter().map(|(r,)| r.unsigned_abs()).collect())
    }

    /// Up to `limit` entries with `from <= created_at_ms < to` after `after_id`.
    #[tracing::instrument(name = "ledger.entries", skip_all, fields(shard = self.index))]
    pub async fn entries(
        &self,
        from_ms: i64,
        to_ms: i64,
        after_id: i64,
        limit: i64,
    ) -> Result<Vec<EntryRow>, sqlx::Error> {
        type Row = (i64, String, String, i64, String, i64);
        let rows: Vec<Row> = on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT entry_id, transfer_id, account, amount, kind, created_at_ms FROM entries \
                 WHERE created_at_ms >= ? AND created_at_ms < ? AND entry_id > ? \
                 ORDER BY entry_id LIMIT ?",
            )
            .bind(from_ms)
            .bind(to_ms)
            .bind(after_id)
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        Ok(rows
            .into_iter()
            .map(
                |(entry_id, transfer_id, account, amount, kind, created_at_ms)| EntryRow {
                    entry_id,
                    transfer_id,
                    account,
                    amount,
                    kind,
                    created_at_ms,
                },
            )
            .collect())
    }
}
