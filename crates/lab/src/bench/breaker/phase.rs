//! One phase (healthy, then degraded): comments published at a fixed rate,
//! what the publisher and the viewers measured, and its figures.

use crate::bench::helpers::{Latencies, now_ns};
use crate::report::model::QUANTILES;
use anyhow::bail;
use livemesh_fanout::FanoutStore;
use livemesh_mesh::MeshChannel;
use livemesh_mesh::lock;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::{Comment, PublishRequest, RoomEvent, room_event};
use livemesh_publish::Dispatcher;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

use super::open::{Node4Watch, watch_node4};
use super::viewers::{Viewer, comment_text};
use super::{BLACK_HOLED, BreakerArgs, DRAIN_TIMEOUT, READY_EVENTS, SETTLED_RUN};

/// Count, p50, p99 and max of a set of latencies, in milliseconds (NaN when
/// empty), and the distribution at the JSON's quantiles.
#[derive(Debug, Clone, Copy)]
pub(super) struct Summary {
    pub(super) count: usize,
    pub(super) p50: f64,
    pub(super) p99: f64,
    pub(super) max: f64,
    pub(super) percentiles: [f64; QUANTILES.len()],
}

impl Summary {
    pub(super) fn of(samples: Vec<Duration>) -> Self {
        let count = samples.len();
        let all: Latencies = samples.into_iter().collect();
        Self {
            count,
            p50: all.quantile_ms(0.50),
            p99: all.quantile_ms(0.99),
            max: all.quantile_ms(1.0),
            percentiles: all.percentiles(),
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
pub(super) struct PhaseResult {
    pub(super) scheduled: u64,
    pub(super) ok: u64,
    pub(super) errors: u64,
    pub(super) first_error: Option<String>,
    /// (a) publish→receive at nodes 1-3, after / during the warm-up.
    pub(super) receive: Summary,
    pub(super) receive_warm: Summary,
    /// (b) the Publish RPC, after / during the warm-up.
    pub(super) rpc: Summary,
    pub(super) rpc_warm: Summary,
    /// Publishes slower than half the Deliver timeout, after / during the warm-up.
    pub(super) slow: u64,
    pub(super) slow_warm: u64,
    /// Seconds into the phase of the first of `SETTLED_RUN` consecutive
    /// fast, successful publishes.
    pub(super) settled_after: Option<f64>,
    /// Acknowledged comments a viewer that should have had them did not
    /// get, and comments a viewer got twice.
    pub(super) missing: u64,
    pub(super) duplicates: u64,
    /// Comments the average node-4 viewer received.
    pub(super) node4_received: f64,
    /// Deliver calls the dispatcher made that were answered / failed or
    /// timed out (they include the nodes' own viewer-count publishes).
    pub(super) deliveries: u64,
    pub(super) deliver_failures: u64,
    /// Node 4's registration (while it is out, the dispatcher does not call
    /// it and the phase is not what it claims) and the dispatcher's breaker
    /// for it.
    pub(super) node4: Node4Watch,
}

pub(super) struct Bench {
    pub(super) args: BreakerArgs,
    pub(super) publish: PublishServiceClient<MeshChannel>,
    pub(super) room_id: u64,
    pub(super) viewers: Vec<Arc<Viewer>>,
    pub(super) dispatcher: Dispatcher,
    pub(super) deliver_timeout: Duration,
    pub(super) store: FanoutStore,
    /// Node 4's advertised address (the proxy's).
    pub(super) node4: String,
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

    pub(super) async fn ready_check(&self) -> anyhow::Result<()> {
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

    pub(super) fn first_end(&self) -> String {
        self.viewers
            .iter()
            .find_map(|v| lock(&v.ended).clone())
            .map(|why| format!(" (a stream ended: {why})"))
            .unwrap_or_default()
    }

    pub(super) async fn run_phase(&self, phase: usize) -> anyhow::Result<PhaseResult> {
        let stats = self.dispatcher.stats();
        let deliveries_before = stats.deliveries.load(Ordering::Relaxed);
        let failures_before = stats.deliver_failures.load(Ordering::Relaxed);
        let window = Duration::from_secs(self.args.duration);
        let rate = self.args.rate;
        let scheduled = (window.as_secs_f64() * rate).ceil().max(1.0) as u64;
        let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let sampler = tokio::spawn(watch_node4(
            self.store.clone(),
            self.dispatcher.clone(),
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
