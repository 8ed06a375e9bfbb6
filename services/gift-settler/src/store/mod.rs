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

mod apply;
mod rooms;
mod settlement;

use livemesh_mesh::breaker::{BreakerSettings, CallBreaker};
use livemesh_mesh::on_db;
use livemesh_mesh::sql::{Db, Migrations, SqlError, redact};

use crate::error::LedgerError;

pub use self::apply::Announce;
#[cfg(feature = "testing")]
pub use self::apply::Silent;

pub const MIGRATIONS: Migrations = Migrations {
    table: "_livemesh_gifts_migrations",
    sqlite: &[
        (
            1,
            "ledger",
            include_str!("../../migrations/sqlite/0001_ledger.sql"),
        ),
        (
            2,
            "settlements",
            include_str!("../../migrations/sqlite/0002_settlements.sql"),
        ),
    ],
    mysql: &[
        (
            1,
            "ledger",
            include_str!("../../migrations/mysql/0001_ledger.sql"),
        ),
        (
            2,
            "settlements",
            include_str!("../../migrations/mysql/0002_settlements.sql"),
        ),
        (
            3,
            "transfer ids exact",
            include_str!("../../migrations/mysql/0003_transfer_ids_exact.sql"),
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

/// What an applied (or replayed) transfer reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub transfer_id: String,
    pub balance: i64,
    /// True when the transfer had been applied before (same key, same content).
    pub replayed: bool,
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

    #[cfg(feature = "testing")]
    pub fn db(&self) -> &Db {
        &self.db
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

    /// Every account below zero, with its balance (only those that may go
    /// negative: the funding and clearing accounts).
    #[cfg(feature = "testing")]
    pub async fn negative_balances(&self) -> Result<Vec<(String, i64)>, sqlx::Error> {
        Ok(on_db!(&self.db, pool => {
            sqlx::query_as("SELECT account, balance FROM accounts WHERE balance < 0 ORDER BY account")
                .fetch_all(pool)
                .await?
        }))
    }

    /// The sum of every balance in the shard (zero: money is conserved).
    #[cfg(feature = "testing")]
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
