//! What every receiver of one side reports into: deliveries, what is still
//! outstanding, the latencies, streams that ended.

use crate::bench::helpers::{Latencies, now_ns};
use futures::StreamExt as _;
use livemesh_proto::v1::{Comment, RoomEvent, room_event};
use prost::Message as _;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

use super::PUBLISHER_VIEWER;

/// What every receiver of one side reports into.
pub(super) struct Recorder {
    pub(super) delivered: AtomicU64,
    /// Deliveries published but not yet received.
    pub(super) outstanding: AtomicI64,
    /// While saturating: publishers wait while `outstanding >= limit`.
    pub(super) limit: AtomicI64,
    wake: Notify,
    latencies: Mutex<Latencies>,
    /// livemesh: written by the node → received here, on the streams that
    /// asked for write stamps (the last hop of `latencies`).
    last_hop: Mutex<Latencies>,
    /// Streams that ended before the bench closed them.
    pub(super) ended: AtomicU64,
    pub(super) first_end: Mutex<Option<String>>,
    /// livemesh: the encoded size of a received comment event.
    pub(super) event_len: AtomicUsize,
}

impl Recorder {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            delivered: AtomicU64::new(0),
            outstanding: AtomicI64::new(0),
            limit: AtomicI64::new(i64::MAX),
            wake: Notify::new(),
            latencies: Mutex::new(Latencies::new()),
            last_hop: Mutex::new(Latencies::new()),
            ended: AtomicU64::new(0),
            first_end: Mutex::new(None),
            event_len: AtomicUsize::new(0),
        })
    }

    /// One event received, sent at `sent_ns`.
    pub(super) fn received(&self, sent_ns: u64) {
        self.record(Duration::from_nanos(now_ns().saturating_sub(sent_ns)));
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let before = self.outstanding.fetch_sub(1, Ordering::AcqRel);
        if before == self.limit.load(Ordering::Relaxed) {
            self.wake.notify_waiters();
        }
    }

    pub(super) fn stream_ended(&self, why: String) {
        self.ended.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_end
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert(why);
    }

    pub(super) fn record(&self, latency: Duration) {
        livemesh_mesh::lock(&self.latencies).record(latency);
    }

    /// A message arrived `hop` after the node wrote it.
    pub(super) fn written(&self, hop: Duration) {
        livemesh_mesh::lock(&self.last_hop).record(hop);
    }

    pub(super) fn reset_histogram(&self) {
        livemesh_mesh::lock(&self.latencies).reset();
        livemesh_mesh::lock(&self.last_hop).reset();
    }

    /// p50 and p99 of the last hop in milliseconds; `None` when no stamped
    /// message arrived (NATS).
    pub(super) fn last_hop_ms(&self) -> Option<(f64, f64)> {
        let last_hop = livemesh_mesh::lock(&self.last_hop);
        (last_hop.len() > 0).then(|| (last_hop.quantile_ms(0.5), last_hop.quantile_ms(0.99)))
    }

    /// The `q` quantile of the latencies in milliseconds.
    pub(super) fn quantile_ms(&self, q: f64) -> f64 {
        livemesh_mesh::lock(&self.latencies).quantile_ms(q)
    }

    /// The latencies at the JSON's quantiles in milliseconds.
    pub(super) fn percentiles(&self) -> [f64; crate::report::model::QUANTILES.len()] {
        livemesh_mesh::lock(&self.latencies).percentiles()
    }

    /// Waits until `outstanding` is below `limit` and adds `fanout` to it;
    /// false once `stop` has passed.
    pub(super) async fn acquire(&self, fanout: i64, limit: i64, stop: Instant) -> bool {
        loop {
            if Instant::now() >= stop {
                return false;
            }
            let mut notified = pin!(self.wake.notified());
            notified.as_mut().enable();
            let current = self.outstanding.load(Ordering::Acquire);
            if current < limit {
                if self
                    .outstanding
                    .compare_exchange(
                        current,
                        current + fanout,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok()
                {
                    return true;
                }
                continue;
            }
            // The timeout only guards against a receiver that ended early.
            let _ = tokio::time::timeout_at(
                tokio::time::Instant::from_std(
                    stop.min(Instant::now() + Duration::from_millis(50)),
                ),
                notified,
            )
            .await;
        }
    }

    /// Waits until nothing is outstanding, for at most `limit`; what is
    /// still missing then.
    pub(super) async fn drain(&self, limit: Duration) -> i64 {
        let deadline = Instant::now() + limit;
        loop {
            let left = self.outstanding.load(Ordering::Acquire);
            if left <= 0 || Instant::now() >= deadline {
                // Late arrivals must not count into the next window.
                self.outstanding.store(0, Ordering::Release);
                return left.max(0);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

/// One NATS subscription's task: ready at its first message (a probe, at the
/// latest), then every message with a send time is a delivery. Its end is
/// reported unless `running` says the bench closed it.
pub(super) async fn follow_nats(
    mut subscriber: async_nats::Subscriber,
    rec: Arc<Recorder>,
    ready: Arc<AtomicU64>,
    running: Option<Arc<AtomicBool>>,
) {
    let mut seen = false;
    while let Some(message) = subscriber.next().await {
        if !seen {
            seen = true;
            ready.fetch_add(1, Ordering::Release);
        }
        if let Some(sent) = parse_sent(&message.payload) {
            rec.received(sent);
        }
    }
    if running.is_none_or(|running| running.load(Ordering::Relaxed)) {
        rec.stream_ended("a NATS subscription ended".into());
    }
}

/// The send time at the start of a comment's text or a NATS payload.
pub(super) fn parse_sent(bytes: &[u8]) -> Option<u64> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 {
        return None;
    }
    bytes[..digits].iter().try_fold(0_u64, |value, b| {
        value.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

/// The encoded size of a comment event as a dispatcher would stamp it
/// (position and server time set), for the NATS payload until a real one
/// has been received.
pub(super) fn estimated_event_len() -> usize {
    let now_ms = (now_ns() / 1_000_000) as i64;
    RoomEvent {
        room_id: 1_000,
        epoch: now_ms as u64,
        offset: 1_000_000,
        server_time: Some(livemesh_proto::time::timestamp_from_ms(now_ms)),
        kind: Some(room_event::Kind::Comment(Comment {
            viewer_id: PUBLISHER_VIEWER,
            text: now_ns().to_string(),
        })),
    }
    .encoded_len()
}
