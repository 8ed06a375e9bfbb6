//! `livemesh top` against a running mesh: the whole mesh serves on a
//! loopback port with its metrics on another, a viewer watches a room
//! while loves and comments come in, and `top --plain` (its output piped,
//! as in a log) prints figures that move.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Stdio;
use std::time::Duration;

use livemesh::Mesh;
use livemesh_mesh::Config;
use livemesh_mesh::config::TelemetryConfig;
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::{Comment, PublishRequest, RoomEvent, SendLovesRequest, room_event};
use livemesh_testkit::TestServer;
use tokio::io::{AsyncBufReadExt as _, BufReader};

/// `key=value` of a plain line, as a number (`-` when nothing was observed).
fn figure(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix(&format!("{key}=")))
        .and_then(|value| value.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_the_figures_of_a_running_mesh_move() {
    let telemetry = livemesh_mesh::telemetry::init(
        &TelemetryConfig {
            log: "warn".into(),
            metrics_listen: "127.0.0.1:0".into(),
            ..TelemetryConfig::default()
        },
        "top-test",
    )
    .unwrap();
    let metrics = telemetry
        .metrics_addr()
        .expect("the metrics endpoint is bound");
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_owned();
    let mesh = TestServer::start_with(|addr| async move {
        Mesh::from_config(&Config {
            data_dir,
            listen: addr,
            ..Config::default()
        })
        .await
    })
    .await;
    let room_id = livemesh_testkit::start_room(mesh.channel(), 7).await;
    let mut viewer = common::live_viewer(mesh.channel(), room_id, 3).await;
    // The viewer reads everything it is sent, so its stream never falls behind.
    tokio::spawn(async move { while let Ok(Some(_)) = viewer.message().await {} });

    // Loves and comments keep coming while top runs.
    let channel = mesh.channel();
    let traffic = tokio::spawn(async move {
        let mut counter = CounterServiceClient::new(channel.clone());
        let mut publish = PublishServiceClient::new(channel);
        for batch in 0_u64.. {
            counter
                .send_loves(SendLovesRequest {
                    room_id,
                    viewer_id: 10 + batch % 50,
                    batch_id: format!("b{batch}"),
                    taps_ms: vec![0, 60, 120],
                })
                .await
                .unwrap();
            publish
                .publish(PublishRequest {
                    room_id,
                    event: Some(RoomEvent {
                        kind: Some(room_event::Kind::Comment(Comment {
                            viewer_id: 3,
                            text: format!("comment {batch}"),
                        })),
                        ..RoomEvent::default()
                    }),
                    ..PublishRequest::default()
                })
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });

    let mut top = tokio::process::Command::new(env!("CARGO_BIN_EXE_livemesh"))
        .args([
            "top",
            "--metrics",
            &format!("http://{metrics}/metrics"),
            "--interval-ms",
            "300",
            "--count",
            "40",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(top.stdout.take().unwrap()).lines();
    // Piped: a header, then one plain line per refresh. Read until the
    // figures have moved (or top stops after its 40 refreshes).
    let mut totals = Vec::new();
    let mut seen = Vec::new();
    let moved = loop {
        let Some(line) = lines.next_line().await.unwrap() else {
            break false;
        };
        seen.push(line.clone());
        assert!(
            !line.contains('\u{1b}'),
            "no terminal escapes when piped: {line:?}"
        );
        let Some(total) = figure(&line, "loves_total") else {
            continue;
        };
        assert_eq!(figure(&line, "viewers"), Some(1.0), "{line}");
        totals.push(total);
        let rising = totals.windows(2).filter(|w| w[1] > w[0]).count();
        if rising >= 2
            && figure(&line, "loves/s").is_some_and(|rate| rate > 0.0)
            && figure(&line, "comments/s").is_some_and(|rate| rate > 0.0)
            && figure(&line, "delivered/s").is_some_and(|rate| rate > 0.0)
            && figure(&line, "publish_to_deliver_p99_ms").is_some()
            && figure(&line, "deliver_to_written_p99_ms").is_some()
        {
            break true;
        }
    };
    assert!(moved, "top's figures did not move:\n{}", seen.join("\n"));
    traffic.abort();
    top.kill().await.unwrap();
    mesh.stop().await;
}
