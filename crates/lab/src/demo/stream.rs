//! The demo's steps in the second room, live: viewers subscribe, comments
//! and a gift reach every one of them once and in order, a dropped viewer
//! resumes where it left off, and every stream closes when the room ends
//! (SubscribeService, PublishService).

use anyhow::{Context as _, ensure};
use livemesh_mesh::MeshChannel;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::{
    Comment, GiftSent, PublishRequest, RoomEvent, StreamPosition, SubscribeRequest, room_event,
};

use super::viewers::{Audience, Prints, live};
use super::{Clients, REPORT_INTERVAL_MS, expect_error, step};

/// The second room's viewers (7 and 8 stay; 9 drops and resumes) and the
/// ordered events published to them.
pub(super) struct LiveRoom {
    pub(super) audience: Audience,
    v7: usize,
    v8: usize,
    v9: usize,
    /// The offsets of the ordered events published, in order.
    published: Vec<u64>,
    /// What viewer 9 missed while its connection was down.
    missed: Vec<u64>,
}

/// Viewers 7, 8 and 9 subscribe to `room_id` (and nobody can subscribe to
/// `ended`, the room that ended already).
pub(super) async fn subscribe(c: &Clients, room_id: u64, ended: u64) -> anyhow::Result<LiveRoom> {
    step("viewers open the second room's live stream (SubscribeService.Subscribe)");
    let mut audience = Audience::new(c.channel.clone(), room_id);
    expect_error(
        "subscribe to the ended first room",
        audience.client.subscribe(SubscribeRequest {
            room_id: ended,
            viewer_id: 7,
            ..SubscribeRequest::default()
        }),
        tonic::Code::FailedPrecondition,
    )
    .await?;
    println!(
        "  viewers 7, 8 and 9 subscribe to room {room_id}; 7 prints all it sees, 8 and 9 \
         only how their stream starts and ends"
    );
    let v7 = audience.open(7, None, Prints::Everything).await?;
    let v8 = audience.open(8, None, Prints::StartAndEnd).await?;
    let v9 = audience.open(9, None, Prints::StartAndEnd).await?;
    audience
        .until("every stream starts", |all| {
            all.iter().all(|v| v.started.is_some())
        })
        .await?;
    println!("  the node reports the room's viewer count every {REPORT_INTERVAL_MS} ms:");
    audience
        .until("viewer 7 sees 3 viewers", |all| {
            all[v7].viewer_count == Some(3)
        })
        .await?;
    Ok(LiveRoom {
        audience,
        v7,
        v8,
        v9,
        published: Vec::new(),
        missed: Vec::new(),
    })
}

/// Two comments (one retried with its idempotency key), a gift event a
/// viewer may not publish, and the same gift published as the gift-settler
/// (through `as_gift_settler`).
pub(super) async fn comments_and_gift(
    c: &mut Clients,
    room: &mut LiveRoom,
    as_gift_settler: MeshChannel,
) -> anyhow::Result<()> {
    step("viewers comment, a gift arrives (PublishService.Publish)");
    let publish = &mut c.publish;
    let audience = &mut room.audience;
    let room_id = audience.room_id;
    let published = &mut room.published;
    let hello = comment(publish, audience, 501, "hello from Lisbon!", "c-501-1").await?;
    published.push(hello.offset);
    let (again, nodes) = publish_event(
        publish,
        room_id,
        room_event::Kind::Comment(Comment {
            viewer_id: 501,
            text: "hello from Lisbon!".into(),
        }),
        "c-501-1",
    )
    .await?;
    println!(
        "  501's app retries that publish (same idempotency key): offset {} again, handed to {nodes} nodes",
        again.offset
    );
    ensure!(
        again == hello && nodes == 0,
        "a retried publish answered {again:?} (to {nodes} nodes), the first {hello:?}"
    );
    let wow = comment(publish, audience, 502, "that jump!", "c-502-1").await?;
    published.push(wow.offset);
    let gift_event = room_event::Kind::Gift(GiftSent {
        viewer_id: 503,
        gift_id: 12,
        amount: 500,
        transfer_id: "t-503-1".into(),
    });
    expect_error(
        "viewer 503's app publishes a gift event itself",
        publish.publish(PublishRequest {
            room_id,
            event: Some(RoomEvent {
                kind: Some(gift_event.clone()),
                ..RoomEvent::default()
            }),
            ..PublishRequest::default()
        }),
        tonic::Code::PermissionDenied,
    )
    .await?;
    println!("  viewer 503's gift 12 (500) is paid; the gift-settler publishes it");
    let gift = publish_seen(
        &mut PublishServiceClient::new(as_gift_settler),
        audience,
        gift_event,
        "gift-t-503-1",
    )
    .await?;
    published.push(gift.offset);
    for viewer in &audience.viewers {
        ensure!(
            viewer.ordered == *published,
            "viewer {} saw ordered events at offsets {:?}, published {published:?}",
            viewer.viewer_id,
            viewer.ordered
        );
    }
    println!(
        "  viewers 7, 8 and 9 each saw offsets {published:?} once, in order: the retry was not shown again"
    );
    Ok(())
}

/// Viewer 9's stream drops; two comments are published while it is gone;
/// it subscribes again from its last position and gets exactly those.
pub(super) async fn resume(c: &mut Clients, room: &mut LiveRoom) -> anyhow::Result<()> {
    step("viewer 9's connection drops; it resumes where it left off");
    let LiveRoom {
        audience,
        v7,
        v8,
        v9,
        published,
        missed,
    } = room;
    let (v7, v8) = (*v7, *v8);
    let last = audience.drop_connection(*v9).await?;
    println!(
        "  viewer 9's stream is gone; its last event was at offset {} (epoch {})",
        last.offset, last.epoch
    );
    audience
        .until("viewer 7 sees 2 viewers", |all| {
            all[v7].viewer_count == Some(2)
        })
        .await?;
    for (viewer_id, text, key) in [
        (502, "where did viewer 9 go?", "c-502-2"),
        (501, "replay that please", "c-501-2"),
    ] {
        let position = comment(&mut c.publish, audience, viewer_id, text, key).await?;
        published.push(position.offset);
    }
    *missed = published[published.len() - 2..].to_vec();
    ensure!(
        audience.viewers[v7].ordered == *published && audience.viewers[v8].ordered == *published,
        "viewers 7 and 8 saw {:?} and {:?}, published {published:?}",
        audience.viewers[v7].ordered,
        audience.viewers[v8].ordered
    );
    println!(
        "  viewer 9 subscribes again with resume = {{epoch: {}, offset: {}}}:",
        last.epoch, last.offset
    );
    *v9 = audience.open(9, Some(last), Prints::Everything).await?;
    let (v9, missed) = (*v9, &*missed);
    audience
        .until("the resumed stream replays what it missed", |all| {
            all[v9].ordered == *missed
        })
        .await?;
    let started = audience.viewers[v9].started.unwrap_or_default();
    ensure!(
        started.recovered
            && !started.epoch_changed
            && started.replayed == missed.len() as u64
            && started.position.map(|p| p.offset) == missed.last().copied(),
        "the resumed stream started with {started:?}; it missed offsets {missed:?}"
    );
    println!(
        "  StreamStarted said recovered: true and {} replayed: nothing lost, nothing twice",
        started.replayed
    );
    Ok(())
}

/// After the room's end: every stream that was not dropped saw it last and
/// closed cleanly, each after exactly the ordered events it should have.
pub(super) async fn streams_closed(room: &mut LiveRoom) -> anyhow::Result<()> {
    step("the viewers saw their room end, and their streams closed");
    let audience = &mut room.audience;
    audience.closed().await?;
    for viewer in &audience.viewers {
        println!("  {}", viewer.summary());
    }
    for viewer in &audience.viewers {
        ensure!(
            viewer.problems.is_empty(),
            "viewer {}'s stream broke the contract: {:?}",
            viewer.viewer_id,
            viewer.problems
        );
    }
    for viewer in live(&audience.viewers) {
        ensure!(
            viewer.closed == Some(Ok(())),
            "viewer {}'s stream ended {:?}",
            viewer.viewer_id,
            viewer.closed
        );
        let ended = viewer
            .room_ended
            .with_context(|| format!("viewer {} never saw the room end", viewer.viewer_id))?;
        ensure!(
            viewer.ordered.last() == Some(&ended),
            "viewer {} saw events after the room ended: {:?}",
            viewer.viewer_id,
            viewer.ordered
        );
    }
    let room_ended = audience.viewers[room.v7].room_ended.unwrap_or_default();
    let mut after_end = room.published.clone();
    after_end.push(room_ended);
    let mut resumed = room.missed.clone();
    resumed.push(room_ended);
    for (index, expected) in [
        (room.v7, &after_end),
        (room.v8, &after_end),
        (room.v9, &resumed),
    ] {
        let viewer = &audience.viewers[index];
        ensure!(
            &viewer.ordered == expected,
            "viewer {} saw offsets {:?}, expected {expected:?}",
            viewer.viewer_id,
            viewer.ordered
        );
    }
    Ok(())
}

/// Publishes one event; returns its position and how many nodes it was handed to.
async fn publish_event(
    publish: &mut PublishServiceClient<MeshChannel>,
    room_id: u64,
    kind: room_event::Kind,
    idempotency_key: &str,
) -> anyhow::Result<(StreamPosition, u64)> {
    let reply = publish
        .publish(PublishRequest {
            room_id,
            event: Some(RoomEvent {
                kind: Some(kind),
                ..RoomEvent::default()
            }),
            idempotency_key: Some(idempotency_key.to_owned()),
            forwarded_from: None,
        })
        .await?
        .into_inner();
    let position = reply.position.context("Publish returned no position")?;
    Ok((position, reply.nodes))
}

/// Publishes an ordered event, waits until every live viewer has it, and
/// says where it went.
async fn publish_seen(
    publish: &mut PublishServiceClient<MeshChannel>,
    audience: &mut Audience,
    kind: room_event::Kind,
    idempotency_key: &str,
) -> anyhow::Result<StreamPosition> {
    let (position, nodes) = publish_event(publish, audience.room_id, kind, idempotency_key).await?;
    audience
        .until(
            &format!("every viewer sees offset {}", position.offset),
            |all| live(all).all(|v| v.ordered.contains(&position.offset)),
        )
        .await?;
    println!(
        "  published at offset {}, handed to {nodes} node; every viewer stream has it",
        position.offset
    );
    Ok(position)
}

/// A viewer's comment, published and seen.
async fn comment(
    publish: &mut PublishServiceClient<MeshChannel>,
    audience: &mut Audience,
    viewer_id: u64,
    text: &str,
    idempotency_key: &str,
) -> anyhow::Result<StreamPosition> {
    println!("  viewer {viewer_id} comments {text:?}");
    let kind = room_event::Kind::Comment(Comment {
        viewer_id,
        text: text.to_owned(),
    });
    publish_seen(publish, audience, kind, idempotency_key).await
}
