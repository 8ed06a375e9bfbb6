//! The rooms table of one region, in SQLite or MySQL/MariaDB. The SQL is
//! written once: both dialects accept it.

mod feed;

use livemesh_mesh::on_db;
use livemesh_mesh::sql::{Db, Migrations, SqlError};

use crate::room::{RoomRecord, Status, local_id, room_id};

/// The rooms schema, per dialect.
pub const MIGRATIONS: Migrations = Migrations {
    table: "_livemesh_rooms_migrations",
    sqlite: &[
        (
            1,
            "rooms",
            include_str!("../../migrations/sqlite/0001_rooms.sql"),
        ),
        (
            2,
            "change feed",
            include_str!("../../migrations/sqlite/0002_change_feed.sql"),
        ),
    ],
    mysql: &[
        (
            1,
            "rooms",
            include_str!("../../migrations/mysql/0001_rooms.sql"),
        ),
        (
            2,
            "feed positions",
            include_str!("../../migrations/mysql/0002_feed_positions.sql"),
        ),
    ],
};

/// A `SELECT` of every column of `rooms`, in [`Row`]'s order.
macro_rules! select_rooms {
    ($tail:literal) => {
        concat!(
            "SELECT id, anchor_id, status, started_at_ms, ended_at_ms, version FROM rooms ",
            $tail
        )
    };
}
/// A row of `rooms`: id, anchor_id, status, started_at_ms, ended_at_ms, version.
pub type Row = (i64, i64, i32, i64, Option<i64>, i64);

/// How an attempt to end a room went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndOutcome {
    Ended(RoomRecord),
    AlreadyEnded(RoomRecord),
    NotFound,
}

/// Why a store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
    #[error("row {id} has unknown status {status}")]
    Corrupt { id: i64, status: i32 },
}

/// The rooms table of one region.
#[derive(Clone)]
pub struct RegionStore {
    region: u16,
    db: Db,
    /// Kept for the binlog tail's own connection; never logged.
    url: String,
}

impl std::fmt::Debug for RegionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegionStore")
            .field("region", &self.region)
            .field("url", &livemesh_mesh::sql::redact(&self.url))
            .finish()
    }
}

impl RegionStore {
    /// Opens (and migrates) the rooms database of `region` at `url`.
    pub async fn open(region: u16, url: &str) -> Result<Self, SqlError> {
        Ok(Self {
            region,
            db: Db::open(url, &MIGRATIONS).await?,
            url: url.to_owned(),
        })
    }

    /// The database URL, password included: for opening further connections only.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn region(&self) -> u16 {
        self.region
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The record of a row of this region's table.
    pub fn record(&self, row: Row) -> Result<RoomRecord, StoreError> {
        let (id, anchor_id, status, started_at_ms, ended_at_ms, version) = row;
        Ok(RoomRecord {
            room_id: room_id(self.region, id),
            anchor_id: anchor_id.unsigned_abs(),
            status: Status::from_db(status).ok_or(StoreError::Corrupt { id, status })?,
            started_at_ms,
            ended_at_ms,
            version: version.unsigned_abs(),
        })
    }

    /// Inserts an ongoing room and returns it; its id comes from the table.
    #[tracing::instrument(name = "rooms.sql.insert", skip_all, fields(region = self.region(), anchor_id = anchor_id))]
    pub async fn insert(&self, anchor_id: u64, now_ms: i64) -> Result<RoomRecord, StoreError> {
        // Anchor ids are checked below 2^63 by the caller.
        let anchor = i64::try_from(anchor_id).unwrap_or(i64::MAX);
        const SQL: &str = "INSERT INTO rooms (anchor_id, status, started_at_ms, ended_at_ms, version) VALUES (?, 1, ?, NULL, 1)";
        let id = match &self.db {
            Db::Sqlite(pool) => sqlx::query(SQL)
                .bind(anchor)
                .bind(now_ms)
                .execute(pool)
                .await?
                .last_insert_rowid(),
            Db::MySql(pool) => {
                let id = sqlx::query(SQL)
                    .bind(anchor)
                    .bind(now_ms)
                    .execute(pool)
                    .await?
                    .last_insert_id();
                i64::try_from(id).unwrap_or(i64::MAX)
            }
        };
        Ok(RoomRecord {
            room_id: room_id(self.region, id),
            anchor_id,
            status: Status::Ongoing,
            started_at_ms: now_ms,
            ended_at_ms: None,
            version: 1,
        })
    }

    /// Ends an ongoing room at `now_ms` (never before it started), in one
    /// transaction with the read that tells the three outcomes apart.
    #[tracing::instrument(name = "rooms.sql.end", skip_all, fields(region = self.region(), room_id = room))]
    pub async fn end(&self, room: u64, now_ms: i64) -> Result<EndOutcome, StoreError> {
        let id = local_id(room);
        let (updated, row): (u64, Option<Row>) = on_db!(&self.db, pool => {
            let mut tx = pool.begin().await?;
            let updated = sqlx::query(
                "UPDATE rooms SET status = 2, \
                 ended_at_ms = CASE WHEN started_at_ms > ? THEN started_at_ms ELSE ? END, \
                 version = version + 1 \
                 WHERE id = ? AND status = 1",
            )
            .bind(now_ms)
            .bind(now_ms)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            let row: Option<Row> = sqlx::query_as(select_rooms!("WHERE id = ?"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            tx.commit().await?;
            (updated, row)
        });
        Ok(match row {
            None => EndOutcome::NotFound,
            Some(row) if updated == 1 => EndOutcome::Ended(self.record(row)?),
            Some(row) => EndOutcome::AlreadyEnded(self.record(row)?),
        })
    }

    /// One room by id, ongoing or ended.
    #[tracing::instrument(name = "rooms.sql.get", skip_all, fields(region = self.region(), room_id = room))]
    pub async fn get(&self, room: u64) -> Result<Option<RoomRecord>, StoreError> {
        let row: Option<Row> = on_db!(&self.db, pool => {
            sqlx::query_as(select_rooms!("WHERE id = ?"))
                .bind(local_id(room))
                .fetch_optional(pool)
                .await?
        });
        row.map(|row| self.record(row)).transpose()
    }

    /// Up to `limit` ongoing rooms with a local id above `after`, in id order.
    #[tracing::instrument(name = "rooms.sql.ongoing_page", skip_all, fields(region = self.region(), after = after, limit = limit))]
    pub async fn ongoing_page(
        &self,
        after: i64,
        limit: u32,
    ) -> Result<Vec<RoomRecord>, StoreError> {
        let rows: Vec<Row> = on_db!(&self.db, pool => {
            sqlx::query_as(select_rooms!("WHERE status = 1 AND id > ? ORDER BY id LIMIT ?"))
            .bind(after)
            .bind(i64::from(limit))
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(|row| self.record(row)).collect()
    }
}
