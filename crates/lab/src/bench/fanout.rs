//! `bench fanout`: events delivered per second to many concurrent
//! `Subscribe` streams on one subscribe node, against the same fan-out
//! through NATS core pub/sub in the same run; publish→receive latency; and
//! the node's memory per idle stream; and a comment storm ([`super::storm`]).
//!
//! # Set-up
//!
//! The mesh runs as a child process, `livemesh up` on a fresh data dir (the
//! embedded default), so that its resident memory can be read from
//! `/proc/PID/status` alone. `--streams N` streams are multiplexed over
//! `--connections C` HTTP/2 connections, one tonic `Channel` each, as BFFs
//! would hold them (stream `i` on connection `i % C`). NATS gets the same:
//! `N` subscriptions over `C` connections to a private `nats-server`
//! (started by `scripts/bench fanout`: the newest the registries offer,
//! whose version is printed), on subjects `room.<id>`. By default `C` grows
//! with `N`: 64, or one connection per 10,000 streams past 640,000.
//!
//! Three layouts (`--layout`, all by default), each on a fresh node: every
//! stream in one hot room, then the streams spread over `--rooms R` rooms
//! (stream `i` in room `i % R`), then the storm (see [`super::storm`]:
//! one room, 10,000 comments a minute, livemesh's viewers with
//! `accept_batches`, ramped until p99 passes 75 ms). The streams of the
//! first two are plain subscribers: one message per event, as NATS sends.
//! Per layout and side, in this order:
//!
//! 1. (livemesh) start the rooms, open and close one warm-up stream per room
//!    so lazily built per-room state is in place, wait until the node's RSS
//!    is stable (two samples 500 ms apart within 1 MiB or 0.5%), open the
//!    `N` streams (a stream is open once its `started` message arrived),
//!    wait for a stable RSS again: the growth divided by `N` is the memory
//!    per idle stream. No event has been published yet.
//! 2. A ready check: one event per room, and every stream must get it.
//! 3. **Saturation** (throughput): `--publishers P` tasks publish comments
//!    round-robin over the layout's rooms, under one window shared by all
//!    of them: an event may be published only while fewer than
//!    `--in-flight W` × `N` deliveries are outstanding (published but not
//!    yet received by a stream); it then adds its room's stream count to
//!    that number. So `W`×`N` to `W`×`N` + one fan-out deliveries are in
//!    flight at any time: one or two whole fan-outs in the hot room, about
//!    one event per room in the many-rooms layout. The rule is the same
//!    code for both sides. Deliveries per second are counted at the
//!    receivers over the window; what is still in flight when it closes is
//!    drained, not counted. The latencies of this window are reported as
//!    the *saturated* ones (they include waiting behind the window).
//! 4. **Paced** (latency): comments at a fixed `--rate` events per second,
//!    open loop (a 1 ms ticker publishes whatever is due, and nothing
//!    scheduled after the window); by default half of what livemesh
//!    delivered in the saturation window of the same layout, in events
//!    (deliveries per second / streams per room; at least one event per
//!    window), and NATS is offered the very same rate. The headline
//!    `latency_p50_ms` / `latency_p99_ms` come from here (the worse of the
//!    two layouts). This process receives every delivery on the same
//!    cores, so its own queueing is part of what it measures, on both
//!    sides alike.
//!
//! Every event carries its send time (nanoseconds since the Unix epoch,
//! read just before the Publish call): in the comment's text on livemesh,
//! at the start of a payload padded to the size of the encoded `RoomEvent`
//! on NATS. A receiver subtracts it from its own clock (same machine) into a
//! shared histogram of 0.1 ms buckets up to 10 s; a receive loop costs a few
//! atomic increments per event, so 100,000 of them stay cheap.
//!
//! Where the time goes, per delivery in each saturation window: CPU
//! seconds of the server (the node; nats-server when `scripts/bench`
//! exported its pid) and of this process from `/proc/PID/stat`, and the
//! server's write syscalls from `/proc/PID/io` (how many deliveries share
//! one write).
//!
//! A side that fails (a ready check not met, streams lost) fails the run
//! when it is livemesh; when it is NATS (whose subscriptions, hundreds of
//! thousands in this one process, can fall behind and have messages dropped
//! as slow consumers) the reason and the slow-consumer count are printed and
//! NATS's figures for that layout are left out.
//!
//! `--duration` is split evenly over the measurement windows (saturation
//! and paced, per layout and side); starting nodes and rooms, opening
//! streams, waiting for a stable RSS and draining come on top and are
//! printed. Both sides share the machine's cores with this process, which
//! also decodes every delivery.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use futures::StreamExt as _;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::subscribe_response::Message;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{
    Comment, PublishRequest, RoomEvent, StartRoomRequest, SubscribeRequest, room_event,
};
use prost::Message as _;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::{storm, write_json};

/// Options of `bench fanout`.
#[derive(Debug, clap::Args)]
pub struct FanoutArgs {
    /// Write the figures as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Seconds of measurement, split evenly over the saturation and paced
    /// windows of each layout and side (set-up comes on top).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Concurrent Subscribe streams (and NATS subscriptions).
    #[arg(long, default_value_t = 10_000)]
    pub streams: u64,
    /// HTTP/2 connections the streams are multiplexed over (and NATS
    /// connections the subscriptions are spread over). Default: 64, or one
    /// per 10,000 streams when that is more.
    #[arg(long)]
    pub connections: Option<u64>,
    /// Layouts to measure (repeat or comma-separate). Default: all three.
    #[arg(long = "layout", value_enum, value_delimiter = ',')]
    pub layouts: Vec<LayoutKind>,
    /// Storm: viewers of the first level.
    #[arg(long, default_value_t = 1_000)]
    pub storm_start: u64,
    /// Storm: the most viewers tried. Default: --streams.
    #[arg(long)]
    pub storm_max: Option<u64>,
    /// Storm: seconds of each level's measured window (after a 1 s warm-up).
    #[arg(long, default_value_t = 2.0)]
    pub storm_window: f64,
    /// Rooms of the many-rooms layout. Default: streams / 100.
    #[arg(long)]
    pub rooms: Option<u64>,
    /// Events per second of the paced (latency) windows. Default: half of
    /// what livemesh reached in the saturation window of the same layout.
    #[arg(long, value_name = "EVENTS_PER_SEC")]
    pub rate: Option<f64>,
    /// Deliveries kept in flight while saturating, in whole fan-outs of
    /// `--streams` deliveries.
    #[arg(long, default_value_t = 1)]
    pub in_flight: u64,
    /// Concurrent publishers sharing that window.
    #[arg(long, default_value_t = 8)]
    pub publishers: usize,
    /// NATS server to compare with. Default: LIVEMESH_TEST_NATS_URL (set by
    /// `scripts/bench fanout`, which starts a private nats-server).
    #[arg(long, value_name = "URL")]
    pub nats_url: Option<String>,
    /// Measure one side only (no ratio).
    #[arg(long, value_enum)]
    pub only: Option<Only>,
}

/// The layouts of `bench fanout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LayoutKind {
    /// Every stream in one room.
    Hot,
    /// The streams spread over `--rooms` rooms.
    Many,
    /// One room in a comment storm, ramping viewers up.
    Storm,
}

/// Streams per connection past which the default adds connections.
const STREAMS_PER_CONNECTION: u64 = 10_000;

impl FanoutArgs {
    /// `--connections`, or its default for `--streams`.
    pub(super) fn connections(&self) -> u64 {
        self.connections
            .unwrap_or_else(|| self.streams.div_ceil(STREAMS_PER_CONNECTION).max(64))
    }

    fn layout_kinds(&self) -> Vec<LayoutKind> {
        if self.layouts.is_empty() {
            vec![LayoutKind::Hot, LayoutKind::Many, LayoutKind::Storm]
        } else {
            self.layouts.clone()
        }
    }
}

/// The side `--only` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Only {
    Livemesh,
    Nats,
}

/// Where the node takes its per-connection stream limit from
/// (`subscribe.max_streams_per_connection`), and its default.
const MAX_STREAMS_ENV: &str = "LIVEMESH_SUBSCRIBE__MAX_STREAMS_PER_CONNECTION";
const MAX_STREAMS_DEFAULT: u64 = 100_000;
/// Subscribe calls waiting for their `started` message at once.
pub(super) const OPEN_CONCURRENCY: usize = 512;
/// Times one Subscribe is retried after UNAVAILABLE while opening.
const OPEN_RETRIES: u64 = 20;
/// Latency histogram: 0.1 ms buckets up to 10 s, then one overflow bucket.
const BUCKET_NS: u64 = 100_000;
const BUCKETS: usize = 100_000;
/// The viewer who writes the bench's comments.
pub(super) const PUBLISHER_VIEWER: u64 = 1;

/// One way to lay the streams out over rooms.
struct Layout {
    key: &'static str,
    label: String,
    /// Streams per room; stream `i` is in room `i % counts.len()`.
    counts: Arc<Vec<i64>>,
}

impl Layout {
    fn new(key: &'static str, label: String, streams: u64, rooms: u64) -> Self {
        let counts = (0..rooms)
            .map(|r| (streams / rooms + u64::from(r < streams % rooms)) as i64)
            .collect();
        Self {
            key,
            label,
            counts: Arc::new(counts),
        }
    }

    fn rooms(&self) -> usize {
        self.counts.len()
    }
}

/// What one measurement window found.
#[derive(Debug, Clone, Copy, Default)]
struct Window {
    events_per_s: f64,
    delivered_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Deliveries still missing when the drain gave up.
    undelivered: i64,
    /// CPU time per delivery during the window, in microseconds: of the
    /// server (the node; nats-server when its pid is known) and of this
    /// process, which decodes every delivery.
    server_cpu_us: f64,
    client_cpu_us: f64,
    /// The server's write syscalls per 1,000 deliveries (`syscw` of
    /// `/proc/PID/io`): how well it batches frames into writes.
    server_writes_per_k: f64,
}

/// CPU seconds a process has used so far (user + system).
fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".into(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // /proc reports in USER_HZ, 100 on Linux.
    Some(ticks as f64 / 100.0)
}

/// Write syscalls a process has made so far.
fn write_syscalls(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("syscw:"))?
        .trim()
        .parse()
        .ok()
}

/// CPU use of the server and of this process, and the server's write
/// syscalls, over a window.
pub(super) struct CpuMeter {
    server_pid: Option<u32>,
    server: Option<f64>,
    client: Option<f64>,
    writes: Option<u64>,
}

impl CpuMeter {
    pub(super) fn start(server_pid: Option<u32>) -> Self {
        Self {
            server_pid,
            server: server_pid.and_then(|pid| cpu_seconds(Some(pid))),
            client: cpu_seconds(None),
            writes: server_pid.and_then(write_syscalls),
        }
    }

    /// The server's write syscalls per 1,000 deliveries; NaN when unknown.
    fn writes_per_k(&self, delivered: u64) -> f64 {
        match (self.writes, self.server_pid.and_then(write_syscalls)) {
            (Some(before), Some(now)) if delivered > 0 => {
                (now - before) as f64 * 1e3 / delivered as f64
            }
            _ => f64::NAN,
        }
    }

    /// Microseconds of CPU per delivery: (server, client); NaN when unknown.
    pub(super) fn per_delivery(&self, delivered: u64) -> (f64, f64) {
        let per = |before: Option<f64>, now: Option<f64>| match (before, now) {
            (Some(b), Some(n)) if delivered > 0 => (n - b) * 1e6 / delivered as f64,
            _ => f64::NAN,
        };
        (
            per(
                self.server,
                self.server_pid.and_then(|p| cpu_seconds(Some(p))),
            ),
            per(self.client, cpu_seconds(None)),
        )
    }
}

/// One side in one layout.
#[derive(Debug, Clone, Copy, Default)]
struct Measured {
    open_s: f64,
    saturated: Window,
    paced: Window,
    rate: f64,
    /// livemesh only: the node's RSS growth per open, idle stream.
    bytes_per_idle_stream: Option<f64>,
    rss_base: Option<u64>,
    rss_open: Option<u64>,
    settled: bool,
    /// Streams that ended (or subscriptions that dropped messages) early.
    lost_streams: u64,
}

pub async fn run(args: FanoutArgs) -> anyhow::Result<()> {
    ensure!(
        args.streams > 0 && args.connections() > 0 && args.publishers > 0 && args.in_flight > 0,
        "--streams, --connections, --publishers and --in-flight must be positive"
    );
    ensure!(
        args.storm_start > 0 && args.storm_window > 0.0,
        "--storm-start and --storm-window must be positive"
    );
    ensure!(args.duration >= 4, "--duration must be at least 4");
    let rooms = args.rooms.unwrap_or((args.streams / 100).max(1));
    ensure!(
        (1..=args.streams).contains(&rooms),
        "--rooms must be 1..=--streams"
    );
    if let Some(rate) = args.rate {
        ensure!(rate > 0.0, "--rate must be positive");
    }
    let livemesh = args.only != Some(Only::Nats);
    let nats_url = if args.only == Some(Only::Livemesh) {
        None
    } else {
        Some(match args.nats_url.clone() {
            Some(url) => url,
            None => std::env::var("LIVEMESH_TEST_NATS_URL")
                .ok()
                .filter(|u| !u.is_empty())
                .context(
                    "bench fanout compares with NATS: run it as `scripts/bench fanout` (which \
                     starts a private nats-server), pass --nats-url, or use --only livemesh",
                )?,
        })
    };
    let sides = usize::from(livemesh) + usize::from(nats_url.is_some());
    let kinds = args.layout_kinds();
    let mut layouts = Vec::new();
    if kinds.contains(&LayoutKind::Hot) {
        layouts.push(Layout::new("hot", "one hot room".into(), args.streams, 1));
    }
    if kinds.contains(&LayoutKind::Many) {
        layouts.push(Layout::new(
            "many",
            format!("{rooms} rooms"),
            args.streams,
            rooms,
        ));
    }
    let window = Duration::from_secs(args.duration) / (layouts.len().max(1) * sides * 2) as u32;
    let mut payload = estimated_event_len();
    let compared = match (livemesh, nats_url.is_some()) {
        (true, true) => "livemesh (one node) vs NATS",
        (true, false) => "livemesh only (one node)",
        _ => "NATS only",
    };
    println!(
        "bench fanout, {compared}: {} streams over {} connections; {} rooms in the many-rooms \
         layout; {} windows of {:.2} s; saturation keeps {} fan-out(s) in flight from {} \
         publishers; paced rate {}",
        args.streams,
        args.connections(),
        rooms,
        layouts.len() * sides * 2,
        window.as_secs_f64(),
        args.in_flight,
        args.publishers,
        args.rate.map_or(
            "half the saturated rate (livemesh's when measured)".into(),
            |r| { format!("{r} events/s") }
        ),
    );

    if let Some(url) = &nats_url {
        let client = nats_connect(url, &Arc::new(AtomicU64::new(0))).await?;
        let info = client.server_info();
        println!(
            "  NATS: nats-server {} (go {}) at {url}",
            info.version, info.go
        );
    }
    let load_before = load_average();
    let mut results = Vec::new();
    for layout in &layouts {
        let lm = if livemesh {
            let m = run_livemesh(&args, layout, window, &mut payload)
                .await
                .with_context(|| format!("livemesh, {}", layout.label))?;
            Some(m)
        } else {
            None
        };
        let rate = args.rate.or(lm.map(|m| m.rate));
        // The peer failing (e.g. dropping messages to slow consumers at a
        // million subscriptions in this one process) leaves its figures
        // out; it does not throw away livemesh's.
        let nats = match &nats_url {
            Some(url) => match run_nats(&args, url, layout, window, payload, rate).await {
                Ok(m) => Some(m),
                Err(err) => {
                    println!(
                        "  NATS, {}: failed, its figures are left out: {err:#}",
                        layout.label
                    );
                    None
                }
            },
            None => None,
        };
        results.push((layout, lm, nats));
    }
    let mut storms = (None, None);
    if kinds.contains(&LayoutKind::Storm) {
        let settings = storm::settings(&args, args.connections());
        println!(
            "  storm: one room, {:.0} comments/s + {} love totals/s + {} viewer count/s; \
             livemesh viewers accept batches, NATS gets a message each; viewers from {} \
             doubling up to {}, then bisected; a level passes at p99 <= {} ms with nothing lost",
            storm::COMMENTS_PER_S,
            storm::TOTALS_PER_S,
            storm::COUNTS_PER_S,
            settings.start,
            settings.max,
            storm::STORM_P99_MS,
        );
        if livemesh {
            storms.0 = Some(storm::livemesh(&settings).await?);
        }
        if let Some(url) = &nats_url {
            storms.1 = Some(storm::nats(&settings, url, payload).await?);
        }
    }

    let load = (load_before, load_average());
    print_and_save(&args, rooms, payload, window, load, &results, &storms)
}

// ---------------------------------------------------------------------------
// Receivers' shared counters.

/// What every receiver of one side reports into.
pub(super) struct Recorder {
    pub(super) delivered: AtomicU64,
    /// Deliveries published but not yet received.
    pub(super) outstanding: AtomicI64,
    /// While saturating: publishers wait while `outstanding >= limit`.
    limit: AtomicI64,
    wake: Notify,
    histogram: Box<[AtomicU64]>,
    /// Streams that ended before the bench closed them.
    pub(super) ended: AtomicU64,
    first_end: Mutex<Option<String>>,
    /// livemesh: the encoded size of a received comment event.
    event_len: AtomicUsize,
}

impl Recorder {
    pub(super) fn new() -> Arc<Self> {
        Arc::new(Self {
            delivered: AtomicU64::new(0),
            outstanding: AtomicI64::new(0),
            limit: AtomicI64::new(i64::MAX),
            wake: Notify::new(),
            histogram: (0..=BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            ended: AtomicU64::new(0),
            first_end: Mutex::new(None),
            event_len: AtomicUsize::new(0),
        })
    }

    /// One event received, sent at `sent_ns`.
    pub(super) fn received(&self, sent_ns: u64) {
        let latency = now_ns().saturating_sub(sent_ns);
        let bucket = ((latency / BUCKET_NS) as usize).min(BUCKETS);
        self.histogram[bucket].fetch_add(1, Ordering::Relaxed);
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

    pub(super) fn reset_histogram(&self) {
        for bucket in &self.histogram {
            bucket.store(0, Ordering::Relaxed);
        }
    }

    /// The `q` quantile of the histogram in milliseconds (bucket upper bound).
    pub(super) fn quantile_ms(&self, q: f64) -> f64 {
        let counts: Vec<u64> = self
            .histogram
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return f64::NAN;
        }
        let rank = ((total as f64 * q).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, count) in counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return ((i as u64 + 1) * BUCKET_NS) as f64 / 1e6;
            }
        }
        (BUCKETS as u64 * BUCKET_NS) as f64 / 1e6
    }

    /// Waits until `outstanding` is below `limit` and adds `fanout` to it;
    /// false once `stop` has passed.
    async fn acquire(&self, fanout: i64, limit: i64, stop: Instant) -> bool {
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

/// The machine's 1-minute load average (NaN if unknown).
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

pub(super) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
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
fn estimated_event_len() -> usize {
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

// ---------------------------------------------------------------------------
// Publishing, the same windows for both sides.

enum Target {
    Livemesh {
        client: PublishServiceClient<Channel>,
        rooms: Vec<u64>,
    },
    Nats {
        client: async_nats::Client,
        subjects: Vec<String>,
        payload: usize,
    },
}

impl Target {
    /// Publishes one comment to room index `room`, stamped with the time
    /// just before the call.
    async fn publish(&self, room: usize) -> anyhow::Result<()> {
        match self {
            Target::Livemesh { client, rooms } => {
                let sent = now_ns();
                let request = PublishRequest {
                    room_id: rooms[room],
                    event: Some(RoomEvent {
                        kind: Some(room_event::Kind::Comment(Comment {
                            viewer_id: PUBLISHER_VIEWER,
                            text: sent.to_string(),
                        })),
                        ..RoomEvent::default()
                    }),
                    ..PublishRequest::default()
                };
                client
                    .clone()
                    .publish(request)
                    .await
                    .map_err(|status| anyhow::anyhow!("Publish failed: {status}"))?;
            }
            Target::Nats {
                client,
                subjects,
                payload,
            } => {
                let sent = now_ns();
                let mut body = sent.to_string().into_bytes();
                body.resize((*payload).max(body.len()), b' ');
                client
                    .publish(subjects[room].clone(), body.into())
                    .await
                    .context("NATS publish")?;
            }
        }
        Ok(())
    }

    /// Publishes to `room` with its fan-out already counted as outstanding;
    /// takes it back if the publish fails.
    async fn publish_counted(
        &self,
        rec: &Recorder,
        room: usize,
        fanout: i64,
    ) -> anyhow::Result<()> {
        let result = self.publish(room).await;
        if result.is_err() {
            rec.outstanding.fetch_sub(fanout, Ordering::AcqRel);
        }
        result
    }
}

/// How long a drain may take before deliveries count as missing.
fn drain_limit(streams: u64) -> Duration {
    Duration::from_secs(10) + Duration::from_micros(streams * 100)
}

/// The ready check, the saturation window and the paced window.
async fn measure_windows(
    args: &FanoutArgs,
    server_pid: Option<u32>,
    target: Arc<Target>,
    rec: &Arc<Recorder>,
    counts: &Arc<Vec<i64>>,
    window: Duration,
    rate: Option<f64>,
) -> anyhow::Result<(Window, Window, f64)> {
    // Ready check: one event per room must reach every stream.
    let total: i64 = counts.iter().sum();
    for (room, &fanout) in counts.iter().enumerate() {
        rec.outstanding.fetch_add(fanout, Ordering::AcqRel);
        target.publish_counted(rec, room, fanout).await?;
    }
    let missing = rec.drain(drain_limit(args.streams)).await;
    if missing > 0 {
        bail!(
            "ready check: {missing} of {total} deliveries did not arrive within {:.0} s ({} streams ended{})",
            drain_limit(args.streams).as_secs_f64(),
            rec.ended.load(Ordering::Relaxed),
            first_end(rec)
        );
    }

    let limit = (args.in_flight * args.streams) as i64;
    let saturated = saturate(args, server_pid, &target, rec, counts, window, limit).await?;
    // Half the events per second the deliveries came to (at least one
    // event per window).
    let mean_fanout = total as f64 / counts.len() as f64;
    let rate = rate
        .unwrap_or((saturated.delivered_per_s / mean_fanout / 2.0).max(1.0 / window.as_secs_f64()));
    let paced = paced(args, server_pid, &target, rec, counts, window, rate).await?;
    Ok((saturated, paced, rate))
}

async fn saturate(
    args: &FanoutArgs,
    server_pid: Option<u32>,
    target: &Arc<Target>,
    rec: &Arc<Recorder>,
    counts: &Arc<Vec<i64>>,
    window: Duration,
    limit: i64,
) -> anyhow::Result<Window> {
    rec.reset_histogram();
    rec.limit.store(limit, Ordering::Release);
    let started = Instant::now();
    let stop = started + window;
    let delivered_before = rec.delivered.load(Ordering::Acquire);
    let cpu = CpuMeter::start(server_pid);
    let events = Arc::new(AtomicU64::new(0));
    let next_room = Arc::new(AtomicUsize::new(0));
    let mut publishers = JoinSet::new();
    for _ in 0..args.publishers {
        let (target, rec, counts) = (target.clone(), rec.clone(), counts.clone());
        let (events, next_room) = (events.clone(), next_room.clone());
        publishers.spawn(async move {
            loop {
                let room = next_room.fetch_add(1, Ordering::Relaxed) % counts.len();
                let fanout = counts[room];
                if !rec.acquire(fanout, limit, stop).await {
                    return anyhow::Ok(());
                }
                // Counted when sent: a Publish may answer after the window.
                events.fetch_add(1, Ordering::Relaxed);
                target.publish_counted(&rec, room, fanout).await?;
            }
        });
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(stop)).await;
    let delivered = rec.delivered.load(Ordering::Acquire) - delivered_before;
    let elapsed = started.elapsed().as_secs_f64();
    let (server_cpu_us, client_cpu_us) = cpu.per_delivery(delivered);
    let server_writes_per_k = cpu.writes_per_k(delivered);
    let published = events.load(Ordering::Acquire);
    while let Some(joined) = publishers.join_next().await {
        joined??;
    }
    rec.limit.store(i64::MAX, Ordering::Release);
    let undelivered = rec.drain(drain_limit(args.streams)).await;
    Ok(Window {
        events_per_s: published as f64 / elapsed,
        delivered_per_s: delivered as f64 / elapsed,
        p50_ms: rec.quantile_ms(0.50),
        p99_ms: rec.quantile_ms(0.99),
        undelivered,
        server_cpu_us,
        client_cpu_us,
        server_writes_per_k,
    })
}

async fn paced(
    args: &FanoutArgs,
    server_pid: Option<u32>,
    target: &Arc<Target>,
    rec: &Arc<Recorder>,
    counts: &Arc<Vec<i64>>,
    window: Duration,
    rate: f64,
) -> anyhow::Result<Window> {
    rec.reset_histogram();
    let started = Instant::now();
    let stop = started + window;
    let delivered_before = rec.delivered.load(Ordering::Acquire);
    let cpu = CpuMeter::start(server_pid);
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut calls = JoinSet::new();
    let mut sent = 0_u64;
    let scheduled = (window.as_secs_f64() * rate).ceil().max(1.0) as u64;
    while Instant::now() < stop && sent < scheduled {
        ticker.tick().await;
        // Event k is due at k / rate; none scheduled past the window (a
        // tick can come late when this process is busy receiving).
        let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(scheduled);
        while sent < due {
            let room = sent as usize % counts.len();
            let fanout = counts[room];
            rec.outstanding.fetch_add(fanout, Ordering::AcqRel);
            let (target, rec) = (target.clone(), rec.clone());
            calls.spawn(async move { target.publish_counted(&rec, room, fanout).await });
            sent += 1;
        }
        while let Some(joined) = calls.try_join_next() {
            joined??;
        }
    }
    tokio::time::sleep_until(tokio::time::Instant::from_std(stop)).await;
    let delivered = rec.delivered.load(Ordering::Acquire) - delivered_before;
    let elapsed = started.elapsed().as_secs_f64();
    let (server_cpu_us, client_cpu_us) = cpu.per_delivery(delivered);
    let server_writes_per_k = cpu.writes_per_k(delivered);
    while let Some(joined) = calls.join_next().await {
        joined??;
    }
    let undelivered = rec.drain(drain_limit(args.streams)).await;
    Ok(Window {
        events_per_s: sent as f64 / elapsed,
        delivered_per_s: delivered as f64 / elapsed,
        p50_ms: rec.quantile_ms(0.50),
        p99_ms: rec.quantile_ms(0.99),
        undelivered,
        server_cpu_us,
        client_cpu_us,
        server_writes_per_k,
    })
}

fn first_end(rec: &Recorder) -> String {
    rec.first_end
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_ref()
        .map(|why| format!("; the first: {why}"))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// livemesh.

/// `livemesh up` as a child process on a fresh data dir.
pub(super) struct Node {
    child: tokio::process::Child,
    pub(super) pid: u32,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    pub(super) async fn start(streams_per_connection: u64) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let addr = {
            let probe = std::net::TcpListener::bind(("127.0.0.1", 0))?;
            probe.local_addr()?
        };
        let log = dir.path().join("node.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command
            .arg("up")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--log")
            .arg("warn")
            // Several nodes on one machine: each its own metrics port.
            .arg("--metrics-listen")
            .arg("127.0.0.1:0")
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        if streams_per_connection > MAX_STREAMS_DEFAULT {
            command.env(MAX_STREAMS_ENV, (streams_per_connection + 16).to_string());
        }
        let child = command.spawn().context("starting `livemesh up`")?;
        let pid = child.id().context("the node exited at once")?;
        let mut node = Self {
            child,
            pid,
            addr,
            log,
            _dir: dir,
        };
        node.wait_serving().await?;
        Ok(node)
    }

    pub(super) fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("`livemesh up` exited with {status}{}", self.log_tail());
            }
            if let Ok(channel) = Endpoint::from_shared(self.uri())?.connect().await {
                let reply = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if reply.is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!("`livemesh up` not serving after 30 s{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its log ends:\n{tail}")
        }
    }

    fn rss(&self) -> anyhow::Result<u64> {
        rss_bytes(self.pid)
    }

    /// The RSS once two samples 500 ms apart agree (within 1 MiB or 0.5%),
    /// for at most 15 s; whether it settled.
    async fn settled_rss(&self) -> anyhow::Result<(u64, bool)> {
        let mut previous = self.rss()?;
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let current = self.rss()?;
            if current.abs_diff(previous) <= (1 << 20).max(current / 200) {
                return Ok((current, true));
            }
            previous = current;
        }
        Ok((previous, false))
    }

    pub(super) async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "`livemesh up` exited during the bench with {status}{}",
                self.log_tail()
            );
        }
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .with_context(|| format!("{path} has no VmRSS"))
}

/// One BFF-like HTTP/2 connection.
pub(super) async fn connect(uri: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(uri.to_owned())?
        .initial_connection_window_size(16 << 20)
        .initial_stream_window_size(1 << 20)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {uri}"))
}

/// Streams that are being opened: how many made it, the first failure.
#[derive(Default)]
pub(super) struct Opening {
    opened: AtomicU64,
    /// Subscribe calls retried after UNAVAILABLE.
    retried: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Opening {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert(why);
    }

    /// Waits until `n` streams opened; fails on the first failure or after `limit`.
    pub(super) async fn wait(&self, n: u64, limit: Duration, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let (opened, failed) = (
                self.opened.load(Ordering::Acquire),
                self.failed.load(Ordering::Acquire),
            );
            if failed > 0 {
                let why = self
                    .first_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
                    .unwrap_or_default();
                bail!("{failed} {what} failed to open ({opened} of {n} open); the first: {why}");
            }
            if opened >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "only {opened} of {n} {what} open after {:.0} s",
                    limit.as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

pub(super) fn open_limit(streams: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(streams)
}

/// One viewer's stream: open it, report `started`, then count events.
pub(super) async fn viewer(
    mut client: SubscribeServiceClient<Channel>,
    request: SubscribeRequest,
    rec: Arc<Recorder>,
    opening: Arc<Opening>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    // UNAVAILABLE says "retry shortly" (a room lookup or the store was
    // slow while the node opens hundreds of thousands of streams): a
    // client does, with a pause; the retries are counted and printed.
    let mut tries = 0;
    let mut stream = loop {
        match client.subscribe(request).await {
            Ok(reply) => break reply.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable && tries < OPEN_RETRIES => {
                tries += 1;
                opening.retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100 * tries)).await;
            }
            Err(status) => return opening.fail(format!("Subscribe: {status}")),
        }
    };
    match stream.message().await {
        Ok(Some(first)) if matches!(first.message, Some(Message::Started(_))) => {
            opening.opened.fetch_add(1, Ordering::Release);
        }
        Ok(Some(first)) => {
            return opening.fail(format!(
                "the first message was not `started`: {:?}",
                first.message
            ));
        }
        Ok(None) => return opening.fail("the stream ended before `started`".into()),
        Err(status) => return opening.fail(format!("Subscribe stream: {status}")),
    }
    drop(permit);
    let comment = |event: &RoomEvent| {
        if let Some(room_event::Kind::Comment(comment)) = &event.kind
            && let Some(sent) = parse_sent(comment.text.as_bytes())
        {
            if rec.event_len.load(Ordering::Relaxed) == 0 {
                rec.event_len.store(event.encoded_len(), Ordering::Relaxed);
            }
            rec.received(sent);
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(reply)) => match &reply.message {
                Some(Message::Event(event)) => comment(event),
                Some(Message::Batch(batch)) => batch.events.iter().for_each(comment),
                _ => {}
            },
            Ok(None) => return rec.stream_ended("the server ended a stream".into()),
            Err(status) => return rec.stream_ended(format!("a stream failed: {status}")),
        }
    }
}

async fn run_livemesh(
    args: &FanoutArgs,
    layout: &Layout,
    window: Duration,
    payload: &mut usize,
) -> anyhow::Result<Measured> {
    let connections = args.connections() as usize;
    let per_connection = args.streams.div_ceil(args.connections());
    let node = Node::start(per_connection).await?;
    let uri = node.uri();
    let control = connect(&uri).await?;
    let mut admin = RoomAdminServiceClient::new(control.clone());
    let mut room_ids = Vec::with_capacity(layout.rooms());
    for anchor in 0..layout.rooms() as u64 {
        let room = admin
            .start_room(StartRoomRequest {
                anchor_id: 1_000 + anchor,
            })
            .await
            .map_err(|s| anyhow::anyhow!("StartRoom: {s}"))?
            .into_inner()
            .room
            .context("StartRoom returned no room")?;
        room_ids.push(room.room_id);
    }
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(connect(&uri).await?);
    }

    // Warm-up: one stream per room, opened and closed.
    let rec = Recorder::new();
    {
        let opening = Arc::new(Opening::default());
        let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
        let mut warm = JoinSet::new();
        for (r, &room_id) in room_ids.iter().enumerate() {
            let permit = gate.clone().acquire_owned().await?;
            warm.spawn(viewer(
                SubscribeServiceClient::new(channels[r % connections].clone()),
                SubscribeRequest {
                    room_id,
                    viewer_id: 100_000_000 + r as u64,
                    ..SubscribeRequest::default()
                },
                rec.clone(),
                opening.clone(),
                permit,
            ));
        }
        opening
            .wait(
                room_ids.len() as u64,
                open_limit(room_ids.len() as u64),
                "warm-up streams",
            )
            .await?;
        warm.shutdown().await;
    }
    let (rss_base, base_settled) = node.settled_rss().await?;

    // The streams.
    let opening = Arc::new(Opening::default());
    let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    let mut streams = JoinSet::new();
    let opened_at = Instant::now();
    for i in 0..args.streams {
        let permit = gate.clone().acquire_owned().await?;
        streams.spawn(viewer(
            SubscribeServiceClient::new(channels[i as usize % connections].clone()),
            SubscribeRequest {
                room_id: room_ids[i as usize % room_ids.len()],
                viewer_id: 1_000_000 + i,
                ..SubscribeRequest::default()
            },
            rec.clone(),
            opening.clone(),
            permit,
        ));
        if opening.failed.load(Ordering::Relaxed) > 0 {
            break;
        }
    }
    opening
        .wait(args.streams, open_limit(args.streams), "Subscribe streams")
        .await?;
    let open_s = opened_at.elapsed().as_secs_f64();
    let retried = opening.retried.load(Ordering::Relaxed);
    if retried > 0 {
        println!(
            "  livemesh, {}: {retried} Subscribe calls answered UNAVAILABLE while opening and were retried",
            layout.label
        );
    }
    let (rss_open, open_settled) = node.settled_rss().await?;
    let per_stream = (rss_open as f64 - rss_base as f64) / args.streams as f64;
    println!(
        "  livemesh, {}: {} streams open in {open_s:.1} s ({:.0}/s); node RSS {} -> {} MiB{}: {per_stream:.0} B per idle stream",
        layout.label,
        args.streams,
        args.streams as f64 / open_s,
        rss_base >> 20,
        rss_open >> 20,
        if base_settled && open_settled {
            ""
        } else {
            " (not settled after 15 s)"
        },
    );

    let target = Arc::new(Target::Livemesh {
        client: PublishServiceClient::new(control.clone()),
        rooms: room_ids,
    });
    let (saturated, paced, rate) = measure_windows(
        args,
        Some(node.pid),
        target,
        &rec,
        &layout.counts,
        window,
        args.rate,
    )
    .await?;
    let seen = rec.event_len.load(Ordering::Relaxed);
    if seen > 0 {
        *payload = seen;
    }
    let lost_streams = rec.ended.load(Ordering::Relaxed);
    if lost_streams > 0 {
        println!(
            "  livemesh, {}: {lost_streams} streams ended early{}",
            layout.label,
            first_end(&rec)
        );
    }
    streams.shutdown().await;
    drop(channels);
    node.stop().await?;
    Ok(Measured {
        open_s,
        saturated,
        paced,
        rate,
        bytes_per_idle_stream: Some(per_stream),
        rss_base: Some(rss_base),
        rss_open: Some(rss_open),
        settled: base_settled && open_settled,
        lost_streams,
    })
}

// ---------------------------------------------------------------------------
// NATS.

pub(super) async fn nats_connect(
    url: &str,
    slow: &Arc<AtomicU64>,
) -> anyhow::Result<async_nats::Client> {
    let slow = slow.clone();
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .subscription_capacity(4_096)
        .event_callback(move |event| {
            let slow = slow.clone();
            async move {
                if matches!(event, async_nats::Event::SlowConsumer(_)) {
                    slow.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

/// nats-server's pid, when `scripts/bench fanout` started it.
pub(super) fn nats_pid() -> Option<u32> {
    std::env::var("LIVEMESH_TEST_NATS_PID").ok()?.parse().ok()
}

async fn run_nats(
    args: &FanoutArgs,
    url: &str,
    layout: &Layout,
    window: Duration,
    payload: usize,
    rate: Option<f64>,
) -> anyhow::Result<Measured> {
    let slow = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::with_capacity(args.connections() as usize);
    for _ in 0..args.connections() {
        clients.push(nats_connect(url, &slow).await?);
    }
    let publisher = nats_connect(url, &slow).await?;
    let subjects: Vec<String> = (1..=layout.rooms()).map(|r| format!("room.{r}")).collect();
    let rec = Recorder::new();
    let mut receivers = JoinSet::new();
    let opened_at = Instant::now();
    let running = Arc::new(AtomicBool::new(true));
    // Subscriptions that have seen a message (a probe, at the latest).
    let ready = Arc::new(AtomicU64::new(0));
    for i in 0..args.streams as usize {
        let client = &clients[i % clients.len()];
        let mut subscriber = client
            .subscribe(subjects[i % subjects.len()].clone())
            .await
            .context("NATS subscribe")?;
        let (rec, running, ready) = (rec.clone(), running.clone(), ready.clone());
        receivers.spawn(async move {
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
            if running.load(Ordering::Relaxed) {
                rec.stream_ended("a NATS subscription ended".into());
            }
        });
    }
    // A subscription is open once the server routes to it; async-nats's
    // flush only writes the buffer out (no PING/PONG round trip), so probes
    // (not counted: no send time in them) go to every room until every
    // subscription has seen one.
    for client in &clients {
        client.flush().await.context("NATS flush")?;
    }
    let deadline = Instant::now() + open_limit(args.streams);
    while ready.load(Ordering::Acquire) < args.streams {
        ensure!(
            Instant::now() < deadline,
            "only {} of {} NATS subscriptions got a probe within {:.0} s",
            ready.load(Ordering::Acquire),
            args.streams,
            open_limit(args.streams).as_secs_f64()
        );
        for subject in &subjects {
            publisher
                .publish(subject.clone(), "probe".into())
                .await
                .context("NATS publish")?;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let open_s = opened_at.elapsed().as_secs_f64();
    println!(
        "  NATS, {}: {} subscriptions in {open_s:.1} s ({:.0}/s); payload {payload} B",
        layout.label,
        args.streams,
        args.streams as f64 / open_s
    );
    let target = Arc::new(Target::Nats {
        client: publisher,
        subjects,
        payload,
    });
    let measured =
        measure_windows(args, nats_pid(), target, &rec, &layout.counts, window, rate).await;
    let (saturated, paced, rate) = measured.with_context(|| {
        format!(
            "{} slow-consumer events (messages the server dropped)",
            slow.load(Ordering::Relaxed)
        )
    })?;
    running.store(false, Ordering::Relaxed);
    receivers.shutdown().await;
    let slow = slow.load(Ordering::Relaxed);
    if slow > 0 {
        println!(
            "  NATS, {}: {slow} slow-consumer events (messages dropped)",
            layout.label
        );
    }
    Ok(Measured {
        open_s,
        saturated,
        paced,
        rate,
        lost_streams: rec.ended.load(Ordering::Relaxed) + slow,
        ..Measured::default()
    })
}

// ---------------------------------------------------------------------------
// Report.

fn print_and_save(
    args: &FanoutArgs,
    rooms: u64,
    payload: usize,
    window: Duration,
    load: (f64, f64),
    results: &[(&Layout, Option<Measured>, Option<Measured>)],
    storms: &(Option<storm::Storm>, Option<storm::Storm>),
) -> anyhow::Result<()> {
    println!(
        "  machine load average (1 min) before {:.1}, after {:.1}, on {} cores: other work \
         shares them with the servers and this process",
        load.0,
        load.1,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "  {:<14} {:<9} {:>8} {:>12} {:>8} {:>8} {:>10} {:>8} {:>8} {:>10}",
        "layout",
        "side",
        "open s",
        "delivered/s",
        "sat p50",
        "sat p99",
        "paced ev/s",
        "p50 ms",
        "p99 ms",
        "B/idle str"
    );
    for (layout, lm, nats) in results {
        for (side, m) in [("livemesh", lm), ("NATS", nats)] {
            let Some(m) = m else { continue };
            println!(
                "  {:<14} {:<9} {:>8.1} {:>12.0} {:>8.1} {:>8.1} {:>10.1} {:>8.1} {:>8.1} {:>10}",
                layout.label,
                side,
                m.open_s,
                m.saturated.delivered_per_s,
                m.saturated.p50_ms,
                m.saturated.p99_ms,
                m.paced.events_per_s,
                m.paced.p50_ms,
                m.paced.p99_ms,
                m.bytes_per_idle_stream
                    .map_or("-".into(), |b| format!("{b:.0}")),
            );
        }
    }

    println!(
        "  while saturating, per delivery: CPU µs of the server and of this process \
         (decoding); the server's write syscalls per 1,000"
    );
    for (layout, lm, nats) in results {
        for (side, m) in [("livemesh", lm), ("NATS", nats)] {
            let Some(m) = m else { continue };
            println!(
                "  {:<14} {:<9} server {:>6.2}  bench client {:>6.2}  writes {:>7.1}",
                layout.label,
                side,
                m.saturated.server_cpu_us,
                m.saturated.client_cpu_us,
                m.saturated.server_writes_per_k
            );
        }
    }

    let mut figures: BTreeMap<String, f64> = BTreeMap::new();
    let mut put = |key: String, value: f64| {
        figures.insert(key, value);
    };
    put("streams".into(), args.streams as f64);
    put("connections".into(), args.connections() as f64);
    put("rooms".into(), rooms as f64);
    put("payload_bytes".into(), payload as f64);
    put("window_s".into(), window.as_secs_f64());
    put("in_flight_fanouts".into(), args.in_flight as f64);
    put("load_average_before".into(), load.0);
    put("load_average_after".into(), load.1);
    for (prefix, side) in [("", 0), ("nats_", 1)] {
        let measured: Vec<Measured> = results
            .iter()
            .filter_map(|(_, lm, nats)| if side == 0 { *lm } else { *nats })
            .collect();
        if measured.is_empty() {
            continue;
        }
        let mean = measured
            .iter()
            .map(|m| m.saturated.delivered_per_s)
            .sum::<f64>()
            / measured.len() as f64;
        let worst = |f: fn(&Measured) -> f64| measured.iter().map(f).fold(f64::MIN, f64::max);
        put(format!("{prefix}delivered_per_s"), mean);
        put(format!("{prefix}latency_p50_ms"), worst(|m| m.paced.p50_ms));
        put(format!("{prefix}latency_p99_ms"), worst(|m| m.paced.p99_ms));
        put(
            format!("{prefix}saturated_latency_p99_ms"),
            worst(|m| m.saturated.p99_ms),
        );
        put(
            format!("{prefix}undelivered"),
            measured
                .iter()
                .map(|m| (m.saturated.undelivered + m.paced.undelivered) as f64)
                .sum(),
        );
        put(
            format!("{prefix}lost_streams"),
            measured.iter().map(|m| m.lost_streams as f64).sum(),
        );
        if side == 0 {
            put(
                "bytes_per_idle_stream".into(),
                worst(|m| m.bytes_per_idle_stream.unwrap_or(f64::NAN)),
            );
        }
    }
    for (layout, lm, nats) in results {
        let k = layout.key;
        for (prefix, m) in [("", lm), ("nats_", nats)] {
            let Some(m) = m else { continue };
            let mut put = |name: &str, value: f64| put(format!("{k}_{prefix}{name}"), value);
            put("delivered_per_s", m.saturated.delivered_per_s);
            put("saturated_events_per_s", m.saturated.events_per_s);
            put("saturated_latency_p50_ms", m.saturated.p50_ms);
            put("saturated_latency_p99_ms", m.saturated.p99_ms);
            put("paced_events_per_s", m.paced.events_per_s);
            put("latency_p50_ms", m.paced.p50_ms);
            put("latency_p99_ms", m.paced.p99_ms);
            put("open_s", m.open_s);
            put("server_cpu_us_per_delivery", m.saturated.server_cpu_us);
            put("client_cpu_us_per_delivery", m.saturated.client_cpu_us);
            put(
                "server_writes_per_1k_deliveries",
                m.saturated.server_writes_per_k,
            );
            if let Some(b) = m.bytes_per_idle_stream {
                put("bytes_per_idle_stream", b);
            }
            if let (Some(base), Some(open)) = (m.rss_base, m.rss_open) {
                put("node_rss_base_bytes", base as f64);
                put("node_rss_open_bytes", open as f64);
                put("node_rss_settled", f64::from(u8::from(m.settled)));
            }
        }
        if let (Some(lm), Some(nats)) = (lm, nats) {
            put(
                format!("{k}_ratio_vs_nats"),
                lm.saturated.delivered_per_s / nats.saturated.delivered_per_s,
            );
        }
    }
    if let (Some(&ours), Some(&theirs)) = (
        figures.get("delivered_per_s"),
        figures.get("nats_delivered_per_s"),
    ) {
        let ratio = ours / theirs;
        figures.insert("ratio_vs_nats".into(), ratio);
        let per_layout: Vec<String> = results
            .iter()
            .filter_map(|(l, _, _)| {
                figures
                    .get(&format!("{}_ratio_vs_nats", l.key))
                    .map(|r| format!("{} {r:.2}x", l.label))
            })
            .collect();
        println!(
            "  delivered/s vs NATS at saturation: {ratio:.2}x (mean over the layouts; {})",
            per_layout.join(", ")
        );
    }
    if let Some(p99) = figures.get("latency_p99_ms") {
        println!(
            "  livemesh publish->receive at the paced rate: p50 {:.1} ms, p99 {p99:.1} ms (the worse layout){}",
            figures.get("latency_p50_ms").copied().unwrap_or(f64::NAN),
            figures
                .get("nats_latency_p99_ms")
                .map(|n| format!("; NATS p99 {n:.1} ms at the same rate"))
                .unwrap_or_default()
        );
    }
    // The headline per-delivery figures are the hot room's, where a fan-out
    // is widest.
    let hot = |key: &str| figures.get(&format!("hot_{key}")).copied();
    let (cpu, nats_cpu) = (
        hot("server_cpu_us_per_delivery"),
        hot("nats_server_cpu_us_per_delivery"),
    );
    let (p99, nats_p99) = (hot("latency_p99_ms"), hot("nats_latency_p99_ms"));
    if let Some(ours) = cpu {
        figures.insert("server_cpu_us_per_delivery".into(), ours);
    }
    if let Some(theirs) = nats_cpu {
        figures.insert("nats_server_cpu_us_per_delivery".into(), theirs);
    }
    if let (Some(ours), Some(theirs)) = (cpu, nats_cpu) {
        figures.insert("cpu_ratio_vs_nats".into(), ours / theirs);
        println!(
            "  hot room, server CPU per delivery while saturating: livemesh {ours:.2} µs, \
             NATS {theirs:.2} µs ({:.2}x)",
            ours / theirs
        );
    }
    if let (Some(ours), Some(theirs)) = (p99, nats_p99) {
        figures.insert("p99_ratio_vs_nats".into(), ours / theirs);
        println!(
            "  hot room, paced p99 at the same rate: livemesh {ours:.1} ms, NATS {theirs:.1} ms \
             ({:.2}x)",
            ours / theirs
        );
    }
    for (prefix, storm) in [("", &storms.0), ("nats_", &storms.1)] {
        let Some(storm) = storm else { continue };
        figures.insert(format!("{prefix}storm_viewers"), storm.viewers as f64);
        figures.insert(format!("{prefix}storm_levels"), storm.levels.len() as f64);
        if let Some(best) = storm.best() {
            figures.insert(format!("{prefix}storm_latency_p50_ms"), best.p50_ms);
            figures.insert(format!("{prefix}storm_latency_p99_ms"), best.p99_ms);
            figures.insert(
                format!("{prefix}storm_server_cpu_us_per_delivery"),
                best.server_cpu_us,
            );
            figures.insert(
                format!("{prefix}storm_delivered_per_s"),
                best.delivered_per_s,
            );
        }
    }
    if let (Some(ours), Some(theirs)) = (&storms.0, &storms.1) {
        let ratio = ours.viewers as f64 / theirs.viewers as f64;
        figures.insert("storm_ratio_vs_nats".into(), ratio);
        println!(
            "  storm: viewers held at p99 <= {} ms: livemesh {} (batched), NATS {} ({ratio:.2}x)",
            storm::STORM_P99_MS,
            ours.viewers,
            theirs.viewers
        );
    }
    if let Some(bytes) = figures.get("bytes_per_idle_stream") {
        println!(
            "  node memory per idle stream: {bytes:.0} B (RSS growth / streams, the worse layout)"
        );
    }
    if let Some(path) = &args.json {
        let view: BTreeMap<&str, f64> = figures.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        write_json(path, "fanout", &view)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_times_parse_from_text_and_padded_payloads() {
        assert_eq!(
            parse_sent(b"1700000000123456789"),
            Some(1_700_000_000_123_456_789)
        );
        assert_eq!(parse_sent(b"42      "), Some(42));
        assert_eq!(parse_sent(b"x42"), None);
        assert_eq!(parse_sent(b""), None);
        assert_eq!(parse_sent(b"99999999999999999999"), None);
    }

    #[test]
    fn layouts_spread_streams_evenly() {
        let layout = Layout::new("many", "3 rooms".into(), 10, 3);
        assert_eq!(*layout.counts, vec![4, 3, 3]);
        assert_eq!(layout.counts.iter().sum::<i64>(), 10);
    }

    #[test]
    fn quantiles_come_from_the_histogram() {
        let rec = Recorder::new();
        let now = now_ns();
        for _ in 0..99 {
            rec.histogram[10].fetch_add(1, Ordering::Relaxed);
        }
        rec.histogram[500].fetch_add(1, Ordering::Relaxed);
        assert!((rec.quantile_ms(0.5) - 1.1).abs() < 1e-9);
        assert!((rec.quantile_ms(0.99) - 1.1).abs() < 1e-9);
        assert!((rec.quantile_ms(1.0) - 50.1).abs() < 1e-9);
        rec.received(now);
        assert_eq!(rec.delivered.load(Ordering::Relaxed), 1);
    }
}
