//! `subscribe`: viewers' server-streaming subscriptions.
//!
//! The fan-out issue builds the in-memory room table, resume and conflation;
//! until then the node serves health and reflection and answers its RPCs
//! with `UNIMPLEMENTED` naming that work.

use futures::stream::BoxStream;
use livemesh_mesh::server::{ServeError, ServerBuilder, ServiceSet};
use livemesh_mesh::{ShutdownSignal, not_yet_implemented};
use livemesh_proto::v1::subscribe_service_server::{SubscribeService, SubscribeServiceServer};
use livemesh_proto::v1::{DeliverRequest, DeliverResponse, SubscribeRequest, SubscribeResponse};
use tonic::{Request, Response, Status};

const OWNER: &str = "the subscribe + publish fan-out work (issue 5)";

/// One subscribe node.
#[derive(Debug, Clone, Default)]
pub struct SubscribeNode;

#[tonic::async_trait]
impl SubscribeService for SubscribeNode {
    type SubscribeStream = BoxStream<'static, Result<SubscribeResponse, Status>>;

    async fn subscribe(
        &self,
        _request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(not_yet_implemented("SubscribeService.Subscribe", OWNER))
    }

    async fn deliver(
        &self,
        _request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        Err(not_yet_implemented("SubscribeService.Deliver", OWNER))
    }
}

impl ServiceSet for SubscribeNode {
    fn register(&self, server: &mut ServerBuilder) {
        server.add_service(SubscribeServiceServer::new(self.clone()));
    }
}

/// Serves a subscribe node on `listener` until `shutdown`.
pub async fn run(
    node: SubscribeNode,
    listener: tokio::net::TcpListener,
    shutdown: ShutdownSignal,
) -> Result<(), ServeError> {
    livemesh_mesh::server::serve_set(node, listener, shutdown).await
}
