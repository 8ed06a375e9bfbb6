//! Logs through `tracing`, and traces through OpenTelemetry when an OTLP
//! endpoint is configured (and only then: no exporter, no background
//! connection attempts).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::TelemetryConfig;

/// Keeps the trace pipeline alive; flushes pending spans when dropped.
#[must_use = "dropping the guard shuts the trace exporter down"]
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("livemesh: flushing traces at exit failed: {err}");
        }
    }
}

/// Installs the global subscriber for `service`. Call once, first thing in
/// `main`; later calls (tests starting several servers) keep the first one.
pub fn init(config: &TelemetryConfig, service: &'static str) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log))
        .map_err(|e| {
            anyhow::anyhow!("telemetry.log {:?} is not a valid filter: {e}", config.log)
        })?;
    let fmt = tracing_subscriber::fmt::layer().with_target(true);

    let Some(endpoint) = &config.otlp_endpoint else {
        let _ = tracing_subscriber::registry()
            .with(fmt.with_filter(filter))
            .try_init();
        return Ok(TelemetryGuard::default());
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
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    opentelemetry::global::set_tracer_provider(provider.clone());
    // Only our own spans go to the collector; hyper and h2 would flood it.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_filter(EnvFilter::new("livemesh=info,livemesh_=info,off"));
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init();
    tracing::info!(%endpoint, "exporting traces over OTLP");
    Ok(TelemetryGuard {
        provider: Some(provider),
    })
}
