//! `publish`: the dispatcher.
//!
//! The fan-out issue builds history, node lookup and delivery; until then
//! the dispatcher serves health and reflection and answers `Publish` with
//! `UNIMPLEMENTED` naming that work.

use livemesh_mesh::server::{ServeError, ServerBuilder, ServiceSet};
use livemesh_mesh::{ShutdownSignal, not_yet_implemented};
use livemesh_proto::v1::publish_service_server::{PublishService, PublishServiceServer};
use livemesh_proto::v1::{PublishRequest, PublishResponse};
use tonic::{Request, Response, Status};

/// One dispatcher.
#[derive(Debug, Clone, Default)]
pub struct Dispatcher;

#[tonic::async_trait]
impl PublishService for Dispatcher {
    async fn publish(
        &self,
        _request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        Err(not_yet_implemented(
            "PublishService.Publish",
            "the subscribe + publish fan-out work (issue 5)",
        ))
    }
}

impl ServiceSet for Dispatcher {
    fn register(&self, server: &mut ServerBuilder) {
        server.add_service(PublishServiceServer::new(self.clone()));
    }
}

/// Serves a dispatcher on `listener` until `shutdown`.
pub async fn run(
    dispatcher: Dispatcher,
    listener: tokio::net::TcpListener,
    shutdown: ShutdownSignal,
) -> Result<(), ServeError> {
    livemesh_mesh::server::serve_set(dispatcher, listener, shutdown).await
}
