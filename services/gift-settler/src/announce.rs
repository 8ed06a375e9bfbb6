//! Gifts told to their rooms before they commit: the dispatcher's
//! `PublishBatch` (or `Publish` per gift on an older dispatcher), behind
//! the store's [`Announce`] hook.

use std::time::Duration;

use livemesh_mesh::MeshChannel;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::{GiftSent, PublishBatchRequest, PublishRequest, RoomEvent, room_event};

use crate::error::LedgerError;
use crate::store::{Announce, Transfer};

/// Announces gifts to their rooms through the dispatcher, before their
/// batch commits (see [`Announce`]): all the gifts of a batch in one
/// `PublishBatch` call (one call per gift cost as much CPU as the rest of
/// the gift), each with the gift's transfer id as its idempotency key, so a
/// batch that announces again (a retry, a batch split after a refusal)
/// shows each event once. A dispatcher without `PublishBatch`
/// (UNIMPLEMENTED: an older version during a rolling upgrade) is sent one
/// `Publish` per gift instead.
#[derive(Debug, Clone)]
pub(crate) struct Announcer {
    publish: PublishServiceClient<MeshChannel>,
    /// How long one announcement may take; the batch holds its rows' locks
    /// meanwhile.
    timeout: Duration,
}

/// The event announcing `t`, if it is a gift.
fn announcement(t: &Transfer) -> Option<PublishRequest> {
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
fn refused(room_id: u64, code: tonic::Code, message: &str) -> LedgerError {
    // The room's stream has ended (or the rooms service says the room
    // did): the gift comes too late to be shown, so it is not taken either.
    if code == tonic::Code::FailedPrecondition {
        return LedgerError::RoomEnded(room_id);
    }
    tracing::debug!(room_id, ?code, message, "announcing a gift failed");
    let message: String = message.chars().take(200).collect();
    LedgerError::Unannounced(format!("{code:?}: {message}"))
}

impl Announcer {
    pub(crate) fn new(publish: PublishServiceClient<MeshChannel>, timeout: Duration) -> Self {
        Self { publish, timeout }
    }

    /// One gift through `Publish` (to a dispatcher without `PublishBatch`).
    async fn one(&self, request: PublishRequest) -> Result<(), LedgerError> {
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
    ) -> Result<Vec<Result<(), LedgerError>>, tonic::Status> {
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
                None => Err(LedgerError::Unannounced(
                    "the dispatcher did not answer for this gift".into(),
                )),
            })
            .collect())
    }

    async fn all(&self, gifts: &[&Transfer]) -> Vec<Result<(), LedgerError>> {
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
        let mut results: Vec<Result<(), LedgerError>> = gifts.iter().map(|_| Ok(())).collect();
        for (i, answer) in sent.into_iter().zip(answers) {
            results[i] = answer;
        }
        results
    }
}

impl Announce for Announcer {
    fn announce<'a>(
        &'a self,
        gifts: &'a [&'a Transfer],
    ) -> futures::future::BoxFuture<'a, Vec<Result<(), LedgerError>>> {
        Box::pin(self.all(gifts))
    }
}
