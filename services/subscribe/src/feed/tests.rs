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
