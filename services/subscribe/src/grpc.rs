//! The gRPC face of a subscribe node: the `Subscribe` and `Deliver`
//! handlers (a subscription is opened in [`crate::subscription`]; errors
//! become statuses in [`crate::error`]).

use std::sync::Arc;

use livemesh_proto::encoded::server::subscribe_service_server::SubscribeService;
use livemesh_proto::v1::{DeliverRequest, DeliverResponse, SubscribeRequest};
use tonic::{Request, Response, Status};

use crate::error::SubscribeError;
use crate::stream::ViewerStream;
use crate::subscription;
use crate::table::NodeInner;

/// The SubscribeService implementation.
#[derive(Debug, Clone)]
pub struct SubscribeApi {
    node: Arc<NodeInner>,
}

impl SubscribeApi {
    pub fn new(node: Arc<NodeInner>) -> Self {
        Self { node }
    }
}

#[tonic::async_trait]
impl SubscribeService for SubscribeApi {
    type SubscribeStream = ViewerStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let (_, extensions, mut request) = request.into_parts();
        request.viewer_id =
            livemesh_mesh::auth::viewer_id(&extensions, request.viewer_id, "viewer_id")?;
        let stream = subscription::open(&self.node, request).await?;
        Ok(Response::new(stream))
    }

    async fn deliver(
        &self,
        request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let request = request.into_inner();
        if request.room_id == 0 || request.events.iter().any(|e| e.room_id != request.room_id) {
            return Err(SubscribeError::Invalid(
                "room_id is required and every event must carry it",
            )
            .into());
        }
        let streams = self.node.deliver(request.room_id, request.events);
        Ok(Response::new(DeliverResponse { streams }))
    }
}
