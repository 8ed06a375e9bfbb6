//! `livemesh demo`: the whole mesh in this process, driven through the real
//! gRPC clients by a short scripted broadcast. Every step checks what it
//! got, so the demo fails loudly when the mesh misbehaves.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context as _, bail, ensure};
use livemesh_mesh::config::TelemetryConfig;
use livemesh_mesh::server::LocalServer;
use livemesh_mesh::{ClientStack, Config, MeshChannel};
use livemesh_proto::time::ms_from_timestamp;
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::gifts_service_client::GiftsServiceClient;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::{
    EndRoomRequest, GetBalanceRequest, GetLovesRequest, GetRoomRequest, ListOngoingRequest,
    PartitionRequest, Room, RoomChange, RoomChangeKind, SendLovesRequest, StartRoomRequest,
    TopLoversRequest, WatchRequest, WatchResponse,
};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::Mesh;

/// Runs the demo; SQLite files go to `data_dir`, or a temporary directory.
pub async fn run(data_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let _telemetry = livemesh_mesh::telemetry::init(
        &TelemetryConfig {
            log: "warn".into(),
            otlp_endpoint: None,
        },
        "livemesh-demo",
    )?;
    let temp = tempfile::tempdir().context("creating a temporary data dir")?;
    let data_dir = data_dir.unwrap_or_else(|| temp.path().to_owned());
    let config = Config {
        data_dir: data_dir.clone(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    };
    let server = LocalServer::bind_then(config.listen, |addr| {
        let config = Config {
            listen: addr,
            ..config.clone()
        };
        async move { Mesh::from_config(&config).await }
    })
    .await?;
    println!(
        "livemesh demo: all services in one process on {}, data in {}",
        server.addr(),
        data_dir.display()
    );
    let channel = ClientStack::new(&config.client).channel(&server.uri())?;
    let result = script(channel).await;
    server.stop().await?;
    match &result {
        Ok(()) => println!("\ndemo complete: every step got the answer it expected."),
        Err(err) => println!("\ndemo FAILED: {err:#}"),
    }
    result
}

async fn script(channel: MeshChannel) -> anyhow::Result<()> {
    let mut health = HealthClient::new(channel.clone());
    let mut admin = RoomAdminServiceClient::new(channel.clone());
    let mut query = OngoingQueryServiceClient::new(channel.clone());
    let mut counter = CounterServiceClient::new(channel.clone());

    step("health: every service reports SERVING");
    for name in livemesh_proto::SERVICE_NAMES {
        let status = health
            .check(HealthCheckRequest {
                service: (*name).to_owned(),
            })
            .await?
            .into_inner()
            .status();
        println!("  {name:<36} {}", status.as_str_name());
        ensure!(status == ServingStatus::Serving, "{name} is {status:?}");
    }

    step("a settler-like service watches room starts and ends (OngoingQuery.Watch)");
    let mut watch = query.watch(WatchRequest { from: None }).await?.into_inner();
    let first = next_change(&mut watch).await?;
    println!("  {}", describe_change(&first));
    ensure!(
        first.kind() == RoomChangeKind::Snapshot,
        "a watch without a position starts with a snapshot"
    );

    step("three anchors go live (RoomAdmin.StartRoom)");
    let mut rooms = Vec::new();
    for anchor_id in [1001, 1002, 1003] {
        let room = admin
            .start_room(StartRoomRequest { anchor_id })
            .await?
            .into_inner()
            .room
            .context("StartRoom returned no room")?;
        println!("  {}", describe(&room));
        rooms.push(room);
    }

    step("a viewer opens the first room (OngoingQuery.GetRoom, from the cache)");
    let first = query
        .get_room(GetRoomRequest {
            room_id: rooms[0].room_id,
        })
        .await?
        .into_inner()
        .room
        .context("GetRoom returned no room")?;
    println!("  {}", describe(&first));
    ensure!(first == rooms[0], "GetRoom disagrees with StartRoom");

    step("the lobby lists ongoing rooms, two per page (OngoingQuery.ListOngoing)");
    let listed = list_ongoing(&mut query, 2).await?;
    let started: Vec<u64> = rooms.iter().map(|r| r.room_id).collect();
    ensure!(listed == started, "listed {listed:?}, started {started:?}");

    step("two shard workers split the ongoing rooms (OngoingQuery.Partition)");
    let mut owned = Vec::new();
    for index in 0..2 {
        let part = query
            .partition(PartitionRequest { index, total: 2 })
            .await?
            .into_inner()
            .room_ids;
        println!("  worker {index} of 2 takes rooms {part:?}");
        owned.extend(part);
    }
    owned.sort_unstable();
    ensure!(
        owned == started,
        "partitions {owned:?} != rooms {started:?}"
    );

    step("the first broadcast ends (RoomAdmin.EndRoom)");
    let ended = admin
        .end_room(EndRoomRequest {
            room_id: rooms[0].room_id,
        })
        .await?
        .into_inner()
        .room
        .context("EndRoom returned no room")?;
    println!("  {}", describe(&ended));

    step("mistakes get precise errors");
    expect_error(
        "end it again",
        admin.end_room(EndRoomRequest {
            room_id: rooms[0].room_id,
        }),
        tonic::Code::FailedPrecondition,
    )
    .await?;
    expect_error(
        "open a room that never existed",
        query.get_room(GetRoomRequest { room_id: 424_242 }),
        tonic::Code::NotFound,
    )
    .await?;
    expect_error(
        "go live as anchor 0",
        admin.start_room(StartRoomRequest { anchor_id: 0 }),
        tonic::Code::InvalidArgument,
    )
    .await?;

    step("viewers tap hearts in the second room (CounterService.SendLoves)");
    let room_id = rooms[1].room_id;
    let mut expected = 0;
    for (viewer_id, taps) in [(501_u64, 30_u64), (502, 12), (503, 20)] {
        // Taps 50 ms apart: as fast as a human taps, buffered by the app.
        let reply = counter
            .send_loves(SendLovesRequest {
                room_id,
                viewer_id,
                batch_id: format!("{viewer_id}-1"),
                taps_ms: (0..taps).map(|i| i * 50).collect(),
            })
            .await?
            .into_inner();
        println!(
            "  viewer {viewer_id} sends {taps} taps: {} counted",
            reply.accepted
        );
        ensure!(reply.accepted == taps, "an honest batch counts in full");
        expected += reply.accepted;
    }
    let flood = counter
        .send_loves(SendLovesRequest {
            room_id,
            viewer_id: 504,
            batch_id: "504-1".into(),
            taps_ms: (0..3_000).map(|i| i % 1000).collect(),
        })
        .await?
        .into_inner();
    println!(
        "  viewer 504 sends 3000 taps in one second: {} counted, {} not ({})",
        flood.accepted, flood.rejected, flood.detail
    );
    ensure!(flood.accepted <= 20, "an abusive batch is clamped");
    expected += flood.accepted;
    let retry = counter
        .send_loves(SendLovesRequest {
            room_id,
            viewer_id: 501,
            batch_id: "501-1".into(),
            taps_ms: (0..30).map(|i| i * 50).collect(),
        })
        .await?
        .into_inner();
    println!(
        "  viewer 501's app retries its batch: the same answer ({} counted), counted once",
        retry.accepted
    );
    let total = await_loves(&mut counter, room_id, expected).await?;
    println!("  GetLoves: {total} loves in room {room_id}");
    let top = counter
        .top_lovers(TopLoversRequest { room_id, limit: 3 })
        .await?
        .into_inner()
        .lovers;
    for (rank, lover) in top.iter().enumerate() {
        println!(
            "  #{} viewer {} with {} loves",
            rank + 1,
            lover.viewer_id,
            lover.loves
        );
    }

    step("gifts and live fan-out are not in this build yet");
    expect_error(
        "read a balance",
        GiftsServiceClient::new(channel.clone()).get_balance(GetBalanceRequest { user_id: 501 }),
        tonic::Code::Unimplemented,
    )
    .await?;

    step("the other broadcasts end; the lobby empties");
    for room in &rooms[1..] {
        admin
            .end_room(EndRoomRequest {
                room_id: room.room_id,
            })
            .await?;
        println!("  room {} ended", room.room_id);
    }
    let left = list_ongoing(&mut query, 2).await?;
    ensure!(left.is_empty(), "rooms still listed: {left:?}");

    step("meanwhile the watcher saw every start and end, in order");
    let mut seen = Vec::new();
    for _ in 0..6 {
        let change = next_change(&mut watch).await?;
        println!("  {}", describe_change(&change));
        seen.push((change.kind(), change.room.map_or(0, |r| r.room_id)));
    }
    let ids: Vec<u64> = rooms.iter().map(|r| r.room_id).collect();
    let expected = vec![
        (RoomChangeKind::Started, ids[0]),
        (RoomChangeKind::Started, ids[1]),
        (RoomChangeKind::Started, ids[2]),
        (RoomChangeKind::Ended, ids[0]),
        (RoomChangeKind::Ended, ids[1]),
        (RoomChangeKind::Ended, ids[2]),
    ];
    ensure!(seen == expected, "the watcher saw {seen:?}");
    Ok(())
}

/// The next change on a watch stream, within two seconds.
async fn next_change(stream: &mut tonic::Streaming<WatchResponse>) -> anyhow::Result<RoomChange> {
    tokio::time::timeout(std::time::Duration::from_secs(2), stream.message())
        .await
        .context("no room change within 2 s")??
        .and_then(|m| m.change)
        .context("the watch stream ended")
}

fn describe_change(change: &RoomChange) -> String {
    let kind = change
        .kind()
        .as_str_name()
        .trim_start_matches("ROOM_CHANGE_KIND_");
    let position = change.position.as_ref().map_or("", |p| p.token.as_str());
    match &change.room {
        Some(room) => format!(
            "{kind:<8} room {} (version {}) at position {position}",
            room.room_id, room.version
        ),
        None => format!("{kind:<8} (the ongoing rooms follow as STARTED) at position {position}"),
    }
}

/// Waits (a flush is 10 ms away) until the room's total reaches `expected`.
async fn await_loves(
    counter: &mut CounterServiceClient<MeshChannel>,
    room_id: u64,
    expected: u64,
) -> anyhow::Result<u64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let total = counter
            .get_loves(GetLovesRequest { room_id })
            .await?
            .into_inner()
            .total;
        if total >= expected || std::time::Instant::now() > deadline {
            ensure!(
                total == expected,
                "GetLoves says {total}, expected {expected}"
            );
            return Ok(total);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

fn step(title: &str) {
    println!("\n> {title}");
}

async fn list_ongoing(
    query: &mut OngoingQueryServiceClient<MeshChannel>,
    page_size: u32,
) -> anyhow::Result<Vec<u64>> {
    let mut ids = Vec::new();
    let mut page_token = String::new();
    for page_number in 1.. {
        let page = query
            .list_ongoing(ListOngoingRequest {
                page_size,
                page_token,
            })
            .await?
            .into_inner();
        let page_ids: Vec<u64> = page.rooms.iter().map(|r| r.room_id).collect();
        println!("  page {page_number}: rooms {page_ids:?}");
        ids.extend(page_ids);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    Ok(ids)
}

async fn expect_error<T>(
    what: &str,
    call: impl Future<Output = Result<T, tonic::Status>>,
    code: tonic::Code,
) -> anyhow::Result<()> {
    match call.await {
        Ok(_) => bail!("{what}: succeeded, expected {code:?}"),
        Err(status) if status.code() == code => {
            println!("  {what}: {:?} \"{}\"", status.code(), status.message());
            Ok(())
        }
        Err(status) => bail!("{what}: got {status:?}, expected {code:?}"),
    }
}

fn describe(room: &Room) -> String {
    let started = room.started_at.as_ref().map(ms_from_timestamp);
    let ended = room.ended_at.as_ref().map(ms_from_timestamp);
    let mut text = format!(
        "room {} (anchor {}) {}",
        room.room_id,
        room.anchor_id,
        room.status()
            .as_str_name()
            .trim_start_matches("ROOM_STATUS_")
    );
    if let Some(started) = started {
        text.push_str(&format!(", started {}", clock(started)));
    }
    if let Some(ended) = ended {
        text.push_str(&format!(", ended {}", clock(ended)));
    }
    text
}

/// `HH:MM:SS.mmm UTC` of epoch milliseconds.
fn clock(ms: i64) -> String {
    let day_ms = ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03} UTC",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1_000 % 60,
        day_ms % 1_000
    )
}
