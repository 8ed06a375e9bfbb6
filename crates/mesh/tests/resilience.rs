//! Breakers, retry budgets and load shedding against real peers: a
//! black-holed one (accepts TCP, never answers), a closed port, and real
//! tonic servers with scripted answers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use livemesh_mesh::breaker::{BreakerState, breaker_state};
use livemesh_mesh::config::{ClientConfig, ServerConfig};
use livemesh_mesh::server::{ServerBuilder, ServiceSet, serve_set_with};
use livemesh_mesh::{ClientStack, MeshChannel, Shutdown};
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::ongoing_query_service_server::{
    OngoingQueryService, OngoingQueryServiceServer,
};
use livemesh_proto::v1::{
    GetRoomRequest, GetRoomResponse, ListOngoingRequest, ListOngoingResponse, PartitionRequest,
    PartitionResponse, Room, RoomStatus, WatchRequest, WatchResponse,
};
use livemesh_rooms::RoomDirectory;
use tokio::sync::Semaphore;
use tonic::{Code, Request, Response, Status};

/// How the scripted peer answers GetRoom.
#[derive(Clone)]
enum Answer {
    Ok,
    Fail(Code),
    /// UNAVAILABLE for the first `n` calls, then OK.
    UnavailableFirst(u64),
    /// Waits for a permit of the semaphore (the test hands them out).
    Hold(Arc<Semaphore>),
    /// Like `Hold`, then answers with the room asked for, ongoing.
    Room(Arc<Semaphore>),
}

struct Scripted {
    answer: Mutex<Answer>,
    calls: AtomicU64,
}

#[derive(Clone)]
struct Peer(Arc<Scripted>);

impl Peer {
    fn new(answer: Answer) -> Self {
        Peer(Arc::new(Scripted {
            answer: Mutex::new(answer),
            calls: AtomicU64::new(0),
        }))
    }

    fn calls(&self) -> u64 {
        self.0.calls.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl OngoingQueryService for Peer {
    async fn get_room(
        &self,
        request: Request<GetRoomRequest>,
    ) -> Result<Response<GetRoomResponse>, Status> {
        let n = self.0.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let answer = self.0.answer.lock().unwrap().clone();
        match answer {
            Answer::Ok => Ok(Response::new(GetRoomResponse::default())),
            Answer::Fail(code) => Err(Status::new(code, "scripted failure")),
            Answer::UnavailableFirst(k) if n <= k => Err(Status::unavailable("warming up")),
            Answer::UnavailableFirst(_) => Ok(Response::new(GetRoomResponse::default())),
            Answer::Hold(gate) => {
                gate.acquire().await.unwrap().forget();
                Ok(Response::new(GetRoomResponse::default()))
            }
            Answer::Room(gate) => {
                gate.acquire().await.unwrap().forget();
                Ok(Response::new(GetRoomResponse {
                    room: Some(Room {
                        room_id: request.get_ref().room_id,
                        anchor_id: 1,
                        status: RoomStatus::Ongoing.into(),
                        ..Room::default()
                    }),
                }))
            }
        }
    }

    async fn list_ongoing(
        &self,
        _request: Request<ListOngoingRequest>,
    ) -> Result<Response<ListOngoingResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    async fn partition(
        &self,
        _request: Request<PartitionRequest>,
    ) -> Result<Response<PartitionResponse>, Status> {
        Err(Status::unimplemented("not scripted"))
    }

    type WatchStream = futures::stream::Pending<Result<WatchResponse, Status>>;

    /// A stream that stays open and silent: a long-lived streaming call.
    async fn watch(
        &self,
        _request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(futures::stream::pending()))
    }
}

impl ServiceSet for Peer {
    fn register(&self, server: &mut ServerBuilder) {
        server.add_service(OngoingQueryServiceServer::new(self.clone()));
    }
}

struct Running {
    shutdown: Shutdown,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.trigger();
        self.task.await.unwrap();
    }
}

/// Serves `peer` on `addr` with the given `[server]` limits.
async fn serve(peer: Peer, addr: SocketAddr, limits: ServerConfig) -> (Running, SocketAddr) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = Shutdown::new();
    let signal = shutdown.signal();
    let task = tokio::spawn(async move {
        serve_set_with(peer, listener, signal, &limits)
            .await
            .unwrap();
    });
    (Running { shutdown, task }, addr)
}

/// Quick to trip and to recover, so the tests take fractions of seconds.
fn fast_breaker() -> ClientConfig {
    ClientConfig {
        request_timeout_ms: 200,
        breaker_window_ms: 5_000,
        breaker_min_calls: 3,
        breaker_failure_rate: 0.5,
        breaker_open_ms: 300,
        breaker_half_open_calls: 1,
        ..ClientConfig::default()
    }
}

fn client(stack: &ClientStack, uri: &str) -> OngoingQueryServiceClient<MeshChannel> {
    OngoingQueryServiceClient::new(stack.channel(uri).unwrap())
}

async fn get_room(client: &mut OngoingQueryServiceClient<MeshChannel>) -> Result<(), Status> {
    client
        .get_room(GetRoomRequest { room_id: 1 })
        .await
        .map(|_| ())
}

/// Calls until the breaker of `uri` is open, within a deadline.
async fn until_open(client: &mut OngoingQueryServiceClient<MeshChannel>, uri: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while breaker_state(uri) != Some(BreakerState::Open) {
        assert!(
            Instant::now() < deadline,
            "the breaker of {uri} never opened"
        );
        let _ = get_room(client).await;
    }
}

/// An open breaker answers UNAVAILABLE naming the peer, without waiting.
async fn assert_rejected_at_once(client: &mut OngoingQueryServiceClient<MeshChannel>, uri: &str) {
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let status = get_room(client).await.unwrap_err();
        slowest = slowest.max(started.elapsed());
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(
            status.message().contains("circuit") && status.message().contains(uri),
            "{status:?}"
        );
    }
    assert!(
        slowest < Duration::from_millis(10),
        "an open breaker took {slowest:?} to reject a call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_black_holed_peer_trips_the_breaker_which_recovers_when_the_peer_does() {
    // Accepts TCP connections and never speaks.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = hole.local_addr().unwrap();
    let uri = format!("http://{addr}");
    let holding = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hole.accept().await {
            held.push(socket);
        }
    });
    let stack = ClientStack::new(&fast_breaker());
    let mut peer = client(&stack, &uri);
    let status = get_room(&mut peer).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    until_open(&mut peer, &uri).await;
    assert_rejected_at_once(&mut peer, &uri).await;

    // The peer comes back on the same port: probes get through after the
    // open time, and their success closes the breaker.
    holding.abort();
    let _ = holding.await;
    let scripted = Peer::new(Answer::Ok);
    let (server, _) = serve(scripted.clone(), addr, ServerConfig::default()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while get_room(&mut peer).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the breaker never let a probe through"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(breaker_state(&uri), Some(BreakerState::Closed));
    get_room(&mut peer).await.unwrap();
    assert!(scripted.calls() >= 2);
    server.stop().await;
}

#[tokio::test]
async fn a_closed_port_trips_the_breaker() {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let uri = format!("http://{addr}");
    let stack = ClientStack::new(&fast_breaker());
    let mut peer = client(&stack, &uri);
    let status = get_room(&mut peer).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    until_open(&mut peer, &uri).await;
    assert_rejected_at_once(&mut peer, &uri).await;
}

#[tokio::test]
async fn failing_answers_trip_the_breaker_but_client_errors_do_not() {
    let scripted = Peer::new(Answer::Fail(Code::InvalidArgument));
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let (server, addr) = serve(scripted.clone(), any, ServerConfig::default()).await;
    let uri = format!("http://{addr}");
    let stack = ClientStack::new(&fast_breaker());
    let mut peer = client(&stack, &uri);
    for _ in 0..20 {
        let status = get_room(&mut peer).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    assert_eq!(scripted.calls(), 20, "every call reached the peer");
    assert_eq!(breaker_state(&uri), Some(BreakerState::Closed));

    // The same peer failing for real: INTERNAL is its own trouble.
    *scripted.0.answer.lock().unwrap() = Answer::Fail(Code::Internal);
    until_open(&mut peer, &uri).await;
    let reached = scripted.calls();
    assert_rejected_at_once(&mut peer, &uri).await;
    assert_eq!(scripted.calls(), reached, "an open breaker sends nothing");
    server.stop().await;
}

#[tokio::test]
async fn slow_answers_trip_the_breaker() {
    let gate = Arc::new(Semaphore::new(0));
    let scripted = Peer::new(Answer::Hold(gate.clone()));
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let (server, addr) = serve(scripted.clone(), any, ServerConfig::default()).await;
    let uri = format!("http://{addr}");
    let stack = ClientStack::new(&ClientConfig {
        request_timeout_ms: 5_000,
        breaker_slow_call_ms: 50,
        breaker_slow_call_rate: 0.5,
        ..fast_breaker()
    });
    let mut peer = client(&stack, &uri);
    // Each call is answered, successfully, but only after 80 ms.
    let releaser = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(80)).await;
            gate.add_permits(1);
        }
    });
    for _ in 0..3 {
        get_room(&mut peer).await.unwrap();
    }
    assert_eq!(breaker_state(&uri), Some(BreakerState::Open));
    let status = get_room(&mut peer).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    releaser.abort();
    server.stop().await;
}

#[tokio::test]
async fn an_unavailable_answer_is_retried_within_the_budget() {
    let scripted = Peer::new(Answer::UnavailableFirst(2));
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let (server, addr) = serve(scripted.clone(), any, ServerConfig::default()).await;
    let stack = ClientStack::new(&ClientConfig {
        max_retries: 2,
        ..ClientConfig::default()
    });
    let mut peer = client(&stack, &format!("http://{addr}"));
    get_room(&mut peer).await.unwrap();
    assert_eq!(scripted.calls(), 3, "two retries, then the answer");
    server.stop().await;
}

#[tokio::test]
async fn a_retry_storm_is_bounded_by_the_budget() {
    let scripted = Peer::new(Answer::Fail(Code::Unavailable));
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let (server, addr) = serve(scripted.clone(), any, ServerConfig::default()).await;
    // The breaker is kept out of the way (it would stop the storm itself).
    let config = ClientConfig {
        breaker_min_calls: 1_000_000,
        retry_budget_percent: 20,
        retry_min_per_sec: 1,
        max_retries: 3,
        retry_backoff_ms: 1,
        ..ClientConfig::default()
    };
    let stack = ClientStack::new(&config);
    let mut peer = client(&stack, &format!("http://{addr}"));
    let calls = 100;
    for _ in 0..calls {
        let status = get_room(&mut peer).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let attempts = scripted.calls();
    // Without the budget: 4 attempts a call. With it: the calls, 20% of
    // them, and the reserve of 1 a second over the budget's 10 s memory.
    let bound = calls + calls / 5 + 10;
    assert!(
        attempts > calls && attempts <= bound,
        "{attempts} attempts for {calls} calls (at most {bound} allowed)"
    );
    server.stop().await;
}

#[tokio::test]
async fn past_the_limit_a_call_is_shed_with_unavailable_and_streams_hold_no_permit() {
    let gate = Arc::new(Semaphore::new(0));
    let scripted = Peer::new(Answer::Hold(gate.clone()));
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let limits = ServerConfig {
        max_concurrent_requests: 1,
        ..ServerConfig::default()
    };
    let (server, addr) = serve(scripted.clone(), any, limits).await;
    let uri = format!("http://{addr}");
    let stack = ClientStack::new(&ClientConfig {
        max_retries: 0,
        ..ClientConfig::default()
    });

    // A long-lived stream is open the whole time: it must not use up the limit.
    let mut watcher = client(&stack, &uri);
    let stream = watcher
        .watch(WatchRequest::default())
        .await
        .unwrap()
        .into_inner();

    let mut first = client(&stack, &uri);
    let held = tokio::spawn(async move { get_room(&mut first).await });
    let deadline = Instant::now() + Duration::from_secs(10);
    while scripted.calls() == 0 {
        assert!(Instant::now() < deadline, "the first call never arrived");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut second = client(&stack, &uri);
    let status = get_room(&mut second).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("server overloaded"), "{status:?}");
    assert_eq!(
        scripted.calls(),
        1,
        "the shed call never reached the handler"
    );

    // Health is answered even at the limit.
    let channel = tonic::transport::Endpoint::from_shared(uri.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();

    gate.add_permits(1);
    held.await.unwrap().unwrap();
    gate.add_permits(1);
    get_room(&mut second).await.unwrap();
    drop(stream);
    server.stop().await;
}

#[tokio::test]
async fn a_storm_of_lookups_of_one_room_makes_one_get_room_call() {
    let gate = Arc::new(Semaphore::new(0));
    let peer = Peer::new(Answer::Room(gate.clone()));
    let (server, addr) = serve(
        peer.clone(),
        "127.0.0.1:0".parse().unwrap(),
        ServerConfig::default(),
    )
    .await;
    let stack = ClientStack::new(&ClientConfig::default());
    let rooms = Arc::new(RoomDirectory::new(
        stack.channel(&format!("http://{addr}")).unwrap(),
    ));
    // A thousand Subscribes to one room opening at once (as a node sees when
    // a big room's viewers reconnect).
    let lookups: Vec<_> = (0..1_000)
        .map(|_| {
            let rooms = rooms.clone();
            tokio::spawn(async move { rooms.get(7).await })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while peer.calls() == 0 {
        assert!(Instant::now() < deadline, "no GetRoom reached the peer");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    gate.add_permits(1_000);
    for lookup in lookups {
        let info = lookup.await.unwrap().expect("the room");
        assert_eq!((info.room_id, info.ended), (7, false));
    }
    assert_eq!(
        peer.calls(),
        1,
        "every lookup shares the one call in flight"
    );
    // Known now: answered without asking.
    rooms.get(7).await.expect("the room");
    assert_eq!(peer.calls(), 1);
    server.stop().await;
}
