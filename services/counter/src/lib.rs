//! `counter`: loves.
//!
//! The counter issue builds validation, the hot-store counters and the flush
//! at room end; until then the service serves health and reflection and
//! answers its RPCs with `UNIMPLEMENTED` naming that work.

use livemesh_mesh::server::{ServeError, ServerBuilder, ServiceSet};
use livemesh_mesh::{ShutdownSignal, not_yet_implemented};
use livemesh_proto::v1::counter_service_server::{CounterService, CounterServiceServer};
use livemesh_proto::v1::{
    GetLovesRequest, GetLovesResponse, SendLovesRequest, SendLovesResponse, TopLoversRequest,
    TopLoversResponse,
};
use tonic::{Request, Response, Status};

const OWNER: &str = "the counter work (issue 4)";

/// The love counter.
#[derive(Debug, Clone, Default)]
pub struct Counter;

#[tonic::async_trait]
impl CounterService for Counter {
    async fn send_loves(
        &self,
        _request: Request<SendLovesRequest>,
    ) -> Result<Response<SendLovesResponse>, Status> {
        Err(not_yet_implemented("CounterService.SendLoves", OWNER))
    }

    async fn get_loves(
        &self,
        _request: Request<GetLovesRequest>,
    ) -> Result<Response<GetLovesResponse>, Status> {
        Err(not_yet_implemented("CounterService.GetLoves", OWNER))
    }

    async fn top_lovers(
        &self,
        _request: Request<TopLoversRequest>,
    ) -> Result<Response<TopLoversResponse>, Status> {
        Err(not_yet_implemented("CounterService.TopLovers", OWNER))
    }
}

impl ServiceSet for Counter {
    fn register(&self, server: &mut ServerBuilder) {
        server.add_service(CounterServiceServer::new(self.clone()));
    }
}

/// Serves the counter on `listener` until `shutdown`.
pub async fn run(
    counter: Counter,
    listener: tokio::net::TcpListener,
    shutdown: ShutdownSignal,
) -> Result<(), ServeError> {
    livemesh_mesh::server::serve_set(counter, listener, shutdown).await
}
