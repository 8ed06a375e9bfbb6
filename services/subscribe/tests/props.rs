//! Property test of `SubscribeService` (Subscribe and Deliver) through the
//! gRPC server: any field values, to started, ended and never-started
//! rooms, while a viewer holds one room on the node (so that Deliver's
//! events reach a live sequencer and feed). Checks that no case panics (on
//! any thread: the node's gap fill and renewals run in tasks of their
//! own) or answers INTERNAL/UNKNOWN, and that neither the node nor the
//! fan-out store holds state for a room the rooms service does not know.
//!
//! `PROPTEST_CASES=N` runs N cases instead of the default (see
//! `livemesh_testkit::props`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use livemesh_fanout::FanoutConfig;
use livemesh_fanout::{FanoutSettings, FanoutStore};
use livemesh_mesh::MeshChannel;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{
    DeliverRequest, LoveTotal, RoomEvent, StreamPosition, SubscribeRequest, room_event,
    subscribe_response,
};
use livemesh_publish::Dispatcher;
use livemesh_publish::PublishConfig;
use livemesh_subscribe::SubscribeConfig;
use livemesh_subscribe::SubscribeNode;
use livemesh_testkit::TestServer;
use livemesh_testkit::props::{self, id, id_from};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tonic::Code;

const CASES: u32 = 160;
const WAIT: Duration = Duration::from_secs(10);

struct Mesh {
    _dir: tempfile::TempDir,
    _rooms: TestServer,
    _dispatcher: TestServer,
    node_server: TestServer,
    node: SubscribeNode,
    store: FanoutStore,
    /// Started rooms; the first has a viewer on the node, the last ended.
    started: Vec<u64>,
    /// The epoch of the first room.
    epoch: u64,
}

async fn mesh() -> Mesh {
    let (dir, mut config, rooms) = livemesh_testkit::config_with_rooms().await;
    config.section_mut::<SubscribeConfig>().ongoing_query_url = rooms.url();
    config.section_mut::<PublishConfig>().ongoing_query_url = rooms.url();
    let subscribe_section = config.section_mut::<SubscribeConfig>();
    subscribe_section.report_interval_ms = 100;
    subscribe_section.lease_ms = 1_000;
    subscribe_section.gap_wait_ms = 5;
    subscribe_section.queue_len = 32;
    let store = FanoutStore::memory(FanoutSettings::from(&*config.section::<FanoutConfig>()));
    let dispatcher =
        TestServer::start(Dispatcher::from_config(&config, store.clone()).unwrap()).await;
    config.section_mut::<SubscribeConfig>().publish_url = dispatcher.url();
    let mut node = None;
    let node_server = TestServer::start_with(|addr| {
        let mut config = config.clone();
        config.listen = addr;
        let built = SubscribeNode::from_config(&config, store.clone());
        node = built.as_ref().ok().cloned();
        async move { built }
    })
    .await;
    let mut started = Vec::new();
    for _ in 0..3 {
        started.push(livemesh_testkit::start_room(rooms.channel(), 7).await);
    }
    livemesh_testkit::end_room(rooms.channel(), started[2]).await;
    let watched = started[0];
    let epoch = keep_watching(node_server.channel(), watched).await;
    Mesh {
        _dir: dir,
        _rooms: rooms,
        _dispatcher: dispatcher,
        node_server,
        node: node.unwrap(),
        store,
        started,
        epoch,
    }
}

/// A viewer of `room` that reads everything and subscribes again when its
/// stream ends (a forged room-ended event ends it), so that the node keeps
/// the room; returns the room's epoch.
async fn keep_watching(channel: MeshChannel, room: u64) -> u64 {
    let (epoch_tx, epoch_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut epoch_tx = Some(epoch_tx);
        let mut client = SubscribeServiceClient::new(channel);
        loop {
            let request = SubscribeRequest {
                room_id: room,
                viewer_id: 1,
                ..SubscribeRequest::default()
            };
            let Ok(stream) = client.subscribe(request).await else {
                return;
            };
            let mut stream = stream.into_inner();
            while let Ok(Some(message)) = stream.message().await {
                if let Some(subscribe_response::Message::Started(started)) = message.message
                    && let Some(tx) = epoch_tx.take()
                {
                    let _ = tx.send(started.position.unwrap_or_default().epoch);
                }
            }
        }
    });
    tokio::time::timeout(WAIT, epoch_rx)
        .await
        .expect("the viewer's stream started")
        .expect("the viewer's stream started")
}

fn epoch(real: u64) -> impl Strategy<Value = u64> + Clone {
    prop_oneof![
        4 => Just(real),
        1 => Just(real.saturating_add(1)),
        1 => Just(0),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

fn offset() -> impl Strategy<Value = u64> + Clone {
    prop_oneof![
        4 => 1..40u64,
        1 => Just(0),
        1 => Just(u64::MAX),
        1 => Just(u64::MAX - 1),
        1 => any::<u64>(),
    ]
}

#[derive(Debug, Clone)]
enum Call {
    Subscribe(SubscribeRequest),
    Deliver(DeliverRequest),
}

fn call(rooms: Vec<u64>, real_epoch: u64) -> impl Strategy<Value = Call> {
    let subscribe = (
        id_from(rooms.clone()),
        id(),
        proptest::option::of(
            (epoch(real_epoch), offset())
                .prop_map(|(epoch, offset)| StreamPosition { epoch, offset }),
        ),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            |(room_id, viewer_id, resume, accept_batches, stamp_writes)| {
                Call::Subscribe(SubscribeRequest {
                    room_id,
                    viewer_id,
                    resume,
                    accept_batches,
                    stamp_writes,
                })
            },
        );
    let deliver = id_from(rooms).prop_flat_map(move |room_id| {
        let event = props::room_event(
            prop_oneof![4 => Just(room_id), 1 => id()],
            epoch(real_epoch),
            offset(),
            [1, 2, 4, 1, 1, 1],
        );
        proptest::collection::vec(event, 0..4)
            .prop_map(move |events| Call::Deliver(DeliverRequest { room_id, events }))
    });
    prop_oneof![subscribe, deliver]
}

#[test]
fn subscribe_and_deliver_answer_any_request_precisely_and_store_only_known_rooms() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mesh = rt.block_on(mesh());
    let strategy = call(mesh.started.clone(), mesh.epoch);
    props::run(&rt, CASES, strategy, |call| {
        let mesh = &mesh;
        async move {
            let mut client = SubscribeServiceClient::new(props::probe_channel(
                &mesh.node_server,
                Some(livemesh_mesh::auth::policy::PUBLISH),
            ));
            let room = match call {
                Call::Subscribe(request) => {
                    let room = request.room_id;
                    let allowed = [
                        Code::InvalidArgument,
                        Code::NotFound,
                        Code::FailedPrecondition,
                        Code::OutOfRange,
                    ];
                    let answer = client.subscribe(request).await;
                    props::check("Subscribe", &answer, &allowed)?;
                    if let Ok(stream) = answer {
                        // The first message says where the stream starts.
                        let first = tokio::time::timeout(WAIT, stream.into_inner().message())
                            .await
                            .map_err(|_| TestCaseError::fail("no first message"))?;
                        match first {
                            Ok(Some(message)) => prop_assert!(
                                matches!(
                                    message.message,
                                    Some(subscribe_response::Message::Started(_))
                                ),
                                "the first message is not StreamStarted: {message:?}"
                            ),
                            Ok(None) => {
                                return Err(TestCaseError::fail("the stream ended at once"));
                            }
                            Err(status) => {
                                props::check_code("Subscribe stream", &status, &allowed)?
                            }
                        }
                    }
                    room
                }
                Call::Deliver(request) => {
                    let room = request.room_id;
                    let answer = client.deliver(request).await;
                    props::check("Deliver", &answer, &[Code::InvalidArgument])?;
                    room
                }
            };
            if !mesh.started.contains(&room) {
                prop_assert!(
                    !mesh.store.holds(room).await.unwrap(),
                    "the store holds room {room}, which was never started"
                );
            }
            let stored = mesh.store.stored_rooms().await.unwrap();
            let held = mesh.node.stored_rooms();
            prop_assert!(
                stored <= mesh.started.len() && held <= mesh.started.len(),
                "{stored} rooms in the store, {held} on the node; {} started",
                mesh.started.len()
            );
            Ok(())
        }
    });
}

/// Found by the property test: a Deliver whose event carries a time at the
/// end of i64 seconds overflowed the fan-out lag metric's conversion to
/// milliseconds (a panic in the handler in debug builds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deliver_with_extreme_times_is_taken() {
    props::watch_panics();
    let mesh = mesh().await;
    let room = mesh.started[0];
    let mut client = SubscribeServiceClient::new(mesh.node_server.channel());
    let events = [i64::MAX, i64::MIN]
        .into_iter()
        .map(|seconds| RoomEvent {
            room_id: room,
            epoch: mesh.epoch,
            server_time: Some(prost_types::Timestamp {
                seconds,
                nanos: i32::MAX,
            }),
            kind: Some(room_event::Kind::LoveTotal(LoveTotal { total: 1 })),
            ..RoomEvent::default()
        })
        .collect();
    let reply = client
        .deliver(DeliverRequest {
            room_id: room,
            events,
        })
        .await;
    assert!(reply.is_ok(), "{reply:?}");
    assert_eq!(props::panics(), 0);
}
