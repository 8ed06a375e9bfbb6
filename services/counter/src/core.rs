//! The counter's heart: validate a batch, remember it for retries, and add
//! what counts to the room's pending increments; a flusher writes each
//! room's increments of a tick to the hot store as one idempotent flush,
//! keeps failed flushes (same ids) until the store is back, and refuses new
//! loves only when too many wait.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::hot::{HotError, HotStore, RoomFlush};
use crate::validate::{Bucket, Limits, Reason, Verdict, validate};

const STRIPES: usize = 64;
/// Batch ids remembered per viewer, and for how long.
const RECENT_BATCHES: usize = 64;
const RECENT_FOR_MS: i64 = 10 * 60 * 1000;

/// The answer to one batch, kept so that a retry gets the same answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    pub accepted: u64,
    pub rejected: u64,
    pub reason: Option<Reason>,
    pub detail: String,
}

#[derive(Debug)]
struct ViewerState {
    bucket: Bucket,
    /// (room, batch id, outcome, when), newest last.
    recent: VecDeque<(u64, String, BatchOutcome, i64)>,
    seen_ms: i64,
}

#[derive(Debug, Default)]
struct Pending {
    total: u64,
    viewers: HashMap<u64, u64>,
}

/// Figures about the counter.
#[derive(Debug, Default)]
pub struct CounterStats {
    pub accepted: AtomicU64,
    pub rejected: AtomicU64,
    pub duplicate_batches: AtomicU64,
    pub flushes: AtomicU64,
    pub flush_failures: AtomicU64,
    pub refused_unavailable: AtomicU64,
}

/// Why a batch was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(
        "the hot store is unreachable and {waiting} loves already wait to be written (limit {limit}); retry later"
    )]
    Backlogged { waiting: u64, limit: u64 },
}

/// Pending increments, failed flushes, viewers' buckets and recent batches.
#[derive(Debug)]
pub struct CounterCore {
    limits: Limits,
    store: HotStore,
    viewers: Vec<Mutex<HashMap<u64, ViewerState>>>,
    pending: Vec<Mutex<HashMap<u64, Pending>>>,
    /// Flushes the store has not confirmed, oldest first; retried as they are.
    unflushed: Mutex<Vec<RoomFlush>>,
    /// Loves in `pending` plus in `unflushed`.
    waiting: AtomicU64,
    max_waiting: u64,
    node_id: String,
    flush_seq: AtomicU64,
    totals: Mutex<HashMap<u64, (u64, Instant)>>,
    total_ttl: Duration,
    stats: CounterStats,
}

fn stripe_of(key: u64) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % STRIPES as u64) as usize
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves its map consistent; a poisoned lock
    // still holds valid data.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl CounterCore {
    pub fn new(limits: Limits, store: HotStore, max_waiting: u64, total_ttl: Duration) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Self {
            limits,
            store,
            viewers: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            pending: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            unflushed: Mutex::new(Vec::new()),
            waiting: AtomicU64::new(0),
            max_waiting,
            // Flush ids must never repeat across restarts: time plus pid.
            node_id: format!("{nanos:x}-{}", std::process::id()),
            flush_seq: AtomicU64::new(0),
            totals: Mutex::new(HashMap::new()),
            total_ttl,
            stats: CounterStats::default(),
        }
    }

    pub fn stats(&self) -> &CounterStats {
        &self.stats
    }

    pub fn store(&self) -> &HotStore {
        &self.store
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Loves accepted here that the hot store has not confirmed yet.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Acquire)
    }

    /// Validates and takes a batch; a batch id seen before from this viewer
    /// returns the first answer and counts nothing again.
    pub fn send(
        &self,
        room_id: u64,
        viewer_id: u64,
        batch_id: &str,
        taps: &[u64],
        video_now_ms: u64,
        now_ms: i64,
    ) -> Result<(BatchOutcome, Option<Vec<u64>>), SendError> {
        let waiting = self.waiting();
        if waiting >= self.max_waiting {
            self.stats
                .refused_unavailable
                .fetch_add(1, Ordering::Relaxed);
            return Err(SendError::Backlogged {
                waiting,
                limit: self.max_waiting,
            });
        }
        let mut viewers = lock(&self.viewers[stripe_of(viewer_id)]);
        let state = viewers.entry(viewer_id).or_insert_with(|| ViewerState {
            bucket: Bucket::full(&self.limits, now_ms),
            recent: VecDeque::new(),
            seen_ms: now_ms,
        });
        state.seen_ms = now_ms;
        if let Some((_, _, outcome, _)) = state
            .recent
            .iter()
            .find(|(room, id, _, _)| *room == room_id && id == batch_id)
        {
            self.stats.duplicate_batches.fetch_add(1, Ordering::Relaxed);
            return Ok((outcome.clone(), None));
        }
        let verdict: Verdict =
            validate(taps, video_now_ms, now_ms, &self.limits, &mut state.bucket);
        let outcome = BatchOutcome {
            accepted: verdict.accepted.len() as u64,
            rejected: verdict.rejected_total(),
            reason: verdict.main_reason(),
            detail: verdict.detail(&self.limits),
        };
        while state.recent.len() >= RECENT_BATCHES
            || state
                .recent
                .front()
                .is_some_and(|(_, _, _, at)| now_ms - at > RECENT_FOR_MS)
        {
            state.recent.pop_front();
        }
        state
            .recent
            .push_back((room_id, batch_id.to_owned(), outcome.clone(), now_ms));
        if outcome.accepted > 0 {
            // Still under the viewer's stripe: a concurrent retry of the
            // same batch waits here and then finds it in `recent`.
            let mut pending = lock(&self.pending[stripe_of(room_id)]);
            let room = pending.entry(room_id).or_default();
            room.total += outcome.accepted;
            *room.viewers.entry(viewer_id).or_default() += outcome.accepted;
            self.waiting.fetch_add(outcome.accepted, Ordering::AcqRel);
        }
        self.stats
            .accepted
            .fetch_add(outcome.accepted, Ordering::Relaxed);
        self.stats
            .rejected
            .fetch_add(outcome.rejected, Ordering::Relaxed);
        Ok((outcome, Some(verdict.accepted)))
    }

    /// Loves of `room_id` accepted here and not yet confirmed by the store.
    pub fn local_waiting(&self, room_id: u64) -> u64 {
        let pending = lock(&self.pending[stripe_of(room_id)])
            .get(&room_id)
            .map_or(0, |p| p.total);
        let unflushed: u64 = lock(&self.unflushed)
            .iter()
            .filter(|f| f.room_id == room_id)
            .map(|f| f.total_delta)
            .sum();
        pending + unflushed
    }

    /// Writes every room's pending increments as one flush per room, after
    /// the flushes still waiting from earlier ticks. Returns the rooms whose
    /// writes the store confirmed.
    pub async fn flush(&self) -> Vec<u64> {
        let mut drained = Vec::new();
        for stripe in &self.pending {
            let taken = std::mem::take(&mut *lock(stripe));
            for (room_id, p) in taken {
                let seq = self.flush_seq.fetch_add(1, Ordering::Relaxed);
                drained.push(RoomFlush {
                    room_id,
                    flush_id: format!("{}:{seq}", self.node_id),
                    total_delta: p.total,
                    viewers: p.viewers.into_iter().collect(),
                });
            }
        }
        let batch: Vec<RoomFlush> = {
            let mut unflushed = lock(&self.unflushed);
            unflushed.extend(drained);
            unflushed.clone()
        };
        if batch.is_empty() {
            return Vec::new();
        }
        let results = self.store.flush(&batch).await;
        let mut done_rooms = Vec::new();
        let mut done_ids = Vec::new();
        let mut failures = 0;
        for (flush, (_, result)) in batch.iter().zip(&results) {
            match result {
                Ok(()) => {
                    done_ids.push(flush.flush_id.clone());
                    done_rooms.push(flush.room_id);
                }
                Err(HotError::Unavailable(_)) => failures += 1,
            }
        }
        if failures > 0 {
            self.stats
                .flush_failures
                .fetch_add(failures, Ordering::Relaxed);
            tracing::warn!(
                failures,
                waiting = self.waiting(),
                "hot store writes failed; kept for retry"
            );
        }
        let mut confirmed = 0;
        let mut added: HashMap<u64, u64> = HashMap::new();
        {
            let mut unflushed = lock(&self.unflushed);
            unflushed.retain(|f| {
                let done = done_ids.contains(&f.flush_id);
                if done {
                    confirmed += f.total_delta;
                    *added.entry(f.room_id).or_default() += f.total_delta;
                }
                !done
            });
        }
        self.waiting.fetch_sub(confirmed, Ordering::AcqRel);
        self.stats
            .flushes
            .fetch_add(done_ids.len() as u64, Ordering::Relaxed);
        done_rooms.sort_unstable();
        done_rooms.dedup();
        // The store now holds what we wrote: move it from "waiting" into the
        // cached total instead of dropping the cache (which would send every
        // request of the next moment to the store).
        let mut totals = lock(&self.totals);
        for (room, delta) in added {
            if let Some((total, _)) = totals.get_mut(&room) {
                *total += delta;
            }
        }
        done_rooms
    }

    /// The room's total: the hot store's (reused for a moment) plus what this
    /// node accepted and has not written yet. While the store is down, the
    /// last known total stands in.
    pub async fn total(&self, room_id: u64) -> Result<u64, HotError> {
        let cached = {
            let mut totals = lock(&self.totals);
            let cached = totals.get(&room_id).copied();
            if let Some((total, at)) = cached
                && at.elapsed() >= self.total_ttl
            {
                // One caller refreshes; the others keep using the old total
                // meanwhile instead of all asking the store at once.
                totals.insert(room_id, (total, Instant::now()));
                cached.map(|(t, _)| (t, at))
            } else {
                cached
            }
        };
        let stored = match cached {
            Some((total, at)) if at.elapsed() < self.total_ttl => total,
            _ => match self.store.total(room_id).await {
                Ok(total) => {
                    lock(&self.totals).insert(room_id, (total, Instant::now()));
                    total
                }
                Err(err) => match cached {
                    Some((total, _)) => total,
                    None => return Err(err),
                },
            },
        };
        Ok(stored + self.local_waiting(room_id))
    }

    /// Forgets viewers idle for longer than batches are remembered.
    pub fn prune_viewers(&self, now_ms: i64) {
        for stripe in &self.viewers {
            lock(stripe).retain(|_, v| now_ms - v.seen_ms < RECENT_FOR_MS);
        }
    }

    /// Forgets a room's cached total (after its keys were deleted).
    pub fn forget_room(&self, room_id: u64) {
        lock(&self.totals).remove(&room_id);
    }
}
