//! The gRPC face of the counter, and the one mapping of its errors to statuses.

use std::sync::Arc;

use livemesh_mesh::auth;
use livemesh_proto::v1::counter_service_server::CounterService;
use livemesh_proto::v1::{
    GetLovesRequest, GetLovesResponse, Lover, RejectReason, SendLovesRequest, SendLovesResponse,
    TopLoversRequest, TopLoversResponse,
};
use tonic::{Request, Response, Status};

use crate::Inner;
use crate::analytics::LoveLine;
use crate::core::SendError;
use crate::hot::HotError;
use crate::validate::Reason;
use livemesh_mesh::rooms::{LookupError, RoomInfo};

const DEFAULT_TOP: u32 = 10;
const MAX_TOP: u32 = 100;

/// What went wrong with a counter request.
#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("room {0} has ended; loves are no longer counted")]
    RoomEnded(u64),
    #[error(transparent)]
    Backlogged(#[from] SendError),
    #[error(transparent)]
    Hot(#[from] HotError),
}

impl From<CounterError> for Status {
    fn from(err: CounterError) -> Self {
        match &err {
            CounterError::InvalidArgument(_) => Status::invalid_argument(err.to_string()),
            CounterError::Lookup(LookupError::NotFound(_)) => Status::not_found(err.to_string()),
            CounterError::RoomEnded(_) => Status::failed_precondition(err.to_string()),
            CounterError::Lookup(LookupError::Unavailable(cause)) => {
                tracing::warn!(%cause, "room lookup failed");
                Status::unavailable("rooms cannot be looked up right now; retry later")
            }
            CounterError::Backlogged(_) => Status::unavailable(err.to_string()),
            CounterError::Hot(cause) => {
                tracing::warn!(%cause, "hot store call failed");
                Status::unavailable("love totals cannot be read right now; retry later")
            }
        }
    }
}

/// `CounterService` over the shared state.
#[derive(Debug, Clone)]
pub struct CounterApi {
    inner: Arc<Inner>,
}

impl CounterApi {
    pub fn new(inner: Arc<Inner>) -> Self {
        Self { inner }
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
        let (outcome, accepted_taps) = self.inner.core.send(
            room.room_id,
            request.viewer_id,
            &request.batch_id,
            &request.taps_ms,
            video_now,
            now,
        )?;
        if let Some(taps_ms) = accepted_taps.filter(|t| !t.is_empty()) {
            self.inner.touch(room.room_id);
            self.inner.remember_origin(room.room_id);
            self.inner.analytics.record(LoveLine {
                room_id: room.room_id,
                viewer_id: request.viewer_id,
                batch_id: request.batch_id,
                taps_ms,
                at_ms: now,
            });
        }
        // The loves are taken even when the store cannot tell the total now.
        let room_total = match self.inner.core.total(room.room_id).await {
            Ok(total) => total,
            Err(_) => self.inner.core.local_waiting(room.room_id),
        };
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

    async fn room_exists(&self, room_id: u64) -> Result<(), CounterError> {
        if room_id == 0 {
            return Err(CounterError::InvalidArgument(
                "room_id must be a room id from StartRoom; 0 is not one".into(),
            ));
        }
        self.inner.rooms.get(room_id).await?;
        Ok(())
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
        self.room_exists(room_id).await?;
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
        self.room_exists(request.room_id).await?;
        let limit = match request.limit {
            0 => DEFAULT_TOP,
            n => n.min(MAX_TOP),
        };
        let top = self
            .inner
            .core
            .store()
            .top(request.room_id, limit)
            .await
            .map_err(CounterError::from)?;
        Ok(Response::new(TopLoversResponse {
            lovers: top
                .into_iter()
                .map(|(viewer_id, loves)| Lover { viewer_id, loves })
                .collect(),
        }))
    }
}
