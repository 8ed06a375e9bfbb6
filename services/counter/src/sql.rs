//! The final totals in SQL: one `room_loves` row per ended room, written
//! once (a second write of the same room is ignored).

use livemesh_mesh::sql::{Db, Migrations, SqlError};

pub const MIGRATIONS: Migrations = Migrations {
    table: "_livemesh_counter_migrations",
    sqlite: &[(
        1,
        "room loves",
        include_str!("../migrations/sqlite/0001_room_loves.sql"),
    )],
    mysql: &[(
        1,
        "room loves",
        include_str!("../migrations/mysql/0001_room_loves.sql"),
    )],
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

    pub fn db(&self) -> &Db {
        &self.db
    }
}
