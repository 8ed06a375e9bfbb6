//! One room on a node: its feed, which its streams read, and under the
//! room's lock its sequencer, its newest latest values and its streams.

use std::sync::{Arc, Mutex};

use livemesh_proto::v1::{RoomEvent, room_event};
use prost::Message as _;

use crate::feed::{Cursor, Feed, LatestKind};
use crate::sequencer::Sequencer;

/// One room on this node.
#[derive(Debug)]
pub(crate) struct Room {
    pub(crate) id: u64,
    pub(crate) joined: tokio::sync::OnceCell<()>,
    pub(crate) state: Mutex<RoomState>,
    /// What its streams read: released ordered events and latest values,
    /// encoded once. Written under `state`'s lock, so that the feed's order
    /// is the sequencer's.
    pub(crate) feed: Feed,
}

#[derive(Debug, Default)]
pub(crate) struct RoomState {
    /// The order of the room's ordered events.
    pub(crate) seq: Sequencer,
    /// Local streams of the room.
    pub(crate) streams: u64,
    love_total: Option<Arc<RoomEvent>>,
    viewer_count: Option<Arc<RoomEvent>>,
    pub(crate) gap_fill_running: bool,
    pub(crate) last_reported: Option<u64>,
    /// Taken out of the table: a subscriber holding this room starts over.
    pub(crate) removed: bool,
}

/// A stream as it joined its room.
pub(crate) struct Joined {
    pub(crate) room: Arc<Room>,
    pub(crate) cursor: Cursor,
    pub(crate) epoch: u64,
    /// The last offset released when the stream joined: replay ends here.
    pub(crate) released: u64,
}

impl Room {
    /// A room this node has not joined in the hot store yet.
    pub(crate) fn new(
        id: u64,
        queue_len: usize,
        write_delay: opentelemetry::metrics::Histogram<f64>,
    ) -> Self {
        Self {
            id,
            joined: tokio::sync::OnceCell::new(),
            state: Mutex::new(RoomState::default()),
            feed: Feed::recording(queue_len, write_delay),
        }
    }
}

impl RoomState {
    pub(crate) fn set_latest(&mut self, kind: LatestKind, event: &Arc<RoomEvent>) -> bool {
        let slot = match kind {
            LatestKind::LoveTotal => &mut self.love_total,
            LatestKind::ViewerCount => &mut self.viewer_count,
        };
        // Publishes may race: keep the newest by the dispatcher's clock.
        let newer = slot
            .as_ref()
            .is_none_or(|held| time_of(held) <= time_of(event));
        if newer {
            *slot = Some(event.clone());
        }
        newer
    }
}

/// The slot of a latest-value event; `None` for an ordered one.
pub(crate) fn latest_kind(event: &RoomEvent) -> Option<LatestKind> {
    match event.kind {
        Some(room_event::Kind::LoveTotal(_)) => Some(LatestKind::LoveTotal),
        Some(room_event::Kind::ViewerCount(_)) => Some(LatestKind::ViewerCount),
        _ => None,
    }
}

fn time_of(event: &RoomEvent) -> (i64, i32) {
    event
        .server_time
        .as_ref()
        .map_or((0, 0), |t| (t.seconds, t.nanos))
}

/// Decodes a stored payload and puts back its room and position.
pub(crate) fn decode(room_id: u64, epoch: u64, offset: u64, payload: &[u8]) -> Option<RoomEvent> {
    let mut event = RoomEvent::decode(payload).ok()?;
    event.room_id = room_id;
    event.epoch = epoch;
    event.offset = offset;
    Some(event)
}
