//! The server side: the one place server spans are made, server metrics.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use tonic::body::Body;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::*;

/// The server side: the call's server span (child of the caller's context),
/// with the handler inside it, and metrics. Applied to every server by
/// [`crate::ServerBuilder`].
#[derive(Clone)]
pub struct ServerTelemetryLayer {
    side: Arc<Side>,
}

impl ServerTelemetryLayer {
    pub fn new() -> Self {
        Self {
            side: Side::new("server"),
        }
    }
}

impl Default for ServerTelemetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> tower::Layer<S> for ServerTelemetryLayer {
    type Service = ServerTelemetry<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ServerTelemetry {
            inner,
            side: self.side.clone(),
        }
    }
}

/// See [`ServerTelemetryLayer`].
#[derive(Clone)]
pub struct ServerTelemetry<S> {
    inner: S,
    side: Arc<Side>,
}

/// Services whose calls are counted but not traced.
fn untraced(service: &str) -> bool {
    service.starts_with("grpc.health.") || service.starts_with("grpc.reflection.")
}

impl<S> tower::Service<http::Request<Body>> for ServerTelemetry<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let (service, method) = split_path(request.uri().path());
        let span = if untraced(service) {
            tracing::Span::none()
        } else {
            let span = tracing::info_span!(
                target: SPAN_TARGET,
                "grpc.server",
                otel.name = %request.uri().path().trim_start_matches('/'),
                otel.kind = "server",
                otel.status_code = tracing::field::Empty,
                rpc.system = "grpc",
                rpc.service = service,
                rpc.method = method,
                rpc.grpc.status_code = tracing::field::Empty,
            );
            // Fails only when no OpenTelemetry layer is installed (or the
            // span is disabled): then there is no trace to join anyway.
            let _ = span.set_parent(extract(request.headers()));
            span
        };
        let end = CallEnd {
            side: self.side.clone(),
            attributes: self.side.attributes(request.uri().path()),
            started: Instant::now(),
            span: None,
        };
        let call = self.inner.call(request);
        Box::pin(
            async move {
                // The router's error type is `Infallible`; any error here is
                // passed on untouched and the call counted as UNKNOWN.
                let mut end = InFlight(Some(end));
                match call.await {
                    Ok(response) => {
                        // The server span ends here, with the handler's
                        // answer: an error status in the headers, else OK
                        // (a stream's later end is in the metrics).
                        let code = grpc_status(response.headers()).unwrap_or(0);
                        record_code(&tracing::Span::current(), code);
                        Ok(observe(response, end.take()))
                    }
                    Err(err) => {
                        record_code(&tracing::Span::current(), tonic::Code::Unknown as i64);
                        if let Some(end) = end.take() {
                            end.finish(tonic::Code::Unknown as i64);
                        }
                        Err(err)
                    }
                }
            }
            .instrument(span),
        )
    }
}
