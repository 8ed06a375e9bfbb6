//! One black-holed subscribe node (accepts TCP, never answers) among
//! healthy ones: once its breaker is open, publishing to the others is as
//! fast as without it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use livemesh_fanout::FanoutConfig;
use livemesh_fanout::{FanoutSettings, FanoutStore};
use livemesh_mesh::ClientStack;
use livemesh_mesh::breaker::BreakerState;
use livemesh_mesh::config::ClientConfig;
use livemesh_mesh::server::{ServerBuilder, ServiceSet};
use livemesh_proto::v1::subscribe_service_server::{SubscribeService, SubscribeServiceServer};
use livemesh_proto::v1::{
    Comment, DeliverRequest, DeliverResponse, PublishRequest, RoomEvent, SubscribeRequest,
    SubscribeResponse, room_event,
};
use livemesh_publish::testing::{DispatcherInner, DispatcherSettings};
use livemesh_rooms::{RoomDirectory, RoomInfo};
use livemesh_testkit::TestServer;
use tonic::{Request, Response, Status};

/// A subscribe node that counts the Delivers it answers.
#[derive(Clone, Default)]
struct CountingNode(Arc<AtomicU64>);

#[tonic::async_trait]
impl SubscribeService for CountingNode {
    type SubscribeStream = futures::stream::Empty<Result<SubscribeResponse, Status>>;

    async fn subscribe(
        &self,
        _request: Request<SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        Err(Status::unimplemented("a Deliver-only test node"))
    }

    async fn deliver(
        &self,
        _request: Request<DeliverRequest>,
    ) -> Result<Response<DeliverResponse>, Status> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(DeliverResponse::default()))
    }
}

impl ServiceSet for CountingNode {
    fn register(&self, server: &mut ServerBuilder) {
        server.add_service(SubscribeServiceServer::new(self.clone()));
    }
}

fn comment(room_id: u64, n: usize) -> PublishRequest {
    PublishRequest {
        room_id,
        event: Some(RoomEvent {
            kind: Some(room_event::Kind::Comment(Comment {
                text: format!("comment {n}"),
                ..Comment::default()
            })),
            ..RoomEvent::default()
        }),
        idempotency_key: None,
        forwarded_from: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_keeps_a_black_holed_node_from_slowing_publishes() {
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", hole.local_addr().unwrap());
    let holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            held.push(socket);
        }
    });
    let delivered = CountingNode::default();
    let healthy = TestServer::start(delivered.clone()).await;
    let healthy_url = format!("http://{}", healthy.addr);

    let store = FanoutStore::memory(FanoutSettings::from(&FanoutConfig::default()));
    let room = 7;
    let now = livemesh_mesh::now_ms();
    for node in [&dead, &healthy_url] {
        store.join(room, node, 1, 600_000, now).await.unwrap();
    }
    let client = ClientConfig {
        breaker_open_ms: 300,
        ..ClientConfig::default()
    };
    let dispatcher = Arc::new(
        DispatcherInner::new(
            DispatcherSettings {
                datacenter: "local".into(),
                peers: Vec::new(),
                deliver_timeout: Duration::from_millis(200),
                max_comment_chars: 100,
            },
            store,
            ClientStack::new(&client),
            RoomDirectory::fixed([RoomInfo {
                room_id: room,
                anchor_id: 1,
                started_at_ms: now,
                ended: false,
            }]),
        )
        .unwrap(),
    );

    // Publishing concurrently until the dead node's breaker opens: each
    // Deliver to it times out after 200 ms and counts against it.
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut n = 0;
    while dispatcher.node_breaker(&dead) != Some(BreakerState::Open) {
        assert!(
            Instant::now() < deadline,
            "the dead node's breaker never opened"
        );
        let batch = (0..5).map(|i| dispatcher.publish(comment(room, n + i)));
        for reply in futures::future::join_all(batch).await {
            reply.unwrap();
        }
        n += 5;
    }
    assert_eq!(
        dispatcher.node_breaker(&healthy_url),
        Some(BreakerState::Closed)
    );

    // Now publishes reach the healthy node without waiting for the dead
    // one: while its breaker is open (rejected at once), and while it is
    // half-open, its probe (which waits out the 200 ms Deliver timeout)
    // going out in the background.
    let before = delivered.0.load(Ordering::SeqCst);
    let mut slowest = Duration::ZERO;
    let mut published = 0;
    let mut probed = false;
    let until = Instant::now() + Duration::from_millis(1_000);
    while Instant::now() < until || !probed {
        assert!(Instant::now() < deadline, "no probe went to the dead node");
        let started = Instant::now();
        let reply = dispatcher
            .publish(comment(room, n + published))
            .await
            .unwrap();
        slowest = slowest.max(started.elapsed());
        assert_eq!(reply.nodes, 1, "handed to the healthy node only");
        published += 1;
        probed |= dispatcher.node_breaker(&dead) == Some(BreakerState::HalfOpen);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        delivered.0.load(Ordering::SeqCst),
        before + published as u64
    );
    assert!(
        slowest < Duration::from_millis(100),
        "a publish took {slowest:?} with the dead node's breaker open or half-open \
         (its Deliver timeout is 200 ms)"
    );
    holding.abort();
    healthy.stop().await;
}
