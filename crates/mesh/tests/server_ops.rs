//! What operators rely on: the plaintext health-only listener kubelet
//! probes, and the counter of shed calls the `LivemeshCallsShed` alert reads.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use livemesh_mesh::server::ServerBuilder;
use livemesh_mesh::server::ShedLayer;
use tokio::sync::Semaphore;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::{Layer as _, ServiceExt as _};

#[tokio::test]
async fn the_health_listener_serves_health_and_nothing_else_and_stops_with_the_server() {
    let health = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health_addr = health.local_addr().unwrap();
    let mut server = ServerBuilder::new();
    server.health_listener(health);
    let server = common::serve(server).await;

    let channel = common::channel(health_addr).await;
    let status = common::serving_status(&mut HealthClient::new(channel.clone())).await;
    assert_eq!(status, ServingStatus::Serving);
    // Reflection (served on the main port) is not on this one.
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let refused = reflection
        .server_reflection_info(tokio_stream::iter(Vec::<
            tonic_reflection::pb::v1::ServerReflectionRequest,
        >::new()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");

    server.shutdown.trigger();
    tokio::time::timeout(Duration::from_secs(10), server.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let gone = tokio::net::TcpStream::connect(health_addr).await;
    assert!(
        gone.is_err(),
        "the health port still accepts after shutdown"
    );
}

#[tokio::test]
async fn every_shed_call_is_counted_by_method() {
    let (exporter, provider) = common::install_meter();

    // A service that says when a call entered it (it holds the only
    // permit then) and holds it until the gate opens.
    let gate = Arc::new(Semaphore::new(0));
    let (entered, mut entries) = tokio::sync::mpsc::unbounded_channel();
    let inner = tower::service_fn({
        let gate = gate.clone();
        move |_request: http::Request<tonic::body::Body>| {
            let gate = gate.clone();
            let entered = entered.clone();
            async move {
                entered.send(()).unwrap();
                let _permit = gate.acquire().await.unwrap();
                Ok::<_, std::convert::Infallible>(http::Response::new(tonic::body::Body::empty()))
            }
        }
    });
    let shed = ShedLayer::new(1).layer(inner);
    let request = || {
        http::Request::builder()
            .uri("/livemesh.v1.CounterService/SendLoves")
            .body(tonic::body::Body::empty())
            .unwrap()
    };
    let held = tokio::spawn(shed.clone().oneshot(request()));
    entries.recv().await.unwrap();
    let answer = shed.clone().oneshot(request()).await.unwrap();
    assert_eq!(
        answer.headers().get("grpc-status").unwrap(),
        &(tonic::Code::Unavailable as i32).to_string()
    );
    gate.add_permits(1);
    held.await.unwrap().unwrap();

    let exported = common::exported(&exporter, &provider);
    let shed_metric = common::metric(&exported, "livemesh.server.shed");
    let counted = common::counted(
        shed_metric,
        &[("rpc.method", "/livemesh.v1.CounterService/SendLoves")],
    );
    assert!(counted >= 1, "shed calls counted: {counted}");
}
