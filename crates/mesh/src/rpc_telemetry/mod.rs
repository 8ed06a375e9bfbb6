//! Trace context and per-RPC metrics on every hop, as two tower layers: one
//! in the client stack ([`ClientTelemetryLayer`]), one around every server
//! ([`ServerTelemetryLayer`]).
//!
//! The client layer opens the call's client span and writes its W3C trace
//! context (`traceparent`, `tracestate`) into the request's metadata; the
//! server layer reads it back and opens the server span as its child, and
//! the handler runs inside that span, so every span a handler opens (store
//! calls, calls to further peers) joins the caller's trace. Both record the
//! call in `rpc.{client,server}.calls` (a counter: rate, and errors by
//! `rpc.grpc.status_code`) and `rpc.{client,server}.duration` (seconds,
//! until the call's final status: the trailers, or a trailers-only error).
//!
//! The server span is created here and nowhere else: a second span source
//! (tonic's `trace_fn`, another tracing layer) would split the traces.
//! Health checks and reflection are counted but not traced; load balancers
//! poll them constantly.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue};
use http_body::Frame;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::body::Body;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

mod client;
mod server;
mod trace;

pub use client::{ClientTelemetry, ClientTelemetryLayer};
pub use server::{ServerTelemetry, ServerTelemetryLayer};
pub use trace::{Origins, Traceparent};

/// The target of the RPC spans (exported: it starts with `livemesh_`; not
/// logged unless the log filter names it, see `telemetry::init`).
pub(crate) const SPAN_TARGET: &str = "livemesh_mesh::rpc";

/// Latency buckets in seconds: 0.25 ms up to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
];

/// Writes the context into request metadata.
struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// Reads the context from request metadata.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Writes `span`'s trace context into `headers` as W3C `traceparent` and
/// `tracestate`. W3C trace context is the mesh's wire format, whatever
/// global propagator a process installed; nothing is written when the span
/// has no valid context (no OpenTelemetry layer, or a disabled span).
pub fn inject(span: &tracing::Span, headers: &mut HeaderMap) {
    let cx = span.context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

/// The trace context a caller sent in `headers` (empty when there is none).
pub fn extract(headers: &HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// `/pkg.Service/Method` split into `pkg.Service` and `Method`.
fn split_path(path: &str) -> (&str, &str) {
    let path = path.strip_prefix('/').unwrap_or(path);
    path.split_once('/').unwrap_or((path, ""))
}

/// The gRPC status code in `headers`, if they carry one (trailers, or the
/// headers of a trailers-only error response).
fn grpc_status(headers: &HeaderMap) -> Option<i64> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The gRPC code of a failed call: the `Status` somewhere in the error's
/// chain, else UNAVAILABLE (what tonic reports for transport failures).
fn error_code(err: &(dyn std::error::Error + 'static)) -> i64 {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(status) = err.downcast_ref::<tonic::Status>() {
            return status.code() as i64;
        }
        next = err.source();
    }
    tonic::Code::Unavailable as i64
}

/// One side's (client or server) instruments, and the attributes of each
/// method seen, built once and shared by its calls: a call, and a stream
/// that stays open for hours, holds two `Arc`s and a start time, not strings.
struct Side {
    calls: Counter<u64>,
    duration: Histogram<f64>,
    methods: RwLock<HashMap<String, Arc<MethodAttributes>>>,
}

/// gRPC status codes: 0 (OK) to 16 (UNAUTHENTICATED).
const CODES: usize = 17;

/// A method's attribute sets, one per final status code, each built the
/// first time a call ends with that code: recording a call clones and
/// allocates nothing.
struct MethodAttributes {
    base: [KeyValue; 3],
    by_code: [OnceLock<[KeyValue; 4]>; CODES],
}

impl MethodAttributes {
    fn new(service: &str, method: &str) -> Self {
        Self {
            base: [
                KeyValue::new("rpc.system", "grpc"),
                KeyValue::new("rpc.service", service.to_owned()),
                KeyValue::new("rpc.method", method.to_owned()),
            ],
            by_code: std::array::from_fn(|_| OnceLock::new()),
        }
    }

    fn build(&self, code: i64) -> [KeyValue; 4] {
        let [system, service, method] = &self.base;
        [
            system.clone(),
            service.clone(),
            method.clone(),
            KeyValue::new("rpc.grpc.status_code", code),
        ]
    }

    /// Counts a call that ended with `code` after `seconds`.
    fn record(&self, side: &Side, code: i64, seconds: f64) {
        let prebuilt = usize::try_from(code)
            .ok()
            .and_then(|index| self.by_code.get(index))
            .map(|slot| slot.get_or_init(|| self.build(code)));
        let built;
        let attributes = match prebuilt {
            Some(attributes) => attributes,
            None => {
                built = self.build(code);
                &built
            }
        };
        side.calls.add(1, attributes);
        side.duration.record(seconds, attributes);
    }
}

/// Methods whose attributes are kept; any beyond (a client calling made-up
/// paths) get theirs built per call, so the map cannot grow without bound.
const MAX_METHODS: usize = 1_024;

impl Side {
    /// From the global meter provider as it is now: build layers after
    /// `telemetry::init` (or a test's own provider) has installed it.
    fn new(side: &'static str) -> Arc<Self> {
        let meter = opentelemetry::global::meter("livemesh");
        Arc::new(Self {
            calls: meter
                .u64_counter(format!("rpc.{side}.calls"))
                .with_description(format!(
                    "gRPC calls {}, by service, method and final status code",
                    if side == "server" {
                        "served"
                    } else {
                        "made to peers"
                    }
                ))
                .build(),
            duration: meter
                .f64_histogram(format!("rpc.{side}.duration"))
                .with_unit("s")
                .with_description("gRPC call duration until the final status")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            methods: RwLock::new(HashMap::new()),
        })
    }

    /// The attributes of calls to `path` (`/pkg.Service/Method`).
    fn attributes(&self, path: &str) -> Arc<MethodAttributes> {
        let read = self.methods.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(attributes) = read.get(path) {
            return attributes.clone();
        }
        drop(read);
        let (service, method) = split_path(path);
        let attributes = Arc::new(MethodAttributes::new(service, method));
        let mut write = self.methods.write().unwrap_or_else(PoisonError::into_inner);
        if write.len() < MAX_METHODS {
            write.insert(path.to_owned(), attributes.clone());
        }
        attributes
    }
}

/// What is recorded when a call's final status is known.
struct CallEnd {
    side: Arc<Side>,
    attributes: Arc<MethodAttributes>,
    started: Instant,
    /// The client span, which lasts until the final status. (A server span
    /// ends when the handler has answered, so that a viewer's stream open
    /// for hours does not hold a span open.)
    span: Option<tracing::Span>,
}

impl CallEnd {
    fn finish(self, code: i64) {
        self.attributes
            .record(&self.side, code, self.started.elapsed().as_secs_f64());
        if let Some(span) = self.span {
            record_code(&span, code);
        }
    }
}

/// A call in flight: dropped before its response came (the caller gave up,
/// e.g. a timeout around the call, or the connection went), it is counted
/// as CANCELLED.
struct InFlight(Option<CallEnd>);

impl InFlight {
    fn take(&mut self) -> Option<CallEnd> {
        self.0.take()
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(end) = self.0.take() {
            end.finish(tonic::Code::Cancelled as i64);
        }
    }
}

fn record_code(span: &tracing::Span, code: i64) {
    span.record("rpc.grpc.status_code", code);
    if code != 0 {
        span.record("otel.status_code", "ERROR");
    }
}

/// A response body that records the call when its trailers pass (or when
/// it ends or is dropped without them: a cancelled call).
struct ObservedBody {
    inner: Body,
    end: Option<CallEnd>,
}

impl http_body::Body for ObservedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                frame.trailers_ref().map(|t| grpc_status(t).unwrap_or(0))
            }
            Poll::Ready(Some(Err(status))) => Some(status.code() as i64),
            // A body that ends without trailers ended its call cleanly only
            // if it said so earlier; here it did not.
            Poll::Ready(None) => Some(tonic::Code::Unknown as i64),
            Poll::Pending => None,
        };
        if let Some(code) = code
            && let Some(end) = self.end.take()
        {
            end.finish(code);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if let Some(end) = self.end.take() {
            end.finish(tonic::Code::Cancelled as i64);
        }
    }
}

/// Records the call now if the response headers carry its final status
/// (a trailers-only error), else when the body's trailers pass.
fn observe(response: http::Response<Body>, end: Option<CallEnd>) -> http::Response<Body> {
    let Some(end) = end else {
        return response;
    };
    if let Some(code) = grpc_status(response.headers()) {
        end.finish(code);
        return response;
    }
    response.map(|inner| {
        Body::new(ObservedBody {
            inner,
            end: Some(end),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_as_the_same_context() {
        use opentelemetry::trace::TraceContextExt as _;
        let origin = Traceparent {
            trace_id: 0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c,
            span_id: 0xb7ad_6b71_6920_3331,
            flags: 1,
        };
        let header = origin.header();
        assert_eq!(
            header,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", HeaderValue::from_str(&header).unwrap());
        let cx = extract(&headers);
        let read = cx.span().span_context().clone();
        assert!(read.is_valid() && read.is_sampled());
        assert_eq!(
            u128::from_be_bytes(read.trace_id().to_bytes()),
            origin.trace_id
        );
        assert_eq!(
            u64::from_be_bytes(read.span_id().to_bytes()),
            origin.span_id
        );
    }

    #[test]
    fn paths_split_into_service_and_method() {
        assert_eq!(
            split_path("/livemesh.v1.CounterService/SendLoves"),
            ("livemesh.v1.CounterService", "SendLoves")
        );
        assert_eq!(split_path("/odd"), ("odd", ""));
    }

    #[test]
    fn a_status_is_found_anywhere_in_the_error_chain() {
        #[derive(Debug)]
        struct Wrapped(tonic::Status);
        impl std::fmt::Display for Wrapped {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "wrapped")
            }
        }
        impl std::error::Error for Wrapped {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let err = Wrapped(tonic::Status::deadline_exceeded("slow"));
        assert_eq!(error_code(&err), tonic::Code::DeadlineExceeded as i64);
        let io = std::io::Error::other("reset");
        assert_eq!(error_code(&io), tonic::Code::Unavailable as i64);
    }
}
