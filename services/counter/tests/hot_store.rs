//! The hot store's one suite, run against each backend: in process, the
//! harness's standalone Redis, and its Redis Cluster. Every case uses room ids
//! of its own, so cases share the Redis servers without meeting.

// Helpers outside #[test] functions unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use ::redis::AsyncCommands as _;
use livemesh_counter::testing::hot::{
    Applied, BatchMark, HotConfig, HotError, HotStore, RoomFlush, keys,
};
use livemesh_testkit::HotBackend;

/// A direct connection to the backend's Redis, to look at the keys.
enum Raw {
    Single(::redis::aio::MultiplexedConnection),
    Cluster(::redis::cluster_async::ClusterConnection),
}

/// What a case opens on its backend.
trait Open {
    async fn store(self, config: HotConfig) -> HotStore;
    async fn raw(self) -> Option<Raw>;
}

impl Open for HotBackend {
    async fn store(self, config: HotConfig) -> HotStore {
        match self.redis_url() {
            None => HotStore::memory(config),
            Some(url) => HotStore::connect(&url, config).await.unwrap(),
        }
    }

    async fn raw(self) -> Option<Raw> {
        match self {
            HotBackend::Memory => None,
            HotBackend::Redis => Some(Raw::Single(
                ::redis::Client::open(livemesh_testkit::redis_url())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap(),
            )),
            HotBackend::Cluster => Some(Raw::Cluster(
                ::redis::cluster::ClusterClient::new(livemesh_testkit::redis_cluster_urls())
                    .unwrap()
                    .get_async_connection()
                    .await
                    .unwrap(),
            )),
        }
    }
}

impl Raw {
    async fn query<T: ::redis::FromRedisValue>(&mut self, cmd: &::redis::Cmd) -> T {
        match self {
            Raw::Single(conn) => cmd.query_async(conn).await.unwrap(),
            Raw::Cluster(conn) => cmd.query_async(conn).await.unwrap(),
        }
    }

    /// Every key of the room (KEYS on its tag; on a Cluster the client asks
    /// every master and joins the answers).
    async fn room_keys(&mut self, room: u64) -> Vec<String> {
        let mut keys: Vec<String> = self
            .query(::redis::cmd("KEYS").arg(keys::room_pattern("release", room)))
            .await;
        keys.sort();
        keys
    }

    /// The seconds `key` has left to live.
    async fn ttl(&mut self, key: &str) -> i64 {
        self.query(::redis::cmd("TTL").arg(key)).await
    }

    async fn get(&mut self, key: &str) -> Option<u64> {
        match self {
            Raw::Single(conn) => conn.get(key).await.unwrap(),
            Raw::Cluster(conn) => conn.get(key).await.unwrap(),
        }
    }
}

/// A room id no other case (of this or another test process) uses.
fn unique_room() -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    livemesh_testkit::unique_name("room").hash(&mut hasher);
    // Keep ids positive as i64, as the service's are.
    hasher.finish() >> 1
}

fn flush(room_id: u64, flush_id: &str, total_delta: u64, viewers: &[(u64, u64)]) -> RoomFlush {
    RoomFlush {
        room_id,
        flush_id: flush_id.to_owned(),
        total_delta,
        viewers: viewers.to_vec(),
        batches: vec![],
    }
}

/// Applies `flushes`, asserting that every one succeeded.
async fn apply(store: &HotStore, flushes: &[RoomFlush]) {
    let results = store.flush(flushes).await;
    assert_eq!(results.len(), flushes.len());
    for ((room, result), flush) in results.iter().zip(flushes) {
        assert_eq!(*room, flush.room_id, "results come in the order given");
        if let Err(e) = result {
            panic!("flush {} of room {room} failed: {e}", flush.flush_id);
        }
    }
}

livemesh_testkit::hot_backend_suite!(
    flushes_add_up_over_sharded_totals,
    a_replayed_flush_counts_once,
    top_is_ordered_and_trimmed,
    delete_room_removes_the_counters,
    many_rooms_flushed_at_once_all_apply,
    concurrent_flushes_sum_exactly,
    stored_rooms_counts_rooms_of_its_phase,
    a_batch_counts_once_whichever_replica_flushes_it,
    a_closed_room_refuses_flushes_and_has_one_finaliser,
);

/// A flush made of SendLoves batches `(viewer, batch id, loves)`.
fn batches_flush(room_id: u64, flush_id: &str, batches: &[(u64, &str, u64)]) -> RoomFlush {
    let mut viewers: Vec<(u64, u64)> = Vec::new();
    for (viewer, _, loves) in batches {
        match viewers.iter_mut().find(|(v, _)| v == viewer) {
            Some(entry) => entry.1 += loves,
            None => viewers.push((*viewer, *loves)),
        }
    }
    RoomFlush {
        room_id,
        flush_id: flush_id.to_owned(),
        total_delta: batches.iter().map(|(_, _, loves)| loves).sum(),
        viewers,
        batches: batches
            .iter()
            .map(|(viewer_id, batch_id, loves)| BatchMark {
                viewer_id: *viewer_id,
                batch_id: (*batch_id).to_owned(),
                loves: *loves,
            })
            .collect(),
    }
}

/// Two replicas' stores: two connections to the same Redis, or the same
/// in-process store.
async fn two_replicas(backend: HotBackend) -> (HotStore, HotStore) {
    let a = backend.store(HotConfig::default()).await;
    let b = match backend {
        HotBackend::Memory => a.clone(),
        _ => backend.store(HotConfig::default()).await,
    };
    (a, b)
}

async fn applied(store: &HotStore, flush: RoomFlush) -> Applied {
    let mut results = store.flush(std::slice::from_ref(&flush)).await;
    results.pop().unwrap().1.unwrap()
}

async fn a_batch_counts_once_whichever_replica_flushes_it(backend: HotBackend) {
    let (a, b) = two_replicas(backend).await;
    let room = unique_room();
    assert_eq!(
        applied(&a, batches_flush(room, "a:1", &[(7, "A", 5), (8, "X", 1)])).await,
        Applied::Counted { duplicates: vec![] }
    );
    // 100 other batches of the same viewer in between.
    for i in 0..100 {
        let id = format!("other-{i}");
        applied(
            &a,
            batches_flush(room, &format!("a:{}", i + 2), &[(7, &id, 1)]),
        )
        .await;
    }
    // The retry of A reaches the other replica, in one flush with a new batch
    // and with A's viewer's other loves: only A is left out.
    assert_eq!(
        applied(
            &b,
            batches_flush(room, "b:1", &[(9, "B", 2), (7, "A", 5), (7, "C", 3)])
        )
        .await,
        Applied::Counted {
            duplicates: vec![1]
        }
    );
    assert_eq!(b.total(room).await.unwrap(), 5 + 1 + 100 + 2 + 3);
    assert_eq!(
        a.top(room, 3).await.unwrap(),
        vec![(7, 5 + 100 + 3), (9, 2), (8, 1)]
    );
    // A flush made only of a retried batch changes nothing.
    assert_eq!(
        applied(&a, batches_flush(room, "a:500", &[(7, "A", 5)])).await,
        Applied::Counted {
            duplicates: vec![0]
        }
    );
    assert_eq!(a.total(room).await.unwrap(), 111);
    assert_eq!(a.top(room, 1).await.unwrap(), vec![(7, 108)]);
    if let Some(mut raw) = backend.raw().await {
        let ttl = raw.ttl(&keys::batch("release", room, 7, "A")).await;
        let configured = HotConfig::default().batch_ttl_secs as i64;
        assert!(
            (configured - 60..=configured).contains(&ttl),
            "a batch marker expires after the configured {configured} s, ttl {ttl}"
        );
    }
}

async fn a_closed_room_refuses_flushes_and_has_one_finaliser(backend: HotBackend) {
    let (a, b) = two_replicas(backend).await;
    let room = unique_room();
    applied(&a, batches_flush(room, "a:1", &[(1, "A", 4)])).await;
    let lease = Duration::from_secs(30);
    assert!(a.close(room, "node-a", lease).await.unwrap());
    assert!(
        !b.close(room, "node-b", lease).await.unwrap(),
        "the lease is node-a's"
    );
    assert!(a.close(room, "node-a", lease).await.unwrap(), "renewed");
    // Late: A again (counted before the close) and a new batch D.
    let late = batches_flush(room, "b:1", &[(1, "A", 4), (2, "D", 6)]);
    assert_eq!(
        applied(&b, late.clone()).await,
        Applied::Closed { counted: vec![0] }
    );
    assert_eq!(
        applied(&b, late).await,
        Applied::Closed { counted: vec![0] }
    );
    assert_eq!(
        a.total(room).await.unwrap(),
        4,
        "a closed room's total stands"
    );
    assert_eq!(a.top(room, 10).await.unwrap(), vec![(1, 4)]);
    // Deleting the counters keeps the room closed: a late flush cannot
    // bring them back.
    a.delete_room(room).await.unwrap();
    assert!(matches!(
        applied(&b, batches_flush(room, "b:2", &[(3, "E", 1)])).await,
        Applied::Closed { .. }
    ));
    assert_eq!(a.total(room).await.unwrap(), 0);
    // A lapsed lease can be taken over.
    let other = unique_room();
    assert!(
        a.close(other, "node-a", Duration::from_millis(50))
            .await
            .unwrap()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.close(other, "node-b", lease).await.unwrap() {
        assert!(Instant::now() < deadline, "the lapsed lease was never free");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// With `wait_replicas`, a flush is confirmed only once a replica has it:
/// the harness's Cluster has one replica per master, its standalone Redis none.
#[tokio::test]
async fn a_flush_is_confirmed_only_once_replicated() {
    let config = HotConfig {
        wait_replicas: 1,
        wait_timeout_ms: 2_000,
        ..HotConfig::default()
    };
    let cluster = HotBackend::Cluster.store(config.clone()).await;
    let room = unique_room();
    assert_eq!(
        applied(&cluster, batches_flush(room, "n:1", &[(1, "A", 2)])).await,
        Applied::Counted { duplicates: vec![] }
    );
    assert!(
        cluster
            .close(room, "n", Duration::from_secs(1))
            .await
            .unwrap()
    );

    let alone = HotBackend::Redis
        .store(HotConfig {
            wait_timeout_ms: 50,
            ..config
        })
        .await;
    let room = unique_room();
    let started = Instant::now();
    let results = alone
        .flush(&[batches_flush(room, "n:1", &[(1, "A", 2)])])
        .await;
    assert!(
        matches!(&results[..], [(_, Err(HotError::Unavailable(m)))] if m.contains("0 of 1 replicas")),
        "{results:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    // Applied but unconfirmed: the retry (same id) counts once, and is again
    // unconfirmed.
    let results = alone
        .flush(&[batches_flush(room, "n:1", &[(1, "A", 2)])])
        .await;
    assert!(matches!(&results[..], [(_, Err(_))]), "{results:?}");
    assert_eq!(alone.total(room).await.unwrap(), 2);
}

async fn flushes_add_up_over_sharded_totals(backend: HotBackend) {
    let store = backend.store(HotConfig::default()).await;
    let (room, other) = (unique_room(), unique_room());
    assert_eq!(store.total(room).await.unwrap(), 0, "an unknown room");
    assert!(store.top(room, 10).await.unwrap().is_empty());

    let mut expected_total = 0;
    for seq in 1..=8u64 {
        apply(
            &store,
            &[flush(room, &format!("n1:{seq}"), seq, &[(1, seq), (2, 1)])],
        )
        .await;
        expected_total += seq;
    }
    // Another room's flush in between stays apart.
    apply(&store, &[flush(other, "n1:1", 100, &[(1, 100)])]).await;
    // A flush may carry a total without viewers, and a viewer with no loves.
    apply(&store, &[flush(room, "n2:1", 5, &[(3, 0)])]).await;
    expected_total += 5;

    assert_eq!(store.total(room).await.unwrap(), expected_total);
    assert_eq!(store.top(room, 10).await.unwrap(), vec![(1, 36), (2, 8)]);
    assert_eq!(store.total(other).await.unwrap(), 100);

    if let Some(mut raw) = backend.raw().await {
        let shard_keys: Vec<String> = raw
            .room_keys(room)
            .await
            .into_iter()
            .filter(|key| key.contains("|total:"))
            .collect();
        assert!(
            shard_keys.len() > 1,
            "9 flushes over 4 shards touch more than one: {shard_keys:?}"
        );
        let mut sum = 0;
        for shard in 0..4 {
            let key = keys::total("release", room, shard);
            sum += raw.get(&key).await.unwrap_or(0);
        }
        assert_eq!(
            sum, expected_total,
            "the total is the sum of the shard keys"
        );
        let lovers: u64 = raw
            .query(::redis::cmd("ZCARD").arg(keys::lovers("release", room)))
            .await;
        assert_eq!(lovers, 2, "a viewer with no loves is not ranked");
    }
}

async fn a_replayed_flush_counts_once(backend: HotBackend) {
    let store = backend.store(HotConfig::default()).await;
    let room = unique_room();
    let first = flush(room, "n1:1", 3, &[(7, 3)]);
    apply(&store, std::slice::from_ref(&first)).await;
    // Replayed alone, and twice more within one call: all answer Ok.
    apply(&store, std::slice::from_ref(&first)).await;
    apply(&store, &[first.clone(), first.clone()]).await;
    assert_eq!(store.total(room).await.unwrap(), 3);
    assert_eq!(store.top(room, 10).await.unwrap(), vec![(7, 3)]);

    // The same id in another room is another flush.
    let other = unique_room();
    apply(&store, &[flush(other, "n1:1", 4, &[(7, 4)])]).await;
    assert_eq!(store.total(other).await.unwrap(), 4);

    // A new id counts.
    apply(&store, &[flush(room, "n1:2", 2, &[(7, 2)])]).await;
    assert_eq!(store.total(room).await.unwrap(), 5);
    assert_eq!(store.top(room, 10).await.unwrap(), vec![(7, 5)]);

    if let Some(mut raw) = backend.raw().await {
        let ttl = raw.ttl(&keys::flush("release", room, "n1:1")).await;
        let configured = HotConfig::default().flush_id_ttl_secs as i64;
        assert!(
            (configured - 60..=configured).contains(&ttl),
            "the flush marker expires after the configured {configured} s, ttl {ttl}"
        );
    }
}

async fn top_is_ordered_and_trimmed(backend: HotBackend) {
    let config = HotConfig {
        phase: "release".into(),
        top_length: 3,
        ..HotConfig::default()
    };
    let store = backend.store(config).await;
    let room = unique_room();
    apply(
        &store,
        &[flush(
            room,
            "n1:1",
            15,
            &[(11, 1), (12, 2), (13, 3), (14, 4), (15, 5)],
        )],
    )
    .await;
    assert_eq!(
        store.top(room, 10).await.unwrap(),
        vec![(15, 5), (14, 4), (13, 3)],
        "trimmed to top_length, highest first"
    );
    assert_eq!(store.top(room, 2).await.unwrap(), vec![(15, 5), (14, 4)]);
    assert!(store.top(room, 0).await.unwrap().is_empty());

    // A viewer trimmed away starts again from zero; one climbing overtakes.
    apply(&store, &[flush(room, "n1:2", 7, &[(11, 1), (13, 6)])]).await;
    assert_eq!(
        store.top(room, 10).await.unwrap(),
        vec![(13, 9), (15, 5), (14, 4)]
    );

    // Equal scores rank as Redis ranks them: by the id's decimal string,
    // descending ("9" > "10"); the same in every backend.
    let ties = unique_room();
    apply(
        &store,
        &[flush(ties, "n1:1", 9, &[(10, 3), (9, 3), (100, 3)])],
    )
    .await;
    assert_eq!(
        store.top(ties, 10).await.unwrap(),
        vec![(9, 3), (100, 3), (10, 3)]
    );

    if let Some(mut raw) = backend.raw().await {
        let ranked: u64 = raw
            .query(::redis::cmd("ZCARD").arg(keys::lovers("release", room)))
            .await;
        assert_eq!(ranked, 3, "the sorted set itself is trimmed");
    }
}

async fn delete_room_removes_the_counters(backend: HotBackend) {
    let store = backend.store(HotConfig::default()).await;
    let (room, kept) = (unique_room(), unique_room());
    let flushes: Vec<RoomFlush> = (1..=6u64)
        .map(|seq| flush(room, &format!("n1:{seq}"), 2, &[(seq, 2)]))
        .collect();
    apply(&store, &flushes).await;
    apply(&store, &[flush(kept, "n1:1", 1, &[(1, 1)])]).await;
    assert_eq!(store.total(room).await.unwrap(), 12);

    store.delete_room(room).await.unwrap();
    assert_eq!(store.total(room).await.unwrap(), 0);
    assert!(store.top(room, 10).await.unwrap().is_empty());
    assert_eq!(store.total(kept).await.unwrap(), 1, "other rooms stay");
    // Deleting again (or an unknown room) is fine.
    store.delete_room(room).await.unwrap();
    store.delete_room(unique_room()).await.unwrap();

    if let Some(mut raw) = backend.raw().await {
        let left = raw.room_keys(room).await;
        // Only the flush markers are left, and they expire by themselves.
        let markers: Vec<&String> = left.iter().filter(|k| k.contains("|flush:")).collect();
        assert_eq!(
            markers.len(),
            left.len(),
            "only flush markers are left: {left:?}"
        );
        for marker in markers {
            let ttl = raw.ttl(marker).await;
            assert!(ttl > 0, "{marker} expires (ttl {ttl})");
        }
    }

    // The markers make a late replay of an applied flush harmless: the room
    // does not come back.
    apply(&store, &flushes[..2]).await;
    assert_eq!(store.total(room).await.unwrap(), 0);
    if let Some(mut raw) = backend.raw().await {
        let left = raw.room_keys(room).await;
        assert!(
            left.iter().all(|k| k.contains("|flush:")),
            "no counter came back: {left:?}"
        );
    }
    // A new flush starts the room from zero.
    apply(&store, &[flush(room, "n1:7", 4, &[(1, 4)])]).await;
    assert_eq!(store.total(room).await.unwrap(), 4);
    assert_eq!(store.top(room, 10).await.unwrap(), vec![(1, 4)]);
}

async fn many_rooms_flushed_at_once_all_apply(backend: HotBackend) {
    let store = backend.store(HotConfig::default()).await;
    let rooms: Vec<u64> = (0..200).map(|_| unique_room()).collect();
    let flushes: Vec<RoomFlush> = rooms
        .iter()
        .enumerate()
        .map(|(i, room)| {
            let i = i as u64;
            flush(*room, "n1:1", i + 1, &[(i, i + 2), (1_000 + i, 1)])
        })
        .collect();
    apply(&store, &flushes).await;
    for (i, room) in rooms.iter().enumerate() {
        let i = i as u64;
        assert_eq!(store.total(*room).await.unwrap(), i + 1, "room {room}");
        let top = store.top(*room, 10).await.unwrap();
        assert_eq!(top.first(), Some(&(i, i + 2)), "room {room}");
        assert_eq!(top.len(), 2, "room {room}");
    }

    if backend == HotBackend::Cluster {
        // The rooms really were spread over the cluster's slots (and nodes).
        let mut raw = backend.raw().await.unwrap();
        let mut slots = HashSet::new();
        for room in &rooms {
            let slot: u16 = raw
                .query(
                    ::redis::cmd("CLUSTER")
                        .arg("KEYSLOT")
                        .arg(keys::lovers("release", *room)),
                )
                .await;
            slots.insert(slot);
        }
        assert!(slots.len() > 100, "200 rooms in only {} slots", slots.len());
        let lows = slots.iter().filter(|slot| **slot < 5_461).count();
        let highs = slots.iter().filter(|slot| **slot >= 10_923).count();
        assert!(lows > 0 && highs > 0, "rooms on the first and last master");
    }
}

async fn concurrent_flushes_sum_exactly(backend: HotBackend) {
    const TASKS: u64 = 16;
    const FLUSHES: u64 = 50;
    let store = backend.store(HotConfig::default()).await;
    let (room, second) = (unique_room(), unique_room());
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                for seq in 0..FLUSHES {
                    let id = format!("node{task}:{seq}");
                    // Each task's flushes carry two rooms (two slots on a Cluster).
                    let batch = [
                        flush(room, &id, 2, &[(task, 1), (1_000, 1)]),
                        flush(second, &id, 1, &[(task, 1)]),
                    ];
                    apply(&store, &batch).await;
                    // Every third flush is replayed right away, as a retry would.
                    if seq % 3 == 0 {
                        apply(&store, &batch[..1]).await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(store.total(room).await.unwrap(), 2 * TASKS * FLUSHES);
    assert_eq!(store.total(second).await.unwrap(), TASKS * FLUSHES);
    let top = store.top(room, 100).await.unwrap();
    assert_eq!(top.len() as u64, TASKS + 1);
    assert_eq!(top[0], (1_000, TASKS * FLUSHES));
    assert!(
        top[1..].iter().all(|(_, loves)| *loves == FLUSHES),
        "{top:?}"
    );
}

/// Nothing listens on port 1: every call fails as `Unavailable`, quickly.
#[tokio::test]
async fn unreachable_redis_is_unavailable_quickly() {
    // The password must not show in any message.
    let store = HotStore::connect("redis://:hunter2@127.0.0.1:1", HotConfig::default())
        .await
        .expect("connecting is lazy");
    let room = unique_room();
    let started = Instant::now();
    let results = store.flush(&[flush(room, "n1:1", 1, &[(1, 1)])]).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(results.len(), 1);
    let (flushed_room, result) = &results[0];
    assert_eq!(*flushed_room, room);
    let Err(HotError::Unavailable(message)) = result else {
        panic!("expected Unavailable, got {result:?}");
    };
    assert!(!message.contains("hunter2"), "{message}");
    assert!(
        message.contains("127.0.0.1:1"),
        "names the server: {message}"
    );

    let started = Instant::now();
    assert!(matches!(
        store.total(room).await,
        Err(HotError::Unavailable(_))
    ));
    assert!(matches!(
        store.top(room, 3).await,
        Err(HotError::Unavailable(_))
    ));
    assert!(matches!(
        store.delete_room(room).await,
        Err(HotError::Unavailable(_))
    ));
    assert!(matches!(store.ping().await, Err(HotError::Unavailable(_))));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

/// A Cluster whose seeds are all down fails the same way, in bounded time.
#[tokio::test]
async fn unreachable_cluster_is_unavailable_quickly() {
    let store = HotStore::connect(
        "redis://127.0.0.1:1,redis://127.0.0.1:2",
        HotConfig::default(),
    )
    .await
    .expect("connecting is lazy");
    assert!(matches!(store, HotStore::Cluster(_)));
    let started = Instant::now();
    let results = store.flush(&[flush(unique_room(), "n1:1", 1, &[])]).await;
    assert!(
        matches!(results[..], [(_, Err(HotError::Unavailable(_)))]),
        "{results:?}"
    );
    assert!(matches!(
        store.total(1).await,
        Err(HotError::Unavailable(_))
    ));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn malformed_urls_fail_at_connect() {
    for urls in [
        "",
        " , ",
        "localhost:6379",
        "http://127.0.0.1:6379",
        "redis://127.0.0.1:1,nonsense",
    ] {
        let result = HotStore::connect(urls, HotConfig::default()).await;
        let Err(HotError::Unavailable(message)) = &result else {
            panic!("{urls:?} was accepted");
        };
        assert!(!message.is_empty());
    }
    let Err(HotError::Unavailable(message)) = HotStore::connect(
        "redis://u:hunter2@127.0.0.1:1,http://u:hunter2@x",
        HotConfig::default(),
    )
    .await
    else {
        panic!("a bad seed was accepted");
    };
    assert!(!message.contains("hunter2"), "{message}");
    // One URL is standalone; a comma makes a Cluster, even with one seed.
    let one = HotStore::connect("redis://127.0.0.1:1", HotConfig::default())
        .await
        .unwrap();
    assert!(matches!(one, HotStore::Redis(_)));
    let seed = HotStore::connect("redis://127.0.0.1:1,", HotConfig::default())
        .await
        .unwrap();
    assert!(matches!(seed, HotStore::Cluster(_)));
}

/// A server that accepts connections and never answers (a hung Redis, a
/// black-holed route): calls still end as `Unavailable` within the timeouts
/// (1 s to connect, 1 s per command), not hang.
#[tokio::test]
async fn hung_redis_is_unavailable_in_bounded_time() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let _silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    for urls in [format!("redis://{addr}"), format!("redis://{addr},")] {
        let store = HotStore::connect(&urls, HotConfig::default())
            .await
            .unwrap();
        let started = Instant::now();
        let results = store
            .flush(&[flush(unique_room(), "n1:1", 1, &[(1, 1)])])
            .await;
        assert!(
            matches!(results[..], [(_, Err(HotError::Unavailable(_)))]),
            "{results:?}"
        );
        assert!(matches!(
            store.total(1).await,
            Err(HotError::Unavailable(_))
        ));
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(6), "{urls}: {elapsed:?}");
        eprintln!("{urls}: flush + total failed after {elapsed:?}");
    }
}

/// `stored_rooms` counts each room with counters or flush markers once,
/// and only rooms of the store's own phase.
async fn stored_rooms_counts_rooms_of_its_phase(backend: HotBackend) {
    let config = HotConfig {
        phase: livemesh_testkit::unique_name("rooms"),
        ..HotConfig::default()
    };
    let store = backend.store(config.clone()).await;
    assert_eq!(store.stored_rooms().await.unwrap(), 0);
    let (room, other) = (unique_room(), unique_room());
    apply(&store, &[flush(room, "n1:1", 3, &[(7, 3), (8, 1)])]).await;
    apply(&store, &[flush(room, "n1:2", 1, &[])]).await;
    assert_eq!(store.stored_rooms().await.unwrap(), 1);
    apply(&store, &[flush(other, "n1:1", 1, &[(7, 1)])]).await;
    assert_eq!(store.stored_rooms().await.unwrap(), 2);
    // The flush markers stay after a delete (a late replay stays a replay).
    store.delete_room(room).await.unwrap();
    assert_eq!(store.stored_rooms().await.unwrap(), 2);
    let elsewhere = backend
        .store(HotConfig {
            phase: livemesh_testkit::unique_name("rooms"),
            ..config
        })
        .await;
    assert_eq!(elsewhere.stored_rooms().await.unwrap(), 0);
}
