//! Logs through `tracing`; traces through OpenTelemetry when an OTLP
//! endpoint is configured (and only then: no exporter, no background
//! connection attempts); metrics always, scrapeable as Prometheus text at
//! `telemetry.metrics_listen` and pushed over OTLP when configured
//! ([`crate::metrics`]). W3C trace context is propagated on every hop
//! either way ([`crate::rpc_telemetry`]).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::TelemetryConfig;
use crate::metrics::Metrics;

/// Keeps the trace and metrics pipelines alive; flushes them when dropped.
#[must_use = "dropping the guard shuts the trace and metrics exporters down"]
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    metrics: Option<Metrics>,
    metrics_addr: Option<std::net::SocketAddr>,
    metrics_server: Option<tokio::task::JoinHandle<()>>,
}

impl TelemetryGuard {
    /// Where `GET /metrics` is served (the bound port when 0 was asked for).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// The process's metrics, as served at `/metrics`.
    pub fn metrics(&self) -> Option<&Metrics> {
        self.metrics.as_ref()
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(server) = self.metrics_server.take() {
            server.abort();
        }
        if let Some(metrics) = self.metrics.take() {
            metrics.shutdown();
        }
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("livemesh: flushing traces at exit failed: {err}");
        }
    }
}

/// Installs the global subscriber, propagator and meter provider for
/// `service`, and starts the metrics endpoint. Call once, first thing in
/// `main`, inside the Tokio runtime; later calls (tests starting several
/// servers) keep the first subscriber.
pub fn init(config: &TelemetryConfig, service: &'static str) -> anyhow::Result<TelemetryGuard> {
    // `RUST_LOG` wins when it is set and valid.
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|spec| EnvFilter::try_new(spec).is_ok())
        .unwrap_or_else(|| config.log.clone());
    let filter = EnvFilter::try_new(&spec)
        .map_err(|e| anyhow::anyhow!("telemetry.log {spec:?} is not a valid filter: {e}"))?;
    let filter = without_rpc_spans(filter, &spec);
    // Colours only on a terminal: piped or collected logs get plain text.
    let fmt = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    // Incoming trace context is read as W3C trace context whatever happens
    // below; this makes it the process's global format too.
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );

    // Metrics first: bind errors (a busy port) are the likeliest failure.
    let listener = match config.metrics_listen.as_str() {
        "" => None,
        addr => Some(crate::metrics::bind(addr)?),
    };
    let metrics = Metrics::install(
        service,
        config.otlp_endpoint.as_deref(),
        std::time::Duration::from_millis(config.metrics_export_interval_ms.max(1)),
    )?;
    let mut guard = TelemetryGuard {
        provider: None,
        metrics: Some(metrics.clone()),
        metrics_addr: None,
        metrics_server: None,
    };
    if let Some(listener) = listener {
        guard.metrics_addr = listener.local_addr().ok();
        guard.metrics_server = Some(metrics.serve(listener));
    }

    let Some(endpoint) = &config.otlp_endpoint else {
        let _ = tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .try_init();
        log_metrics_addr(&guard);
        return Ok(guard);
    };

    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("telemetry.otlp_endpoint {endpoint:?}: {e}"))?;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_filter(otel_filter());
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    tracing::info!(%endpoint, "exporting traces and metrics over OTLP");
    log_metrics_addr(&guard);
    guard.provider = Some(provider);
    Ok(guard)
}

/// The log's filter, minus the per-call RPC spans unless the filter (or
/// `RUST_LOG`) names their target: the log layer formats every field of
/// every span it sees into a string when the span opens, which cost more
/// than the rest of the mesh's per-call middleware together (`bench rpc`,
/// callgrind). The trace exporter still gets them (its own filter), and
/// with no exporter a call opens no span at all.
fn without_rpc_spans(filter: EnvFilter, spec: &str) -> EnvFilter {
    if spec.contains(crate::rpc_telemetry::SPAN_TARGET) {
        return filter;
    }
    match format!("{}=off", crate::rpc_telemetry::SPAN_TARGET).parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    }
}

/// What goes to the trace exporter: livemesh's own spans (RPCs, store
/// calls, ticks); hyper's and h2's would flood it.
pub fn otel_filter() -> EnvFilter {
    EnvFilter::new("livemesh=info,livemesh_=info,off")
}

fn log_metrics_addr(guard: &TelemetryGuard) {
    if let Some(addr) = guard.metrics_addr {
        tracing::info!(%addr, "serving metrics at http://{addr}/metrics");
    }
}
