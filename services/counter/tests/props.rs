//! Property test of `CounterService` (SendLoves, GetLoves, TopLovers)
//! through the gRPC server, on the in-process hot store: any field values,
//! to an ongoing room, an ended one and rooms never started. Checks that no
//! case panics or answers INTERNAL/UNKNOWN, that the hot store holds
//! nothing for a room the rooms service does not know, that rankings are
//! ordered and bounded, and at the end that the hot store's total is
//! exactly the loves the counter accepted (none lost, none counted twice).
//!
//! `PROPTEST_CASES=N` runs N cases instead of the default (see
//! `livemesh_testkit::props`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use livemesh_counter::Counter;
use livemesh_counter::CounterConfig;
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::{GetLovesRequest, SendLovesRequest, TopLoversRequest};
use livemesh_testkit::TestServer;
use livemesh_testkit::props::{self, id, id_from, key};
use proptest::prelude::*;
use tonic::Code;

const CASES: u32 = 192;

#[derive(Debug, Clone)]
enum Call {
    Send(SendLovesRequest),
    Get(GetLovesRequest),
    Top(TopLoversRequest),
}

fn tap() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..120_000u64,
        1 => Just(0),
        1 => Just(u64::MAX),
        1 => Just(i64::MAX as u64),
        1 => any::<u64>(),
    ]
}

fn call(rooms: Vec<u64>) -> impl Strategy<Value = Call> {
    let viewer = prop_oneof![3 => 1..5u64, 1 => id()];
    prop_oneof![
        4 => (
            id_from(rooms.clone()),
            viewer,
            key(),
            proptest::collection::vec(tap(), 0..300),
        )
            .prop_map(|(room_id, viewer_id, batch_id, taps_ms)| {
                Call::Send(SendLovesRequest {
                    room_id,
                    viewer_id,
                    batch_id,
                    taps_ms,
                })
            }),
        1 => id_from(rooms.clone()).prop_map(|room_id| Call::Get(GetLovesRequest { room_id })),
        1 => (
            id_from(rooms),
            prop_oneof![Just(0u32), Just(u32::MAX), 1..200u32, any::<u32>()],
        )
            .prop_map(|(room_id, limit)| Call::Top(TopLoversRequest { room_id, limit })),
    ]
}

#[test]
fn the_counter_answers_any_request_precisely_and_counts_each_accepted_love_once() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (_dir, _rooms, server, counter, started) = rt.block_on(async {
        let (dir, mut config, rooms) = livemesh_testkit::config_with_rooms().await;
        config.section_mut::<CounterConfig>().ongoing_query_url = rooms.url();
        // No dispatcher: publishing totals fails and is counted.
        config.section_mut::<CounterConfig>().publish_url = rooms.url();
        config.section_mut::<CounterConfig>().database_url =
            livemesh_mesh::config::sqlite_url(&dir.path().join("counter.db"));
        config.section_mut::<CounterConfig>().flush_tick_ms = 5;
        config.section_mut::<CounterConfig>().end_grace_ms = 50;
        let counter = Counter::from_config(&config).await.unwrap();
        let server = TestServer::start(counter.clone()).await;
        let ongoing = livemesh_testkit::start_room(rooms.channel(), 7).await;
        let ended = livemesh_testkit::start_room(rooms.channel(), 7).await;
        livemesh_testkit::end_room(rooms.channel(), ended).await;
        (dir, rooms, server, counter, vec![ongoing, ended])
    });
    let store = counter.hot_store().clone();
    props::run(&rt, CASES, call(started.clone()), |call| {
        let (server, store, started) = (&server, &store, &started);
        async move {
            let mut client = CounterServiceClient::new(props::probe_channel(server, None));
            let room = match call {
                Call::Send(request) => {
                    let room = request.room_id;
                    let answer = client.send_loves(request).await;
                    props::check(
                        "SendLoves",
                        &answer,
                        &[
                            Code::InvalidArgument,
                            Code::NotFound,
                            Code::FailedPrecondition,
                        ],
                    )?;
                    room
                }
                Call::Get(request) => {
                    let room = request.room_id;
                    let answer = client.get_loves(request).await;
                    props::check(
                        "GetLoves",
                        &answer,
                        &[Code::InvalidArgument, Code::NotFound],
                    )?;
                    room
                }
                Call::Top(request) => {
                    let room = request.room_id;
                    let limit = request.limit;
                    let answer = client.top_lovers(request).await;
                    props::check(
                        "TopLovers",
                        &answer,
                        &[Code::InvalidArgument, Code::NotFound],
                    )?;
                    if let Ok(reply) = answer {
                        let lovers = reply.into_inner().lovers;
                        let most = if limit == 0 { 10 } else { limit.min(100) };
                        prop_assert!(lovers.len() <= most as usize, "{} lovers", lovers.len());
                        prop_assert!(
                            lovers.windows(2).all(|w| w[0].loves >= w[1].loves),
                            "the ranking is not ordered: {lovers:?}"
                        );
                    }
                    room
                }
            };
            if !started.contains(&room) {
                prop_assert_eq!(store.total(room).await.unwrap(), 0);
            }
            let stored = store.stored_rooms().await.unwrap();
            prop_assert!(
                stored <= started.len(),
                "the hot store holds {stored} rooms, {} started",
                started.len()
            );
            Ok(())
        }
    });
    // Every accepted love is in the hot store once: all went to the
    // ongoing room (the ended one takes none).
    rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while counter.waiting() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "loves still waiting after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let accepted = counter.stats().accepted.load(Ordering::SeqCst);
        assert_eq!(store.total(started[0]).await.unwrap(), accepted);
    });
}
