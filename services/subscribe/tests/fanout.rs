//! Fan-out end to end: 3 subscribe nodes and 2 dispatchers, each its own
//! server on a loopback port, rooms from a real ongoing-query server, for
//! each fan-out store: in process, the harness's Redis, its Redis Cluster.

// Helpers outside #[test] functions unwrap too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use livemesh_fanout::{Append, Appended, FanoutSettings, FanoutStore, Slot};
use livemesh_mesh::{Config, MeshChannel};
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{
    Comment, GiftSent, LoveTotal, PublishBatchRequest, PublishRequest, RoomEvent, StreamPosition,
    StreamStarted, SubscribeRequest, SubscribeResponse, room_event, subscribe_response,
};
use livemesh_publish::Dispatcher;
use livemesh_publish::PublishConfig;
use livemesh_subscribe::SubscribeConfig;
use livemesh_subscribe::SubscribeNode;
use livemesh_subscribe::{RESUME_EPOCH, RESUME_OFFSET};
use livemesh_testkit::{HotBackend, ProxyMode, TcpProxy, TestServer};
use prost::Message as _;
use tonic::Streaming;

livemesh_testkit::hot_backend_suite!(
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    only_nodes_with_viewers_get_deliver,
    a_killed_stream_resumes_with_every_ordered_event_once_in_order,
    resumes_under_concurrent_publishing_have_no_gap_and_no_duplicate,
    a_slow_consumer_gets_the_latest_love_total_not_a_backlog,
    an_overflowing_stream_ends_with_its_resume_position,
    viewer_counts_add_up_across_nodes,
    room_end_closes_the_streams_and_the_registrations,
    cross_datacenter_forwarding_delivers_once,
    bad_requests_get_precise_codes,
    a_dead_nodes_registration_expires,
    the_last_viewer_leaving_takes_the_node_out_of_the_room,
    publishes_to_rooms_never_started_store_nothing_and_poison_nothing,
    only_a_dispatcher_ends_a_room_and_only_the_gift_settler_publishes_gifts,
    a_batch_publishes_each_event_as_publish_would_and_answers_each_in_its_place,
    a_resume_past_the_head_is_out_of_range,
    batched_delivery_keeps_order_and_resumes_from_a_batch_without_gap_or_duplicate,
    batched_delivery_conflates_latest_values,
    an_overflowing_batched_stream_ends_with_its_resume_position,
    an_event_appended_without_deliver_reaches_viewers_within_the_bound,
    only_streams_that_ask_get_their_write_times,
);

const WAIT: Duration = Duration::from_secs(15);

fn store(backend: HotBackend, phase: &str) -> FanoutStore {
    let settings = FanoutSettings {
        phase: phase.to_owned(),
        ..FanoutSettings::default()
    };
    match backend.redis_url() {
        None => FanoutStore::memory(settings),
        Some(url) => FanoutStore::redis(&url, settings).unwrap(),
    }
}

struct Mesh {
    _dir: tempfile::TempDir,
    rooms: TestServer,
    store: FanoutStore,
    phase: String,
    nodes: Vec<(TestServer, SubscribeNode)>,
    dispatchers: Vec<(TestServer, Dispatcher)>,
}

/// The settings every test mesh uses: fast reports, small queues.
fn base_config(dir: &std::path::Path, rooms: &TestServer) -> Config {
    let mut config = livemesh_testkit::config_in(dir);
    config.section_mut::<SubscribeConfig>().ongoing_query_url = rooms.url();
    config.section_mut::<PublishConfig>().ongoing_query_url = rooms.url();
    let subscribe_section = config.section_mut::<SubscribeConfig>();
    subscribe_section.report_interval_ms = 100;
    subscribe_section.lease_ms = 1_000;
    subscribe_section.gap_wait_ms = 20;
    subscribe_section.queue_len = 32;
    config
}

async fn start_dispatcher(config: &Config, store: &FanoutStore) -> (TestServer, Dispatcher) {
    let mut handle = None;
    let server = TestServer::start_with(|addr| {
        let mut config = config.clone();
        config.listen = addr;
        let dispatcher = Dispatcher::from_config(&config, store.clone());
        handle = dispatcher.as_ref().ok().cloned();
        async move { dispatcher }
    })
    .await;
    (server, handle.unwrap())
}

async fn start_node(
    config: &Config,
    store: &FanoutStore,
    dispatcher: &TestServer,
) -> (TestServer, SubscribeNode) {
    let mut handle = None;
    let server = TestServer::start_with(|addr| {
        let mut config = config.clone();
        config.listen = addr;
        config.section_mut::<SubscribeConfig>().publish_url = dispatcher.url();
        let node = SubscribeNode::from_config(&config, store.clone());
        handle = node.as_ref().ok().cloned();
        async move { node }
    })
    .await;
    (server, handle.unwrap())
}

async fn mesh(backend: HotBackend) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let rooms = livemesh_testkit::ongoing_query(dir.path()).await;
    let config = base_config(dir.path(), &rooms);
    // Every test's rooms start at id 1: a key phase of its own keeps them
    // apart on the shared Redis.
    let phase = livemesh_testkit::unique_name("fan");
    let store = store(backend, &phase);
    let mut dispatchers = Vec::new();
    for _ in 0..2 {
        dispatchers.push(start_dispatcher(&config, &store).await);
    }
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(start_node(&config, &store, &dispatchers[i % 2].0).await);
    }
    Mesh {
        _dir: dir,
        rooms,
        store,
        phase,
        nodes,
        dispatchers,
    }
}

impl Mesh {
    async fn start_room(&mut self) -> u64 {
        livemesh_testkit::start_room(self.rooms.channel(), 1).await
    }

    fn node(&self, i: usize) -> SubscribeServiceClient<MeshChannel> {
        SubscribeServiceClient::new(self.nodes[i].0.channel())
    }

    fn dispatcher(&self, i: usize) -> PublishServiceClient<MeshChannel> {
        PublishServiceClient::new(self.dispatchers[i].0.channel())
    }

    /// Dispatcher `i` as the gift-settler calls it (only it publishes gifts).
    fn dispatcher_as_gift_settler(&self, i: usize) -> PublishServiceClient<MeshChannel> {
        PublishServiceClient::new(
            self.dispatchers[i]
                .0
                .channel_as(livemesh_mesh::auth::policy::GIFT_SETTLER),
        )
    }

    async fn comment(&self, via: usize, room_id: u64, text: &str) -> StreamPosition {
        publish(&mut self.dispatcher(via), room_id, comment(text), None)
            .await
            .unwrap()
    }
}

fn comment(text: &str) -> room_event::Kind {
    room_event::Kind::Comment(Comment {
        viewer_id: 9,
        text: text.to_owned(),
    })
}

async fn publish(
    client: &mut PublishServiceClient<MeshChannel>,
    room_id: u64,
    kind: room_event::Kind,
    key: Option<&str>,
) -> Result<StreamPosition, tonic::Status> {
    Ok(publish_reply(client, room_id, kind, key)
        .await?
        .position
        .unwrap())
}

/// The whole reply of a publish (its position and the nodes it reached).
async fn publish_reply(
    client: &mut PublishServiceClient<MeshChannel>,
    room_id: u64,
    kind: room_event::Kind,
    key: Option<&str>,
) -> Result<livemesh_proto::v1::PublishResponse, tonic::Status> {
    let reply = client
        .publish(PublishRequest {
            room_id,
            event: Some(RoomEvent {
                kind: Some(kind),
                ..RoomEvent::default()
            }),
            idempotency_key: key.map(str::to_owned),
            forwarded_from: None,
        })
        .await?;
    Ok(reply.into_inner())
}

/// A viewer's open stream and its start message.
struct Viewer {
    stream: Streaming<SubscribeResponse>,
    started: StreamStarted,
    /// Events of a batch not handed out yet.
    queued: VecDeque<RoomEvent>,
    /// The number of events in each batch received so far.
    batches: Vec<usize>,
}

async fn subscribe(
    client: &mut SubscribeServiceClient<MeshChannel>,
    room_id: u64,
    resume: Option<StreamPosition>,
) -> Result<Viewer, tonic::Status> {
    let stream = client
        .subscribe(SubscribeRequest {
            room_id,
            viewer_id: 7,
            resume,
            accept_batches: false,
            stamp_writes: false,
        })
        .await?
        .into_inner();
    Viewer::started(stream).await
}

/// A subscriber that accepts batches.
fn batched(room_id: u64, resume: Option<StreamPosition>) -> SubscribeRequest {
    SubscribeRequest {
        room_id,
        viewer_id: 7,
        resume,
        accept_batches: true,
        stamp_writes: false,
    }
}

impl Viewer {
    /// Reads the start message of `stream`.
    async fn started(mut stream: Streaming<SubscribeResponse>) -> Result<Viewer, tonic::Status> {
        let first = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("the start message in time")?
            .expect("a start message");
        let Some(subscribe_response::Message::Started(started)) = first.message else {
            panic!("the first message must be `started`, got {first:?}");
        };
        Ok(Viewer {
            stream,
            started,
            queued: VecDeque::new(),
            batches: Vec::new(),
        })
    }

    /// The next event, from a single-event message or a batch; panics if
    /// none arrives in time.
    async fn next(&mut self) -> Result<Option<RoomEvent>, tonic::Status> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Ok(Some(event));
            }
            let message = tokio::time::timeout(WAIT, self.stream.message())
                .await
                .expect("an event in time")?;
            let Some(message) = message else {
                return Ok(None);
            };
            match message.message {
                Some(subscribe_response::Message::Event(event)) => return Ok(Some(event)),
                Some(subscribe_response::Message::Batch(batch)) => {
                    assert!(!batch.events.is_empty(), "an empty batch");
                    self.batches.push(batch.events.len());
                    self.queued.extend(batch.events);
                }
                other => panic!("expected an event, got {other:?}"),
            }
        }
    }

    /// The events of the next batch; panics on anything else.
    async fn next_batch(&mut self) -> Result<Vec<RoomEvent>, tonic::Status> {
        assert!(self.queued.is_empty(), "a batch was read in part");
        let message = tokio::time::timeout(WAIT, self.stream.message())
            .await
            .expect("a batch in time")?
            .expect("the stream went on");
        match message.message {
            Some(subscribe_response::Message::Batch(batch)) => {
                assert!(!batch.events.is_empty(), "an empty batch");
                self.batches.push(batch.events.len());
                Ok(batch.events)
            }
            other => panic!("expected a batch, got {other:?}"),
        }
    }

    /// The next ordered event (skipping love totals and viewer counts).
    async fn next_ordered(&mut self) -> RoomEvent {
        loop {
            let event = self.next().await.unwrap().expect("the stream went on");
            if !matches!(
                event.kind,
                Some(room_event::Kind::LoveTotal(_) | room_event::Kind::ViewerCount(_))
            ) {
                return event;
            }
        }
    }

    /// Reads until `until` holds for an event; returns that event.
    async fn until(&mut self, until: impl Fn(&RoomEvent) -> bool) -> RoomEvent {
        loop {
            let event = self.next().await.unwrap().expect("the stream went on");
            if until(&event) {
                return event;
            }
        }
    }
}

fn text_of(event: &RoomEvent) -> &str {
    match &event.kind {
        Some(room_event::Kind::Comment(c)) => &c.text,
        other => panic!("expected a comment, got {other:?}"),
    }
}

async fn only_nodes_with_viewers_get_deliver(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room_a = mesh.start_room().await;
    let room_b = mesh.start_room().await;
    let mut on_a = subscribe(&mut mesh.node(0), room_a, None).await.unwrap();
    let mut on_b1 = subscribe(&mut mesh.node(1), room_b, None).await.unwrap();
    let mut on_b2 = subscribe(&mut mesh.node(2), room_b, None).await.unwrap();
    // Once every viewer has its room's viewer count, no count changes and
    // no viewer-count event is published: the Deliver calls counted below
    // are the comments' alone.
    let count_is = |n: u64| move |e: &RoomEvent| matches!(e.kind, Some(room_event::Kind::ViewerCount(c)) if c.count == n);
    on_a.until(count_is(1)).await;
    on_b1.until(count_is(2)).await;
    on_b2.until(count_is(2)).await;
    let calls = |mesh: &Mesh, i: usize| {
        mesh.nodes[i]
            .1
            .stats()
            .deliver_calls
            .load(Ordering::Relaxed)
    };
    let before: Vec<u64> = (0..3).map(|i| calls(&mesh, i)).collect();

    let reply = publish_reply(&mut mesh.dispatcher(0), room_a, comment("for a"), None)
        .await
        .unwrap();
    assert_eq!(reply.nodes, 1, "room a has viewers on one node");
    assert_eq!(text_of(&on_a.next_ordered().await), "for a");
    assert_eq!(
        calls(&mesh, 0),
        before[0] + 1,
        "node 0 holds room a's viewer"
    );
    assert_eq!(calls(&mesh, 1), before[1], "node 1 has no viewer of room a");
    assert_eq!(calls(&mesh, 2), before[2], "node 2 has no viewer of room a");

    let position = mesh.comment(1, room_b, "for b").await;
    assert_eq!(position.offset, 1, "room b's history is its own");
    assert_eq!(text_of(&on_b1.next_ordered().await), "for b");
    assert_eq!(text_of(&on_b2.next_ordered().await), "for b");
    assert_eq!(
        calls(&mesh, 0),
        before[0] + 1,
        "node 0 has no viewer of room b"
    );
    assert_eq!(calls(&mesh, 1), before[1] + 1);
    assert_eq!(calls(&mesh, 2), before[2] + 1);
}

async fn a_killed_stream_resumes_with_every_ordered_event_once_in_order(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let mut viewer = subscribe(&mut mesh.node(0), room, None).await.unwrap();
    for i in 1..=3 {
        mesh.comment(i % 2, room, &format!("c{i}")).await;
    }
    let mut last = None;
    for i in 1..=3 {
        let event = viewer.next_ordered().await;
        assert_eq!(text_of(&event), format!("c{i}"));
        last = Some(StreamPosition {
            epoch: event.epoch,
            offset: event.offset,
        });
    }
    drop(viewer); // the connection dies mid-room
    for i in 4..=8 {
        mesh.comment(i % 2, room, &format!("c{i}")).await;
    }
    // Resume on another node.
    let mut viewer = subscribe(&mut mesh.node(1), room, last).await.unwrap();
    assert!(viewer.started.recovered, "{:?}", viewer.started);
    assert!(!viewer.started.epoch_changed);
    assert_eq!(viewer.started.replayed, 5);
    mesh.comment(0, room, "c9").await;
    for i in 4..=9 {
        let event = viewer.next_ordered().await;
        assert_eq!(text_of(&event), format!("c{i}"), "in order, once");
        assert_eq!(event.offset, i);
    }
    // A gift is ordered too, and nothing else is pending.
    publish(
        &mut mesh.dispatcher_as_gift_settler(1),
        room,
        room_event::Kind::Gift(GiftSent {
            viewer_id: 3,
            gift_id: 1,
            amount: 50,
            transfer_id: "t-1".into(),
        }),
        None,
    )
    .await
    .unwrap();
    let gift = viewer.next_ordered().await;
    assert!(
        matches!(gift.kind, Some(room_event::Kind::Gift(_))),
        "{gift:?}"
    );
    assert_eq!(gift.offset, 10);
}

async fn resumes_under_concurrent_publishing_have_no_gap_and_no_duplicate(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    const PUBLISHERS: u64 = 4;
    const EACH: u64 = 50;
    let total = PUBLISHERS * EACH;
    let mut viewer = subscribe(&mut mesh.node(0), room, None).await.unwrap();
    let mut publishers = tokio::task::JoinSet::new();
    for p in 0..PUBLISHERS {
        let mut client = mesh.dispatcher(usize::try_from(p % 2).unwrap());
        publishers.spawn(async move {
            for i in 0..EACH {
                publish(&mut client, room, comment(&format!("p{p}-{i}")), None)
                    .await
                    .unwrap();
            }
        });
    }
    // Read, dropping the stream every 17 events and resuming on the next node.
    let mut seen = Vec::new();
    let mut node = 0;
    while (seen.len() as u64) < total {
        let event = viewer.next_ordered().await;
        seen.push(event.offset);
        if seen.len() % 17 == 0 {
            node = (node + 1) % 3;
            let resume = StreamPosition {
                epoch: event.epoch,
                offset: event.offset,
            };
            viewer = subscribe(&mut mesh.node(node), room, Some(resume))
                .await
                .unwrap();
            assert!(viewer.started.recovered, "{:?}", viewer.started);
        }
    }
    while let Some(done) = publishers.join_next().await {
        done.unwrap();
    }
    let expected: Vec<u64> = (1..=total).collect();
    assert_eq!(seen, expected, "every event once, in offset order");
}

/// The stream `request` opens on a client whose HTTP/2 windows are tiny,
/// so that a stream it does not read backs up on the server after a few
/// messages.
async fn slow_stream(
    server: &TestServer,
    request: SubscribeRequest,
) -> Streaming<SubscribeResponse> {
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(Some(256))
        .initial_connection_window_size(Some(256))
        .connect()
        .await
        .unwrap();
    SubscribeServiceClient::new(channel)
        .subscribe(request)
        .await
        .unwrap()
        .into_inner()
}

async fn a_slow_consumer_gets_the_latest_love_total_not_a_backlog(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let viewer_7 = SubscribeRequest {
        room_id: room,
        viewer_id: 7,
        ..SubscribeRequest::default()
    };
    let mut stream = slow_stream(&mesh.nodes[0].0, viewer_7).await;
    // Not reading: every total below is published while the viewer stalls.
    let mut dispatcher = mesh.dispatcher(0);
    for total in 1..=500 {
        let kind = room_event::Kind::LoveTotal(LoveTotal { total });
        publish(&mut dispatcher, room, kind, None).await.unwrap();
    }
    // A marker after the totals: once it arrives, everything before it has.
    mesh.comment(0, room, "marker").await;
    let mut totals = Vec::new();
    loop {
        let message = tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match message.message {
            Some(subscribe_response::Message::Event(event)) => match event.kind {
                Some(room_event::Kind::LoveTotal(t)) => totals.push(t.total),
                Some(room_event::Kind::Comment(_)) => break,
                _ => {}
            },
            _ => continue,
        }
    }
    // The marker is ordered and goes first when both wait; the newest total
    // may still follow it.
    if totals.last() != Some(&500) {
        let message = tokio::time::timeout(WAIT, stream.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(subscribe_response::Message::Event(event)) = message.message
            && let Some(room_event::Kind::LoveTotal(t)) = event.kind
        {
            totals.push(t.total);
        }
    }
    assert_eq!(
        totals.last(),
        Some(&500),
        "the newest total arrives: {totals:?}"
    );
    assert!(
        totals.len() < 50,
        "a stalled viewer gets a few totals, not the backlog of 500: {} arrived",
        totals.len()
    );
    assert!(totals.windows(2).all(|w| w[0] < w[1]), "{totals:?}");
}

async fn an_overflowing_stream_ends_with_its_resume_position(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let viewer_7 = SubscribeRequest {
        room_id: room,
        viewer_id: 7,
        ..SubscribeRequest::default()
    };
    let mut stream = slow_stream(&mesh.nodes[0].0, viewer_7).await;
    let total = 200; // the test queue holds 32
    for i in 1..=total {
        mesh.comment(0, room, &format!("c{i}")).await;
    }
    let mut seen = Vec::new();
    let status = loop {
        match tokio::time::timeout(WAIT, stream.message()).await.unwrap() {
            Ok(Some(message)) => {
                // Ordered events only: a viewer count carries the position
                // of the last ordered event sent, not a position of its own.
                if let Some(subscribe_response::Message::Event(event)) = message.message
                    && matches!(event.kind, Some(room_event::Kind::Comment(_)))
                {
                    seen.push(event.offset);
                }
            }
            Ok(None) => panic!("the stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("resume"), "{}", status.message());
    let resume = resume_trailers(&status);
    assert_eq!(resume.offset, seen.last().copied().unwrap_or(0));
    assert!(
        (seen.len() as u64) < total,
        "the stream overflowed before the end"
    );
    let mut viewer = subscribe(&mut mesh.node(1), room, Some(resume))
        .await
        .unwrap();
    assert!(viewer.started.recovered);
    while (seen.len() as u64) < total {
        seen.push(viewer.next_ordered().await.offset);
    }
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());
    assert!(mesh.nodes[0].1.stats().overflows.load(Ordering::Relaxed) >= 1);
}

async fn viewer_counts_add_up_across_nodes(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let mut viewers = Vec::new();
    for (node, streams) in [(0, 2), (1, 3), (2, 1)] {
        for _ in 0..streams {
            viewers.push(subscribe(&mut mesh.node(node), room, None).await.unwrap());
        }
    }
    let is_six =
        |e: &RoomEvent| matches!(e.kind, Some(room_event::Kind::ViewerCount(c)) if c.count == 6);
    // Every viewer, on every node, sees the room's total.
    for viewer in &mut viewers {
        viewer.until(is_six).await;
    }
    // One leaves: the total follows.
    viewers.pop();
    let is_five =
        |e: &RoomEvent| matches!(e.kind, Some(room_event::Kind::ViewerCount(c)) if c.count == 5);
    viewers[0].until(is_five).await;
}

async fn room_end_closes_the_streams_and_the_registrations(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let mut v0 = subscribe(&mut mesh.node(0), room, None).await.unwrap();
    let mut v2 = subscribe(&mut mesh.node(2), room, None).await.unwrap();
    let last = mesh.comment(0, room, "before the end").await;
    assert_eq!(
        mesh.store
            .nodes(room, livemesh_mesh::now_ms())
            .await
            .unwrap()
            .len(),
        2
    );
    livemesh_testkit::end_room(mesh.rooms.channel(), room).await;
    for viewer in [&mut v0, &mut v2] {
        assert_eq!(text_of(&viewer.next_ordered().await), "before the end");
        let end = viewer.next_ordered().await;
        assert!(
            matches!(end.kind, Some(room_event::Kind::RoomEnded(_))),
            "{end:?}"
        );
        assert_eq!(end.offset, last.offset + 1);
        // The stream then ends cleanly (OK, no more events).
        loop {
            match viewer.next().await {
                Ok(None) => break,
                Ok(Some(e)) if !matches!(e.kind, Some(room_event::Kind::RoomEnded(_))) => {
                    assert!(
                        matches!(
                            e.kind,
                            Some(room_event::Kind::ViewerCount(_) | room_event::Kind::LoveTotal(_))
                        ),
                        "only latest values may trail the end: {e:?}"
                    );
                }
                other => panic!("expected the stream to end, got {other:?}"),
            }
        }
    }
    // The nodes' registrations go away.
    let deadline = Instant::now() + WAIT;
    while !mesh
        .store
        .nodes(room, livemesh_mesh::now_ms())
        .await
        .unwrap()
        .is_empty()
    {
        assert!(Instant::now() < deadline, "registrations outlived the room");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nothing more is published, and a new viewer is told why.
    let err = publish(&mut mesh.dispatcher(1), room, comment("late"), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    let err = subscribe(&mut mesh.node(1), room, None)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    // A viewer who lost its stream before the end still gets the rest.
    let mut late = subscribe(&mut mesh.node(1), room, Some(last))
        .await
        .unwrap();
    let end = late.next_ordered().await;
    assert!(matches!(end.kind, Some(room_event::Kind::RoomEnded(_))));
    assert!(late.next().await.unwrap().is_none());
}

async fn cross_datacenter_forwarding_delivers_once(backend: HotBackend) {
    let dir = tempfile::tempdir().unwrap();
    // One rooms service serves both datacenters here (room ids are global).
    let rooms = livemesh_testkit::ongoing_query(dir.path()).await;
    let config = base_config(dir.path(), &rooms);
    let stores = [
        store(backend, &livemesh_testkit::unique_name("dc1")),
        store(backend, &livemesh_testkit::unique_name("dc2")),
    ];
    // Bind both dispatchers first: each names the other as its peer.
    let listeners = [
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
    ];
    let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
    drop(listeners);
    let mut dispatchers = Vec::new();
    let mut servers = Vec::new();
    for dc in 0..2 {
        let mut config = config.clone();
        config.listen = addrs[dc];
        config.section_mut::<PublishConfig>().datacenter = format!("dc{}", dc + 1);
        config.section_mut::<PublishConfig>().peers = vec![format!("http://{}", addrs[1 - dc])];
        let dispatcher = Dispatcher::from_config(&config, stores[dc].clone()).unwrap();
        let server = livemesh_mesh::server::LocalServer::start(dispatcher.clone(), addrs[dc])
            .await
            .unwrap();
        dispatchers.push(dispatcher);
        servers.push(server);
    }
    let mut nodes = Vec::new();
    for dc in 0..2 {
        let mut handle = None;
        let server = TestServer::start_with(|addr| {
            let mut config = config.clone();
            config.listen = addr;
            config.section_mut::<SubscribeConfig>().publish_url = format!("http://{}", addrs[dc]);
            let node = SubscribeNode::from_config(&config, stores[dc].clone());
            handle = node.as_ref().ok().cloned();
            async move { node }
        })
        .await;
        nodes.push(server);
    }
    let room = livemesh_testkit::start_room(rooms.channel(), 1).await;
    let mut viewers = Vec::new();
    for node in &nodes {
        let mut client = SubscribeServiceClient::new(node.channel());
        viewers.push(subscribe(&mut client, room, None).await.unwrap());
    }
    let stack = livemesh_mesh::ClientStack::new(&config.client);
    let mut clients: Vec<_> = addrs
        .iter()
        .map(|a| PublishServiceClient::new(stack.channel(&format!("http://{a}")).unwrap()))
        .collect();
    for i in 0..10 {
        for (dc, client) in clients.iter_mut().enumerate() {
            publish(client, room, comment(&format!("dc{dc}-{i}")), None)
                .await
                .unwrap();
        }
    }
    // A retried publish (same key) is forwarded once too.
    for _ in 0..2 {
        publish(&mut clients[0], room, comment("keyed"), Some("k-1"))
            .await
            .unwrap();
    }
    // A love total is this datacenter's own aggregate: it stays local.
    publish(
        &mut clients[0],
        room,
        room_event::Kind::LoveTotal(LoveTotal { total: 7 }),
        None,
    )
    .await
    .unwrap();
    for (dc, client) in clients.iter_mut().enumerate() {
        publish(client, room, comment(&format!("end-{dc}")), None)
            .await
            .unwrap();
    }
    for viewer in &mut viewers {
        let mut texts = Vec::new();
        let mut ends = 0;
        while ends < 2 {
            let event = viewer.next_ordered().await;
            let text = text_of(&event).to_owned();
            if text.starts_with("end-") {
                ends += 1;
            }
            texts.push(text);
        }
        let unique: HashSet<&String> = texts.iter().collect();
        assert_eq!(unique.len(), texts.len(), "no duplicates: {texts:?}");
        assert_eq!(
            texts.len(),
            23,
            "20 comments, the keyed one, 2 markers: {texts:?}"
        );
    }
    // Each dispatcher forwarded its own 12 ordered publishes (11 for dc2),
    // none of the other's (no loops), and no love total or viewer count.
    let forwarded = |d: &Dispatcher| d.stats().forwarded.load(Ordering::Relaxed);
    let deadline = Instant::now() + WAIT;
    while forwarded(&dispatchers[0]) < 12 || forwarded(&dispatchers[1]) < 11 {
        assert!(Instant::now() < deadline, "forwarding did not finish");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(forwarded(&dispatchers[0]), 12);
    assert_eq!(forwarded(&dispatchers[1]), 11);
    for server in servers {
        server.stop().await.unwrap();
    }
}

async fn bad_requests_get_precise_codes(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let mut node = mesh.node(0);
    let code = |r: Result<Viewer, tonic::Status>| r.err().unwrap().code();
    assert_eq!(
        code(subscribe(&mut node, 0, None).await),
        tonic::Code::InvalidArgument
    );
    assert_eq!(
        code(subscribe(&mut node, room + 1_000, None).await),
        tonic::Code::NotFound
    );
    let zero_epoch = Some(StreamPosition {
        epoch: 0,
        offset: 3,
    });
    assert_eq!(
        code(subscribe(&mut node, room, zero_epoch).await),
        tonic::Code::InvalidArgument
    );
    // As the gift-settler: the gift below is refused for its amount, not
    // for who sent it.
    let mut dispatcher = mesh.dispatcher_as_gift_settler(0);
    let cases: Vec<(Option<room_event::Kind>, &str)> = vec![
        (None, "kind"),
        (Some(comment("")), "empty"),
        (Some(comment(" \t\n")), "empty"),
        (Some(comment("\u{200B}")), "empty"),
        (Some(comment("\u{FEFF}")), "empty"),
        (Some(comment("\u{3000}\u{2060}")), "empty"),
        (Some(comment("\0")), "U+0000"),
        (Some(comment("hi\u{202E}dlrow")), "U+202E"),
        (Some(comment("\u{2067}x")), "U+2067"),
        (Some(comment(&"x".repeat(2_001))), "2001 characters"),
        (
            Some(room_event::Kind::Gift(GiftSent {
                amount: 0,
                ..GiftSent::default()
            })),
            "amount",
        ),
    ];
    for (kind, needle) in cases {
        let err = dispatcher
            .publish(PublishRequest {
                room_id: room,
                event: Some(RoomEvent {
                    kind,
                    ..RoomEvent::default()
                }),
                ..PublishRequest::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(needle), "{}", err.message());
    }
    let err = publish(&mut dispatcher, 0, comment("x"), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Nothing was stored by the refused publishes.
    let first = mesh.comment(0, room, "first").await;
    assert_eq!(first.offset, 1);
    // Same key again: the first position, nothing new.
    let a = publish(&mut dispatcher, room, comment("k"), Some("key"))
        .await
        .unwrap();
    let b = publish(&mut dispatcher, room, comment("k"), Some("key"))
        .await
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(mesh.comment(1, room, "next").await.offset, a.offset + 1);
}

/// Defect 1 of issue 12: a publish to a room id that was never started
/// stored its events, poisoning the room that later got the id. 1,000
/// comments to 1,000 such rooms leave the store's and every node's count
/// of stored rooms as they were.
async fn publishes_to_rooms_never_started_store_nothing_and_poison_nothing(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let started = mesh.start_room().await;
    // A viewer on node 0: the node and the store hold the started room.
    let _viewer = subscribe(&mut mesh.node(0), started, None).await.unwrap();
    let stored_rooms = |mesh: &Mesh| {
        let nodes: Vec<usize> = mesh
            .nodes
            .iter()
            .map(|(_, node)| node.stored_rooms())
            .collect();
        let store = mesh.store.clone();
        async move { (store.stored_rooms().await.unwrap(), nodes) }
    };
    let before = stored_rooms(&mesh).await;
    assert_eq!(before, (1, vec![1, 0, 0]), "(store, nodes) before");
    let mut dispatcher = mesh.dispatcher(0);
    let long = "x".repeat(2_000);
    for room in started + 1..=started + 1_000 {
        let err = publish(&mut dispatcher, room, comment(&long), None)
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound, "room {room}: {err:?}");
        assert!(
            err.message().contains("does not exist"),
            "{}",
            err.message()
        );
    }
    for room in started + 1..=started + 1_000 {
        assert!(
            !mesh.store.holds(room).await.unwrap(),
            "state was stored for room {room}, which was never started"
        );
    }
    assert_eq!(
        stored_rooms(&mesh).await,
        before,
        "(store, nodes) after 1,000 comments to rooms never started"
    );
    // The id that was published to comes to a real room: it starts clean.
    let next = mesh.start_room().await;
    assert_eq!(next, started + 1);
    let mut viewer = subscribe(&mut mesh.node(0), next, None).await.unwrap();
    assert_eq!(
        viewer.started.position.unwrap().offset,
        0,
        "nothing replayed"
    );
    mesh.comment(1, next, "the first real comment").await;
    let event = viewer.next_ordered().await;
    assert_eq!(text_of(&event), "the first real comment");
    assert_eq!(event.offset, 1);
}

/// Defect 1 of issue 12: anyone could publish `room_ended` (ending a room's
/// streams for good, even before it started) and gift events.
async fn only_a_dispatcher_ends_a_room_and_only_the_gift_settler_publishes_gifts(
    backend: HotBackend,
) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let ended = room_event::Kind::RoomEnded(livemesh_proto::v1::RoomEnded { ended_at: None });
    let gift = room_event::Kind::Gift(GiftSent {
        viewer_id: 3,
        gift_id: 1,
        amount: 50,
        transfer_id: "t-1".into(),
    });
    // Not from a viewer's app, nor from another mesh service: the room's
    // end comes from the rooms service through the dispatcher's Watch.
    for mut client in [
        mesh.dispatcher(0),
        mesh.dispatcher_as_gift_settler(0),
        PublishServiceClient::new(
            mesh.dispatchers[0]
                .0
                .channel_as(livemesh_mesh::auth::policy::SUBSCRIBE),
        ),
    ] {
        for target in [room, room + 1] {
            let err = publish(&mut client, target, ended.clone(), Some("room-ended"))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
            assert!(err.message().contains("EndRoom"), "{}", err.message());
        }
    }
    let err = publish(&mut mesh.dispatcher(1), room, gift.clone(), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("SendGift"), "{}", err.message());
    // The room goes on, and the next room starts unharmed.
    let mut viewer = subscribe(&mut mesh.node(1), room, None).await.unwrap();
    publish(&mut mesh.dispatcher_as_gift_settler(1), room, gift, None)
        .await
        .unwrap();
    assert!(matches!(
        viewer.next_ordered().await.kind,
        Some(room_event::Kind::Gift(_))
    ));
    let next = mesh.start_room().await;
    subscribe(&mut mesh.node(2), next, None).await.unwrap();
    // A publish to an ended room is refused, and the room's viewers get its end.
    livemesh_testkit::end_room(mesh.rooms.channel(), room).await;
    let end = viewer
        .until(|e| matches!(e.kind, Some(room_event::Kind::RoomEnded(_))))
        .await;
    assert!(end.offset > 1);
    let err = publish(&mut mesh.dispatcher(0), room, comment("too late"), None)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
}

/// `PublishBatch` (the gift-settler's announcements): each event is
/// published as `Publish` would (its checks, its idempotency key) and
/// answered in its place; a caller that is not a mesh service is refused.
async fn a_batch_publishes_each_event_as_publish_would_and_answers_each_in_its_place(
    backend: HotBackend,
) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let mut viewer = subscribe(&mut mesh.node(1), room, None).await.unwrap();
    let gift = |n: u64| {
        room_event::Kind::Gift(GiftSent {
            viewer_id: 3,
            gift_id: n,
            amount: 50,
            transfer_id: format!("t-{n}"),
        })
    };
    let request = |room_id: u64, kind: room_event::Kind, key: &str| PublishRequest {
        room_id,
        event: Some(RoomEvent {
            kind: Some(kind),
            ..RoomEvent::default()
        }),
        idempotency_key: Some(key.to_owned()),
        forwarded_from: None,
    };
    let batch = PublishBatchRequest {
        requests: vec![
            request(room, gift(1), "t-1"),
            request(room + 1_000_000, gift(2), "t-2"),
            request(room, comment("not in a batch"), "c-1"),
            request(room, gift(3), "t-3"),
            request(room, gift(1), "t-1"),
        ],
    };
    let results = mesh
        .dispatcher_as_gift_settler(0)
        .publish_batch(batch.clone())
        .await
        .unwrap()
        .into_inner()
        .results;
    let codes: Vec<u32> = results.iter().map(|r| r.code).collect();
    assert_eq!(
        codes,
        [
            0,
            tonic::Code::NotFound as u32,
            tonic::Code::InvalidArgument as u32,
            0,
            0
        ],
        "{results:?}"
    );
    assert!(results[2].message.contains("Publish"), "{results:?}");
    let position = |i: usize| results[i].response.as_ref().unwrap().position.unwrap();
    assert_eq!(position(0), position(4), "the same key, the same event");
    assert_ne!(position(0), position(3));
    // The viewer gets gifts 1 and 3, once each.
    let mut seen = Vec::new();
    for _ in 0..2 {
        match viewer.next_ordered().await.kind {
            Some(room_event::Kind::Gift(g)) => seen.push(g.gift_id),
            other => panic!("expected a gift, got {other:?}"),
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, [1, 3]);
    // Another mesh service may batch, but not gifts; a caller outside the
    // mesh may not batch at all.
    let results = PublishServiceClient::new(
        mesh.dispatchers[0]
            .0
            .channel_as(livemesh_mesh::auth::policy::SUBSCRIBE),
    )
    .publish_batch(PublishBatchRequest {
        requests: vec![request(room, gift(4), "t-4")],
    })
    .await
    .unwrap()
    .into_inner()
    .results;
    assert_eq!(results[0].code, tonic::Code::PermissionDenied as u32);
    assert!(results[0].message.contains("SendGift"), "{results:?}");
    let err = PublishServiceClient::new(
        mesh.dispatchers[0]
            .0
            .channel_as(livemesh_mesh::auth::policy::BFF),
    )
    .publish_batch(batch)
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
}

/// Defect 5 of issue 12: a resume position past the room's newest event was
/// accepted as `recovered`, and the next live event was then dropped.
async fn a_resume_past_the_head_is_out_of_range(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let head = mesh.comment(0, room, "one").await;
    let mut node = mesh.node(1);
    for offset in [head.offset + 1, u64::MAX] {
        let err = subscribe(
            &mut node,
            room,
            Some(StreamPosition {
                epoch: head.epoch,
                offset,
            }),
        )
        .await
        .err()
        .unwrap();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
        assert!(
            err.message()
                .contains(&format!("newest event (offset {})", head.offset)),
            "{}",
            err.message()
        );
    }
    // At the head: accepted, and the next live event arrives.
    let mut viewer = subscribe(&mut node, room, Some(head)).await.unwrap();
    assert!(viewer.started.recovered);
    mesh.comment(0, room, "two").await;
    assert_eq!(text_of(&viewer.next_ordered().await), "two");
    // An ended room: the same rule for a replay-only resume.
    livemesh_testkit::end_room(mesh.rooms.channel(), room).await;
    viewer
        .until(|e| matches!(e.kind, Some(room_event::Kind::RoomEnded(_))))
        .await;
    let err = subscribe(
        &mut mesh.node(2),
        room,
        Some(StreamPosition {
            epoch: head.epoch,
            offset: u64::MAX,
        }),
    )
    .await
    .err()
    .unwrap();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
}

async fn a_dead_nodes_registration_expires(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let _viewer = subscribe(&mut mesh.node(0), room, None).await.unwrap();
    // A node that registered and died: nothing listens at its address.
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let now = livemesh_mesh::now_ms();
    mesh.store.join(room, &dead, 4, 300, now).await.unwrap();
    let nodes = mesh.store.nodes(room, now).await.unwrap();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    let reply = publish_reply(
        &mut mesh.dispatcher(0),
        room,
        comment("while the dead node is listed"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(reply.nodes, 1, "only the live node answered");
    // Its lease ends: it is no longer listed.
    let deadline = Instant::now() + WAIT;
    loop {
        let nodes = mesh
            .store
            .nodes(room, livemesh_mesh::now_ms())
            .await
            .unwrap();
        if nodes == vec![mesh.nodes[0].1.node_id().to_owned()] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead node stayed listed: {nodes:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = &mesh.rooms;
}

/// Redis loses a room's keys (a restart without persistence, an eviction):
/// the next publish starts a new epoch, live viewers get its events, and a
/// resume from the old epoch is told that its history is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_history_starts_a_new_epoch_and_resume_says_so() {
    let mut mesh = mesh(HotBackend::Redis).await;
    let room = mesh.start_room().await;
    let mut viewer = subscribe(&mut mesh.node(0), room, None).await.unwrap();
    let first = mesh.comment(0, room, "before").await;
    assert_eq!(text_of(&viewer.next_ordered().await), "before");

    let redis = ::redis::Client::open(livemesh_testkit::redis_url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    let pattern = format!("fanout|{}|{{room:{room}}}|*", mesh.phase);
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg(&pattern)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the room has keys under {pattern}");
    let _: () = ::redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();

    let second = mesh.comment(1, room, "after").await;
    assert_ne!(second.epoch, first.epoch, "a new epoch");
    assert_eq!(second.offset, 1, "offsets start over");
    // The node re-registers on its next renewal, notices the new epoch and
    // fetches what it missed.
    let event = viewer.next_ordered().await;
    assert_eq!(text_of(&event), "after");
    assert_eq!((event.epoch, event.offset), (second.epoch, 1));

    let resumed = subscribe(&mut mesh.node(1), room, Some(first))
        .await
        .unwrap();
    assert!(resumed.started.epoch_changed, "{:?}", resumed.started);
    assert!(!resumed.started.recovered);
    assert_eq!(resumed.started.replayed, 1, "what the new epoch holds");
}

/// A stopping node ends its streams at once with UNAVAILABLE and where to
/// resume, instead of holding its drain until the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_ends_its_streams_with_a_resume_position() {
    let mut mesh = mesh(HotBackend::Memory).await;
    let room = mesh.start_room().await;
    let mut viewer = subscribe(&mut mesh.node(2), room, None).await.unwrap();
    let sent = mesh.comment(0, room, "hello").await;
    assert_eq!(text_of(&viewer.next_ordered().await), "hello");
    let (server, _node) = mesh.nodes.pop().unwrap();
    let started = Instant::now();
    let stop = tokio::spawn(server.stop());
    let status = loop {
        match viewer.next().await {
            Err(status) => break status,
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without saying where to resume"),
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    let offset: u64 = status
        .metadata()
        .get(RESUME_OFFSET)
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(offset, sent.offset);
    stop.await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the drain waited for the streams: {:?}",
        started.elapsed()
    );
}

async fn the_last_viewer_leaving_takes_the_node_out_of_the_room(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let first = subscribe(&mut mesh.node(1), room, None).await.unwrap();
    let second = subscribe(&mut mesh.node(1), room, None).await.unwrap();
    let node_id = mesh.nodes[1].1.node_id().to_owned();
    let listed = |nodes: Vec<String>| nodes.contains(&node_id);
    assert!(listed(
        mesh.store
            .nodes(room, livemesh_mesh::now_ms())
            .await
            .unwrap()
    ));
    drop(first);
    // Once the node has seen the cancellation, one viewer is left there and
    // the node stays registered.
    let node = mesh.nodes[1].1.clone();
    let deadline = Instant::now() + WAIT;
    while node.stream_counts() != vec![(room, 1)] {
        assert!(Instant::now() < deadline, "{:?}", node.stream_counts());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(listed(
        mesh.store
            .nodes(room, livemesh_mesh::now_ms())
            .await
            .unwrap()
    ));
    let still = subscribe(&mut mesh.node(0), room, None).await.unwrap();
    drop(second);
    let deadline = Instant::now() + WAIT;
    while listed(
        mesh.store
            .nodes(room, livemesh_mesh::now_ms())
            .await
            .unwrap(),
    ) {
        assert!(
            Instant::now() < deadline,
            "the node stayed registered after its last viewer left"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Well before its lease (1 s in these tests) could have ended it.
    let reply = publish_reply(&mut mesh.dispatcher(1), room, comment("after"), None)
        .await
        .unwrap();
    assert_eq!(reply.nodes, 1, "only node 0 still holds a viewer");
    drop(still);
}

/// Deliver timeout of the black-hole test: short, so the test takes a few
/// seconds even while every publish waits it out.
/// (250 ms: a healthy node's Deliver, even on a loaded 2-core CI machine,
/// answers well within it.)
const CHAOS_DELIVER_TIMEOUT: Duration = Duration::from_millis(250);

/// Reads ordered events until the comment `last`; returns their texts and
/// offsets. Panics (with what it read) if `last` does not come in time.
async fn ordered_until(viewer: &mut Viewer, last: &str) -> Vec<(String, u64)> {
    let mut read = Vec::new();
    loop {
        let event = viewer.next_ordered().await;
        let text = text_of(&event).to_owned();
        read.push((text.clone(), event.offset));
        if text == last {
            return read;
        }
    }
}

/// Chaos: one of three subscribe nodes black-holed (its advertised address
/// is a proxy that accepts TCP and never answers) while comments are
/// published. Every publish answers OK; the viewers of the healthy nodes get
/// every comment once, in order; the black-holed node's viewer gets them
/// all once, in order (from the room's history), and a viewer that leaves
/// it and resumes on a healthy node gets the rest, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_a_black_holed_node_loses_nothing_and_does_not_fail_publishes() {
    const MIN_PUBLISHES: u64 = 16;
    const BLACK_HOLE_FOR: Duration = Duration::from_secs(2);
    let dir = tempfile::tempdir().unwrap();
    let rooms = livemesh_testkit::ongoing_query(dir.path()).await;
    let mut config = base_config(dir.path(), &rooms);
    config.section_mut::<SubscribeConfig>().queue_len = 1024;
    config.section_mut::<PublishConfig>().deliver_timeout_ms =
        u64::try_from(CHAOS_DELIVER_TIMEOUT.as_millis()).unwrap();
    let store = store(HotBackend::Redis, &livemesh_testkit::unique_name("chaos"));
    let (dispatcher_server, dispatcher) = start_dispatcher(&config, &store).await;
    let mut nodes = vec![
        start_node(&config, &store, &dispatcher_server).await,
        start_node(&config, &store, &dispatcher_server).await,
    ];
    // Node 2 advertises a proxy in front of itself: the dispatcher's
    // Deliver calls to it go through the proxy.
    let mut proxy = None;
    let mut handle = None;
    let server = TestServer::start_with(|addr| {
        let through = TcpProxy::start(addr);
        let mut config = config.clone();
        config.listen = addr;
        config.section_mut::<SubscribeConfig>().node_url = through.url();
        config.section_mut::<SubscribeConfig>().publish_url = dispatcher_server.url();
        proxy = Some(through);
        let node = SubscribeNode::from_config(&config, store.clone());
        handle = node.as_ref().ok().cloned();
        async move { node }
    })
    .await;
    nodes.push((server, handle.unwrap()));
    let proxy = proxy.unwrap();
    let node = |i: usize| SubscribeServiceClient::new(nodes[i].0.channel());
    let mut dispatch = PublishServiceClient::new(dispatcher_server.channel());
    let room = livemesh_testkit::start_room(rooms.channel(), 1).await;

    let mut viewers = Vec::new();
    for i in 0..3 {
        viewers.push(subscribe(&mut node(i), room, None).await.unwrap());
    }
    // A second viewer on node 2 that will leave it and resume elsewhere.
    let mut leaver = subscribe(&mut node(2), room, None).await.unwrap();
    // One comment while all is well: every node, node 2 through the proxy.
    let reply = publish_reply(&mut dispatch, room, comment("c0"), None)
        .await
        .unwrap();
    assert_eq!(reply.nodes, 3, "all three nodes answered");
    for viewer in viewers.iter_mut().chain([&mut leaver]) {
        assert_eq!(text_of(&viewer.next_ordered().await), "c0");
    }
    let c0 = reply.position.unwrap();

    proxy.set_mode(ProxyMode::BlackHole);
    let failures_before = dispatcher.stats().deliver_failures.load(Ordering::Relaxed);
    let mut latencies = Vec::new();
    let black_hole_began = Instant::now();
    let mut after_first_second = Vec::new();
    // At least MIN_PUBLISHES, over at least BLACK_HOLE_FOR: with breakers,
    // publishes are quick and many come after the breaker opened.
    let mut n = 0;
    while n < MIN_PUBLISHES || black_hole_began.elapsed() < BLACK_HOLE_FOR {
        n += 1;
        let i = n;
        let started = Instant::now();
        let reply = publish_reply(&mut dispatch, room, comment(&format!("c{i}")), None)
            .await
            .unwrap_or_else(|status| panic!("publish c{i} failed: {status:?}"));
        let took = started.elapsed();
        latencies.push(took);
        if started.duration_since(black_hole_began) > Duration::from_secs(1) {
            after_first_second.push(took);
        }
        assert_eq!(reply.position.unwrap().offset, c0.offset + i);
        assert!(reply.nodes >= 2, "the healthy nodes answered: {reply:?}");
        // A viewer-paced stream of comments, not a flood (queues stay short).
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failed = dispatcher.stats().deliver_failures.load(Ordering::Relaxed) - failures_before;
    assert!(failed > 0, "no Deliver to the black-holed node failed");
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    let waited = after_first_second
        .iter()
        .filter(|took| **took >= CHAOS_DELIVER_TIMEOUT)
        .count();
    println!(
        "publish latency with one of three nodes black-holed: p50 {:?}, p99 {:?}, max {:?} ({} publishes, deliver timeout {CHAOS_DELIVER_TIMEOUT:?}, {failed} Deliver failures; after the first second {} publishes, {waited} of them waited the timeout)",
        pct(50),
        pct(99),
        latencies.last().unwrap(),
        latencies.len(),
        after_first_second.len(),
    );
    // Once the node's breaker is open (within the first second of the
    // black hole), a publish no longer waits for that node; only the
    // breaker's half-open probes may, now and then.
    assert!(
        !after_first_second.is_empty(),
        "no publish after the first second"
    );
    assert!(
        waited * 4 <= after_first_second.len(),
        "{waited} of {} publishes after the first second waited the deliver timeout: {after_first_second:?}",
        after_first_second.len()
    );

    // The healthy nodes' viewers: every comment, once, in order.
    let expected: Vec<(String, u64)> = (1..=n).map(|i| (format!("c{i}"), c0.offset + i)).collect();
    for (i, viewer) in viewers.iter_mut().enumerate().take(2) {
        assert_eq!(
            ordered_until(viewer, &format!("c{n}")).await,
            expected,
            "viewer of node {i}"
        );
    }
    // The leaver drops its stream on the black-holed node and resumes on a
    // healthy one from the last event it had (c0).
    drop(leaver);
    let mut resumed = subscribe(&mut node(0), room, Some(c0)).await.unwrap();
    assert!(resumed.started.recovered, "{:?}", resumed.started);
    assert_eq!(
        ordered_until(&mut resumed, &format!("c{n}")).await,
        expected,
        "the resumed viewer"
    );

    // Traffic passes again; one more comment, then every viewer has had
    // every event once, in order (node 2's viewer from the history while its
    // node was unreachable, or from the late Deliver calls now).
    proxy.set_mode(ProxyMode::Pass);
    let last = publish(&mut dispatch, room, comment("after"), None)
        .await
        .unwrap();
    let mut expected_black_holed = expected.clone();
    expected_black_holed.push(("after".to_owned(), last.offset));
    assert_eq!(
        ordered_until(&mut viewers[2], "after").await,
        expected_black_holed,
        "the black-holed node's viewer"
    );
    for viewer in viewers.iter_mut().take(2).chain([&mut resumed]) {
        assert_eq!(
            ordered_until(viewer, "after").await,
            vec![("after".to_owned(), last.offset)],
            "nothing twice after the node came back"
        );
    }
}

fn is_comment(event: &RoomEvent) -> bool {
    matches!(event.kind, Some(room_event::Kind::Comment(_)))
}

/// The resume position in an ended stream's trailers.
fn resume_trailers(status: &tonic::Status) -> StreamPosition {
    let read = |key: &str| -> u64 {
        status
            .metadata()
            .get(key)
            .unwrap_or_else(|| panic!("{key} in the trailers"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    StreamPosition {
        epoch: read(RESUME_EPOCH),
        offset: read(RESUME_OFFSET),
    }
}

async fn batched_delivery_keeps_order_and_resumes_from_a_batch_without_gap_or_duplicate(
    backend: HotBackend,
) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    // Tiny windows: once a few messages are in flight the node cannot send
    // more, so the comments below wait for this stream in the room's feed.
    let stream = slow_stream(&mesh.nodes[0].0, batched(room, None)).await;
    let mut viewer = Viewer::started(stream).await.unwrap();
    let first = 20; // the test queue holds 32
    for i in 1..=first {
        mesh.comment(0, room, &format!("c{i}")).await;
    }
    let mut seen = Vec::new();
    let mut resume = None;
    while (seen.len() as u64) < first {
        let batch = viewer.next_batch().await.unwrap();
        let offsets: Vec<u64> = batch
            .iter()
            .filter(|e| is_comment(e))
            .map(|e| e.offset)
            .collect();
        seen.extend(offsets);
        // Any position in a batch is a resume point; take its last event's.
        let last = batch.last().unwrap();
        resume = Some(StreamPosition {
            epoch: last.epoch,
            offset: last.offset,
        });
    }
    assert!(
        viewer.batches.iter().any(|&n| n > 1),
        "the comments that waited came in one batch: {:?}",
        viewer.batches
    );
    drop(viewer);
    // More comments while the viewer is away, and while it resumes on
    // another node, from the last position of its last batch.
    let total = 60;
    for i in first + 1..=40 {
        mesh.comment(1, room, &format!("c{i}")).await;
    }
    let publisher = {
        let dispatcher = mesh.dispatcher(0);
        tokio::spawn(async move {
            let mut dispatcher = dispatcher;
            for i in 41..=total {
                publish(&mut dispatcher, room, comment(&format!("c{i}")), None)
                    .await
                    .unwrap();
            }
        })
    };
    let stream = mesh
        .node(1)
        .subscribe(batched(room, resume))
        .await
        .unwrap()
        .into_inner();
    let mut viewer = Viewer::started(stream).await.unwrap();
    assert!(viewer.started.recovered, "{:?}", viewer.started);
    while (seen.len() as u64) < total {
        let event = viewer.next().await.unwrap().expect("the stream went on");
        if is_comment(&event) {
            seen.push(event.offset);
        }
    }
    publisher.await.unwrap();
    assert_eq!(
        seen,
        (1..=total).collect::<Vec<_>>(),
        "every comment once, in offset order"
    );
}

async fn batched_delivery_conflates_latest_values(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let stream = slow_stream(&mesh.nodes[0].0, batched(room, None)).await;
    let mut viewer = Viewer::started(stream).await.unwrap();
    // Not reading: every total below is published while the viewer stalls.
    let mut dispatcher = mesh.dispatcher(0);
    for total in 1..=500 {
        let kind = room_event::Kind::LoveTotal(LoveTotal { total });
        publish(&mut dispatcher, room, kind, None).await.unwrap();
    }
    let marker = mesh.comment(0, room, "marker").await;
    let mut totals = Vec::new();
    loop {
        let batch = viewer.next_batch().await.unwrap();
        let in_batch: Vec<&RoomEvent> = batch
            .iter()
            .filter(|e| matches!(e.kind, Some(room_event::Kind::LoveTotal(_))))
            .collect();
        assert!(
            in_batch.len() <= 1,
            "one value per kind per batch: {batch:?}"
        );
        for event in in_batch {
            if let Some(room_event::Kind::LoveTotal(t)) = &event.kind {
                totals.push(t.total);
            }
            // A latest value carries the position of the last ordered event
            // sent before it.
            if batch.iter().any(is_comment) {
                assert_eq!(event.offset, marker.offset, "{batch:?}");
            }
        }
        if batch.iter().any(is_comment) {
            // Ordered events come first in a batch, then the latest values.
            let first_total = batch.iter().position(|e| !is_comment(e));
            let last_comment = batch.iter().rposition(is_comment);
            assert!(
                first_total.is_none_or(|t| Some(t) > last_comment),
                "{batch:?}"
            );
            if totals.last() == Some(&500) {
                break;
            }
        }
    }
    assert!(
        totals.len() < 50,
        "a stalled viewer gets a few totals, not the backlog of 500: {} arrived",
        totals.len()
    );
    assert!(totals.windows(2).all(|w| w[0] < w[1]), "{totals:?}");
}

async fn an_overflowing_batched_stream_ends_with_its_resume_position(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let mut stream = slow_stream(&mesh.nodes[0].0, batched(room, None)).await;
    let total = 200; // the test queue holds 32
    for i in 1..=total {
        mesh.comment(0, room, &format!("c{i}")).await;
    }
    let mut seen = Vec::new();
    let status = loop {
        match tokio::time::timeout(WAIT, stream.message()).await.unwrap() {
            Ok(Some(message)) => match message.message {
                Some(subscribe_response::Message::Batch(batch)) => {
                    seen.extend(
                        batch
                            .events
                            .iter()
                            .filter(|e| is_comment(e))
                            .map(|e| e.offset),
                    );
                }
                Some(subscribe_response::Message::Started(_)) => {}
                other => panic!("expected a batch, got {other:?}"),
            },
            Ok(None) => panic!("the stream ended without an error"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    let resume = resume_trailers(&status);
    assert_eq!(resume.offset, seen.last().copied().unwrap_or(0));
    assert!(
        (seen.len() as u64) < total,
        "the stream overflowed before the end"
    );
    let stream = mesh
        .node(1)
        .subscribe(batched(room, Some(resume)))
        .await
        .unwrap()
        .into_inner();
    let mut viewer = Viewer::started(stream).await.unwrap();
    assert!(viewer.started.recovered);
    while (seen.len() as u64) < total {
        seen.push(viewer.next_ordered().await.offset);
    }
    assert_eq!(seen, (1..=total).collect::<Vec<_>>());
    assert!(
        viewer.batches.iter().any(|&n| n > 1),
        "the replay came in batches: {:?}",
        viewer.batches
    );
}

/// Issue 16, point 5: a dispatcher that dies between the history append and
/// its Deliver calls. The test appends to the room's history as the
/// dispatcher's script does and calls no node; renewals are a minute apart,
/// so only the head check can find the events. Each reaches the viewers of
/// both nodes within `head_check_ms + gap_wait_ms` (plus store round trips),
/// once and in offset order, and a normal publish afterwards follows it.
async fn an_event_appended_without_deliver_reaches_viewers_within_the_bound(backend: HotBackend) {
    let dir = tempfile::tempdir().unwrap();
    let rooms = livemesh_testkit::ongoing_query(dir.path()).await;
    let mut config = base_config(dir.path(), &rooms);
    let subscribe_section = config.section_mut::<SubscribeConfig>();
    subscribe_section.report_interval_ms = 60_000;
    subscribe_section.lease_ms = 120_000;
    subscribe_section.head_check_ms = 100;
    let store = store(backend, &livemesh_testkit::unique_name("lost"));
    let dispatcher = start_dispatcher(&config, &store).await;
    let nodes = [
        start_node(&config, &store, &dispatcher.0).await,
        start_node(&config, &store, &dispatcher.0).await,
    ];
    let room = livemesh_testkit::start_room(rooms.channel(), 1).await;
    let mut viewers = Vec::new();
    for (server, _) in &nodes {
        let mut client = SubscribeServiceClient::new(server.channel());
        viewers.push(subscribe(&mut client, room, None).await.unwrap());
    }
    let mut publisher = PublishServiceClient::new(dispatcher.0.channel());
    let first = publish(&mut publisher, room, comment("delivered"), None)
        .await
        .unwrap();
    for viewer in &mut viewers {
        assert_eq!(text_of(&viewer.next_ordered().await), "delivered");
    }
    // The bound the configuration promises, plus room for two store round
    // trips on a busy CI machine.
    let bound = Duration::from_millis(
        config.section::<SubscribeConfig>().head_check_ms
            + config.section::<SubscribeConfig>().gap_wait_ms
            + 700,
    );
    for n in 0..3u64 {
        let text = format!("appended {n}, never delivered");
        let payload = RoomEvent {
            kind: Some(comment(&text)),
            ..RoomEvent::default()
        }
        .encode_to_vec();
        let appended = store
            .append(&Append {
                room_id: room,
                payload: &payload,
                slot: Slot::Ordered,
                idempotency_key: None,
                ends_room: false,
                now_ms: livemesh_mesh::now_ms(),
            })
            .await
            .unwrap();
        let started = Instant::now();
        let Appended::New { offset, nodes, .. } = appended else {
            panic!("expected a new event, got {appended:?}");
        };
        assert_eq!(offset, first.offset + 1 + n);
        assert_eq!(nodes.len(), 2, "both nodes are registered: {nodes:?}");
        for viewer in &mut viewers {
            let event = viewer.next_ordered().await;
            assert_eq!((text_of(&event), event.offset), (text.as_str(), offset));
        }
        let took = started.elapsed();
        assert!(
            took <= bound,
            "event {n} reached the viewers after {took:?}; the bound is {bound:?}"
        );
    }
    let behind: u64 = nodes
        .iter()
        .map(|(_, node)| node.stats().heads_behind.load(Ordering::Relaxed))
        .sum();
    assert!(
        behind >= 6,
        "each node noticed each event by its head check: {behind}"
    );
    // A normal publish continues the sequence; nothing came twice.
    let after = publish(&mut publisher, room, comment("after"), None)
        .await
        .unwrap();
    assert_eq!(after.offset, first.offset + 4);
    for viewer in &mut viewers {
        let event = viewer.next_ordered().await;
        assert_eq!((text_of(&event), event.offset), ("after", after.offset));
    }
}

/// Reads `stream` until a comment with `text` arrived; checks on every
/// message that it carries a write time between `since` and its arrival
/// exactly when `stamped`.
async fn read_until_comment(
    stream: &mut Streaming<SubscribeResponse>,
    text: &str,
    stamped: bool,
    since: SystemTime,
) {
    loop {
        let message = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("a message in time")
            .unwrap()
            .expect("the stream went on");
        let arrived = SystemTime::now();
        match (message.written_at, stamped) {
            (Some(at), true) => {
                let written = SystemTime::try_from(at).unwrap();
                assert!(
                    since <= written && written <= arrived,
                    "written at {written:?}, not between {since:?} and its arrival {arrived:?}"
                );
            }
            (None, false) => {}
            (at, _) => panic!("stamp_writes {stamped}, but written_at is {at:?}"),
        }
        let events = match message.message {
            Some(subscribe_response::Message::Event(event)) => vec![event],
            Some(subscribe_response::Message::Batch(batch)) => batch.events,
            _ => Vec::new(),
        };
        if events.iter().any(|e| is_comment(e) && text_of(e) == text) {
            return;
        }
    }
}

async fn only_streams_that_ask_get_their_write_times(backend: HotBackend) {
    let mut mesh = mesh(backend).await;
    let room = mesh.start_room().await;
    let since = SystemTime::now();
    let request = |stamp_writes, accept_batches, resume| SubscribeRequest {
        room_id: room,
        viewer_id: 7,
        resume,
        accept_batches,
        stamp_writes,
    };
    let mut streams = Vec::new();
    for (stamped, batches) in [(true, false), (true, true), (false, false), (false, true)] {
        let stream = mesh
            .node(0)
            .subscribe(request(stamped, batches, None))
            .await
            .unwrap()
            .into_inner();
        streams.push((stamped, stream));
    }
    // The start message is stamped too.
    let mut first = mesh
        .node(1)
        .subscribe(request(true, false, None))
        .await
        .unwrap()
        .into_inner();
    let started = first.message().await.unwrap().unwrap();
    assert!(started.written_at.is_some(), "{started:?}");
    let Some(subscribe_response::Message::Started(started)) = started.message else {
        panic!("the first message must be `started`");
    };
    mesh.comment(1, room, "stamped?").await;
    for (stamped, stream) in &mut streams {
        read_until_comment(stream, "stamped?", *stamped, since).await;
    }
    // A resumed stream's replayed events are stamped as they are written.
    for stamped in [true, false] {
        let mut resumed = mesh
            .node(2)
            .subscribe(request(stamped, true, started.position))
            .await
            .unwrap()
            .into_inner();
        read_until_comment(&mut resumed, "stamped?", stamped, since).await;
    }
}
