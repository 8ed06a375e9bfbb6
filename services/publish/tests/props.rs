//! Property test of `PublishService.Publish` through the gRPC server: any
//! field values, from an outside caller, the gift-settler or a peer
//! dispatcher, to started, ended and never-started rooms. Checks that no
//! case panics or answers INTERNAL/UNKNOWN, that nothing is stored for a
//! room the rooms service does not know, and that positions follow the
//! store's rules (a new ordered event takes the next offset, a repeated
//! key of the same kind gets the first position).
//!
//! `PROPTEST_CASES=N` runs N cases instead of the default (see
//! `livemesh_testkit::props`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;

use livemesh_fanout::FanoutConfig;
use livemesh_fanout::{FanoutSettings, FanoutStore};
use livemesh_mesh::auth::policy;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::{
    Comment, GiftSent, PublishRequest, RoomEvent, StreamPosition, room_event,
};
use livemesh_publish::Dispatcher;
use livemesh_publish::PublishConfig;
use livemesh_testkit::TestServer;
use livemesh_testkit::props::{self, id, id_from, key, text};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tonic::Code;

const CASES: u32 = 192;

/// Who calls: an outside client, the gift-settler, a peer dispatcher.
fn caller() -> impl Strategy<Value = Option<&'static str>> {
    prop_oneof![
        3 => Just(None),
        1 => Just(Some(policy::GIFT_SETTLER)),
        1 => Just(Some(policy::PUBLISH)),
    ]
}

fn request(rooms: Vec<u64>) -> BoxedStrategy<PublishRequest> {
    let event = props::room_event(
        prop_oneof![Just(0u64), id()],
        id(),
        id(),
        [1, 1, 4, 2, 1, 1],
    );
    (
        id_from(rooms),
        proptest::option::weighted(0.95, event),
        proptest::option::of(key()),
        proptest::option::weighted(0.2, text()),
    )
        .prop_map(
            |(room_id, event, idempotency_key, forwarded_from)| PublishRequest {
                room_id,
                event,
                idempotency_key,
                forwarded_from,
            },
        )
        .boxed()
}

fn kind_name(kind: &room_event::Kind) -> &'static str {
    match kind {
        room_event::Kind::LoveTotal(_) => "love_total",
        room_event::Kind::Comment(_) => "comment",
        room_event::Kind::Gift(_) => "gift",
        room_event::Kind::ViewerCount(_) => "viewer_count",
        room_event::Kind::RoomEnded(_) => "room_ended",
    }
}

fn ordered(kind: &room_event::Kind) -> bool {
    !matches!(
        kind,
        room_event::Kind::LoveTotal(_) | room_event::Kind::ViewerCount(_)
    )
}

struct Mesh {
    _dir: tempfile::TempDir,
    _rooms: TestServer,
    dispatcher: TestServer,
    store: FanoutStore,
    started: Vec<u64>,
}

async fn mesh() -> Mesh {
    let (dir, mut config, rooms) = livemesh_testkit::config_with_rooms().await;
    config.section_mut::<PublishConfig>().ongoing_query_url = rooms.url();
    let store = FanoutStore::memory(FanoutSettings::from(&*config.section::<FanoutConfig>()));
    let dispatcher =
        TestServer::start(Dispatcher::from_config(&config, store.clone()).unwrap()).await;
    let mut started = Vec::new();
    for _ in 0..4 {
        started.push(livemesh_testkit::start_room(rooms.channel(), 7).await);
    }
    // One of them ended: the dispatcher stores its end from the Watch.
    let ended = started[3];
    livemesh_testkit::end_room(rooms.channel(), ended).await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    while !store.holds(ended).await.unwrap() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the room's end was not stored"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Mesh {
        _dir: dir,
        _rooms: rooms,
        dispatcher,
        store,
        started,
    }
}

/// What the model knows of a room: its epoch and last ordered offset, and
/// the position each (kind, key) got.
#[derive(Default)]
struct Model {
    heads: HashMap<u64, (u64, u64)>,
    keys: HashMap<(u64, &'static str, String), StreamPosition>,
}

#[test]
fn publish_answers_any_request_precisely_and_stores_only_known_rooms() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mesh = rt.block_on(mesh());
    let model = std::sync::Mutex::new(Model::default());
    {
        let mut model = model.lock().unwrap();
        for &room in &mesh.started {
            let history = rt.block_on(mesh.store.history(room, 0, u64::MAX)).unwrap();
            let last = history.entries.last().map_or(0, |(offset, _)| *offset);
            model.heads.insert(room, (history.epoch, last));
        }
        // The ended room's end, stored by the dispatcher under its key.
        let ended = mesh.started[3];
        let (epoch, last) = model.heads[&ended];
        model.keys.insert(
            (
                ended,
                "room_ended",
                livemesh_fanout::ROOM_ENDED_KEY.to_owned(),
            ),
            StreamPosition {
                epoch,
                offset: last,
            },
        );
    }
    let strategy = (request(mesh.started.clone()), caller());
    props::run(&rt, CASES, strategy, |(request, caller)| {
        let mesh = &mesh;
        let model = &model;
        async move {
            let mut client =
                PublishServiceClient::new(props::probe_channel(&mesh.dispatcher, caller));
            let answer = client.publish(request.clone()).await;
            props::check(
                "Publish",
                &answer,
                &[
                    Code::InvalidArgument,
                    Code::NotFound,
                    Code::FailedPrecondition,
                    Code::PermissionDenied,
                ],
            )?;
            let room = request.room_id;
            let known = mesh.started.contains(&room);
            if !known {
                prop_assert!(
                    answer.is_err(),
                    "a publish to unknown room {room} answered OK"
                );
                prop_assert!(
                    !mesh.store.holds(room).await.unwrap(),
                    "state was stored for room {room}, which was never started"
                );
            }
            let stored = mesh.store.stored_rooms().await.unwrap();
            prop_assert!(
                stored <= mesh.started.len(),
                "{stored} rooms stored, {} started",
                mesh.started.len()
            );
            let Ok(reply) = answer else { return Ok(()) };
            let position = reply.into_inner().position.unwrap_or_default();
            let kind = request.event.unwrap().kind.unwrap();
            let mut model = model.lock().unwrap();
            let scoped = request
                .idempotency_key
                .map(|key| (room, kind_name(&kind), key));
            if let Some(first) = scoped.as_ref().and_then(|k| model.keys.get(k)) {
                prop_assert_eq!(&position, first, "a repeated key gets the first position");
                return Ok(());
            }
            let (epoch, last) = model.heads.get(&room).copied().unwrap_or_default();
            if epoch != 0 {
                prop_assert_eq!(position.epoch, epoch, "the room's epoch changed");
            }
            let expected = if ordered(&kind) { last + 1 } else { last };
            prop_assert_eq!(
                position.offset,
                expected,
                "a new {} took offset {} after offset {}",
                kind_name(&kind),
                position.offset,
                last
            );
            model.heads.insert(room, (position.epoch, position.offset));
            if let Some(scoped) = scoped {
                model.keys.insert(scoped, position);
            }
            Ok::<(), TestCaseError>(())
        }
    });
}

/// Found by the property test: one idempotency key on a comment and then
/// on a gift named one entry of the store, so the gift was answered as the
/// comment's duplicate and never stored (its paid gift lost to viewers).
#[tokio::test]
async fn one_key_on_a_comment_and_a_gift_publishes_both() {
    let mesh = mesh().await;
    let room = mesh.started[0];
    let event = |kind| RoomEvent {
        kind: Some(kind),
        ..RoomEvent::default()
    };
    let mut outside = PublishServiceClient::new(mesh.dispatcher.channel());
    let mut settler = PublishServiceClient::new(mesh.dispatcher.channel_as(policy::GIFT_SETTLER));
    let comment = publish_with_key(
        &mut outside,
        room,
        event(room_event::Kind::Comment(Comment {
            viewer_id: 3,
            text: "hello".into(),
        })),
        "k1",
    )
    .await;
    let gift = publish_with_key(
        &mut settler,
        room,
        event(room_event::Kind::Gift(GiftSent {
            viewer_id: 3,
            gift_id: 1,
            amount: 5,
            transfer_id: "gift:3:k1".into(),
        })),
        "k1",
    )
    .await;
    assert_eq!(gift.offset, comment.offset + 1, "the gift is a new event");
    let history = mesh.store.history(room, 0, u64::MAX).await.unwrap();
    assert_eq!(history.entries.len(), 2, "both are in the history");
}

/// Publishes `event` to `room_id` with the idempotency key `key`; returns
/// its position.
async fn publish_with_key(
    client: &mut PublishServiceClient<livemesh_mesh::MeshChannel>,
    room_id: u64,
    event: RoomEvent,
    key: &str,
) -> StreamPosition {
    client
        .publish(PublishRequest {
            room_id,
            event: Some(event),
            idempotency_key: Some(key.into()),
            forwarded_from: None,
        })
        .await
        .unwrap()
        .into_inner()
        .position
        .unwrap()
}
