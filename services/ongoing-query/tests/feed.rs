//! Change feeds and `Watch`, against SQLite and the harness's MariaDB: the
//! full scan is set to an hour, so only the feed can explain a change that
//! shows up.

// Helpers outside #[test] functions unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use livemesh_mesh::sql::Db;
use livemesh_mesh::{Config, MeshChannel, on_db};
use livemesh_ongoing_query::OngoingQuery;
use livemesh_ongoing_query::RoomsConfig;
use livemesh_ongoing_query::testing::{local_id, room_id};
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::{
    ChangePosition, EndRoomRequest, ListOngoingRequest, RoomChange, RoomChangeKind,
    StartRoomRequest, WatchRequest, WatchResponse,
};
use livemesh_testkit::{SqlBackend, TestServer, until};
use tonic::Streaming;

livemesh_testkit::sql_backend_suite!(
    plain_sql_changes_reach_the_cache_and_watchers_within_a_second,
    a_restarted_service_resumes_from_its_saved_position,
    a_gone_position_heals_through_a_scan,
    a_reconnecting_watcher_gets_exactly_what_it_missed,
    a_watcher_beyond_the_window_gets_a_snapshot,
);

/// Bound for "within milliseconds" in a test on a busy 2-core machine.
const SOON: Duration = Duration::from_secs(1);

fn config(url: &str, consumer: &str) -> Config {
    let mut config = Config {
        database_url: Some(url.to_owned()),
        ..Config::default()
    };
    config.section_mut::<RoomsConfig>().scan_interval_ms = 3_600_000;
    config.section_mut::<RoomsConfig>().feed_consumer = consumer.to_owned();
    config
}

async fn serve(config: &Config) -> (OngoingQuery, TestServer) {
    let service = OngoingQuery::from_config(config).await.expect("open");
    let server = TestServer::start(service.clone()).await;
    (service, server)
}

fn query(server: &TestServer) -> OngoingQueryServiceClient<MeshChannel> {
    OngoingQueryServiceClient::new(server.channel())
}

/// Starts a room through RoomAdmin.
async fn start(
    admin: &mut RoomAdminServiceClient<MeshChannel>,
    anchor_id: u64,
) -> livemesh_proto::v1::Room {
    admin
        .start_room(StartRoomRequest { anchor_id })
        .await
        .unwrap()
        .into_inner()
        .room
        .unwrap()
}

fn admin(server: &TestServer) -> RoomAdminServiceClient<MeshChannel> {
    RoomAdminServiceClient::new(server.channel())
}

async fn watch(server: &TestServer, from: Option<&str>) -> Streaming<WatchResponse> {
    query(server)
        .watch(WatchRequest {
            from: from.map(|token| ChangePosition {
                token: token.to_owned(),
            }),
        })
        .await
        .expect("watch")
        .into_inner()
}

async fn next(stream: &mut Streaming<WatchResponse>) -> RoomChange {
    tokio::time::timeout(SOON, stream.message())
        .await
        .expect("a change within a second")
        .expect("stream ok")
        .expect("stream open")
        .change
        .expect("change in message")
}

fn kind_and_id(change: &RoomChange) -> (RoomChangeKind, u64) {
    (change.kind(), change.room.as_ref().map_or(0, |r| r.room_id))
}

async fn ongoing(server: &TestServer) -> Vec<u64> {
    query(server)
        .list_ongoing(ListOngoingRequest {
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .rooms
        .iter()
        .map(|r| r.room_id)
        .collect()
}

/// A plain SQL connection of its own, as another application would have.
async fn outsider(url: &str) -> Db {
    livemesh_ongoing_query::testing::RegionStore::open(0, url)
        .await
        .unwrap()
        .db()
        .clone()
}

async fn sql_start(db: &Db, anchor: i64) -> u64 {
    let now = livemesh_mesh::now_ms();
    let id = match db {
        Db::Sqlite(pool) => sqlx::query("INSERT INTO rooms (anchor_id, status, started_at_ms, ended_at_ms, version) VALUES (?, 1, ?, NULL, 1)")
            .bind(anchor).bind(now).execute(pool).await.unwrap().last_insert_rowid(),
        Db::MySql(pool) => sqlx::query("INSERT INTO rooms (anchor_id, status, started_at_ms, ended_at_ms, version) VALUES (?, 1, ?, NULL, 1)")
            .bind(anchor).bind(now).execute(pool).await.unwrap().last_insert_id() as i64,
    };
    room_id(0, id)
}

async fn sql_end(db: &Db, room: u64) {
    let now = livemesh_mesh::now_ms();
    let updated = on_db!(db, pool => {
        sqlx::query("UPDATE rooms SET status = 2, ended_at_ms = ?, version = version + 1 WHERE id = ? AND status = 1")
            .bind(now).bind(local_id(room)).execute(pool).await.unwrap().rows_affected()
    });
    assert_eq!(updated, 1);
}

async fn plain_sql_changes_reach_the_cache_and_watchers_within_a_second(backend: SqlBackend) {
    let _binlog = backend.binlog_lock().await;
    let url = backend.database_url("feed").await;
    let (_service, server) = serve(&config(&url, "feed-a")).await;
    let mut changes = watch(&server, None).await;
    assert_eq!(
        kind_and_id(&next(&mut changes).await),
        (RoomChangeKind::Snapshot, 0)
    );

    let db = outsider(&url).await;
    let room = sql_start(&db, 5).await;
    assert_eq!(
        kind_and_id(&next(&mut changes).await),
        (RoomChangeKind::Started, room)
    );
    assert_eq!(ongoing(&server).await, vec![room], "the cache has it");

    sql_end(&db, room).await;
    let ended = next(&mut changes).await;
    assert_eq!(kind_and_id(&ended), (RoomChangeKind::Ended, room));
    assert_eq!(ended.room.unwrap().version, 2);
    assert!(ongoing(&server).await.is_empty());
}

async fn a_restarted_service_resumes_from_its_saved_position(backend: SqlBackend) {
    let _binlog = backend.binlog_lock().await;
    let url = backend.database_url("resume").await;
    let config = config(&url, "feed-resume");
    let db = outsider(&url).await;
    let (service, server) = serve(&config).await;
    let before = sql_start(&db, 1).await;
    // The position is saved once a change has gone by.
    let store = service.rooms().store(0).unwrap().clone();
    until("the first change", SOON * 5, || {
        service.rooms().cache().get(before).is_some()
    })
    .await;
    let mut saved = None;
    for _ in 0..100 {
        saved = store.load_position("feed-resume").await.unwrap();
        if saved.is_some() {
            break;
        }
        // The saver runs right after the change is applied; give it its turn.
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(saved.is_some(), "a position was saved");
    server.stop().await;
    drop(service);

    // While the service is down, someone else starts one room and ends another.
    let started_while_down = sql_start(&db, 2).await;
    sql_end(&db, before).await;

    let (service, server) = serve(&config).await;
    let stats = service.rooms().stats();
    // The feed replays the two changes from the saved position (the startup
    // scan already had them, so the cache is right either way; the count
    // shows the feed did not skip to the end).
    until("the replay", SOON * 5, || {
        stats.feed_changes.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert_eq!(ongoing(&server).await, vec![started_while_down]);
    assert_eq!(stats.feed_breaks.load(Ordering::Relaxed), 0);
}

async fn a_reconnecting_watcher_gets_exactly_what_it_missed(backend: SqlBackend) {
    let _binlog = backend.binlog_lock().await;
    let url = backend.database_url("rewatch").await;
    let (_service, server) = serve(&config(&url, "feed-rewatch")).await;
    let mut admin = admin(&server);
    let mut changes = watch(&server, None).await;
    next(&mut changes).await; // the snapshot marker of an empty cache

    let first = start(&mut admin, 1).await;
    let seen = next(&mut changes).await;
    assert_eq!(kind_and_id(&seen), (RoomChangeKind::Started, first.room_id));
    let position = seen.position.unwrap().token;
    drop(changes);

    let second = start(&mut admin, 2).await;
    admin
        .end_room(EndRoomRequest {
            room_id: first.room_id,
        })
        .await
        .unwrap();

    let mut changes = watch(&server, Some(&position)).await;
    assert_eq!(
        kind_and_id(&next(&mut changes).await),
        (RoomChangeKind::Started, second.room_id)
    );
    assert_eq!(
        kind_and_id(&next(&mut changes).await),
        (RoomChangeKind::Ended, first.room_id)
    );
    // Then live: the next thing on the stream is the next change, nothing replayed twice.
    let third = start(&mut admin, 3).await;
    assert_eq!(
        kind_and_id(&next(&mut changes).await),
        (RoomChangeKind::Started, third.room_id)
    );

    let err = query(&server)
        .watch(WatchRequest {
            from: Some(ChangePosition {
                token: "garbage".into(),
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
}

async fn a_watcher_beyond_the_window_gets_a_snapshot(backend: SqlBackend) {
    let _binlog = backend.binlog_lock().await;
    let url = backend.database_url("window").await;
    let mut config = config(&url, "feed-window");
    config.section_mut::<RoomsConfig>().watch_window = 3;
    let (_service, server) = serve(&config).await;
    let mut admin = admin(&server);
    let mut changes = watch(&server, None).await;
    next(&mut changes).await;
    let first = start(&mut admin, 1).await;
    let position = next(&mut changes).await.position.unwrap().token;
    drop(changes);

    let mut rooms = vec![first.room_id];
    for anchor in 2..=5 {
        rooms.push(start(&mut admin, anchor).await.room_id);
    }
    admin
        .end_room(EndRoomRequest {
            room_id: first.room_id,
        })
        .await
        .unwrap();
    rooms.remove(0);

    let mut changes = watch(&server, Some(&position)).await;
    assert_eq!(
        kind_and_id(&next(&mut changes).await),
        (RoomChangeKind::Snapshot, 0)
    );
    let mut snapshot = Vec::new();
    for _ in 0..rooms.len() {
        let change = next(&mut changes).await;
        assert_eq!(change.kind(), RoomChangeKind::Started);
        snapshot.push(change.room.unwrap().room_id);
    }
    assert_eq!(snapshot, rooms, "the snapshot is the ongoing set");

    // A position from another process (or before a restart) also gets a snapshot.
    let mut changes = watch(&server, Some("abc.1")).await;
    assert_eq!(
        kind_and_id(&next(&mut changes).await),
        (RoomChangeKind::Snapshot, 0)
    );
}

async fn a_gone_position_heals_through_a_scan(backend: SqlBackend) {
    let _binlog = backend.binlog_lock().await;
    let url = backend.database_url("gone").await;
    let consumer = "feed-gone";
    let db = outsider(&url).await;
    let store = livemesh_ongoing_query::testing::RegionStore::open(0, &url)
        .await
        .unwrap();
    let earlier = sql_start(&db, 1).await;
    match &db {
        // The change table was trimmed past the saved position.
        Db::Sqlite(pool) => {
            sql_start(&db, 2).await;
            sqlx::query("DELETE FROM room_changes")
                .execute(pool)
                .await
                .unwrap();
            store.save_position(consumer, "1").await.unwrap();
        }
        // The saved position's binlog file is purged (a commit follows the
        // position, so a GTID position needs the old file too).
        Db::MySql(_) => {
            let position = livemesh_ongoing_query::testing::current_position(&url)
                .await
                .unwrap();
            store
                .save_position(consumer, &position.to_token())
                .await
                .unwrap();
            sql_start(&db, 2).await;
            livemesh_testkit::purge_binlogs().await;
        }
    }
    let (service, server) = serve(&config(&url, consumer)).await;
    let later = sql_start(&db, 3).await;
    let rooms = service.rooms();
    until("a rescan that heals the feed", SOON * 5, || {
        rooms.stats().feed_breaks.load(Ordering::Relaxed) >= 1 && rooms.cache().get(later).is_some()
    })
    .await;
    let listed = ongoing(&server).await;
    assert!(
        listed.contains(&earlier) && listed.contains(&later),
        "{listed:?}"
    );

    // And the feed runs again after healing.
    let after_heal = sql_start(&db, 4).await;
    until("a change after healing", SOON * 5, || {
        rooms.cache().get(after_heal).is_some()
    })
    .await;
}
