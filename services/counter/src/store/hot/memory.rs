//! The in-process hot store: Redis's semantics without Redis.
//!
//! Rooms are spread over [`STRIPES`] mutex-guarded maps by a hash of the room
//! id, so callers working on different rooms rarely meet on a lock, and no
//! lock is held across an `.await` (there is none). A flush is applied inside
//! one critical section of its room's stripe, which makes it atomic; its id is
//! remembered (with the configured expiry) in the room, which makes a replay a
//! no-op, exactly as the Redis script's `SET … NX EX` marker does.

use std::cmp::Ordering;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use super::{Applied, HotConfig, HotError, RoomFlush, clamped, warn_if_clamped};

/// How many independently locked parts the rooms are spread over.
const STRIPES: usize = 64;

/// How often a stripe drops expired flush ids of rooms nobody flushes any
/// more (rooms that are flushed expire their own ids on every flush).
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// The in-process store; clones share it.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    config: HotConfig,
    stripes: Box<[Mutex<Stripe>]>,
}

struct Stripe {
    rooms: HashMap<u64, Room>,
    next_sweep: Instant,
}

#[derive(Default)]
struct Room {
    /// The total's shards; empty until the first increment (like the Redis
    /// keys, which do not exist before their first `INCRBY`).
    totals: Vec<u64>,
    lovers: Lovers,
    flush_ids: FlushIds,
    /// Counted SendLoves batches, as `<viewer>:<batch id>`.
    batch_ids: FlushIds,
    /// Closed for the final total until then (`Some(None)`: for ever).
    closed: Option<Option<Instant>>,
    /// The finaliser's lease: its owner and expiry.
    lease: Option<(String, Option<Instant>)>,
}

impl Room {
    fn is_empty(&self) -> bool {
        self.totals.is_empty()
            && self.lovers.scores.is_empty()
            && self.flush_ids.live.is_empty()
            && self.batch_ids.live.is_empty()
            && self.closed.is_none()
            && self.lease.is_none()
    }

    fn expire(&mut self, now: Instant) {
        self.flush_ids.expire(now);
        self.batch_ids.expire(now);
        if matches!(self.closed, Some(Some(until)) if until <= now) {
            self.closed = None;
        }
        if matches!(&self.lease, Some((_, Some(until))) if *until <= now) {
            self.lease = None;
        }
    }
}

fn batch_key(viewer_id: u64, batch_id: &str) -> String {
    format!("{viewer_id}:{batch_id}")
}

/// A sorted set as Redis keeps it: a map for lookups and an ordered set for
/// ranks, both always holding the same members.
#[derive(Default)]
struct Lovers {
    scores: HashMap<u64, u64>,
    ranked: BTreeSet<(u64, Member)>,
}

impl Lovers {
    /// `ZINCRBY`.
    fn add(&mut self, viewer: u64, loves: u64) {
        let score = self.scores.entry(viewer).or_insert(0);
        if *score > 0 {
            self.ranked.remove(&(*score, Member(viewer)));
        }
        *score = score.saturating_add(loves);
        self.ranked.insert((*score, Member(viewer)));
    }

    /// `ZREMRANGEBYRANK 0 -(keep+1)`: drops the lowest ranks beyond `keep`.
    fn trim(&mut self, keep: usize) {
        while self.ranked.len() > keep {
            match self.ranked.pop_first() {
                Some((_, Member(viewer))) => {
                    self.scores.remove(&viewer);
                }
                None => break,
            }
        }
    }

    /// `ZREVRANGE 0 limit-1 WITHSCORES`.
    fn top(&self, limit: usize) -> Vec<(u64, u64)> {
        self.ranked
            .iter()
            .rev()
            .take(limit)
            .map(|(score, Member(viewer))| (*viewer, *score))
            .collect()
    }
}

/// A viewer id ordered as Redis orders sorted-set members of equal score: by
/// the bytes of its decimal string ("10" < "9"), so ties rank the same in
/// every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Member(u64);

impl Member {
    fn decimal(self, buf: &mut [u8; 20]) -> &[u8] {
        let mut n = self.0;
        let mut start = buf.len();
        loop {
            start -= 1;
            // `n % 10` is a single digit.
            buf[start] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        &buf[start..]
    }
}

impl Ord for Member {
    fn cmp(&self, other: &Self) -> Ordering {
        if self.0 == other.0 {
            return Ordering::Equal;
        }
        let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
        self.decimal(&mut a).cmp(other.decimal(&mut b))
    }
}

impl PartialOrd for Member {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The room's applied flush ids until they expire. Every id lives for the
/// same TTL, so insertion order is expiry order and expiring is popping the
/// front of a queue: amortised O(1) per flush, no full scans.
#[derive(Default)]
struct FlushIds {
    live: HashSet<Arc<str>>,
    /// `None`: the TTL reaches past what `Instant` can represent (never expires).
    by_expiry: VecDeque<(Option<Instant>, Arc<str>)>,
}

impl FlushIds {
    fn expire(&mut self, now: Instant) {
        while let Some((Some(deadline), _)) = self.by_expiry.front() {
            if *deadline > now {
                break;
            }
            if let Some((_, id)) = self.by_expiry.pop_front() {
                self.live.remove(&id);
            }
        }
    }

    /// Records `id`; false if it is already recorded (a replay).
    fn insert(&mut self, id: &str, now: Instant, ttl: Duration) -> bool {
        if self.live.contains(id) {
            return false;
        }
        let id: Arc<str> = Arc::from(id);
        self.live.insert(Arc::clone(&id));
        self.by_expiry.push_back((now.checked_add(ttl), id));
        true
    }
}

/// Locks a stripe. A panic while holding it cannot leave a room half-updated
/// by our code (nothing in the critical sections panics), so a poisoned lock
/// is used as is rather than taking the store down.
fn lock(stripe: &Mutex<Stripe>) -> MutexGuard<'_, Stripe> {
    stripe.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MemoryStore {
    pub fn new(config: HotConfig) -> Self {
        let now = Instant::now();
        let stripes = (0..STRIPES)
            .map(|_| {
                Mutex::new(Stripe {
                    rooms: HashMap::new(),
                    next_sweep: now.checked_add(SWEEP_EVERY).unwrap_or(now),
                })
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                config: config.normalized(),
                stripes,
            }),
        }
    }

    /// The stripe of a room: a multiplicative hash of the id, whose high bits
    /// mix all of the id's bits (room ids carry their region in high bits and
    /// a sequence in low ones).
    fn stripe(&self, room_id: u64) -> MutexGuard<'_, Stripe> {
        let mixed = (room_id ^ (room_id >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        // The shift leaves 6 bits: below STRIPES (64).
        let index = (mixed >> 58) as usize % self.inner.stripes.len();
        let mut stripe = lock(&self.inner.stripes[index]);
        stripe.sweep_if_due(Instant::now());
        stripe
    }

    pub(super) fn flush(&self, flushes: &[RoomFlush]) -> Vec<(u64, Result<Applied, HotError>)> {
        flushes
            .iter()
            .map(|flush| (flush.room_id, Ok(self.apply(flush))))
            .collect()
    }

    fn apply(&self, flush: &RoomFlush) -> Applied {
        warn_if_clamped(flush);
        let config = &self.inner.config;
        let now = Instant::now();
        let mut stripe = self.stripe(flush.room_id);
        let room = stripe.rooms.entry(flush.room_id).or_default();
        room.expire(now);
        if room.flush_ids.live.contains(flush.flush_id.as_str()) {
            tracing::debug!(room = flush.room_id, flush_id = %flush.flush_id, "replayed flush ignored");
            return Applied::Replayed;
        }
        if room.closed.is_some() {
            let counted = flush
                .batches
                .iter()
                .enumerate()
                .filter(|(_, b)| {
                    room.batch_ids
                        .live
                        .contains(batch_key(b.viewer_id, &b.batch_id).as_str())
                })
                .map(|(i, _)| i)
                .collect();
            return Applied::Closed { counted };
        }
        room.flush_ids
            .insert(&flush.flush_id, now, config.flush_id_ttl());
        let duplicates: Vec<usize> = flush
            .batches
            .iter()
            .enumerate()
            .filter(|(_, b)| {
                !room.batch_ids.insert(
                    &batch_key(b.viewer_id, &b.batch_id),
                    now,
                    config.batch_ttl(),
                )
            })
            .map(|(i, _)| i)
            .collect();
        let (total_delta, viewers) = flush.viewers_without(&duplicates);
        if total_delta > 0 {
            let shards = config.total_shards as usize;
            if room.totals.len() < shards {
                room.totals.resize(shards, 0);
            }
            let shard = config.shard_of(&flush.flush_id) as usize;
            if let Some(total) = room.totals.get_mut(shard) {
                *total = total.saturating_add(clamped(total_delta));
            }
        }
        let mut ranked = false;
        for &(viewer, loves) in &viewers {
            // A viewer with no loves is not a lover (the script skips it too).
            if loves > 0 {
                room.lovers.add(viewer, clamped(loves));
                ranked = true;
            }
        }
        if ranked {
            room.lovers.trim(config.top_length as usize);
        }
        Applied::Counted { duplicates }
    }

    pub(super) fn close(&self, room_id: u64, owner: &str, lease: Duration) -> bool {
        let config = &self.inner.config;
        let now = Instant::now();
        let mut stripe = self.stripe(room_id);
        let room = stripe.rooms.entry(room_id).or_default();
        room.expire(now);
        if room.closed.is_none() {
            room.closed = Some(now.checked_add(config.closed_ttl()));
        }
        match &room.lease {
            Some((holder, _)) if holder != owner => false,
            _ => {
                room.lease = Some((owner.to_owned(), now.checked_add(lease)));
                true
            }
        }
    }

    pub(super) fn total(&self, room_id: u64) -> u64 {
        let stripe = self.stripe(room_id);
        stripe.rooms.get(&room_id).map_or(0, |room| {
            room.totals
                .iter()
                .fold(0u64, |sum, shard| sum.saturating_add(*shard))
        })
    }

    pub(super) fn top(&self, room_id: u64, limit: u32) -> Vec<(u64, u64)> {
        let stripe = self.stripe(room_id);
        stripe
            .rooms
            .get(&room_id)
            .map_or_else(Vec::new, |room| room.lovers.top(limit as usize))
    }

    #[cfg(any(test, feature = "testing"))]
    pub(super) fn stored_rooms(&self) -> usize {
        self.inner
            .stripes
            .iter()
            .map(|stripe| lock(stripe).rooms.len())
            .sum()
    }

    pub(super) fn delete_room(&self, room_id: u64) {
        let mut stripe = self.stripe(room_id);
        if let Some(room) = stripe.rooms.get_mut(&room_id) {
            room.totals = Vec::new();
            room.lovers = Lovers::default();
            // The flush and batch ids, the closed mark and the lease stay
            // until they expire, as the Redis keys do.
            room.expire(Instant::now());
            if room.is_empty() {
                stripe.rooms.remove(&room_id);
            }
        }
    }
}

impl Stripe {
    /// Expires the flush ids of every room of the stripe and forgets rooms
    /// left with nothing, at most once per [`SWEEP_EVERY`]; the cost is
    /// proportional to the rooms and the expired ids, not to the live ids.
    fn sweep_if_due(&mut self, now: Instant) {
        if now < self.next_sweep {
            return;
        }
        self.next_sweep = now.checked_add(SWEEP_EVERY).unwrap_or(now);
        self.rooms.retain(|_, room| {
            room.expire(now);
            !room.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn members_order_like_redis_strings() {
        assert!(Member(10) < Member(9));
        assert!(Member(1) < Member(10));
        assert!(Member(0) < Member(1));
        assert_eq!(Member(u64::MAX).cmp(&Member(u64::MAX)), Ordering::Equal);
        assert!(Member(u64::MAX) < Member(2));
    }

    #[test]
    fn flush_ids_expire_in_order() {
        let mut ids = FlushIds::default();
        let start = Instant::now();
        assert!(ids.insert("a", start, Duration::from_secs(1)));
        assert!(!ids.insert("a", start, Duration::from_secs(1)));
        ids.expire(start + Duration::from_millis(999));
        assert!(ids.live.contains("a"));
        ids.expire(start + Duration::from_secs(1));
        assert!(ids.live.is_empty() && ids.by_expiry.is_empty());
        assert!(ids.insert("a", start + Duration::from_secs(1), Duration::from_secs(1)));
    }

    #[test]
    fn an_expired_flush_id_applies_again() {
        let store = MemoryStore::new(HotConfig {
            phase: "t".into(),
            flush_id_ttl_secs: 1,
            ..HotConfig::default()
        });
        let flush = RoomFlush {
            room_id: 5,
            flush_id: "n:1".to_owned(),
            total_delta: 2,
            viewers: vec![],
            batches: vec![],
        };
        store.apply(&flush);
        store.apply(&flush);
        assert_eq!(store.total(5), 2);
        std::thread::sleep(Duration::from_millis(1100));
        store.apply(&flush);
        assert_eq!(store.total(5), 4);
    }

    #[test]
    fn ranking_keeps_the_top_and_breaks_ties_like_redis() {
        let mut lovers = Lovers::default();
        for (viewer, loves) in [(1, 5), (2, 1), (9, 3), (10, 3), (3, 4)] {
            lovers.add(viewer, loves);
        }
        lovers.add(2, 1);
        lovers.trim(4);
        assert_eq!(lovers.top(10), vec![(1, 5), (3, 4), (9, 3), (10, 3)]);
        assert_eq!(lovers.scores.len(), 4);
        assert!(!lovers.scores.contains_key(&2));
        lovers.trim(0);
        assert!(lovers.top(10).is_empty() && lovers.scores.is_empty());
    }
}
