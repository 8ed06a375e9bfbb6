//! NATS's side: the same layout through a private nats-server.

use anyhow::{Context as _, ensure};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

use super::node::open_limit;
use super::recorder::{Recorder, follow_nats};
use super::windows::{Target, measure_windows};
use super::{FanoutArgs, Layout, Measured};

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

pub(super) async fn run_nats(
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
        let subscriber = client
            .subscribe(subjects[i % subjects.len()].clone())
            .await
            .context("NATS subscribe")?;
        receivers.spawn(follow_nats(
            subscriber,
            rec.clone(),
            ready.clone(),
            Some(running.clone()),
        ));
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
