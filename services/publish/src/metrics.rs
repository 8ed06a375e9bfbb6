//! The dispatcher's OpenTelemetry instruments (exported with every other
//! metric of the process). Recorded once per published event, never per
//! node or per viewer.

use std::time::Instant;

use livemesh_proto::v1::room_event;
use opentelemetry::KeyValue;

pub(crate) struct PublishMetrics {
    /// Events stored (not duplicates), by kind.
    events: opentelemetry::metrics::Counter<u64>,
    /// From the publish's arrival at the dispatcher to its `Deliver` calls
    /// going out (the room check and the store's append in between).
    deliver_delay: opentelemetry::metrics::Histogram<f64>,
    kinds: [KeyValue; 5],
}

impl PublishMetrics {
    pub(crate) fn new() -> Self {
        let meter = opentelemetry::global::meter("livemesh");
        Self {
            events: meter
                .u64_counter("livemesh.publish.events")
                .with_description("Events the dispatcher stored and fanned out, by kind")
                .build(),
            deliver_delay: meter
                .f64_histogram("livemesh.publish.deliver_delay")
                .with_unit("s")
                .with_description(
                    "Time from a publish reaching the dispatcher to its Deliver calls going out",
                )
                .with_boundaries(livemesh_mesh::metrics::HOP_BUCKETS.to_vec())
                .build(),
            kinds: [
                "love_total",
                "comment",
                "gift",
                "viewer_count",
                "room_ended",
            ]
            .map(|kind| KeyValue::new("kind", kind)),
        }
    }

    /// One stored event of `kind`.
    pub(crate) fn stored(&self, kind: &room_event::Kind) {
        let index = match kind {
            room_event::Kind::LoveTotal(_) => 0,
            room_event::Kind::Comment(_) => 1,
            room_event::Kind::Gift(_) => 2,
            room_event::Kind::ViewerCount(_) => 3,
            room_event::Kind::RoomEnded(_) => 4,
        };
        self.events.add(1, std::slice::from_ref(&self.kinds[index]));
    }

    /// The `Deliver` calls of a publish that arrived at `accepted` go out now.
    pub(crate) fn delivering(&self, accepted: Instant) {
        self.deliver_delay
            .record(accepted.elapsed().as_secs_f64(), &[]);
    }
}
