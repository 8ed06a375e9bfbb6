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

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use livemesh_mesh::sql::redact;
use mysql_async::binlog::events::{Event, EventData, RowsEventData, TableMapEvent};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::prelude::Queryable as _;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn, Opts, Row, Value};
use tokio::sync::mpsc;

/// Where a tail is in a server's binlog. Serialised as a string for storage
/// (`to_token`/`from_token`), e.g. "gtid:0-1-42" or "file:mysql-bin.000003:1234";
/// prefer GTID on MariaDB when the server reports @@gtid_binlog_pos, else file+pos.
///
/// A GTID position is a MariaDB GTID state: one `domain-server-seq` per
/// replication domain, comma-separated (`0-1-42` on a single-domain server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinlogPosition {
    Gtid(String),
    File { name: String, pos: u64 },
}

impl BinlogPosition {
    /// The position as one string, for storage; [`BinlogPosition::from_token`] reads it back.
    pub fn to_token(&self) -> String {
        match self {
            BinlogPosition::Gtid(state) => format!("gtid:{state}"),
            BinlogPosition::File { name, pos } => format!("file:{name}:{pos}"),
        }
    }

    /// Reads a token written by [`BinlogPosition::to_token`]; `None` when it is not one.
    pub fn from_token(s: &str) -> Option<Self> {
        if let Some(state) = s.strip_prefix("gtid:") {
            // Only well-formed states: the string goes into a SQL statement later.
            GtidState::parse(state)?;
            return Some(BinlogPosition::Gtid(state.to_owned()));
        }
        let rest = s.strip_prefix("file:")?;
        // The offset is after the last colon, so a file name may hold colons.
        let (name, pos) = rest.rsplit_once(':')?;
        if name.is_empty() {
            return None;
        }
        Some(BinlogPosition::File {
            name: name.to_owned(),
            pos: pos.parse().ok()?,
        })
    }
}

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
/// Least time between two `Progress` events.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on connecting and setting up the replica session.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// The table the tail reports.
const TABLE: &str = "rooms";
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

/// ER_MASTER_FATAL_ERROR_READING_BINLOG: the server cannot serve the
/// requested position (purged file, GTID no longer in any binlog, offset
/// past the end, ...).
const ER_POSITION_GONE: u16 = 1236;
/// ER_UNKNOWN_SYSTEM_VARIABLE: `@@gtid_binlog_pos` on MySQL.
const ER_UNKNOWN_SYSTEM_VARIABLE: u16 = 1193;
/// ER_PARSE_ERROR: `SHOW MASTER STATUS` on MySQL 8.4+, which renamed it.
const ER_PARSE_ERROR: u16 = 1064;

// Raw event type bytes. MariaDB's own types (>= 160) are unknown to
// mysql_common, which hands their bytes over undecoded.
const QUERY_EVENT: u8 = 2;
const ROTATE_EVENT: u8 = 4;
const FORMAT_DESCRIPTION_EVENT: u8 = 15;
const XID_EVENT: u8 = 16;
const WRITE_ROWS_V1: u8 = 23;
const UPDATE_ROWS_V1: u8 = 24;
const DELETE_ROWS_V1: u8 = 25;
const WRITE_ROWS: u8 = 30;
const UPDATE_ROWS: u8 = 31;
const DELETE_ROWS: u8 = 32;
const XA_PREPARE_LOG_EVENT: u8 = 38;
const PARTIAL_UPDATE_ROWS: u8 = 39;
const MARIA_GTID_EVENT: u8 = 162;
const MARIA_QUERY_COMPRESSED: u8 = 165;
const MARIA_ROWS_COMPRESSED: std::ops::RangeInclusive<u8> = 166..=171;
/// MariaDB GTID event flag: the group is one statement with no BEGIN/COMMIT
/// (DDL); otherwise it runs until an XID or a COMMIT/ROLLBACK query.
const FL_STANDALONE: u8 = 1;
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

/// One MariaDB GTID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Gtid {
    domain: u32,
    server: u32,
    seq: u64,
}

/// A MariaDB GTID state: the last GTID of each replication domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct GtidState(BTreeMap<u32, (u32, u64)>);

impl GtidState {
    /// `domain-server-seq[,domain-server-seq...]`, one per domain.
    fn parse(s: &str) -> Option<Self> {
        let mut map = BTreeMap::new();
        for part in s.split(',') {
            let mut fields = part.trim().split('-');
            let domain = fields.next()?.parse().ok()?;
            let server = fields.next()?.parse().ok()?;
            let seq = fields.next()?.parse().ok()?;
            if fields.next().is_some() || map.insert(domain, (server, seq)).is_some() {
                return None;
            }
        }
        Some(Self(map))
    }

    fn render(&self) -> String {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(domain, (server, seq))| format!("{domain}-{server}-{seq}"))
            .collect();
        parts.join(",")
    }

    fn apply(&mut self, gtid: Gtid) {
        self.0.insert(gtid.domain, (gtid.server, gtid.seq));
    }
}

/// What the tail knows between events.
struct TailState {
    database: String,
    /// `Some` when the tail reports GTID positions: the state after the last
    /// group that ended.
    gtid: Option<GtidState>,
    /// The binlog file being read (from rotate events).
    file: String,
    /// The end of the last event in `file` that gave one (`log_pos` 0 means
    /// "not in the file", e.g. events unpacked from a MySQL compressed payload).
    last_end: u64,
    /// Until the first format description, events are read without knowing
    /// the checksum algorithm (see `rotate`).
    fde_seen: bool,
    /// The position after the last group that ended.
    committed: BinlogPosition,
    group: Group,
    /// `committed` moved since the last event sent.
    progress_pending: bool,
    last_progress: Instant,
    /// The header timestamp of the event being handled.
    event_time: u32,
}

/// The transaction (event group) being read.
#[derive(Default)]
struct Group {
    /// Inside BEGIN ... COMMIT/XID: queries do not end the group.
    open: bool,
    gtid: Option<Gtid>,
    /// The latest image of each written row, in write order; `None` where a
    /// later delete took the row back out. Indexed by id so that a bulk
    /// statement stays linear.
    rows: Vec<Option<RoomRow>>,
    row_at: HashMap<i64, usize>,
    deleted: Vec<Option<i64>>,
    deleted_at: HashMap<i64, usize>,
}

impl Group {
    fn write(&mut self, row: RoomRow) {
        if let Some(i) = self.deleted_at.remove(&row.id)
            && let Some(slot) = self.deleted.get_mut(i)
        {
            *slot = None;
        }
        match self.row_at.get(&row.id).and_then(|&i| self.rows.get_mut(i)) {
            Some(slot) => *slot = Some(row),
            None => {
                self.row_at.insert(row.id, self.rows.len());
                self.rows.push(Some(row));
            }
        }
    }

    fn delete(&mut self, id: i64) {
        if let Some(i) = self.row_at.remove(&id)
            && let Some(slot) = self.rows.get_mut(i)
        {
            *slot = None;
        }
        if !self.deleted_at.contains_key(&id) {
            self.deleted_at.insert(id, self.deleted.len());
            self.deleted.push(Some(id));
        }
    }

    fn is_empty(&self) -> bool {
        self.row_at.is_empty() && self.deleted_at.is_empty()
    }

    /// The rows left written and the ids left deleted.
    fn into_changes(self) -> (Vec<RoomRow>, Vec<i64>) {
        (
            self.rows.into_iter().flatten().collect(),
            self.deleted.into_iter().flatten().collect(),
        )
    }
}

/// How an event group ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Commit,
    /// Rolled back, or only prepared (XA): its rows are not (yet) in the table.
    Discard,
}

impl TailState {
    fn new(database: &str, from: &BinlogPosition) -> Result<Self, TailError> {
        let (gtid, file, last_end) = match from {
            BinlogPosition::Gtid(state) => {
                let parsed = GtidState::parse(state).ok_or_else(|| {
                    TailError::Broken(format!("unreadable GTID position {state:?}"))
                })?;
                (Some(parsed), String::new(), 0)
            }
            BinlogPosition::File { name, pos } => (None, name.clone(), *pos),
        };
        Ok(Self {
            database: database.to_owned(),
            gtid,
            file,
            last_end,
            fde_seen: false,
            committed: from.clone(),
            group: Group::default(),
            progress_pending: false,
            last_progress: Instant::now(),
            event_time: 0,
        })
    }

    /// Reads one event; returns what it completes.
    fn handle(
        &mut self,
        event: &Event,
        stream: &BinlogStream,
    ) -> Result<Option<TailEvent>, TailError> {
        let header = event.header();
        self.event_time = header.timestamp();
        let log_pos = u64::from(header.log_pos());
        if log_pos != 0 && header.event_type_raw() != ROTATE_EVENT {
            self.last_end = log_pos;
        }
        match header.event_type_raw() {
            ROTATE_EVENT => self.rotate(event)?,
            FORMAT_DESCRIPTION_EVENT => self.fde_seen = true,
            MARIA_GTID_EVENT => {
                let (gtid, flags) = maria_gtid(event)?;
                self.begin_group(Some(gtid), flags & FL_STANDALONE == 0);
            }
            XID_EVENT => return Ok(self.end_group(End::Commit, log_pos)),
            XA_PREPARE_LOG_EVENT => return Ok(self.end_group(End::Discard, log_pos)),
            QUERY_EVENT => {
                let Some(EventData::QueryEvent(query)) = decode(event)? else {
                    return Err(TailError::Broken("a query event did not decode".to_owned()));
                };
                return self.query(&query.query(), &query.schema(), log_pos);
            }
            // A compressed statement: never BEGIN/COMMIT (MariaDB compresses
            // only long ones), so it ends the group only when it is one.
            MARIA_QUERY_COMPRESSED if !self.group.open => {
                return Ok(self.end_group(End::Commit, log_pos));
            }
            WRITE_ROWS_V1 | UPDATE_ROWS_V1 | DELETE_ROWS_V1 | WRITE_ROWS | UPDATE_ROWS
            | DELETE_ROWS | PARTIAL_UPDATE_ROWS => {
                let Some(EventData::RowsEvent(rows)) = decode(event)? else {
                    return Err(TailError::Broken("a rows event did not decode".to_owned()));
                };
                let table_id = rows.table_id();
                let tme = stream.get_tme(table_id).ok_or_else(|| {
                    TailError::Broken(format!(
                        "rows event for table id {table_id} with no table map"
                    ))
                })?;
                if self.is_rooms(tme) {
                    self.collect(&rows, tme)?;
                }
            }
            t if MARIA_ROWS_COMPRESSED.contains(&t) => {
                // mysql_common cannot inflate these; fail loudly for our table.
                let table_id = event.data().get(..6).map(|b| {
                    b.iter()
                        .rev()
                        .fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
                });
                if let Some(tme) = table_id.and_then(|id| stream.get_tme(id))
                    && self.is_rooms(tme)
                {
                    return Err(TailError::Broken(
                        "compressed row events (log_bin_compress) are not supported".to_owned(),
                    ));
                }
            }
            // Table maps are kept by mysql_async's reader; heartbeats only
            // prove the connection alive; the rest carries nothing for us.
            _ => {}
        }
        Ok(None)
    }

    /// A `Progress` when the position moved and the last one is old enough.
    fn due_progress(&mut self) -> Option<TailEvent> {
        if !self.progress_pending || self.last_progress.elapsed() < PROGRESS_INTERVAL {
            return None;
        }
        self.progress_pending = false;
        self.last_progress = Instant::now();
        Some(TailEvent::Progress {
            position: self.committed.clone(),
        })
    }

    fn is_rooms(&self, tme: &TableMapEvent<'_>) -> bool {
        tme.table_name_raw() == TABLE.as_bytes()
            && tme.database_name_raw() == self.database.as_bytes()
    }

    fn rotate(&mut self, event: &Event) -> Result<(), TailError> {
        let data = event.data();
        let Some((pos, name)) = data.split_at_checked(8) else {
            return Err(TailError::Broken(format!(
                "a rotate event of {} bytes",
                data.len()
            )));
        };
        let mut name = name;
        // The first (fake) rotate comes before the format description, so the
        // reader could not know to cut its checksum off: the 4 bytes are
        // still glued to the name, and resuming from that name fails with
        // 1236. Cut them when they are the event's CRC32; a server logging
        // without checksums sends none, and the check leaves the name whole.
        if !self.fde_seen
            && let Some((body, sum)) = data.split_at_checked(data.len().saturating_sub(4))
            && data.len() >= 12
            && crc32(&[&header_bytes(event), body]) == u32::from_le_bytes(to_array(sum)?)
        {
            name = body.get(8..).unwrap_or_default();
        }
        let name = String::from_utf8(name.to_vec()).map_err(|_| {
            TailError::Broken(format!("a binlog file name that is not UTF-8: {name:?}"))
        })?;
        self.file = name;
        self.last_end = u64::from_le_bytes(to_array(pos)?);
        // A rotate comes between groups: a place to resume from.
        if self.gtid.is_none() && !self.group.open {
            let position = BinlogPosition::File {
                name: self.file.clone(),
                pos: self.last_end,
            };
            if position != self.committed {
                self.committed = position;
                self.progress_pending = true;
            }
        }
        Ok(())
    }

    fn begin_group(&mut self, gtid: Option<Gtid>, open: bool) {
        if !self.group.is_empty() {
            // Rows from a group whose end never came (a server that crashed
            // mid-write): they were never committed.
            tracing::warn!(
                database = %self.database,
                rows = self.group.row_at.len(),
                deleted = self.group.deleted_at.len(),
                "binlog group without an end; its rooms changes are dropped"
            );
        }
        self.group = Group {
            open,
            gtid,
            ..Group::default()
        };
    }

    fn query(
        &mut self,
        sql: &str,
        schema: &str,
        log_pos: u64,
    ) -> Result<Option<TailEvent>, TailError> {
        let sql = sql.trim();
        let keyword = |k: &str| {
            sql.get(..k.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(k))
                && sql[k.len()..]
                    .chars()
                    .next()
                    .is_none_or(|c| !c.is_alphanumeric())
        };
        if keyword("BEGIN") || keyword("XA START") || keyword("XA BEGIN") {
            // MariaDB's GTID event already opened the group; MySQL's did not.
            self.group.open = true;
            return Ok(None);
        }
        if keyword("COMMIT") {
            return Ok(self.end_group(End::Commit, log_pos));
        }
        // ROLLBACK TO SAVEPOINT stays inside the transaction.
        if keyword("ROLLBACK") && !keyword("ROLLBACK TO") {
            return Ok(self.end_group(End::Discard, log_pos));
        }
        // A statement-logged change to rooms (DDL such as TRUNCATE, or DML
        // from a session logging statements) carries no rows: the only
        // faithful report is "rescan".
        if changes_rooms(sql, schema, &self.database) {
            return Err(TailError::Broken(format!(
                "a statement changed {}.{TABLE} without row events ({}): rescan",
                self.database,
                sql.chars().take(120).collect::<String>()
            )));
        }
        if self.group.open {
            Ok(None)
        } else {
            // A statement outside BEGIN ... COMMIT is a group of its own.
            Ok(self.end_group(End::Commit, log_pos))
        }
    }

    fn end_group(&mut self, end: End, log_pos: u64) -> Option<TailEvent> {
        let group = std::mem::take(&mut self.group);
        self.committed = match &mut self.gtid {
            Some(state) => {
                // Even a discarded group is in the binlog: resume after it.
                if let Some(gtid) = group.gtid {
                    state.apply(gtid);
                }
                BinlogPosition::Gtid(state.render())
            }
            None => BinlogPosition::File {
                name: self.file.clone(),
                pos: if log_pos != 0 { log_pos } else { self.last_end },
            },
        };
        if end == End::Discard && !group.is_empty() {
            // XA PREPARE: its COMMIT comes later as a statement without
            // rows; the periodic full scan picks the rows up.
            tracing::warn!(
                database = %self.database,
                "rooms changes in a rolled-back or XA-prepared group are not reported"
            );
        }
        if end == End::Commit && !group.is_empty() {
            self.progress_pending = false;
            let (rows, deleted) = group.into_changes();
            return Some(TailEvent::Committed {
                rows,
                deleted,
                position: self.committed.clone(),
                committed_at: self.event_time,
            });
        }
        self.progress_pending = true;
        None
    }

    fn collect(
        &mut self,
        rows: &RowsEventData<'_>,
        tme: &TableMapEvent<'_>,
    ) -> Result<(), TailError> {
        let db = &self.database;
        for row in rows.rows(tme) {
            let (before, after) =
                row.map_err(|e| TailError::Broken(format!("decoding a row of {db}.{TABLE}: {e}")))?;
            let before_id = before.as_ref().map(row_id).transpose()?;
            let after = after.as_ref().map(room_row).transpose()?;
            if let Some(id) = before_id
                && after.is_none_or(|a| a.id != id)
            {
                self.group.delete(id);
            }
            if let Some(row) = after {
                self.group.write(row);
            }
        }
        Ok(())
    }
}

/// Whether a logged statement changes `database`.`rooms`: it starts with a
/// changing verb and names `rooms` in that database (named, or the
/// session's default), or drops the whole database.
fn changes_rooms(sql: &str, schema: &str, database: &str) -> bool {
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

fn decode(event: &Event) -> Result<Option<EventData<'_>>, TailError> {
    event.read_data().map_err(|e| {
        TailError::Broken(format!(
            "decoding a binlog event of type {}: {e}",
            event.header().event_type_raw()
        ))
    })
}

/// MariaDB's GTID event: 8-byte LE sequence number, 4-byte LE domain id,
/// one byte of flags; the server id is the event header's.
fn maria_gtid(event: &Event) -> Result<(Gtid, u8), TailError> {
    let data = event.data();
    let bad = || TailError::Broken(format!("a MariaDB GTID event of {} bytes", data.len()));
    let seq = u64::from_le_bytes(to_array(data.get(..8).ok_or_else(bad)?)?);
    let domain = u32::from_le_bytes(to_array(data.get(8..12).ok_or_else(bad)?)?);
    let flags = *data.get(12).ok_or_else(bad)?;
    let gtid = Gtid {
        domain,
        server: event.header().server_id(),
        seq,
    };
    Ok((gtid, flags))
}

fn to_array<const N: usize>(bytes: &[u8]) -> Result<[u8; N], TailError> {
    bytes
        .try_into()
        .map_err(|_| TailError::Broken(format!("expected {N} bytes, got {}", bytes.len())))
}

/// The 19-byte v4 event header as it was on the wire (mysql_async hands it
/// over parsed).
fn header_bytes(event: &Event) -> Vec<u8> {
    let h = event.header();
    let mut out = Vec::with_capacity(19);
    out.extend_from_slice(&h.timestamp().to_le_bytes());
    out.push(h.event_type_raw());
    out.extend_from_slice(&h.server_id().to_le_bytes());
    out.extend_from_slice(&h.event_size().to_le_bytes());
    out.extend_from_slice(&h.log_pos().to_le_bytes());
    out.extend_from_slice(&h.flags_raw().to_le_bytes());
    out
}

/// CRC-32 (IEEE, as the binlog uses) of the concatenated parts. Bitwise:
/// it runs over one small event per connection.
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut crc = !0u32;
    for &byte in parts.iter().flat_map(|p| p.iter()) {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
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

fn row_id(row: &BinlogRow) -> Result<i64, TailError> {
    not_null(row, 0)
}

fn room_row(row: &BinlogRow) -> Result<RoomRow, TailError> {
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
