//! `bench breaker`: what one black-holed subscribe node costs the others.
//!
//! # Set-up (one process)
//!
//! ongoing-query (rooms, SQLite in a temp dir), one dispatcher and four
//! subscribe nodes, each a server on its own loopback port, sharing the
//! embedded in-process fan-out store; one room, `--viewers-per-node`
//! Subscribe streams on every node (each node's streams multiplexed over one
//! HTTP/2 connection, as a BFF holds them). Node 4 registers in the fan-out
//! store under the address of a TCP proxy ([`super::blackhole`]) that
//! forwards to it while healthy and is switched into a black hole (accepts
//! TCP, never answers) for the degraded phase. The dispatcher reaches every
//! node through the mesh's one client stack (`ClientStack`), so whatever
//! that stack does against a dead peer (timeouts; circuit breakers when
//! configured) is what is measured.
//!
//! # Phases
//!
//! **healthy** (all four nodes answer), then **degraded** (node 4
//! black-holed), `--duration` seconds each, same settings. Comments are
//! published at a fixed `--rate`, open loop (a 1 ms ticker publishes
//! whatever is due, each publish its own task), so a slow Publish does not
//! lower the offered load. Each comment carries its phase, sequence number
//! and send time. Measured per phase:
//!
//! - (a) publish→receive latency at the viewers of the healthy nodes 1-3
//!   (the same viewers in both phases): the headline `healthy_p99_ms` /
//!   `degraded_p99_ms` and their ratio;
//! - (b) the Publish RPC's latency as the publisher sees it (the dispatcher
//!   answers once every node answered or timed out).
//!
//! Events scheduled in the first `--warmup` seconds of each phase are left
//! out of the percentiles and reported apart (their count, p99 and max, how
//! many publishes were slow, and when publishes stopped waiting for node 4:
//! the first of 50 consecutive fast ones, where fast is under half of
//! `publish.deliver_timeout_ms`).
//!
//! Correctness: every comment whose Publish returned OK must reach every
//! viewer of nodes 1-3 in both phases (and node 4's in the healthy phase)
//! exactly once; missing ones are counted and fail the bench. Node 4 must
//! stay registered for the room throughout (sampled every 50 ms): it is
//! alive and renews its lease, and catches its viewers up from the history
//! when a renewal shows it the gap, so the nodes' stream queues are sized
//! for two lease intervals of comments (with the default 256 they overflow,
//! its viewers are ended, node 4 leaves the room and the dispatcher stops
//! calling it, which would make the degraded phase healthy again).
//!
//! # open_reject
//!
//! While node 4 is still black-holed, a fresh channel from the same client
//! stack to node 4's advertised address sends health checks in rounds of
//! 20 concurrent calls until one is refused as UNAVAILABLE "circuit open"
//! (or `4 × client.request_timeout_ms` passed); then `--rejected-calls`
//! sequential calls are timed and the p99 of the refused ones is
//! `open_reject_p99_ms`. With no breaker in the stack nothing is refused:
//! the figure is then the p99 of 20 calls that each wait for the request
//! timeout, and the output says so.

use livemesh_mesh::lock;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail, ensure};
use livemesh_fanout::{FanoutSettings, FanoutStore};
use livemesh_mesh::breaker::BreakerState;
use livemesh_mesh::server::LocalServer;
use livemesh_mesh::{ClientStack, Config, MeshChannel};
use livemesh_ongoing_query::OngoingQuery;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::subscribe_response::Message;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{
    Comment, PublishRequest, RoomEvent, StartRoomRequest, SubscribeRequest, room_event,
};
use livemesh_publish::{Dispatcher, DispatcherInner};
use livemesh_subscribe::SubscribeNode;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::blackhole::BlackHole;
use super::{percentile, write_json};

/// Options of `bench breaker`.
#[derive(Debug, clap::Args)]
pub struct BreakerArgs {
    /// Write the figures as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Seconds of publishing in each phase (healthy, then degraded).
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub duration: u64,
    /// Comments published per second, open loop (the same in both phases).
    #[arg(long, value_name = "PUBLISHES_PER_SEC", default_value_t = 200.0)]
    pub rate: f64,
    /// Subscribe streams on each of the four nodes.
    #[arg(long, value_name = "N", default_value_t = 25)]
    pub viewers_per_node: u64,
    /// Seconds at the start of each phase whose events are left out of the
    /// percentiles (and reported apart).
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    pub warmup: f64,
    /// `publish.deliver_timeout_ms` of the dispatcher. Default: the
    /// configured default. At or above `client.breaker_slow_call_ms` (which
    /// the config refuses) it shows why: the Publish callers' breakers open
    /// on the dispatcher while node 4's breaker is still closed.
    #[arg(long, value_name = "MS")]
    pub deliver_timeout_ms: Option<u64>,
    /// Calls timed against the open breaker for `open_reject_p99_ms`.
    #[arg(long, value_name = "N", default_value_t = 1_000)]
    pub rejected_calls: usize,
}

const NODES: usize = 4;
/// Node 4, the one behind the black-hole proxy.
const BLACK_HOLED: usize = 3;
const PHASES: [&str; 2] = ["healthy", "degraded"];
const READY_EVENTS: u64 = 3;
/// Consecutive fast publishes that mark the dispatcher as no longer
/// waiting for the black-holed node.
const SETTLED_RUN: usize = 50;
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Concurrent health checks per round while tripping the breaker, and the
/// calls timed when none trips it.
const TRIP_ROUND: usize = 20;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

// ---------------------------------------------------------------------------
// Viewers.

/// What one viewer received.
struct Viewer {
    node: usize,
    ready: AtomicU64,
    /// Per phase: (sequence number, publish→receive latency).
    received: Mutex<[Vec<(u64, Duration)>; 2]>,
    ended: Mutex<Option<String>>,
}

impl Viewer {
    fn count(&self, phase: usize) -> usize {
        lock(&self.received)[phase].len()
    }
}

/// A bench comment's text: `brk <phase> <seq> <send time ns>`.
fn comment_text(phase: usize, seq: u64, sent_ns: u64) -> String {
    format!("brk {phase} {seq} {sent_ns}")
}

fn parse_comment(text: &str) -> Option<(usize, u64, u64)> {
    let mut parts = text.strip_prefix("brk ")?.split(' ');
    let phase = parts.next()?.parse().ok()?;
    let seq = parts.next()?.parse().ok()?;
    let sent = parts.next()?.parse().ok()?;
    (parts.next().is_none() && phase < PHASES.len()).then_some((phase, seq, sent))
}

/// Opens a stream, reports once `started` arrived, then records comments.
async fn view(
    mut client: SubscribeServiceClient<Channel>,
    request: SubscribeRequest,
    viewer: Arc<Viewer>,
    opened: tokio::sync::mpsc::Sender<Result<(), String>>,
) {
    let mut stream = match client.subscribe(request).await {
        Ok(reply) => reply.into_inner(),
        Err(status) => {
            let _ = opened.send(Err(format!("Subscribe: {status}"))).await;
            return;
        }
    };
    match stream.message().await {
        Ok(Some(first)) if matches!(first.message, Some(Message::Started(_))) => {
            let _ = opened.send(Ok(())).await;
        }
        other => {
            let _ = opened
                .send(Err(format!("the stream did not start: {other:?}")))
                .await;
            return;
        }
    }
    drop(opened);
    let why = loop {
        match stream.message().await {
            Ok(Some(reply)) => {
                let Some(Message::Event(event)) = reply.message else {
                    continue;
                };
                let Some(room_event::Kind::Comment(comment)) = &event.kind else {
                    continue; // viewer counts and love totals
                };
                if let Some((phase, seq, sent)) = parse_comment(&comment.text) {
                    let latency = Duration::from_nanos(now_ns().saturating_sub(sent));
                    lock(&viewer.received)[phase].push((seq, latency));
                } else if comment.text.starts_with("ready ") {
                    viewer.ready.fetch_add(1, Ordering::Release);
                }
            }
            Ok(None) => break "the server ended the stream".to_owned(),
            Err(status) => break format!("the stream failed: {status}"),
        }
    };
    *lock(&viewer.ended) = Some(why);
}

// ---------------------------------------------------------------------------
// Figures.

/// Count, p50, p99 and max of a set of latencies, in milliseconds (NaN when
/// empty).
#[derive(Debug, Clone, Copy)]
struct Summary {
    count: usize,
    p50: f64,
    p99: f64,
    max: f64,
}

impl Summary {
    fn of(mut samples: Vec<Duration>) -> Self {
        if samples.is_empty() {
            return Self {
                count: 0,
                p50: f64::NAN,
                p99: f64::NAN,
                max: f64::NAN,
            };
        }
        samples.sort_unstable();
        Self {
            count: samples.len(),
            p50: percentile(&samples, 0.50),
            p99: percentile(&samples, 0.99),
            max: percentile(&samples, 1.0),
        }
    }
}

/// One Publish as the publisher saw it.
struct Published {
    seq: u64,
    rpc: Duration,
    ok: bool,
}

/// What one phase measured.
struct PhaseResult {
    scheduled: u64,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    /// (a) publish→receive at nodes 1-3, after / during the warm-up.
    receive: Summary,
    receive_warm: Summary,
    /// (b) the Publish RPC, after / during the warm-up.
    rpc: Summary,
    rpc_warm: Summary,
    /// Publishes slower than half the Deliver timeout, after / during the warm-up.
    slow: u64,
    slow_warm: u64,
    /// Seconds into the phase of the first of `SETTLED_RUN` consecutive
    /// fast, successful publishes.
    settled_after: Option<f64>,
    /// Acknowledged comments a viewer that should have had them did not
    /// get, and comments a viewer got twice.
    missing: u64,
    duplicates: u64,
    /// Comments the average node-4 viewer received.
    node4_received: f64,
    /// Deliver calls the dispatcher made that were answered / failed or
    /// timed out (they include the nodes' own viewer-count publishes).
    deliveries: u64,
    deliver_failures: u64,
    /// Node 4's registration (while it is out, the dispatcher does not call
    /// it and the phase is not what it claims) and the dispatcher's breaker
    /// for it.
    node4: Node4Watch,
}

struct Bench {
    args: BreakerArgs,
    publish: PublishServiceClient<MeshChannel>,
    room_id: u64,
    viewers: Vec<Arc<Viewer>>,
    dispatcher: Dispatcher,
    deliver_timeout: Duration,
    store: FanoutStore,
    /// Node 4's advertised address (the proxy's).
    node4: String,
}

impl Bench {
    /// Publishes one comment; the RPC's latency and outcome.
    async fn publish(
        mut client: PublishServiceClient<MeshChannel>,
        room_id: u64,
        text: String,
    ) -> (Duration, Result<(), tonic::Status>) {
        let request = PublishRequest {
            room_id,
            event: Some(RoomEvent {
                kind: Some(room_event::Kind::Comment(Comment { viewer_id: 1, text })),
                ..RoomEvent::default()
            }),
            ..PublishRequest::default()
        };
        let started = Instant::now();
        let reply = client.publish(request).await;
        (started.elapsed(), reply.map(drop))
    }

    /// Viewers that must get every comment of `phase`.
    fn complete_viewers(&self, phase: usize) -> impl Iterator<Item = &Arc<Viewer>> {
        self.viewers
            .iter()
            .filter(move |v| phase == 0 || v.node != BLACK_HOLED)
    }

    async fn ready_check(&self) -> anyhow::Result<()> {
        for i in 0..READY_EVENTS {
            let (_, reply) =
                Self::publish(self.publish.clone(), self.room_id, format!("ready {i}")).await;
            reply.map_err(|s| anyhow::anyhow!("ready check: Publish failed: {s}"))?;
        }
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self
            .viewers
            .iter()
            .any(|v| v.ready.load(Ordering::Acquire) < READY_EVENTS)
        {
            if Instant::now() >= deadline {
                let behind = self
                    .viewers
                    .iter()
                    .filter(|v| v.ready.load(Ordering::Acquire) < READY_EVENTS)
                    .count();
                bail!(
                    "ready check: {behind} viewers did not get {READY_EVENTS} comments within {:.0} s{}",
                    DRAIN_TIMEOUT.as_secs_f64(),
                    self.first_end()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    fn first_end(&self) -> String {
        self.viewers
            .iter()
            .find_map(|v| lock(&v.ended).clone())
            .map(|why| format!(" (a stream ended: {why})"))
            .unwrap_or_default()
    }

    async fn run_phase(&self, phase: usize) -> anyhow::Result<PhaseResult> {
        let stats = &self.dispatcher.inner().stats;
        let deliveries_before = stats.deliveries.load(Ordering::Relaxed);
        let failures_before = stats.deliver_failures.load(Ordering::Relaxed);
        let window = Duration::from_secs(self.args.duration);
        let rate = self.args.rate;
        let scheduled = (window.as_secs_f64() * rate).ceil().max(1.0) as u64;
        let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = tokio::spawn(watch_node4(
            self.store.clone(),
            self.dispatcher.inner().clone(),
            self.room_id,
            self.node4.clone(),
            sampling.clone(),
        ));
        let started = Instant::now();
        let mut ticker = tokio::time::interval(Duration::from_millis(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut calls = JoinSet::new();
        let mut sent = 0;
        while sent < scheduled {
            ticker.tick().await;
            // Comment k is due at k / rate.
            let due = ((started.elapsed().as_secs_f64() * rate) as u64 + 1).min(scheduled);
            while sent < due {
                let seq = sent;
                let text = comment_text(phase, seq, now_ns());
                let reply = Self::publish(self.publish.clone(), self.room_id, text);
                calls.spawn(async move { (seq, reply.await) });
                sent += 1;
            }
        }
        sampling.store(false, Ordering::Release);
        let node4 = sampler.await?;
        let mut published = Vec::with_capacity(scheduled as usize);
        let mut first_error = None;
        while let Some(joined) = calls.join_next().await {
            let (seq, (rpc, reply)) = joined?;
            if let Err(status) = &reply {
                first_error.get_or_insert_with(|| status.to_string());
            }
            published.push(Published {
                seq,
                rpc,
                ok: reply.is_ok(),
            });
        }
        published.sort_unstable_by_key(|p| p.seq);
        let ok = published.iter().filter(|p| p.ok).count();

        // Drain: every viewer that should have them gets the acknowledged
        // comments (a node that missed a Deliver fetches from the history
        // when the next event shows it the gap).
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while self.complete_viewers(phase).any(|v| v.count(phase) < ok) && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut result = self.analyse(phase, published, first_error, scheduled);
        result.deliveries = stats.deliveries.load(Ordering::Relaxed) - deliveries_before;
        result.deliver_failures = stats.deliver_failures.load(Ordering::Relaxed) - failures_before;
        result.node4 = node4;
        Ok(result)
    }

    fn analyse(
        &self,
        phase: usize,
        published: Vec<Published>,
        first_error: Option<String>,
        scheduled: u64,
    ) -> PhaseResult {
        let rate = self.args.rate;
        let warm_until = (self.args.warmup * rate).ceil() as u64;
        let is_warm = |seq: u64| seq < warm_until;
        let slow_limit = self.deliver_timeout / 2;
        let acknowledged: Vec<bool> = published.iter().map(|p| p.ok).collect();
        let ok = acknowledged.iter().filter(|ok| **ok).count() as u64;

        let (mut receive, mut receive_warm) = (Vec::new(), Vec::new());
        let (mut missing, mut duplicates) = (0, 0);
        let mut node4 = (0_u64, 0_u64);
        for viewer in &self.viewers {
            let mut got = lock(&viewer.received)[phase].clone();
            got.sort_unstable_by_key(|(seq, _)| *seq);
            let before = got.len();
            got.dedup_by_key(|(seq, _)| *seq);
            duplicates += (before - got.len()) as u64;
            if viewer.node == BLACK_HOLED {
                node4.0 += got.len() as u64;
                node4.1 += 1;
            }
            if phase == 0 || viewer.node != BLACK_HOLED {
                let seen = got
                    .iter()
                    .filter(|(seq, _)| acknowledged.get(*seq as usize) == Some(&true))
                    .count() as u64;
                missing += ok - seen;
            }
            if viewer.node != BLACK_HOLED {
                for (seq, latency) in got {
                    if is_warm(seq) {
                        receive_warm.push(latency);
                    } else {
                        receive.push(latency);
                    }
                }
            }
        }

        let (mut rpc, mut rpc_warm) = (Vec::new(), Vec::new());
        let (mut slow, mut slow_warm) = (0, 0);
        for p in &published {
            let (samples, slow_count) = if is_warm(p.seq) {
                (&mut rpc_warm, &mut slow_warm)
            } else {
                (&mut rpc, &mut slow)
            };
            samples.push(p.rpc);
            if p.rpc >= slow_limit {
                *slow_count += 1;
            }
        }
        let fast = |p: &Published| p.ok && p.rpc < slow_limit;
        let settled_after = published
            .windows(SETTLED_RUN.min(published.len()).max(1))
            .position(|run| run.iter().all(fast))
            .map(|i| published[i].seq as f64 / rate);

        PhaseResult {
            scheduled,
            ok,
            errors: published.len() as u64 - ok,
            first_error,
            receive: Summary::of(receive),
            receive_warm: Summary::of(receive_warm),
            rpc: Summary::of(rpc),
            rpc_warm: Summary::of(rpc_warm),
            slow,
            slow_warm,
            settled_after,
            missing,
            duplicates,
            node4_received: node4.0 as f64 / node4.1.max(1) as f64,
            deliveries: 0,
            deliver_failures: 0,
            node4: Node4Watch::default(),
        }
    }
}

/// What [`watch_node4`] saw during a phase.
#[derive(Debug, Default)]
struct Node4Watch {
    /// (samples without node 4 registered for the room, samples).
    out: (u64, u64),
    /// Seconds into the phase when the dispatcher's breaker for node 4 was
    /// first seen open.
    first_open: Option<f64>,
    /// Times it was seen going from not open to open.
    openings: u64,
    /// Share of the samples in which it was not closed.
    not_closed: f64,
}

/// Samples, while `running`, the state of the dispatcher's breaker for
/// node 4 every 2 ms and the room's registered nodes every 50 ms.
async fn watch_node4(
    store: FanoutStore,
    dispatcher: Arc<DispatcherInner>,
    room_id: u64,
    node4: String,
    running: Arc<std::sync::atomic::AtomicBool>,
) -> Node4Watch {
    let started = Instant::now();
    let mut watch = Node4Watch::default();
    let (mut samples, mut not_closed) = (0_u64, 0_u64);
    let mut was_open = false;
    while running.load(Ordering::Acquire) {
        let state = dispatcher.node_breaker(&node4);
        let open = state == Some(BreakerState::Open);
        if open && !was_open {
            watch.openings += 1;
            watch
                .first_open
                .get_or_insert(started.elapsed().as_secs_f64());
        }
        was_open = open;
        not_closed += u64::from(state.is_some_and(|s| s != BreakerState::Closed));
        if samples % 25 == 0 {
            let nodes = store.nodes(room_id, livemesh_mesh::now_ms()).await;
            watch.out.1 += 1;
            if !nodes.is_ok_and(|nodes| nodes.contains(&node4)) {
                watch.out.0 += 1;
            }
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    watch.not_closed = not_closed as f64 / samples.max(1) as f64;
    watch
}

/// `open_reject`: how fast the client stack refuses a call to the
/// black-holed node once its breaker is open.
struct OpenReject {
    /// Whether a call was ever refused as "circuit open".
    tripped: bool,
    trip_time: Duration,
    calls: usize,
    rejected: Summary,
    /// Calls that were not refused (half-open probes, or every call when
    /// no breaker tripped).
    other: Summary,
    other_kinds: BTreeMap<String, usize>,
}

fn is_circuit_open(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && status.message().to_ascii_lowercase().contains("circuit")
}

async fn health_check(mut client: HealthClient<MeshChannel>) -> (Duration, Option<tonic::Status>) {
    let started = Instant::now();
    let reply = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    (started.elapsed(), reply.err())
}

async fn open_reject(
    stack: &ClientStack,
    uri: &str,
    calls: usize,
    request_timeout: Duration,
) -> anyhow::Result<OpenReject> {
    let client = HealthClient::new(stack.channel(uri)?);
    let trip_started = Instant::now();
    let trip_limit = request_timeout * 4;
    let mut tripped = false;
    while !tripped && trip_started.elapsed() < trip_limit {
        let mut round = JoinSet::new();
        for _ in 0..TRIP_ROUND {
            round.spawn(health_check(client.clone()));
        }
        while let Some(joined) = round.join_next().await {
            tripped |= joined?.1.as_ref().is_some_and(is_circuit_open);
        }
    }
    let trip_time = trip_started.elapsed();

    let mut rejected = Vec::new();
    let mut other = Vec::new();
    let mut other_kinds = BTreeMap::new();
    let mut record = |(latency, error): (Duration, Option<tonic::Status>)| match error {
        Some(status) if is_circuit_open(&status) => rejected.push(latency),
        outcome => {
            other.push(latency);
            let kind = outcome.map_or("OK".to_owned(), |s| format!("{:?}", s.code()));
            *other_kinds.entry(kind).or_insert(0) += 1;
        }
    };
    let timed = if tripped {
        // One at a time: each latency is the refusal's own.
        for _ in 0..calls {
            record(health_check(client.clone()).await);
        }
        calls
    } else {
        let mut round = JoinSet::new();
        for _ in 0..TRIP_ROUND {
            round.spawn(health_check(client.clone()));
        }
        while let Some(joined) = round.join_next().await {
            record(joined?);
        }
        TRIP_ROUND
    };
    Ok(OpenReject {
        tripped,
        trip_time,
        calls: timed,
        rejected: Summary::of(rejected),
        other: Summary::of(other),
        other_kinds,
    })
}

// ---------------------------------------------------------------------------
// Set-up and report.

pub async fn run(args: BreakerArgs) -> anyhow::Result<()> {
    ensure!(args.duration >= 1, "--duration must be at least 1");
    ensure!(
        args.rate > 0.0 && args.rate <= 10_000.0,
        "--rate must be in (0, 10000]"
    );
    ensure!(
        args.viewers_per_node >= 1,
        "--viewers-per-node must be at least 1"
    );
    ensure!(
        args.warmup >= 0.0 && args.warmup < args.duration as f64,
        "--warmup must be at least 0 and shorter than --duration"
    );
    ensure!(
        args.rejected_calls >= 1,
        "--rejected-calls must be at least 1"
    );
    let load_before = load_average();
    let dir = tempfile::tempdir()?;
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    let rooms = LocalServer::start(OngoingQuery::from_config(&config).await?, any).await?;
    config.subscribe.ongoing_query_url = rooms.uri();
    config.publish.ongoing_query_url = rooms.uri();
    if let Some(ms) = args.deliver_timeout_ms {
        ensure!(ms >= 1, "--deliver-timeout-ms must be at least 1");
        config.publish.deliver_timeout_ms = ms;
    }
    let store = FanoutStore::memory(FanoutSettings::default());

    let mut built = None;
    let dispatch_server = LocalServer::bind_then(any, |addr| {
        let mut config = config.clone();
        config.listen = addr;
        let dispatcher = Dispatcher::from_config(&config, store.clone());
        built = dispatcher.as_ref().ok().cloned();
        async move { dispatcher }
    })
    .await?;
    let dispatcher = built.context("the dispatcher was not built")?;
    config.subscribe.publish_url = dispatch_server.uri();
    // Node 4 keeps its viewers fed from the history while black-holed (it
    // sees the gap when it renews its lease) and hands them a lease
    // interval's worth of comments at once: with the default queue they
    // would overflow and end, node 4 would leave the room, and the degraded
    // phase would stop being degraded. Room for two intervals' worth.
    let catch_up = (2.0 * args.rate * config.subscribe.report_interval_ms as f64 / 1e3).ceil();
    config.subscribe.queue_len = config.subscribe.queue_len.max(catch_up as usize);

    let proxy_listener = tokio::net::TcpListener::bind(any).await?;
    let proxy_uri = format!("http://{}", proxy_listener.local_addr()?);
    let mut nodes = Vec::with_capacity(NODES);
    for i in 0..NODES {
        let mut config = config.clone();
        if i == BLACK_HOLED {
            config.subscribe.node_url = proxy_uri.clone();
        }
        nodes.push(
            LocalServer::bind_then(any, |addr| {
                config.listen = addr;
                let node = SubscribeNode::from_config(&config, store.clone());
                async move { node }
            })
            .await?,
        );
    }
    let proxy = BlackHole::forward(proxy_listener, nodes[BLACK_HOLED].addr())?;

    let stack = ClientStack::new(&config.client);
    let mut admin = RoomAdminServiceClient::new(stack.channel(&rooms.uri())?);
    let room_id = admin
        .start_room(StartRoomRequest { anchor_id: 1 })
        .await
        .map_err(|s| anyhow::anyhow!("StartRoom: {s}"))?
        .into_inner()
        .room
        .context("StartRoom returned no room")?
        .room_id;

    // Viewers: each node's streams over one HTTP/2 connection.
    let mut viewers = Vec::new();
    let mut streams = JoinSet::new();
    let (opened_tx, mut opened) = tokio::sync::mpsc::channel(64);
    for (node, server) in nodes.iter().enumerate() {
        let channel = Endpoint::from_shared(server.uri())?
            .tcp_nodelay(true)
            .connect()
            .await
            .with_context(|| format!("connecting to node {}", node + 1))?;
        for v in 0..args.viewers_per_node {
            let viewer = Arc::new(Viewer {
                node,
                ready: AtomicU64::new(0),
                received: Mutex::new([Vec::new(), Vec::new()]),
                ended: Mutex::new(None),
            });
            viewers.push(viewer.clone());
            streams.spawn(view(
                SubscribeServiceClient::new(channel.clone()),
                SubscribeRequest {
                    room_id,
                    viewer_id: 1_000 + (node as u64) * 100_000 + v,
                    ..SubscribeRequest::default()
                },
                viewer,
                opened_tx.clone(),
            ));
        }
    }
    drop(opened_tx);
    let deadline = tokio::time::Instant::now() + OPEN_TIMEOUT;
    for n in 0..viewers.len() {
        match tokio::time::timeout_at(deadline, opened.recv()).await {
            Ok(Some(Ok(()))) => {}
            Ok(Some(Err(why))) => bail!("a viewer's stream did not open: {why}"),
            Ok(None) => bail!("viewers' tasks ended before their streams opened"),
            Err(_) => bail!(
                "only {n} of {} viewers' streams opened within {:.0} s",
                viewers.len(),
                OPEN_TIMEOUT.as_secs_f64()
            ),
        }
    }
    let registered = store
        .nodes(room_id, livemesh_mesh::now_ms())
        .await
        .map_err(|e| anyhow::anyhow!("reading the room's nodes: {e}"))?;
    ensure!(
        registered.len() == NODES && registered.contains(&proxy_uri),
        "expected the 4 nodes (node 4 at {proxy_uri}) registered for the room, found {registered:?}"
    );

    let deliver_timeout = Duration::from_millis(config.publish.deliver_timeout_ms);
    let request_timeout = Duration::from_millis(config.client.request_timeout_ms);
    println!(
        "bench breaker: 1 dispatcher, {NODES} subscribe nodes with {} viewers each (node 4 behind a \
         black-hole proxy), one room; {} comments/s open loop for {} s per phase; the first {} s \
         of each phase are warm-up, left out of the percentiles; publish.deliver_timeout_ms {}, \
         client.request_timeout_ms {}, subscribe.queue_len {}",
        args.viewers_per_node,
        args.rate,
        args.duration,
        args.warmup,
        deliver_timeout.as_millis(),
        request_timeout.as_millis(),
        config.subscribe.queue_len,
    );
    let c = &config.client;
    println!(
        "  client stack breakers: window {} ms, at least {} calls, open at {:.0}% failures or {:.0}% \
         calls of {} ms or more; open {} ms, then {} half-open probes",
        c.breaker_window_ms,
        c.breaker_min_calls,
        c.breaker_failure_rate * 100.0,
        c.breaker_slow_call_rate * 100.0,
        c.breaker_slow_call_ms,
        c.breaker_open_ms,
        c.breaker_half_open_calls,
    );
    if config.publish.deliver_timeout_ms >= c.breaker_slow_call_ms {
        println!(
            "  NOTE: publish.deliver_timeout_ms {} >= client.breaker_slow_call_ms {} (the config \
             refuses this): until node 4's breaker opens every Publish counts as slow at its caller",
            config.publish.deliver_timeout_ms, c.breaker_slow_call_ms
        );
    }

    let bench = Bench {
        publish: PublishServiceClient::new(stack.channel(&dispatch_server.uri())?),
        room_id,
        viewers,
        dispatcher,
        deliver_timeout,
        store,
        node4: proxy_uri,
        args,
    };
    bench.ready_check().await?;
    let healthy = bench.run_phase(0).await?;
    println!("  healthy phase done; black-holing node 4");
    proxy.swallow();
    let degraded = bench.run_phase(1).await?;
    println!("  degraded phase done; timing calls to node 4 through the client stack");
    let reject = open_reject(
        &stack,
        &proxy.uri(),
        bench.args.rejected_calls,
        request_timeout,
    )
    .await?;
    let ended = bench.first_end();

    let load = (load_before, load_average());
    let lost = report(&bench, &healthy, &degraded, &reject, load)?;
    streams.abort_all();
    drop(proxy);
    ensure!(
        ended.is_empty(),
        "figures are void: a viewer's stream ended during the bench{ended}"
    );
    ensure!(
        lost == 0,
        "figures are void: acknowledged comments did not reach a viewer that should have had \
         them, publishes failed, or node 4 dropped out of the room ({lost} in all, see above)"
    );
    Ok(())
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// Prints the table and targets, writes the JSON; the number of lost
/// deliveries and failed publishes.
fn report(
    bench: &Bench,
    healthy: &PhaseResult,
    degraded: &PhaseResult,
    reject: &OpenReject,
    load: (f64, f64),
) -> anyhow::Result<u64> {
    let args = &bench.args;
    println!(
        "  machine load average (1 min) before {:.1}, after {:.1}, on {} cores; every server and \
         every viewer share them with this process",
        load.0,
        load.1,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "  (a) = publish->receive at the viewers of nodes 1-3; (b) = the Publish RPC at the \
         publisher; percentiles in ms, warm-up excluded"
    );
    println!(
        "  {:<9} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>8} {:>9}",
        "phase",
        "pub ok",
        "errors",
        "(a)p50",
        "(a)p99",
        "(a)max",
        "(b)p50",
        "(b)p99",
        "(b)max",
        "slow",
        "missing",
        "dlv fail"
    );
    for (name, r) in PHASES.iter().zip([healthy, degraded]) {
        println!(
            "  {:<9} {:>6} {:>6} {:>7.2} {:>7.2} {:>7.1} {:>7.2} {:>7.2} {:>7.1} {:>6} {:>8} {:>9}",
            name,
            r.ok,
            r.errors,
            r.receive.p50,
            r.receive.p99,
            r.receive.max,
            r.rpc.p50,
            r.rpc.p99,
            r.rpc.max,
            r.slow,
            r.missing,
            r.deliver_failures,
        );
    }
    println!(
        "  warm-up (first {} s of each phase, excluded above; \"slow\" = a Publish over half the \
         {} ms Deliver timeout):",
        args.warmup,
        bench.deliver_timeout.as_millis()
    );
    for (name, r) in PHASES.iter().zip([healthy, degraded]) {
        println!(
            "  {:<9} {} comments; (a) p99 {:.1} max {:.1} ms; (b) p99 {:.1} max {:.1} ms; {} slow; \
             publishes stopped waiting for a dead node {}",
            name,
            r.rpc_warm.count,
            r.receive_warm.p99,
            r.receive_warm.max,
            r.rpc_warm.p99,
            r.rpc_warm.max,
            r.slow_warm,
            r.settled_after.map_or(
                "never (no run of 50 fast publishes)".to_owned(),
                |s| format!("{s:.2} s into the phase")
            ),
        );
        println!(
            "  {:<9} the dispatcher's breaker for node 4: {}",
            "",
            match r.node4.first_open {
                Some(first) => format!(
                    "first open {first:.2} s into the phase, opened {} times, not closed {:.0}% of the phase",
                    r.node4.openings,
                    r.node4.not_closed * 100.0
                ),
                None => "never open".to_owned(),
            }
        );
    }
    for (name, r) in PHASES.iter().zip([healthy, degraded]) {
        if let Some(error) = &r.first_error {
            println!(
                "  {name}: {} publishes failed; the first: {error}",
                r.errors
            );
        }
        if r.duplicates > 0 {
            println!(
                "  {name}: {} comments arrived twice at a viewer",
                r.duplicates
            );
        }
    }
    println!(
        "  node 4's viewers got {:.0} of {} comments while healthy, {:.0} of {} while black-holed \
         (the node catches up from the history when it renews its lease); the dispatcher's \
         Deliver calls answered / failed (with the nodes' viewer-count publishes): healthy {} / {}, \
         degraded {} / {}",
        healthy.node4_received,
        healthy.ok,
        degraded.node4_received,
        degraded.ok,
        healthy.deliveries,
        healthy.deliver_failures,
        degraded.deliveries,
        degraded.deliver_failures,
    );

    let ratio = degraded.receive.p99 / healthy.receive.p99;
    let ratio_rpc = degraded.rpc.p99 / healthy.rpc.p99;
    let open_reject_p99 = if reject.tripped {
        reject.rejected.p99
    } else {
        reject.other.p99
    };
    println!(
        "  ratio_degraded_vs_healthy (a) p99: {ratio:.2}x ({:.2} / {:.2} ms); Publish RPC (b) p99: \
         {ratio_rpc:.2}x ({:.2} / {:.2} ms)",
        degraded.receive.p99, healthy.receive.p99, degraded.rpc.p99, healthy.rpc.p99
    );
    let kinds: Vec<String> = reject
        .other_kinds
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    if reject.tripped {
        println!(
            "  open_reject: the breaker refused a call {:.2} s after the first health check to node \
             4; then {} sequential calls: {} refused as circuit open, p50 {:.3} p99 {:.3} max {:.3} \
             ms; {} not refused{}",
            reject.trip_time.as_secs_f64(),
            reject.calls,
            reject.rejected.count,
            reject.rejected.p50,
            reject.rejected.p99,
            reject.rejected.max,
            reject.other.count,
            if kinds.is_empty() {
                String::new()
            } else {
                format!(" ({}; p99 {:.1} ms)", kinds.join(", "), reject.other.p99)
            },
        );
    } else {
        println!(
            "  open_reject: NO call was refused as circuit open within {:.1} s of health checks to \
             node 4 (no breaker in the client stack?): the figure is the p99 of {} concurrent calls \
             that each waited for their outcome ({}), i.e. the timeout: p50 {:.1} p99 {:.1} ms",
            reject.trip_time.as_secs_f64(),
            reject.calls,
            kinds.join(", "),
            reject.other.p50,
            reject.other.p99,
        );
    }
    let node4_out = healthy.node4.out.0 + degraded.node4.out.0;
    if node4_out > 0 {
        println!(
            "  node 4 was NOT registered for the room in {} of {} samples (healthy) and {} of {} \
             (degraded): the dispatcher skipped it then",
            healthy.node4.out.0, healthy.node4.out.1, degraded.node4.out.0, degraded.node4.out.1
        );
    }
    let lost = healthy.missing + degraded.missing + healthy.errors + degraded.errors + node4_out;
    println!(
        "  targets: ratio_degraded_vs_healthy {ratio:.2} <= 1.5: {}; open_reject_p99_ms {open_reject_p99:.3} \
         <= 1: {}; every acknowledged comment at every healthy viewer, no failed publish, node 4 \
         registered throughout: {}",
        pass(ratio <= 1.5),
        pass(open_reject_p99 <= 1.0),
        pass(lost == 0),
    );

    if let Some(path) = &args.json {
        let mut figures: BTreeMap<&str, f64> = BTreeMap::new();
        figures.insert("healthy_p99_ms", healthy.receive.p99);
        figures.insert("degraded_p99_ms", degraded.receive.p99);
        figures.insert("ratio_degraded_vs_healthy", ratio);
        figures.insert("open_reject_p99_ms", open_reject_p99);
        figures.insert(
            "open_reject_is_timeout",
            f64::from(u8::from(!reject.tripped)),
        );
        figures.insert("open_reject_calls", reject.calls as f64);
        figures.insert("open_reject_refused", reject.rejected.count as f64);
        figures.insert("open_reject_p50_ms", reject.rejected.p50);
        figures.insert("open_reject_trip_s", reject.trip_time.as_secs_f64());
        figures.insert("healthy_p50_ms", healthy.receive.p50);
        figures.insert("degraded_p50_ms", degraded.receive.p50);
        figures.insert("healthy_publish_rpc_p50_ms", healthy.rpc.p50);
        figures.insert("healthy_publish_rpc_p99_ms", healthy.rpc.p99);
        figures.insert("degraded_publish_rpc_p50_ms", degraded.rpc.p50);
        figures.insert("degraded_publish_rpc_p99_ms", degraded.rpc.p99);
        figures.insert("degraded_publish_rpc_max_ms", degraded.rpc.max);
        figures.insert("ratio_publish_rpc_degraded_vs_healthy", ratio_rpc);
        figures.insert("degraded_slow_publishes", degraded.slow as f64);
        figures.insert("degraded_warmup_p99_ms", degraded.receive_warm.p99);
        figures.insert("degraded_warmup_max_ms", degraded.receive_warm.max);
        figures.insert("degraded_warmup_publish_rpc_max_ms", degraded.rpc_warm.max);
        figures.insert("degraded_warmup_slow_publishes", degraded.slow_warm as f64);
        figures.insert(
            "degraded_settled_after_s",
            degraded.settled_after.unwrap_or(f64::NAN),
        );
        figures.insert("healthy_publishes_ok", healthy.ok as f64);
        figures.insert("degraded_publishes_ok", degraded.ok as f64);
        figures.insert("publish_errors", (healthy.errors + degraded.errors) as f64);
        figures.insert(
            "missing_deliveries",
            (healthy.missing + degraded.missing) as f64,
        );
        figures.insert(
            "duplicate_deliveries",
            (healthy.duplicates + degraded.duplicates) as f64,
        );
        figures.insert("healthy_samples", healthy.receive.count as f64);
        figures.insert("degraded_samples", degraded.receive.count as f64);
        figures.insert(
            "degraded_deliver_failures",
            degraded.deliver_failures as f64,
        );
        figures.insert("node4_unregistered_samples", node4_out as f64);
        figures.insert(
            "degraded_breaker_first_open_s",
            degraded.node4.first_open.unwrap_or(f64::NAN),
        );
        figures.insert("degraded_breaker_openings", degraded.node4.openings as f64);
        figures.insert("healthy_breaker_openings", healthy.node4.openings as f64);
        figures.insert("rate", args.rate);
        figures.insert("duration_s", args.duration as f64);
        figures.insert("warmup_s", args.warmup);
        figures.insert("viewers_per_node", args.viewers_per_node as f64);
        figures.insert(
            "deliver_timeout_ms",
            bench.deliver_timeout.as_millis() as f64,
        );
        figures.insert("scheduled_per_phase", healthy.scheduled as f64);
        figures.insert("load_average_before", load.0);
        figures.insert("load_average_after", load.1);
        write_json(path, "breaker", &figures)?;
    }
    Ok(lost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_texts_round_trip_and_others_are_ignored() {
        assert_eq!(
            parse_comment(&comment_text(1, 42, 1_700_000_000_123_456_789)),
            Some((1, 42, 1_700_000_000_123_456_789))
        );
        assert_eq!(parse_comment("ready 0"), None);
        assert_eq!(parse_comment("brk 2 1 1"), None, "no third phase");
        assert_eq!(parse_comment("brk 0 1 1 extra"), None);
        assert_eq!(parse_comment("brk 0 x 1"), None);
    }

    #[test]
    fn summaries_take_nearest_rank_percentiles_and_say_nan_when_empty() {
        let ms = |n: u64| Duration::from_millis(n);
        let summary = Summary::of((1..=100).rev().map(ms).collect());
        assert_eq!(summary.count, 100);
        assert!((summary.p50 - 50.0).abs() < 1e-9, "{summary:?}");
        assert!((summary.p99 - 99.0).abs() < 1e-9, "{summary:?}");
        assert!((summary.max - 100.0).abs() < 1e-9, "{summary:?}");
        assert!(Summary::of(Vec::new()).p99.is_nan());
    }
}
