//! `subscribe`: viewers' server-streaming subscriptions, after seed
//! `linkedin-million-likes-per-second`.
//!
//! Each node keeps an in-memory table room -> local streams (`table/`).
//! The first local viewer of a room registers the node's interest in the
//! hot store (room -> nodes, with a lease the node renews); the last one
//! leaving removes it, and a node that dies drops out when its lease ends.
//! Dispatchers call `Deliver` on exactly the nodes registered for a room;
//! the node encodes each event once and puts it in the room's feed
//! (`feed.rs`): ordered events in offset order (`sequencer.rs`) in a
//! bounded ring, latest values in one slot per kind; each local stream
//! reads the feed at its own pace and writes its pre-encoded bytes
//! (`stream.rs`). `Subscribe` with `resume` replays what the viewer missed
//! from the room's history, then goes live, with no gap and no duplicate at
//! the seam.

mod config;
mod error;
mod feed;
mod grpc;
mod room;
mod sequencer;
mod stream;
mod subscription;
mod table;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use livemesh_fanout::FanoutStore;
use livemesh_mesh::auth::{Security, policy};
use livemesh_mesh::server::{ServeError, ServerBuilder, ServiceSet};
use livemesh_mesh::{ClientStack, Config, ShutdownSignal};
use livemesh_proto::encoded::server::subscribe_service_server::SubscribeServiceServer;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_rooms::RoomDirectory;

pub use crate::config::SubscribeConfig;
pub use crate::error::{RESUME_EPOCH, RESUME_OFFSET};
use crate::table::{NodeInner, NodeSettings};

/// One subscribe node.
#[derive(Debug, Clone)]
pub struct SubscribeNode {
    inner: Arc<NodeInner>,
    max_streams_per_connection: u32,
    security: Security,
}

impl SubscribeNode {
    /// A node on `store` (share one in-process store with the dispatchers
    /// of the same process), calling ongoing-query and the dispatcher as
    /// `config` says (by default this process's own address).
    pub fn from_config(config: &Config, store: FanoutStore) -> anyhow::Result<Self> {
        let c = &*config.section::<SubscribeConfig>();
        let (security, stack) = ClientStack::for_service(config, policy::SUBSCRIBE)?;
        let rooms = RoomDirectory::new(
            stack
                .channel(&config.peer_url(&c.ongoing_query_url))
                .context("subscribe.ongoing_query_url")?,
        );
        let publish = PublishServiceClient::new(
            stack
                .channel(&config.peer_url(&c.publish_url))
                .context("subscribe.publish_url")?,
        );
        let settings = NodeSettings {
            node_id: config.peer_url(&c.node_url),
            queue_len: c.queue_len,
            // A batch stays within the message size every server allows.
            max_batch_bytes: security.max_message_bytes().saturating_sub(64),
            lease: Duration::from_millis(c.lease_ms),
            report_interval: Duration::from_millis(c.report_interval_ms),
            gap_wait: Duration::from_millis(c.gap_wait_ms),
            head_check: Duration::from_millis(c.head_check_ms),
        };
        Ok(Self {
            inner: Arc::new(NodeInner::new(settings, store, rooms, publish)),
            max_streams_per_connection: c.max_streams_per_connection,
            security,
        })
    }
}

impl ServiceSet for SubscribeNode {
    fn register(&self, server: &mut ServerBuilder) {
        server.max_concurrent_streams(self.max_streams_per_connection);
        server.secure(&self.security);
        let max_message = self.security.max_message_bytes();
        server.add_service(
            SubscribeServiceServer::new(grpc::SubscribeApi::new(self.inner.clone()))
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        );
        let inner = self.inner.clone();
        server.add_background("room registrations and viewer counts", async move {
            let mut interval = tokio::time::interval(inner.settings.report_interval);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                inner.renew_once().await;
            }
        });
        if !self.inner.settings.head_check.is_zero() {
            let inner = self.inner.clone();
            server.add_background("head checks of rooms with viewers", async move {
                let mut interval = tokio::time::interval(inner.settings.head_check);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    inner.check_heads_once().await;
                }
            });
        }
        // Viewer streams end (UNAVAILABLE, with their resume position) when
        // shutdown begins, or the drain would wait for them until its timeout.
        let inner = self.inner.clone();
        server.add_shutdown_hook(async move { inner.shut_down().await });
    }
}

/// Serves a subscribe node on `listener` until `shutdown`.
pub async fn run(
    node: SubscribeNode,
    listener: tokio::net::TcpListener,
    shutdown: ShutdownSignal,
) -> Result<(), ServeError> {
    livemesh_mesh::server::serve_set(node, listener, shutdown).await
}

/// The config sections `livemesh-subscribe` reads: its own `[subscribe]`,
/// and `[fanout]` for the hot store it shares with the dispatchers.
pub fn config_sections() -> livemesh_mesh::config::Registry {
    livemesh_mesh::config::Registry::new()
        .own::<SubscribeConfig>()
        .with::<livemesh_fanout::FanoutConfig>()
}
