//! The client side: the call's span, its trace context into the metadata, client metrics.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tonic::body::Body;
use tracing::Instrument as _;

use super::*;

/// The client side: a span per call, its context in the metadata, metrics.
/// Outermost in the client stack, so that retries below it stay inside the
/// call's one span (each attempt carries the same parent).
#[derive(Clone)]
pub struct ClientTelemetryLayer {
    side: Arc<Side>,
    peer: Arc<str>,
}

impl ClientTelemetryLayer {
    /// For calls to `peer` (`http://host:port`, recorded as `server.address`).
    pub fn new(peer: &str) -> Self {
        Self {
            side: Side::new("client"),
            peer: peer.into(),
        }
    }
}

impl<S> tower::Layer<S> for ClientTelemetryLayer {
    type Service = ClientTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientTelemetry {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`ClientTelemetryLayer`].
#[derive(Clone)]
pub struct ClientTelemetry<S> {
    inner: S,
    layer: ClientTelemetryLayer,
}

impl<S> tower::Service<http::Request<Body>> for ClientTelemetry<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: std::error::Error + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let (service, method) = split_path(request.uri().path());
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "grpc.client",
            otel.name = %request.uri().path().trim_start_matches('/'),
            otel.kind = "client",
            otel.status_code = tracing::field::Empty,
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
            server.address = &*self.layer.peer,
        );
        let end = CallEnd {
            side: self.layer.side.clone(),
            attributes: self.layer.side.attributes(request.uri().path()),
            started: Instant::now(),
            span: Some(span.clone()),
        };
        inject(&span, request.headers_mut());
        let call = self.inner.call(request);
        Box::pin(
            async move {
                let mut end = InFlight(Some(end));
                match call.await {
                    Ok(response) => Ok(observe(response, end.take())),
                    Err(err) => {
                        if let Some(end) = end.take() {
                            end.finish(error_code(&err));
                        }
                        Err(err)
                    }
                }
            }
            .instrument(span),
        )
    }
}
