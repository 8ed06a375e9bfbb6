//! `counter`: loves (hearts) for live rooms, after seed `line-live-loves`.
//!
//! Clients buffer taps and send them as a list of video timestamps
//! (`SendLoves`). Each batch is validated against abuse ([`validate`]),
//! remembered for retries, and added to the room's pending increments; a
//! flusher writes them as a group commit (a round starts as soon as a batch
//! waits and no round is in flight; what arrives meanwhile goes into the
//! next round), one idempotent write per room to the hot store ([`hot`]: in
//! process, Redis or Redis Cluster); a failed round is retried every
//! `flush_tick_ms`. At most every
//! `publish_tick_ms` the room's new total is published to its viewers.
//! When ongoing-query's Watch says a room ended, its final total and top
//! lovers go to SQL and its hot keys are deleted ([`ends`]). Accepted
//! batches are logged for analytics off the hot path ([`analytics`]).

// SendLoves's handler future (validation, the flush wait, a retry's wait
// for its first attempt, the total) nests deeper than rustc's default
// limit of 128 when its layout is computed.
#![recursion_limit = "256"]

pub mod analytics;
pub mod core;
pub mod ends;
pub mod grpc;
pub mod hot;
pub mod sql;
pub mod validate;

use livemesh_mesh::lock;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use livemesh_mesh::auth::{Security, policy};
use livemesh_mesh::rpc_telemetry::Origins;
use livemesh_mesh::server::{ServeError, ServerBuilder, ServiceSet};
use livemesh_mesh::{ClientStack, Config, MeshChannel, ShutdownSignal};
use livemesh_proto::v1::counter_service_server::CounterServiceServer;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::{LoveTotal, PublishRequest, RoomEvent, room_event};
use tracing::Instrument as _;

use crate::analytics::{AnalyticsLog, Rotation};
use crate::core::CounterCore;
use crate::hot::{HotConfig, HotStore};
use crate::sql::LovesDb;
use crate::validate::Limits;
use livemesh_rooms::RoomDirectory;

/// Shared state of the counter service.
#[derive(Debug)]
pub struct Inner {
    pub core: CounterCore,
    pub rooms: RoomDirectory,
    pub db: LovesDb,
    pub analytics: AnalyticsLog,
    watch_client: OngoingQueryServiceClient<MeshChannel>,
    publish_client: PublishServiceClient<MeshChannel>,
    /// Rooms this replica counted loves for and has not finalised.
    touched: Mutex<HashSet<u64>>,
    /// Rooms being finalised right now.
    ending: Mutex<HashSet<u64>>,
    /// Rooms whose total changed since the last publish tick.
    dirty: Mutex<HashSet<u64>>,
    /// Per room, the trace contexts of the SendLoves calls since its last
    /// publish: the publish tick's span continues their trace.
    origins: Mutex<HashMap<u64, Origins>>,
    end_grace: Duration,
    finaliser_lease: Duration,
    /// The pause before a failed flush round is retried.
    flush_tick: Duration,
    publish_tick: Duration,
    pub publish_failures: AtomicU64,
    pub published: AtomicU64,
    /// Rooms this replica finalised as the lease holder.
    pub finalised_here: AtomicU64,
    /// Late batches (their room was closed) this replica added to final totals.
    pub late_batches: AtomicU64,
}

impl Inner {
    pub(crate) fn touch(&self, room_id: u64) {
        lock(&self.touched).insert(room_id);
    }

    /// Remembers the current call (a SendLoves that counted loves) as an
    /// origin of `room_id`'s next published total.
    pub(crate) fn remember_origin(&self, room_id: u64) {
        if let Some(origin) = Origins::current() {
            let mut origins = lock(&self.origins);
            let room = origins.entry(room_id).or_default();
            if !room.is_full() {
                room.add(origin);
            }
        }
    }

    pub(crate) fn touched_rooms(&self) -> Vec<u64> {
        lock(&self.touched).iter().copied().collect()
    }

    /// True if the caller should finalise `room_id` (nobody else is).
    pub(crate) fn begin_ending(&self, room_id: u64) -> bool {
        lock(&self.ending).insert(room_id)
    }

    /// True while this replica is finalising `room_id`.
    pub fn is_ending(&self, room_id: u64) -> bool {
        lock(&self.ending).contains(&room_id)
    }

    pub(crate) fn done_ending(&self, room_id: u64) {
        lock(&self.ending).remove(&room_id);
        lock(&self.touched).remove(&room_id);
        lock(&self.dirty).remove(&room_id);
        lock(&self.origins).remove(&room_id);
    }

    /// One flush round: write pending increments; mark the rooms for
    /// publishing; add flushes that found their room closed to its final
    /// total in SQL.
    pub async fn flush_once(&self) {
        let report = self.core.flush().await;
        if !report.rooms.is_empty() {
            lock(&self.dirty).extend(report.rooms);
        }
        for (flush, counted) in report.closed {
            let late: Vec<_> = flush
                .batches
                .iter()
                .enumerate()
                .filter(|(i, _)| !counted.contains(i))
                .map(|(_, b)| b.clone())
                .collect();
            let stored = match self.db.add_late(flush.room_id, &late).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(room_id = flush.room_id, %e, "adding late loves to the final total failed; kept for retry");
                    false
                }
            };
            if self.core.settle_late(&flush.flush_id, &counted, stored) {
                self.late_batches
                    .fetch_add(late.len() as u64, Ordering::Relaxed);
                tracing::info!(
                    room_id = flush.room_id,
                    batches = late.len(),
                    "late loves of an ended room added to its final total"
                );
            }
        }
    }

    /// The final numbers of an ended room, once written (late batches added).
    pub async fn final_loves(&self, room_id: u64) -> Result<Option<sql::FinalLoves>, sqlx::Error> {
        self.db.final_with_late(room_id).await
    }

    /// One publish tick: each changed room's new total, once, to its viewers.
    pub async fn publish_once(&self) {
        let rooms: Vec<u64> = lock(&self.dirty).drain().collect();
        let calls = rooms.into_iter().map(|room_id| {
            let span = tracing::info_span!(
                "counter.publish_total",
                room_id,
                total = tracing::field::Empty
            );
            if let Some(origins) = lock(&self.origins).remove(&room_id) {
                origins.adopt(&span);
            }
            self.publish_total(room_id).instrument(span)
        });
        futures::future::join_all(calls).await;
    }

    async fn publish_total(&self, room_id: u64) {
        let Ok(total) = self.core.total(room_id).await else {
            return;
        };
        tracing::Span::current().record("total", total);
        let event = RoomEvent {
            room_id,
            kind: Some(room_event::Kind::LoveTotal(LoveTotal { total })),
            ..RoomEvent::default()
        };
        let request = PublishRequest {
            room_id,
            event: Some(event),
            ..PublishRequest::default()
        };
        match self.publish_client.clone().publish(request).await {
            Ok(_) => {
                self.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => {
                // Counted, never fatal: viewers will see the next total.
                if self
                    .publish_failures
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(1000)
                {
                    tracing::warn!(room_id, %status, "publishing a love total failed (counted; logged once per 1000)");
                }
            }
        }
    }
}

/// The counter service.
#[derive(Clone)]
pub struct Counter {
    inner: Arc<Inner>,
    analytics_writer: Arc<Mutex<Option<BoxFuture<'static, ()>>>>,
    security: Security,
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Counter").finish_non_exhaustive()
    }
}

impl Counter {
    /// Connects the hot store (`redis_url`: one URL, or several
    /// comma-separated for a Cluster; unset: in process), opens the SQL
    /// database, and points the clients at ongoing-query and the dispatcher
    /// (by default this process's own address).
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        let c = &config.counter;
        let hot = HotConfig {
            phase: c.phase.clone(),
            total_shards: c.total_shards,
            top_length: c.top_length,
            batch_ttl_secs: c.batch_ttl_secs,
            closed_ttl_secs: c.closed_ttl_secs,
            wait_replicas: c.wait_replicas,
            wait_timeout_ms: c.wait_timeout_ms,
            ..HotConfig::default()
        };
        let store = match &config.redis_url {
            Some(urls) if !urls.is_empty() => HotStore::connect_with(
                urls,
                hot,
                hot::RedisOptions {
                    breaker: livemesh_mesh::breaker::BreakerSettings::from(&config.client),
                    ..hot::RedisOptions::default()
                },
            )
            .await
            .context("connecting the hot store (redis_url)")?,
            _ => HotStore::memory(hot),
        };
        let database_url = if !c.database_url.is_empty() {
            c.database_url.clone()
        } else if let Some(url) = &config.database_url {
            url.clone()
        } else {
            config.sqlite_url("counter.db")
        };
        let db = LovesDb::open(&database_url)
            .await
            .context("opening the counter's SQL database")?;
        let security = Security::from_config(&config.auth)?;
        let stack = ClientStack::new(&config.client).secured(&security, policy::COUNTER)?;
        let ongoing = stack.channel(&config.peer_url(&c.ongoing_query_url))?;
        let publish = stack.channel(&config.peer_url(&c.publish_url))?;
        let analytics_dir = if c.analytics_dir.is_empty() {
            config.data_dir.join("analytics")
        } else {
            c.analytics_dir.clone().into()
        };
        let (analytics, writer) = analytics::start(
            Rotation {
                dir: analytics_dir,
                max_bytes: c.analytics_max_bytes,
                files: c.analytics_files,
            },
            c.analytics_queue,
        );
        let limits = Limits {
            max_taps: c.max_taps_per_request as usize,
            taps_per_second: c.taps_per_second,
            burst: c.burst,
            future_skew_ms: c.future_skew_ms,
        };
        let inner = Inner {
            core: CounterCore::new(
                limits,
                store,
                c.max_pending_loves,
                Duration::from_millis(c.total_cache_ms),
            ),
            rooms: RoomDirectory::new(ongoing.clone()),
            db,
            analytics,
            watch_client: OngoingQueryServiceClient::new(ongoing),
            publish_client: PublishServiceClient::new(publish),
            touched: Mutex::new(HashSet::new()),
            ending: Mutex::new(HashSet::new()),
            dirty: Mutex::new(HashSet::new()),
            origins: Mutex::new(HashMap::new()),
            end_grace: Duration::from_millis(c.end_grace_ms),
            finaliser_lease: Duration::from_millis(c.finaliser_lease_ms),
            flush_tick: Duration::from_millis(c.flush_tick_ms),
            publish_tick: Duration::from_millis(c.publish_tick_ms),
            publish_failures: AtomicU64::new(0),
            published: AtomicU64::new(0),
            finalised_here: AtomicU64::new(0),
            late_batches: AtomicU64::new(0),
        };
        Ok(Self {
            inner: Arc::new(inner),
            analytics_writer: Arc::new(Mutex::new(Some(Box::pin(writer)))),
            security,
        })
    }

    pub fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

/// Runs `tick` every `period` until dropped.
async fn every<F: Future<Output = ()>>(period: Duration, mut tick: impl FnMut() -> F) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        tick().await;
    }
}

/// The group commit: a flush round starts as soon as a batch waits and no
/// round is in flight, so batches that arrive during a round go into the
/// next one (rounds grow with the load) and a lone batch waits about one
/// store round trip. Flushes the store did not take are retried every
/// `flush_tick` (with whatever arrived meanwhile), not in a tight loop.
async fn flusher(inner: &Inner) {
    loop {
        if inner.core.retrying() {
            tokio::time::sleep(inner.flush_tick).await;
        } else if !inner.core.has_pending() {
            inner.core.work_arrived().await;
        }
        inner.flush_once().await;
    }
}

impl ServiceSet for Counter {
    fn register(&self, server: &mut ServerBuilder) {
        server.secure(&self.security);
        let max_message = self.security.max_message_bytes();
        server.add_service(
            CounterServiceServer::new(grpc::CounterApi::new(self.inner.clone()))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        );
        let inner = self.inner.clone();
        server.add_background("loves flusher", async move {
            flusher(&inner).await;
        });
        let inner = self.inner.clone();
        server.add_background("love totals publisher", async move {
            every(inner.publish_tick, || inner.publish_once()).await;
        });
        let inner = self.inner.clone();
        server.add_background("idle viewers pruner", async move {
            every(Duration::from_secs(60), || async {
                inner.core.prune_viewers(livemesh_mesh::now_ms());
            })
            .await;
        });
        server.add_background("room ends", ends::follow(self.inner.clone()));
        // Loves accepted but not yet written go out before the process ends.
        let inner = self.inner.clone();
        server.add_shutdown_hook(async move {
            inner.flush_once().await;
            // Rounds are capped in size: the rest, unless the store fails.
            while inner.core.has_pending() && !inner.core.retrying() {
                inner.flush_once().await;
            }
            if inner.core.waiting() > 0 {
                tracing::error!(
                    waiting = inner.core.waiting(),
                    "shutting down with loves the hot store did not take"
                );
            }
        });
        if let Some(writer) = lock(&self.analytics_writer).take() {
            server.add_background("analytics log", writer);
        }
    }
}

/// Serves the counter on `listener` until `shutdown`.
pub async fn run(
    counter: Counter,
    listener: tokio::net::TcpListener,
    shutdown: ShutdownSignal,
) -> Result<(), ServeError> {
    livemesh_mesh::server::serve_set(counter, listener, shutdown).await
}
