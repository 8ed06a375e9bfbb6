//! The binlog tail against the harness's MariaDB (binlog on: ROW, FULL image,
//! FULL metadata, server id 1).
//!
//! Every test here takes one server-wide named lock for its whole run: the
//! purge test deletes binlog files, which must not happen while another test
//! holds a position in them (nextest runs tests as separate processes, so an
//! in-process lock would not do).

// Helpers outside #[test] functions unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use livemesh_ongoing_query::testing::RegionStore;
use livemesh_ongoing_query::testing::{
    BinlogPosition, RoomRow, TailError, TailEvent, current_position, spawn_tail,
};
use sqlx::{MySqlPool, Row as _};
use tokio::sync::mpsc::Receiver;

/// How long one expected event may take to arrive.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
type Events = Receiver<Result<TailEvent, TailError>>;

/// Holds the harness-wide binlog lock for a test's whole run.
async fn exclusive() -> livemesh_testkit::BinlogLock {
    livemesh_testkit::binlog_lock().await
}

/// A replica id no other tail of this run uses (processes differ by pid).
fn server_id() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    1000 + (std::process::id() % 100_000) * 16 + NEXT.fetch_add(1, Ordering::Relaxed) % 16
}

/// A fresh database with the rooms table, and a pool on it.
struct TestDb {
    url: String,
    name: String,
    pool: MySqlPool,
}

impl TestDb {
    async fn new() -> Self {
        let url = livemesh_testkit::fresh_mysql_database("binlog").await;
        RegionStore::open(0, &url).await.expect("migrate rooms");
        let name = url.rsplit('/').next().unwrap().to_owned();
        let pool = MySqlPool::connect(&url).await.expect("pool");
        Self { url, name, pool }
    }

    async fn insert(&self, anchor_id: i64, started_at_ms: i64) -> RoomRow {
        let id = sqlx::query(
            "INSERT INTO rooms (anchor_id, status, started_at_ms, ended_at_ms, version) \
             VALUES (?, 1, ?, NULL, 1)",
        )
        .bind(anchor_id)
        .bind(started_at_ms)
        .execute(&self.pool)
        .await
        .expect("insert a room")
        .last_insert_id();
        RoomRow {
            id: i64::try_from(id).unwrap(),
            anchor_id,
            status: 1,
            started_at_ms,
            ended_at_ms: None,
            version: 1,
        }
    }

    async fn end(&self, room: RoomRow, ended_at_ms: i64) -> RoomRow {
        let done = sqlx::query(
            "UPDATE rooms SET status = 2, ended_at_ms = ?, version = version + 1 \
             WHERE id = ? AND status = 1",
        )
        .bind(ended_at_ms)
        .bind(room.id)
        .execute(&self.pool)
        .await
        .expect("end a room");
        assert_eq!(done.rows_affected(), 1);
        RoomRow {
            status: 2,
            ended_at_ms: Some(ended_at_ms),
            version: room.version + 1,
            ..room
        }
    }

    async fn delete(&self, room: RoomRow) {
        sqlx::query("DELETE FROM rooms WHERE id = ?")
            .bind(room.id)
            .execute(&self.pool)
            .await
            .expect("delete a room");
    }
}

/// Which kind of position a test starts its tails from.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Gtid,
    File,
}

/// The current end of the binlog as `kind`: `current_position` for GTID
/// (the harness's server has GTIDs once any database exists), `SHOW MASTER
/// STATUS` for file+pos.
async fn start_position(db: &TestDb, kind: Kind) -> BinlogPosition {
    match kind {
        Kind::Gtid => {
            let position = current_position(&db.url).await.expect("current position");
            assert!(
                matches!(position, BinlogPosition::Gtid(_)),
                "MariaDB with GTIDs in its binlog gave {position:?}"
            );
            position
        }
        Kind::File => {
            let row = sqlx::raw_sql("SHOW MASTER STATUS")
                .fetch_one(&db.pool)
                .await
                .expect("SHOW MASTER STATUS");
            BinlogPosition::File {
                name: row.try_get(0).expect("File"),
                pos: row.try_get(1).expect("Position"),
            }
        }
    }
}

/// Generates `gtid::case` and `file::case` for every case.
macro_rules! both_kinds {
    ($($case:ident),* $(,)?) => {
        mod gtid {
            $(#[tokio::test] async fn $case() { super::$case(super::Kind::Gtid).await })*
        }
        mod file {
            $(#[tokio::test] async fn $case() { super::$case(super::Kind::File).await })*
        }
    };
}

both_kinds!(
    a_tail_carries_the_committed_rows_of_rooms_in_order,
    a_tail_resumes_after_the_saved_position,
    a_tail_resumes_after_a_progress_position,
    a_purged_position_is_reported_gone,
    a_tail_follows_the_binlog_into_the_next_file,
);

/// The next `Committed` (skipping `Progress`), or a panic naming what came instead.
async fn next_committed(rx: &mut Events) -> (Vec<RoomRow>, Vec<i64>, BinlogPosition) {
    loop {
        let item = tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
            .await
            .expect("no Committed event in time")
            .expect("the tail ended");
        match item {
            Ok(TailEvent::Committed {
                rows,
                deleted,
                position,
                ..
            }) => return (rows, deleted, position),
            Ok(TailEvent::Progress { .. }) => {}
            Err(e) => panic!("the tail failed: {e}"),
        }
    }
}

async fn a_tail_carries_the_committed_rows_of_rooms_in_order(kind: Kind) {
    let _lock = exclusive().await;
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE other (id BIGINT PRIMARY KEY, v BIGINT NOT NULL)")
        .execute(&db.pool)
        .await
        .unwrap();
    // Another database's rooms table: same table name, not ours.
    let elsewhere = TestDb::new().await;
    let doomed = db.insert(7, 1_000).await;

    let from = start_position(&db, kind).await;
    let mut rx = spawn_tail(&db.url, &db.name, from.clone(), server_id());

    let started = db.insert(42, 2_000).await;
    let ended = db.end(started, 3_000).await;
    db.delete(doomed).await;
    sqlx::query("INSERT INTO other (id, v) VALUES (1, 1)")
        .execute(&db.pool)
        .await
        .unwrap();
    elsewhere.insert(99, 4_000).await;
    // A last write to rooms: what comes before it is all there is.
    let last = db.insert(43, 5_000).await;

    let (rows, deleted, p1) = next_committed(&mut rx).await;
    assert_eq!((rows, deleted), (vec![started], vec![]));
    let (rows, deleted, p2) = next_committed(&mut rx).await;
    assert_eq!((rows, deleted), (vec![ended], vec![]));
    let (rows, deleted, p3) = next_committed(&mut rx).await;
    assert_eq!((rows, deleted), (vec![], vec![doomed.id]));
    let (rows, deleted, p4) = next_committed(&mut rx).await;
    assert_eq!((rows, deleted), (vec![last], vec![]));

    let positions = [from, p1, p2, p3, p4];
    for pair in positions.windows(2) {
        assert_ne!(pair[0], pair[1], "every commit moves the position");
        assert_eq!(
            std::mem::discriminant(&pair[0]),
            std::mem::discriminant(&pair[1]),
            "a tail keeps the kind of position it started from"
        );
    }
}

async fn a_tail_resumes_after_the_saved_position(kind: Kind) {
    let _lock = exclusive().await;
    let db = TestDb::new().await;
    let from = start_position(&db, kind).await;
    let mut rx = spawn_tail(&db.url, &db.name, from, server_id());
    let first = db.insert(1, 1_000).await;
    let (rows, _, saved) = next_committed(&mut rx).await;
    assert_eq!(rows, vec![first]);
    drop(rx);

    let second = db.insert(2, 2_000).await;
    let first_ended = db.end(first, 3_000).await;

    // Resume as a restarted service would: from the stored token.
    let saved = BinlogPosition::from_token(&saved.to_token()).expect("token");
    let mut rx = spawn_tail(&db.url, &db.name, saved, server_id());
    let (rows, deleted, _) = next_committed(&mut rx).await;
    assert_eq!((rows, deleted), (vec![second], vec![]));
    let (rows, deleted, _) = next_committed(&mut rx).await;
    assert_eq!((rows, deleted), (vec![first_ended], vec![]));
}

async fn a_tail_resumes_after_a_progress_position(kind: Kind) {
    let _lock = exclusive().await;
    let db = TestDb::new().await;
    sqlx::query("CREATE TABLE other (id BIGINT PRIMARY KEY)")
        .execute(&db.pool)
        .await
        .unwrap();
    let from = start_position(&db, kind).await;
    let mut rx = spawn_tail(&db.url, &db.name, from.clone(), server_id());
    sqlx::query("INSERT INTO other (id) VALUES (1)")
        .execute(&db.pool)
        .await
        .unwrap();
    // Progress comes at most once a second, so it may take a heartbeat or two;
    // nothing else may come before it.
    let item = tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
        .await
        .expect("no Progress in time")
        .expect("the tail ended");
    let Ok(TailEvent::Progress { position: progress }) = item else {
        panic!("expected Progress, got {item:?}");
    };
    assert_ne!(progress, from);
    drop(rx);

    let room = db.insert(5, 5_000).await;
    let mut rx = spawn_tail(&db.url, &db.name, progress, server_id());
    let (rows, deleted, _) = next_committed(&mut rx).await;
    assert_eq!((rows, deleted), (vec![room], vec![]));
}

async fn a_tail_follows_the_binlog_into_the_next_file(kind: Kind) {
    let _lock = exclusive().await;
    let db = TestDb::new().await;
    let from = start_position(&db, kind).await;
    let mut rx = spawn_tail(&db.url, &db.name, from, server_id());
    let before = db.insert(1, 1_000).await;
    let (rows, _, p1) = next_committed(&mut rx).await;
    assert_eq!(rows, vec![before]);
    sqlx::raw_sql("FLUSH BINARY LOGS")
        .execute(&db.pool)
        .await
        .unwrap();
    let after = db.insert(2, 2_000).await;
    let (rows, _, p2) = next_committed(&mut rx).await;
    assert_eq!(rows, vec![after]);
    if let (BinlogPosition::File { name: n1, .. }, BinlogPosition::File { name: n2, .. }) =
        (&p1, &p2)
    {
        assert_ne!(n1, n2, "the second commit is in the next file");
    }
    drop(rx);

    // Resuming from before the rotation crosses it again.
    let mut rx = spawn_tail(&db.url, &db.name, p1, server_id());
    let (rows, _, resumed) = next_committed(&mut rx).await;
    assert_eq!((rows, resumed), (vec![after], p2));
}

/// Heartbeats keep an idle tail alive past its read timeout (3 s).
#[tokio::test]
async fn an_idle_tail_stays_up() {
    let _lock = exclusive().await;
    let db = TestDb::new().await;
    let from = current_position(&db.url).await.expect("current position");
    let mut rx = spawn_tail(&db.url, &db.name, from, server_id());
    // Idle for longer than the read timeout: only Progress (from other
    // databases' writes) may come, no error.
    let idle_until = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(item) = tokio::time::timeout_at(idle_until, rx.recv()).await {
        match item.expect("the tail ended") {
            Ok(TailEvent::Progress { .. }) => {}
            other => panic!("an idle tail gave {other:?}"),
        }
    }
    let room = db.insert(3, 3_000).await;
    let (rows, _, _) = next_committed(&mut rx).await;
    assert_eq!(rows, vec![room]);
}

/// Dropping the receiver ends the replica session: the server stops listing it.
#[tokio::test]
async fn dropping_the_receiver_stops_the_tail() {
    let _lock = exclusive().await;
    let db = TestDb::new().await;
    let id = server_id();
    let from = current_position(&db.url).await.expect("current position");
    let rx = spawn_tail(&db.url, &db.name, from, id);
    let registered = || async {
        sqlx::raw_sql("SHOW SLAVE HOSTS")
            .fetch_all(&db.pool)
            .await
            .expect("SHOW SLAVE HOSTS")
            .iter()
            .any(|row| row.try_get::<u32, _>(0).ok() == Some(id))
    };
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while !registered().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica {id} never registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(rx);
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    while registered().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica {id} still registered"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn current_file(pool: &MySqlPool) -> String {
    let row = sqlx::raw_sql("SHOW MASTER STATUS")
        .fetch_one(pool)
        .await
        .expect("SHOW MASTER STATUS");
    row.try_get::<String, _>(0).expect("File")
}

async fn a_purged_position_is_reported_gone(kind: Kind) {
    let _lock = exclusive().await;
    let db = TestDb::new().await;
    let old_file = current_file(&db.pool).await;
    let from = start_position(&db, kind).await;
    // Something after the position, so that a GTID position needs the old
    // file as much as a file position does.
    db.insert(1, 1_000).await;

    let purged = livemesh_testkit::purge_binlogs().await;
    assert!(purged.contains(&old_file), "{purged:?}");

    let mut rx = spawn_tail(&db.url, &db.name, from.clone(), server_id());
    let item = tokio::time::timeout(EVENT_TIMEOUT, rx.recv())
        .await
        .expect("no answer in time")
        .expect("the tail ended without an error");
    match item {
        Err(TailError::PositionGone(_)) => {}
        other => panic!("expected PositionGone from {from:?}, got {other:?}"),
    }
}
