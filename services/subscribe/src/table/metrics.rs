//! The node's OpenTelemetry instruments.

use livemesh_proto::v1::RoomEvent;

/// The node's OpenTelemetry instruments (exported with every other metric
/// of the process). Recorded per Deliver call and per overflow, never per
/// stream write: the fan-out path stays cheap.
pub(super) struct NodeMetrics {
    /// now − the event's server time, when a Deliver brings it here.
    pub(super) lag: opentelemetry::metrics::Histogram<f64>,
    /// Streams ended for falling behind (their queue was full).
    pub(super) overflows: opentelemetry::metrics::Counter<u64>,
    /// From a `Deliver` reaching the node to the last of the room's
    /// streams sending its event (recorded by the room's feed, per event).
    pub(super) write_delay: opentelemetry::metrics::Histogram<f64>,
    /// Viewer streams held (up on join, down when a stream ends).
    pub(super) streams: opentelemetry::metrics::UpDownCounter<i64>,
    /// Events handed to streams: each released event times the room's
    /// streams, added once per release, never per stream.
    pub(super) deliveries: opentelemetry::metrics::Counter<u64>,
}

/// Fan-out lag buckets in seconds: 1 ms up to 10 s.
const LAG_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl NodeMetrics {
    pub(super) fn new() -> Self {
        let meter = opentelemetry::global::meter("livemesh");
        Self {
            lag: meter
                .f64_histogram("livemesh.fanout.lag")
                .with_unit("s")
                .with_description(
                    "Time from an event's publish (its server_time) to its Deliver reaching a subscribe node",
                )
                .with_boundaries(LAG_BUCKETS.to_vec())
                .build(),
            overflows: meter
                .u64_counter("livemesh.subscribe.queue_drops")
                .with_description(
                    "Viewer streams ended because their queue of ordered events was full",
                )
                .build(),
            write_delay: meter
                .f64_histogram("livemesh.subscribe.write_delay")
                .with_unit("s")
                .with_description(
                    "Time from a Deliver reaching the node to the last of the room's streams sending its event",
                )
                .with_boundaries(livemesh_mesh::metrics::HOP_BUCKETS.to_vec())
                .build(),
            streams: meter
                .i64_up_down_counter("livemesh.subscribe.streams")
                .with_description("Viewer streams this node holds")
                .build(),
            deliveries: meter
                .u64_counter("livemesh.subscribe.deliveries")
                .with_description(
                    "Events handed to viewer streams (each event once per stream of its room)",
                )
                .build(),
        }
    }

    /// Records the lag of each delivered event, once per Deliver call.
    pub(super) fn delivered(&self, events: &[RoomEvent]) {
        let now_ms = livemesh_mesh::now_ms();
        for event in events {
            if let Some(time) = &event.server_time {
                self.lag.record(lag_secs(now_ms, time), &[]);
            }
        }
    }
}

/// Seconds from `server_time` to `now_ms`, 0 for a time in the future. A
/// Deliver's events carry any timestamp the caller put in them: the
/// conversion saturates rather than overflow.
fn lag_secs(now_ms: i64, server_time: &prost_types::Timestamp) -> f64 {
    let at_ms = livemesh_proto::time::ms_from_timestamp(server_time);
    now_ms.saturating_sub(at_ms).max(0) as f64 / 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the property tests: the lag metric computed
    /// `seconds * 1000` of a delivered event's time, which overflows for
    /// extreme timestamps a Deliver may carry.
    #[test]
    fn the_lag_of_extreme_timestamps_does_not_overflow() {
        let ts = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        let now = 1_700_000_000_000;
        assert_eq!(lag_secs(now, &ts(i64::MAX, i32::MAX)), 0.0);
        assert_eq!(lag_secs(now, &ts(1_700_000_000, 0)), 0.0);
        assert_eq!(lag_secs(now, &ts(1_699_999_999, 500_000_000)), 0.5);
        let oldest = lag_secs(now, &ts(i64::MIN, i32::MIN));
        assert!(oldest.is_finite() && oldest > 9.0e15, "{oldest}");
    }
}
