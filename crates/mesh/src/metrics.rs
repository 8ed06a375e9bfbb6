//! The process's OpenTelemetry meter provider and its Prometheus face.
//!
//! Every instrument comes from `opentelemetry::global::meter("livemesh")`
//! (RPCs, breakers, fan-out lag, queue drops, binlog lag, ...), so whatever
//! any part of the process records shows up in both exports: scraped as
//! Prometheus text at `http://<telemetry.metrics_listen>/metrics`, and
//! pushed over OTLP when `telemetry.otlp_endpoint` is set.
//!
//! The Prometheus text comes from `opentelemetry-prometheus` (the
//! OpenTelemetry project's own exporter, released in step with the SDK),
//! encoded by the `prometheus` crate's text encoder.

use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use prometheus::{Encoder as _, TextEncoder};

/// Buckets, in seconds, of the per-hop latency histograms (publish →
/// `Deliver` sent, `Deliver` received → written to a stream, written →
/// received at a client): 50 µs up to 10 s, since a hop inside one process
/// takes tens of microseconds and a hop behind a failing store seconds;
/// finer from 5 to 100 ms, where a big room's fan-out lands and where the
/// 75 ms latency target sits (a quantile is interpolated within its bucket,
/// so a bucket from 25 to 50 ms read every p99 in it as about 50 ms).
pub const HOP_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.007_5, 0.01, 0.015, 0.02, 0.025,
    0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The installed meter provider and the registry the scrape endpoint reads.
#[derive(Debug, Clone)]
pub struct Metrics {
    provider: SdkMeterProvider,
    registry: prometheus::Registry,
}

impl Metrics {
    /// Builds the provider for `service`, with an OTLP reader when
    /// `otlp_endpoint` is set, and installs it as the global one.
    pub fn install(
        service: &'static str,
        otlp_endpoint: Option<&str>,
        export_interval: Duration,
    ) -> anyhow::Result<Self> {
        let registry = prometheus::Registry::new();
        let prometheus = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .build()
            .map_err(|e| anyhow::anyhow!("building the Prometheus metrics exporter: {e}"))?;
        let mut builder = SdkMeterProvider::builder()
            .with_reader(prometheus)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service)
                    .build(),
            );
        if let Some(endpoint) = otlp_endpoint {
            let exporter = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.to_owned())
                .build()
                .map_err(|e| anyhow::anyhow!("telemetry.otlp_endpoint {endpoint:?}: {e}"))?;
            builder = builder.with_reader(
                PeriodicReader::builder(exporter)
                    .with_interval(export_interval)
                    .build(),
            );
        }
        let provider = builder.build();
        opentelemetry::global::set_meter_provider(provider.clone());
        Ok(Self { provider, registry })
    }

    /// Everything recorded so far, in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec fails only on names the registry already
        // validated when they were registered.
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(%err, "encoding metrics as Prometheus text failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }

    /// Flushes the OTLP reader (if any) and stops recording.
    pub fn shutdown(&self) {
        if let Err(err) = self.provider.shutdown() {
            eprintln!("livemesh: flushing metrics at exit failed: {err}");
        }
    }

    /// Serves `GET /metrics` on `listener` until the task is aborted.
    pub fn serve(&self, listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
        let metrics = self.clone();
        let app = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let metrics = metrics.clone();
                async move {
                    (
                        [(
                            http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8",
                        )],
                        metrics.render(),
                    )
                }
            }),
        );
        tokio::spawn(async move {
            if let Err(err) = axum::serve(listener, app).await {
                tracing::warn!(%err, "the metrics endpoint stopped");
            }
        })
    }
}

/// Binds the metrics endpoint's address, with a message naming the setting.
pub fn bind(addr: &str) -> anyhow::Result<tokio::net::TcpListener> {
    let parsed: SocketAddr = addr.parse().map_err(|e| {
        anyhow::anyhow!(
            "telemetry.metrics_listen {addr:?} is not an address like 127.0.0.1:9464: {e}"
        )
    })?;
    let listener = std::net::TcpListener::bind(parsed)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|err| {
            anyhow::anyhow!(
                "cannot serve metrics on {parsed}: {err} (set telemetry.metrics_listen, \
                 or --metrics-listen, to a free address; port 0 picks one; \"\" turns the endpoint off)"
            )
        })?;
    Ok(tokio::net::TcpListener::from_std(listener)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_busy_or_malformed_metrics_address_names_the_setting() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let err = bind(&addr).unwrap_err().to_string();
        assert!(err.contains("telemetry.metrics_listen"), "{err}");
        assert!(err.contains(&addr), "{err}");
        let err = bind("localhost").unwrap_err().to_string();
        assert!(err.contains("telemetry.metrics_listen"), "{err}");
        let free = bind("127.0.0.1:0").unwrap();
        assert_ne!(free.local_addr().unwrap().port(), 0);
    }
}
