//! Every breaker state change is counted through the global meter, and the
//! state gauge follows it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use livemesh_mesh::ClientStack;
use livemesh_mesh::breaker::{BreakerState, breaker_state};
use livemesh_mesh::config::ClientConfig;
use livemesh_proto::v1::GetRoomRequest;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};

#[tokio::test]
async fn an_opening_breaker_is_counted_and_its_state_gauged() {
    let (exporter, provider) = common::install_meter();

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

    let exported = common::exported(&exporter, &provider);
    let transitions = common::metric(&exported, "livemesh.breaker.transitions");
    let opened = common::counted(
        transitions,
        &[("peer", uri.as_str()), ("from", "closed"), ("to", "open")],
    );
    assert_eq!(opened, 1, "one closed -> open transition for {uri}");

    let state = common::metric(&exported, "livemesh.breaker.state");
    let AggregatedMetrics::I64(MetricData::Gauge(gauge)) = state.data() else {
        panic!("state is not an i64 gauge: {:?}", state.data());
    };
    let value = gauge
        .data_points()
        .find(|dp| common::has_all(dp.attributes(), &[("peer", uri.as_str())]))
        .map(|dp| dp.value());
    assert_eq!(value, Some(2), "the gauge reads open (2)");
}
