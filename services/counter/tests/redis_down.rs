//! Redis killed and restarted under love load: the counter keeps accepting,
//! holds its writes, replays them when Redis is back, loses nothing and
//! counts nothing twice; past its bound it answers UNAVAILABLE.

// Helpers outside #[test] functions unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::Ordering;
use std::time::Duration;

use livemesh_counter::Counter;
use livemesh_mesh::{Config, MeshChannel};
use livemesh_ongoing_query::OngoingQuery;
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::{SendLovesRequest, StartRoomRequest};
use livemesh_testkit::{PrivateRedis, TestServer};

struct Setup {
    _dir: tempfile::TempDir,
    _rooms: TestServer,
    _server: TestServer,
    counter: Counter,
    loves: CounterServiceClient<MeshChannel>,
    room: u64,
}

async fn setup(redis: &PrivateRedis, max_pending: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let rooms_config = Config {
        data_dir: dir.path().to_owned(),
        ..Config::default()
    };
    let rooms = TestServer::start(OngoingQuery::from_config(&rooms_config).await.unwrap()).await;
    let room = RoomAdminServiceClient::new(rooms.channel())
        .start_room(StartRoomRequest { anchor_id: 1 })
        .await
        .unwrap()
        .into_inner()
        .room
        .unwrap()
        .room_id;
    let mut config = Config {
        data_dir: dir.path().to_owned(),
        redis_url: Some(redis.url()),
        ..Config::default()
    };
    config.counter.ongoing_query_url = format!("http://{}", rooms.addr);
    config.counter.publish_url = format!("http://{}", rooms.addr);
    config.counter.flush_tick_ms = 5;
    config.counter.max_pending_loves = max_pending;
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
        while self.counter.inner().core.waiting() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "writes still waiting after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
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
    assert!(
        s.counter.inner().core.waiting() > 0,
        "held while Redis is down"
    );
    // Some flushes fail while Redis is gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while s
        .counter
        .inner()
        .core
        .stats()
        .flush_failures
        .load(Ordering::Relaxed)
        == 0
    {
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
    let store = s.counter.inner().core.store();
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
    assert_eq!(
        s.counter.inner().core.store().total(s.room).await.unwrap(),
        30
    );
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
