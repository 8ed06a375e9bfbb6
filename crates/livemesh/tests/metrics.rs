//! The admin endpoint: after real calls, `GET /metrics` serves per-RPC
//! metrics (calls by method and status code, latency histograms) as
//! Prometheus text, for the server and the client side.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use livemesh_mesh::Config;
use livemesh_mesh::config::TelemetryConfig;
use livemesh_ongoing_query::OngoingQuery;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::{GetRoomRequest, StartRoomRequest};
use livemesh_testkit::TestServer;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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
    let telemetry = livemesh_mesh::telemetry::init(
        &TelemetryConfig {
            log: "warn".into(),
            metrics_listen: "127.0.0.1:0".into(),
            ..TelemetryConfig::default()
        },
        "metrics-test",
    )
    .unwrap();
    let metrics = telemetry.metrics_addr().expect("the endpoint is bound");
    assert_ne!(metrics.port(), 0, "port 0 resolves to the bound port");

    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    let rooms = TestServer::start(OngoingQuery::from_config(&config).await.unwrap()).await;
    RoomAdminServiceClient::new(rooms.channel())
        .start_room(StartRoomRequest { anchor_id: 1 })
        .await
        .unwrap();
    let missing = OngoingQueryServiceClient::new(rooms.channel())
        .get_room(GetRoomRequest { room_id: 999_999 })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, text) = get(metrics, "/metrics").await;
        assert!(status.contains(" 200 "), "{status}");
        let started = samples(
            &text,
            "rpc_server_calls_total",
            &[
                r#"rpc_method="StartRoom""#,
                r#"rpc_grpc_status_code="0""#,
                r#"rpc_service="livemesh.v1.RoomAdminService""#,
            ],
        );
        let not_found = samples(
            &text,
            "rpc_server_calls_total",
            &[r#"rpc_method="GetRoom""#, r#"rpc_grpc_status_code="5""#],
        );
        let client = samples(
            &text,
            "rpc_client_calls_total",
            &[r#"rpc_method="GetRoom""#, r#"rpc_grpc_status_code="5""#],
        );
        let latency = samples(
            &text,
            "rpc_server_duration_seconds_bucket",
            &[r#"rpc_method="StartRoom""#, r#"le="+Inf""#],
        );
        if [&started, &not_found, &client, &latency]
            .iter()
            .all(|s| !s.is_empty())
        {
            assert!(
                started[0].ends_with(" 1"),
                "one StartRoom call: {}",
                started[0]
            );
            assert!(
                latency[0].ends_with(" 1"),
                "one StartRoom latency: {}",
                latency[0]
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "per-RPC metrics missing from /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, _) = get(metrics, "/nothing-here").await;
    assert!(status.contains(" 404 "), "{status}");
}
