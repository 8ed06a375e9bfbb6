//! The in-memory cache of rooms that shields the rooms databases.
//!
//! Readers never lock: both maps are lock-free skip lists, ordered by room id
//! so pages come out in order. Writers (room admin, the scan, later the
//! binlog tail) serialise per room on a striped mutex, because applying a
//! change is a read-compare-write of the room's version.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_skiplist::SkipMap;

use crate::changes::{ChangeKind, ChangeLog};
use crate::room::{RoomRecord, region_of};

const STRIPES: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Entry {
    room: RoomRecord,
    applied_at: Instant,
}

/// What applying a record did to the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The cache did not know the room.
    Inserted,
    /// The cache held an older version.
    Updated,
    /// The cache already held this version or a newer one.
    Unchanged,
}

/// Ongoing rooms, plus recently ended ones so that a late, older copy of a
/// room (a scan page read just before the end) cannot bring it back.
#[derive(Debug)]
pub struct RoomCache {
    ongoing: SkipMap<u64, Entry>,
    ended: SkipMap<u64, Entry>,
    stripes: Vec<Mutex<()>>,
    log: ChangeLog,
    /// Bumped whenever the set of ongoing rooms changes; lets readers reuse
    /// results derived from that set (partitions) while it stands.
    generation: AtomicU64,
}

impl Default for RoomCache {
    fn default() -> Self {
        Self::new(crate::changes::DEFAULT_WINDOW)
    }
}

impl RoomCache {
    /// An empty cache whose change log keeps `window` changes for replay.
    pub fn new(window: usize) -> Self {
        Self {
            ongoing: SkipMap::new(),
            ended: SkipMap::new(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            log: ChangeLog::new(window),
            generation: AtomicU64::new(0),
        }
    }

    /// The generation of the ongoing set: equal values mean the same set.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The log of the changes applied with [`RoomCache::apply_and_emit`].
    pub fn log(&self) -> &ChangeLog {
        &self.log
    }

    /// The cached copy of a room, ongoing or recently ended.
    pub fn get(&self, room_id: u64) -> Option<RoomRecord> {
        self.ongoing
            .get(&room_id)
            .or_else(|| self.ended.get(&room_id))
            .map(|e| e.value().room)
    }

    /// Applies `room` unless the cache holds the same or a newer version,
    /// without telling watchers: for filling the cache, not for changes.
    pub fn apply(&self, room: RoomRecord) -> Applied {
        self.apply_inner(room, false)
    }

    /// Applies `room` like [`RoomCache::apply`] and, if it changed the cache,
    /// appends the change to the log for watchers.
    pub fn apply_and_emit(&self, room: RoomRecord) -> Applied {
        self.apply_inner(room, true)
    }

    fn apply_inner(&self, room: RoomRecord, emit: bool) -> Applied {
        let _guard = self.lock(room.room_id);
        let current = self.get(room.room_id);
        if current.is_some_and(|c| c.version >= room.version) {
            return Applied::Unchanged;
        }
        let entry = Entry {
            room,
            applied_at: Instant::now(),
        };
        let was_ongoing = current.is_some_and(|c| c.is_ongoing());
        if room.is_ongoing() {
            self.ended.remove(&room.room_id);
            self.ongoing.insert(room.room_id, entry);
        } else {
            self.ongoing.remove(&room.room_id);
            self.ended.insert(room.room_id, entry);
        }
        if was_ongoing != room.is_ongoing() {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        if emit {
            let kind = match (current.map(|c| c.is_ongoing()), room.is_ongoing()) {
                (None, true) => ChangeKind::Started,
                (None | Some(true), false) => ChangeKind::Ended,
                (Some(_), _) => ChangeKind::Updated,
            };
            // Still under the room's stripe: the log sees a room's versions in order.
            self.log.append(kind, room);
        }
        if current.is_some() {
            Applied::Updated
        } else {
            Applied::Inserted
        }
    }

    /// Drops a room the database no longer has, if it was cached before
    /// `seen_before` (a newer entry came from a write the caller did not see).
    pub fn forget(&self, room_id: u64, seen_before: Instant) -> bool {
        let _guard = self.lock(room_id);
        let stale = |map: &SkipMap<u64, Entry>| {
            map.get(&room_id)
                .is_some_and(|e| e.value().applied_at < seen_before)
        };
        let mut forgot = false;
        if stale(&self.ongoing) && self.ongoing.remove(&room_id).is_some() {
            self.generation.fetch_add(1, Ordering::AcqRel);
            forgot = true;
        }
        if stale(&self.ended) {
            forgot |= self.ended.remove(&room_id).is_some();
        }
        forgot
    }

    /// Up to `limit` ongoing rooms with an id above `after`, ascending, and
    /// whether more follow.
    pub fn ongoing_page(&self, after: Option<u64>, limit: usize) -> (Vec<RoomRecord>, bool) {
        let mut rooms: Vec<RoomRecord> = match after {
            Some(after) => self
                .ongoing
                .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .take(limit + 1)
                .map(|e| e.value().room)
                .collect(),
            None => self
                .ongoing
                .iter()
                .take(limit + 1)
                .map(|e| e.value().room)
                .collect(),
        };
        let more = rooms.len() > limit;
        rooms.truncate(limit);
        (rooms, more)
    }

    /// Every ongoing room id, ascending.
    pub fn ongoing_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.ongoing.iter().map(|e| *e.key())
    }

    pub fn ongoing_len(&self) -> usize {
        self.ongoing.len()
    }

    /// Ongoing rooms of `region` that were cached before `before`.
    pub fn ongoing_in_region_cached_before(&self, region: u16, before: Instant) -> Vec<u64> {
        self.ongoing
            .iter()
            .filter(|e| region_of(*e.key()) == Some(region) && e.value().applied_at < before)
            .map(|e| *e.key())
            .collect()
    }

    /// Forgets ended rooms cached more than `retention` before `now`; a read
    /// of one of them goes to its database again.
    pub fn prune_ended(&self, now: Instant, retention: Duration) -> usize {
        let Some(cutoff) = now.checked_sub(retention) else {
            return 0;
        };
        let old: Vec<u64> = self
            .ended
            .iter()
            .filter(|e| e.value().applied_at < cutoff)
            .map(|e| *e.key())
            .collect();
        old.into_iter()
            .filter(|id| self.forget(*id, cutoff))
            .count()
    }

    fn lock(&self, room_id: u64) -> std::sync::MutexGuard<'_, ()> {
        // The stripe count is a small constant, so the cast cannot truncate.
        let stripe = (room_id % STRIPES as u64) as usize;
        // A panic while holding a stripe leaves no broken state behind (the
        // maps are updated atomically), so a poisoned lock is still usable.
        self.stripes[stripe]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::room::Status;

    fn room(id: u64, version: u64, ongoing: bool) -> RoomRecord {
        RoomRecord {
            room_id: id,
            anchor_id: 9,
            status: if ongoing {
                Status::Ongoing
            } else {
                Status::Ended
            },
            started_at_ms: 1,
            ended_at_ms: (!ongoing).then_some(2),
            version,
        }
    }

    #[test]
    fn an_older_copy_never_overwrites_a_newer_one() {
        let cache = RoomCache::default();
        assert_eq!(cache.apply(room(1, 1, true)), Applied::Inserted);
        assert_eq!(cache.apply(room(1, 2, false)), Applied::Updated);
        // A scan page read before the end must not bring the room back.
        assert_eq!(cache.apply(room(1, 1, true)), Applied::Unchanged);
        assert_eq!(cache.get(1).map(|r| r.status), Some(Status::Ended));
        assert_eq!(cache.ongoing_len(), 0);
    }

    #[test]
    fn pages_are_ascending_and_complete() {
        let cache = RoomCache::default();
        for id in (1..=25).rev() {
            cache.apply(room(id, 1, true));
        }
        cache.apply(room(26, 2, false));
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (page, more) = cache.ongoing_page(after, 10);
            seen.extend(page.iter().map(|r| r.room_id));
            after = page.last().map(|r| r.room_id);
            if !more {
                break;
            }
        }
        assert_eq!(seen, (1..=25).collect::<Vec<_>>());
    }

    #[test]
    fn forget_spares_entries_cached_after_the_cutoff() {
        let cache = RoomCache::default();
        cache.apply(room(1, 1, true));
        let cutoff = Instant::now();
        cache.apply(room(2, 1, true));
        assert!(cache.forget(1, cutoff));
        assert!(!cache.forget(2, cutoff));
        assert_eq!(cache.ongoing_ids().collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn changes_are_logged_with_their_kind_and_fills_are_not() {
        let cache = RoomCache::default();
        cache.apply(room(1, 1, true));
        assert_eq!(cache.apply_and_emit(room(2, 1, true)), Applied::Inserted);
        cache.apply_and_emit(room(2, 2, true));
        cache.apply_and_emit(room(2, 3, false));
        cache.apply_and_emit(room(2, 3, false)); // a repeat changes nothing
        cache.apply_and_emit(room(3, 1, false));
        let kinds: Vec<(u64, ChangeKind)> = cache
            .log()
            .since(0, 100)
            .unwrap()
            .iter()
            .map(|c| (c.room.room_id, c.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                (2, ChangeKind::Started),
                (2, ChangeKind::Updated),
                (2, ChangeKind::Ended),
                (3, ChangeKind::Ended),
            ]
        );
    }
}
