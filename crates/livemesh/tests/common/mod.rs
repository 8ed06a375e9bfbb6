//! What the tests of the livemesh crate share: the mesh on a loopback
//! port, a dispatcher and a subscribe node, test tokens and viewer tokens,
//! waiting for a love total on a viewer's stream, and the `livemesh`
//! binary run beside the mesh.

// Each test file compiles this module into its own binary and uses part of
// it; what one of them leaves unused is not dead.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use livemesh::Mesh;
use livemesh_fanout::FanoutStore;
use livemesh_mesh::auth::{AuthConfig, Claims, TokenKeys, VIEWER_HEADER};
use livemesh_mesh::{Config, MeshChannel};
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{
    LoveTotal, RoomEvent, SubscribeRequest, SubscribeResponse, room_event, subscribe_response,
};
use livemesh_publish::Dispatcher;
use livemesh_subscribe::SubscribeConfig;
use livemesh_subscribe::SubscribeNode;
use livemesh_testkit::TestServer;

/// The whole mesh on a loopback port with `auth`; its services call each
/// other there.
pub async fn mesh(dir: &Path, auth: AuthConfig) -> TestServer {
    let dir = dir.to_owned();
    TestServer::start_with(|addr| async move {
        Mesh::from_config(&Config {
            data_dir: dir,
            listen: addr,
            auth,
            ..Config::default()
        })
        .await
    })
    .await
}

/// A dispatcher and a subscribe node sharing the fan-out `store`, each on
/// its own loopback port, built from `config`, whose
/// `subscribe.publish_url` is set to the dispatcher.
pub async fn dispatcher_and_node(
    config: &mut Config,
    store: FanoutStore,
) -> (TestServer, TestServer) {
    let (publish_config, publish_store) = (config.clone(), store.clone());
    let publish = TestServer::start_with(|addr| async move {
        Dispatcher::from_config(
            &Config {
                listen: addr,
                ..publish_config
            },
            publish_store,
        )
    })
    .await;
    config.section_mut::<SubscribeConfig>().publish_url = publish.url();
    let node_config = config.clone();
    let node = TestServer::start_with(|addr| async move {
        SubscribeNode::from_config(
            &Config {
                listen: addr,
                ..node_config
            },
            store,
        )
    })
    .await;
    (publish, node)
}

/// A token of `keys` for the principal `test-<role>` holding `role`.
pub fn role_token(keys: &TokenKeys, role: &str) -> String {
    keys.mint(&Claims::new(
        format!("test-{role}"),
        &[role],
        Duration::from_secs(600),
    ))
    .unwrap()
}

/// `message` with a viewer token of `keys` for `viewer` in
/// `x-livemesh-viewer`.
pub fn for_viewer<T>(keys: &TokenKeys, viewer: u64, message: T) -> tonic::Request<T> {
    let token = keys
        .mint(&Claims::viewer(viewer, Duration::from_secs(600)))
        .unwrap();
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert(VIEWER_HEADER, token.parse().unwrap());
    request
}

/// Opens the stream of `room_id` for `viewer`, named by its viewer token
/// (the request's `viewer_id` unset).
pub async fn subscribe_as(
    channel: MeshChannel,
    keys: &TokenKeys,
    viewer: u64,
    room_id: u64,
) -> tonic::Streaming<SubscribeResponse> {
    SubscribeServiceClient::new(channel)
        .subscribe(for_viewer(
            keys,
            viewer,
            SubscribeRequest {
                room_id,
                viewer_id: 0,
                ..SubscribeRequest::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

/// Opens the stream of `room_id` for `viewer_id` (dev mode: the id in the
/// request) and reads its start message.
pub async fn live_viewer(
    channel: MeshChannel,
    room_id: u64,
    viewer_id: u64,
) -> tonic::Streaming<SubscribeResponse> {
    let mut viewer = SubscribeServiceClient::new(channel)
        .subscribe(SubscribeRequest {
            room_id,
            viewer_id,
            ..SubscribeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    viewer.message().await.unwrap().expect("the start message");
    viewer
}

/// Reads `stream` until it carries the love total `total`; a stream that
/// ends, fails or has not carried it within 10 s fails the test.
pub async fn love_total_reaches(stream: &mut tonic::Streaming<SubscribeResponse>, total: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let message = tokio::time::timeout_at(deadline, stream.message())
            .await
            .expect("the love total reached the viewer within 10 s")
            .unwrap()
            .expect("the stream stays open");
        if let Some(subscribe_response::Message::Event(RoomEvent {
            kind: Some(room_event::Kind::LoveTotal(LoveTotal { total: seen })),
            ..
        })) = message.message
            && seen == total
        {
            return;
        }
    }
}

/// Runs the `livemesh` binary with `env` added to its environment, off the
/// test's runtime thread, which serves the mesh the binary talks to.
pub async fn livemesh_cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_livemesh"))
            .args(args)
            .envs(env)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}
