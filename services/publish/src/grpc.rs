//! The gRPC face of the dispatcher; errors become statuses here only.

use std::sync::Arc;

use livemesh_mesh::auth;
use livemesh_proto::v1::publish_service_server::PublishService;
use livemesh_proto::v1::room_event::Kind;
use livemesh_proto::v1::{PublishRequest, PublishResponse};
use tonic::{Request, Response, Status};

use crate::dispatch::{DispatcherInner, PublishError};

impl From<PublishError> for Status {
    fn from(err: PublishError) -> Self {
        match &err {
            PublishError::Invalid(_) => Status::invalid_argument(err.to_string()),
            PublishError::Ended { .. } => Status::failed_precondition(err.to_string()),
            PublishError::Store(cause) => {
                tracing::warn!(%cause, "publish failed");
                Status::unavailable(
                    "the room's event store is unavailable; retry with the same idempotency_key",
                )
            }
        }
    }
}

/// The PublishService implementation.
#[derive(Debug, Clone)]
pub struct PublishApi {
    inner: Arc<DispatcherInner>,
}

impl PublishApi {
    pub fn new(inner: Arc<DispatcherInner>) -> Self {
        Self { inner }
    }
}

#[tonic::async_trait]
impl PublishService for PublishApi {
    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        let (_, extensions, mut request) = request.into_parts();
        // A comment is a viewer's: its viewer comes from the viewer token.
        // Every other event is the mesh's own (totals, counts, gifts).
        match request.event.as_mut().and_then(|e| e.kind.as_mut()) {
            Some(Kind::Comment(comment)) => {
                comment.viewer_id =
                    auth::viewer_id(&extensions, comment.viewer_id, "event.comment.viewer_id")?;
            }
            _ => auth::require_mesh_service(&extensions, "publish events other than comments")?,
        }
        auth::check_room_publish(&extensions, request.room_id)?;
        Ok(Response::new(self.inner.publish(request).await?))
    }
}
