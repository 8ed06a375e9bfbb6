//! `publish`: the dispatcher, after seed `linkedin-million-likes-per-second`.
//!
//! `Publish(room, event)` gives the event its position (epoch, offset),
//! appends ordered events to the room's bounded history (latest-value
//! events replace the room's newest of their kind), looks up the subscribe
//! nodes that hold viewers of the room, all in one atomic step of the
//! fan-out store, then calls `Deliver` on exactly those nodes, each once,
//! concurrently. A dispatcher with peers (other datacenters) forwards each
//! local ordered event (comment, gift, room ended) to each of them once,
//! marked so that it goes no further; latest values stay local.
//! Room ends come from ongoing-query's Watch: the dispatcher publishes the
//! room-ended event, once whoever else also does.

mod comment;
mod config;
mod dispatch;
mod ends;
mod error;
mod grpc;
mod metrics;
#[cfg(feature = "testing")]
pub mod testing;
pub use crate::config::PublishConfig;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use livemesh_fanout::FanoutStore;
use livemesh_mesh::auth::{Security, policy};
use livemesh_mesh::server::{ServeError, ServerBuilder, ServiceSet};
use livemesh_mesh::{ClientStack, Config, ShutdownSignal};
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::publish_service_server::PublishServiceServer;
use livemesh_rooms::RoomDirectory;

use crate::dispatch::DispatcherInner;
use crate::dispatch::DispatcherSettings;

/// One dispatcher.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    inner: Arc<DispatcherInner>,
    watch: OngoingQueryServiceClient<livemesh_mesh::MeshChannel>,
    security: Security,
}

impl Dispatcher {
    /// A dispatcher on `store` (share one in-process store with the nodes
    /// of the same process), following ongoing-query's Watch as `config`
    /// says (by default this process's own address).
    pub fn from_config(config: &Config, store: FanoutStore) -> anyhow::Result<Self> {
        let c = &*config.section::<PublishConfig>();
        let (security, stack) = ClientStack::for_service(config, policy::PUBLISH)?;
        let ongoing = stack
            .channel(&config.peer_url(&c.ongoing_query_url))
            .context("publish.ongoing_query_url")?;
        let watch = OngoingQueryServiceClient::new(ongoing.clone());
        let settings = DispatcherSettings {
            datacenter: c.datacenter.clone(),
            peers: c.peers.clone(),
            deliver_timeout: Duration::from_millis(c.deliver_timeout_ms),
            max_comment_chars: c.max_comment_chars as usize,
        };
        let inner = DispatcherInner::new(settings, store, stack, RoomDirectory::new(ongoing))
            .context("publish.peers")?;
        Ok(Self {
            inner: Arc::new(inner),
            watch,
            security,
        })
    }
}

impl ServiceSet for Dispatcher {
    fn register(&self, server: &mut ServerBuilder) {
        server.secure(&self.security);
        let max_message = self.security.max_message_bytes();
        server.add_service(
            PublishServiceServer::new(grpc::PublishApi::new(
                self.inner.clone(),
                self.security.clone(),
            ))
            .max_decoding_message_size(max_message)
            .max_encoding_message_size(max_message),
        );
        server.add_background(
            "room ends",
            ends::follow(self.inner.clone(), self.watch.clone()),
        );
    }
}

/// Serves a dispatcher on `listener` until `shutdown`.
pub async fn run(
    dispatcher: Dispatcher,
    listener: tokio::net::TcpListener,
    shutdown: ShutdownSignal,
) -> Result<(), ServeError> {
    livemesh_mesh::server::serve_set(dispatcher, listener, shutdown).await
}

/// The config sections `livemesh-publish` reads: its own `[publish]`, and
/// `[fanout]` for the hot store it shares with the subscribe nodes.
pub fn config_sections() -> livemesh_mesh::config::Registry {
    livemesh_mesh::config::Registry::new()
        .own::<PublishConfig>()
        .with::<livemesh_fanout::FanoutConfig>()
}
