//! `counter`: loves (hearts) for live rooms, after seed `line-live-loves`.
//!
//! Clients buffer taps and send them as a list of video timestamps
//! (`SendLoves`). Each batch is validated against abuse (`validate.rs`),
//! remembered for retries, and added to the room's pending increments; a
//! flusher writes them as a group commit (a round starts as soon as a batch
//! waits and no round is in flight; what arrives meanwhile goes into the
//! next round), one idempotent write per room to the hot store (`store/hot`: in
//! process, Redis or Redis Cluster); a failed round is retried every
//! `flush_tick_ms`. At most every
//! `publish_tick_ms` the room's new total is published to its viewers.
//! When ongoing-query's Watch says a room ended, its final total and top
//! lovers go to SQL and its hot keys are deleted (`ends.rs`). Accepted
//! batches are logged for analytics off the hot path (`analytics.rs`).

// SendLoves's handler future (validation, the flush wait, a retry's wait
// for its first attempt, the total) nests deeper than rustc's default
// limit of 128 when its layout is computed.
#![recursion_limit = "256"]

mod analytics;
mod config;
mod core;
mod ends;
mod error;
mod grpc;
mod inner;
mod loves;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod validate;
pub use crate::config::CounterConfig;

use livemesh_mesh::lock;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use livemesh_mesh::auth::{Security, policy};
use livemesh_mesh::server::{ServeError, ServerBuilder, ServiceSet};
use livemesh_mesh::{ClientStack, Config, ShutdownSignal};
use livemesh_proto::v1::counter_service_server::CounterServiceServer;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_rooms::RoomDirectory;

use crate::analytics::Rotation;
use crate::core::CounterCore;
use crate::inner::Inner;
use crate::store::hot::{self, HotConfig, HotStore};
use crate::store::sql::LovesDb;
use crate::validate::Limits;

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
        let c = &*config.section::<CounterConfig>();
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
        let store = match config.redis_urls() {
            Some(urls) => HotStore::connect_with(
                urls,
                hot,
                hot::RedisOptions {
                    breaker: livemesh_mesh::breaker::BreakerSettings::from(&config.client),
                    ..hot::RedisOptions::default()
                },
            )
            .await
            .context("connecting the hot store (redis_url)")?,
            None => HotStore::memory(hot),
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
        let (security, stack) = ClientStack::for_service(config, policy::COUNTER)?;
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
            inner::flusher(&inner).await;
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

/// The config sections `livemesh-counter` reads: its own `[counter]`.
pub fn config_sections() -> livemesh_mesh::config::Registry {
    livemesh_mesh::config::Registry::new().own::<CounterConfig>()
}
