//! The gRPC face of the counter: the `CounterService` handlers, each one
//! decoding its request, calling the counter's domain (`loves.rs`) and
//! encoding the reply (errors become statuses in [`crate::error`]).

use std::sync::Arc;

use livemesh_mesh::auth;
use livemesh_proto::v1::counter_service_server::CounterService;
use livemesh_proto::v1::{
    GetLovesRequest, GetLovesResponse, Lover, RejectReason, SendLovesRequest, SendLovesResponse,
    TopLoversRequest, TopLoversResponse,
};
use tonic::{Request, Response, Status};

use crate::inner::Inner;
use crate::loves::{self, Sent};
use crate::validate::Reason;

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
}

#[tonic::async_trait]
impl CounterService for CounterApi {
    async fn send_loves(
        &self,
        request: Request<SendLovesRequest>,
    ) -> Result<Response<SendLovesResponse>, Status> {
        let (_, extensions, mut request) = request.into_parts();
        request.viewer_id = auth::viewer_id(&extensions, request.viewer_id, "viewer_id")?;
        let reply = match loves::send(&self.inner, &request).await? {
            Sent::Duplicate { room_total } => SendLovesResponse {
                accepted: 0,
                rejected: request.taps_ms.len() as u64,
                reason: RejectReason::DuplicateBatch.into(),
                detail: format!(
                    "batch {:?} was taken before; it counts once, so nothing was counted now",
                    request.batch_id
                ),
                room_total,
            },
            Sent::Taken {
                outcome,
                room_total,
            } => {
                self.loves.add(outcome.accepted, &[]);
                SendLovesResponse {
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
                }
            }
        };
        Ok(Response::new(reply))
    }

    async fn get_loves(
        &self,
        request: Request<GetLovesRequest>,
    ) -> Result<Response<GetLovesResponse>, Status> {
        let room_id = request.into_inner().room_id;
        let total = loves::total(&self.inner, room_id).await?;
        Ok(Response::new(GetLovesResponse { room_id, total }))
    }

    async fn top_lovers(
        &self,
        request: Request<TopLoversRequest>,
    ) -> Result<Response<TopLoversResponse>, Status> {
        let request = request.into_inner();
        let top = loves::top(&self.inner, request.room_id, request.limit).await?;
        Ok(Response::new(TopLoversResponse {
            lovers: top
                .into_iter()
                .map(|(viewer_id, loves)| Lover { viewer_id, loves })
                .collect(),
        }))
    }
}
