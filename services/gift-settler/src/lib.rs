//! `gift-settler`: paid gifts through per-room virtual accounts in sharded
//! balance databases, after seed `scalable-live-interactive-service-part2`
//! ("Account Transporting").
//!
//! A user's balance lives in one shard ([`shard_of`]). When a room starts
//! (ongoing-query's Watch), its virtual account is opened in every shard,
//! split over `room_subaccounts` rows so a hot room's gifts do not queue on
//! one row. `SendGift` is ONE local transaction in the viewer's shard:
//! debit the viewer, credit one of the room's sub-accounts there, append
//! both ledger entries ([`ledger`]). When the room ends, each shard stops
//! taking its gifts.
//!
//! When the room ends, the Settler ([`settle`]) moves every shard's virtual
//! account to the streamer, minus the platform's cut, exactly once; finance
//! reads the result (`GetSettlement`), a per-shard statement whose
//! differences must be zero (`Reconcile`), and the ledger (`ExportLedger`).

pub mod batch;
pub mod grpc;
pub mod ledger;
pub mod pending;
pub mod settle;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use livemesh_mesh::auth::{Security, policy};
use livemesh_mesh::breaker::BreakerSettings;
use livemesh_mesh::server::{ServeError, ServerBuilder, ServiceSet};
use livemesh_mesh::{ClientStack, Config, MeshChannel, ShutdownSignal};
use livemesh_proto::v1::gifts_service_server::GiftsServiceServer;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::settlement_service_server::SettlementServiceServer;
use livemesh_proto::v1::{
    GiftSent, PublishBatchRequest, PublishRequest, RoomChangeKind, RoomEvent, room_event,
};
use livemesh_rooms::{RoomDirectory, RoomInfo};

use crate::ledger::Shard;
use tracing::Instrument as _;

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

/// The gift-settler's shared state.
#[derive(Debug)]
pub struct Inner {
    pub shards: Vec<Shard>,
    /// Group commit of deposits and gifts, per shard.
    pub batcher: batch::Batcher,
    pub subaccounts: u32,
    /// The platform's cut of a room's gifts, in basis points.
    pub platform_cut_bps: u32,
    /// The largest amount of one deposit or gift.
    pub max_transfer_amount: i64,
    pub rooms: RoomDirectory,
    watch: OngoingQueryServiceClient<MeshChannel>,
}

/// Announces gifts to their rooms through the dispatcher, before their
/// batch commits (see [`ledger::Announce`]): all the gifts of a batch in one
/// `PublishBatch` call (one call per gift cost as much CPU as the rest of
/// the gift), each with the gift's transfer id as its idempotency key, so a
/// batch that announces again (a retry, a batch split after a refusal)
/// shows each event once. A dispatcher without `PublishBatch`
/// (UNIMPLEMENTED: an older version during a rolling upgrade) is sent one
/// `Publish` per gift instead.
#[derive(Debug, Clone)]
pub struct Announcer {
    publish: PublishServiceClient<MeshChannel>,
    /// How long one announcement may take; the batch holds its rows' locks
    /// meanwhile.
    timeout: Duration,
}

/// The event announcing `t`, if it is a gift.
fn announcement(t: &ledger::Transfer) -> Option<PublishRequest> {
    let (Some(gift), Some(room_id)) = (t.gift, t.room_id) else {
        return None;
    };
    Some(PublishRequest {
        room_id,
        event: Some(RoomEvent {
            kind: Some(room_event::Kind::Gift(GiftSent {
                viewer_id: gift.viewer_id,
                gift_id: gift.gift_id,
                amount: t.amount,
                transfer_id: t.transfer_id.clone(),
            })),
            ..RoomEvent::default()
        }),
        idempotency_key: Some(t.transfer_id.clone()),
        forwarded_from: None,
    })
}

/// What a refused announcement means for its gift.
fn refused(room_id: u64, code: tonic::Code, message: &str) -> ledger::LedgerError {
    // The room's stream has ended (or the rooms service says the room
    // did): the gift comes too late to be shown, so it is not taken either.
    if code == tonic::Code::FailedPrecondition {
        return ledger::LedgerError::RoomEnded(room_id);
    }
    tracing::debug!(room_id, ?code, message, "announcing a gift failed");
    let message: String = message.chars().take(200).collect();
    ledger::LedgerError::Unannounced(format!("{code:?}: {message}"))
}

impl Announcer {
    pub fn new(publish: PublishServiceClient<MeshChannel>, timeout: Duration) -> Self {
        Self { publish, timeout }
    }

    /// One gift through `Publish` (to a dispatcher without `PublishBatch`).
    async fn one(&self, request: PublishRequest) -> Result<(), ledger::LedgerError> {
        let room_id = request.room_id;
        let mut request = tonic::Request::new(request);
        request.set_timeout(self.timeout);
        match self.publish.clone().publish(request).await {
            Ok(_) => Ok(()),
            Err(status) => Err(refused(room_id, status.code(), status.message())),
        }
    }

    /// Every gift of `requests` in one `PublishBatch`, each answered in its
    /// place; the call's status when the call as a whole failed.
    async fn batch(
        &self,
        requests: Vec<PublishRequest>,
    ) -> Result<Vec<Result<(), ledger::LedgerError>>, tonic::Status> {
        let rooms: Vec<u64> = requests.iter().map(|r| r.room_id).collect();
        let mut call = tonic::Request::new(PublishBatchRequest { requests });
        call.set_timeout(self.timeout);
        let mut results = self
            .publish
            .clone()
            .publish_batch(call)
            .await?
            .into_inner()
            .results
            .into_iter();
        Ok(rooms
            .into_iter()
            .map(|room_id| match results.next() {
                Some(result) if result.code == 0 => Ok(()),
                Some(result) => {
                    let code =
                        i32::try_from(result.code).map_or(tonic::Code::Unknown, tonic::Code::from);
                    Err(refused(room_id, code, &result.message))
                }
                None => Err(ledger::LedgerError::Unannounced(
                    "the dispatcher did not answer for this gift".into(),
                )),
            })
            .collect())
    }

    async fn all(&self, gifts: &[&ledger::Transfer]) -> Vec<Result<(), ledger::LedgerError>> {
        let sent: Vec<usize> = (0..gifts.len())
            .filter(|i| gifts[*i].gift.is_some() && gifts[*i].room_id.is_some())
            .collect();
        let requests = || gifts.iter().filter_map(|t| announcement(t));
        let answers = if sent.is_empty() {
            Vec::new()
        } else {
            match self.batch(requests().collect()).await {
                Ok(answers) => answers,
                Err(status) if status.code() == tonic::Code::Unimplemented => {
                    futures::future::join_all(requests().map(|r| self.one(r))).await
                }
                Err(status) => requests()
                    .map(|r| Err(refused(r.room_id, status.code(), status.message())))
                    .collect(),
            }
        };
        let mut results: Vec<Result<(), ledger::LedgerError>> =
            gifts.iter().map(|_| Ok(())).collect();
        for (i, answer) in sent.into_iter().zip(answers) {
            results[i] = answer;
        }
        results
    }
}

impl ledger::Announce for Announcer {
    fn announce<'a>(
        &'a self,
        gifts: &'a [&'a ledger::Transfer],
    ) -> futures::future::BoxFuture<'a, Vec<Result<(), ledger::LedgerError>>> {
        Box::pin(self.all(gifts))
    }
}

impl Inner {
    /// The shard of a user.
    pub fn shard(&self, user_id: u64) -> &Shard {
        &self.shards[shard_of(user_id, self.shards.len())]
    }

    /// Applies a deposit or gift in `user_id`'s shard, in the next batch.
    pub async fn apply(
        &self,
        user_id: u64,
        transfer: ledger::Transfer,
    ) -> Result<ledger::Applied, ledger::LedgerError> {
        self.batcher
            .apply(
                shard_of(user_id, self.shards.len()),
                batch::lane(user_id),
                transfer,
            )
            .await
    }

    /// Opens the room's virtual accounts in every shard.
    pub async fn open_room(&self, room_id: u64) -> Result<(), sqlx::Error> {
        let now = livemesh_mesh::now_ms();
        for shard in &self.shards {
            shard.open_room(room_id, self.subaccounts, now).await?;
        }
        Ok(())
    }

    /// Stops the room taking gifts in every shard.
    pub async fn end_room(&self, room_id: u64) -> Result<(), sqlx::Error> {
        let now = livemesh_mesh::now_ms();
        for shard in &self.shards {
            shard.end_room(room_id, now).await?;
        }
        Ok(())
    }
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
        let g = &config.gifts;
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
        let security = Security::from_config(&config.auth)?;
        let stack = ClientStack::new(&config.client).secured(&security, policy::GIFT_SETTLER)?;
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

    pub fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

/// Retries `step` with back-off until it succeeds (room opens and ends
/// must happen; each is idempotent).
async fn until_done<F, Fut>(what: &str, room_id: u64, step: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), sqlx::Error>>,
{
    let mut backoff = Duration::from_millis(100);
    while let Err(err) = step().await {
        tracing::warn!(room_id, %err, "{what} failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Settles the room, retrying until it is done (each step is idempotent).
async fn settle_until_done(inner: &Inner, room_id: u64, streamer_id: u64) {
    let mut backoff = Duration::from_millis(100);
    pending::begin(room_id);
    loop {
        match inner.settle(room_id, streamer_id, &|_| false).await {
            Ok(row) => {
                pending::finish(room_id);
                tracing::info!(
                    room_id,
                    gross = row.gross,
                    platform_cut = row.platform_cut,
                    streamer_credit = row.streamer_credit,
                    "room settled"
                );
                return;
            }
            Err(err) => {
                tracing::warn!(room_id, %err, "settling the room failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

impl ServiceSet for GiftSettler {
    fn register(&self, server: &mut ServerBuilder) {
        pending::install_metrics();
        // A settler that stopped mid-settlement finishes what it started.
        let inner = self.inner.clone();
        server.add_background("unfinished settlements", async move {
            let rooms = loop {
                match inner.shards[0].unfinished_settlements().await {
                    Ok(rooms) => break rooms,
                    Err(err) => {
                        tracing::warn!(%err, "reading unfinished settlements failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            };
            for room_id in rooms {
                // The recorded streamer is the one paid (see `settle`).
                settle_until_done(&inner, room_id, 0).await;
            }
        });
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
        let inner = self.inner.clone();
        let watch = self.inner.watch.clone();
        server.add_background("room starts and ends", async move {
            livemesh_rooms::follow_changes(watch, |change| {
                let Some(room) = change.room else { return };
                let kind = change.kind();
                if kind == RoomChangeKind::Ended {
                    // Gifts are refused from here on, before the shards know.
                    inner.rooms.remember(RoomInfo::from_proto(&room));
                }
                let inner = inner.clone();
                tokio::spawn(
                    async move {
                        match kind {
                            RoomChangeKind::Started => {
                                until_done(
                                    "opening the room's virtual accounts",
                                    room.room_id,
                                    || inner.open_room(room.room_id),
                                )
                                .await;
                            }
                            RoomChangeKind::Ended => {
                                until_done("ending the room's gifts", room.room_id, || {
                                    inner.end_room(room.room_id)
                                })
                                .await;
                                settle_until_done(&inner, room.room_id, room.anchor_id).await;
                            }
                            _ => {}
                        }
                    }
                    .in_current_span(),
                );
            })
            .await;
        });
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
