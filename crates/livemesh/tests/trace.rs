//! One `SendLoves` makes one trace: the caller's span, the counter's
//! SendLoves server span, the publish tick's span, the dispatcher's Publish
//! server span and the subscribe node's Deliver server span, each the child
//! of the one before (through W3C trace context in gRPC metadata and the
//! counter's remembered origin), exported by an in-memory exporter. And one
//! `EndRoom` makes one trace down to the gift-settler's settlement, through
//! the room change read from ongoing-query's `Watch`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use livemesh_counter::Counter;
use livemesh_counter::CounterConfig;
use livemesh_fanout::{FanoutSettings, FanoutStore};
use livemesh_gift_settler::GiftSettler;
use livemesh_gift_settler::GiftsConfig;
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{
    EndRoomRequest, SendLovesRequest, SubscribeRequest, room_event, subscribe_response,
};
use livemesh_publish::PublishConfig;
use livemesh_subscribe::SubscribeConfig;
use livemesh_testkit::TestServer;
use opentelemetry::trace::{SpanId, SpanKind, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

const WAIT: Duration = Duration::from_secs(10);

/// Every span a test process ends goes to the returned exporter. Global:
/// the servers' tasks run on other threads.
fn install_tracing() -> InMemorySpanExporter {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("trace-test"))
        .with_filter(livemesh_mesh::telemetry::otel_filter());
    tracing_subscriber::registry().with(otel).init();
    exporter
}

fn server_span<'a>(spans: &'a [SpanData], trace: TraceId, name: &str) -> Option<&'a SpanData> {
    spans.iter().find(|s| {
        s.span_context.trace_id() == trace && s.span_kind == SpanKind::Server && s.name == name
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_send_loves_is_one_connected_trace_across_counter_publish_and_subscribe() {
    let exporter = install_tracing();
    let (_dir, mut config, rooms) = livemesh_testkit::config_with_rooms().await;
    let rooms_url = rooms.url();
    config.section_mut::<PublishConfig>().ongoing_query_url = rooms_url.clone();
    config.section_mut::<SubscribeConfig>().ongoing_query_url = rooms_url.clone();
    config.section_mut::<CounterConfig>().ongoing_query_url = rooms_url;
    config.section_mut::<CounterConfig>().flush_tick_ms = 5;
    config.section_mut::<CounterConfig>().publish_tick_ms = 20;
    let store = FanoutStore::memory(FanoutSettings::default());

    let (publish, node) = common::dispatcher_and_node(&mut config, store).await;
    config.section_mut::<CounterConfig>().publish_url = publish.url();
    let counter = TestServer::start(Counter::from_config(&config).await.unwrap()).await;

    let room_id = livemesh_testkit::start_room(rooms.channel(), 1).await;
    let mut viewer = SubscribeServiceClient::new(node.channel())
        .subscribe(SubscribeRequest {
            room_id,
            viewer_id: 7,
            ..SubscribeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let started = tokio::time::timeout(WAIT, viewer.message()).await.unwrap();
    assert!(
        matches!(
            started.unwrap().unwrap().message,
            Some(subscribe_response::Message::Started(_))
        ),
        "the stream opens with its start message"
    );

    // The caller's own span: the trace's root.
    let root = tracing::info_span!(target: "livemesh_test", "viewer taps");
    let reply = CounterServiceClient::new(counter.channel())
        .send_loves(SendLovesRequest {
            room_id,
            viewer_id: 42,
            batch_id: "b1".into(),
            taps_ms: vec![0],
        })
        .instrument(root.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.accepted, 1, "{reply:?}");
    let root_context = {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        root.context().span().span_context().clone()
    };
    drop(root);
    let trace = root_context.trace_id();
    assert_ne!(trace, TraceId::INVALID, "the root span has a trace id");

    // The viewer sees the total the publish tick sent.
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = tokio::time::timeout(left, viewer.message())
            .await
            .expect("the love total reaches the viewer in time")
            .unwrap()
            .expect("the stream stays open");
        if let Some(subscribe_response::Message::Event(event)) = message.message
            && let Some(room_event::Kind::LoveTotal(total)) = event.kind
            && total.total >= 1
        {
            break;
        }
    }

    // Spans end when their calls' trailers pass, a moment after the
    // viewer's event: wait until the chain is complete and connected.
    let names = [
        "livemesh.v1.CounterService/SendLoves",
        "livemesh.v1.PublishService/Publish",
        "livemesh.v1.SubscribeService/Deliver",
    ];
    let spans = connected_trace(&exporter, trace, root_context.span_id(), |spans| {
        names
            .iter()
            .all(|name| server_span(spans, trace, name).is_some())
    })
    .await;

    // Walking up from the Deliver server span passes through Publish and
    // SendLoves and reaches the caller's span.
    let by_id: HashMap<SpanId, &SpanData> = spans
        .iter()
        .map(|s| (s.span_context.span_id(), s))
        .collect();
    let mut ancestry = Vec::new();
    let mut at = server_span(&spans, trace, names[2]).unwrap();
    loop {
        ancestry.push(at.name.to_string());
        if at.span_context.span_id() == root_context.span_id() {
            break;
        }
        at = by_id[&at.parent_span_id];
    }
    let position = |name: &str| ancestry.iter().position(|n| n == name);
    let (deliver, publish, send) = (
        position(names[2]).unwrap(),
        position(names[1]).expect("Publish is an ancestor of Deliver"),
        position(names[0]).expect("SendLoves is an ancestor of Publish"),
    );
    assert!(deliver < publish && publish < send, "{ancestry:?}");
    assert!(
        ancestry.iter().any(|n| n == "counter.publish_total"),
        "the publish tick's span is on the path: {ancestry:?}"
    );
    let deliver_span = server_span(&spans, trace, names[2]).unwrap();
    let code = deliver_span
        .attributes
        .iter()
        .find(|kv| kv.key.as_str() == "rpc.grpc.status_code")
        .map(|kv| kv.value.as_str().into_owned());
    assert_eq!(code.as_deref(), Some("0"), "{:?}", deliver_span.attributes);
    drop((counter, node, publish, rooms));
}

/// The spans of `trace` once `done` holds for them and each has its parent
/// among them (or is `root`); panics with what the trace holds at the deadline.
async fn connected_trace(
    exporter: &InMemorySpanExporter,
    trace: TraceId,
    root: SpanId,
    done: impl Fn(&[SpanData]) -> bool,
) -> Vec<SpanData> {
    let deadline = Instant::now() + WAIT;
    loop {
        let of_trace: Vec<SpanData> = exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| s.span_context.trace_id() == trace)
            .collect();
        let ids: Vec<SpanId> = of_trace.iter().map(|s| s.span_context.span_id()).collect();
        let connected = of_trace
            .iter()
            .all(|s| s.span_context.span_id() == root || ids.contains(&s.parent_span_id));
        if connected && ids.contains(&root) && done(&of_trace) {
            return of_trace;
        }
        if Instant::now() > deadline {
            let found: Vec<_> = of_trace
                .iter()
                .map(|s| (s.name.clone(), s.span_kind.clone(), s.parent_span_id))
                .collect();
            panic!("within {WAIT:?}, trace {trace} did not complete; it holds: {found:#?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ending_a_room_is_one_trace_through_watch_to_the_settlement() {
    let exporter = install_tracing();
    let (_dir, mut config, rooms) = livemesh_testkit::config_with_rooms().await;
    config.section_mut::<GiftsConfig>().ongoing_query_url = rooms.url();
    // No dispatcher: the settlement does not need one.
    config.section_mut::<GiftsConfig>().publish_url = rooms.url();
    let settler = TestServer::start(GiftSettler::from_config(&config).await.unwrap()).await;
    let room_id = livemesh_testkit::start_room(rooms.channel(), 5).await;
    // The settler follows the Watch once it has opened the room's accounts.
    let deadline = Instant::now() + WAIT;
    while !exporter
        .get_finished_spans()
        .unwrap()
        .iter()
        .any(|s| s.name == "ledger.open_room")
    {
        assert!(
            Instant::now() < deadline,
            "the settler never opened the room"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let root = tracing::info_span!(target: "livemesh_test", "admin ends the room");
    RoomAdminServiceClient::new(rooms.channel())
        .end_room(EndRoomRequest { room_id })
        .instrument(root.clone())
        .await
        .unwrap();
    let root_context = {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        root.context().span().span_context().clone()
    };
    drop(root);

    let spans = connected_trace(
        &exporter,
        root_context.trace_id(),
        root_context.span_id(),
        |spans| spans.iter().any(|s| s.name == "settle"),
    )
    .await;
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
    assert!(
        names.contains(&"livemesh.v1.RoomAdminService/EndRoom"),
        "{names:?}"
    );
    assert!(names.contains(&"room_change"), "{names:?}");
    assert!(names.contains(&"ledger.sweep"), "{names:?}");
    drop((settler, rooms));
}
