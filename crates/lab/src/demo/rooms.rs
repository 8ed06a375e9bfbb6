//! The demo's steps about rooms: health, starting and ending rooms, the
//! cached reads (GetRoom, ListOngoing, Partition), precise errors, and what
//! a watcher of starts and ends sees (OngoingQuery, RoomAdmin).

use std::time::Duration;

use anyhow::{Context as _, ensure};
use livemesh_mesh::MeshChannel;
use livemesh_proto::time::ms_from_timestamp;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::{
    EndRoomRequest, GetRoomRequest, ListOngoingRequest, PartitionRequest, Room, RoomChange,
    RoomChangeKind, StartRoomRequest, WatchRequest, WatchResponse,
};
use tonic::Streaming;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

use super::{Clients, clock, expect_error, step};

pub(super) async fn health(c: &mut Clients) -> anyhow::Result<()> {
    step("health: every service reports SERVING");
    for name in livemesh_proto::SERVICE_NAMES {
        let status = c
            .health
            .check(HealthCheckRequest {
                service: (*name).to_owned(),
            })
            .await?
            .into_inner()
            .status();
        println!("  {name:<36} {}", status.as_str_name());
        ensure!(status == ServingStatus::Serving, "{name} is {status:?}");
    }
    Ok(())
}

/// Opens the watch a settler-like service keeps; it starts with a snapshot.
pub(super) async fn watch(c: &mut Clients) -> anyhow::Result<Streaming<WatchResponse>> {
    step("a settler-like service watches room starts and ends (OngoingQuery.Watch)");
    let mut watch = c
        .query
        .watch(WatchRequest { from: None })
        .await?
        .into_inner();
    let first = next_change(&mut watch).await?;
    println!("  {}", describe_change(&first));
    ensure!(
        first.kind() == RoomChangeKind::Snapshot,
        "a watch without a position starts with a snapshot"
    );
    Ok(watch)
}

pub(super) async fn start_rooms(c: &mut Clients) -> anyhow::Result<Vec<Room>> {
    step("three anchors go live (RoomAdmin.StartRoom)");
    let mut rooms = Vec::new();
    for anchor_id in [1001, 1002, 1003] {
        let room = c
            .admin
            .start_room(StartRoomRequest { anchor_id })
            .await?
            .into_inner()
            .room
            .context("StartRoom returned no room")?;
        println!("  {}", describe(&room));
        rooms.push(room);
    }
    Ok(rooms)
}

pub(super) async fn get_room(c: &mut Clients, room: &Room) -> anyhow::Result<()> {
    step("a viewer opens the first room (OngoingQuery.GetRoom, from the cache)");
    let first = c
        .query
        .get_room(GetRoomRequest {
            room_id: room.room_id,
        })
        .await?
        .into_inner()
        .room
        .context("GetRoom returned no room")?;
    println!("  {}", describe(&first));
    ensure!(&first == room, "GetRoom disagrees with StartRoom");
    Ok(())
}

pub(super) async fn lobby(c: &mut Clients, rooms: &[Room]) -> anyhow::Result<()> {
    step("the lobby lists ongoing rooms, two per page (OngoingQuery.ListOngoing)");
    let listed = list_ongoing(&mut c.query, 2).await?;
    let started = ids(rooms);
    ensure!(listed == started, "listed {listed:?}, started {started:?}");
    Ok(())
}

pub(super) async fn partition(c: &mut Clients, rooms: &[Room]) -> anyhow::Result<()> {
    step("two shard workers split the ongoing rooms (OngoingQuery.Partition)");
    let started = ids(rooms);
    let mut owned = Vec::new();
    for index in 0..2 {
        let part = c
            .query
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
    Ok(())
}

pub(super) async fn end_first(c: &mut Clients, room: &Room) -> anyhow::Result<()> {
    step("the first broadcast ends (RoomAdmin.EndRoom)");
    let ended = c
        .admin
        .end_room(EndRoomRequest {
            room_id: room.room_id,
        })
        .await?
        .into_inner()
        .room
        .context("EndRoom returned no room")?;
    println!("  {}", describe(&ended));
    Ok(())
}

/// `ended` is the room the previous step ended.
pub(super) async fn mistakes(c: &mut Clients, ended: &Room) -> anyhow::Result<()> {
    step("mistakes get precise errors");
    expect_error(
        "end it again",
        c.admin.end_room(EndRoomRequest {
            room_id: ended.room_id,
        }),
        tonic::Code::FailedPrecondition,
    )
    .await?;
    expect_error(
        "open a room that never existed",
        c.query.get_room(GetRoomRequest { room_id: 424_242 }),
        tonic::Code::NotFound,
    )
    .await?;
    expect_error(
        "go live as anchor 0",
        c.admin.start_room(StartRoomRequest { anchor_id: 0 }),
        tonic::Code::InvalidArgument,
    )
    .await
}

/// Ends `rooms` (the ones still live) and lists the lobby, which must be empty.
pub(super) async fn end_the_others(c: &mut Clients, rooms: &[Room]) -> anyhow::Result<()> {
    step("the other broadcasts end; the lobby empties");
    for room in rooms {
        c.admin
            .end_room(EndRoomRequest {
                room_id: room.room_id,
            })
            .await?;
        println!("  room {} ended", room.room_id);
    }
    let left = list_ongoing(&mut c.query, 2).await?;
    ensure!(left.is_empty(), "rooms still listed: {left:?}");
    Ok(())
}

/// What the watcher opened by [`watch`] saw since: each room started, then
/// each ended, in that order.
pub(super) async fn watcher_saw_everything(
    watch: &mut Streaming<WatchResponse>,
    rooms: &[Room],
) -> anyhow::Result<()> {
    step("meanwhile the watcher saw every start and end, in order");
    let mut seen = Vec::new();
    for _ in 0..6 {
        let change = next_change(watch).await?;
        println!("  {}", describe_change(&change));
        seen.push((change.kind(), change.room.map_or(0, |r| r.room_id)));
    }
    let ids = ids(rooms);
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

fn ids(rooms: &[Room]) -> Vec<u64> {
    rooms.iter().map(|r| r.room_id).collect()
}

/// The next change on a watch stream, within two seconds.
async fn next_change(stream: &mut Streaming<WatchResponse>) -> anyhow::Result<RoomChange> {
    tokio::time::timeout(Duration::from_secs(2), stream.message())
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
