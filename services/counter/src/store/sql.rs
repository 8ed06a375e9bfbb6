//! The final totals in SQL: one `room_loves` row per ended room, written
//! once (a second write of the same room is ignored).

use livemesh_mesh::sql::{Db, Migrations, SqlError};

use crate::store::hot::BatchMark;

pub const MIGRATIONS: Migrations = Migrations {
    table: "_livemesh_counter_migrations",
    sqlite: &[
        (
            1,
            "room loves",
            include_str!("../../migrations/sqlite/0001_room_loves.sql"),
        ),
        (
            2,
            "room late loves",
            include_str!("../../migrations/sqlite/0002_room_late_loves.sql"),
        ),
    ],
    mysql: &[
        (
            1,
            "room loves",
            include_str!("../../migrations/mysql/0001_room_loves.sql"),
        ),
        (
            2,
            "room late loves",
            include_str!("../../migrations/mysql/0002_room_late_loves.sql"),
        ),
    ],
};

/// A room's final count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FinalLoves {
    pub room_id: u64,
    pub total: u64,
    pub top_lovers: Vec<(u64, u64)>,
    pub finalized_at_ms: i64,
}

#[derive(Debug, Clone)]
pub struct LovesDb {
    db: Db,
}

impl LovesDb {
    pub async fn open(url: &str) -> Result<Self, SqlError> {
        Ok(Self {
            db: Db::open(url, &MIGRATIONS).await?,
        })
    }

    /// Writes the room's final count unless one is there; true if written.
    #[tracing::instrument(name = "counter.sql.write_final", skip_all, fields(room_id = fin.room_id))]
    pub async fn write_once(&self, fin: &FinalLoves) -> Result<bool, sqlx::Error> {
        let top = serde_json::to_string(
            &fin.top_lovers
                .iter()
                .map(|(viewer_id, loves)| serde_json::json!({"viewer_id": viewer_id, "loves": loves}))
                .collect::<Vec<_>>(),
        )
        .unwrap_or_else(|_| "[]".to_owned());
        let room = i64::try_from(fin.room_id).unwrap_or(i64::MAX);
        let total = i64::try_from(fin.total).unwrap_or(i64::MAX);
        // The dialects spell "insert unless present" differently.
        let sql = if self.db.is_mysql() {
            "INSERT IGNORE INTO room_loves (room_id, total, top_lovers, finalized_at_ms) VALUES (?, ?, ?, ?)"
        } else {
            "INSERT INTO room_loves (room_id, total, top_lovers, finalized_at_ms) VALUES (?, ?, ?, ?) \
             ON CONFLICT (room_id) DO NOTHING"
        };
        let written = livemesh_mesh::on_db!(&self.db, pool => {
            sqlx::query(sql)
                .bind(room)
                .bind(total)
                .bind(&top)
                .bind(fin.finalized_at_ms)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(written == 1)
    }

    /// The final count of a room, if it was written.
    #[tracing::instrument(name = "counter.sql.get_final", skip_all, fields(room_id = room_id))]
    pub async fn get(&self, room_id: u64) -> Result<Option<FinalLoves>, sqlx::Error> {
        let room = i64::try_from(room_id).unwrap_or(i64::MAX);
        let row: Option<(i64, String, i64)> = livemesh_mesh::on_db!(&self.db, pool => {
            sqlx::query_as("SELECT total, top_lovers, finalized_at_ms FROM room_loves WHERE room_id = ?")
                .bind(room)
                .fetch_optional(pool)
                .await?
        });
        Ok(row.map(|(total, top, at)| {
            let top_lovers = serde_json::from_str::<Vec<serde_json::Value>>(&top)
                .unwrap_or_default()
                .iter()
                .filter_map(|v| Some((v["viewer_id"].as_u64()?, v["loves"].as_u64()?)))
                .collect();
            FinalLoves {
                room_id,
                total: total.unsigned_abs(),
                top_lovers,
                finalized_at_ms: at,
            }
        }))
    }

    /// Adds late batches of an ended room to its final count, each batch
    /// once (a batch already there is ignored).
    #[tracing::instrument(name = "counter.sql.add_late", skip_all, fields(room_id = room_id))]
    pub async fn add_late(&self, room_id: u64, batches: &[BatchMark]) -> Result<(), sqlx::Error> {
        let sql = if self.db.is_mysql() {
            "INSERT IGNORE INTO room_late_loves (room_id, viewer_id, batch_id, loves) VALUES (?, ?, ?, ?)"
        } else {
            "INSERT INTO room_late_loves (room_id, viewer_id, batch_id, loves) VALUES (?, ?, ?, ?) \
             ON CONFLICT (room_id, viewer_id, batch_id) DO NOTHING"
        };
        let room = i64::try_from(room_id).unwrap_or(i64::MAX);
        livemesh_mesh::on_db!(&self.db, pool => {
            let mut tx = pool.begin().await?;
            for batch in batches {
                sqlx::query(sql)
                    .bind(room)
                    .bind(i64::try_from(batch.viewer_id).unwrap_or(i64::MAX))
                    .bind(&batch.batch_id)
                    .bind(i64::try_from(batch.loves).unwrap_or(i64::MAX))
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// An ended room's final count with its late batches added: the total,
    /// and the ranking with each late lover's loves added (a late lover
    /// outside the stored ranking enters it with its late loves only).
    #[tracing::instrument(name = "counter.sql.final_with_late", skip_all, fields(room_id = room_id))]
    pub async fn final_with_late(&self, room_id: u64) -> Result<Option<FinalLoves>, sqlx::Error> {
        let Some(mut fin) = self.get(room_id).await? else {
            return Ok(None);
        };
        let room = i64::try_from(room_id).unwrap_or(i64::MAX);
        let late: Vec<(i64, i64)> = livemesh_mesh::on_db!(&self.db, pool => {
            sqlx::query_as(
                "SELECT viewer_id, loves FROM room_late_loves WHERE room_id = ?",
            )
            .bind(room)
            .fetch_all(pool)
            .await?
        });
        if late.is_empty() {
            return Ok(Some(fin));
        }
        for (viewer, loves) in late {
            let (viewer, loves) = (viewer.unsigned_abs(), loves.unsigned_abs());
            fin.total = fin.total.saturating_add(loves);
            match fin.top_lovers.iter_mut().find(|(v, _)| *v == viewer) {
                Some(entry) => entry.1 = entry.1.saturating_add(loves),
                None => fin.top_lovers.push((viewer, loves)),
            }
        }
        // Highest first; ties by the viewer id's decimal string, descending,
        // as the hot store ranks them.
        fin.top_lovers.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| b.0.to_string().cmp(&a.0.to_string()))
        });
        Ok(Some(fin))
    }
}
