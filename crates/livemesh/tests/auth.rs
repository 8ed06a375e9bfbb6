//! The all-in-one mesh with `auth.mode = "enforce"`: calls without valid
//! credentials are UNAUTHENTICATED, calls from a principal the RPC's policy
//! does not allow are PERMISSION_DENIED, the viewer comes from the viewer
//! token, rate and size limits answer with precise statuses, and the
//! services' own calls to each other (counter -> publish -> subscribe,
//! room lookups, Watch) still carry a love total to a viewer end to end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use livemesh_mesh::auth::{AuthConfig, AuthMode, Claims, Credential, Secret, TokenKeys};
use livemesh_mesh::config::ClientConfig;
use livemesh_mesh::{ClientStack, MeshChannel};
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::gifts_service_client::GiftsServiceClient;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::settlement_service_client::SettlementServiceClient;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{
    Comment, DeliverRequest, DepositRequest, GetBalanceRequest, GetRoomRequest, LoveTotal,
    PublishRequest, ReconcileRequest, RoomEvent, SendLovesRequest, StartRoomRequest,
    TopLoversRequest, room_event,
};
use livemesh_testkit::TestServer;
use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const SECRET: &str = "auth-test-secret-0123456789abcdefghijklmnop";

/// The whole mesh on a loopback port, enforcing auth as `tweak` leaves it.
async fn enforcing_mesh(dir: &std::path::Path, tweak: impl FnOnce(&mut AuthConfig)) -> TestServer {
    let mut auth = AuthConfig {
        mode: AuthMode::Enforce,
        token_secret: Some(Secret::new(SECRET)),
        ..AuthConfig::default()
    };
    tweak(&mut auth);
    auth.validate().unwrap();
    common::mesh(dir, auth).await
}

fn keys() -> TokenKeys {
    TokenKeys::new(&Secret::new(SECRET)).unwrap()
}

/// A channel whose calls carry `authorization: Bearer <token>` (or nothing).
fn channel(server: &TestServer, token: Option<&str>) -> MeshChannel {
    let stack = ClientStack::new(&ClientConfig::default());
    let stack = match token {
        Some(token) => stack.with_credential(Credential::bearer(token).unwrap()),
        None => stack,
    };
    stack.channel(&format!("http://{}", server.addr)).unwrap()
}

fn as_role(server: &TestServer, role: &str) -> MeshChannel {
    channel(server, Some(&common::role_token(&keys(), role)))
}

/// `message` with the viewer token of `viewer` in `x-livemesh-viewer`.
fn for_viewer<T>(viewer: u64, message: T) -> tonic::Request<T> {
    common::for_viewer(&keys(), viewer, message)
}

async fn start_room(server: &TestServer) -> u64 {
    livemesh_testkit::start_room(as_role(server, "admin"), 900).await
}

fn assert_code<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, says: &str) {
    let status = result.unwrap_err();
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(says),
        "{:?} should say {says:?}",
        status.message()
    );
}

#[tokio::test]
async fn calls_without_valid_credentials_are_unauthenticated_and_health_stays_open() {
    let dir = tempfile::tempdir().unwrap();
    let server = enforcing_mesh(dir.path(), |_| {}).await;
    let get_room = GetRoomRequest { room_id: 1 };

    let anonymous = OngoingQueryServiceClient::new(channel(&server, None))
        .get_room(get_room)
        .await;
    assert_code(anonymous, Code::Unauthenticated, "authorization: Bearer");

    let other_secret = TokenKeys::new(&Secret::new("another-secret-0123456789abcdefghijk"))
        .unwrap()
        .mint(&Claims::new("bff", &["bff"], Duration::from_secs(600)))
        .unwrap();
    let forged = OngoingQueryServiceClient::new(channel(&server, Some(&other_secret)))
        .get_room(get_room)
        .await;
    assert_code(forged, Code::Unauthenticated, "signature");

    let expired = keys()
        .mint(&Claims {
            exp: jsonwebtoken_now() - 120,
            ..Claims::new("bff", &["bff"], Duration::ZERO)
        })
        .unwrap();
    let late = OngoingQueryServiceClient::new(channel(&server, Some(&expired)))
        .get_room(get_room)
        .await;
    assert_code(late, Code::Unauthenticated, "expired");

    let garbage = OngoingQueryServiceClient::new(channel(&server, Some("not-a-jwt")))
        .get_room(get_room)
        .await;
    assert_code(garbage, Code::Unauthenticated, "well-formed");

    // Health needs no credentials (load balancers and probes call it).
    let status = HealthClient::new(channel(&server, None))
        .check(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );

    // The right credentials get through to the service (room 1 is unknown).
    let known = OngoingQueryServiceClient::new(as_role(&server, "bff"))
        .get_room(get_room)
        .await;
    assert_eq!(known.unwrap_err().code(), Code::NotFound);
}

fn jsonwebtoken_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn callers_the_policy_does_not_allow_are_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let server = enforcing_mesh(dir.path(), |_| {}).await;
    let room_id = start_room(&server).await;

    // A BFF is no finance principal.
    let reconcile = SettlementServiceClient::new(as_role(&server, "bff"))
        .reconcile(ReconcileRequest { room_id })
        .await;
    assert_code(
        reconcile,
        Code::PermissionDenied,
        "/livemesh.v1.SettlementService/Reconcile",
    );
    // Only dispatchers deliver to subscribe nodes, not the counter.
    let deliver = SubscribeServiceClient::new(as_role(&server, "counter"))
        .deliver(DeliverRequest {
            room_id,
            events: vec![],
        })
        .await;
    assert_code(deliver, Code::PermissionDenied, "[\"publish\"]");
    // Only admins start rooms.
    let start = RoomAdminServiceClient::new(as_role(&server, "bff"))
        .start_room(StartRoomRequest { anchor_id: 1 })
        .await;
    assert_code(start, Code::PermissionDenied, "admin");
    // Only the payment provider tops up balances.
    let deposit = GiftsServiceClient::new(as_role(&server, "bff"))
        .deposit(DepositRequest {
            idempotency_key: "k".into(),
            user_id: 42,
            amount: 100,
        })
        .await;
    assert_code(deposit, Code::PermissionDenied, "payments");
    // A BFF may publish viewers' comments, not love totals.
    let forged_total = PublishServiceClient::new(as_role(&server, "bff"))
        .publish(PublishRequest {
            room_id,
            event: Some(RoomEvent {
                room_id,
                kind: Some(room_event::Kind::LoveTotal(LoveTotal { total: 1_000_000 })),
                ..RoomEvent::default()
            }),
            ..PublishRequest::default()
        })
        .await;
    assert_code(forged_total, Code::PermissionDenied, "other than comments");

    // The allowed principals get through.
    SettlementServiceClient::new(as_role(&server, "finance"))
        .reconcile(ReconcileRequest { room_id })
        .await
        .unwrap();
    SubscribeServiceClient::new(as_role(&server, "publish"))
        .deliver(DeliverRequest {
            room_id,
            events: vec![],
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn the_viewer_comes_from_the_viewer_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = enforcing_mesh(dir.path(), |_| {}).await;
    let room_id = start_room(&server).await;
    let mut counter = CounterServiceClient::new(as_role(&server, "bff"));
    let loves = |viewer_id: u64, batch: &str| SendLovesRequest {
        room_id,
        viewer_id,
        batch_id: batch.into(),
        taps_ms: vec![0, 100, 200],
    };

    // Without a viewer token a BFF cannot act for a viewer.
    let anonymous = counter.send_loves(loves(42, "b0")).await;
    assert_code(anonymous, Code::Unauthenticated, "x-livemesh-viewer");
    // A viewer token for 42 cannot send loves as 43.
    let impostor = counter.send_loves(for_viewer(42, loves(43, "b1"))).await;
    assert_code(impostor, Code::PermissionDenied, "authenticated viewer 42");
    // An unset viewer_id is the token's viewer.
    let sent = counter
        .send_loves(for_viewer(42, loves(0, "b2")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.accepted, 3, "{sent:?}");
    // The ranking shows the token's viewer once the counter has flushed.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let top = loop {
        let top = counter
            .top_lovers(TopLoversRequest { room_id, limit: 5 })
            .await
            .unwrap()
            .into_inner();
        if !top.lovers.is_empty() || tokio::time::Instant::now() > deadline {
            break top;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(top.lovers.len(), 1, "{top:?}");
    assert_eq!(top.lovers[0].viewer_id, 42);

    // Balances: the payment provider tops 42 up; the BFF reads it for 42.
    GiftsServiceClient::new(as_role(&server, "payments"))
        .deposit(DepositRequest {
            idempotency_key: "top-up-1".into(),
            user_id: 42,
            amount: 500,
        })
        .await
        .unwrap();
    let mut gifts = GiftsServiceClient::new(as_role(&server, "bff"));
    let balance = gifts
        .get_balance(for_viewer(42, GetBalanceRequest { user_id: 0 }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((balance.user_id, balance.balance), (42, 500));
    let other = gifts
        .get_balance(for_viewer(42, GetBalanceRequest { user_id: 7 }))
        .await;
    assert_code(other, Code::PermissionDenied, "user_id 7");

    // A comment is the viewer's of the token, and needs one.
    let mut publish = PublishServiceClient::new(as_role(&server, "bff"));
    let comment = |viewer_id: u64| PublishRequest {
        room_id,
        event: Some(RoomEvent {
            room_id,
            kind: Some(room_event::Kind::Comment(Comment {
                viewer_id,
                text: "hello".into(),
            })),
            ..RoomEvent::default()
        }),
        ..PublishRequest::default()
    };
    assert_code(
        publish.publish(comment(42)).await,
        Code::Unauthenticated,
        "x-livemesh-viewer",
    );
    assert_code(
        publish.publish(for_viewer(42, comment(43))).await,
        Code::PermissionDenied,
        "viewer 42",
    );
    publish.publish(for_viewer(42, comment(0))).await.unwrap();
}

#[tokio::test]
async fn a_love_reaches_a_viewer_end_to_end_with_auth_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let server = enforcing_mesh(dir.path(), |_| {}).await;
    let room_id = start_room(&server).await;
    let bff = as_role(&server, "bff");

    let mut stream = common::subscribe_as(bff.clone(), &keys(), 7, room_id).await;
    let sent = CounterServiceClient::new(bff)
        .send_loves(for_viewer(
            8,
            SendLovesRequest {
                room_id,
                viewer_id: 8,
                batch_id: "e2e".into(),
                taps_ms: (0..10).map(|i| i * 100).collect(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sent.accepted, 10, "{sent:?}");

    // The counter publishes the total (its own token), the dispatcher
    // delivers it to this node (its own token): the viewer sees 10.
    common::love_total_reaches(&mut stream, 10).await;
}

#[tokio::test]
async fn rate_and_size_limits_answer_with_precise_statuses() {
    let dir = tempfile::tempdir().unwrap();
    let server = enforcing_mesh(dir.path(), |auth| {
        auth.viewer_calls_per_sec = 1;
        auth.viewer_burst = 2;
        auth.room_publishes_per_sec = 1;
        auth.room_burst = 2;
        auth.max_message_bytes = 1024;
    })
    .await;
    let room_id = start_room(&server).await;
    let mut gifts = GiftsServiceClient::new(as_role(&server, "bff"));
    let balance = || for_viewer(5, GetBalanceRequest { user_id: 0 });
    gifts.get_balance(balance()).await.unwrap();
    gifts.get_balance(balance()).await.unwrap();
    assert_code(
        gifts.get_balance(balance()).await,
        Code::ResourceExhausted,
        "retry after",
    );
    // Another viewer has a bucket of its own.
    gifts
        .get_balance(for_viewer(6, GetBalanceRequest { user_id: 0 }))
        .await
        .unwrap();

    // Comments to one room: two, then the room's limit.
    let mut publish = PublishServiceClient::new(as_role(&server, "bff"));
    let comment = |viewer: u64| {
        for_viewer(
            viewer,
            PublishRequest {
                room_id,
                event: Some(RoomEvent {
                    room_id,
                    kind: Some(room_event::Kind::Comment(Comment {
                        viewer_id: 0,
                        text: "hi".into(),
                    })),
                    ..RoomEvent::default()
                }),
                ..PublishRequest::default()
            },
        )
    };
    publish.publish(comment(10)).await.unwrap();
    publish.publish(comment(11)).await.unwrap();
    assert_code(
        publish.publish(comment(12)).await,
        Code::ResourceExhausted,
        &format!("room {room_id}"),
    );

    // A message over auth.max_message_bytes.
    let oversize = CounterServiceClient::new(as_role(&server, "bff"))
        .send_loves(for_viewer(
            20,
            SendLovesRequest {
                room_id,
                viewer_id: 0,
                batch_id: "big".into(),
                taps_ms: (0..2_000).map(|i| 1_000_000 + i).collect(),
            },
        ))
        .await;
    assert_code(oversize, Code::OutOfRange, "the limit is: 1024 bytes");
}

/// Runs the `livemesh` binary with the mesh's secret in its environment.
async fn livemesh_cli(args: &[&str]) -> std::process::Output {
    common::livemesh_cli(args, &[("LIVEMESH_AUTH__TOKEN_SECRET", SECRET)]).await
}

#[tokio::test]
async fn an_operator_exports_the_ledger_with_a_finance_token_from_livemesh_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = enforcing_mesh(dir.path(), |_| {}).await;
    let addr = format!("http://{}", server.addr);

    let refused = livemesh_cli(&["ledger-export", "--addr", &addr]).await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("authorization: Bearer"), "{stderr}");

    let minted = livemesh_cli(&["token", "--sub", "alice", "--role", "finance"]).await;
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let token = String::from_utf8(minted.stdout).unwrap();
    let claims = keys().verify(token.trim()).unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.roles),
        ("alice", vec!["finance".to_owned()])
    );
    let token_file = dir.path().join("finance.jwt");
    std::fs::write(&token_file, &token).unwrap();
    let exported = livemesh_cli(&[
        "ledger-export",
        "--addr",
        &addr,
        "--token-file",
        token_file.to_str().unwrap(),
    ])
    .await;
    let stderr = String::from_utf8_lossy(&exported.stderr);
    assert!(exported.status.success(), "{stderr}");
    assert!(
        String::from_utf8_lossy(&exported.stdout).starts_with("transfer_id,"),
        "{stderr}"
    );
}
