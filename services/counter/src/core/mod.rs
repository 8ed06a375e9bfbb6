//! The counter's heart: validate a batch, remember it for retries, and add
//! what counts to the room's pending increments; a flusher writes each
//! room's pending increments, with the ids of the batches they came from,
//! to the hot store as one idempotent flush (the store leaves out batches
//! any replica counted before), keeps failed flushes (same ids) until the
//! store is back, and refuses new loves only when too many wait. A caller
//! may await its batch's fate: counted, a duplicate, or kept for retry.
//!
//! Flushing is a group commit: the flusher starts a round as soon as a batch
//! waits and no round is in flight ([`CounterCore::work_arrived`]); batches
//! that arrive during a round go into the next one, so rounds grow with the
//! load (up to [`MAX_FLUSH_BATCHES`]) and a lone batch waits about one store
//! round trip. The round itself is in [`flush`].

mod flush;

use livemesh_mesh::lock;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::SendError;
use crate::store::hot::{BatchMark, HotError, HotStore, RoomFlush};
use crate::validate::{Bucket, Limits, Reason, Verdict, validate};

const STRIPES: usize = 64;
/// Batch ids remembered per viewer in process, and for how long: a fast
/// path only; the hot store remembers every counted batch id (for
/// `batch_ttl_secs`), whichever replica counted it.
const RECENT_BATCHES: usize = 64;
const RECENT_FOR_MS: i64 = 10 * 60 * 1000;
/// The most SendLoves batches one flush round writes (retried flushes
/// first, then pending batches); the rest wait for the next round. Bounds
/// the size of one round's Lua scripts (one key per batch) and of the
/// retry buffer's rewrite after an outage.
pub const MAX_FLUSH_BATCHES: usize = 1024;

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
    /// (room, batch id, when), newest last.
    recent: VecDeque<(u64, String, i64)>,
    seen_ms: i64,
}

/// What became of a batch's loves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchFate {
    /// In the hot store (or in the room's final total), counted once.
    Counted,
    /// Another take of the same batch id was counted before: nothing counted now.
    Duplicate,
    /// The store did not take them yet: kept here and retried.
    Buffered,
}

/// A batch taken by [`CounterCore::send`].
#[derive(Debug)]
pub enum Taken {
    /// This replica took the same batch id from the viewer before.
    Duplicate,
    /// Validated; the accepted taps wait for the next flush.
    New {
        outcome: BatchOutcome,
        accepted: Vec<u64>,
        /// Told once the flush carrying the batch was tried (none when
        /// nothing was accepted).
        fate: Option<oneshot::Receiver<BatchFate>>,
    },
}

type Waiter = Option<oneshot::Sender<BatchFate>>;

/// Where a batch waits for the store ([`CounterCore::tried`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// In the rooms' pending increments: no round took it yet.
    Pending,
    /// In a flush a round took (in flight, or failed and kept for retry).
    Unflushed,
}

#[derive(Debug, Default)]
struct Pending {
    total: u64,
    viewers: HashMap<u64, u64>,
    batches: Vec<BatchMark>,
    /// One per batch, in batch order.
    waiters: Vec<Waiter>,
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

/// Pending increments, failed flushes, viewers' buckets and recent batches.
#[derive(Debug)]
pub struct CounterCore {
    limits: Limits,
    store: HotStore,
    viewers: Vec<Mutex<HashMap<u64, ViewerState>>>,
    pending: Vec<Mutex<HashMap<u64, Pending>>>,
    /// Flushes the store has not confirmed, oldest first; retried as they are.
    unflushed: Mutex<Vec<RoomFlush>>,
    /// Per flush id, the callers waiting for their batches (in batch order).
    waiters: Mutex<HashMap<String, Vec<Waiter>>>,
    /// Loves in `pending` plus in `unflushed`.
    waiting: AtomicU64,
    max_waiting: u64,
    node_id: String,
    flush_seq: AtomicU64,
    totals: Mutex<HashMap<u64, (u64, Instant)>>,
    total_ttl: Duration,
    stats: CounterStats,
    /// Signalled when a batch joins `pending`: the flusher starts a round.
    work: tokio::sync::Notify,
    /// Signalled (to every waiter) when a flush round ends: a retry taken
    /// as a duplicate waits on it for its first attempt's flush.
    round_done: tokio::sync::Notify,
    /// The stripe the next round drains first (rounds cut short by
    /// [`MAX_FLUSH_BATCHES`] then do not favour the low stripes).
    next_stripe: AtomicUsize,
    max_flush_batches: usize,
}

fn stripe_of(key: u64) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % STRIPES as u64) as usize
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
            waiters: Mutex::new(HashMap::new()),
            waiting: AtomicU64::new(0),
            max_waiting,
            // Flush ids must never repeat across restarts: time plus pid.
            node_id: format!("{nanos:x}-{}", std::process::id()),
            flush_seq: AtomicU64::new(0),
            totals: Mutex::new(HashMap::new()),
            total_ttl,
            stats: CounterStats::default(),
            work: tokio::sync::Notify::new(),
            round_done: tokio::sync::Notify::new(),
            next_stripe: AtomicUsize::new(0),
            max_flush_batches: MAX_FLUSH_BATCHES,
        }
    }

    /// Caps the batches of one flush round (tests; default [`MAX_FLUSH_BATCHES`]).
    #[cfg(test)]
    #[must_use]
    pub fn with_max_flush_batches(mut self, max: usize) -> Self {
        self.max_flush_batches = max.max(1);
        self
    }

    /// Returns once a batch was added to the pending increments since the
    /// last call returned (at once if one was meanwhile): the flusher's cue.
    pub async fn work_arrived(&self) {
        self.work.notified().await;
    }

    /// True if batches wait for a flush round.
    pub fn has_pending(&self) -> bool {
        self.pending.iter().any(|stripe| !lock(stripe).is_empty())
    }

    /// True if flushes the store did not take yet wait for a retry.
    pub fn retrying(&self) -> bool {
        !lock(&self.unflushed).is_empty()
    }

    /// This process's id (unique across restarts): flush ids start with
    /// it, and it names the finaliser's lease.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn stats(&self) -> &CounterStats {
        &self.stats
    }

    pub fn store(&self) -> &HotStore {
        &self.store
    }

    /// Loves accepted here that the hot store has not confirmed yet.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Acquire)
    }

    /// Validates and takes a batch. A batch id this replica took from the
    /// viewer recently is [`Taken::Duplicate`] at once (its caller must
    /// await [`Self::tried`] before answering); any other repeat is caught
    /// by the store when the batch is flushed ([`BatchFate::Duplicate`]).
    pub fn send(
        &self,
        room_id: u64,
        viewer_id: u64,
        batch_id: &str,
        taps: &[u64],
        video_now_ms: u64,
        now_ms: i64,
    ) -> Result<Taken, SendError> {
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
        if state
            .recent
            .iter()
            .any(|(room, id, _)| *room == room_id && id == batch_id)
        {
            self.stats.duplicate_batches.fetch_add(1, Ordering::Relaxed);
            return Ok(Taken::Duplicate);
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
                .is_some_and(|(_, _, at)| now_ms - at > RECENT_FOR_MS)
        {
            state.recent.pop_front();
        }
        state
            .recent
            .push_back((room_id, batch_id.to_owned(), now_ms));
        let mut fate = None;
        if outcome.accepted > 0 {
            // Still under the viewer's stripe: a concurrent retry of the
            // same batch waits here and then finds it in `recent`.
            let (tell, told) = oneshot::channel();
            let mut pending = lock(&self.pending[stripe_of(room_id)]);
            let room = pending.entry(room_id).or_default();
            room.total += outcome.accepted;
            *room.viewers.entry(viewer_id).or_default() += outcome.accepted;
            room.batches.push(BatchMark {
                viewer_id,
                batch_id: batch_id.to_owned(),
                loves: outcome.accepted,
            });
            room.waiters.push(Some(tell));
            fate = Some(told);
            self.waiting.fetch_add(outcome.accepted, Ordering::AcqRel);
            drop(pending);
            self.work.notify_one();
        }
        self.stats
            .accepted
            .fetch_add(outcome.accepted, Ordering::Relaxed);
        self.stats
            .rejected
            .fetch_add(outcome.rejected, Ordering::Relaxed);
        Ok(Taken::New {
            outcome,
            accepted: verdict.accepted,
            fate,
        })
    }

    /// Returns once the flush carrying the batch `batch_id` of `viewer_id`
    /// in `room_id` was tried: at once if no flush of this replica holds it
    /// (it was counted, or took no loves), else after the round that wrote
    /// it ended (counted, or kept for retry as its first attempt was told).
    /// A retry answered "duplicate" while its first attempt still waits for
    /// the store would otherwise be told "counted" before the loves are
    /// anywhere but in this process.
    pub async fn tried(&self, room_id: u64, viewer_id: u64, batch_id: &str) {
        let mut written = false;
        loop {
            let round = self.round_done.notified();
            tokio::pin!(round);
            round.as_mut().enable();
            match self.locate(room_id, viewer_id, batch_id) {
                None => return,
                // Drained by a round that has ended since (it is kept for
                // retry) or is still in flight (its end is the next signal).
                Some(Place::Unflushed) if written => return,
                Some(Place::Unflushed) => written = true,
                Some(Place::Pending) => {}
            }
            round.await;
        }
    }

    /// Where a batch waits in this replica, if it does.
    fn locate(&self, room_id: u64, viewer_id: u64, batch_id: &str) -> Option<Place> {
        let is = |b: &BatchMark| b.viewer_id == viewer_id && b.batch_id == batch_id;
        let pending = lock(&self.pending[stripe_of(room_id)])
            .get(&room_id)
            .is_some_and(|p| p.batches.iter().any(is));
        if pending {
            return Some(Place::Pending);
        }
        lock(&self.unflushed)
            .iter()
            .any(|f| f.room_id == room_id && f.batches.iter().any(is))
            .then_some(Place::Unflushed)
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

    /// Per viewer, the loves of `room_id` accepted here and not yet
    /// confirmed by the store.
    pub fn local_waiting_viewers(&self, room_id: u64) -> HashMap<u64, u64> {
        let mut viewers = lock(&self.pending[stripe_of(room_id)])
            .get(&room_id)
            .map(|p| p.viewers.clone())
            .unwrap_or_default();
        for flush in lock(&self.unflushed)
            .iter()
            .filter(|f| f.room_id == room_id)
        {
            for (viewer, loves) in &flush.viewers {
                *viewers.entry(*viewer).or_default() += loves;
            }
        }
        viewers
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
            } else if let Some((total, _)) = cached {
                // Read with what waits under the totals' lock, which a flush
                // holds while it moves loves from one to the other.
                return Ok(total + self.local_waiting(room_id));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::hot::HotConfig;

    fn core(max_batches: usize) -> CounterCore {
        CounterCore::new(
            Limits::default(),
            HotStore::memory(HotConfig::default()),
            1_000_000,
            Duration::from_millis(100),
        )
        .with_max_flush_batches(max_batches)
    }

    fn fate(taken: Taken) -> oneshot::Receiver<BatchFate> {
        match taken {
            Taken::New {
                fate: Some(fate), ..
            } => fate,
            other => panic!("expected a batch with accepted loves, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_round_writes_at_most_its_cap_and_the_rest_follows() {
        let core = core(2);
        let now = 1_000_000;
        let mut fates = Vec::new();
        for viewer in 1..=5 {
            let taken = core
                .send(7, viewer, "b", &[1, 2, 3], 10_000, now)
                .expect("taken");
            fates.push(fate(taken));
        }
        assert!(core.has_pending());
        let report = core.flush().await;
        assert_eq!(report.rooms, vec![7]);
        assert_eq!(core.store().total(7).await.expect("total"), 6);
        assert!(core.has_pending());
        assert_eq!(core.waiting(), 9);
        core.flush().await;
        core.flush().await;
        assert!(!core.has_pending());
        assert!(!core.retrying());
        assert_eq!(core.store().total(7).await.expect("total"), 15);
        assert_eq!(core.waiting(), 0);
        for fate in fates {
            assert_eq!(fate.await.expect("told"), BatchFate::Counted);
        }
        let top = core.store().top(7, 10).await.expect("top");
        assert_eq!(top.len(), 5);
        assert!(top.iter().all(|(_, loves)| *loves == 3), "{top:?}");
    }

    /// Polls `fut` once: true if it is ready.
    fn ready<F: Future>(fut: std::pin::Pin<&mut F>) -> bool {
        let waker = std::task::Waker::noop();
        fut.poll(&mut std::task::Context::from_waker(waker))
            .is_ready()
    }

    #[tokio::test]
    async fn a_retry_taken_as_a_duplicate_waits_for_its_first_attempts_flush() {
        let core = core(MAX_FLUSH_BATCHES);
        let first = fate(
            core.send(7, 1, "b", &[1, 2], 10_000, 1_000_000)
                .expect("taken"),
        );
        let again = core
            .send(7, 1, "b", &[1, 2], 10_000, 1_000_000)
            .expect("taken");
        assert!(matches!(again, Taken::Duplicate), "{again:?}");
        let tried = core.tried(7, 1, "b");
        tokio::pin!(tried);
        // The first attempt's loves are only in this process: the retry
        // may not be told "counted" yet.
        assert!(!ready(tried.as_mut()), "answered before any flush");
        core.flush().await;
        assert!(ready(tried.as_mut()), "not answered after the flush");
        assert_eq!(first.await.expect("told"), BatchFate::Counted);
        assert_eq!(core.store().total(7).await.expect("total"), 2);
        // Another viewer's batch of the same id, or one never sent, waits
        // for nothing.
        let other = core.tried(7, 2, "b");
        tokio::pin!(other);
        assert!(ready(other.as_mut()));
    }

    #[tokio::test]
    async fn a_batch_wakes_the_flusher() {
        let core = core(MAX_FLUSH_BATCHES);
        let _fate = fate(
            core.send(7, 1, "b", &[1], 10_000, 1_000_000)
                .expect("taken"),
        );
        tokio::time::timeout(Duration::from_secs(5), core.work_arrived())
            .await
            .expect("the flusher is woken by a new batch");
    }
}
