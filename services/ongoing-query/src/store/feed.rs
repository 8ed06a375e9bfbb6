//! A region's change-feed bookkeeping: each consumer's saved position, and
//! on SQLite the trigger-filled `room_changes` table the feed polls.

use livemesh_mesh::on_db;
use livemesh_mesh::sql::Db;

use super::{RegionStore, StoreError};
use crate::room::RoomRecord;

/// A row of `room_changes`: seq, then a [`Row`], then the deleted flag.
type FeedRow = (i64, i64, i64, i32, i64, Option<i64>, i64, bool);

/// One entry of the SQLite change table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeedEntry {
    pub seq: i64,
    pub room: RoomRecord,
    pub deleted: bool,
}

impl RegionStore {
    /// The saved feed position of `consumer`, if any.
    #[tracing::instrument(name = "rooms.sql.load_position", skip_all, fields(region = self.region()))]
    pub async fn load_position(&self, consumer: &str) -> Result<Option<String>, StoreError> {
        let row: Option<(String,)> = on_db!(&self.db, pool => {
            sqlx::query_as("SELECT position FROM feed_positions WHERE consumer = ?")
                .bind(consumer)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(position,)| position))
    }

    /// Saves `consumer`'s feed position, replacing the previous one.
    #[tracing::instrument(name = "rooms.sql.save_position", skip_all, fields(region = self.region()))]
    pub async fn save_position(&self, consumer: &str, position: &str) -> Result<(), StoreError> {
        let now = livemesh_mesh::now_ms();
        // The dialects spell "insert or replace the row" differently.
        let sql = if self.db.is_mysql() {
            "INSERT INTO feed_positions (consumer, position, updated_at_ms) VALUES (?, ?, ?) \
             ON DUPLICATE KEY UPDATE position = VALUES(position), updated_at_ms = VALUES(updated_at_ms)"
        } else {
            "INSERT INTO feed_positions (consumer, position, updated_at_ms) VALUES (?, ?, ?) \
             ON CONFLICT (consumer) DO UPDATE SET position = excluded.position, \
             updated_at_ms = excluded.updated_at_ms"
        };
        on_db!(&self.db, pool => {
            sqlx::query(sql)
                .bind(consumer)
                .bind(position)
                .bind(now)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(())
    }

    /// SQLite only: up to `limit` change-table entries after `after`, in order.
    #[tracing::instrument(level = "debug", name = "rooms.sql.feed_after", skip_all, fields(region = self.region(), after = after))]
    pub async fn feed_after(&self, after: i64, limit: u32) -> Result<Vec<FeedEntry>, StoreError> {
        let Db::Sqlite(pool) = &self.db else {
            return Ok(Vec::new());
        };
        let rows: Vec<FeedRow> = sqlx::query_as(
            "SELECT seq, id, anchor_id, status, started_at_ms, ended_at_ms, version, deleted \
             FROM room_changes WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?;
        rows.into_iter()
            .map(
                |(seq, id, anchor, status, started, ended, version, deleted)| {
                    Ok(FeedEntry {
                        seq,
                        room: self.record((id, anchor, status, started, ended, version))?,
                        deleted,
                    })
                },
            )
            .collect()
    }

    /// SQLite only: the newest change-table sequence number (0 when empty).
    pub async fn feed_head(&self) -> Result<i64, StoreError> {
        let Db::Sqlite(pool) = &self.db else {
            return Ok(0);
        };
        let (head,): (Option<i64>,) = sqlx::query_as("SELECT MAX(seq) FROM room_changes")
            .fetch_one(pool)
            .await?;
        Ok(head.unwrap_or(0))
    }

    /// SQLite only: drops change-table entries up to `seq`.
    pub async fn trim_feed(&self, seq: i64) -> Result<u64, StoreError> {
        let Db::Sqlite(pool) = &self.db else {
            return Ok(0);
        };
        Ok(sqlx::query("DELETE FROM room_changes WHERE seq <= ?")
            .bind(seq)
            .execute(pool)
            .await?
            .rows_affected())
    }
}
