//! A room's feed on one node: its released ordered events in a ring, each
//! encoded once, and its newest latest values, which every local stream of
//! the room reads at its own pace through a [`Cursor`].
//!
//! Delivering an event costs the room one push and one round of wake-ups
//! for the streams that wait; it costs a stream nothing until it is polled.
//! A stream then takes what it has not sent yet, under one short lock, and
//! if that leaves nothing more, puts its waker on the room's waiter list in
//! the same critical section. A stream polled again with nothing new checks
//! one atomic (the feed's generation) and takes no lock.
//!
//! - **Ordered** events keep their order and are never skipped: the ring
//!   holds the newest `capacity` (`subscribe.queue_len`) of them, and a
//!   stream whose next event has left the ring has fallen too far behind: it
//!   ends with its resume position ([`Read::Overflow`]), as a full queue did.
//! - **Latest values** (love total, viewer count) are one slot per kind with
//!   a version: a stream sends the newest value it has not sent, never a
//!   backlog, with the position of the last ordered event it sent.
//!
//! **Invariant:** a stream's memory does not grow with the room's traffic:
//! a cursor is a few integers, and the ring is the room's, bounded.
//!
//! The feed also measures its hop (`livemesh.subscribe.write_delay`): each
//! event remembers when the `Deliver` that released it arrived and how many
//! of the room's streams have yet to send it; the stream that sends it last
//! records the delay, once per event, never per stream. A stream that
//! leaves counts as having sent what it had not; a latest value replaced
//! before every stream sent it is not recorded.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use livemesh_proto::encoded::{BatchWriter, Frame, Latest, Ordered};

/// The latest-value kinds, each with one slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatestKind {
    LoveTotal = 0,
    ViewerCount = 1,
}

const KINDS: usize = 2;

/// What a stream read from its feed.
#[derive(Debug)]
pub enum Read {
    /// The next message.
    Frame(Frame),
    /// The room ended and the stream has sent everything: it ends OK.
    Finished,
    /// The node is shutting down: the stream ends now.
    Shutdown,
    /// The stream fell more than the ring's capacity behind.
    Overflow,
}

/// How a stream reads its feed.
#[derive(Debug, Clone, Copy)]
pub enum Delivery {
    /// One event per message.
    Single,
    /// Everything waiting in one `EventBatch`, up to this many bytes.
    Batches { max_bytes: usize },
}

/// One stream's place in its room's feed.
#[derive(Debug)]
pub struct Cursor {
    /// Sequence number of the next ordered event to send.
    next: u64,
    /// Version of the last value sent, per latest-value kind.
    seen: [u64; KINDS],
    /// Ordered events at or before this (epoch, offset) were replayed or
    /// are older than the client's resume position: not sent.
    skip: (u64, u64),
    /// The position of the last ordered event sent (or where the stream
    /// went live): what latest values carry, and where to resume.
    pub last: (u64, u64),
    /// On the waiter list: the generation it was put there in, and where.
    waiting: Option<Waiting>,
}

#[derive(Debug, Clone, Copy)]
struct Waiting {
    generation: u64,
    index: usize,
    /// The registered waker's identity (`Waker::data`, `Waker::vtable`), so
    /// that a poll from another task is noticed without the lock.
    waker: (usize, usize),
}

fn identity(waker: &Waker) -> (usize, usize) {
    (
        waker.data() as usize,
        std::ptr::from_ref(waker.vtable()) as usize,
    )
}

#[derive(Debug)]
struct Entry {
    epoch: u64,
    offset: u64,
    event: Ordered,
    unsent: Unsent,
}

/// When an event reached the node, and how many streams have yet to send it.
#[derive(Debug, Clone, Copy)]
struct Unsent {
    received: Instant,
    streams: u64,
}

impl Unsent {
    /// One more stream sent it (or left without): the last one returns the delay.
    fn sent(&mut self) -> Option<f64> {
        match self.streams {
            0 => None,
            1 => {
                self.streams = 0;
                Some(self.received.elapsed().as_secs_f64())
            }
            _ => {
                self.streams -= 1;
                None
            }
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Ordered events with sequence numbers `head - ring.len() .. head`.
    ring: VecDeque<Entry>,
    /// Sequence number of the next ordered event.
    head: u64,
    latest: [Option<(u64, Latest, Unsent)>; KINDS],
    /// Versions handed out to latest values (the first is 1).
    versions: u64,
    ended: Option<Ended>,
    /// Wakers of streams that have sent everything; taken at each change.
    waiters: Vec<Option<Waker>>,
    /// The previous waiter list, emptied, kept for its allocation.
    spare: Vec<Option<Waker>>,
    /// Live cursors: how many streams each new event waits for.
    streams: u64,
    /// Delays of events their last stream just sent, recorded by the
    /// reader after it let go of the lock.
    delays: Vec<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// After what is in the ring.
    Finish,
    /// At once.
    Shutdown,
}

/// A room's feed.
#[derive(Debug)]
pub struct Feed {
    capacity: usize,
    /// Bumped, under the lock, by every change a stream may wait for, when
    /// the waiter list is taken: a stream registered at the current
    /// generation is still on the list and has nothing new to read.
    generation: AtomicU64,
    state: Mutex<State>,
    write_delay: Option<opentelemetry::metrics::Histogram<f64>>,
}

impl Feed {
    /// A feed keeping the newest `capacity` ordered events (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            generation: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            write_delay: None,
        }
    }

    /// The same, recording each event's delay from its `Deliver` to its
    /// last stream in `write_delay`.
    pub fn recording(capacity: usize, write_delay: opentelemetry::metrics::Histogram<f64>) -> Self {
        Self {
            write_delay: Some(write_delay),
            ..Self::new(capacity)
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state whole; a poisoned lock
        // still holds a valid ring.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A cursor for a stream that goes live now: it reads the ordered
    /// events pushed from here on, and the newest latest values.
    pub fn cursor(&self, skip: (u64, u64), last: (u64, u64)) -> Cursor {
        let mut state = self.lock();
        state.streams += 1;
        Cursor {
            next: state.head,
            seen: [0; KINDS],
            skip,
            last,
            waiting: None,
        }
    }

    /// Adds released ordered events, in order, and wakes the waiting
    /// streams; `received` is when the `Deliver` (or gap fill) that
    /// released them arrived.
    pub fn push_ordered(
        &self,
        received: Instant,
        events: impl IntoIterator<Item = (u64, u64, Ordered)>,
    ) {
        let mut state = self.lock();
        if state.ended.is_some() {
            return;
        }
        let unsent = Unsent {
            received,
            streams: state.streams,
        };
        for (epoch, offset, event) in events {
            if state.ring.len() == self.capacity {
                state.ring.pop_front();
            }
            state.ring.push_back(Entry {
                epoch,
                offset,
                event,
                unsent,
            });
            state.head += 1;
        }
        self.wake_all(state);
    }

    /// Sets a latest value (the caller decides it is newer) and wakes the
    /// waiting streams.
    pub fn set_latest(&self, kind: LatestKind, value: Latest, received: Instant) {
        let mut state = self.lock();
        if state.ended.is_some() {
            return;
        }
        state.versions += 1;
        let version = state.versions;
        let unsent = Unsent {
            received,
            streams: state.streams,
        };
        state.latest[kind as usize] = Some((version, value, unsent));
        self.wake_all(state);
    }

    /// The room ended: streams end OK once they have sent what is here.
    pub fn finish(&self) {
        self.end(Ended::Finish);
    }

    /// The node is stopping: streams end now, with their resume position.
    pub fn shut_down(&self) {
        self.end(Ended::Shutdown);
    }

    fn end(&self, how: Ended) {
        let mut state = self.lock();
        if state.ended.is_none() || how == Ended::Shutdown {
            state.ended = Some(how);
        }
        self.wake_all(state);
    }

    /// Takes the waiter list with a new generation, and wakes it outside the lock.
    fn wake_all(&self, mut state: MutexGuard<'_, State>) {
        self.generation.fetch_add(1, Ordering::Release);
        let spare = std::mem::take(&mut state.spare);
        let mut woken = std::mem::replace(&mut state.waiters, spare);
        drop(state);
        if woken.is_empty() {
            return;
        }
        for waker in woken.drain(..).flatten() {
            waker.wake();
        }
        let mut state = self.lock();
        if state.spare.capacity() < woken.capacity() {
            state.spare = woken;
        }
    }

    /// The stream's next message, or `Pending` with its waker registered.
    pub fn poll_read(
        &self,
        cursor: &mut Cursor,
        delivery: Delivery,
        cx: &mut Context<'_>,
    ) -> Poll<Read> {
        if let Some(waiting) = cursor.waiting
            && waiting.generation == self.generation.load(Ordering::Acquire)
            && waiting.waker == identity(cx.waker())
        {
            // Nothing changed since this stream went on the list.
            return Poll::Pending;
        }
        let mut state = self.lock();
        if state.ended == Some(Ended::Shutdown) {
            return Poll::Ready(Read::Shutdown);
        }
        let oldest = state.head - state.ring.len() as u64;
        if cursor.next < oldest {
            return Poll::Ready(Read::Overflow);
        }
        let frame = match delivery {
            Delivery::Single => read_one(&mut state, cursor),
            Delivery::Batches { max_bytes } => read_batch(&mut state, cursor, max_bytes),
        };
        let delays = self.take_delays(&mut state);
        let caught_up = cursor.next == state.head
            && (0..KINDS).all(|k| {
                state.latest[k]
                    .as_ref()
                    .is_none_or(|(v, _, _)| *v <= cursor.seen[k])
            });
        match frame {
            Some(frame) => {
                if caught_up && state.ended.is_none() {
                    // The next poll will find nothing: register now, while
                    // the lock is held anyway.
                    self.register(&mut state, cursor, cx.waker());
                }
                drop(state);
                self.record(delays);
                Poll::Ready(Read::Frame(frame))
            }
            None if caught_up && state.ended == Some(Ended::Finish) => {
                drop(state);
                self.record(delays);
                Poll::Ready(Read::Finished)
            }
            None => {
                self.register(&mut state, cursor, cx.waker());
                drop(state);
                self.record(delays);
                Poll::Pending
            }
        }
    }

    fn register(&self, state: &mut State, cursor: &mut Cursor, waker: &Waker) {
        // Read under the lock: every bump happens under it too.
        let generation = self.generation.load(Ordering::Relaxed);
        match cursor.waiting {
            Some(waiting) if waiting.generation == generation => {
                if waiting.waker != identity(waker) {
                    state.waiters[waiting.index] = Some(waker.clone());
                    cursor.waiting = Some(Waiting {
                        waker: identity(waker),
                        ..waiting
                    });
                }
            }
            _ => {
                cursor.waiting = Some(Waiting {
                    generation,
                    index: state.waiters.len(),
                    waker: identity(waker),
                });
                state.waiters.push(Some(waker.clone()));
            }
        }
    }

    /// Takes a dropped stream off the waiter list; what it had not sent
    /// no longer waits for it.
    pub fn forget(&self, cursor: &Cursor) {
        let mut state = self.lock();
        state.streams = state.streams.saturating_sub(1);
        let oldest = state.head - state.ring.len() as u64;
        let from = cursor.next.saturating_sub(oldest) as usize;
        let State {
            ring,
            latest,
            delays,
            ..
        } = &mut *state;
        for entry in ring.range_mut(from.min(ring.len())..) {
            delays.extend(entry.unsent.sent());
        }
        for (kind, slot) in latest.iter_mut().enumerate() {
            if let Some((version, _, unsent)) = slot
                && *version > cursor.seen[kind]
            {
                delays.extend(unsent.sent());
            }
        }
        if let Some(waiting) = cursor.waiting
            && waiting.generation == self.generation.load(Ordering::Relaxed)
            && let Some(slot) = state.waiters.get_mut(waiting.index)
        {
            *slot = None;
        }
        let delays = self.take_delays(&mut state);
        drop(state);
        self.record(delays);
    }

    /// The delays gathered under the lock, if anything records them.
    fn take_delays(&self, state: &mut State) -> Vec<f64> {
        if state.delays.is_empty() || self.write_delay.is_none() {
            state.delays.clear();
            return Vec::new();
        }
        std::mem::take(&mut state.delays)
    }

    fn record(&self, delays: Vec<f64>) {
        if let Some(histogram) = &self.write_delay {
            for delay in delays {
                histogram.record(delay, &[]);
            }
        }
    }
}

/// The ring's entries from sequence number `next` on (the ring ends just
/// before `head`), with their sequence numbers.
fn unsent(
    ring: &mut VecDeque<Entry>,
    head: u64,
    next: u64,
) -> impl Iterator<Item = (u64, &mut Entry)> {
    let oldest = head - ring.len() as u64;
    let from = (next - oldest) as usize;
    ring.range_mut(from..)
        .enumerate()
        .map(move |(i, entry)| (next + i as u64, entry))
}

/// Whether the stream passes over `entry`: replayed, or at or before the
/// client's resume position.
fn skipped(entry: &Entry, skip: (u64, u64)) -> bool {
    entry.epoch == skip.0 && entry.offset <= skip.1
}

/// The next ordered event, else the newest unsent latest value.
fn read_one(state: &mut State, cursor: &mut Cursor) -> Option<Frame> {
    let State {
        ring,
        head,
        latest,
        delays,
        ..
    } = state;
    for (seq, entry) in unsent(ring, *head, cursor.next) {
        delays.extend(entry.unsent.sent());
        cursor.next = seq + 1;
        if !skipped(entry, cursor.skip) {
            cursor.last = (entry.epoch, entry.offset);
            return Some(entry.event.frame());
        }
    }
    // Only skipped events were left.
    cursor.next = *head;
    for (kind, slot) in latest.iter_mut().enumerate() {
        if let Some((version, value, unsent)) = slot
            && *version > cursor.seen[kind]
        {
            cursor.seen[kind] = *version;
            delays.extend(unsent.sent());
            return Some(value.frame(cursor.last));
        }
    }
    None
}

/// Every unsent ordered event (up to `max_bytes`; at least one), then the
/// unsent latest values, as one batch.
fn read_batch(state: &mut State, cursor: &mut Cursor, max_bytes: usize) -> Option<Frame> {
    let State {
        ring,
        head,
        latest,
        delays,
        ..
    } = state;
    let mut batch = BatchWriter::new();
    let mut next = *head;
    for (seq, entry) in unsent(ring, *head, cursor.next) {
        if skipped(entry, cursor.skip) {
            delays.extend(entry.unsent.sent());
            continue;
        }
        if !batch.is_empty() && batch.len() + entry.event.len() > max_bytes {
            // The rest goes in the next message, right after this one.
            next = seq;
            break;
        }
        delays.extend(entry.unsent.sent());
        batch.push_ordered(&entry.event);
        cursor.last = (entry.epoch, entry.offset);
    }
    cursor.next = next;
    if next == *head {
        for (kind, slot) in latest.iter_mut().enumerate() {
            if let Some((version, value, unsent)) = slot
                && *version > cursor.seen[kind]
            {
                cursor.seen[kind] = *version;
                delays.extend(unsent.sent());
                batch.push_latest(value, cursor.last);
            }
        }
    }
    batch.finish()
}

#[cfg(test)]
mod tests;
