//! The counter end to end through gRPC, against each hot store: in process,
//! the harness's Redis, and its Redis Cluster. Rooms come from a real
//! ongoing-query server.

// Helpers outside #[test] functions unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use livemesh_counter::Counter;
use livemesh_counter::CounterConfig;
use livemesh_counter::testing::{BatchFate, LovesDb, Taken};
use livemesh_mesh::{Config, MeshChannel};
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::{
    GetLovesRequest, RejectReason, SendLovesRequest, SendLovesResponse, TopLoversRequest,
};
use livemesh_testkit::{HotBackend, TestServer};

livemesh_testkit::hot_backend_suite!(
    an_honest_batch_counts_and_shows_in_totals_and_ranking,
    an_abusive_batch_is_clamped_and_the_reply_says_so,
    a_retried_batch_counts_once,
    bad_requests_get_precise_codes,
    concurrent_viewers_sum_exactly,
    room_end_writes_sql_once_and_deletes_the_keys,
    an_ended_room_keeps_its_numbers_also_after_a_restart,
    a_batch_retried_after_many_others_counts_once,
    late_loves_after_the_end_count_into_the_final_total,
    taps_beyond_the_rooms_elapsed_time_are_refused,
    top_lovers_and_get_loves_agree_once_send_loves_answered,
);

// Cases with two counter replicas sharing one hot store (Redis only: the
// in-process store belongs to one process).
livemesh_testkit::hot_backend_suite!(
    [redis_replicas: Redis, cluster_replicas: Cluster]
    a_retry_on_another_replica_counts_once,
    one_replica_finalises_and_both_replicas_loves_count,
);

struct Mesh {
    _dir: tempfile::TempDir,
    rooms: TestServer,
    _counter_server: TestServer,
    config: Config,
    counter: Counter,
    loves: CounterServiceClient<MeshChannel>,
    db_url: String,
}

async fn mesh(hot: HotBackend) -> Mesh {
    mesh_with(hot.redis_url(), |_| {}).await
}

async fn mesh_with(redis_url: Option<String>, tune: impl FnOnce(&mut Config)) -> Mesh {
    let (dir, mut config, rooms) = livemesh_testkit::config_with_rooms().await;
    // Final totals go to SQLite, except with standalone Redis, where they go
    // to the harness's MariaDB: both dialects of room_loves are exercised.
    let harness_redis = std::env::var("LIVEMESH_TEST_REDIS_URL").ok();
    let db_url = if redis_url.is_some() && redis_url == harness_redis {
        livemesh_testkit::fresh_mysql_database("counter").await
    } else {
        livemesh_mesh::config::sqlite_url(&dir.path().join("counter.db"))
    };
    config.redis_url = redis_url;
    config.section_mut::<CounterConfig>().ongoing_query_url = rooms.url();
    // No dispatcher in these tests: publishing fails and is counted.
    let counter_section = config.section_mut::<CounterConfig>();
    counter_section.publish_url = rooms.url();
    counter_section.database_url = db_url.clone();
    counter_section.flush_tick_ms = 5;
    counter_section.total_cache_ms = 20;
    counter_section.end_grace_ms = 50;
    // Every test's rooms start at id 1: a key phase of its own keeps them
    // apart on the shared Redis.
    config.section_mut::<CounterConfig>().phase = livemesh_testkit::unique_name("t");
    tune(&mut config);
    let counter = Counter::from_config(&config).await.unwrap();
    let counter_server = TestServer::start(counter.clone()).await;
    Mesh {
        loves: CounterServiceClient::new(counter_server.channel()),
        _dir: dir,
        rooms,
        _counter_server: counter_server,
        config,
        counter,
        db_url,
    }
}

/// Another counter process on the same configuration (same hot store, same
/// SQL): a second replica, or the first one restarted.
struct Replica {
    _server: TestServer,
    counter: Counter,
    loves: CounterServiceClient<MeshChannel>,
}

impl Mesh {
    async fn replica(&self) -> Replica {
        let counter = Counter::from_config(&self.config).await.unwrap();
        let server = TestServer::start(counter.clone()).await;
        Replica {
            loves: CounterServiceClient::new(server.channel()),
            _server: server,
            counter,
        }
    }

    /// Stops this counter and starts it again on the same configuration.
    async fn restart(&mut self) {
        let replica = self.replica().await;
        self.counter = replica.counter;
        self.loves = replica.loves;
        self._counter_server = replica._server;
    }

    async fn final_in_sql(&self, room: u64) -> livemesh_counter::testing::FinalLoves {
        let db = LovesDb::open(&self.db_url).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(fin) = db.get(room).await.unwrap() {
                return fin;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no final total in SQL"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the room's hot keys (total and ranking) are deleted:
    /// the end deletes them after it wrote the SQL row.
    async fn hot_keys_deleted(&self, room: u64) {
        let store = self.counter.hot_store();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while store.total(room).await.unwrap() != 0
            || !store.top(room, 10).await.unwrap().is_empty()
        {
            assert!(tokio::time::Instant::now() < deadline, "hot keys stay");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn loves_and_top(&mut self, room_id: u64, limit: u32) -> (u64, Vec<(u64, u64)>) {
        read_loves_and_top(&mut self.loves, room_id, limit).await
    }
}

async fn read_loves_and_top(
    client: &mut CounterServiceClient<MeshChannel>,
    room_id: u64,
    limit: u32,
) -> (u64, Vec<(u64, u64)>) {
    let total = client
        .get_loves(GetLovesRequest { room_id })
        .await
        .unwrap()
        .into_inner()
        .total;
    let top = client
        .top_lovers(TopLoversRequest { room_id, limit })
        .await
        .unwrap()
        .into_inner()
        .lovers
        .iter()
        .map(|l| (l.viewer_id, l.loves))
        .collect();
    (total, top)
}

async fn send_to(
    client: &mut CounterServiceClient<MeshChannel>,
    room_id: u64,
    viewer_id: u64,
    batch: &str,
    taps: Vec<u64>,
) -> SendLovesResponse {
    client
        .send_loves(SendLovesRequest {
            room_id,
            viewer_id,
            batch_id: batch.to_owned(),
            taps_ms: taps,
        })
        .await
        .unwrap()
        .into_inner()
}

impl Mesh {
    async fn start_room(&mut self) -> u64 {
        livemesh_testkit::start_room(self.rooms.channel(), 1).await
    }

    async fn send(
        &mut self,
        room_id: u64,
        viewer_id: u64,
        batch: &str,
        taps: Vec<u64>,
    ) -> SendLovesResponse {
        send_to(&mut self.loves, room_id, viewer_id, batch, taps).await
    }

    /// Waits until GetLoves reports `expected` (flushes happen every 5 ms).
    async fn await_total(&mut self, room_id: u64, expected: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut head = self
            .counter
            .stats()
            .flushes
            .load(std::sync::atomic::Ordering::Relaxed);
        loop {
            let total = self
                .loves
                .get_loves(GetLovesRequest { room_id })
                .await
                .unwrap()
                .into_inner()
                .total;
            if total == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "total stuck at {total}, expected {expected}"
            );
            // Wait for the next flush rather than a fixed time.
            loop {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(5)).await;
                let now = self
                    .counter
                    .stats()
                    .flushes
                    .load(std::sync::atomic::Ordering::Relaxed);
                if now != head || tokio::time::Instant::now() >= deadline {
                    head = now;
                    break;
                }
            }
        }
    }
}

impl Mesh {
    /// Waits until the hot store has every accepted love.
    async fn flushed(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.counter.waiting() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "loves still waiting after 10 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Taps a human could make: 20 per second of video time (50 ms apart),
/// from `from_ms`; tests send them right after the room started, so they
/// stay within the allowed skew ahead of the broadcast (2 s).
fn human_taps(from_ms: u64, n: u64) -> Vec<u64> {
    (0..n).map(|i| from_ms + i * 50).collect()
}

async fn an_honest_batch_counts_and_shows_in_totals_and_ranking(hot: HotBackend) {
    let mut m = mesh(hot).await;
    let room = m.start_room().await;
    let reply = m.send(room, 7, "b1", human_taps(0, 30)).await;
    assert_eq!((reply.accepted, reply.rejected), (30, 0));
    assert_eq!(reply.reason(), RejectReason::Unspecified);
    assert!(
        reply.room_total >= 30,
        "the sender sees its own loves at once"
    );
    m.send(room, 8, "b1", human_taps(0, 12)).await;
    m.await_total(room, 42).await;
    m.flushed().await;
    let top = m
        .loves
        .top_lovers(TopLoversRequest {
            room_id: room,
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .lovers;
    let top: Vec<(u64, u64)> = top.iter().map(|l| (l.viewer_id, l.loves)).collect();
    assert_eq!(top, vec![(7, 30), (8, 12)]);
}

async fn an_abusive_batch_is_clamped_and_the_reply_says_so(hot: HotBackend) {
    let mut m = mesh(hot).await;
    let room = m.start_room().await;
    // 5,000 taps within one second of video time, in the first second.
    let taps: Vec<u64> = (0..5_000).map(|i| i % 1000).collect();
    let reply = m.send(room, 9, "flood", taps).await;
    assert_eq!(reply.accepted, 20, "a human taps at most 20 times a second");
    assert_eq!(reply.accepted + reply.rejected, 5_000);
    assert_ne!(reply.reason(), RejectReason::Unspecified);
    assert!(reply.detail.contains("not counted"), "{}", reply.detail);
    m.await_total(room, 20).await;
}

async fn a_retried_batch_counts_once(hot: HotBackend) {
    let mut m = mesh(hot).await;
    let room = m.start_room().await;
    let first = m.send(room, 3, "retry-me", human_taps(0, 15)).await;
    assert_eq!((first.accepted, first.rejected), (15, 0));
    let again = m.send(room, 3, "retry-me", human_taps(0, 15)).await;
    assert_eq!((again.accepted, again.rejected), (0, 15));
    assert_eq!(again.reason(), RejectReason::DuplicateBatch);
    assert!(again.detail.contains("counts once"), "{}", again.detail);
    // The same id from another viewer is another batch.
    m.send(room, 4, "retry-me", human_taps(0, 5)).await;
    m.await_total(room, 20).await;
}

async fn bad_requests_get_precise_codes(hot: HotBackend) {
    let mut m = mesh(hot).await;
    let room = m.start_room().await;
    let call = |room_id: u64, viewer_id: u64, batch_id: &str| SendLovesRequest {
        room_id,
        viewer_id,
        batch_id: batch_id.to_owned(),
        taps_ms: vec![1],
    };
    let code = |r: Result<tonic::Response<SendLovesResponse>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(
        code(m.loves.send_loves(call(room, 0, "b")).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(m.loves.send_loves(call(room, 1, "")).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(m.loves.send_loves(call(0, 1, "b")).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(m.loves.send_loves(call(987_654_321, 1, "b")).await),
        tonic::Code::NotFound
    );
    livemesh_testkit::end_room(m.rooms.channel(), room).await;
    let err = m.loves.send_loves(call(room, 1, "late")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let err = m
        .loves
        .get_loves(GetLovesRequest {
            room_id: 987_654_321,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

async fn concurrent_viewers_sum_exactly(hot: HotBackend) {
    let m = mesh(hot).await;
    let mut m = m;
    let room = m.start_room().await;
    let mut calls = tokio::task::JoinSet::new();
    for viewer in 1..=20_u64 {
        let mut loves = m.loves.clone();
        calls.spawn(async move {
            let mut accepted = 0;
            for batch in 0..5_u64 {
                accepted += loves
                    .send_loves(SendLovesRequest {
                        room_id: room,
                        viewer_id: viewer,
                        batch_id: format!("b{batch}"),
                        taps_ms: human_taps(batch * 10, 10),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .accepted;
            }
            accepted
        });
    }
    let mut total = 0;
    while let Some(accepted) = calls.join_next().await {
        total += accepted.unwrap();
    }
    assert_eq!(total, 20 * 5 * 10);
    m.await_total(room, total).await;
}

async fn room_end_writes_sql_once_and_deletes_the_keys(hot: HotBackend) {
    let mut m = mesh(hot).await;
    let room = m.start_room().await;
    m.send(room, 1, "a", human_taps(0, 5)).await;
    m.send(room, 2, "a", human_taps(0, 9)).await;
    m.send(room, 3, "a", human_taps(0, 2)).await;
    livemesh_testkit::end_room(m.rooms.channel(), room).await;

    let fin = m.final_in_sql(room).await;
    assert_eq!(fin.total, 16);
    assert_eq!(fin.top_lovers, vec![(2, 9), (1, 5), (3, 2)]);
    m.hot_keys_deleted(room).await;

    // Running the end again writes nothing new.
    let again = m.counter.finalize(room).await.unwrap();
    assert!(!again);
    let db = LovesDb::open(&m.db_url).await.unwrap();
    assert_eq!(db.get(room).await.unwrap().unwrap().total, 16);
}

async fn an_ended_room_keeps_its_numbers_also_after_a_restart(hot: HotBackend) {
    let mut m = mesh(hot).await;
    let room = m.start_room().await;
    m.send(room, 1, "a", human_taps(0, 5)).await;
    m.send(room, 2, "a", human_taps(0, 9)).await;
    m.send(room, 3, "a", human_taps(0, 2)).await;
    livemesh_testkit::end_room(m.rooms.channel(), room).await;
    m.final_in_sql(room).await;
    // The hot keys are gone once the row is written; wait for that too.
    m.hot_keys_deleted(room).await;
    let ranking = vec![(2, 9), (1, 5), (3, 2)];
    assert_eq!(m.loves_and_top(room, 10).await, (16, ranking.clone()));
    assert_eq!(m.loves_and_top(room, 2).await, (16, ranking[..2].to_vec()));
    m.restart().await;
    assert_eq!(m.loves_and_top(room, 0).await, (16, ranking));
}

async fn a_batch_retried_after_many_others_counts_once(hot: HotBackend) {
    let mut m = mesh_with(hot.redis_url(), |c| {
        // 71 batches of one viewer, far apart in video time, sent at once.
        c.section_mut::<CounterConfig>().future_skew_ms = 10_000_000;
        c.section_mut::<CounterConfig>().burst = 10_000;
    })
    .await;
    let room = m.start_room().await;
    let first = m.send(room, 5, "A", human_taps(0, 5)).await;
    assert_eq!(first.accepted, 5);
    for i in 0..70_u64 {
        let reply = m
            .send(room, 5, &format!("other-{i}"), vec![10_000 + i * 1_000])
            .await;
        assert_eq!(reply.accepted, 1, "{reply:?}");
    }
    let again = m.send(room, 5, "A", human_taps(0, 5)).await;
    assert_eq!((again.accepted, again.rejected), (0, 5), "{again:?}");
    assert_eq!(again.reason(), RejectReason::DuplicateBatch);
    assert_eq!(m.loves_and_top(room, 10).await, (75, vec![(5, 75)]));
}

async fn a_retry_on_another_replica_counts_once(hot: HotBackend) {
    let mut m = mesh(hot).await;
    let mut other = m.replica().await;
    let room = m.start_room().await;
    let first = m.send(room, 6, "A", human_taps(0, 7)).await;
    assert_eq!(first.accepted, 7);
    let retry = send_to(&mut other.loves, room, 6, "A", human_taps(0, 7)).await;
    assert_eq!(
        (retry.accepted, retry.reason()),
        (0, RejectReason::DuplicateBatch),
        "{retry:?}"
    );
    let next = send_to(&mut other.loves, room, 6, "B", human_taps(1_000, 3)).await;
    assert_eq!(next.accepted, 3);
    assert_eq!(
        read_loves_and_top(&mut other.loves, room, 10).await,
        (10, vec![(6, 10)])
    );
    // The first replica sees the other's loves once its cached total
    // (total_cache_ms, 20 ms here) is read again from the store.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while read_loves_and_top(&mut m.loves, room, 10).await != (10, vec![(6, 10)]) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first replica never saw 10"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(other.counter.waiting(), 0);
}

async fn one_replica_finalises_and_both_replicas_loves_count(hot: HotBackend) {
    let mut m = mesh(hot).await;
    let mut other = m.replica().await;
    let room = m.start_room().await;
    m.send(room, 1, "a", human_taps(0, 4)).await;
    send_to(&mut other.loves, room, 2, "a", human_taps(0, 6)).await;
    livemesh_testkit::end_room(m.rooms.channel(), room).await;
    let fin = m.final_in_sql(room).await;
    assert_eq!((fin.total, fin.top_lovers), (10, vec![(2, 6), (1, 4)]));
    // Both replicas counted for the room and saw it end: wait until both
    // are done with it, then exactly one of them finalised it.
    let replicas = [m.counter.clone(), other.counter.clone()];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while replicas.iter().any(|r| r.is_ending(room)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a replica never finished the end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let finalisers: u64 = replicas.iter().map(|r| r.finalised_here()).sum();
    assert_eq!(finalisers, 1);
    assert_eq!(
        read_loves_and_top(&mut other.loves, room, 10).await,
        (10, vec![(2, 6), (1, 4)])
    );
}

async fn late_loves_after_the_end_count_into_the_final_total(hot: HotBackend) {
    let mut m = mesh(hot).await;
    let room = m.start_room().await;
    m.send(room, 1, "a", human_taps(0, 5)).await;
    livemesh_testkit::end_room(m.rooms.channel(), room).await;
    m.final_in_sql(room).await;
    // A replica whose flush was held back (its store was unreachable) takes
    // the loves in after the room was closed: the store refuses them, and
    // they go to the final total in SQL, once.
    let counter = m.counter.clone();
    let now = livemesh_mesh::now_ms();
    let taken = counter
        .take_batch(room, 2, "late", &human_taps(0, 3), 60_000, now)
        .unwrap();
    let Taken::New {
        fate: Some(fate), ..
    } = taken
    else {
        panic!("{taken:?}");
    };
    counter.flush_once().await;
    assert_eq!(fate.await.unwrap(), BatchFate::Counted);
    assert_eq!(counter.waiting(), 0);
    assert_eq!(counter.late_batches(), 1);
    assert_eq!(m.loves_and_top(room, 10).await, (8, vec![(1, 5), (2, 3)]));
    if matches!(hot, HotBackend::Memory) {
        return; // one process: no other replica shares its store
    }
    // The same late batch again (another replica's retry) adds nothing.
    let restarted = m.replica().await;
    let counter = restarted.counter.clone();
    counter
        .take_batch(room, 2, "late", &human_taps(0, 3), 60_000, now)
        .unwrap();
    counter.flush_once().await;
    assert_eq!(counter.waiting(), 0);
    assert_eq!(m.loves_and_top(room, 10).await, (8, vec![(1, 5), (2, 3)]));
}

async fn taps_beyond_the_rooms_elapsed_time_are_refused(hot: HotBackend) {
    let mut m = mesh(hot).await;
    let room = m.start_room().await;
    // The room started just now; the tolerance is future_skew_ms (2 s).
    let reply = m
        .send(room, 1, "a", vec![0, 1_000, 60_000, 3_600_000])
        .await;
    assert_eq!((reply.accepted, reply.rejected), (2, 2), "{reply:?}");
    assert_eq!(reply.reason(), RejectReason::InTheFuture);
    assert!(
        reply.detail.contains("ahead of the broadcast"),
        "{}",
        reply.detail
    );
    assert_eq!(m.loves_and_top(room, 10).await, (2, vec![(1, 2)]));
}

async fn top_lovers_and_get_loves_agree_once_send_loves_answered(hot: HotBackend) {
    let mut m = mesh(hot).await;
    let room = m.start_room().await;
    let mut expected = 0;
    for i in 0..12_u64 {
        let viewer = i % 4 + 1;
        let reply = m
            .send(room, viewer, &format!("b{i}"), human_taps(i * 100, 2))
            .await;
        expected += reply.accepted;
        let (total, top) = m.loves_and_top(room, 10).await;
        assert_eq!(total, expected, "GetLoves after batch {i}");
        assert_eq!(
            top.iter().map(|(_, loves)| loves).sum::<u64>(),
            total,
            "TopLovers {top:?} after batch {i}"
        );
    }
    assert_eq!(expected, 24);
}
