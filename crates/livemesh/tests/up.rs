//! The all-in-one mesh: health, reflection, the demo, and `livemesh up` as a
//! real process that keeps its rooms across a restart and stops cleanly on
//! SIGTERM.

// Helpers outside #[test] functions unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use livemesh::ledger_csv;
use livemesh_mesh::auth::AuthConfig;
use livemesh_mesh::config::ClientConfig;
use livemesh_mesh::{ClientStack, MeshChannel};
use livemesh_proto::v1::gifts_service_client::GiftsServiceClient;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::{DepositRequest, GetRoomRequest, RoomStatus, StartRoomRequest};
use livemesh_testkit::TestServer;
use tokio_stream::StreamExt as _;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};

/// The whole mesh on a loopback port, in dev mode.
async fn mesh(dir: &std::path::Path) -> TestServer {
    common::mesh(dir, AuthConfig::default()).await
}

async fn reflect(channel: MeshChannel, request: MessageRequest) -> MessageResponse {
    let mut client = ServerReflectionClient::new(channel);
    let outbound = tokio_stream::iter([ServerReflectionRequest {
        host: String::new(),
        message_request: Some(request),
    }]);
    let mut replies = client
        .server_reflection_info(outbound)
        .await
        .expect("reflection call")
        .into_inner();
    let reply: ServerReflectionResponse = replies
        .next()
        .await
        .expect("a reflection reply")
        .expect("reflection reply ok");
    reply.message_response.expect("reflection payload")
}

#[tokio::test]
async fn every_service_is_serving_and_listed_by_reflection() {
    let dir = tempfile::tempdir().unwrap();
    let server = mesh(dir.path()).await;

    let mut health = HealthClient::new(server.channel());
    for name in livemesh_proto::SERVICE_NAMES {
        let status = health
            .check(HealthCheckRequest {
                service: (*name).to_owned(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "{name}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "livemesh.v1.NoSuchService".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let MessageResponse::ListServicesResponse(listed) = reflect(
        server.channel(),
        MessageRequest::ListServices(String::new()),
    )
    .await
    else {
        panic!("expected a service list");
    };
    let listed: Vec<String> = listed.service.into_iter().map(|s| s.name).collect();
    for name in livemesh_proto::SERVICE_NAMES
        .iter()
        .chain(&["grpc.health.v1.Health"])
    {
        assert!(listed.iter().any(|l| l == name), "{name} not in {listed:?}");
    }

    // What grpcurl's `describe` needs: the file that defines a service.
    let MessageResponse::FileDescriptorResponse(files) = reflect(
        server.channel(),
        MessageRequest::FileContainingSymbol("livemesh.v1.RoomAdminService".into()),
    )
    .await
    else {
        panic!("expected file descriptors");
    };
    assert!(!files.file_descriptor_proto.is_empty());
}

#[tokio::test]
async fn the_demo_completes() {
    let dir = tempfile::tempdir().unwrap();
    // The walkthrough, then a small live broadcast (the default crowd is
    // for a person watching, not for a test run beside others).
    livemesh::demo::run(livemesh::demo::DemoArgs {
        data_dir: Some(dir.path().to_owned()),
        walkthrough: true,
        live: Some(livemesh::demo::Broadcast {
            viewers: 200,
            duration: Duration::from_secs(3),
            plain: true,
            ..livemesh::demo::Broadcast::default()
        }),
    })
    .await
    .expect("demo");
}

async fn livemesh_cli(args: &[&str]) -> std::process::Output {
    common::livemesh_cli(args, &[]).await
}

#[tokio::test]
async fn ledger_export_writes_the_ledger_as_csv() {
    let dir = tempfile::tempdir().unwrap();
    let server = mesh(dir.path()).await;
    let addr = format!("http://{}", server.addr);
    let before = livemesh_mesh::now_ms();
    // A key with a comma and quotes: the transfer id needs CSV quoting.
    let deposit = GiftsServiceClient::new(server.channel())
        .deposit(DepositRequest {
            idempotency_key: "top-up \"a\",1".into(),
            user_id: 77,
            amount: 1_234,
        })
        .await
        .unwrap()
        .into_inner();
    let after = livemesh_mesh::now_ms();
    assert_eq!(deposit.transfer_id, "deposit:77:top-up \"a\",1");

    let all = livemesh_cli(&["ledger-export", "--addr", &addr]).await;
    let stderr = String::from_utf8_lossy(&all.stderr);
    assert!(all.status.success(), "{stderr}");
    assert!(stderr.contains("2 entries"), "{stderr}");
    let csv = String::from_utf8(all.stdout).unwrap();
    let lines: Vec<&str> = csv.split_terminator("\r\n").collect();
    assert_eq!(lines[0], "transfer_id,shard,account,amount,kind,created_at");
    let shard = livemesh_gift_settler::shard_of(77, 4);
    let prefix = format!("\"deposit:77:top-up \"\"a\"\",1\",{shard},");
    let mut entries = Vec::new();
    for line in &lines[1..] {
        let rest = line
            .strip_prefix(&prefix)
            .unwrap_or_else(|| panic!("{line}"));
        let fields: Vec<&str> = rest.split(',').collect();
        let [account, amount, kind, created_at] = fields[..] else {
            panic!("{line}");
        };
        assert_eq!(kind, "deposit", "{line}");
        let created = ledger_csv::parse_time(created_at).unwrap();
        assert!((before..=after).contains(&created), "{line}");
        assert!(
            created_at.ends_with('Z') && created_at.len() == 24,
            "{line}"
        );
        entries.push((account.to_owned(), amount.parse::<i64>().unwrap()));
    }
    entries.sort();
    assert_eq!(
        entries,
        [
            ("external:funding".to_owned(), -1_234),
            ("user:77".to_owned(), 1_234)
        ]
    );

    // Nothing before the deposit; all of it from then on, into a file.
    let none = livemesh_cli(&[
        "ledger-export",
        "--addr",
        &addr,
        "--to",
        &before.to_string(),
    ])
    .await;
    assert!(none.status.success());
    assert_eq!(
        none.stdout,
        b"transfer_id,shard,account,amount,kind,created_at\r\n"
    );
    let file = dir.path().join("ledger.csv");
    let since = ledger_csv::rfc3339_ms(before);
    let out = livemesh_cli(&[
        "ledger-export",
        "--addr",
        &addr,
        "--from",
        &since,
        "--out",
        file.to_str().unwrap(),
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), csv);

    // Bad times: a usage error (exit 2) that says what a TIME is.
    let bad = livemesh_cli(&["ledger-export", "--addr", &addr, "--from", "yesterday"]).await;
    assert_eq!(bad.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("--from") && stderr.contains("RFC 3339"),
        "{stderr}"
    );
    let reversed = livemesh_cli(&[
        "ledger-export",
        "--addr",
        &addr,
        "--from",
        "2026-11-22T10:00:00Z",
        "--to",
        "1000",
    ])
    .await;
    assert_eq!(reversed.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&reversed.stderr);
    assert!(stderr.contains("is after --to"), "{stderr}");
    server.stop().await;
}

/// `livemesh up` as its own process.
struct Up {
    child: Child,
    channel: MeshChannel,
}

/// A test that fails before `terminate` must not leave the process behind.
impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Up {
    async fn start(dir: &std::path::Path) -> Self {
        // Reserve a free port, then hand it to the process.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(env!("CARGO_BIN_EXE_livemesh"))
            .args(["up", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(dir)
            // Tests run in parallel: each process its own metrics port.
            .args(["--metrics-listen", "127.0.0.1:0"])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn livemesh up");
        let channel = || {
            ClientStack::new(&ClientConfig::default())
                .channel(&format!("http://127.0.0.1:{port}"))
                .unwrap()
        };
        // The refused connections while the process starts count against
        // the waiting channel's breaker; the test's calls get a fresh one.
        let mut up = Self {
            child,
            channel: channel(),
        };
        up.wait_serving().await;
        up.channel = channel();
        up
    }

    /// Waits until health answers SERVING (the process needs a moment to
    /// open its databases), failing if the process dies first.
    async fn wait_serving(&mut self) {
        let mut health = HealthClient::new(self.channel.clone());
        for _ in 0..200 {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("livemesh up exited early: {status}");
            }
            let reply = health
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await;
            if reply.is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("livemesh up did not report SERVING within 10 s");
    }

    /// SIGTERM, then the exit status.
    async fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success());
        tokio::task::spawn_blocking(move || {
            let status = self.child.wait().unwrap();
            std::mem::forget(self); // waited for: nothing left to kill
            status
        })
        .await
        .unwrap()
    }
}

#[tokio::test]
async fn up_keeps_its_rooms_across_a_restart_and_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let up = Up::start(dir.path()).await;
    let room = RoomAdminServiceClient::new(up.channel.clone())
        .start_room(StartRoomRequest { anchor_id: 31 })
        .await
        .unwrap()
        .into_inner()
        .room
        .unwrap();
    let status = up.terminate().await;
    assert!(status.success(), "exit after SIGTERM: {status}");

    let up = Up::start(dir.path()).await;
    let again = OngoingQueryServiceClient::new(up.channel.clone())
        .get_room(GetRoomRequest {
            room_id: room.room_id,
        })
        .await
        .unwrap()
        .into_inner()
        .room
        .unwrap();
    assert_eq!(again, room);
    assert_eq!(again.status(), RoomStatus::Ongoing);
    assert!(up.terminate().await.success());
}

#[test]
fn up_rejects_a_bad_config_with_a_clear_message_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("livemesh.toml");
    std::fs::write(&file, "[rooms]\nscan_intervl_ms = 5\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_livemesh"))
        .args(["up", "--config"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("scan_intervl_ms"), "{stderr}");
}
