//! What the mesh crate's integration tests share: a server on a loopback
//! port, a health client, and reading what an in-memory exporter collected.

// Each test file compiles this module into its own binary and uses part of
// it; what one of them leaves unused is not dead.
#![allow(dead_code)]

use std::net::SocketAddr;

use livemesh_mesh::Shutdown;
use livemesh_mesh::server::{ServeError, ServerBuilder};
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, Metric, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A server serving in a task of its own.
pub struct Running {
    pub addr: SocketAddr,
    pub shutdown: Shutdown,
    pub task: JoinHandle<Result<(), ServeError>>,
}

/// Serves `server` on a free loopback port until `shutdown` is triggered.
pub async fn serve(server: ServerBuilder) -> Running {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let task = tokio::spawn(server.serve(listener, shutdown.signal()));
    Running {
        addr,
        shutdown,
        task,
    }
}

/// A plain tonic channel to `addr` (no client stack: the server's own
/// answers are what the tests look at).
pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

pub async fn health(addr: SocketAddr) -> HealthClient<Channel> {
    HealthClient::new(channel(addr).await)
}

/// What `Check` answers for the whole server.
pub async fn serving_status(client: &mut HealthClient<Channel>) -> ServingStatus {
    client
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status()
}

/// Makes the global meter provider one that exports into the returned
/// exporter when the returned provider is flushed.
pub fn install_meter() -> (InMemoryMetricExporter, SdkMeterProvider) {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter.clone()).build())
        .build();
    opentelemetry::global::set_meter_provider(provider.clone());
    (exporter, provider)
}

/// Flushes `provider` and returns what `exporter` then holds.
pub fn exported(
    exporter: &InMemoryMetricExporter,
    provider: &SdkMeterProvider,
) -> Vec<ResourceMetrics> {
    provider.force_flush().unwrap();
    exporter.get_finished_metrics().unwrap()
}

/// The metric called `name` in `exported`; its absence fails the test.
pub fn metric<'a>(exported: &'a [ResourceMetrics], name: &str) -> &'a Metric {
    exported
        .iter()
        .flat_map(|rm| rm.scope_metrics())
        .flat_map(|sm| sm.metrics())
        .find(|m| m.name() == name)
        .unwrap_or_else(|| panic!("no metric {name}"))
}

/// The sum of the u64 counter `metric` over its data points whose
/// attributes include every `(key, value)` of `with`.
pub fn counted(metric: &Metric, with: &[(&str, &str)]) -> u64 {
    let AggregatedMetrics::U64(MetricData::Sum(sum)) = metric.data() else {
        panic!(
            "{} is not a u64 counter: {:?}",
            metric.name(),
            metric.data()
        );
    };
    sum.data_points()
        .filter(|dp| has_all(dp.attributes(), with))
        .map(|dp| dp.value())
        .sum()
}

/// Whether `attributes` include every `(key, value)` of `with`.
pub fn has_all<'a>(attributes: impl Iterator<Item = &'a KeyValue>, with: &[(&str, &str)]) -> bool {
    let attributes: Vec<&KeyValue> = attributes.collect();
    with.iter().all(|(key, value)| {
        attributes
            .iter()
            .any(|kv| kv.key.as_str() == *key && kv.value.as_str() == *value)
    })
}
