//! The live broadcast after the walkthrough, on the same in-process mesh:
//! a room starts, a crowd of viewers subscribes over a few HTTP/2
//! connections ([`crowd`](super::crowd)), taps loves in bursts, comments
//! and sends gifts ([`traffic`](super::traffic)), while a live view
//! ([`crate::live`]) shows what the mesh does, read from this process's own
//! metrics as `livemesh top` reads a running mesh's. The room ends, and the
//! view closes on the top lovers and the room's settlement with its
//! reconciliation; the run fails unless every viewer saw the end and the
//! numbers agree.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use livemesh_mesh::MeshChannel;
use livemesh_mesh::metrics::Metrics;
use livemesh_proto::time::ms_from_timestamp;
use livemesh_proto::v1::{EndRoomRequest, GetLovesRequest, StartRoomRequest};
use tokio::sync::watch;

use super::crowd::Crowd;
use super::traffic::{self, Accepted, Plan};
use super::{Clients, money, step};
use livemesh_live::figures::{Figures, Percentiles, Window};
use livemesh_live::prom::Sample;
use livemesh_live::view::View;

/// The broadcast's size and length.
#[derive(Debug, Clone)]
pub struct Broadcast {
    pub viewers: u64,
    pub duration: Duration,
    /// HTTP/2 connections the viewers are spread over.
    pub connections: usize,
    pub comments_per_s: u32,
    pub gifts_per_s: u32,
    /// Plain lines even on a terminal.
    pub plain: bool,
}

impl Default for Broadcast {
    fn default() -> Self {
        Self {
            viewers: 2_000,
            duration: Duration::from_secs(20),
            connections: 8,
            comments_per_s: 10,
            gifts_per_s: 2,
            plain: false,
        }
    }
}

/// The streamer of the live room, and the first viewer id of its crowd.
const STREAMER: u64 = 2_001;
const FIRST_VIEWER: u64 = 100_000;

/// Runs the broadcast on the mesh behind `channels` (the first is the
/// script's own); `metrics` is this process's, which the view reads.
pub(super) async fn run(
    c: &mut Clients,
    channels: Vec<MeshChannel>,
    metrics: &Metrics,
    plan: &Broadcast,
    platform_cut_bps: u32,
) -> anyhow::Result<()> {
    step(&format!(
        "live: anchor {STREAMER} goes live; {} viewers join over {} HTTP/2 connections",
        plan.viewers,
        channels.len()
    ));
    let room = c
        .admin
        .start_room(StartRoomRequest {
            anchor_id: STREAMER,
        })
        .await?
        .into_inner()
        .room
        .context("StartRoom returned no room")?;
    let room_id = room.room_id;
    let joining = Instant::now();
    let crowd = Crowd::join(
        &channels,
        room_id,
        plan.viewers,
        FIRST_VIEWER,
        Duration::from_secs(30).max(Duration::from_millis(10) * plan.viewers as u32),
    )
    .await?;
    println!(
        "  room {room_id}: {} streams open in {:.1} s; now they tap, comment and send gifts for {:?}",
        plan.viewers,
        joining.elapsed().as_secs_f64(),
        plan.duration
    );

    let accepted = Arc::new(Accepted::default());
    let (stop, stopped) = watch::channel(false);
    let traffic = tokio::spawn(traffic::run(
        channels.clone(),
        Plan {
            room_id,
            started_at_ms: room
                .started_at
                .as_ref()
                .map_or_else(livemesh_mesh::now_ms, ms_from_timestamp),
            viewers: plan.viewers,
            first_viewer: FIRST_VIEWER,
            comments_per_s: plan.comments_per_s,
            gifts_per_s: plan.gifts_per_s,
        },
        accepted.clone(),
        stopped,
    ));

    let mut view = View::new(format!("livemesh demo: room {room_id}"), plan.plain);
    let refresh = if view.in_place() {
        Duration::from_millis(250)
    } else {
        Duration::from_secs(1)
    };
    let mut watcher = Watcher::new(metrics, &crowd);
    let started = Instant::now();
    let mut ticker = tokio::time::interval(refresh);
    ticker.tick().await;
    while started.elapsed() < plan.duration {
        ticker.tick().await;
        view.show(&watcher.figures(started, "live"));
    }

    // The stream ends: the viewers' last taps land, then the anchor ends
    // the room and every stream closes with the room-ended event.
    let _ = stop.send(true);
    traffic.await.context("the viewers' traffic task")?;
    c.admin
        .end_room(EndRoomRequest { room_id })
        .await
        .context("EndRoom")?;
    let ending = Instant::now();
    while !crowd.all_ended() && ending.elapsed() < Duration::from_secs(20) {
        ticker.tick().await;
        view.show(&watcher.figures(started, "the room ended; streams closing"));
    }
    view.show(&watcher.summary(started));
    view.close();
    let stats = crowd.stats.clone();
    crowd.finished().await?;

    let errors = accepted.errors.load(Ordering::Relaxed);
    let (loves, comments, gifts, gross) = (
        accepted.loves.load(Ordering::Relaxed),
        accepted.comments.load(Ordering::Relaxed),
        accepted.gifts.load(Ordering::Relaxed),
        accepted.gross.load(Ordering::Relaxed),
    );
    println!(
        "  {} viewers saw the room end; {} events received in all, {} streams resumed after \
         falling behind",
        plan.viewers,
        stats.received.load(Ordering::Relaxed),
        stats.resumed.load(Ordering::Relaxed)
    );
    println!(
        "  accepted: {loves} loves, {comments} comments, {gifts} gifts worth {gross}; {errors} calls failed"
    );
    if errors > 0 {
        let first = accepted
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
            .unwrap_or_default();
        anyhow::bail!("{errors} of the viewers' calls failed, the first: {first}");
    }

    step(&format!(
        "room {room_id}'s top lovers (CounterService.TopLovers)"
    ));
    let total = c
        .counter
        .get_loves(GetLovesRequest { room_id })
        .await?
        .into_inner()
        .total;
    println!("  GetLoves: {total} loves in all, {loves} accepted by SendLoves");
    ensure!(
        total == loves,
        "the room's total is {total}, but SendLoves accepted {loves}"
    );
    money::print_top_lovers(&mut c.counter, room_id, 5).await?;
    money::settlement_statement(
        &mut c.settlement,
        &mut c.gifts,
        room_id,
        gross,
        platform_cut_bps,
    )
    .await
}

/// Turns this process's metrics and the crowd's own figures into the view's.
struct Watcher<'a> {
    metrics: &'a Metrics,
    crowd: &'a Crowd,
    first: Sample,
    window: Window,
}

impl<'a> Watcher<'a> {
    fn new(metrics: &'a Metrics, crowd: &'a Crowd) -> Self {
        let first = Sample::parse(&metrics.render());
        Self {
            metrics,
            crowd,
            window: Window::new(first.clone(), Duration::from_secs(1)),
            first,
        }
    }

    /// The last second's figures.
    fn figures(&mut self, started: Instant, note: &str) -> Figures {
        let now = Sample::parse(&self.metrics.render());
        let figures = self.window.push(now, started.elapsed().as_secs_f64());
        self.with_crowd(figures, false, note)
    }

    /// The whole broadcast's figures: its averages and percentiles.
    fn summary(&mut self, started: Instant) -> Figures {
        let now = Sample::parse(&self.metrics.render());
        let mut figures = Figures::between(&self.first, &now, started.elapsed().as_secs_f64());
        // Every stream has closed by now: the audience the room had.
        figures.viewers = self.crowd.size() as f64;
        self.with_crowd(
            figures,
            true,
            "the room ended: rates and percentiles over the whole broadcast",
        )
    }

    fn with_crowd(&self, mut figures: Figures, whole: bool, note: &str) -> Figures {
        let stats = &self.crowd.stats;
        // The room's total as its viewers see it (the metric counts every
        // love this process took, the walkthrough's too).
        figures.loves_total = stats.love_total.load(Ordering::Relaxed) as f64;
        figures.end_to_end = Some(stats.latency(whole).map_or_else(
            Percentiles::default,
            |(p50, p99)| Percentiles {
                p50: Some(p50),
                p99: Some(p99),
            },
        ));
        figures.note = format!(
            "{note}; watching {}, events received {}, resumed {}",
            stats.watching.load(Ordering::Relaxed),
            stats.received.load(Ordering::Relaxed),
            stats.resumed.load(Ordering::Relaxed)
        );
        figures
    }
}
