//! The `rooms` table as the binlog carries it: its row images read into
//! [`RoomRow`]s (columns by name, else by the migration's order), and the
//! statements that change it without row events.

use mysql_async::Value;
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;

use super::TailError;

/// One row of `rooms` as the binlog carried it (the after-image for inserts and updates).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomRow {
    pub id: i64,
    pub anchor_id: i64,
    pub status: i32,
    pub started_at_ms: i64,
    pub ended_at_ms: Option<i64>,
    pub version: i64,
}

/// The table the tail reports.
pub(super) const TABLE: &str = "rooms";
/// `rooms`' columns in the migration's order: the fallback when the table
/// map carries no column names (`binlog_row_metadata` below FULL).
const COLUMNS: [&str; 6] = [
    "id",
    "anchor_id",
    "status",
    "started_at_ms",
    "ended_at_ms",
    "version",
];

/// Whether a logged statement changes `database`.`rooms`: it starts with a
/// changing verb and names `rooms` in that database (named, or the
/// session's default), or drops the whole database.
pub(super) fn changes_rooms(sql: &str, schema: &str, database: &str) -> bool {
    let mut body = sql.trim_start();
    // MariaDB keeps a statement's leading comments.
    while let Some(rest) = body.strip_prefix("/*") {
        body = rest
            .split_once("*/")
            .map_or("", |(_, after)| after)
            .trim_start();
    }
    let mut words = body
        .split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '$'))
        .filter(|w| !w.is_empty());
    let Some(verb) = words.next() else {
        return false;
    };
    const CHANGING: [&str; 10] = [
        "ALTER", "CREATE", "DELETE", "DROP", "INSERT", "LOAD", "RENAME", "REPLACE", "TRUNCATE",
        "UPDATE",
    ];
    if !CHANGING.iter().any(|k| verb.eq_ignore_ascii_case(k)) {
        return false;
    }
    let words: Vec<&str> = words.collect();
    let names_db = schema == database || words.contains(&database);
    let names_rooms = words.iter().any(|w| w.eq_ignore_ascii_case(TABLE));
    let drops_db = verb.eq_ignore_ascii_case("DROP")
        && words.first().is_some_and(|w| {
            w.eq_ignore_ascii_case("DATABASE") || w.eq_ignore_ascii_case("SCHEMA")
        })
        && words.contains(&database);
    (names_rooms && names_db) || drops_db
}

/// The index of a column in a row image: by name, else by its position in
/// the table (rows without names call columns `@<position>`).
fn column(row: &BinlogRow, ordinal: usize) -> Option<usize> {
    let name = COLUMNS.get(ordinal)?;
    let columns = row.columns_ref();
    columns
        .iter()
        .position(|c| c.name_ref() == name.as_bytes())
        .or_else(|| {
            let anonymous = format!("@{ordinal}");
            columns
                .iter()
                .position(|c| c.name_ref() == anonymous.as_bytes())
        })
}

/// An integer column (NULL as `None`).
fn int(row: &BinlogRow, ordinal: usize) -> Result<Option<i64>, TailError> {
    let name = COLUMNS.get(ordinal).copied().unwrap_or("?");
    let missing = || {
        TailError::Broken(format!(
            "the row image of {TABLE} lacks column {name} (binlog_row_image must be FULL)"
        ))
    };
    let index = column(row, ordinal).ok_or_else(missing)?;
    match row.as_ref(index).ok_or_else(missing)? {
        BinlogValue::Value(Value::NULL) => Ok(None),
        BinlogValue::Value(Value::Int(v)) => Ok(Some(*v)),
        BinlogValue::Value(Value::UInt(v)) => i64::try_from(*v)
            .map(Some)
            .map_err(|_| TailError::Broken(format!("{TABLE}.{name} = {v} is out of range"))),
        other => Err(TailError::Broken(format!(
            "{TABLE}.{name} is not an integer: {other:?}"
        ))),
    }
}

fn not_null(row: &BinlogRow, ordinal: usize) -> Result<i64, TailError> {
    int(row, ordinal)?.ok_or_else(|| {
        TailError::Broken(format!(
            "{TABLE}.{} is NULL",
            COLUMNS.get(ordinal).copied().unwrap_or("?")
        ))
    })
}

pub(super) fn row_id(row: &BinlogRow) -> Result<i64, TailError> {
    not_null(row, 0)
}

pub(super) fn room_row(row: &BinlogRow) -> Result<RoomRow, TailError> {
    let status = not_null(row, 2)?;
    Ok(RoomRow {
        id: not_null(row, 0)?,
        anchor_id: not_null(row, 1)?,
        status: i32::try_from(status)
            .map_err(|_| TailError::Broken(format!("{TABLE}.status = {status} is out of range")))?,
        started_at_ms: not_null(row, 3)?,
        ended_at_ms: int(row, 4)?,
        version: not_null(row, 5)?,
    })
}
