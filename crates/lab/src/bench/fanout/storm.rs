//! `bench fanout`'s storm layout: one room in a comment storm (LINE's chat
//! seed: 10,000 comments a minute), plus 10 love totals a second and a
//! viewer count a second, watched by more and more viewers until the
//! publish→receive p99 of the comments passes [`STORM_P99_MS`].
//!
//! livemesh's viewers subscribe with `accept_batches`: each message carries
//! whatever waited for the stream. NATS gets one message per comment (and
//! per total and count), on one subject, over the same number of
//! connections. Per side, on one node (livemesh) or server (NATS) kept for
//! the whole ramp:
//!
//! 1. open `--storm-start` viewers, run the storm for a warm-up second and
//!    then a measured window of `--storm-window` seconds (open loop: a 1 ms
//!    ticker publishes whatever is due), drain, and read the p99 of the
//!    comments received in the window;
//! 2. a level passes when p99 ≤ 75 ms and every comment reached every
//!    viewer (no stream ended, no slow-consumer drop); double the viewers
//!    (opening the extra ones) until a level fails or `--storm-max` is
//!    reached;
//! 3. bisect between the largest passing and the smallest failing level
//!    (closing or opening viewers) for up to three more levels.
//!
//! The result is the largest level that passed (`storm_viewers`,
//! `nats_storm_viewers`); 0 when even the first failed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{
    Comment, LoveTotal, PublishRequest, RoomEvent, StartRoomRequest, SubscribeRequest, ViewerCount,
    room_event,
};
use tokio::sync::Semaphore;
use tokio::task::{AbortHandle, JoinSet};
use tonic::transport::Channel;

use super::{
    CpuMeter, FanoutArgs, Node, OPEN_CONCURRENCY, Opening, PUBLISHER_VIEWER, Recorder, connect,
    follow_nats, nats_connect, nats_pid, open_limit, viewer,
};
use crate::bench::helpers::{now_ns, started_room};

/// Comments per second: 10,000 a minute.
pub(super) const COMMENTS_PER_S: f64 = 10_000.0 / 60.0;
/// Love totals per second (a counter's publish tick).
pub(super) const TOTALS_PER_S: f64 = 10.0;
/// Viewer counts per second.
pub(super) const COUNTS_PER_S: f64 = 1.0;
/// A level passes while the comments' publish→receive p99 stays within this.
pub(super) const STORM_P99_MS: f64 = 75.0;
/// Unmeasured storm before each level's window.
const WARM_UP: Duration = Duration::from_secs(1);
/// Bisection steps after the doubling found a failing level.
const REFINE_STEPS: usize = 3;

/// One measured level.
#[derive(Debug, Clone, Copy)]
pub(super) struct Level {
    pub viewers: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Comment deliveries per second in the window.
    pub delivered_per_s: f64,
    /// Comment deliveries missing after the drain.
    pub undelivered: i64,
    /// Streams that ended or subscriptions that dropped messages.
    pub lost: u64,
    /// Server CPU µs per comment delivery in the window (it also did the
    /// totals and counts).
    pub server_cpu_us: f64,
    pub pass: bool,
}

/// What a side's ramp found.
#[derive(Debug, Clone, Default)]
pub(super) struct Storm {
    /// The largest level that passed (0: none).
    pub viewers: u64,
    pub levels: Vec<Level>,
}

impl Storm {
    /// The level that passed with the most viewers.
    pub fn best(&self) -> Option<&Level> {
        self.levels
            .iter()
            .filter(|l| l.pass)
            .max_by_key(|l| l.viewers)
    }
}

/// What a storm publishes next.
#[derive(Debug, Clone, Copy)]
enum Publish {
    /// A comment stamped with its send time; counted at every viewer.
    Comment,
    LoveTotal(u64),
    ViewerCount(u64),
}

/// One side of the storm: its viewers and how to publish.
enum Side {
    Livemesh {
        node_pid: u32,
        publisher: PublishServiceClient<Channel>,
        room: u64,
        channels: Vec<Channel>,
    },
    Nats {
        clients: Vec<async_nats::Client>,
        publisher: async_nats::Client,
        payload: usize,
        slow: Arc<AtomicU64>,
    },
}

const SUBJECT: &str = "storm.room";

impl Side {
    fn name(&self) -> &'static str {
        match self {
            Side::Livemesh { .. } => "livemesh",
            Side::Nats { .. } => "NATS",
        }
    }

    fn server_pid(&self) -> Option<u32> {
        match self {
            Side::Livemesh { node_pid, .. } => Some(*node_pid),
            Side::Nats { .. } => nats_pid(),
        }
    }

    fn lost(&self, rec: &Recorder) -> u64 {
        rec.ended.load(Ordering::Relaxed)
            + match self {
                Side::Nats { slow, .. } => slow.load(Ordering::Relaxed),
                Side::Livemesh { .. } => 0,
            }
    }

    async fn publish(&self, what: Publish) -> anyhow::Result<()> {
        match self {
            Side::Livemesh {
                publisher, room, ..
            } => {
                let kind = match what {
                    Publish::Comment => room_event::Kind::Comment(Comment {
                        viewer_id: PUBLISHER_VIEWER,
                        text: now_ns().to_string(),
                    }),
                    Publish::LoveTotal(total) => room_event::Kind::LoveTotal(LoveTotal { total }),
                    Publish::ViewerCount(count) => {
                        room_event::Kind::ViewerCount(ViewerCount { count })
                    }
                };
                publisher
                    .clone()
                    .publish(PublishRequest {
                        room_id: *room,
                        event: Some(RoomEvent {
                            kind: Some(kind),
                            ..RoomEvent::default()
                        }),
                        ..PublishRequest::default()
                    })
                    .await
                    .map_err(|status| anyhow::anyhow!("Publish failed: {status}"))?;
            }
            Side::Nats {
                publisher, payload, ..
            } => {
                // Totals and counts start with a letter: not parsed as a send time.
                let mut body = match what {
                    Publish::Comment => now_ns().to_string(),
                    Publish::LoveTotal(total) => format!("T{total}"),
                    Publish::ViewerCount(count) => format!("V{count}"),
                }
                .into_bytes();
                if matches!(what, Publish::Comment) {
                    body.resize((*payload).max(body.len()), b' ');
                }
                publisher
                    .publish(SUBJECT, body.into())
                    .await
                    .context("NATS publish")?;
            }
        }
        Ok(())
    }
}

/// The viewers of one side, opened and closed as the ramp goes.
struct Viewers {
    rec: Arc<Recorder>,
    tasks: JoinSet<()>,
    open: Vec<AbortHandle>,
    next_id: u64,
}

impl Viewers {
    /// Opens or closes viewers until `n` are open.
    async fn resize(&mut self, side: &Side, n: u64) -> anyhow::Result<()> {
        while self.open.len() as u64 > n {
            if let Some(handle) = self.open.pop() {
                handle.abort();
            }
        }
        let more = n.saturating_sub(self.open.len() as u64);
        if more == 0 {
            return Ok(());
        }
        let started = Instant::now();
        match side {
            Side::Livemesh { room, channels, .. } => {
                let opening = Arc::new(Opening::default());
                let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
                for _ in 0..more {
                    let permit = gate.clone().acquire_owned().await?;
                    let id = self.next_id;
                    self.next_id += 1;
                    let channel = channels[id as usize % channels.len()].clone();
                    self.open.push(self.tasks.spawn(viewer(
                        SubscribeServiceClient::new(channel),
                        SubscribeRequest {
                            room_id: *room,
                            viewer_id: 1_000_000 + id,
                            resume: None,
                            accept_batches: true,
                            stamp_writes: false,
                        },
                        self.rec.clone(),
                        opening.clone(),
                        permit,
                    )));
                }
                opening
                    .wait(more, open_limit(more), "storm viewers")
                    .await?;
            }
            Side::Nats {
                clients, publisher, ..
            } => {
                let ready = Arc::new(AtomicU64::new(0));
                for _ in 0..more {
                    let id = self.next_id;
                    self.next_id += 1;
                    let client = &clients[id as usize % clients.len()];
                    let subscriber = client.subscribe(SUBJECT).await.context("NATS subscribe")?;
                    let follow = follow_nats(subscriber, self.rec.clone(), ready.clone(), None);
                    self.open.push(self.tasks.spawn(follow));
                }
                for client in clients {
                    client.flush().await.context("NATS flush")?;
                }
                // Probes until every new subscription has seen one (the
                // older ones ignore them: no send time in them).
                let deadline = Instant::now() + open_limit(more);
                while ready.load(Ordering::Acquire) < more {
                    ensure!(
                        Instant::now() < deadline,
                        "only {} of {more} NATS storm subscriptions got a probe",
                        ready.load(Ordering::Acquire)
                    );
                    publisher
                        .publish(SUBJECT, "probe".into())
                        .await
                        .context("NATS publish")?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        println!(
            "  {} storm: {more} more viewers open in {:.1} s ({} in all)",
            side.name(),
            started.elapsed().as_secs_f64(),
            self.open.len()
        );
        Ok(())
    }
}

/// Runs the storm on `side` with `viewers` open: a warm-up, then the
/// measured window, then the drain.
async fn level(
    side: &Arc<Side>,
    rec: &Arc<Recorder>,
    viewers: u64,
    window: Duration,
) -> anyhow::Result<Level> {
    let lost_before = side.lost(rec);
    let started = Instant::now();
    let measure_from = started + WARM_UP;
    let stop = measure_from + window;
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut calls = JoinSet::new();
    let (mut comments, mut totals, mut counts) = (0_u64, 0_u64, 0_u64);
    let mut measuring: Option<(CpuMeter, u64, Instant)> = None;
    while Instant::now() < stop {
        ticker.tick().await;
        if measuring.is_none() && Instant::now() >= measure_from {
            rec.reset_histogram();
            measuring = Some((
                CpuMeter::start(side.server_pid()),
                rec.delivered.load(Ordering::Acquire),
                Instant::now(),
            ));
        }
        let elapsed = started.elapsed().as_secs_f64();
        let due = |rate: f64| (elapsed * rate) as u64 + 1;
        let mut publish = |what: Publish| {
            let side = side.clone();
            calls.spawn(async move { side.publish(what).await });
        };
        while comments < due(COMMENTS_PER_S) {
            rec.outstanding.fetch_add(viewers as i64, Ordering::AcqRel);
            comments += 1;
            publish(Publish::Comment);
        }
        while totals < due(TOTALS_PER_S) {
            totals += 1;
            publish(Publish::LoveTotal(totals * 37));
        }
        while counts < due(COUNTS_PER_S) {
            counts += 1;
            publish(Publish::ViewerCount(viewers));
        }
        while let Some(joined) = calls.try_join_next() {
            joined??;
        }
    }
    let (cpu, delivered_before, measured_at) =
        measuring.context("the storm window never started")?;
    let delivered = rec.delivered.load(Ordering::Acquire) - delivered_before;
    let elapsed = measured_at.elapsed().as_secs_f64();
    let (server_cpu_us, _) = cpu.per_delivery(delivered);
    while let Some(joined) = calls.join_next().await {
        joined??;
    }
    let undelivered = rec.drain(Duration::from_secs(5)).await;
    let lost = side.lost(rec) - lost_before;
    let p99_ms = rec.quantile_ms(0.99);
    Ok(Level {
        viewers,
        p50_ms: rec.quantile_ms(0.50),
        p99_ms,
        delivered_per_s: delivered as f64 / elapsed,
        undelivered,
        lost,
        server_cpu_us,
        pass: p99_ms <= STORM_P99_MS && undelivered == 0 && lost == 0,
    })
}

/// The storm ramp's settings.
pub(super) struct StormSettings {
    pub start: u64,
    pub max: u64,
    pub window: Duration,
    pub connections: u64,
}

/// The ramp on one side: doubling, then bisection.
async fn ramp(side: Side, settings: &StormSettings) -> anyhow::Result<Storm> {
    let side = Arc::new(side);
    let rec = Recorder::new();
    let mut viewers = Viewers {
        rec: rec.clone(),
        tasks: JoinSet::new(),
        open: Vec::new(),
        next_id: 0,
    };
    let mut storm = Storm::default();
    let mut passed: Option<u64> = None;
    let mut failed: Option<u64> = None;
    let mut n = settings.start.min(settings.max);
    let mut refined = 0;
    loop {
        viewers.resize(&side, n).await?;
        let level = level(&side, &rec, n, settings.window).await?;
        println!(
            "  {} storm, {n} viewers: p50 {:.1} ms, p99 {:.1} ms, {:.0} comment deliveries/s, \
             server {:.2} µs per delivery, {} undelivered, {} lost: {}",
            side.name(),
            level.p50_ms,
            level.p99_ms,
            level.delivered_per_s,
            level.server_cpu_us,
            level.undelivered,
            level.lost,
            if level.pass { "pass" } else { "FAIL" }
        );
        storm.levels.push(level);
        if level.pass {
            passed = Some(passed.map_or(n, |p| p.max(n)));
        } else {
            failed = Some(failed.map_or(n, |f| f.min(n)));
        }
        n = match (passed, failed) {
            (Some(p), None) if p < settings.max => (p * 2).min(settings.max),
            (Some(_), None) => break,
            (lo, Some(hi)) => {
                let lo = lo.unwrap_or(0);
                if refined == REFINE_STEPS || hi - lo <= (lo / 10).max(50) {
                    break;
                }
                refined += 1;
                (lo + hi) / 2
            }
            (None, None) => break,
        };
    }
    storm.viewers = passed.unwrap_or(0);
    viewers.tasks.shutdown().await;
    Ok(storm)
}

/// livemesh's side: a fresh node, one room, viewers with `accept_batches`.
pub(super) async fn livemesh(settings: &StormSettings) -> anyhow::Result<Storm> {
    let node = Node::start(settings.max.div_ceil(settings.connections)).await?;
    let uri = node.uri();
    let control = connect(&uri).await?;
    let room = started_room(
        RoomAdminServiceClient::new(control.clone())
            .start_room(StartRoomRequest { anchor_id: 9_999 })
            .await,
    )?
    .room_id;
    let mut channels = Vec::with_capacity(settings.connections as usize);
    for _ in 0..settings.connections {
        channels.push(connect(&uri).await?);
    }
    let side = Side::Livemesh {
        node_pid: node.pid,
        publisher: PublishServiceClient::new(control),
        room,
        channels,
    };
    let storm = ramp(side, settings).await?;
    node.stop().await?;
    Ok(storm)
}

/// NATS's side: one subject, one message per comment, total and count.
pub(super) async fn nats(
    settings: &StormSettings,
    url: &str,
    payload: usize,
) -> anyhow::Result<Storm> {
    let slow = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::with_capacity(settings.connections as usize);
    for _ in 0..settings.connections {
        clients.push(nats_connect(url, &slow).await?);
    }
    let publisher = nats_connect(url, &slow).await?;
    let side = Side::Nats {
        clients,
        publisher,
        payload,
        slow,
    };
    ramp(side, settings).await
}

/// The settings from the bench's options.
pub(super) fn settings(args: &FanoutArgs, connections: u64) -> StormSettings {
    StormSettings {
        start: args.storm_start,
        max: args.storm_max.unwrap_or(args.streams),
        window: Duration::from_secs_f64(args.storm_window),
        connections,
    }
}
