//! Settlement in one shard: sweeping a room's sub-accounts into the
//! clearing account, the coordinating shard's settlement records, and the
//! ledger's entries for the export.

use livemesh_mesh::on_db;

use super::{CLEARING, EntryRow, SettlementRow, Shard, classify, room_account, sql_id};
use crate::error::LedgerError;

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
