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
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use livemesh_proto::v1::{
        Comment, LoveTotal, RoomEvent, SubscribeResponse, room_event, subscribe_response,
    };
    use prost::Message as _;

    use super::*;

    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn comment(offset: u64) -> (u64, u64, Ordered) {
        let event = RoomEvent {
            room_id: 1,
            epoch: 7,
            offset,
            kind: Some(room_event::Kind::Comment(Comment {
                viewer_id: 1,
                text: format!("c{offset}"),
            })),
            ..RoomEvent::default()
        };
        (7, offset, Ordered::new(&event))
    }

    fn total(total: u64) -> Latest {
        Latest::new(&RoomEvent {
            room_id: 1,
            kind: Some(room_event::Kind::LoveTotal(LoveTotal { total })),
            ..RoomEvent::default()
        })
    }

    fn events(frame: &Frame) -> Vec<RoomEvent> {
        match SubscribeResponse::decode(frame.to_bytes()).unwrap().message {
            Some(subscribe_response::Message::Event(event)) => vec![event],
            Some(subscribe_response::Message::Batch(batch)) => batch.events,
            other => panic!("not an event: {other:?}"),
        }
    }

    fn read(feed: &Feed, cursor: &mut Cursor, delivery: Delivery) -> Poll<Read> {
        let waker = Arc::new(CountingWaker(AtomicUsize::new(0))).into();
        feed.poll_read(cursor, delivery, &mut Context::from_waker(&waker))
    }

    fn frame(poll: Poll<Read>) -> Vec<RoomEvent> {
        match poll {
            Poll::Ready(Read::Frame(frame)) => events(&frame),
            other => panic!("no frame: {other:?}"),
        }
    }

    #[test]
    fn single_delivery_sends_ordered_events_first_then_the_newest_latest_value() {
        let feed = Feed::new(8);
        let mut cursor = feed.cursor((0, 0), (7, 0));
        feed.set_latest(LatestKind::LoveTotal, total(1), Instant::now());
        feed.set_latest(LatestKind::LoveTotal, total(2), Instant::now());
        feed.push_ordered(Instant::now(), [comment(1), comment(2)]);
        let offsets: Vec<u64> = (0..2)
            .map(|_| frame(read(&feed, &mut cursor, Delivery::Single))[0].offset)
            .collect();
        assert_eq!(offsets, [1, 2]);
        let latest = frame(read(&feed, &mut cursor, Delivery::Single));
        assert_eq!(
            latest[0].kind,
            Some(room_event::Kind::LoveTotal(LoveTotal { total: 2 }))
        );
        assert_eq!((latest[0].epoch, latest[0].offset), (7, 2));
        assert!(read(&feed, &mut cursor, Delivery::Single).is_pending());
    }

    #[test]
    fn a_batch_holds_everything_waiting_and_skips_the_resume_range() {
        let feed = Feed::new(8);
        // Resumed at offset 2 that this node had not released yet.
        let mut cursor = feed.cursor((7, 2), (7, 0));
        feed.push_ordered(
            Instant::now(),
            [comment(1), comment(2), comment(3), comment(4)],
        );
        feed.set_latest(LatestKind::LoveTotal, total(5), Instant::now());
        let batch = frame(read(
            &feed,
            &mut cursor,
            Delivery::Batches { max_bytes: 1 << 20 },
        ));
        let offsets: Vec<u64> = batch.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, [3, 4, 4], "comments 3 and 4, then the total at 4");
        assert!(read(&feed, &mut cursor, Delivery::Batches { max_bytes: 1 << 20 }).is_pending());
    }

    #[test]
    fn a_batch_over_its_byte_limit_continues_in_the_next_message() {
        let feed = Feed::new(16);
        let mut cursor = feed.cursor((0, 0), (7, 0));
        feed.push_ordered(Instant::now(), (1..=10).map(comment));
        feed.set_latest(LatestKind::LoveTotal, total(5), Instant::now());
        let delivery = Delivery::Batches { max_bytes: 60 };
        let mut offsets = Vec::new();
        let mut messages = 0;
        while let Poll::Ready(read) = read(&feed, &mut cursor, delivery) {
            offsets.extend(frame(Poll::Ready(read)).iter().map(|e| e.offset));
            messages += 1;
        }
        assert!(messages > 1);
        assert_eq!(offsets, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10]);
    }

    #[test]
    fn a_stream_behind_by_more_than_the_ring_overflows() {
        let feed = Feed::new(4);
        let mut slow = feed.cursor((0, 0), (7, 0));
        let mut fast = feed.cursor((0, 0), (7, 0));
        feed.push_ordered(Instant::now(), (1..=4).map(comment));
        assert_eq!(
            frame(read(
                &feed,
                &mut fast,
                Delivery::Batches { max_bytes: 1 << 20 }
            ))
            .len(),
            4
        );
        feed.push_ordered(Instant::now(), [comment(5)]);
        assert!(matches!(
            read(&feed, &mut slow, Delivery::Single),
            Poll::Ready(Read::Overflow)
        ));
        assert_eq!(slow.last, (7, 0), "nothing sent: resume where it went live");
        assert_eq!(frame(read(&feed, &mut fast, Delivery::Single))[0].offset, 5);
    }

    #[test]
    fn waiting_streams_are_registered_once_and_woken_by_each_change() {
        let feed = Feed::new(4);
        let mut cursor = feed.cursor((0, 0), (7, 0));
        let counter = Arc::new(CountingWaker(AtomicUsize::new(0)));
        let waker = counter.clone().into();
        let mut cx = Context::from_waker(&waker);
        assert!(
            feed.poll_read(&mut cursor, Delivery::Single, &mut cx)
                .is_pending()
        );
        assert!(
            feed.poll_read(&mut cursor, Delivery::Single, &mut cx)
                .is_pending()
        );
        assert_eq!(feed.lock().waiters.len(), 1, "registered once");
        feed.push_ordered(Instant::now(), [comment(1)]);
        assert_eq!(counter.0.load(Ordering::Relaxed), 1);
        assert!(
            feed.poll_read(&mut cursor, Delivery::Single, &mut cx)
                .is_ready()
        );
        // Caught up: registered while reading, so the next change wakes it.
        feed.push_ordered(Instant::now(), [comment(2)]);
        assert_eq!(counter.0.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn finish_ends_after_what_is_queued_and_shutdown_at_once() {
        let feed = Feed::new(4);
        let mut a = feed.cursor((0, 0), (7, 0));
        let mut b = feed.cursor((0, 0), (7, 0));
        feed.push_ordered(Instant::now(), [comment(1)]);
        feed.finish();
        feed.set_latest(LatestKind::LoveTotal, total(9), Instant::now());
        assert_eq!(frame(read(&feed, &mut a, Delivery::Single))[0].offset, 1);
        assert!(matches!(
            read(&feed, &mut a, Delivery::Single),
            Poll::Ready(Read::Finished)
        ));
        feed.shut_down();
        assert!(matches!(
            read(&feed, &mut b, Delivery::Single),
            Poll::Ready(Read::Shutdown)
        ));
    }

    /// The streams an event still waits for, before its write delay is
    /// recorded (by the last of them).
    fn waiting_for(feed: &Feed) -> Vec<u64> {
        feed.lock().ring.iter().map(|e| e.unsent.streams).collect()
    }

    #[test]
    fn the_last_stream_to_send_an_event_records_its_delay_and_leavers_count_as_sent() {
        let feed = Feed::new(8);
        let mut a = feed.cursor((0, 0), (7, 0));
        let mut b = feed.cursor((0, 0), (7, 0));
        let c = feed.cursor((0, 0), (7, 0));
        feed.push_ordered(Instant::now(), [comment(1), comment(2)]);
        assert_eq!(waiting_for(&feed), [3, 3]);
        frame(read(&feed, &mut a, Delivery::Single));
        assert_eq!(waiting_for(&feed), [2, 3]);
        frame(read(
            &feed,
            &mut b,
            Delivery::Batches { max_bytes: 1 << 20 },
        ));
        assert_eq!(waiting_for(&feed), [1, 2]);
        // The third stream leaves without reading: nothing waits for it.
        feed.forget(&c);
        assert_eq!(waiting_for(&feed), [0, 1]);
        assert_eq!(feed.lock().delays.len(), 0, "nothing records: no histogram");
        frame(read(&feed, &mut a, Delivery::Single));
        assert_eq!(waiting_for(&feed), [0, 0]);
        // A stream that joins later waits for what comes next (with the two
        // still here), not for what came before.
        let _d = feed.cursor((0, 0), (7, 0));
        feed.push_ordered(Instant::now(), [comment(3)]);
        assert_eq!(waiting_for(&feed), [0, 0, 3]);
    }

    #[test]
    fn an_event_sent_to_every_stream_yields_exactly_one_delay() {
        let mut unsent = Unsent {
            received: Instant::now(),
            streams: 3,
        };
        let delays: Vec<f64> = (0..5).filter_map(|_| unsent.sent()).collect();
        assert_eq!(delays.len(), 1, "{delays:?}");
        assert!(delays[0] >= 0.0);
    }
}
