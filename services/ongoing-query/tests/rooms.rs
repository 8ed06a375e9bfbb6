//! The room slice, end to end through gRPC, against SQLite and against the
//! harness's MariaDB: every case below runs on both backends.

// Helpers outside #[test] functions unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use livemesh_mesh::{Config, MeshChannel, on_db};
use livemesh_ongoing_query::OngoingQuery;
use livemesh_ongoing_query::RegionConfig;
use livemesh_ongoing_query::RoomsConfig;
use livemesh_ongoing_query::testing::{REGION_SHIFT, region_of};
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::{
    EndRoomRequest, GetRoomRequest, ListOngoingRequest, PartitionRequest, Room, RoomStatus,
    StartRoomRequest,
};
use livemesh_testkit::{SqlBackend, TestServer};
use tonic::Code;

livemesh_testkit::sql_backend_suite!(
    start_get_list_end,
    bad_input_gets_precise_codes,
    pages_cover_every_ongoing_room_once,
    partitions_split_ongoing_rooms_exactly_once,
    get_room_reads_through_on_a_miss,
    full_scan_heals_changes_made_behind_the_cache,
    rooms_survive_a_restart,
    room_ids_route_to_the_anchor_region,
    concurrent_ends_end_a_room_once,
);

fn config(url: &str) -> Config {
    Config {
        database_url: Some(url.to_owned()),
        ..Config::default()
    }
}

struct Clients {
    query: OngoingQueryServiceClient<MeshChannel>,
    admin: RoomAdminServiceClient<MeshChannel>,
}

impl Clients {
    fn new(server: &TestServer) -> Self {
        Self {
            query: OngoingQueryServiceClient::new(server.channel()),
            admin: RoomAdminServiceClient::new(server.channel()),
        }
    }

    async fn start(&mut self, anchor_id: u64) -> Room {
        self.admin
            .start_room(StartRoomRequest { anchor_id })
            .await
            .expect("start room")
            .into_inner()
            .room
            .expect("room in reply")
    }

    async fn end(&mut self, room_id: u64) -> Result<Room, tonic::Status> {
        self.admin
            .end_room(EndRoomRequest { room_id })
            .await
            .map(|r| r.into_inner().room.expect("room in reply"))
    }

    async fn get(&mut self, room_id: u64) -> Result<Room, tonic::Status> {
        self.query
            .get_room(GetRoomRequest { room_id })
            .await
            .map(|r| r.into_inner().room.expect("room in reply"))
    }

    /// Every ongoing room id, following page tokens.
    async fn list_all(&mut self, page_size: u32) -> Vec<u64> {
        let mut ids = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .query
                .list_ongoing(ListOngoingRequest {
                    page_size,
                    page_token,
                })
                .await
                .expect("list ongoing")
                .into_inner();
            assert!(page.rooms.len() <= page_size.max(1) as usize || page_size == 0);
            ids.extend(page.rooms.iter().map(|r| r.room_id));
            if page.next_page_token.is_empty() {
                return ids;
            }
            page_token = page.next_page_token;
        }
    }
}

async fn serve(url: &str) -> (OngoingQuery, TestServer, Clients) {
    let service = OngoingQuery::from_config(&config(url))
        .await
        .expect("open ongoing-query");
    let server = TestServer::start(service.clone()).await;
    let clients = Clients::new(&server);
    (service, server, clients)
}

async fn start_get_list_end(backend: SqlBackend) {
    let url = backend.database_url("rooms").await;
    let (_service, _server, mut c) = serve(&url).await;

    let room = c.start(7).await;
    assert_eq!(room.anchor_id, 7);
    assert_eq!(room.status(), RoomStatus::Ongoing);
    assert!(room.started_at.is_some());
    assert!(room.ended_at.is_none());
    assert_eq!(region_of(room.room_id), Some(0));

    assert_eq!(
        c.get(room.room_id).await.unwrap(),
        room,
        "found right after start"
    );
    assert_eq!(c.list_all(100).await, vec![room.room_id]);

    let ended = c.end(room.room_id).await.unwrap();
    assert_eq!(ended.status(), RoomStatus::Ended);
    assert_eq!(ended.started_at, room.started_at);
    let (started, finished) = (ended.started_at.unwrap(), ended.ended_at.unwrap());
    assert!((finished.seconds, finished.nanos) >= (started.seconds, started.nanos));
    assert!(ended.version > room.version);

    assert_eq!(c.get(room.room_id).await.unwrap(), ended);
    assert!(c.list_all(100).await.is_empty());
}

async fn bad_input_gets_precise_codes(backend: SqlBackend) {
    let url = backend.database_url("bad").await;
    let (_service, _server, mut c) = serve(&url).await;

    let err = c
        .admin
        .start_room(StartRoomRequest { anchor_id: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("anchor_id"), "{err:?}");

    let unconfigured_anchor = (5 << REGION_SHIFT) | 1;
    let err = c
        .admin
        .start_room(StartRoomRequest {
            anchor_id: unconfigured_anchor,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("region 5"), "{err:?}");

    let err = c.get(987_654).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(err.message().contains("987654"), "{err:?}");
    let err = c.end(987_654).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = c.get((5 << REGION_SHIFT) | 1).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = c.get(0).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    let room = c.start(11).await;
    c.end(room.room_id).await.unwrap();
    let err = c.end(room.room_id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(err.message().contains("already ended"), "{err:?}");

    let err = c
        .query
        .list_ongoing(ListOngoingRequest {
            page_size: 10,
            page_token: "not-a-token".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("next_page_token"), "{err:?}");

    for (index, total) in [(3, 3), (0, 0)] {
        let err = c
            .query
            .partition(PartitionRequest { index, total })
            .await
            .unwrap_err();
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{index}/{total}: {err:?}"
        );
    }
}

async fn pages_cover_every_ongoing_room_once(backend: SqlBackend) {
    let url = backend.database_url("pages").await;
    let (_service, _server, mut c) = serve(&url).await;
    let mut started = Vec::new();
    for anchor in 1..=25 {
        started.push(c.start(anchor).await.room_id);
    }
    let ended = started.remove(3);
    c.end(ended).await.unwrap();

    let listed = c.list_all(10).await;
    assert_eq!(
        listed, started,
        "ascending, complete, without the ended room"
    );
    assert_eq!(
        c.list_all(0).await,
        started,
        "page size 0 means the default"
    );
}

async fn partitions_split_ongoing_rooms_exactly_once(backend: SqlBackend) {
    let url = backend.database_url("parts").await;
    let (_service, _server, mut c) = serve(&url).await;
    let mut ongoing = BTreeSet::new();
    for anchor in 1..=30 {
        ongoing.insert(c.start(anchor).await.room_id);
    }
    let gone = *ongoing.iter().next().unwrap();
    c.end(gone).await.unwrap();
    ongoing.remove(&gone);

    let mut union = BTreeSet::new();
    let mut owned = 0;
    for index in 0..3 {
        let part = c
            .query
            .partition(PartitionRequest { index, total: 3 })
            .await
            .unwrap()
            .into_inner()
            .room_ids;
        owned += part.len();
        union.extend(part);
    }
    assert_eq!(owned, ongoing.len(), "no room is owned twice");
    assert_eq!(union, ongoing, "every ongoing room is owned");

    // Partitions are reused while the ongoing set stands still; a change
    // must show in the very next answers.
    let newcomer = c.start(99).await.room_id;
    let mut union = BTreeSet::new();
    for index in 0..3 {
        union.extend(
            c.query
                .partition(PartitionRequest { index, total: 3 })
                .await
                .unwrap()
                .into_inner()
                .room_ids,
        );
    }
    assert!(union.contains(&newcomer));
    assert_eq!(union.len(), ongoing.len() + 1);
}

async fn get_room_reads_through_on_a_miss(backend: SqlBackend) {
    let url = backend.database_url("through").await;
    let (_a, _server_a, mut writer) = serve(&url).await;
    // A second replica over the same table: its cache was filled before the
    // room existed and no scan has run since.
    let (_b, _server_b, mut reader) = serve(&url).await;
    let room = writer.start(42).await;
    assert_eq!(reader.get(room.room_id).await.unwrap(), room);
}

async fn full_scan_heals_changes_made_behind_the_cache(backend: SqlBackend) {
    let url = backend.database_url("scan").await;
    let (_a, _server_a, mut writer) = serve(&url).await;
    // The reader follows no change feed: only its scans can tell it anything.
    let mut no_feed = config(&url);
    no_feed.section_mut::<RoomsConfig>().feed = false;
    let b = OngoingQuery::from_config(&no_feed).await.unwrap();
    let _server_b = TestServer::start(b.clone()).await;
    let mut reader = Clients::new(&_server_b);

    let room = writer.start(5).await;
    assert!(reader.list_all(100).await.is_empty(), "no scan yet");
    b.rooms().scan_all().await.unwrap();
    assert_eq!(reader.list_all(100).await, vec![room.room_id]);

    writer.end(room.room_id).await.unwrap();
    assert_eq!(
        reader.list_all(100).await,
        vec![room.room_id],
        "stale until a scan"
    );
    b.rooms().scan_all().await.unwrap();
    assert!(reader.list_all(100).await.is_empty());
    assert_eq!(
        reader.get(room.room_id).await.unwrap().status(),
        RoomStatus::Ended
    );
    let drift = b
        .rooms()
        .stats()
        .drift_repaired
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(drift, 2, "one start and one end were repaired");

    // A scan with nothing to repair repairs nothing.
    b.rooms().scan_all().await.unwrap();
    let again = b
        .rooms()
        .stats()
        .drift_repaired
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(again, 2);
}

async fn rooms_survive_a_restart(backend: SqlBackend) {
    let url = backend.database_url("restart").await;
    let (service, server, mut c) = serve(&url).await;
    let kept = c.start(1).await;
    let ended = c.start(2).await;
    c.end(ended.room_id).await.unwrap();
    server.stop().await;
    drop(service);

    let (_service, _server, mut c) = serve(&url).await;
    assert_eq!(c.list_all(100).await, vec![kept.room_id]);
    assert_eq!(c.get(kept.room_id).await.unwrap(), kept);
    assert_eq!(
        c.get(ended.room_id).await.unwrap().status(),
        RoomStatus::Ended
    );
    let next = c.start(3).await;
    assert!(next.room_id > ended.room_id, "ids are never reused");
}

async fn room_ids_route_to_the_anchor_region(backend: SqlBackend) {
    let local = backend.database_url("region0").await;
    let remote = backend.database_url("region1").await;
    let mut config = config(&local);
    config
        .section_mut::<RoomsConfig>()
        .regions
        .push(RegionConfig {
            id: 1,
            database_url: remote,
        });
    let service = OngoingQuery::from_config(&config).await.unwrap();
    let server = TestServer::start(service.clone()).await;
    let mut c = Clients::new(&server);

    let anchor_in_region_1 = (1 << REGION_SHIFT) | 77;
    let far = c.start(anchor_in_region_1).await;
    let near = c.start(77).await;
    assert_eq!(region_of(far.room_id), Some(1));
    assert_eq!(region_of(near.room_id), Some(0));

    // Each row sits in its own region's table and nowhere else.
    for (region, expected_anchor) in [(0, 77_i64), (1, anchor_in_region_1 as i64)] {
        let db = service.rooms().store(region).unwrap().db();
        let anchors: Vec<(i64,)> = on_db!(db, pool => {
            sqlx::query_as("SELECT anchor_id FROM rooms").fetch_all(pool).await.unwrap()
        });
        assert_eq!(anchors, vec![(expected_anchor,)], "region {region}");
    }
    assert_eq!(c.get(far.room_id).await.unwrap(), far);
    assert_eq!(
        c.end(far.room_id).await.unwrap().status(),
        RoomStatus::Ended
    );
    assert_eq!(c.list_all(10).await, vec![near.room_id]);
}

async fn concurrent_ends_end_a_room_once(backend: SqlBackend) {
    let url = backend.database_url("race").await;
    let (_service, server, mut c) = serve(&url).await;
    let room = c.start(9).await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let mut admin = RoomAdminServiceClient::new(server.channel());
        calls.spawn(async move {
            admin
                .end_room(EndRoomRequest {
                    room_id: room.room_id,
                })
                .await
                .map(|r| r.into_inner().room.unwrap())
        });
    }
    let mut ok = Vec::new();
    let mut refused = 0;
    while let Some(result) = calls.join_next().await {
        match result.unwrap() {
            Ok(room) => ok.push(room),
            Err(status) => {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(ok.len(), 1, "exactly one end succeeds");
    assert_eq!(refused, 7);
    assert_eq!(ok[0].version, room.version + 1, "ended once, not twice");
}
