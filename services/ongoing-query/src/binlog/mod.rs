//! A binlog tail for the `rooms` table of one MariaDB/MySQL database.
//!
//! The tail registers with the server as a replica (through `mysql_async`,
//! separately from the sqlx pool the service reads with), decodes the row
//! events of `database`.`rooms` and hands them out one committed transaction
//! at a time, each with the position a restarted tail resumes from.
//!
//! Positions are MariaDB GTID states when the server keeps GTIDs in its
//! binlog (`@@gtid_binlog_pos` is not empty), else binlog file + offset.
//! A tail keeps the kind of position it was started from.
//!
//! Needs on the server: `binlog_format=ROW`, `binlog_row_image=FULL` (or
//! `NOBLOB`), `REPLICATION SLAVE` (and `REPLICATION CLIENT`/`BINLOG MONITOR`
//! for [`current_position`]). With `binlog_row_metadata=FULL` columns are
//! found by name; without it, by their position in the migration's order.

mod decode;
mod position;
mod rooms_row;

use std::time::Duration;

use futures::StreamExt as _;
use livemesh_mesh::sql::redact;
use mysql_async::prelude::Queryable as _;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn, Opts, Row};
use tokio::sync::mpsc;

use self::decode::TailState;
pub use self::position::BinlogPosition;
use self::position::GtidState;
pub use self::rooms_row::RoomRow;

#[derive(Debug)]
pub enum TailEvent {
    /// The rows a committed transaction wrote to `rooms` (inserts and update after-images;
    /// deletes are reported as `deleted` ids), and the position just after that commit.
    ///
    /// One entry per row id: `rows` holds the last image of each row the
    /// transaction left in the table (in write order), `deleted` the ids it
    /// removed and did not write again. The two
    /// never share an id, so they can be applied in either order. An update
    /// that changes `id` shows as the old id deleted and the new row written.
    Committed {
        rows: Vec<RoomRow>,
        deleted: Vec<i64>,
        position: BinlogPosition,
        /// When the server wrote the commit (Unix seconds, the event
        /// header's resolution): how far the tail is behind.
        committed_at: u32,
    },
    /// Nothing for us, but the position advanced (other tables' commits, heartbeats): lets
    /// the caller persist progress. Emit at most about once a second, not per event.
    Progress { position: BinlogPosition },
}

#[derive(Debug, thiserror::Error)]
pub enum TailError {
    /// The server no longer has the requested position (purged binlog, error 1236 etc.).
    #[error("the server no longer has the requested binlog position: {0}")]
    PositionGone(String),
    /// Connection lost / stream broke / decode failure.
    #[error("binlog tail broken: {0}")]
    Broken(String),
}

/// Capacity of the channel a tail sends on: a slow receiver stalls the tail
/// (and so the server's send buffer), it never loses events.
const CHANNEL_CAPACITY: usize = 1024;
/// How often the server sends a heartbeat while it has nothing to send.
const HEARTBEAT_PERIOD: Duration = Duration::from_secs(1);
/// No event (heartbeats included) for this long means the connection is dead.
const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound on connecting and setting up the replica session.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// ER_MASTER_FATAL_ERROR_READING_BINLOG: the server cannot serve the
/// requested position (purged file, GTID no longer in any binlog, offset
/// past the end, ...).
const ER_POSITION_GONE: u16 = 1236;
/// ER_UNKNOWN_SYSTEM_VARIABLE: `@@gtid_binlog_pos` on MySQL.
const ER_UNKNOWN_SYSTEM_VARIABLE: u16 = 1193;
/// ER_PARSE_ERROR: `SHOW MASTER STATUS` on MySQL 8.4+, which renamed it.
const ER_PARSE_ERROR: u16 = 1064;

/// MARIA_SLAVE_CAPABILITY_GTID: the server then sends GTID events as they
/// are instead of rewriting them to BEGIN, and accepts a GTID start state.
const MARIA_SLAVE_CAPABILITY_GTID: u32 = 4;

/// The server's current end of binlog (what a tail started "now" should start from).
/// Uses @@gtid_binlog_pos on MariaDB when non-empty, else SHOW MASTER STATUS.
pub async fn current_position(url: &str) -> Result<BinlogPosition, TailError> {
    let what = format!("reading the binlog position of {}", redact(url));
    let mut conn = tokio::time::timeout(SETUP_TIMEOUT, connect(url))
        .await
        .map_err(|_| TailError::Broken(format!("{what}: no connection in {SETUP_TIMEOUT:?}")))??;
    let result = tokio::time::timeout(SETUP_TIMEOUT, position_on(&mut conn))
        .await
        .map_err(|_| TailError::Broken(format!("{what}: no answer in {SETUP_TIMEOUT:?}")))
        .and_then(|r| r.map_err(|e| prefix(e, &what)));
    // Closing is a courtesy to the server; the answer is already in hand.
    let _ = conn.disconnect().await;
    result
}

async fn position_on(conn: &mut Conn) -> Result<BinlogPosition, TailError> {
    match conn
        .query_first::<Row, _>("SELECT @@GLOBAL.gtid_binlog_pos")
        .await
    {
        Ok(row) => {
            let state: Option<String> = row.and_then(|r| r.get_opt(0)).and_then(Result::ok);
            let state = state.unwrap_or_default();
            let state = state.trim();
            // Empty until the first GTID is logged: file+pos then.
            if !state.is_empty() {
                return match GtidState::parse(state) {
                    Some(parsed) => Ok(BinlogPosition::Gtid(parsed.render())),
                    None => Err(TailError::Broken(format!(
                        "unreadable @@gtid_binlog_pos {state:?}"
                    ))),
                };
            }
        }
        // MySQL has no such variable: file+pos.
        Err(mysql_async::Error::Server(e)) if e.code == ER_UNKNOWN_SYSTEM_VARIABLE => {}
        Err(e) => return Err(broken("SELECT @@GLOBAL.gtid_binlog_pos", e)),
    }
    let row = match conn.query_first::<Row, _>("SHOW MASTER STATUS").await {
        Err(mysql_async::Error::Server(e)) if e.code == ER_PARSE_ERROR => {
            conn.query_first::<Row, _>("SHOW BINARY LOG STATUS").await
        }
        other => other,
    }
    .map_err(|e| broken("SHOW MASTER STATUS", e))?
    .ok_or_else(|| {
        TailError::Broken("SHOW MASTER STATUS is empty: binary logging is off".to_owned())
    })?;
    let name: Option<String> = row.get_opt(0).and_then(Result::ok);
    let pos: Option<u64> = row.get_opt(1).and_then(Result::ok);
    match (name, pos) {
        (Some(name), Some(pos)) if !name.is_empty() => Ok(BinlogPosition::File { name, pos }),
        _ => Err(TailError::Broken(format!(
            "SHOW MASTER STATUS gave no file and position: {row:?}"
        ))),
    }
}

/// Starts tailing `database`.`rooms` on the server at `url` (mysql://user:pass@host:port/db) from
/// `from` as replica `server_id` (must differ from the server's own id and from other tails;
/// derive a default from e.g. a hash, caller passes it). Events are sent in commit order on the
/// returned channel (bounded, e.g. 1024); on any error the task sends one Err and ends (the caller
/// decides to rescan and restart). Dropping the receiver stops the task.
///
/// Two replicas with one `server_id` make the server drop the older one's
/// stream, which that tail reports as `Broken`. Must be called inside a
/// Tokio runtime.
pub fn spawn_tail(
    url: &str,
    database: &str,
    from: BinlogPosition,
    server_id: u32,
) -> mpsc::Receiver<Result<TailEvent, TailError>> {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let url = url.to_owned();
    let database = database.to_owned();
    tokio::spawn(async move {
        // The tail runs in its own task so that a panic (mysql_common has a
        // few on malformed events) still reaches the receiver as an error
        // rather than as a silently closed channel.
        let worker = tokio::spawn(run(url.clone(), database, from, server_id, tx.clone()));
        if let Err(e) = worker.await
            && e.is_panic()
        {
            let _ = tx
                .send(Err(TailError::Broken(format!(
                    "the binlog tail of {} panicked",
                    redact(&url)
                ))))
                .await;
        }
    });
    rx
}

type Sender = mpsc::Sender<Result<TailEvent, TailError>>;

async fn run(url: String, database: String, from: BinlogPosition, server_id: u32, tx: Sender) {
    if let Err(e) = tail(&url, &database, from, server_id, &tx).await {
        tracing::warn!(url = %redact(&url), %database, server_id, error = %e, "binlog tail stopped");
        // The receiver may be gone already; then nobody needs the error.
        let _ = tx.send(Err(e)).await;
    }
}

/// Tails until an error, or `Ok` once the receiver is dropped.
async fn tail(
    url: &str,
    database: &str,
    from: BinlogPosition,
    server_id: u32,
    tx: &Sender,
) -> Result<(), TailError> {
    let what = format!("binlog of {} from {}", redact(url), from.to_token());
    let mut state = TailState::new(database, &from).map_err(|e| prefix(e, &what))?;
    let setup = tokio::time::timeout(SETUP_TIMEOUT, open_stream(url, &from, &state, server_id));
    let mut stream = tokio::select! {
        _ = tx.closed() => return Ok(()),
        opened = setup => opened
            .map_err(|_| TailError::Broken(format!("{what}: no stream in {SETUP_TIMEOUT:?}")))?
            .map_err(|e| prefix(e, &what))?,
    };
    loop {
        let next = tokio::select! {
            _ = tx.closed() => return Ok(()),
            next = tokio::time::timeout(READ_TIMEOUT, stream.next()) => next,
        };
        let event = match next {
            Err(_) => {
                return Err(TailError::Broken(format!(
                    "{what}: no event or heartbeat for {READ_TIMEOUT:?}"
                )));
            }
            Ok(None) => {
                return Err(TailError::Broken(format!(
                    "{what}: the server ended the stream"
                )));
            }
            Ok(Some(Err(e))) => return Err(prefix(classify(e), &what)),
            Ok(Some(Ok(event))) => event,
        };
        let out = state
            .handle(&event, &stream)
            .map_err(|e| prefix(e, &what))?;
        for out in out.into_iter().chain(state.due_progress()) {
            if tx.send(Ok(out)).await.is_err() {
                return Ok(());
            }
        }
    }
}

async fn connect(url: &str) -> Result<Conn, TailError> {
    // The service accepts `mariadb://` as sqlx does; mysql_async knows only `mysql://`.
    let normalized = match url.strip_prefix("mariadb:") {
        Some(rest) => format!("mysql:{rest}"),
        None => url.to_owned(),
    };
    let opts = Opts::from_url(&normalized)
        .map_err(|e| TailError::Broken(format!("bad MySQL URL {}: {e}", redact(url))))?;
    Conn::new(opts)
        .await
        .map_err(|e| broken(&format!("connecting to {}", redact(url)), e))
}

/// Connects, checks the server logs what the tail needs, and asks for the stream.
async fn open_stream(
    url: &str,
    from: &BinlogPosition,
    state: &TailState,
    server_id: u32,
) -> Result<BinlogStream, TailError> {
    let mut conn = connect(url).await?;
    let settings: Option<Row> = conn
        .query_first("SELECT @@GLOBAL.binlog_format, @@GLOBAL.binlog_row_image")
        .await
        .map_err(|e| broken("reading binlog settings", e))?;
    let setting = |i: usize| -> String {
        settings
            .as_ref()
            .and_then(|r| r.get_opt::<String, _>(i))
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    let (format, image) = (setting(0), setting(1));
    // Statement-logged changes carry no rows; a MINIMAL after-image lacks
    // the columns an update did not change.
    if !format.eq_ignore_ascii_case("ROW") {
        return Err(TailError::Broken(format!(
            "binlog_format is {format:?}; the tail needs ROW"
        )));
    }
    if !(image.eq_ignore_ascii_case("FULL") || image.eq_ignore_ascii_case("NOBLOB")) {
        return Err(TailError::Broken(format!(
            "binlog_row_image is {image:?}; the tail needs FULL"
        )));
    }
    // User variables the server's dump thread reads (MySQL ignores the
    // MariaDB ones). The checksum variable is left to mysql_async: it sets
    // @master_binlog_checksum itself right before registering, overriding
    // anything set here.
    let mut setup = vec![
        format!(
            "SET @master_heartbeat_period = {}",
            HEARTBEAT_PERIOD.as_nanos()
        ),
        format!("SET @mariadb_slave_capability = {MARIA_SLAVE_CAPABILITY_GTID}"),
    ];
    if let Some(gtid) = &state.gtid {
        // Rendered from the parsed state: digits, '-' and ',' only.
        setup.push(format!("SET @slave_connect_state = '{}'", gtid.render()));
    }
    for sql in &setup {
        conn.query_drop(sql.as_str())
            .await
            .map_err(|e| broken(sql, e))?;
    }
    let request = BinlogStreamRequest::new(server_id);
    let request = match from {
        // MariaDB starts from @slave_connect_state when asked for file "" at 4
        // (mysql_async's with_gtid() is MySQL's protocol, not this one).
        BinlogPosition::Gtid(_) => request.with_filename(b"").with_pos(4),
        BinlogPosition::File { name, pos } => request.with_filename(name.as_bytes()).with_pos(*pos),
    };
    conn.get_binlog_stream(request)
        .await
        .map_err(|e| prefix(classify(e), "registering as a replica"))
}

fn broken(what: &str, e: mysql_async::Error) -> TailError {
    TailError::Broken(format!("{what}: {e}"))
}

/// Error 1236 from the server means the position is gone; anything else broke.
fn classify(e: mysql_async::Error) -> TailError {
    match e {
        mysql_async::Error::Server(s) if s.code == ER_POSITION_GONE => {
            TailError::PositionGone(format!("server error {}: {}", s.code, s.message))
        }
        other => TailError::Broken(other.to_string()),
    }
}

fn prefix(e: TailError, what: &str) -> TailError {
    match e {
        TailError::PositionGone(m) => TailError::PositionGone(format!("{what}: {m}")),
        TailError::Broken(m) => TailError::Broken(format!("{what}: {m}")),
    }
}

#[cfg(test)]
mod tests {
    use super::decode::{Group, crc32};
    use super::position::{Gtid, GtidState};
    use super::rooms_row::changes_rooms;
    use super::*;

    #[test]
    fn tokens_round_trip() {
        for position in [
            BinlogPosition::Gtid("0-1-42".to_owned()),
            BinlogPosition::Gtid("0-1-42,7-3-9".to_owned()),
            BinlogPosition::File {
                name: "mysql-bin.000003".to_owned(),
                pos: 1234,
            },
            BinlogPosition::File {
                name: "odd:name".to_owned(),
                pos: 4,
            },
        ] {
            assert_eq!(
                BinlogPosition::from_token(&position.to_token()),
                Some(position)
            );
        }
        assert_eq!(
            BinlogPosition::Gtid("0-1-42".to_owned()).to_token(),
            "gtid:0-1-42"
        );
        assert_eq!(
            BinlogPosition::File {
                name: "mysql-bin.000003".to_owned(),
                pos: 1234
            }
            .to_token(),
            "file:mysql-bin.000003:1234"
        );
    }

    #[test]
    fn bad_tokens_are_refused() {
        for token in [
            "",
            "gtid:",
            "gtid:0-1",
            "gtid:0-1-x",
            "gtid:0-1-2-3",
            "gtid:0-1-2,0-1-3",
            "gtid:0-1-2'; DROP TABLE rooms; --",
            "file:",
            "file:name",
            "file::4",
            "file:name:-1",
            "other:x",
        ] {
            assert_eq!(BinlogPosition::from_token(token), None, "{token:?}");
        }
    }

    #[test]
    fn gtid_state_keeps_the_last_of_each_domain() {
        let mut state = GtidState::parse("1-2-3,0-1-42").unwrap_or_default();
        state.apply(Gtid {
            domain: 0,
            server: 5,
            seq: 43,
        });
        state.apply(Gtid {
            domain: 2,
            server: 1,
            seq: 1,
        });
        assert_eq!(state.render(), "0-5-43,1-2-3,2-1-1");
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xCBF4_3926);
    }

    #[test]
    fn statements_that_change_rooms_are_spotted() {
        let db = "lm_a";
        assert!(changes_rooms("TRUNCATE TABLE rooms", "lm_a", db));
        assert!(changes_rooms(
            "DROP TABLE `lm_a`.`rooms` /* generated by server */",
            "",
            db
        ));
        assert!(changes_rooms(
            "/* x */ ALTER TABLE Rooms ADD c INT",
            "lm_a",
            db
        ));
        assert!(changes_rooms("DROP DATABASE `lm_a`", "", db));
        assert!(!changes_rooms("TRUNCATE TABLE rooms", "lm_b", db));
        assert!(!changes_rooms("CREATE TABLE other (id INT)", "lm_a", db));
        assert!(!changes_rooms("ANALYZE TABLE rooms", "lm_a", db));
        assert!(!changes_rooms("DROP DATABASE `lm_b`", "lm_a", db));
        assert!(!changes_rooms(
            "CREATE TABLE _livemesh_rooms_migrations (v INT)",
            "lm_a",
            db
        ));
    }

    #[test]
    fn a_group_reports_each_row_once() {
        let row = |id, version| RoomRow {
            id,
            anchor_id: 1,
            status: 1,
            started_at_ms: 0,
            ended_at_ms: None,
            version,
        };
        let mut group = Group::default();
        group.write(row(1, 1));
        group.write(row(2, 1));
        group.write(row(1, 2));
        group.delete(2);
        group.delete(3);
        group.write(row(3, 1));
        assert!(!group.is_empty());
        let mut again = Group::default();
        again.delete(5);
        again.write(row(5, 3));
        assert_eq!(again.into_changes(), (vec![row(5, 3)], vec![]));
        assert_eq!(group.into_changes(), (vec![row(1, 2), row(3, 1)], vec![2]));
    }
}
