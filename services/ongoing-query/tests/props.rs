//! Property test of `OngoingQueryService` and `RoomAdminService` (every
//! RPC) through the gRPC server: any field values. Checks that no case
//! panics or answers INTERNAL/UNKNOWN, and that the answers agree with what
//! the previous cases did: a started room is found ongoing until it is
//! ended, it ends once, and `ListOngoing` and `Partition` give exactly the
//! ongoing rooms.
//!
//! Tokens are at most 1 KiB here: their refusal echoes them, and an
//! excerpt-only message is another change (issue 12, point 5).
//!
//! `PROPTEST_CASES=N` runs N cases instead of the default (see
//! `livemesh_testkit::props`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::{
    ChangePosition, EndRoomRequest, GetRoomRequest, ListOngoingRequest, PartitionRequest,
    RoomStatus, StartRoomRequest, WatchRequest,
};
use livemesh_testkit::props::{self, id, id_from, text};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tonic::Code;

const CASES: u32 = 192;

#[derive(Debug, Clone)]
enum Call {
    Start(StartRoomRequest),
    End(EndRoomRequest),
    Get(GetRoomRequest),
    List(ListOngoingRequest),
    Partition(PartitionRequest),
    Watch(WatchRequest),
}

/// Anchor ids: mostly of region 0 (the one configured), and any.
fn anchor() -> impl Strategy<Value = u64> {
    prop_oneof![3 => 1..1_000u64, 1 => id()]
}

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        (id(), id()).prop_map(|(epoch, seq)| format!("{epoch}.{seq}")),
        id().prop_map(|n| n.to_string()),
        text().prop_map(|t| t.chars().take(1_024).collect()),
    ]
}

fn call(rooms: Vec<u64>) -> impl Strategy<Value = Call> {
    let room = id_from(rooms);
    let small = prop_oneof![Just(0u32), 1..20u32, Just(u32::MAX), any::<u32>()];
    prop_oneof![
        3 => anchor().prop_map(|anchor_id| Call::Start(StartRoomRequest { anchor_id })),
        2 => room.clone().prop_map(|room_id| Call::End(EndRoomRequest { room_id })),
        2 => room.prop_map(|room_id| Call::Get(GetRoomRequest { room_id })),
        1 => (small.clone(), prop_oneof![Just(String::new()), token()])
            .prop_map(|(page_size, page_token)| Call::List(ListOngoingRequest { page_size, page_token })),
        1 => (small.clone(), small)
            .prop_map(|(index, total)| Call::Partition(PartitionRequest { index, total })),
        1 => proptest::option::of(token())
            .prop_map(|from| Call::Watch(WatchRequest { from: from.map(|token| ChangePosition { token }) })),
    ]
}

/// Rooms the cases started: id -> ended.
type Model = HashMap<u64, bool>;

#[test]
fn room_services_answer_any_request_precisely_and_agree_with_each_other() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = rt.block_on(livemesh_testkit::ongoing_query(dir.path()));
    // The ids rooms will get (ids of region 0 count from 1), so that ends
    // and reads reach real rooms.
    let expected_ids: Vec<u64> = (1..=40).collect();
    let model = Mutex::new(Model::new());
    props::run(&rt, CASES, call(expected_ids), |call| {
        let (server, model) = (&server, &model);
        async move {
            let channel = props::probe_channel(server, None);
            let mut admin = RoomAdminServiceClient::new(channel.clone());
            let mut query = OngoingQueryServiceClient::new(channel);
            match call {
                Call::Start(request) => {
                    let answer = admin.start_room(request).await;
                    props::check(
                        "StartRoom",
                        &answer,
                        &[Code::InvalidArgument, Code::FailedPrecondition],
                    )?;
                    if let Ok(reply) = answer {
                        let room = reply.into_inner().room.unwrap();
                        prop_assert_eq!(room.status(), RoomStatus::Ongoing);
                        let fresh = model.lock().unwrap().insert(room.room_id, false).is_none();
                        prop_assert!(fresh, "room id {} was given twice", room.room_id);
                    }
                }
                Call::End(request) => {
                    let room_id = request.room_id;
                    let answer = admin.end_room(request).await;
                    props::check(
                        "EndRoom",
                        &answer,
                        &[
                            Code::InvalidArgument,
                            Code::NotFound,
                            Code::FailedPrecondition,
                        ],
                    )?;
                    let mut model = model.lock().unwrap();
                    let expected = match model.get(&room_id) {
                        None => Code::NotFound,
                        Some(true) => Code::FailedPrecondition,
                        Some(false) => Code::Ok,
                    };
                    let code = answer.as_ref().map_or_else(|s| s.code(), |_| Code::Ok);
                    if room_id != 0 {
                        prop_assert_eq!(code, expected, "EndRoom of room {}", room_id);
                    }
                    if code == Code::Ok {
                        model.insert(room_id, true);
                    }
                }
                Call::Get(request) => {
                    let room_id = request.room_id;
                    let answer = query.get_room(request).await;
                    props::check("GetRoom", &answer, &[Code::InvalidArgument, Code::NotFound])?;
                    let status = answer
                        .ok()
                        .and_then(|r| r.into_inner().room)
                        .map(|r| r.status());
                    let expected = model.lock().unwrap().get(&room_id).map(|ended| {
                        if *ended {
                            RoomStatus::Ended
                        } else {
                            RoomStatus::Ongoing
                        }
                    });
                    if room_id != 0 {
                        prop_assert_eq!(status, expected, "GetRoom of room {}", room_id);
                    }
                }
                Call::List(request) => {
                    let answer = query.list_ongoing(request).await;
                    props::check("ListOngoing", &answer, &[Code::InvalidArgument])?;
                }
                Call::Partition(request) => {
                    let answer = query.partition(request).await;
                    props::check("Partition", &answer, &[Code::InvalidArgument])?;
                }
                Call::Watch(request) => {
                    let answer = query.watch(request).await;
                    props::check("Watch", &answer, &[Code::InvalidArgument])?;
                }
            }
            let ongoing: BTreeSet<u64> = model
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, ended)| !**ended)
                .map(|(id, _)| *id)
                .collect();
            prop_assert_eq!(&list_all(&mut query).await?, &ongoing, "ListOngoing");
            let mut parts = Vec::new();
            for index in 0..3 {
                parts.extend(
                    query
                        .partition(PartitionRequest { index, total: 3 })
                        .await
                        .map_err(|s| TestCaseError::fail(format!("Partition: {s}")))?
                        .into_inner()
                        .room_ids,
                );
            }
            parts.sort_unstable();
            prop_assert_eq!(
                parts,
                ongoing.iter().copied().collect::<Vec<_>>(),
                "Partition gives each ongoing room to one worker"
            );
            Ok(())
        }
    });
}

/// Every ongoing room, page by page.
async fn list_all(
    query: &mut OngoingQueryServiceClient<livemesh_mesh::MeshChannel>,
) -> Result<BTreeSet<u64>, TestCaseError> {
    let mut rooms = BTreeSet::new();
    let mut page_token = String::new();
    loop {
        let page = query
            .list_ongoing(ListOngoingRequest {
                page_size: 7,
                page_token,
            })
            .await
            .map_err(|s| TestCaseError::fail(format!("ListOngoing: {s}")))?
            .into_inner();
        rooms.extend(page.rooms.iter().map(|room| room.room_id));
        if page.next_page_token.is_empty() {
            return Ok(rooms);
        }
        page_token = page.next_page_token;
    }
}
