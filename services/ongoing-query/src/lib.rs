//! `ongoing-query`: the rooms table (the system of record for room starts
//! and ends, one per region) and the cache of rooms in front of it that
//! answers `GetRoom`, `ListOngoing` and `Partition` without touching the
//! databases, except `GetRoom`'s read-through on a miss.
//!
//! Freshness: writes through `RoomAdmin` go to the cache at once; changes
//! made anywhere else arrive through each region's change feed (the binlog
//! on MariaDB/MySQL, a trigger-filled change table on SQLite) within
//! milliseconds; a periodic full scan repairs whatever a feed missed.
//! `Watch` streams every change the cache takes in.

mod binlog;
mod cache;
mod changes;
mod config;
mod error;
mod feed;
mod grpc;
mod partition;
mod room;
mod rooms;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
mod watch;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use livemesh_mesh::auth::Security;
use livemesh_mesh::server::{ServeError, ServerBuilder, ServiceSet};
use livemesh_mesh::{Config, ShutdownSignal};
use livemesh_proto::v1::ongoing_query_service_server::OngoingQueryServiceServer;
use livemesh_proto::v1::room_admin_service_server::RoomAdminServiceServer;

pub use crate::config::{RegionConfig, RoomsConfig};
pub use crate::error::RoomError;
use crate::feed::{FeedConfig, FeedStart};
pub use crate::rooms::Rooms;
use crate::store::RegionStore;

/// The ongoing-query service: both room gRPC services plus the periodic scan.
#[derive(Debug, Clone)]
pub struct OngoingQuery {
    rooms: Arc<Rooms>,
    scan_interval: Duration,
    /// The feed settings and each region's start position.
    feed: Option<(FeedConfig, BTreeMap<u16, Option<FeedStart>>)>,
    security: Security,
}

impl OngoingQuery {
    /// Opens every configured region's rooms database (the local one is
    /// `database_url`, or `rooms.db` under the data dir), migrates it, and
    /// fills the cache with a first full scan.
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        let security = Security::from_config(&config.auth)?;
        let section = config.section::<RoomsConfig>();
        let local_url = config
            .database_url
            .clone()
            .unwrap_or_else(|| config.sqlite_url("rooms.db"));
        let mut urls = vec![(section.local_region, local_url)];
        urls.extend(
            section
                .regions
                .iter()
                .map(|r| (r.id, r.database_url.clone())),
        );
        let mut stores = Vec::with_capacity(urls.len());
        for (region, url) in urls {
            if region > room::MAX_REGION {
                anyhow::bail!(
                    "region {region} is above the highest region {}",
                    room::MAX_REGION
                );
            }
            let store = RegionStore::open(region, &url)
                .await
                .with_context(|| format!("rooms database of region {region}"))?;
            stores.push(store);
        }
        let feed = section.feed.then(|| FeedConfig {
            poll: Duration::from_millis(section.feed_poll_ms),
            consumer: FeedConfig::consumer_name(&section.feed_consumer),
            server_id: section.binlog_server_id,
        });
        // Feed positions are taken before the cache is filled: whatever
        // commits during the scan then also arrives through the feed.
        let mut feed_starts = BTreeMap::new();
        if let Some(feed) = &feed {
            for store in &stores {
                let start = feed::start_position(store, &feed.consumer).await;
                feed_starts.insert(store.region(), start);
            }
        }
        let rooms = Rooms::new(
            stores,
            Duration::from_millis(section.ended_retention_ms),
            section.watch_window,
        );
        let report = rooms
            .scan_all()
            .await
            .context("first full scan of the rooms")?;
        tracing::info!(ongoing = report.ongoing, "room cache filled");
        Ok(Self {
            rooms: Arc::new(rooms),
            scan_interval: Duration::from_millis(section.scan_interval_ms),
            feed: feed.map(|config| (config, feed_starts)),
            security,
        })
    }

    pub fn rooms(&self) -> &Arc<Rooms> {
        &self.rooms
    }
}

impl ServiceSet for OngoingQuery {
    fn register(&self, server: &mut ServerBuilder) {
        server.secure(&self.security);
        let max_message = self.security.max_message_bytes();
        let api = grpc::RoomsApi::new(self.rooms.clone(), server.stopping());
        server.add_service(
            OngoingQueryServiceServer::new(api.clone())
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        );
        server.add_service(
            RoomAdminServiceServer::new(api)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        );
        if let Some((feed, starts)) = &self.feed {
            for region in self.rooms.stores().map(|s| s.region()) {
                let start = starts.get(&region).cloned().flatten();
                let task = feed::follow(self.rooms.clone(), region, feed.clone(), start);
                server.add_background("rooms change feed", task);
            }
        }
        let rooms = self.rooms.clone();
        let period = self.scan_interval;
        server.add_background("rooms full scan", async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await; // the first tick is immediate; from_config just scanned
            loop {
                tick.tick().await;
                // Failures are logged and counted inside; the next tick retries.
                let _ = rooms.scan_all().await;
            }
        });
    }
}

/// Serves ongoing-query on `listener` until `shutdown`.
pub async fn run(
    service: OngoingQuery,
    listener: tokio::net::TcpListener,
    shutdown: ShutdownSignal,
) -> Result<(), ServeError> {
    livemesh_mesh::server::serve_set(service, listener, shutdown).await
}

/// The config sections `livemesh-ongoing-query` reads: its own `[rooms]`.
pub fn config_sections() -> livemesh_mesh::config::Registry {
    livemesh_mesh::config::Registry::new().own::<RoomsConfig>()
}
