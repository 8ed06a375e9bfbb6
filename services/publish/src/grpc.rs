//! The gRPC face of the dispatcher; errors become statuses here only.

use std::sync::Arc;

use livemesh_proto::v1::publish_service_server::PublishService;
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
        Ok(Response::new(
            self.inner.publish(request.into_inner()).await?,
        ))
    }
}
