//! A room's virtual accounts in one shard: opening, ending, and the sums
//! the statement and the settlement read.

use livemesh_mesh::on_db;

use super::{Shard, joined_sum, room_account, sql_id};

impl Shard {
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
    #[cfg(feature = "testing")]
    pub async fn room_status(&self, room_id: u64) -> Result<Option<String>, sqlx::Error> {
        let row: Option<(String,)> = on_db!(&self.db, pool => {
            sqlx::query_as("SELECT status FROM room_accounts WHERE room_id = ?")
                .bind(sql_id(room_id))
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(s,)| s))
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
}
