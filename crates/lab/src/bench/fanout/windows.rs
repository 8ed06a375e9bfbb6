//! Publishing: the same measurement windows for both sides (saturation,
//! then a paced rate).

use crate::bench::helpers::now_ns;
use anyhow::{Context as _, bail};
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::{Comment, PublishRequest, RoomEvent, room_event};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tonic::transport::Channel;

use super::recorder::Recorder;
use super::{CpuMeter, FanoutArgs, NodeHops, PUBLISHER_VIEWER, Window};
use livemesh_live::figures::names;
use livemesh_live::prom::{Endpoint, Sample, quantile};

pub(super) enum Target {
    Livemesh {
        client: PublishServiceClient<Channel>,
        rooms: Vec<u64>,
        /// The node's Prometheus endpoint: its own hops.
        metrics: Endpoint,
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
            Target::Livemesh { client, rooms, .. } => {
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

    /// The node's metrics now; `None` for NATS, or when the node's
    /// endpoint does not answer (said once per window).
    async fn node_sample(&self) -> Option<Sample> {
        let Target::Livemesh { metrics, .. } = self else {
            return None;
        };
        match metrics.scrape(Duration::from_secs(5)).await {
            Ok(text) => Some(Sample::parse(&text)),
            Err(err) => {
                println!("  (the node's hops are left out: {err:#})");
                None
            }
        }
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
pub(super) async fn measure_windows(
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
        percentiles: rec.percentiles(),
        last_hop_ms: rec.last_hop_ms(),
        node_hops: None,
        undelivered,
        server_cpu_us,
        client_cpu_us,
        server_writes_per_k,
    })
}

pub(super) async fn paced(
    args: &FanoutArgs,
    server_pid: Option<u32>,
    target: &Arc<Target>,
    rec: &Arc<Recorder>,
    counts: &Arc<Vec<i64>>,
    window: Duration,
    rate: f64,
) -> anyhow::Result<Window> {
    rec.reset_histogram();
    let node_before = target.node_sample().await;
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
    let node_hops = match node_before {
        Some(before) => target
            .node_sample()
            .await
            .and_then(|after| NodeHops::between(&before, &after)),
        None => None,
    };
    Ok(Window {
        events_per_s: sent as f64 / elapsed,
        delivered_per_s: delivered as f64 / elapsed,
        p50_ms: rec.quantile_ms(0.50),
        p99_ms: rec.quantile_ms(0.99),
        percentiles: rec.percentiles(),
        last_hop_ms: rec.last_hop_ms(),
        node_hops,
        undelivered,
        server_cpu_us,
        client_cpu_us,
        server_writes_per_k,
    })
}

pub(super) fn first_end(rec: &Recorder) -> String {
    rec.first_end
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .as_ref()
        .map(|why| format!("; the first: {why}"))
        .unwrap_or_default()
}

impl NodeHops {
    /// The node's hops between two samples of its metrics; `None` when
    /// either histogram saw nothing in between.
    fn between(before: &Sample, after: &Sample) -> Option<Self> {
        let hop = |name: &str| {
            let (b, a) = (before.buckets(name), after.buckets(name));
            Some((
                quantile(&b, &a, 0.5)? * 1_000.0,
                quantile(&b, &a, 0.99)? * 1_000.0,
            ))
        };
        Some(Self {
            deliver: hop(names::DELIVER_DELAY)?,
            write: hop(names::WRITE_DELAY)?,
        })
    }
}
