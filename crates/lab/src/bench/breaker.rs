//! `bench breaker`: what one black-holed subscribe node costs the others.
//!
//! # Set-up (one process)
//!
//! ongoing-query (rooms, SQLite in a temp dir), one dispatcher and four
//! subscribe nodes, each a server on its own loopback port, sharing the
//! embedded in-process fan-out store; one room, `--viewers-per-node`
//! Subscribe streams on every node (each node's streams multiplexed over one
//! HTTP/2 connection, as a BFF holds them). Node 4 registers in the fan-out
//! store under the address of a TCP proxy (`livemesh_testkit::TcpProxy`) that
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

use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use livemesh_fanout::{FanoutSettings, FanoutStore};
use livemesh_mesh::server::LocalServer;
use livemesh_mesh::{ClientStack, Config};
use livemesh_ongoing_query::OngoingQuery;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{StartRoomRequest, SubscribeRequest};
use livemesh_publish::Dispatcher;
use livemesh_subscribe::SubscribeNode;
use livemesh_testkit::{ProxyMode, TcpProxy};
use tokio::task::JoinSet;
use tonic::transport::Endpoint;

use super::helpers::{FiguresFile, load_average, started_room};
use livemesh_publish::PublishConfig;
use livemesh_subscribe::SubscribeConfig;

mod open;
mod phase;
mod report;
mod viewers;

use self::open::open_reject;
use self::phase::Bench;
use self::report::report;
use self::viewers::{Viewer, view};

/// Options of `bench breaker`.
#[derive(Debug, clap::Args)]
pub struct BreakerArgs {
    #[command(flatten)]
    pub out: FiguresFile,
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
    config.section_mut::<SubscribeConfig>().ongoing_query_url = rooms.uri();
    config.section_mut::<PublishConfig>().ongoing_query_url = rooms.uri();
    if let Some(ms) = args.deliver_timeout_ms {
        ensure!(ms >= 1, "--deliver-timeout-ms must be at least 1");
        config.section_mut::<PublishConfig>().deliver_timeout_ms = ms;
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
    config.section_mut::<SubscribeConfig>().publish_url = dispatch_server.uri();
    // Node 4 keeps its viewers fed from the history while black-holed (it
    // sees the gap when it renews its lease) and hands them a lease
    // interval's worth of comments at once: with the default queue they
    // would overflow and end, node 4 would leave the room, and the degraded
    // phase would stop being degraded. Room for two intervals' worth.
    let catch_up =
        (2.0 * args.rate * config.section::<SubscribeConfig>().report_interval_ms as f64 / 1e3)
            .ceil();
    config.section_mut::<SubscribeConfig>().queue_len = config
        .section::<SubscribeConfig>()
        .queue_len
        .max(catch_up as usize);

    let proxy_listener = tokio::net::TcpListener::bind(any).await?;
    let proxy_uri = format!("http://{}", proxy_listener.local_addr()?);
    let mut nodes = Vec::with_capacity(NODES);
    for i in 0..NODES {
        let mut config = config.clone();
        if i == BLACK_HOLED {
            config.section_mut::<SubscribeConfig>().node_url = proxy_uri.clone();
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
    let proxy = TcpProxy::forward(proxy_listener, nodes[BLACK_HOLED].addr())?;

    let stack = ClientStack::new(&config.client);
    let mut admin = RoomAdminServiceClient::new(stack.channel(&rooms.uri())?);
    let room_id = started_room(admin.start_room(StartRoomRequest { anchor_id: 1 }).await)?.room_id;

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

    let deliver_timeout =
        Duration::from_millis(config.section::<PublishConfig>().deliver_timeout_ms);
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
        config.section::<SubscribeConfig>().queue_len,
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
    if config.section::<PublishConfig>().deliver_timeout_ms >= c.breaker_slow_call_ms {
        println!(
            "  NOTE: publish.deliver_timeout_ms {} >= client.breaker_slow_call_ms {} (the config \
             refuses this): until node 4's breaker opens every Publish counts as slow at its caller",
            config.section::<PublishConfig>().deliver_timeout_ms,
            c.breaker_slow_call_ms
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
    proxy.set_mode(ProxyMode::BlackHole);
    let degraded = bench.run_phase(1).await?;
    println!("  degraded phase done; timing calls to node 4 through the client stack");
    let reject = open_reject(
        &stack,
        &proxy.url(),
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

#[cfg(test)]
mod tests {
    use super::phase::Summary;
    use super::viewers::{comment_text, parse_comment};
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
