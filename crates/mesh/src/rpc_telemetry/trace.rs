//! Traces that go on through background work: `Origins` and `Traceparent`.

use http::{HeaderMap, HeaderValue};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use super::*;

/// The trace contexts of the calls whose work a later background step does
/// (e.g. the counter's publish tick sends the total that several SendLoves
/// changed): the step's span takes the first as its parent, so the trace of
/// that call goes on through the step, and links the others.
#[derive(Debug, Default, Clone)]
pub struct Origins(Vec<opentelemetry::trace::SpanContext>);

/// At most this many origins are kept per step (one parent, the rest links).
const MAX_ORIGINS: usize = 8;

impl Origins {
    /// The current span's context, if it has a valid one (an OpenTelemetry
    /// layer is installed and the span is enabled).
    pub fn current() -> Option<opentelemetry::trace::SpanContext> {
        use opentelemetry::trace::TraceContextExt as _;
        let cx = tracing::Span::current().context();
        let span_context = cx.span().span_context().clone();
        span_context.is_valid().then_some(span_context)
    }

    /// Remembers `origin` unless enough are already kept.
    pub fn add(&mut self, origin: opentelemetry::trace::SpanContext) {
        if self.0.len() < MAX_ORIGINS {
            self.0.push(origin);
        }
    }

    /// True when another origin would be dropped.
    pub fn is_full(&self) -> bool {
        self.0.len() >= MAX_ORIGINS
    }

    /// Makes `span` (not yet entered) a child of the first origin, linked to
    /// the others.
    pub fn adopt(&self, span: &tracing::Span) {
        use opentelemetry::trace::TraceContextExt as _;
        let Some((first, rest)) = self.0.split_first() else {
            return;
        };
        let parent = opentelemetry::Context::new().with_remote_span_context(first.clone());
        if span.set_parent(parent).is_err() {
            return;
        }
        for link in rest {
            span.add_link(link.clone());
        }
    }
}

/// A span's W3C trace context as a small `Copy` value, for work that
/// crosses a message rather than a call (a room change read from a Watch
/// stream): kept with the message, sent as its `traceparent` string, and
/// adopted as the parent by whoever handles the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traceparent {
    pub(super) trace_id: u128,
    pub(super) span_id: u64,
    pub(super) flags: u8,
}

impl Traceparent {
    /// The current span's context, if it has a valid one.
    /// A context from its parts (W3C: trace id, parent span id, flags).
    pub fn new(trace_id: u128, span_id: u64, flags: u8) -> Self {
        Self {
            trace_id,
            span_id,
            flags,
        }
    }

    pub fn current() -> Option<Self> {
        Origins::current().map(|sc| Self {
            trace_id: u128::from_be_bytes(sc.trace_id().to_bytes()),
            span_id: u64::from_be_bytes(sc.span_id().to_bytes()),
            flags: sc.trace_flags().to_u8(),
        })
    }

    /// The W3C `traceparent` header value.
    pub fn header(&self) -> String {
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }

    /// Makes `span` (not yet entered) a child of the context in
    /// `traceparent` (a W3C header value); an empty or malformed value
    /// leaves the span as it is.
    pub fn adopt(traceparent: &str, span: &tracing::Span) {
        if traceparent.is_empty() {
            return;
        }
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(traceparent) {
            headers.insert("traceparent", value);
            let _ = span.set_parent(extract(&headers));
        }
    }
}
