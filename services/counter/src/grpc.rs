//! The gRPC face of the counter: the `CounterService` handlers (errors
//! become statuses in [`crate::error`]).

use std::sync::Arc;

use livemesh_mesh::auth;
use livemesh_proto::v1::counter_service_server::CounterService;
use livemesh_proto::v1::{
    GetLovesRequest, GetLovesResponse, Lover, RejectReason, SendLovesRequest, SendLovesResponse,
    TopLoversRequest, TopLoversResponse,
};
use tonic::{Request, Response, Status};

use crate::analytics::LoveLine;
use crate::core::{BatchFate, Taken};
use crate::error::CounterError;
use crate::inner::Inner;
use crate::store::sql::FinalLoves;
use crate::validate::Reason;
use livemesh_rooms::RoomInfo;

const DEFAULT_TOP: u32 = 10;
const MAX_TOP: u32 = 100;

/// `CounterService` over the shared state.
#[derive(Debug, Clone)]
pub struct CounterApi {
    inner: Arc<Inner>,
    /// Loves accepted (what `SendLoves` answered as counted), exported as
    /// `livemesh_counter_loves_total`: one add per call.
    loves: opentelemetry::metrics::Counter<u64>,
}

impl CounterApi {
    pub fn new(inner: Arc<Inner>) -> Self {
        let loves = opentelemetry::global::meter("livemesh")
            .u64_counter("livemesh.counter.loves")
            .with_description("Loves (taps) SendLoves accepted")
            .build();
        Self { inner, loves }
    }

    async fn ongoing_room(&self, room_id: u64) -> Result<RoomInfo, CounterError> {
        if room_id == 0 {
            return Err(CounterError::InvalidArgument(
                "room_id must be a room id from StartRoom; 0 is not one".into(),
            ));
        }
        let room = self.inner.rooms.get(room_id).await?;
        if room.ended {
            return Err(CounterError::RoomEnded(room_id));
        }
        Ok(room)
    }

    async fn send_loves(
        &self,
        request: SendLovesRequest,
    ) -> Result<SendLovesResponse, CounterError> {
        if request.viewer_id == 0 {
            return Err(CounterError::InvalidArgument(
                "viewer_id must be the viewer's user id; 0 is not a user".into(),
            ));
        }
        if request.batch_id.is_empty() || request.batch_id.len() > 128 {
            return Err(CounterError::InvalidArgument(
                "batch_id must be 1 to 128 bytes, unique per batch of this viewer (e.g. a UUID), so that a retry counts once".into(),
            ));
        }
        let room = self.ongoing_room(request.room_id).await?;
        let now = livemesh_mesh::now_ms();
        let video_now = u64::try_from(now.saturating_sub(room.started_at_ms)).unwrap_or(0);
        let taken = self.inner.core.send(
            room.room_id,
            request.viewer_id,
            &request.batch_id,
            &request.taps_ms,
            video_now,
            now,
        )?;
        let outcome = match taken {
            Taken::Duplicate => {
                // Answer as the first attempt will be: after its flush.
                self.inner
                    .core
                    .tried(room.room_id, request.viewer_id, &request.batch_id)
                    .await;
                None
            }
            Taken::New {
                outcome,
                accepted,
                fate,
            } => {
                if !accepted.is_empty() {
                    self.inner.touch(room.room_id);
                    self.inner.remember_origin(room.room_id);
                }
                // Answer once the store took the batch (or could not, and it
                // waits here for a retry): then GetLoves and TopLovers show it.
                let fate = match fate {
                    Some(told) => told.await.unwrap_or(BatchFate::Buffered),
                    None => BatchFate::Counted,
                };
                if fate == BatchFate::Duplicate {
                    None
                } else {
                    if !accepted.is_empty() {
                        self.inner.analytics.record(LoveLine {
                            room_id: room.room_id,
                            viewer_id: request.viewer_id,
                            batch_id: request.batch_id.clone(),
                            taps_ms: accepted,
                            at_ms: now,
                        });
                    }
                    Some(outcome)
                }
            }
        };
        // The loves are taken even when the store cannot tell the total now.
        let room_total = match self.inner.core.total(room.room_id).await {
            Ok(total) => total,
            Err(_) => self.inner.core.local_waiting(room.room_id),
        };
        let Some(outcome) = outcome else {
            return Ok(SendLovesResponse {
                accepted: 0,
                rejected: request.taps_ms.len() as u64,
                reason: RejectReason::DuplicateBatch.into(),
                detail: format!(
                    "batch {:?} was taken before; it counts once, so nothing was counted now",
                    request.batch_id
                ),
                room_total,
            });
        };
        self.loves.add(outcome.accepted, &[]);
        Ok(SendLovesResponse {
            accepted: outcome.accepted,
            rejected: outcome.rejected,
            reason: match outcome.reason {
                None => RejectReason::Unspecified,
                Some(Reason::TooManyTaps) => RejectReason::TooManyTaps,
                Some(Reason::RateLimited) => RejectReason::RateLimited,
                Some(Reason::InTheFuture) => RejectReason::InTheFuture,
                Some(Reason::Duplicate) => RejectReason::Duplicate,
            }
            .into(),
            detail: outcome.detail,
            room_total,
        })
    }

    async fn room_exists(&self, room_id: u64) -> Result<RoomInfo, CounterError> {
        if room_id == 0 {
            return Err(CounterError::InvalidArgument(
                "room_id must be a room id from StartRoom; 0 is not one".into(),
            ));
        }
        Ok(self.inner.rooms.get(room_id).await?)
    }

    /// The final numbers of an ended room, once they are in SQL (until then
    /// the hot store still holds them).
    async fn final_of(&self, room: &RoomInfo) -> Result<Option<FinalLoves>, CounterError> {
        if !room.ended {
            return Ok(None);
        }
        self.inner
            .final_loves(room.room_id)
            .await
            .map_err(|cause| CounterError::Final {
                room_id: room.room_id,
                cause,
            })
    }
}

#[tonic::async_trait]
impl CounterService for CounterApi {
    async fn send_loves(
        &self,
        request: Request<SendLovesRequest>,
    ) -> Result<Response<SendLovesResponse>, Status> {
        let (_, extensions, mut request) = request.into_parts();
        request.viewer_id = auth::viewer_id(&extensions, request.viewer_id, "viewer_id")?;
        Ok(Response::new(self.send_loves(request).await?))
    }

    async fn get_loves(
        &self,
        request: Request<GetLovesRequest>,
    ) -> Result<Response<GetLovesResponse>, Status> {
        let room_id = request.into_inner().room_id;
        let room = self.room_exists(room_id).await?;
        if let Some(fin) = self.final_of(&room).await? {
            return Ok(Response::new(GetLovesResponse {
                room_id,
                total: fin.total,
            }));
        }
        let total = self
            .inner
            .core
            .total(room_id)
            .await
            .map_err(CounterError::from)?;
        Ok(Response::new(GetLovesResponse { room_id, total }))
    }

    async fn top_lovers(
        &self,
        request: Request<TopLoversRequest>,
    ) -> Result<Response<TopLoversResponse>, Status> {
        let request = request.into_inner();
        let room = self.room_exists(request.room_id).await?;
        let limit = match request.limit {
            0 => DEFAULT_TOP,
            n => n.min(MAX_TOP),
        };
        if let Some(fin) = self.final_of(&room).await? {
            return Ok(Response::new(TopLoversResponse {
                lovers: fin
                    .top_lovers
                    .into_iter()
                    .take(limit as usize)
                    .map(|(viewer_id, loves)| Lover { viewer_id, loves })
                    .collect(),
            }));
        }
        let mut top = self
            .inner
            .core
            .store()
            .top(request.room_id, limit)
            .await
            .map_err(CounterError::from)?;
        // Loves this replica accepted and the store has not confirmed yet
        // count here too, as they do in GetLoves.
        let waiting = self.inner.core.local_waiting_viewers(request.room_id);
        if !waiting.is_empty() {
            for (viewer, loves) in waiting {
                match top.iter_mut().find(|(v, _)| *v == viewer) {
                    Some(entry) => entry.1 += loves,
                    None => top.push((viewer, loves)),
                }
            }
            top.sort_by(|a, b| {
                b.1.cmp(&a.1)
                    .then_with(|| b.0.to_string().cmp(&a.0.to_string()))
            });
            top.truncate(limit as usize);
        }
        Ok(Response::new(TopLoversResponse {
            lovers: top
                .into_iter()
                .map(|(viewer_id, loves)| Lover { viewer_id, loves })
                .collect(),
        }))
    }
}
