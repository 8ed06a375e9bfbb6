//! `gift-settler`: paid gifts through per-room virtual accounts in sharded
//! balance databases, after seed `scalable-live-interactive-service-part2`
//! ("Account Transporting").
//!
//! A user's balance lives in one shard ([`shard_of`]). When a room starts
//! (ongoing-query's Watch), its virtual account is opened in every shard,
//! split over `room_subaccounts` rows so a hot room's gifts do not queue on
//! one row. `SendGift` is ONE local transaction in the viewer's shard:
//! debit the viewer, credit one of the room's sub-accounts there, append
//! both ledger entries ([`store`]). When the room ends, each shard stops
//! taking its gifts.
//!
//! When the room ends, the Settler ([`settle`]) moves every shard's virtual
//! account to the streamer, minus the platform's cut, exactly once; finance
//! reads the result (`GetSettlement`), a per-shard statement whose
//! differences must be zero (`Reconcile`), and the ledger (`ExportLedger`).

mod announce;
mod batch;
mod config;
mod error;
mod finance;
mod gifts;
mod grpc;
mod lifecycle;
mod pending;
mod settle;
mod store;
#[cfg(feature = "testing")]
pub mod testing;
pub use crate::config::GiftsConfig;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use livemesh_mesh::auth::{Security, policy};
use livemesh_mesh::breaker::BreakerSettings;
use livemesh_mesh::server::{ServeError, ServerBuilder, ServiceSet};
use livemesh_mesh::{ClientStack, Config, ShutdownSignal};
use livemesh_proto::v1::gifts_service_server::GiftsServiceServer;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::settlement_service_server::SettlementServiceServer;
use livemesh_rooms::RoomDirectory;

use crate::announce::Announcer;
use crate::gifts::Inner;
use crate::store::Shard;

/// The shard holding `user_id`'s balance among `shards`: a stable hash
/// (splitmix64) of the id, so consecutive ids spread evenly.
pub fn shard_of(user_id: u64, shards: usize) -> usize {
    let mut z = user_id.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    // The remainder is below `shards`, a usize.
    usize::try_from(z % shards.max(1) as u64).unwrap_or(0)
}

/// The gift-settler service.
#[derive(Debug, Clone)]
pub struct GiftSettler {
    inner: Arc<Inner>,
    security: Security,
}

impl GiftSettler {
    /// Opens the balance shards (`gifts.shard_urls`, else SQLite files
    /// under the data dir) and points the clients at ongoing-query and the
    /// dispatcher (by default this process's own address).
    pub async fn from_config(config: &Config) -> anyhow::Result<Self> {
        let g = &*config.section::<GiftsConfig>();
        let urls: Vec<String> = if g.shard_urls.is_empty() {
            (0..g.shards)
                .map(|n| config.sqlite_url(&format!("gifts-shard-{n}.db")))
                .collect()
        } else {
            g.shard_urls.clone()
        };
        let mut shards = Vec::with_capacity(urls.len());
        for (index, url) in urls.iter().enumerate() {
            let index = u32::try_from(index).context("too many shards")?;
            shards.push(
                Shard::open_with(index, url, &BreakerSettings::from(&config.client))
                    .await
                    .with_context(|| format!("opening balance shard {index}"))?,
            );
        }
        let (security, stack) = ClientStack::for_service(config, policy::GIFT_SETTLER)?;
        let ongoing = stack
            .channel(&config.peer_url(&g.ongoing_query_url))
            .context("gifts.ongoing_query_url")?;
        let publish = stack
            .channel(&config.peer_url(&g.publish_url))
            .context("gifts.publish_url")?;
        let announcer = Announcer::new(
            PublishServiceClient::new(publish),
            Duration::from_millis(g.announce_timeout_ms),
        );
        Ok(Self {
            inner: Arc::new(Inner {
                batcher: batch::Batcher::start(
                    &shards,
                    g.batch_workers,
                    g.max_batch,
                    Arc::new(announcer),
                ),
                shards,
                subaccounts: g.room_subaccounts,
                platform_cut_bps: g.platform_cut_bps,
                max_transfer_amount: g.max_transfer_amount,
                rooms: RoomDirectory::new(ongoing.clone()),
                watch: OngoingQueryServiceClient::new(ongoing),
            }),
            security,
        })
    }
}

impl ServiceSet for GiftSettler {
    fn register(&self, server: &mut ServerBuilder) {
        pending::install_metrics();
        // A settler that stopped mid-settlement finishes what it started.
        server.add_background(
            "unfinished settlements",
            lifecycle::resume_unfinished(self.inner.clone()),
        );
        let api = grpc::GiftsApi::new(self.inner.clone());
        server.secure(&self.security);
        let max_message = self.security.max_message_bytes();
        server.add_service(
            GiftsServiceServer::new(api.clone())
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        );
        server.add_service(
            SettlementServiceServer::new(api)
                .max_decoding_message_size(max_message)
                .max_encoding_message_size(max_message),
        );
        server.add_background(
            "room starts and ends",
            lifecycle::follow_rooms(self.inner.clone()),
        );
    }
}

/// Serves the gift-settler on `listener` until `shutdown`.
pub async fn run(
    settler: GiftSettler,
    listener: tokio::net::TcpListener,
    shutdown: ShutdownSignal,
) -> Result<(), ServeError> {
    livemesh_mesh::server::serve_set(settler, listener, shutdown).await
}

/// The config sections `livemesh-gift-settler` reads: its own `[gifts]`.
pub fn config_sections() -> livemesh_mesh::config::Registry {
    livemesh_mesh::config::Registry::new().own::<GiftsConfig>()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_spread_evenly_and_stably_over_shards() {
        let mut counts = [0u32; 4];
        for user in 1..=40_000u64 {
            counts[shard_of(user, 4)] += 1;
        }
        for count in counts {
            assert!((9_000..=11_000).contains(&count), "{counts:?}");
        }
        assert_eq!(shard_of(42, 4), shard_of(42, 4));
        assert_eq!(shard_of(42, 1), 0);
    }
}
