//! Binlog decoding: the events of one replica stream read into committed
//! transactions of `rooms` rows ([`TailEvent`]), with the position after
//! each.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use mysql_async::BinlogStream;
use mysql_async::binlog::events::{Event, EventData, RowsEventData, TableMapEvent};

use super::position::{BinlogPosition, Gtid, GtidState};
use super::rooms_row::{RoomRow, TABLE, changes_rooms, room_row, row_id};
use super::{TailError, TailEvent};

/// Least time between two `Progress` events.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

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

/// What the tail knows between events.
pub(super) struct TailState {
    database: String,
    /// `Some` when the tail reports GTID positions: the state after the last
    /// group that ended.
    pub(super) gtid: Option<GtidState>,
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
pub(super) struct Group {
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
    pub(super) fn write(&mut self, row: RoomRow) {
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

    pub(super) fn delete(&mut self, id: i64) {
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

    pub(super) fn is_empty(&self) -> bool {
        self.row_at.is_empty() && self.deleted_at.is_empty()
    }

    /// The rows left written and the ids left deleted.
    pub(super) fn into_changes(self) -> (Vec<RoomRow>, Vec<i64>) {
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
    pub(super) fn new(database: &str, from: &BinlogPosition) -> Result<Self, TailError> {
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
    pub(super) fn handle(
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
    pub(super) fn due_progress(&mut self) -> Option<TailEvent> {
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
pub(super) fn crc32(parts: &[&[u8]]) -> u32 {
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
