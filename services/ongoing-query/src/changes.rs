//! The change log behind `Watch`: every change the cache takes in (from the
//! write path, the change feed or a scan repair) gets a sequence number and
//! goes into a bounded ring that all watchers read, so many watchers share
//! one feed and a reconnecting watcher replays what it missed.
//!
//! Positions are `EPOCH.SEQ`: the epoch is drawn when the process starts, so
//! a position from before a restart (or from another replica) is recognised
//! as foreign and answered with a snapshot instead of a wrong replay.

use livemesh_mesh::lock;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use livemesh_mesh::rpc_telemetry::Traceparent;
use tokio::sync::watch;

use crate::room::RoomRecord;

/// Changes kept for replay by default.
pub const DEFAULT_WINDOW: usize = 10_000;

/// What happened to a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Started,
    Ended,
    Updated,
}

/// One entry of the change log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    pub seq: u64,
    pub kind: ChangeKind,
    pub room: RoomRecord,
    /// The trace of the call that made the change (this service's own
    /// writes), so a watcher's work on it continues that trace.
    pub origin: Option<Traceparent>,
}

/// A position in the change log, as handed to clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub seq: u64,
}

impl Position {
    pub fn token(&self) -> String {
        format!("{:x}.{}", self.epoch, self.seq)
    }

    pub fn parse(token: &str) -> Option<Self> {
        let (epoch, seq) = token.split_once('.')?;
        Some(Self {
            epoch: u64::from_str_radix(epoch, 16).ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// The watcher asked for changes older than the window holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lagged;

#[derive(Debug)]
struct Ring {
    changes: VecDeque<Change>,
    /// The sequence number of the newest change (0: none yet).
    head: u64,
}

/// The bounded, shared change log.
#[derive(Debug)]
pub struct ChangeLog {
    epoch: u64,
    window: usize,
    ring: Mutex<Ring>,
    head_tx: watch::Sender<u64>,
    /// Per room, the trace of an end being written here: the change feed
    /// may read the ended row before the writer applies it, and the end
    /// must carry the writer's trace whichever comes first.
    ending: Mutex<HashMap<u64, Traceparent>>,
}

impl ChangeLog {
    pub fn new(window: usize) -> Self {
        Self {
            epoch: random_epoch(),
            window: window.max(1),
            ring: Mutex::new(Ring {
                changes: VecDeque::new(),
                head: 0,
            }),
            head_tx: watch::channel(0).0,
            ending: Mutex::new(HashMap::new()),
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The position of the newest change.
    pub fn head(&self) -> Position {
        Position {
            epoch: self.epoch,
            seq: self.lock().head,
        }
    }

    /// A call of trace `origin` is ending `room_id`: the room's next
    /// `Ended` change carries it, whoever appends it (until [`Self::ended`]).
    pub fn ending(&self, room_id: u64, origin: Option<Traceparent>) {
        if let Some(origin) = origin {
            lock(&self.ending).insert(room_id, origin);
        }
    }

    /// The end of `room_id` was written (or failed): forget its trace.
    pub fn ended(&self, room_id: u64) {
        lock(&self.ending).remove(&room_id);
    }

    /// Appends a change and wakes the watchers. Callers hold the room's
    /// cache stripe, so a room's changes enter the log in version order.
    pub fn append(&self, kind: ChangeKind, room: RoomRecord) -> u64 {
        let origin = match kind {
            ChangeKind::Ended => lock(&self.ending).remove(&room.room_id),
            _ => None,
        }
        .or_else(Traceparent::current);
        let seq = {
            let mut ring = self.lock();
            ring.head += 1;
            let seq = ring.head;
            ring.changes.push_back(Change {
                seq,
                kind,
                room,
                origin,
            });
            while ring.changes.len() > self.window {
                ring.changes.pop_front();
            }
            seq
        };
        self.head_tx.send_replace(seq);
        seq
    }

    /// Up to `max` changes after `after`, oldest first; `Lagged` when some of
    /// them have already left the window.
    pub fn since(&self, after: u64, max: usize) -> Result<Vec<Change>, Lagged> {
        let ring = self.lock();
        if after > ring.head {
            return Err(Lagged);
        }
        let oldest = ring.changes.front().map_or(ring.head + 1, |c| c.seq);
        if after + 1 < oldest {
            return Err(Lagged);
        }
        let skip = usize::try_from(after + 1 - oldest).unwrap_or(usize::MAX);
        Ok(ring.changes.iter().skip(skip).take(max).copied().collect())
    }

    /// A receiver that is notified whenever the head moves.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.head_tx.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        lock(&self.ring)
    }
}

/// A process-unique epoch: wall-clock nanoseconds mixed with the pid, never 0.
fn random_epoch() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default();
    (nanos ^ (u64::from(std::process::id()) << 40)) | 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::Status;

    fn room(id: u64) -> RoomRecord {
        RoomRecord {
            room_id: id,
            anchor_id: 1,
            status: Status::Ongoing,
            started_at_ms: 0,
            ended_at_ms: None,
            version: 1,
        }
    }

    #[test]
    fn an_end_read_by_the_feed_before_its_writer_carries_the_writers_trace() {
        let log = ChangeLog::new(10);
        let writer = Traceparent::new(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c, 0xb7ad, 1);
        log.ending(7, Some(writer));
        // Another room's end, and an update of this one, are not the write.
        log.append(ChangeKind::Ended, room(8));
        log.append(ChangeKind::Updated, room(7));
        // The feed's copy of the end, appended outside any trace.
        log.append(ChangeKind::Ended, room(7));
        let origins: Vec<Option<Traceparent>> =
            log.since(0, 10).unwrap().iter().map(|c| c.origin).collect();
        assert_eq!(origins, vec![None, None, Some(writer)]);
        // Taken once; and forgotten when the write is done.
        log.ending(9, Some(writer));
        log.ended(9);
        log.append(ChangeKind::Ended, room(9));
        log.append(ChangeKind::Ended, room(7));
        assert!(log.since(3, 10).unwrap().iter().all(|c| c.origin.is_none()));
    }

    #[test]
    fn replays_exactly_what_followed_a_position() {
        let log = ChangeLog::new(10);
        for id in 1..=5 {
            log.append(ChangeKind::Started, room(id));
        }
        let after_two: Vec<u64> = log.since(2, 100).unwrap().iter().map(|c| c.seq).collect();
        assert_eq!(after_two, vec![3, 4, 5]);
        assert!(log.since(5, 100).unwrap().is_empty());
        assert_eq!(log.since(0, 2).unwrap().len(), 2);
    }

    #[test]
    fn positions_older_than_the_window_lag_and_future_ones_are_refused() {
        let log = ChangeLog::new(3);
        for id in 1..=6 {
            log.append(ChangeKind::Started, room(id));
        }
        assert_eq!(log.since(2, 100), Err(Lagged), "3 left the window");
        assert_eq!(log.since(3, 100).unwrap().len(), 3);
        assert_eq!(log.since(7, 100), Err(Lagged));
    }

    #[test]
    fn tokens_round_trip_and_garbage_is_rejected() {
        let p = Position {
            epoch: 0xabc,
            seq: 42,
        };
        assert_eq!(Position::parse(&p.token()), Some(p));
        assert_eq!(Position::parse("nope"), None);
        assert_eq!(Position::parse("zz.1"), None);
    }
}
