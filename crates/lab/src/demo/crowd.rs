//! The broadcast's audience: thousands of viewer streams spread over a few
//! HTTP/2 connections, as BFFs hold them, each a task that counts what it
//! receives. A sample of them also times each comment from its publish
//! (the send time leads the comment's text) to its arrival, and asks for
//! write stamps (`stamp_writes`) to time the last hop, written by the node →
//! received, into `livemesh.client.receive_delay` (this process's metrics,
//! so the view and `livemesh top` show it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use hdrhistogram::Histogram;
use livemesh_mesh::MeshChannel;
use livemesh_proto::v1::subscribe_response::Message;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{RoomEvent, StreamPosition, SubscribeRequest, room_event};

/// One viewer in this many times its comments.
const TIMED_EVERY: u64 = 8;

/// What the audience saw, updated by every viewer's task.
#[derive(Debug)]
pub(super) struct CrowdStats {
    /// Streams that got their `started` message (and have not ended).
    pub(super) watching: AtomicU64,
    /// Events received, every viewer counted.
    pub(super) received: AtomicU64,
    /// Streams that ended OK after the room-ended event.
    pub(super) saw_the_end: AtomicU64,
    /// Streams that failed and did not come back.
    pub(super) failed: AtomicU64,
    /// Streams that fell behind (or lost their node) and resumed.
    pub(super) resumed: AtomicU64,
    /// The highest love total a viewer was shown.
    pub(super) love_total: AtomicU64,
    /// Microseconds from a comment's publish to its arrival: since the
    /// view last took them, and over the whole broadcast.
    latency: Mutex<(Histogram<u64>, Histogram<u64>)>,
    /// Seconds from a node writing a message to a timed viewer receiving it.
    receive_delay: opentelemetry::metrics::Histogram<f64>,
}

impl CrowdStats {
    fn new() -> Self {
        Self {
            watching: AtomicU64::new(0),
            received: AtomicU64::new(0),
            saw_the_end: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            love_total: AtomicU64::new(0),
            latency: Mutex::new((histogram(), histogram())),
            receive_delay: opentelemetry::global::meter("livemesh")
                .f64_histogram("livemesh.client.receive_delay")
                .with_unit("s")
                .with_description(
                    "Time from a subscribe node writing a message to a client receiving it \
                     (clients that ask for write stamps: the demo's timed viewers)",
                )
                .with_boundaries(livemesh_mesh::metrics::HOP_BUCKETS.to_vec())
                .build(),
        }
    }

    /// A message arrived `hop` after the node wrote it.
    fn written(&self, hop: Duration) {
        self.receive_delay.record(hop.as_secs_f64(), &[]);
    }

    /// The comments' latencies since the last call (then forgotten), or
    /// over the whole broadcast: p50 and p99 in seconds, `None` when no
    /// comment arrived.
    pub(super) fn latency(&self, whole: bool) -> Option<(f64, f64)> {
        let mut latency = self
            .latency
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (recent, all) = &mut *latency;
        let histogram = if whole { &*all } else { &*recent };
        if histogram.is_empty() {
            return None;
        }
        let quantile = |q| histogram.value_at_quantile(q) as f64 / 1e6;
        let figures = (quantile(0.5), quantile(0.99));
        if !whole {
            recent.reset();
        }
        Some(figures)
    }
}

/// Microseconds, three significant digits, up to an hour.
fn histogram() -> Histogram<u64> {
    // Valid bounds (1 ≤ low, high ≥ 2·low, 3 digits): cannot fail.
    #[allow(clippy::unwrap_used)]
    Histogram::new_with_bounds(1, 3_600_000_000, 3).unwrap()
}

/// Nanoseconds since the Unix epoch (the comments' send time).
pub(super) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The send time at the start of a comment's text.
fn sent_ns(text: &str) -> Option<u64> {
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    text.get(..digits)?.parse().ok()
}

/// The audience of one room.
#[derive(Debug)]
pub(super) struct Crowd {
    pub(super) stats: Arc<CrowdStats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    viewers: u64,
}

impl Crowd {
    /// Subscribes `viewers` viewers (ids from `first_id`) to `room_id`,
    /// viewer `i` on connection `i % channels.len()`, with batches
    /// accepted as a BFF would; returns once every stream has started.
    pub(super) async fn join(
        channels: &[MeshChannel],
        room_id: u64,
        viewers: u64,
        first_id: u64,
        within: Duration,
    ) -> anyhow::Result<Self> {
        let stats = Arc::new(CrowdStats::new());
        let tasks = (0..viewers)
            .map(|i| {
                let client =
                    SubscribeServiceClient::new(channels[i as usize % channels.len()].clone());
                let viewer = Viewer {
                    client,
                    room_id,
                    viewer_id: first_id + i,
                    timed: i % TIMED_EVERY == 0,
                    stats: stats.clone(),
                };
                tokio::spawn(viewer.watch())
            })
            .collect();
        let crowd = Self {
            stats,
            tasks,
            viewers,
        };
        let deadline = Instant::now() + within;
        while crowd.stats.watching.load(Ordering::Relaxed) < viewers {
            let failed = crowd.stats.failed.load(Ordering::Relaxed);
            if failed > 0 {
                bail!("{failed} of {viewers} viewers could not subscribe");
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {viewers} viewers subscribed within {within:?}",
                    crowd.stats.watching.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(crowd)
    }

    /// How many viewers joined.
    pub(super) fn size(&self) -> u64 {
        self.viewers
    }

    /// Whether every stream has ended (OK or not).
    pub(super) fn all_ended(&self) -> bool {
        self.stats.saw_the_end.load(Ordering::Relaxed) + self.stats.failed.load(Ordering::Relaxed)
            >= self.viewers
    }

    /// Waits for every viewer's task; fails unless every stream saw the
    /// room end.
    pub(super) async fn finished(self) -> anyhow::Result<()> {
        for task in self.tasks {
            let _ = task.await;
        }
        let ended = self.stats.saw_the_end.load(Ordering::Relaxed);
        if ended != self.viewers {
            bail!(
                "{ended} of {} viewers saw the room end ({} streams failed)",
                self.viewers,
                self.stats.failed.load(Ordering::Relaxed)
            );
        }
        Ok(())
    }
}

struct Viewer {
    client: SubscribeServiceClient<MeshChannel>,
    room_id: u64,
    viewer_id: u64,
    timed: bool,
    stats: Arc<CrowdStats>,
}

impl Viewer {
    /// Follows the room until it ends; a stream that fell behind or lost
    /// its node resumes after the last position it received.
    async fn watch(mut self) {
        let mut resume: Option<StreamPosition> = None;
        let mut attempts = 0;
        loop {
            let request = SubscribeRequest {
                room_id: self.room_id,
                viewer_id: self.viewer_id,
                resume,
                accept_batches: true,
                stamp_writes: self.timed,
            };
            let mut stream = match self.client.subscribe(request).await {
                Ok(stream) => stream.into_inner(),
                Err(status) => {
                    attempts += 1;
                    if attempts > 3 {
                        tracing::warn!(viewer = self.viewer_id, %status, "subscribing failed");
                        self.stats.failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let mut started = false;
            let ended = loop {
                match stream.message().await {
                    Ok(Some(response)) => {
                        if let Some(written) = response.written_at {
                            self.stats.written(livemesh_proto::time::since(written));
                        }
                        match response.message {
                            Some(Message::Started(_)) => {
                                started = true;
                                if resume.is_none() {
                                    self.stats.watching.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Some(Message::Event(event)) => self.saw(&event, &mut resume),
                            Some(Message::Batch(batch)) => {
                                for event in &batch.events {
                                    self.saw(event, &mut resume);
                                }
                            }
                            None => {}
                        }
                    }
                    Ok(None) => break Ok(()),
                    Err(status) => break Err(status),
                }
            };
            match ended {
                Ok(()) => {
                    self.stats.watching.fetch_sub(1, Ordering::Relaxed);
                    self.stats.saw_the_end.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Err(status)
                    if started
                        && matches!(
                            status.code(),
                            tonic::Code::ResourceExhausted | tonic::Code::Unavailable
                        ) =>
                {
                    self.stats.resumed.fetch_add(1, Ordering::Relaxed);
                }
                Err(status) => {
                    tracing::warn!(viewer = self.viewer_id, %status, "a viewer's stream failed");
                    if started {
                        self.stats.watching.fetch_sub(1, Ordering::Relaxed);
                    }
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    fn saw(&self, event: &RoomEvent, resume: &mut Option<StreamPosition>) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        *resume = Some(StreamPosition {
            epoch: event.epoch,
            offset: event.offset,
        });
        match &event.kind {
            Some(room_event::Kind::LoveTotal(love)) => {
                self.stats
                    .love_total
                    .fetch_max(love.total, Ordering::Relaxed);
            }
            Some(room_event::Kind::Comment(comment)) if self.timed => {
                if let Some(sent) = sent_ns(&comment.text) {
                    let micros = now_ns().saturating_sub(sent) / 1_000;
                    let mut latency = self
                        .stats
                        .latency
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    latency.0.saturating_record(micros.max(1));
                    latency.1.saturating_record(micros.max(1));
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_send_time_is_read_from_the_start_of_the_text() {
        assert_eq!(
            sent_ns("1700000000123456789 hello"),
            Some(1_700_000_000_123_456_789)
        );
        assert_eq!(sent_ns("hello"), None);
        assert_eq!(sent_ns("99999999999999999999999 overflow"), None);
    }
}
