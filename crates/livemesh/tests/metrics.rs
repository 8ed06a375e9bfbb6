//! The admin endpoint: after real calls, `GET /metrics` serves per-RPC
//! metrics (calls by method and status code, latency histograms) as
//! Prometheus text, for the server and the client side.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use livemesh_fanout::{FanoutSettings, FanoutStore};
use livemesh_mesh::config::TelemetryConfig;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::{
    Comment, GetRoomRequest, PublishRequest, RoomEvent, room_event, subscribe_response,
};
use livemesh_publish::PublishConfig;
use livemesh_subscribe::SubscribeConfig;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Metrics exported at a fresh endpoint on a free port.
fn init_telemetry() -> livemesh_mesh::telemetry::TelemetryGuard {
    livemesh_mesh::telemetry::init(
        &TelemetryConfig {
            log: "warn".into(),
            metrics_listen: "127.0.0.1:0".into(),
            ..TelemetryConfig::default()
        },
        "metrics-test",
    )
    .unwrap()
}

/// Scrapes until `ready` finds what it needs, or panics with the text.
async fn scrape_until(addr: std::net::SocketAddr, ready: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, text) = get(addr, "/metrics").await;
        assert!(status.contains(" 200 "), "{status}");
        if ready(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "expected metrics missing from /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A plain HTTP/1.1 GET; returns the status line and the body.
async fn get(addr: std::net::SocketAddr, path: &str) -> (String, String) {
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).await.unwrap();
    let (head, body) = response
        .split_once("\r\n\r\n")
        .expect("a complete HTTP response");
    (head.lines().next().unwrap().to_owned(), body.to_owned())
}

/// The sample lines of `metric` whose labels include every one of `labels`.
fn samples<'a>(text: &'a str, metric: &str, labels: &[&str]) -> Vec<&'a str> {
    text.lines()
        .filter(|line| line.starts_with(&format!("{metric}{{")))
        .filter(|line| labels.iter().all(|label| line.contains(label)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_serves_per_rpc_metrics_after_calls() {
    let telemetry = init_telemetry();
    let metrics = telemetry.metrics_addr().expect("the endpoint is bound");
    assert_ne!(metrics.port(), 0, "port 0 resolves to the bound port");

    let dir = tempfile::tempdir().unwrap();
    let rooms = livemesh_testkit::ongoing_query(dir.path()).await;
    livemesh_testkit::start_room(rooms.channel(), 1).await;
    let missing = OngoingQueryServiceClient::new(rooms.channel())
        .get_room(GetRoomRequest { room_id: 999_999 })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let text = scrape_until(metrics, |text| {
        !samples(text, "rpc_server_calls_total", &[r#"rpc_method="GetRoom""#]).is_empty()
    })
    .await;
    let started = samples(
        &text,
        "rpc_server_calls_total",
        &[
            r#"rpc_method="StartRoom""#,
            r#"rpc_grpc_status_code="0""#,
            r#"rpc_service="livemesh.v1.RoomAdminService""#,
        ],
    );
    assert_eq!(started.len(), 1, "{text}");
    assert!(
        started[0].ends_with(" 1"),
        "one StartRoom call: {}",
        started[0]
    );
    let not_found = samples(
        &text,
        "rpc_server_calls_total",
        &[r#"rpc_method="GetRoom""#, r#"rpc_grpc_status_code="5""#],
    );
    assert_eq!(not_found.len(), 1, "GetRoom's NOT_FOUND by code:\n{text}");
    let client = samples(
        &text,
        "rpc_client_calls_total",
        &[r#"rpc_method="GetRoom""#, r#"rpc_grpc_status_code="5""#],
    );
    assert_eq!(client.len(), 1, "the client side too:\n{text}");
    let latency = samples(
        &text,
        "rpc_server_duration_seconds_bucket",
        &[r#"rpc_method="StartRoom""#, r#"le="+Inf""#],
    );
    assert_eq!(latency.len(), 1, "{text}");
    assert!(
        latency[0].ends_with(" 1"),
        "one StartRoom latency: {}",
        latency[0]
    );
    let (status, _) = get(metrics, "/nothing-here").await;
    assert!(status.contains(" 404 "), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivered_event_shows_in_the_fan_out_lag_histogram() {
    let telemetry = init_telemetry();
    let metrics = telemetry.metrics_addr().unwrap();
    let (_dir, mut config, rooms) = livemesh_testkit::config_with_rooms().await;
    config.section_mut::<PublishConfig>().ongoing_query_url = rooms.url();
    config.section_mut::<SubscribeConfig>().ongoing_query_url = rooms.url();
    let store = FanoutStore::memory(FanoutSettings::default());
    let (publish, node) = common::dispatcher_and_node(&mut config, store).await;
    let room_id = livemesh_testkit::start_room(rooms.channel(), 1).await;
    let mut viewer = common::live_viewer(node.channel(), room_id, 3).await;
    PublishServiceClient::new(publish.channel())
        .publish(PublishRequest {
            room_id,
            event: Some(RoomEvent {
                kind: Some(room_event::Kind::Comment(Comment {
                    viewer_id: 3,
                    text: "hi".into(),
                })),
                ..RoomEvent::default()
            }),
            ..PublishRequest::default()
        })
        .await
        .unwrap();
    let event = viewer.message().await.unwrap().expect("the comment");
    assert!(matches!(
        event.message,
        Some(subscribe_response::Message::Event(_))
    ));
    let text = scrape_until(metrics, |text| {
        !samples(text, "livemesh_fanout_lag_seconds_count", &[]).is_empty()
    })
    .await;
    let count = samples(&text, "livemesh_fanout_lag_seconds_count", &[]);
    assert!(
        count[0].ends_with(" 1"),
        "one delivered event: {}",
        count[0]
    );
    assert!(
        !samples(
            &text,
            "rpc_client_calls_total",
            &[r#"rpc_method="Deliver""#, r#"rpc_grpc_status_code="0""#]
        )
        .is_empty(),
        "the dispatcher's Deliver calls are counted:\n{text}"
    );
}
