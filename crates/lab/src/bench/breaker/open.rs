//! Node 4's circuit: when publishes stopped waiting for it, and how fast a
//! call to it is refused once its breaker is open.

use livemesh_fanout::FanoutStore;
use livemesh_mesh::breaker::BreakerState;
use livemesh_mesh::{ClientStack, MeshChannel};
use livemesh_publish::Dispatcher;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

use super::TRIP_ROUND;
use super::phase::Summary;

/// What [`watch_node4`] saw during a phase.
#[derive(Debug, Default)]
pub(super) struct Node4Watch {
    /// (samples without node 4 registered for the room, samples).
    pub(super) out: (u64, u64),
    /// Seconds into the phase when the dispatcher's breaker for node 4 was
    /// first seen open.
    pub(super) first_open: Option<f64>,
    /// Times it was seen going from not open to open.
    pub(super) openings: u64,
    /// Share of the samples in which it was not closed.
    pub(super) not_closed: f64,
}

/// Samples, while `running`, the state of the dispatcher's breaker for
/// node 4 every 2 ms and the room's registered nodes every 50 ms.
pub(super) async fn watch_node4(
    store: FanoutStore,
    dispatcher: Dispatcher,
    room_id: u64,
    node4: String,
    running: Arc<std::sync::atomic::AtomicBool>,
) -> Node4Watch {
    let started = Instant::now();
    let mut watch = Node4Watch::default();
    let (mut samples, mut not_closed) = (0_u64, 0_u64);
    let mut was_open = false;
    while running.load(Ordering::Acquire) {
        let state = dispatcher.node_breaker(&node4);
        let open = state == Some(BreakerState::Open);
        if open && !was_open {
            watch.openings += 1;
            watch
                .first_open
                .get_or_insert(started.elapsed().as_secs_f64());
        }
        was_open = open;
        not_closed += u64::from(state.is_some_and(|s| s != BreakerState::Closed));
        if samples % 25 == 0 {
            let nodes = store.nodes(room_id, livemesh_mesh::now_ms()).await;
            watch.out.1 += 1;
            if !nodes.is_ok_and(|nodes| nodes.contains(&node4)) {
                watch.out.0 += 1;
            }
        }
        samples += 1;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    watch.not_closed = not_closed as f64 / samples.max(1) as f64;
    watch
}

/// `open_reject`: how fast the client stack refuses a call to the
/// black-holed node once its breaker is open.
pub(super) struct OpenReject {
    /// Whether a call was ever refused as "circuit open".
    pub(super) tripped: bool,
    pub(super) trip_time: Duration,
    pub(super) calls: usize,
    pub(super) rejected: Summary,
    /// Calls that were not refused (half-open probes, or every call when
    /// no breaker tripped).
    pub(super) other: Summary,
    pub(super) other_kinds: BTreeMap<String, usize>,
}

fn is_circuit_open(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && status.message().to_ascii_lowercase().contains("circuit")
}

async fn health_check(mut client: HealthClient<MeshChannel>) -> (Duration, Option<tonic::Status>) {
    let started = Instant::now();
    let reply = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await;
    (started.elapsed(), reply.err())
}

pub(super) async fn open_reject(
    stack: &ClientStack,
    uri: &str,
    calls: usize,
    request_timeout: Duration,
) -> anyhow::Result<OpenReject> {
    let client = HealthClient::new(stack.channel(uri)?);
    let trip_started = Instant::now();
    let trip_limit = request_timeout * 4;
    let mut tripped = false;
    while !tripped && trip_started.elapsed() < trip_limit {
        let mut round = JoinSet::new();
        for _ in 0..TRIP_ROUND {
            round.spawn(health_check(client.clone()));
        }
        while let Some(joined) = round.join_next().await {
            tripped |= joined?.1.as_ref().is_some_and(is_circuit_open);
        }
    }
    let trip_time = trip_started.elapsed();

    let mut rejected = Vec::new();
    let mut other = Vec::new();
    let mut other_kinds = BTreeMap::new();
    let mut record = |(latency, error): (Duration, Option<tonic::Status>)| match error {
        Some(status) if is_circuit_open(&status) => rejected.push(latency),
        outcome => {
            other.push(latency);
            let kind = outcome.map_or("OK".to_owned(), |s| format!("{:?}", s.code()));
            *other_kinds.entry(kind).or_insert(0) += 1;
        }
    };
    let timed = if tripped {
        // One at a time: each latency is the refusal's own.
        for _ in 0..calls {
            record(health_check(client.clone()).await);
        }
        calls
    } else {
        let mut round = JoinSet::new();
        for _ in 0..TRIP_ROUND {
            round.spawn(health_check(client.clone()));
        }
        while let Some(joined) = round.join_next().await {
            record(joined?);
        }
        TRIP_ROUND
    };
    Ok(OpenReject {
        tripped,
        trip_time,
        calls: timed,
        rejected: Summary::of(rejected),
        other: Summary::of(other),
        other_kinds,
    })
}
