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
//! shared HDR histogram (`helpers::Latencies`, to the microsecond); a receive
//! loop costs a few atomic increments and one short lock per event, so
//! 100,000 of them stay cheap.
//!
//! The last hop, written by the node → received here, is timed apart on
//! one livemesh stream in 64, which asks for write stamps (`stamp_writes`:
//! each of its messages carries the time the node wrote it); the paced
//! window's p50/p99 of it are `written_to_receive_p50_ms` / `_p99_ms` (hot
//! room, and per layout). NATS has no such stamp. The node's own hops over
//! the same window come from its Prometheus endpoint, scraped before and
//! after: publish → `Deliver` sent (`publish_to_deliver_*`) and `Deliver` →
//! written by the room's last stream (`deliver_to_written_*`), so the p99
//! of publish → received splits into its three hops.
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

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use anyhow::{Context as _, ensure};

use super::helpers::{FiguresFile, cpu_seconds, load_average};

mod nats;
mod node;
mod recorder;
mod report;
mod storm;
mod windows;

use self::nats::{nats_connect, nats_pid, run_nats};
use self::node::{Node, Opening, connect, open_limit, run_livemesh, viewer};
use self::recorder::{Recorder, estimated_event_len, follow_nats};
use self::report::print_and_save;

/// Options of `bench fanout`.
#[derive(Debug, clap::Args)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub out: FiguresFile,
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
pub(super) const MAX_STREAMS_ENV: &str = "LIVEMESH_SUBSCRIBE__MAX_STREAMS_PER_CONNECTION";
pub(super) const MAX_STREAMS_DEFAULT: u64 = 100_000;
/// Subscribe calls waiting for their `started` message at once.
pub(super) const OPEN_CONCURRENCY: usize = 512;
/// Times one Subscribe is retried after UNAVAILABLE while opening.
pub(super) const OPEN_RETRIES: u64 = 20;
/// The viewer who writes the bench's comments.
pub(super) const PUBLISHER_VIEWER: u64 = 1;

/// One way to lay the streams out over rooms.
pub(super) struct Layout {
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

/// The node's own hops over a window, from its metrics scraped before and
/// after (Prometheus histograms, so each quantile is interpolated within
/// `livemesh_mesh::metrics::HOP_BUCKETS`): p50 and p99 in milliseconds.
#[derive(Debug, Clone, Copy)]
pub(super) struct NodeHops {
    /// publish reaching the dispatcher → its `Deliver` going out.
    deliver: (f64, f64),
    /// `Deliver` reaching the node → the last of the room's streams
    /// writing the event.
    write: (f64, f64),
}

/// What one measurement window found.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Window {
    events_per_s: f64,
    delivered_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// The latencies at the JSON's quantiles.
    percentiles: [f64; crate::report::model::QUANTILES.len()],
    /// livemesh: p50 and p99 of written → received, in milliseconds (the
    /// streams that asked for write stamps); `None` for NATS.
    last_hop_ms: Option<(f64, f64)>,
    /// livemesh, paced window: the node's own hops.
    node_hops: Option<NodeHops>,
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
pub(super) struct Measured {
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::recorder::parse_sent;
    use super::*;
    use crate::bench::helpers::now_ns;

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
            rec.record(Duration::from_micros(1_100));
        }
        rec.record(Duration::from_micros(50_100));
        assert!((rec.quantile_ms(0.5) - 1.1).abs() < 1e-9);
        assert!((rec.quantile_ms(0.99) - 1.1).abs() < 1e-9);
        assert!((rec.quantile_ms(1.0) - 50.1).abs() < 1e-9);
        rec.received(now);
        assert_eq!(rec.delivered.load(Ordering::Relaxed), 1);
    }
}
