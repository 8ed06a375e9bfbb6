//! Redis killed and restarted under love load: the counter keeps accepting,
//! holds its writes, replays them when Redis is back, loses nothing and
//! counts nothing twice; past its bound it answers UNAVAILABLE.

// Helpers outside #[test] functions unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use livemesh_counter::Counter;
use livemesh_counter::CounterConfig;
use livemesh_counter::testing::LovesDb;
use livemesh_mesh::{Config, MeshChannel};
use livemesh_proto::v1::SendLovesRequest;
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_testkit::{PrivateRedis, TestServer, until};

struct Setup {
    _dir: tempfile::TempDir,
    _rooms: TestServer,
    _server: TestServer,
    counter: Counter,
    loves: CounterServiceClient<MeshChannel>,
    room: u64,
}

async fn setup(redis: &PrivateRedis, max_pending: u64) -> Setup {
    setup_with(redis, max_pending, |_| {}).await
}

async fn setup_with(
    redis: &PrivateRedis,
    max_pending: u64,
    tune: impl FnOnce(&mut Config),
) -> Setup {
    let (dir, mut config, rooms) = livemesh_testkit::config_with_rooms().await;
    let room = livemesh_testkit::start_room(rooms.channel(), 1).await;
    config.redis_url = Some(redis.url());
    config.section_mut::<CounterConfig>().ongoing_query_url = rooms.url();
    config.section_mut::<CounterConfig>().publish_url = rooms.url();
    config.section_mut::<CounterConfig>().flush_tick_ms = 5;
    config.section_mut::<CounterConfig>().max_pending_loves = max_pending;
    tune(&mut config);
    let counter = Counter::from_config(&config).await.unwrap();
    let server = TestServer::start(counter.clone()).await;
    Setup {
        loves: CounterServiceClient::new(server.channel()),
        _dir: dir,
        _rooms: rooms,
        _server: server,
        counter,
        room,
    }
}

impl Setup {
    async fn send(&mut self, viewer_id: u64, batch: u64, n: u64) -> Result<u64, tonic::Status> {
        self.loves
            .send_loves(SendLovesRequest {
                room_id: self.room,
                viewer_id,
                batch_id: format!("b{batch}"),
                taps_ms: (0..n).map(|i| batch * 10 + i * 50).collect(),
            })
            .await
            .map(|r| r.into_inner().accepted)
    }

    /// Waits until nothing waits for Redis any more.
    async fn drained(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.counter.waiting() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "writes still waiting after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// One command to a private Redis.
async fn command<T: ::redis::FromRedisValue>(redis: &PrivateRedis, cmd: &mut ::redis::Cmd) -> T {
    let mut conn = ::redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    cmd.query_async(&mut conn).await.unwrap()
}

/// Makes `replica` replicate `master` and waits until its link is up.
async fn replicate(replica: &PrivateRedis, master: &PrivateRedis) {
    // A master waits 5 s for more replicas before a diskless full sync.
    let _: () = command(
        master,
        ::redis::cmd("CONFIG")
            .arg("SET")
            .arg("repl-diskless-sync-delay")
            .arg(0),
    )
    .await;
    let _: () = command(
        replica,
        ::redis::cmd("REPLICAOF").arg("127.0.0.1").arg(master.port),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let info: String = command(replica, ::redis::cmd("INFO").arg("replication")).await;
        if info.contains("master_link_status:up") {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica on {} never linked: {info}",
            replica.port
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sum of the room's total keys on `redis`.
async fn total_on(redis: &PrivateRedis, room: u64) -> u64 {
    let keys: Vec<String> = command(
        redis,
        ::redis::cmd("KEYS").arg(format!("counter|*|{{room:{room}}}|total:*")),
    )
    .await;
    let mut total = 0;
    for key in keys {
        let value: u64 = command(redis, ::redis::cmd("GET").arg(key)).await;
        total += value;
    }
    total
}

/// With `wait_replicas = 1`, a flush leaves the retry buffer only once the
/// replica has it. The replica is cut off, a batch is applied on the master
/// only; then the master is replaced by the replica's data (what a failover
/// to that replica leaves) and the kept flush is written again: the love
/// that `SendLoves` acknowledged is there, once.
#[tokio::test]
async fn an_acknowledged_love_survives_a_failover_to_a_replica() {
    let master = PrivateRedis::start().await;
    let replica = PrivateRedis::start().await;
    replicate(&replica, &master).await;
    let mut s = setup_with(&master, 1_000_000, |c| {
        c.section_mut::<CounterConfig>().wait_replicas = 1;
        c.section_mut::<CounterConfig>().wait_timeout_ms = 100;
    })
    .await;
    assert_eq!(s.send(1, 1, 5).await.unwrap(), 5);
    s.drained().await;
    assert_eq!(total_on(&replica, s.room).await, 5, "the replica has it");

    // The replica stops replicating: the next batch is applied on the
    // master, but never confirmed, so it stays in the buffer.
    let _: () = command(&replica, ::redis::cmd("REPLICAOF").arg("NO").arg("ONE")).await;
    let failures = |s: &Setup| s.counter.stats().flush_failures.load(Ordering::Relaxed);
    let before = failures(&s);
    assert_eq!(
        s.send(2, 2, 4).await.unwrap(),
        4,
        "accepted, held for retry"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while failures(&s) < before + 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no unconfirmed flush noticed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.counter.waiting(), 4, "kept until replicated");
    assert_eq!(total_on(&master, s.room).await, 9, "applied on the master");
    assert_eq!(total_on(&replica, s.room).await, 5, "not on the replica");

    // Failover: the master's data becomes the replica's (the 4 loves are
    // lost from Redis), and the old master replicates the new one's state.
    replicate(&master, &replica).await;
    let _: () = command(&master, ::redis::cmd("REPLICAOF").arg("NO").arg("ONE")).await;
    replicate(&replica, &master).await;
    s.drained().await;
    assert_eq!(total_on(&master, s.room).await, 9, "the kept flush, once");
    assert_eq!(total_on(&replica, s.room).await, 9);
    assert_eq!(s.counter.hot_store().total(s.room).await.unwrap(), 9);
}

#[tokio::test]
async fn redis_killed_and_restarted_loses_no_love_and_counts_none_twice() {
    let mut redis = PrivateRedis::start().await;
    let mut s = setup(&redis, 1_000_000).await;
    let mut accepted = 0;
    for viewer in 1..=10 {
        accepted += s.send(viewer, 1, 10).await.unwrap();
    }
    s.drained().await;

    redis.kill();
    for viewer in 1..=10 {
        accepted += s
            .send(viewer, 2, 10)
            .await
            .expect("accepted while Redis is down");
    }
    assert!(s.counter.waiting() > 0, "held while Redis is down");
    // Some flushes fail while Redis is gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s.counter.stats().flush_failures.load(Ordering::Relaxed) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no failed flush noticed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    redis.restart().await;
    for viewer in 1..=10 {
        accepted += s.send(viewer, 3, 10).await.unwrap();
    }
    s.drained().await;
    assert_eq!(accepted, 300);
    let store = s.counter.hot_store();
    assert_eq!(
        store.total(s.room).await.unwrap(),
        300,
        "every accepted love, once"
    );
    let top = store.top(s.room, 20).await.unwrap();
    assert_eq!(top.len(), 10);
    assert!(top.iter().all(|(_, loves)| *loves == 30));
}

#[tokio::test]
async fn past_the_bound_the_counter_answers_unavailable() {
    let mut redis = PrivateRedis::start().await;
    let mut s = setup(&redis, 25).await;
    redis.kill();
    assert_eq!(s.send(1, 1, 10).await.unwrap(), 10);
    assert_eq!(s.send(2, 1, 10).await.unwrap(), 10);
    assert_eq!(
        s.send(3, 1, 10).await.unwrap(),
        10,
        "20 waiting is below the bound"
    );
    let err = s.send(4, 1, 10).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("retry later"), "{err:?}");

    redis.restart().await;
    s.drained().await;
    assert_eq!(s.counter.hot_store().total(s.room).await.unwrap(), 30);
    // The UNAVAILABLE answers (and their retries) may have opened this
    // client's circuit breaker to the counter: as told, it retries later.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let accepted = loop {
        match s.send(4, 1, 10).await {
            Ok(accepted) => break accepted,
            Err(err) => {
                assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "not accepting 10 s after Redis came back: {err:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert_eq!(accepted, 10, "accepting again");
}

/// One viewer's client: sends batches of taps that follow the broadcast's
/// video time (4 taps per 200 ms, a human's 20 a second), each batch with
/// its own id, retrying a failed call with the same id until it answers
/// OK, as the idempotency contract asks of clients. Returns the viewer, the
/// loves the OK answers reported accepted, and how many calls failed.
async fn love_client(
    mut loves: CounterServiceClient<MeshChannel>,
    room_id: u64,
    viewer_id: u64,
    room_started: tokio::time::Instant,
    ok_batches: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (u64, u64, u64) {
    let (mut accepted, mut failed) = (0, 0);
    let mut batch = 0_u64;
    while !*stop.borrow() {
        let video_ms = u64::try_from(room_started.elapsed().as_millis()).unwrap();
        let request = SendLovesRequest {
            room_id,
            viewer_id,
            batch_id: format!("v{viewer_id}-b{batch}"),
            // The taps of the last 200 ms of video time (none before 0).
            taps_ms: (0..4)
                .map(|i| (video_ms + i * 50).saturating_sub(200))
                .collect(),
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let reply = loop {
            match loves.send_loves(request.clone()).await {
                Ok(reply) => break reply.into_inner(),
                Err(status) => {
                    assert!(
                        matches!(
                            status.code(),
                            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                        ),
                        "viewer {viewer_id} batch {batch}: only 'retry later' may fail a batch: {status:?}"
                    );
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "viewer {viewer_id} batch {batch} still failing after 30 s: {status:?}"
                    );
                    failed += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        accepted += reply.accepted;
        ok_batches.fetch_add(1, Ordering::Relaxed);
        batch += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    (viewer_id, accepted, failed)
}

/// How long the chaos test awaits each condition.
const WAIT: Duration = Duration::from_secs(20);

/// Chaos: Redis killed (SIGKILL) and restarted twice while 16 viewers tap.
/// The counter holds what it accepted while Redis is down, answers
/// UNAVAILABLE past its bound (clients retry the same batch ids), replays
/// its held writes when Redis is back, and at the room's end writes to SQL
/// exactly the loves its OK answers accepted, per viewer: nothing lost,
/// nothing counted twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_redis_killed_twice_under_love_load_loses_and_doubles_nothing() {
    const VIEWERS: u64 = 16;
    let mut redis = PrivateRedis::start().await;
    let (dir, mut config, rooms) = livemesh_testkit::config_with_rooms().await;
    let room = livemesh_testkit::start_room(rooms.channel(), 1).await;
    let room_started = tokio::time::Instant::now();
    config.redis_url = Some(redis.url());
    config.section_mut::<CounterConfig>().ongoing_query_url = rooms.url();
    config.section_mut::<CounterConfig>().publish_url = rooms.url();
    config.section_mut::<CounterConfig>().flush_tick_ms = 5;
    config.section_mut::<CounterConfig>().end_grace_ms = 50;
    // About a second of this load: each outage fills it, so the refusals
    // (and the clients' retries of the same ids) are exercised too.
    config.section_mut::<CounterConfig>().max_pending_loves = 250;
    let counter = Counter::from_config(&config).await.unwrap();
    let server = TestServer::start(counter.clone()).await;
    let stats = || counter.stats();

    let ok_batches = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut clients = tokio::task::JoinSet::new();
    for viewer in 1..=VIEWERS {
        clients.spawn(love_client(
            CounterServiceClient::new(server.channel()),
            room,
            viewer,
            room_started,
            ok_batches.clone(),
            stopped.clone(),
        ));
    }
    let batches = || ok_batches.load(Ordering::Relaxed);
    for outage in 1..=2 {
        let before = batches();
        until("batches answered before the outage", WAIT, || {
            batches() >= before + 2 * VIEWERS
        })
        .await;
        let refused = stats().refused_unavailable.load(Ordering::Relaxed);
        let flush_failures = stats().flush_failures.load(Ordering::Relaxed);
        redis.kill();
        let down = batches();
        // While Redis is down: batches are still accepted (held), flushes
        // fail and are kept, and once the bound is reached the counter
        // refuses with UNAVAILABLE.
        until("batches accepted while Redis is down", WAIT, || {
            batches() >= down + VIEWERS
        })
        .await;
        until("failed flushes while Redis is down", WAIT, || {
            stats().flush_failures.load(Ordering::Relaxed) > flush_failures
        })
        .await;
        until("UNAVAILABLE past the bound", WAIT, || {
            stats().refused_unavailable.load(Ordering::Relaxed) > refused
        })
        .await;
        println!(
            "outage {outage}: {} loves held, {} batches answered while down",
            counter.waiting(),
            batches() - down
        );
        redis.restart().await;
        let flushes = stats().flushes.load(Ordering::Relaxed);
        until("the held loves replayed to Redis", WAIT, || {
            stats().flushes.load(Ordering::Relaxed) > flushes && counter.waiting() < 50
        })
        .await;
    }
    let before = batches();
    until("batches answered after the last restart", WAIT, || {
        batches() >= before + 2 * VIEWERS
    })
    .await;
    stop.send_replace(true);
    let mut per_viewer = std::collections::BTreeMap::new();
    let mut failed_calls = 0;
    while let Some(done) = clients.join_next().await {
        let (viewer, accepted, failed) = done.unwrap();
        per_viewer.insert(viewer, accepted);
        failed_calls += failed;
    }
    let accepted: u64 = per_viewer.values().sum();
    // The refusals past the bound were awaited above; the clients may not
    // have seen them all (the client stack retries UNAVAILABLE itself, with
    // the same request and so the same batch id).
    assert!(accepted > 0);
    let mut ranking: Vec<(u64, u64)> = per_viewer
        .iter()
        .map(|(viewer, loves)| (*viewer, *loves))
        .filter(|(_, loves)| *loves > 0)
        .collect();
    ranking.sort_unstable();

    // Once the counter holds nothing more, the restarted Redis has every
    // accepted love once, per viewer.
    until("every held love written to Redis", WAIT, || {
        counter.waiting() == 0
    })
    .await;
    let store = counter.hot_store();
    assert_eq!(
        store.total(room).await.unwrap(),
        accepted,
        "Redis: every accepted love, once"
    );
    let mut in_redis = store.top(room, 100).await.unwrap();
    in_redis.sort_unstable();
    assert_eq!(
        in_redis, ranking,
        "Redis: each viewer's accepted loves, once"
    );

    // The room ends: the counter flushes what it holds, writes the final
    // total and ranking to SQL once, and deletes the hot keys.
    livemesh_testkit::end_room(rooms.channel(), room).await;
    let db = LovesDb::open(&livemesh_mesh::config::sqlite_url(
        &dir.path().join("counter.db"),
    ))
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let fin = loop {
        if let Some(fin) = db.get(room).await.unwrap() {
            break fin;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no final total in SQL 20 s after the room ended"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    println!(
        "{accepted} loves accepted in {} batches ({failed_calls} failed calls retried, {} duplicate batches answered from memory, {} refused past the bound, {} failed flushes)",
        batches(),
        stats().duplicate_batches.load(Ordering::Relaxed),
        stats().refused_unavailable.load(Ordering::Relaxed),
        stats().flush_failures.load(Ordering::Relaxed),
    );
    assert_eq!(fin.total, accepted, "every accepted love, once");
    let mut stored = fin.top_lovers.clone();
    stored.sort_unstable();
    assert_eq!(stored, ranking, "each viewer's accepted loves, once");
    assert_eq!(counter.waiting(), 0);
}
