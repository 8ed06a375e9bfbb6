//! The flush round: what a round takes (failed flushes first, then the
//! rooms' pending increments, up to the cap), one idempotent write of it to
//! the hot store, and what each waiting `SendLoves` is told about its
//! batch; flushes of a closed room settle once their late batches are in SQL.

use livemesh_mesh::lock;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::{BatchFate, CounterCore, Pending, STRIPES, Waiter};
use crate::store::hot::{Applied, BatchMark, HotError, RoomFlush};

impl Pending {
    /// The increments of `batches` (with their waiters, same order).
    fn of(batches: Vec<BatchMark>, waiters: Vec<Waiter>) -> Self {
        let mut viewers: HashMap<u64, u64> = HashMap::new();
        let mut total = 0;
        for b in &batches {
            total += b.loves;
            *viewers.entry(b.viewer_id).or_default() += b.loves;
        }
        Self {
            total,
            viewers,
            batches,
            waiters,
        }
    }

    /// Takes the first `n` batches (and their counts) out of `self`.
    fn split_front(&mut self, n: usize) -> Self {
        let rest = Self::of(self.batches.split_off(n), self.waiters.split_off(n));
        let front = std::mem::replace(self, rest);
        Self::of(front.batches, front.waiters)
    }
}

/// What one flush round did.
#[derive(Debug, Default)]
pub struct FlushReport {
    /// Rooms whose flushes the store took.
    pub rooms: Vec<u64>,
    /// Flushes the store refused because their room is closed, with the
    /// indexes of their batches counted before the close: the rest must go
    /// to the room's final total ([`CounterCore::settle_late`]).
    pub closed: Vec<(RoomFlush, Vec<usize>)>,
}

impl CounterCore {
    /// One flush round: the flushes still waiting from earlier rounds
    /// (oldest first), then the rooms' pending increments, one flush per
    /// room, at most [`MAX_FLUSH_BATCHES`](super::MAX_FLUSH_BATCHES) batches in all (at least one
    /// flush); what does not fit waits for the next round.
    pub async fn flush(&self) -> FlushReport {
        let mut budget = self.max_flush_batches;
        let mut batch: Vec<RoomFlush> = Vec::new();
        for f in lock(&self.unflushed).iter() {
            let size = f.batches.len().max(1);
            if !batch.is_empty() && size > budget {
                break;
            }
            budget = budget.saturating_sub(size);
            batch.push(f.clone());
        }
        let mut drained = Vec::new();
        let first = self.next_stripe.fetch_add(1, Ordering::Relaxed);
        for k in 0..STRIPES {
            if budget == 0 {
                break;
            }
            let mut stripe = lock(&self.pending[(first + k) % STRIPES]);
            let rooms: Vec<u64> = stripe.keys().copied().collect();
            for room_id in rooms {
                if budget == 0 {
                    break;
                }
                let Some(room) = stripe.get_mut(&room_id) else {
                    continue;
                };
                let p = if room.batches.len() <= budget {
                    stripe.remove(&room_id).unwrap_or_default()
                } else {
                    room.split_front(budget)
                };
                budget = budget.saturating_sub(p.batches.len());
                let seq = self.flush_seq.fetch_add(1, Ordering::Relaxed);
                let flush_id = format!("{}:{seq}", self.node_id);
                lock(&self.waiters).insert(flush_id.clone(), p.waiters);
                drained.push(RoomFlush {
                    room_id,
                    flush_id,
                    total_delta: p.total,
                    viewers: p.viewers.into_iter().collect(),
                    batches: p.batches,
                });
            }
        }
        if !drained.is_empty() {
            lock(&self.unflushed).extend(drained.iter().cloned());
            batch.extend(drained);
        }
        let mut report = FlushReport::default();
        if batch.is_empty() {
            return report;
        }
        let results = self.store.flush(&batch).await;
        let mut done: HashMap<&str, u64> = HashMap::new();
        // Callers are told after the totals below include their loves, so
        // that whatever they read next shows them.
        let mut told: Vec<(&str, Vec<usize>, BatchFate)> = Vec::new();
        let mut failures = 0;
        for (flush, (_, result)) in batch.iter().zip(&results) {
            match result {
                Ok(applied @ (Applied::Counted { .. } | Applied::Replayed)) => {
                    done.insert(&flush.flush_id, applied.added(flush));
                    report.rooms.push(flush.room_id);
                    let duplicates = match applied {
                        Applied::Counted { duplicates } => duplicates.clone(),
                        _ => Vec::new(),
                    };
                    told.push((&flush.flush_id, duplicates, BatchFate::Counted));
                }
                Ok(Applied::Closed { counted }) => {
                    report.closed.push((flush.clone(), counted.clone()));
                }
                Err(HotError::Unavailable(_)) => {
                    failures += 1;
                    told.push((&flush.flush_id, Vec::new(), BatchFate::Buffered));
                }
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
        let mut flushes = 0;
        {
            // The cached totals and the waiting loves change under the
            // totals' lock, so a reader never sees loves in neither or both.
            let mut totals = lock(&self.totals);
            {
                let mut unflushed = lock(&self.unflushed);
                unflushed.retain(|f| match done.get(f.flush_id.as_str()) {
                    Some(delta) => {
                        confirmed += f.total_delta;
                        flushes += 1;
                        *added.entry(f.room_id).or_default() += delta;
                        false
                    }
                    None => true,
                });
            }
            self.waiting.fetch_sub(confirmed, Ordering::AcqRel);
            // The store now holds what we wrote: move it from "waiting" into
            // the cached total instead of dropping the cache (which would
            // send every request of the next moment to the store).
            for (room, delta) in added {
                if let Some((total, _)) = totals.get_mut(&room) {
                    *total += delta;
                }
            }
        }
        self.stats.flushes.fetch_add(flushes, Ordering::Relaxed);
        report.rooms.sort_unstable();
        report.rooms.dedup();
        for (flush_id, duplicates, fate) in told {
            self.tell(flush_id, |i| {
                if duplicates.contains(&i) {
                    BatchFate::Duplicate
                } else {
                    fate
                }
            });
        }
        self.round_done.notify_waiters();
        report
    }

    /// Tells the callers waiting on `flush_id`'s batches their fate (once).
    fn tell(&self, flush_id: &str, fate: impl Fn(usize) -> BatchFate) {
        if let Some(waiters) = lock(&self.waiters).remove(flush_id) {
            for (i, waiter) in waiters.into_iter().enumerate() {
                if let Some(waiter) = waiter {
                    // The caller may have gone: nothing to tell then.
                    let _ = waiter.send(fate(i));
                }
            }
        }
    }

    /// A flush of a closed room ([`FlushReport::closed`]) after its late
    /// batches went to the final total (`stored`), or failed to (`!stored`:
    /// kept and retried). True if this call took the flush out of the
    /// buffer (two concurrent flush rounds may both have stored it).
    pub fn settle_late(&self, flush_id: &str, counted: &[usize], stored: bool) -> bool {
        if !stored {
            self.tell(flush_id, |_| BatchFate::Buffered);
            return false;
        }
        self.tell(flush_id, |i| {
            if counted.contains(&i) {
                BatchFate::Duplicate
            } else {
                BatchFate::Counted
            }
        });
        let mut settled = 0;
        lock(&self.unflushed).retain(|f| {
            let this = f.flush_id == flush_id;
            if this {
                settled += f.total_delta;
            }
            !this
        });
        self.waiting.fetch_sub(settled, Ordering::AcqRel);
        self.round_done.notify_waiters();
        settled > 0
    }
}
