//! Every server's global concurrency limit with load shedding.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{Request, Response};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tower::{Layer, Service, ServiceExt};

use crate::BoxError;

/// The server side: at most `max` calls in flight over all connections;
/// past it a call is answered at once with UNAVAILABLE ("server overloaded,
/// retry later"), a proper gRPC status the client's retry budget and
/// breaker understand. A semaphore's permit per call, taken at once or not.
///
/// A call holds its permit until its response headers are ready: a unary
/// call for its whole work, a streaming call (Subscribe, Watch,
/// ExportLedger) only until its stream starts, so long-lived streams do not
/// use up the limit. Health checks and reflection are never shed, so an
/// overloaded server is not also taken for dead.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    semaphore: Arc<Semaphore>,
    max: usize,
}

impl ShedLayer {
    pub fn new(max: usize) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl<S: Clone> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            semaphore: self.semaphore.clone(),
            max: self.max,
        }
    }
}

/// The service [`ShedLayer`] builds.
#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    semaphore: Arc<Semaphore>,
    max: usize,
}

/// Paths never shed: health checks and reflection.
fn never_shed(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

impl<S, B> Service<Request<B>> for Shed<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The limit is checked when a call arrives (a permit taken or
        // not, at once), not held while idle.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        if never_shed(request.uri().path()) {
            return Box::pin(async move { inner.oneshot(request).await.map_err(Into::into) });
        }
        // A permit now or never: a call past the limit is answered at once
        // (tower's load shed over a concurrency limit, in one step: no
        // per-call semaphore future to build).
        let Ok(permit) = self.semaphore.clone().try_acquire_owned() else {
            let max = self.max;
            tracing::debug!(max, "call shed: the server is at its concurrency limit");
            // Looked up per shed call (rare), like the breaker's
            // instruments, so a provider installed later counts it.
            opentelemetry::global::meter("livemesh")
                .u64_counter("livemesh.server.shed")
                .with_description(
                    "Calls answered UNAVAILABLE at once because the server was at \
                     server.max_concurrent_requests",
                )
                .build()
                .add(
                    1,
                    &[opentelemetry::KeyValue::new(
                        "rpc.method",
                        request.uri().path().to_owned(),
                    )],
                );
            return Box::pin(std::future::ready(Ok(tonic::Status::unavailable(format!(
                "server overloaded ({max} calls in flight), retry later"
            ))
            .into_http())));
        };
        Box::pin(async move {
            let response = inner.oneshot(request).await.map_err(Into::into);
            // Held until the response headers are ready.
            drop(permit);
            response
        })
    }
}
