//! The fan-out store's one suite, run against each backend: in process, the
//! harness's standalone Redis, and its Redis Cluster. Every case has a phase
//! of its own (a key prefix), so cases share the Redis servers without
//! meeting, and the same small room ids can be used everywhere.
//!
//! Time is the `now_ms` the cases pass: a lease ends because a case passes a
//! later `now_ms`, never because it waited.

// Helpers outside #[test] functions unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use livemesh_fanout::{
    Append, Appended, FanoutSettings, FanoutStore, Head, Position, ROOM_ENDED_KEY, Renewed, Slot,
    StoreError,
};
use livemesh_testkit::HotBackend;

/// What a case opens on its backend.
trait Open {
    fn store(self, settings: FanoutSettings) -> FanoutStore;
}

impl Open for HotBackend {
    fn store(self, settings: FanoutSettings) -> FanoutStore {
        match self.redis_url() {
            None => FanoutStore::memory(settings),
            Some(url) => FanoutStore::redis(&url, settings).unwrap(),
        }
    }
}

/// The first `now_ms` of every case; any fixed instant would do.
const T0: i64 = 1_700_000_000_000;

const ROOM: u64 = 1;
const OTHER_ROOM: u64 = 2;

/// Settings with a phase no other case uses, and TTLs far longer than any
/// case runs (Redis counts them in real seconds).
fn settings(history_len: u32) -> FanoutSettings {
    FanoutSettings {
        phase: livemesh_testkit::unique_name("fanout"),
        history_len,
        idempotency_ttl_secs: 600,
        room_ttl_secs: 600,
        ended_ttl_secs: 600,
        wait_replicas: 0,
        wait_timeout_ms: 100,
    }
}

fn ordered<'a>(room_id: u64, payload: &'a [u8], now_ms: i64) -> Append<'a> {
    Append {
        room_id,
        payload,
        slot: Slot::Ordered,
        idempotency_key: None,
        ends_room: false,
        now_ms,
    }
}

fn latest<'a>(room_id: u64, kind: &'static str, payload: &'a [u8], now_ms: i64) -> Append<'a> {
    Append {
        slot: Slot::Latest(kind),
        ..ordered(room_id, payload, now_ms)
    }
}

fn keyed<'a>(append: Append<'a>, key: &'a str) -> Append<'a> {
    Append {
        idempotency_key: Some(key),
        ..append
    }
}

/// Appends and expects a new position: returns (epoch, offset, nodes sorted).
async fn append_new(store: &FanoutStore, append: &Append<'_>) -> (u64, u64, Vec<String>) {
    match store.append(append).await.unwrap() {
        Appended::New {
            epoch,
            offset,
            mut nodes,
        } => {
            nodes.sort();
            (epoch, offset, nodes)
        }
        other => panic!("expected a new position, got {other:?}"),
    }
}

/// The whole history the store still holds for the room.
async fn all_history(store: &FanoutStore, room: u64) -> Vec<(u64, Vec<u8>)> {
    store.history(room, 0, u64::MAX).await.unwrap().entries
}

/// A node's renewal of one room.
async fn renew_one(
    store: &FanoutStore,
    node: &str,
    room: u64,
    viewers: u64,
    lease_ms: u64,
    now_ms: i64,
) -> Renewed {
    let mut results = store
        .renew(node, &[(room, viewers)], lease_ms, now_ms)
        .await;
    assert_eq!(results.len(), 1);
    results.remove(0).unwrap()
}

/// The order of a head's latest values is not part of the contract.
fn sorted_latest(mut head: Head) -> Head {
    head.latest.sort();
    head
}

fn entries(list: &[(u64, &[u8])]) -> Vec<(u64, Vec<u8>)> {
    list.iter()
        .map(|(offset, payload)| (*offset, payload.to_vec()))
        .collect()
}

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|name| (*name).to_owned()).collect()
}

livemesh_testkit::hot_backend_suite!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    ordered_appends_are_numbered_and_read_back_by_range,
    history_is_trimmed_to_history_len,
    latest_values_take_no_offset_and_join_returns_the_newest,
    a_repeated_idempotency_key_is_a_duplicate,
    an_ended_room_takes_no_more_appends,
    nodes_are_those_with_live_leases,
    renew_sums_live_viewers_and_elects_one_reporter,
    join_creates_the_epoch_that_appends_continue,
    rooms_are_independent,
    concurrent_appends_get_distinct_gap_free_offsets,
    stored_rooms_counts_each_room_with_state_once,
    heads_follow_ordered_appends_only,
);

async fn heads_follow_ordered_appends_only(backend: HotBackend) {
    let store = backend.store(settings(2));
    let nothing = Position {
        epoch: 0,
        offset: 0,
    };
    let heads = store.heads(&[ROOM, OTHER_ROOM]).await;
    assert_eq!(
        heads.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        vec![nothing, nothing]
    );
    let head = store.join(ROOM, "node-a", 1, 60_000, T0).await.unwrap();
    let mut epoch = head.epoch;
    for n in 1..=3u64 {
        let (e, offset, _) = append_new(&store, &ordered(ROOM, b"e", T0)).await;
        epoch = e;
        assert_eq!(offset, n);
        // A latest value moves no head.
        store
            .append(&latest(ROOM, "love_total", b"t", T0))
            .await
            .unwrap();
        let heads = store.heads(&[OTHER_ROOM, ROOM]).await;
        assert_eq!(
            heads.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
            // The head counts every append, past the trimmed history.
            vec![nothing, Position { epoch, offset: n }]
        );
    }
    assert_eq!(epoch, head.epoch);
}

async fn ordered_appends_are_numbered_and_read_back_by_range(backend: HotBackend) {
    let store = backend.store(settings(100));
    let unknown = store.history(ROOM, 0, u64::MAX).await.unwrap();
    assert_eq!((unknown.epoch, unknown.entries), (0, Vec::new()));

    // Colons and zero bytes must survive the Redis `<offset>:<payload>`
    // members, and two equal payloads must stay two entries.
    let payloads: [&[u8]; 5] = [b"first", b"a:b\0c:\0", b"same", b"same", b"\0\0:"];
    let mut epoch = None;
    for (i, payload) in payloads.iter().enumerate() {
        // A later clock on every append: the epoch must not follow it.
        let now = T0 + i64::try_from(i).unwrap() * 1_000;
        let (got_epoch, offset, nodes) = append_new(&store, &ordered(ROOM, payload, now)).await;
        assert_eq!(offset, i as u64 + 1, "append {i}");
        assert!(nodes.is_empty(), "{nodes:?}");
        assert_ne!(got_epoch, 0);
        assert_eq!(*epoch.get_or_insert(got_epoch), got_epoch, "append {i}");
    }
    let epoch = epoch.unwrap();

    let all: Vec<(u64, Vec<u8>)> = entries(&[
        (1, payloads[0]),
        (2, payloads[1]),
        (3, payloads[2]),
        (4, payloads[3]),
        (5, payloads[4]),
    ]);
    let history = store.history(ROOM, 0, 5).await.unwrap();
    assert_eq!(history.epoch, epoch);
    assert_eq!(history.entries, all);
    // `after` is exclusive, `upto` inclusive.
    assert_eq!(
        store.history(ROOM, 1, 3).await.unwrap().entries,
        all[1..3].to_vec()
    );
    assert_eq!(
        store.history(ROOM, 2, 4).await.unwrap().entries,
        all[2..4].to_vec()
    );
    assert_eq!(
        store.history(ROOM, 4, 100).await.unwrap().entries,
        all[4..].to_vec()
    );
    assert!(store.history(ROOM, 3, 3).await.unwrap().entries.is_empty());
    assert!(
        store
            .history(ROOM, 5, 100)
            .await
            .unwrap()
            .entries
            .is_empty()
    );
    assert_eq!(all_history(&store, ROOM).await, all);
}

async fn history_is_trimmed_to_history_len(backend: HotBackend) {
    const LEN: u32 = 3;
    let store = backend.store(settings(LEN));
    let payloads: Vec<Vec<u8>> = (1..=7u64)
        .map(|i| format!("event {i}").into_bytes())
        .collect();
    for (i, payload) in payloads.iter().enumerate() {
        let (_, offset, _) = append_new(&store, &ordered(ROOM, payload, T0)).await;
        assert_eq!(offset, i as u64 + 1);
    }
    let kept: Vec<(u64, Vec<u8>)> = (5..=7u64)
        .map(|offset| (offset, payloads[offset as usize - 1].clone()))
        .collect();
    assert_eq!(all_history(&store, ROOM).await, kept);
    // Asking for trimmed offsets gives what is left of the range.
    assert_eq!(
        store.history(ROOM, 0, 5).await.unwrap().entries,
        kept[..1].to_vec()
    );
    assert!(store.history(ROOM, 0, 4).await.unwrap().entries.is_empty());

    // Trimming frees no offsets: numbering goes on.
    let (_, offset, _) = append_new(&store, &ordered(ROOM, b"event 8", T0)).await;
    assert_eq!(offset, 8);
    assert_eq!(
        all_history(&store, ROOM).await,
        entries(&[
            (6, &payloads[5]),
            (7, &payloads[6]),
            (8, b"event 8".as_slice())
        ])
    );
}

async fn latest_values_take_no_offset_and_join_returns_the_newest(backend: HotBackend) {
    let store = backend.store(settings(100));
    // Before any ordered event the last offset is 0.
    let (epoch, offset, _) = append_new(&store, &latest(ROOM, "love_total", b"L0", T0)).await;
    assert_eq!(offset, 0);

    for expected in 1..=2 {
        let (e, offset, _) = append_new(&store, &ordered(ROOM, b"comment", T0 + 1)).await;
        assert_eq!((e, offset), (epoch, expected));
    }
    let (e, offset, _) = append_new(&store, &latest(ROOM, "love_total", b"L1", T0 + 2)).await;
    assert_eq!((e, offset), (epoch, 2), "carries the last offset");
    let (e, offset, _) = append_new(&store, &latest(ROOM, "viewer_count", b"V1", T0 + 3)).await;
    assert_eq!((e, offset), (epoch, 2));
    let (e, offset, _) = append_new(&store, &ordered(ROOM, b"gift", T0 + 4)).await;
    assert_eq!((e, offset), (epoch, 3), "latest values consumed no offset");
    let (e, offset, _) = append_new(&store, &latest(ROOM, "love_total", b"L:2\0", T0 + 5)).await;
    assert_eq!((e, offset), (epoch, 3));

    // Latest values are not in the history.
    assert_eq!(
        all_history(&store, ROOM).await,
        entries(&[
            (1, b"comment".as_slice()),
            (2, b"comment".as_slice()),
            (3, b"gift".as_slice())
        ])
    );
    let head = store.join(ROOM, "node-a", 1, 10_000, T0 + 6).await.unwrap();
    assert_eq!(
        sorted_latest(head),
        Head {
            epoch,
            offset: 3,
            ended: false,
            latest: entries(&[(2, b"V1".as_slice()), (3, b"L:2\0".as_slice())]),
        }
    );
}

async fn a_repeated_idempotency_key_is_a_duplicate(backend: HotBackend) {
    let store = backend.store(settings(100));
    let (epoch, offset, _) = append_new(&store, &keyed(ordered(ROOM, b"one", T0), "k1")).await;
    assert_eq!(offset, 1);
    let (_, offset, _) = append_new(&store, &ordered(ROOM, b"two", T0)).await;
    assert_eq!(offset, 2);

    // The retry carries another payload: it must not be stored either.
    let retry = store
        .append(&keyed(ordered(ROOM, b"one again", T0 + 10), "k1"))
        .await
        .unwrap();
    assert_eq!(retry, Appended::Duplicate { epoch, offset: 1 });
    let (e, offset, _) = append_new(&store, &keyed(ordered(ROOM, b"three", T0), "k2")).await;
    assert_eq!((e, offset), (epoch, 3), "a new key is a new event");
    let retry = store
        .append(&keyed(ordered(ROOM, b"three", T0 + 20), "k2"))
        .await
        .unwrap();
    assert_eq!(retry, Appended::Duplicate { epoch, offset: 3 });

    assert_eq!(
        all_history(&store, ROOM).await,
        entries(&[
            (1, b"one".as_slice()),
            (2, b"two".as_slice()),
            (3, b"three".as_slice())
        ])
    );

    // A latest value with a key: the repeat neither replaces the value nor
    // moves anything.
    let love = keyed(latest(ROOM, "love_total", b"100", T0 + 30), "love-1");
    let (_, offset, _) = append_new(&store, &love).await;
    assert_eq!(offset, 3);
    let repeat = keyed(latest(ROOM, "love_total", b"999", T0 + 40), "love-1");
    assert_eq!(
        store.append(&repeat).await.unwrap(),
        Appended::Duplicate { epoch, offset: 3 }
    );
    let head = store
        .join(ROOM, "node-a", 1, 10_000, T0 + 50)
        .await
        .unwrap();
    assert_eq!(head.latest, entries(&[(3, b"100".as_slice())]));
    assert_eq!(head.offset, 3);

    // Keys belong to their room: the same key elsewhere is new.
    let (_, offset, _) = append_new(&store, &keyed(ordered(OTHER_ROOM, b"x", T0), "k1")).await;
    assert_eq!(offset, 1);
}

async fn an_ended_room_takes_no_more_appends(backend: HotBackend) {
    let store = backend.store(settings(100));
    append_new(&store, &ordered(ROOM, b"one", T0)).await;
    let (epoch, _, _) = append_new(&store, &ordered(ROOM, b"two", T0)).await;
    let end = Append {
        ends_room: true,
        ..keyed(ordered(ROOM, b"room ended", T0 + 1), ROOM_ENDED_KEY)
    };
    let (e, offset, _) = append_new(&store, &end).await;
    assert_eq!((e, offset), (epoch, 3), "the room-ended event is stored");

    let ended = Appended::Ended { epoch, offset: 3 };
    assert_eq!(
        store.append(&ordered(ROOM, b"late", T0 + 2)).await.unwrap(),
        ended
    );
    assert_eq!(
        store
            .append(&latest(ROOM, "love_total", b"5", T0 + 2))
            .await
            .unwrap(),
        ended
    );
    // A keyed append after the end is refused and its key not remembered:
    // its repeat is refused the same way, not reported as published.
    let late = keyed(ordered(ROOM, b"late", T0 + 3), "late-key");
    assert_eq!(store.append(&late).await.unwrap(), ended);
    assert_eq!(store.append(&late).await.unwrap(), ended);
    // Whoever publishes the end again learns where it went.
    let again = Append {
        now_ms: T0 + 4,
        ..end.clone()
    };
    assert_eq!(
        store.append(&again).await.unwrap(),
        Appended::Duplicate { epoch, offset: 3 }
    );

    assert_eq!(
        all_history(&store, ROOM).await,
        entries(&[
            (1, b"one".as_slice()),
            (2, b"two".as_slice()),
            (3, b"room ended".as_slice())
        ])
    );
    let head = store.join(ROOM, "node-a", 1, 10_000, T0 + 5).await.unwrap();
    assert_eq!(
        head,
        Head {
            epoch,
            offset: 3,
            ended: true,
            latest: Vec::new(),
        }
    );
}

async fn nodes_are_those_with_live_leases(backend: HotBackend) {
    let store = backend.store(settings(100));
    assert!(store.nodes(ROOM, T0).await.unwrap().is_empty());
    store.join(ROOM, "node-a", 3, 10_000, T0).await.unwrap();
    store.join(ROOM, "node-b", 4, 1_000, T0).await.unwrap();
    store.join(ROOM, "node-c", 5, 10_000, T0).await.unwrap();

    let sorted = |mut nodes: Vec<String>| {
        nodes.sort();
        nodes
    };
    assert_eq!(
        sorted(store.nodes(ROOM, T0 + 500).await.unwrap()),
        names(&["node-a", "node-b", "node-c"])
    );
    let (_, _, nodes) = append_new(&store, &ordered(ROOM, b"e1", T0 + 500)).await;
    assert_eq!(nodes, names(&["node-a", "node-b", "node-c"]));

    store.leave(ROOM, "node-a").await.unwrap();
    assert_eq!(
        sorted(store.nodes(ROOM, T0 + 600).await.unwrap()),
        names(&["node-b", "node-c"])
    );
    let (_, _, nodes) = append_new(&store, &ordered(ROOM, b"e2", T0 + 600)).await;
    assert_eq!(nodes, names(&["node-b", "node-c"]));

    // node-b's lease ended at T0 + 1000; nobody waits for it, the clock says so.
    assert_eq!(
        store.nodes(ROOM, T0 + 1_500).await.unwrap(),
        names(&["node-c"])
    );
    let (_, _, nodes) = append_new(&store, &ordered(ROOM, b"e3", T0 + 1_500)).await;
    assert_eq!(nodes, names(&["node-c"]));

    // A node that left can join again.
    store
        .join(ROOM, "node-a", 3, 10_000, T0 + 2_000)
        .await
        .unwrap();
    let (_, _, nodes) = append_new(&store, &ordered(ROOM, b"e4", T0 + 2_000)).await;
    assert_eq!(nodes, names(&["node-a", "node-c"]));

    // Past every lease, nobody is left.
    assert!(store.nodes(ROOM, T0 + 20_000).await.unwrap().is_empty());
    let (_, offset, nodes) = append_new(&store, &ordered(ROOM, b"e5", T0 + 20_000)).await;
    assert!(nodes.is_empty(), "{nodes:?}");
    assert_eq!(offset, 5);
}

async fn renew_sums_live_viewers_and_elects_one_reporter(backend: HotBackend) {
    let store = backend.store(settings(100));
    let head = store.join(ROOM, "node-b", 5, 10_000, T0).await.unwrap();
    let epoch = head.epoch;
    store.join(ROOM, "node-c", 7, 10_000, T0).await.unwrap();
    append_new(&store, &ordered(ROOM, b"e1", T0)).await;
    append_new(&store, &ordered(ROOM, b"e2", T0)).await;

    let renewed = renew_one(&store, "node-c", ROOM, 8, 10_000, T0 + 100).await;
    assert_eq!(
        renewed,
        Renewed {
            viewers: 5 + 8,
            reporter: false,
            epoch,
            offset: 2,
        }
    );
    let renewed = renew_one(&store, "node-b", ROOM, 6, 10_000, T0 + 200).await;
    assert_eq!(
        renewed,
        Renewed {
            viewers: 6 + 8,
            reporter: true,
            epoch,
            offset: 2,
        }
    );

    // node-a, the smallest id, joins with a short lease (until T0 + 1300).
    store
        .join(ROOM, "node-a", 3, 1_000, T0 + 300)
        .await
        .unwrap();
    append_new(&store, &ordered(ROOM, b"e3", T0 + 300)).await;
    let now = T0 + 400;
    let mut reporters = Vec::new();
    for (node, viewers, lease) in [
        ("node-a", 3, 1_000),
        ("node-b", 6, 10_000),
        ("node-c", 8, 10_000),
    ] {
        let renewed = renew_one(&store, node, ROOM, viewers, lease, now).await;
        assert_eq!(
            (renewed.viewers, renewed.epoch, renewed.offset),
            (17, epoch, 3)
        );
        if renewed.reporter {
            reporters.push(node);
        }
    }
    assert_eq!(
        reporters,
        ["node-a"],
        "exactly one reporter, the smallest id"
    );

    // At T0 + 1500 node-a's lease (renewed until T0 + 1400) has ended and it
    // does not renew: its count is dropped, and node-b reports again.
    let now = T0 + 1_500;
    let b = renew_one(&store, "node-b", ROOM, 6, 10_000, now).await;
    let c = renew_one(&store, "node-c", ROOM, 8, 10_000, now).await;
    assert_eq!((b.viewers, b.reporter), (14, true));
    assert_eq!((c.viewers, c.reporter), (14, false));
    assert_eq!(
        store.nodes(ROOM, now).await.unwrap().len(),
        2,
        "node-a has expired"
    );

    // One call renews several rooms (on a Cluster, several slots); results
    // come in the order given.
    let other = store
        .join(OTHER_ROOM, "node-z", 2, 10_000, now)
        .await
        .unwrap();
    let results = store
        .renew("node-b", &[(ROOM, 1), (OTHER_ROOM, 4)], 10_000, now + 1)
        .await;
    let results: Vec<Renewed> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        results,
        [
            Renewed {
                viewers: 1 + 8,
                reporter: true,
                epoch,
                offset: 3,
            },
            Renewed {
                viewers: 4 + 2,
                reporter: true,
                epoch: other.epoch,
                offset: 0,
            },
        ]
    );
}

async fn join_creates_the_epoch_that_appends_continue(backend: HotBackend) {
    let store = backend.store(settings(100));
    let head = store.join(ROOM, "node-a", 1, 60_000, T0).await.unwrap();
    assert_ne!(head.epoch, 0);
    assert_eq!(
        head,
        Head {
            epoch: head.epoch,
            offset: 0,
            ended: false,
            latest: Vec::new(),
        }
    );
    assert_eq!(store.history(ROOM, 0, 10).await.unwrap().epoch, head.epoch);

    // Much later, the first append continues the joined epoch instead of
    // starting one of its own.
    let (epoch, offset, nodes) = append_new(&store, &ordered(ROOM, b"e1", T0 + 5_000)).await;
    assert_eq!((epoch, offset), (head.epoch, 1));
    assert_eq!(nodes, names(&["node-a"]));

    let again = store
        .join(ROOM, "node-b", 1, 60_000, T0 + 6_000)
        .await
        .unwrap();
    assert_eq!((again.epoch, again.offset), (head.epoch, 1));
}

async fn rooms_are_independent(backend: HotBackend) {
    let store = backend.store(settings(100));
    for expected in 1..=3 {
        let (_, offset, _) = append_new(&store, &ordered(ROOM, b"in room", T0)).await;
        assert_eq!(offset, expected);
    }
    store.join(ROOM, "node-a", 1, 10_000, T0).await.unwrap();
    append_new(&store, &keyed(ordered(ROOM, b"keyed", T0), "k")).await;
    let end = Append {
        ends_room: true,
        ..keyed(ordered(ROOM, b"room ended", T0), ROOM_ENDED_KEY)
    };
    append_new(&store, &end).await;

    // The other room: its own offsets, no nodes, keys unseen, not ended.
    let (_, offset, nodes) = append_new(&store, &ordered(OTHER_ROOM, b"other", T0)).await;
    assert_eq!(offset, 1);
    assert!(nodes.is_empty(), "{nodes:?}");
    let (_, offset, _) = append_new(&store, &keyed(ordered(OTHER_ROOM, b"k", T0), "k")).await;
    assert_eq!(offset, 2);
    append_new(&store, &latest(OTHER_ROOM, "love_total", b"7", T0)).await;
    assert!(store.nodes(OTHER_ROOM, T0).await.unwrap().is_empty());
    assert_eq!(
        all_history(&store, OTHER_ROOM).await,
        entries(&[(1, b"other".as_slice()), (2, b"k".as_slice())])
    );
    let head = store
        .join(OTHER_ROOM, "node-b", 1, 10_000, T0)
        .await
        .unwrap();
    assert_eq!((head.offset, head.ended), (2, false));
    assert_eq!(head.latest, entries(&[(2, b"7".as_slice())]));

    // And the first room saw none of it.
    assert_eq!(store.nodes(ROOM, T0).await.unwrap(), names(&["node-a"]));
    let head = store.join(ROOM, "node-a", 1, 10_000, T0).await.unwrap();
    assert_eq!((head.offset, head.ended), (5, true));
    assert!(head.latest.is_empty(), "{:?}", head.latest);
    assert_eq!(all_history(&store, ROOM).await.len(), 5);
}

async fn concurrent_appends_get_distinct_gap_free_offsets(backend: HotBackend) {
    const APPENDS: u64 = 200;
    let store = backend.store(settings(256));
    let tasks: Vec<_> = (0..APPENDS)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let payload = format!("event {i}").into_bytes();
                let now = T0 + i64::try_from(i).unwrap();
                let (epoch, offset, _) = append_new(&store, &ordered(ROOM, &payload, now)).await;
                (epoch, offset, payload)
            })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let epoch = results[0].0;
    assert!(
        results.iter().all(|(e, _, _)| *e == epoch),
        "one epoch: {:?}",
        results.iter().map(|(e, _, _)| e).collect::<Vec<_>>()
    );
    let mut stored: Vec<(u64, Vec<u8>)> = results
        .into_iter()
        .map(|(_, offset, payload)| (offset, payload))
        .collect();
    stored.sort();
    let offsets: Vec<u64> = stored.iter().map(|(offset, _)| *offset).collect();
    assert_eq!(offsets, (1..=APPENDS).collect::<Vec<_>>());
    // Each event is stored at the offset its append was told.
    assert_eq!(all_history(&store, ROOM).await, stored);
}

/// With `wait_replicas`, an append is acknowledged once the replicas have
/// it: on the harness's Cluster (one replica per master) that is at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_an_append_is_acknowledged_once_a_replica_has_it() {
    let url = livemesh_testkit::redis_cluster_urls().join(",");
    let store = FanoutStore::redis(
        &url,
        FanoutSettings {
            wait_replicas: 1,
            wait_timeout_ms: 2_000,
            ..settings(100)
        },
    )
    .unwrap();
    let (_, offset, _) = append_new(&store, &ordered(ROOM, b"e1", T0)).await;
    assert_eq!(offset, 1);
    assert_eq!(all_history(&store, ROOM).await, vec![(1, b"e1".to_vec())]);
}

/// A standalone Redis has no replica: an append that asks for one is
/// UNAVAILABLE, saying so; the event may be stored, and a retry with the
/// same idempotency key finds it rather than storing it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_no_replica_acknowledged_is_unavailable_and_its_retry_is_a_duplicate() {
    let store = FanoutStore::redis(
        &livemesh_testkit::redis_url(),
        FanoutSettings {
            wait_replicas: 1,
            wait_timeout_ms: 50,
            ..settings(100)
        },
    )
    .unwrap();
    let append = keyed(ordered(ROOM, b"e1", T0), "k1");
    let first = store.append(&append).await;
    let Err(StoreError::Unavailable(message)) = &first else {
        panic!("expected Unavailable, got {first:?}");
    };
    assert!(
        message.contains("0 of 1 replicas acknowledged within 50 ms"),
        "{message}"
    );
    assert!(
        matches!(
            store.append(&append).await.unwrap(),
            Appended::Duplicate { offset: 1, .. }
        ),
        "the retry finds the stored event"
    );
    assert_eq!(all_history(&store, ROOM).await, vec![(1, b"e1".to_vec())]);
}

/// Nothing listens on port 1: every call fails as `Unavailable`, quickly.
#[tokio::test]
async fn unreachable_redis_is_unavailable_quickly() {
    let store =
        FanoutStore::redis("redis://127.0.0.1:1", settings(100)).expect("connecting is lazy");
    every_call_is_unavailable_quickly(&store).await;
}

/// A Cluster whose seeds are all down fails the same way.
#[tokio::test]
async fn unreachable_cluster_is_unavailable_quickly() {
    let store = FanoutStore::redis("redis://127.0.0.1:1,redis://127.0.0.1:2", settings(100))
        .expect("connecting is lazy");
    every_call_is_unavailable_quickly(&store).await;
}

async fn every_call_is_unavailable_quickly(store: &FanoutStore) {
    assert!(!store.is_memory());
    // Far above the store's own bounds (1 s to connect, 1 s per command):
    // reaching it means a call hung.
    let bound = Duration::from_secs(5);
    let within = |what: &'static str, started: Instant| {
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(3), "{what} took {elapsed:?}");
    };

    let started = Instant::now();
    let appended = tokio::time::timeout(bound, store.append(&ordered(ROOM, b"e", T0)))
        .await
        .expect("append hung");
    within("append", started);
    let Err(StoreError::Unavailable(message)) = appended else {
        panic!("expected Unavailable, got {appended:?}");
    };
    assert!(
        message.contains("127.0.0.1:1"),
        "names the server: {message}"
    );

    let started = Instant::now();
    let joined = tokio::time::timeout(bound, store.join(ROOM, "node-a", 1, 1_000, T0))
        .await
        .expect("join hung");
    within("join", started);
    assert!(
        matches!(joined, Err(StoreError::Unavailable(_))),
        "{joined:?}"
    );

    let started = Instant::now();
    let heads = tokio::time::timeout(bound, store.heads(&[ROOM, OTHER_ROOM]))
        .await
        .expect("heads hung");
    within("heads", started);
    assert!(
        heads
            .iter()
            .all(|head| matches!(head, Err(StoreError::Unavailable(_)))),
        "{heads:?}"
    );

    let started = Instant::now();
    let history = tokio::time::timeout(bound, store.history(ROOM, 0, 10))
        .await
        .expect("history hung");
    within("history", started);
    assert!(
        matches!(history, Err(StoreError::Unavailable(_))),
        "{history:?}"
    );

    let started = Instant::now();
    let renewed = tokio::time::timeout(
        bound,
        store.renew("node-a", &[(ROOM, 1), (OTHER_ROOM, 1)], 1_000, T0),
    )
    .await
    .expect("renew hung");
    within("renew", started);
    assert_eq!(renewed.len(), 2, "one result per room");
    assert!(
        renewed
            .iter()
            .all(|r| matches!(r, Err(StoreError::Unavailable(_)))),
        "{renewed:?}"
    );

    let started = Instant::now();
    let nodes = tokio::time::timeout(bound, store.nodes(ROOM, T0))
        .await
        .expect("nodes hung");
    let left = tokio::time::timeout(bound, store.leave(ROOM, "node-a"))
        .await
        .expect("leave hung");
    let pinged = tokio::time::timeout(bound, store.ping())
        .await
        .expect("ping hung");
    within("nodes, leave and ping", started);
    assert!(
        matches!(nodes, Err(StoreError::Unavailable(_))),
        "{nodes:?}"
    );
    assert!(matches!(left, Err(StoreError::Unavailable(_))), "{left:?}");
    assert!(
        matches!(pinged, Err(StoreError::Unavailable(_))),
        "{pinged:?}"
    );
}

/// `stored_rooms` counts rooms, not keys: a room with history, latest
/// values, nodes and idempotency keys is one; a room only joined is one.
async fn stored_rooms_counts_each_room_with_state_once(backend: HotBackend) {
    let store = backend.store(settings(100));
    assert_eq!(store.stored_rooms().await.unwrap(), 0);
    append_new(&store, &keyed(ordered(ROOM, b"a", T0), "k")).await;
    append_new(&store, &latest(ROOM, "love_total", b"7", T0)).await;
    store.join(ROOM, "node-a", 1, 10_000, T0).await.unwrap();
    assert_eq!(store.stored_rooms().await.unwrap(), 1);
    store
        .join(OTHER_ROOM, "node-a", 1, 10_000, T0)
        .await
        .unwrap();
    assert_eq!(store.stored_rooms().await.unwrap(), 2);
    // Another phase on the same server is not counted.
    let other = backend.store(settings(100));
    append_new(&other, &ordered(ROOM, b"elsewhere", T0)).await;
    assert_eq!(store.stored_rooms().await.unwrap(), 2);
    assert_eq!(other.stored_rooms().await.unwrap(), 1);
}
