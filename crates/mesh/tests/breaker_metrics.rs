//! Every breaker state change is counted through the global meter, and the
//! state gauge follows it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use livemesh_mesh::ClientStack;
use livemesh_mesh::breaker::{BreakerState, breaker_state};
use livemesh_mesh::config::ClientConfig;
use livemesh_proto::v1::GetRoomRequest;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use opentelemetry::KeyValue;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

fn has<'a>(mut attributes: impl Iterator<Item = &'a KeyValue>, key: &str, value: &str) -> bool {
    attributes.any(|kv| kv.key.as_str() == key && kv.value.as_str() == value)
}

#[tokio::test]
async fn an_opening_breaker_is_counted_and_its_state_gauged() {
    let exporter = InMemoryMetricExporter::default();
    let provider = SdkMeterProvider::builder()
        .with_reader(PeriodicReader::builder(exporter.clone()).build())
        .build();
    opentelemetry::global::set_meter_provider(provider.clone());

    // A closed port: every call fails at once.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let uri = format!("http://{addr}");
    let stack = ClientStack::new(&ClientConfig {
        breaker_min_calls: 3,
        breaker_window_ms: 5_000,
        max_retries: 0,
        ..ClientConfig::default()
    });
    let mut client = OngoingQueryServiceClient::new(stack.channel(&uri).unwrap());
    let deadline = Instant::now() + Duration::from_secs(10);
    while breaker_state(&uri) != Some(BreakerState::Open) {
        assert!(Instant::now() < deadline, "the breaker never opened");
        let _ = client.get_room(GetRoomRequest { room_id: 1 }).await;
    }

    provider.force_flush().unwrap();
    let exported = exporter.get_finished_metrics().unwrap();
    let metrics: Vec<_> = exported
        .iter()
        .flat_map(|rm| rm.scope_metrics())
        .flat_map(|sm| sm.metrics())
        .collect();
    let transitions = metrics
        .iter()
        .find(|m| m.name() == "livemesh.breaker.transitions")
        .expect("a transitions counter");
    let AggregatedMetrics::U64(MetricData::Sum(sum)) = transitions.data() else {
        panic!("transitions is not a u64 counter: {:?}", transitions.data());
    };
    let opened: u64 = sum
        .data_points()
        .filter(|dp| {
            has(dp.attributes(), "peer", &uri)
                && has(dp.attributes(), "from", "closed")
                && has(dp.attributes(), "to", "open")
        })
        .map(|dp| dp.value())
        .sum();
    assert_eq!(opened, 1, "one closed -> open transition for {uri}");

    let state = metrics
        .iter()
        .find(|m| m.name() == "livemesh.breaker.state")
        .expect("a state gauge");
    let AggregatedMetrics::I64(MetricData::Gauge(gauge)) = state.data() else {
        panic!("state is not an i64 gauge: {:?}", state.data());
    };
    let value = gauge
        .data_points()
        .find(|dp| has(dp.attributes(), "peer", &uri))
        .map(|dp| dp.value());
    assert_eq!(value, Some(2), "the gauge reads open (2)");
}
