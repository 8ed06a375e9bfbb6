//! A gRPC peer's breaker as a tower layer of the client stack.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{Request, Response};
use tonic::body::Body;
use tower::Service;

use crate::BoxError;

use super::*;

/// A gRPC peer's breaker and the per-call time bound, as one tower layer of
/// the client stack ([`crate::client`]).
///
/// The bound is the configured timeout or the caller's shorter gRPC
/// deadline (`grpc-timeout`, set by `tonic::Request::set_timeout`), until
/// the response headers arrive; an expired call fails with
/// DEADLINE_EXCEEDED naming the peer, and counts against the breaker. So do
/// transport errors and the failure codes of [`code_counts_as_failure`]
/// in the response headers; an open breaker answers UNAVAILABLE at once.
#[derive(Clone)]
pub struct PeerGuardLayer {
    circuit: Circuit,
    limit: Duration,
    peer: Arc<str>,
}

impl PeerGuardLayer {
    /// The layer for `peer`, with `timeout` per call, and the view of its breaker.
    pub fn new(
        settings: &BreakerSettings,
        peer: &str,
        timeout: Duration,
    ) -> Result<(Self, Breaker), InvalidBreaker> {
        let circuit = settings.circuit(peer, "grpc")?;
        let breaker = circuit.view.clone();
        Ok((
            Self {
                circuit,
                limit: timeout,
                peer: peer.into(),
            },
            breaker,
        ))
    }
}

impl<S> tower::Layer<S> for PeerGuardLayer {
    type Service = PeerGuard<S>;

    fn layer(&self, inner: S) -> PeerGuard<S> {
        PeerGuard {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`PeerGuardLayer`].
#[derive(Clone)]
pub struct PeerGuard<S> {
    inner: S,
    layer: PeerGuardLayer,
}

impl<S, B> Service<Request<B>> for PeerGuard<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let Some(permit) = self.layer.circuit.admit() else {
            let open = CircuitOpen {
                peer: self.layer.peer.to_string(),
            };
            return Box::pin(std::future::ready(Err(
                Box::new(tonic::Status::unavailable(open.to_string())) as BoxError,
            )));
        };
        let limit =
            grpc_timeout(request.headers()).map_or(self.layer.limit, |t| t.min(self.layer.limit));
        let call = self.inner.call(request);
        let peer = self.layer.peer.clone();
        Box::pin(async move {
            let result = match tokio::time::timeout(limit, call).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Box::new(tonic::Status::deadline_exceeded(format!(
                    "{peer} did not answer within {} ms",
                    limit.as_millis()
                ))) as BoxError),
            };
            let failed = match &result {
                Ok(response) => header_code(response.headers()).is_some_and(code_counts_as_failure),
                // Transport errors and timeouts.
                Err(_) => true,
            };
            permit.finish(if failed {
                Outcome::Failed
            } else {
                Outcome::Answered
            });
            result
        })
    }
}
