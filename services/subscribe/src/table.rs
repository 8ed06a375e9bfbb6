//! The node's in-memory room table: room -> local streams, and per room the
//! sequencer that hands ordered events to the streams in offset order.
//!
//! **Invariant:** a room's ordered events reach each of its local streams in
//! offset order, each once. Dispatchers may deliver out of order (two
//! publishes racing) or not at all (a failed Deliver); an event that arrives
//! ahead of a missing one waits up to `gap_wait`, then the node fetches the
//! missing ones from the room's history. The head check (every
//! `head_check`) and the renewal loop also compare the history's head with
//! what the node has released, so a lost last event is fetched too: an event
//! whose dispatcher died between the append and its Deliver reaches the
//! streams within `head_check + gap_wait` plus two store round trips.

use livemesh_mesh::lock;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use livemesh_fanout::{FanoutStore, Head, StoreError};
use livemesh_mesh::MeshChannel;
use livemesh_proto::encoded::{Latest, Ordered};
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::{PublishRequest, RoomEvent, ViewerCount, room_event};
use livemesh_rooms::RoomDirectory;
use prost::Message as _;

use crate::feed::{Cursor, Feed, LatestKind};

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// How dispatchers reach this node (`http://host:port`); also its name
    /// in the hot store.
    pub node_id: String,
    pub queue_len: usize,
    /// The largest `EventBatch` message a stream sends (bytes of events).
    pub max_batch_bytes: usize,
    pub lease: Duration,
    pub report_interval: Duration,
    pub gap_wait: Duration,
    /// How often rooms with viewers are compared with their history's
    /// head ([`NodeInner::check_heads_once`]); zero: only at renewals.
    pub head_check: Duration,
}

/// Counters of what the node did.
#[derive(Debug, Default)]
pub struct NodeStats {
    /// Deliver calls received (for any room).
    pub deliver_calls: AtomicU64,
    /// Ordered events released to the room's streams (one per stream).
    pub ordered_delivered: AtomicU64,
    /// Streams ended for falling behind.
    pub overflows: AtomicU64,
    /// Missing events fetched from the history.
    pub gap_filled: AtomicU64,
    /// Head checks that found the history ahead of what the node released
    /// with no later event delivered (a lost Deliver).
    pub heads_behind: AtomicU64,
    /// Events the history no longer held when fetched (trimmed or lost).
    pub gap_skipped: AtomicU64,
    /// Viewer counts published.
    pub counts_published: AtomicU64,
}

/// The node's OpenTelemetry instruments (exported with every other metric
/// of the process). Recorded per Deliver call and per overflow, never per
/// stream write: the fan-out path stays cheap.
struct NodeMetrics {
    /// now − the event's server time, when a Deliver brings it here.
    lag: opentelemetry::metrics::Histogram<f64>,
    /// Streams ended for falling behind (their queue was full).
    overflows: opentelemetry::metrics::Counter<u64>,
}

/// Fan-out lag buckets in seconds: 1 ms up to 10 s.
const LAG_BUCKETS: &[f64] = &[
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl NodeMetrics {
    fn new() -> Self {
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
        }
    }

    /// Records the lag of each delivered event, once per Deliver call.
    fn delivered(&self, events: &[RoomEvent]) {
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

/// The node's shared state.
pub struct NodeInner {
    pub settings: NodeSettings,
    pub store: FanoutStore,
    pub rooms: RoomDirectory,
    pub publish: PublishServiceClient<MeshChannel>,
    pub stats: NodeStats,
    metrics: NodeMetrics,
    table: Mutex<HashMap<u64, Arc<Room>>>,
}

impl std::fmt::Debug for NodeInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeInner")
            .field("node_id", &self.settings.node_id)
            .finish_non_exhaustive()
    }
}

/// One room on this node.
#[derive(Debug)]
pub struct Room {
    pub id: u64,
    joined: tokio::sync::OnceCell<()>,
    state: Mutex<RoomState>,
    /// What its streams read: released ordered events and latest values,
    /// encoded once. Written under `state`'s lock, so that the feed's order
    /// is the sequencer's.
    pub feed: Feed,
}

#[derive(Debug, Default)]
struct RoomState {
    /// 0 until the node has joined the room in the hot store.
    epoch: u64,
    /// The last offset handed to the streams.
    released: u64,
    /// Ordered events ahead of `released + 1`.
    pending: BTreeMap<u64, Arc<RoomEvent>>,
    /// The history's head as last seen by a renewal.
    known_head: u64,
    /// Events delivered before the join finished.
    early: Vec<Arc<RoomEvent>>,
    /// Local streams of the room.
    streams: u64,
    love_total: Option<Arc<RoomEvent>>,
    viewer_count: Option<Arc<RoomEvent>>,
    gap_fill_running: bool,
    last_reported: Option<u64>,
    ended: bool,
    /// Taken out of the table: a subscriber holding this room starts over.
    removed: bool,
}

/// A stream as it joined its room.
pub struct Joined {
    pub room: Arc<Room>,
    pub cursor: Cursor,
    pub epoch: u64,
    /// The last offset released when the stream joined: replay ends here.
    pub released: u64,
}

/// Why a stream could not join.
#[derive(Debug)]
pub enum JoinError {
    Ended,
    Store(StoreError),
}

impl RoomState {
    /// Adds an ordered event; returns the events now releasable, in order.
    fn sequence(&mut self, event: Arc<RoomEvent>) -> Vec<Arc<RoomEvent>> {
        if self.epoch == 0 {
            self.early.push(event);
            return Vec::new();
        }
        if event.epoch < self.epoch {
            return Vec::new(); // from a history that no longer exists
        }
        if event.epoch > self.epoch {
            // The history restarted: offsets count from 1 again.
            self.epoch = event.epoch;
            self.released = 0;
            self.known_head = 0;
            self.pending.clear();
        }
        if event.offset > self.released {
            self.pending.insert(event.offset, event);
        }
        self.drain()
    }

    fn drain(&mut self) -> Vec<Arc<RoomEvent>> {
        let mut ready = Vec::new();
        // Offsets come from Deliver calls: one at u64::MAX must end the
        // run, not overflow (the room has no offset after it).
        while let Some(next) = self.released.checked_add(1)
            && let Some(event) = self.pending.remove(&next)
        {
            self.released = next;
            ready.push(event);
        }
        ready
    }

    /// The range a gap fill should fetch, if any: (after, upto].
    fn gap(&self) -> Option<(u64, u64)> {
        if self.epoch == 0 || self.ended {
            return None;
        }
        let upto = match self.pending.keys().next() {
            Some(first) => first - 1,
            None => self.known_head,
        };
        (upto > self.released).then_some((self.released, upto))
    }

    fn set_latest(&mut self, kind: LatestKind, event: &Arc<RoomEvent>) -> bool {
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
pub fn latest_kind(event: &RoomEvent) -> Option<LatestKind> {
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
pub fn decode(room_id: u64, epoch: u64, offset: u64, payload: &[u8]) -> Option<RoomEvent> {
    let mut event = RoomEvent::decode(payload).ok()?;
    event.room_id = room_id;
    event.epoch = epoch;
    event.offset = offset;
    Some(event)
}

impl NodeInner {
    pub fn new(
        settings: NodeSettings,
        store: FanoutStore,
        rooms: RoomDirectory,
        publish: PublishServiceClient<MeshChannel>,
    ) -> Self {
        Self {
            settings,
            store,
            rooms,
            publish,
            stats: NodeStats::default(),
            metrics: NodeMetrics::new(),
            table: Mutex::new(HashMap::new()),
        }
    }

    /// A stream fell too far behind and was ended (counted by the stream,
    /// which notices it when it next reads the feed).
    pub fn count_overflow(&self) {
        self.stats.overflows.fetch_add(1, Ordering::Relaxed);
        self.metrics.overflows.add(1, &[]);
    }

    /// How many rooms this node holds state for (its room table).
    pub fn stored_rooms(&self) -> usize {
        lock(&self.table).len()
    }

    /// Local streams per room.
    pub fn stream_counts(&self) -> Vec<(u64, u64)> {
        let rooms: Vec<Arc<Room>> = lock(&self.table).values().cloned().collect();
        rooms
            .iter()
            .map(|room| (room.id, lock(&room.state).streams))
            .collect()
    }

    /// Adds a stream to the room, joining the room in the hot store first
    /// if this node has no viewer of it yet.
    pub async fn join(
        self: &Arc<Self>,
        room_id: u64,
        skip: (u64, u64),
    ) -> Result<Joined, JoinError> {
        loop {
            let room = lock(&self.table)
                .entry(room_id)
                .or_insert_with(|| {
                    Arc::new(Room {
                        id: room_id,
                        joined: tokio::sync::OnceCell::new(),
                        state: Mutex::new(RoomState::default()),
                        feed: Feed::new(self.settings.queue_len),
                    })
                })
                .clone();
            let joined = room
                .joined
                .get_or_try_init(|| async {
                    let head = self
                        .store
                        .join(
                            room_id,
                            &self.settings.node_id,
                            1,
                            duration_ms(self.settings.lease),
                            livemesh_mesh::now_ms(),
                        )
                        .await?;
                    self.start_room(&room, head);
                    Ok::<(), StoreError>(())
                })
                .await;
            if let Err(err) = joined {
                self.remove_if_empty(&room);
                return Err(JoinError::Store(err));
            }
            let mut state = lock(&room.state);
            if state.removed {
                continue; // emptied and removed meanwhile: join afresh
            }
            if state.ended {
                return Err(JoinError::Ended);
            }
            // Live events from here on (the feed's head is read under the
            // room's lock, which every release holds): those up to
            // `released` are replayed, and a client ahead of this node (it
            // resumed from a position another node had sent) gets nothing
            // twice. The room's newest latest values come first.
            let resume_offset = if skip.0 == state.epoch { skip.1 } else { 0 };
            let start = (state.epoch, state.released.max(resume_offset));
            let cursor = room.feed.cursor(start, start);
            state.streams += 1;
            let (epoch, released) = (state.epoch, state.released);
            drop(state);
            return Ok(Joined {
                room,
                cursor,
                epoch,
                released,
            });
        }
    }

    /// The room's state after the hot-store join: its head, latest values,
    /// and whatever was delivered while joining.
    fn start_room(self: &Arc<Self>, room: &Arc<Room>, head: Head) {
        let mut state = lock(&room.state);
        state.epoch = head.epoch;
        state.released = head.offset;
        state.ended = head.ended;
        for (offset, payload) in &head.latest {
            if let Some(event) = decode(room.id, head.epoch, *offset, payload)
                && let Some(kind) = latest_kind(&event)
            {
                let event = Arc::new(event);
                if state.set_latest(kind, &event) {
                    room.feed.set_latest(kind, Latest::new(&event));
                }
            }
        }
        let early = std::mem::take(&mut state.early);
        drop(state);
        for event in early {
            self.deliver_one(room, event);
        }
    }

    /// Removes a stream; the last one out takes the room off the table and
    /// out of the hot store.
    pub fn remove_stream(self: &Arc<Self>, room: &Arc<Room>) {
        {
            let mut state = lock(&room.state);
            state.streams = state.streams.saturating_sub(1);
        }
        self.remove_if_empty(room);
    }

    fn remove_if_empty(self: &Arc<Self>, room: &Arc<Room>) {
        let mut table = lock(&self.table);
        let mut state = lock(&room.state);
        if state.streams > 0 || state.removed {
            return;
        }
        state.removed = true;
        let joined = room.joined.initialized();
        drop(state);
        if table
            .get(&room.id)
            .is_some_and(|held| Arc::ptr_eq(held, room))
        {
            table.remove(&room.id);
        }
        drop(table);
        if joined {
            let node = self.clone();
            let room_id = room.id;
            tokio::spawn(async move {
                if let Err(err) = node.store.leave(room_id, &node.settings.node_id).await {
                    // The lease ends it anyway.
                    tracing::debug!(room_id, %err, "leaving the room in the hot store failed");
                }
            });
        }
    }

    /// Hands delivered events to the room's streams; returns how many
    /// streams the room has here (0: no viewers on this node).
    pub fn deliver(self: &Arc<Self>, room_id: u64, events: Vec<RoomEvent>) -> u64 {
        self.stats.deliver_calls.fetch_add(1, Ordering::Relaxed);
        self.metrics.delivered(&events);
        let Some(room) = lock(&self.table).get(&room_id).cloned() else {
            return 0;
        };
        for event in events {
            self.deliver_one(&room, Arc::new(event));
        }
        lock(&room.state).streams
    }

    fn deliver_one(self: &Arc<Self>, room: &Arc<Room>, event: Arc<RoomEvent>) {
        let mut state = lock(&room.state);
        if state.removed || state.ended {
            return;
        }
        if let Some(kind) = latest_kind(&event) {
            if state.epoch == 0 {
                state.early.push(event);
            } else if state.set_latest(kind, &event) {
                // Encoded once for every stream of the room.
                room.feed.set_latest(kind, Latest::new(&event));
            }
            return;
        }
        let ready = state.sequence(event);
        self.release(room, &mut state, ready);
        if state.gap().is_some() && !state.gap_fill_running {
            state.gap_fill_running = true;
            tokio::spawn(self.clone().fill_gaps(room.clone()));
        }
    }

    /// Hands released ordered events to the room's streams: each is
    /// encoded once and pushed to the room's feed, which wakes the streams
    /// waiting for it.
    fn release(
        self: &Arc<Self>,
        room: &Arc<Room>,
        state: &mut RoomState,
        ready: Vec<Arc<RoomEvent>>,
    ) {
        if ready.is_empty() {
            return;
        }
        let ends = ready
            .iter()
            .position(|event| matches!(event.kind, Some(room_event::Kind::RoomEnded(_))));
        // Nothing is released after the room-ended event.
        let released = ends.map_or(ready.len(), |at| at + 1);
        self.stats
            .ordered_delivered
            .fetch_add(released as u64 * state.streams, Ordering::Relaxed);
        room.feed.push_ordered(
            ready[..released]
                .iter()
                .map(|event| (event.epoch, event.offset, Ordered::new(event))),
        );
        if ends.is_some() {
            state.ended = true;
            state.pending.clear();
            room.feed.finish();
            let node = self.clone();
            let room = room.clone();
            // Outside this lock: the table lock comes first.
            tokio::spawn(async move { node.forget_ended(&room) });
        }
    }

    /// An ended room leaves the table (its streams are finishing) and the hot store.
    fn forget_ended(self: &Arc<Self>, room: &Arc<Room>) {
        let mut table = lock(&self.table);
        let mut state = lock(&room.state);
        if state.removed {
            return;
        }
        state.removed = true;
        drop(state);
        if table
            .get(&room.id)
            .is_some_and(|held| Arc::ptr_eq(held, room))
        {
            table.remove(&room.id);
        }
        drop(table);
        let node = self.clone();
        let room_id = room.id;
        tokio::spawn(async move {
            let _ = node.store.leave(room_id, &node.settings.node_id).await;
        });
    }

    /// Fetches missing ordered events from the history until the room has
    /// no gap. Gives up on events the history no longer holds (counted).
    async fn fill_gaps(self: Arc<Self>, room: Arc<Room>) {
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(self.settings.gap_wait).await;
            let (epoch, (after, upto)) = {
                let mut state = lock(&room.state);
                match state.gap() {
                    Some(gap) if !state.removed => (state.epoch, gap),
                    _ => {
                        state.gap_fill_running = false;
                        return;
                    }
                }
            };
            let history = match self.store.history(room.id, after, upto).await {
                Ok(history) => history,
                Err(err) => {
                    failures += 1;
                    tracing::debug!(room = room.id, %err, "fetching missing events failed");
                    if failures < 20 {
                        continue;
                    }
                    // The store stays down: stop holding the room's events.
                    livemesh_fanout::History {
                        epoch,
                        entries: Vec::new(),
                    }
                }
            };
            failures = 0;
            let mut state = lock(&room.state);
            if state.epoch != epoch || history.epoch != epoch {
                continue; // a new epoch: its own events drive it
            }
            let mut ready = Vec::new();
            for (offset, payload) in history.entries {
                if let Some(event) = decode(room.id, epoch, offset, &payload) {
                    self.stats.gap_filled.fetch_add(1, Ordering::Relaxed);
                    ready.extend(state.sequence(Arc::new(event)));
                }
            }
            if state.released < upto {
                // The history no longer holds them: skip ahead rather than
                // hold the room's later events forever.
                let skipped = upto - state.released;
                self.stats.gap_skipped.fetch_add(skipped, Ordering::Relaxed);
                tracing::warn!(
                    room = room.id,
                    after = state.released,
                    upto,
                    "events missing from the room's history were skipped"
                );
                state.released = upto;
                ready.extend(state.drain());
            }
            self.release(&room, &mut state, ready);
        }
    }

    /// One renewal round: renews this node's registrations with its viewer
    /// counts, notices events it never got, and (as a room's reporter)
    /// publishes the room's viewer count when it changed.
    pub async fn renew_once(self: &Arc<Self>) {
        let counts: Vec<(u64, u64)> = self
            .stream_counts()
            .into_iter()
            .filter(|(_, streams)| *streams > 0)
            .collect();
        if counts.is_empty() {
            return;
        }
        let now = livemesh_mesh::now_ms();
        let results = self
            .store
            .renew(
                &self.settings.node_id,
                &counts,
                duration_ms(self.settings.lease),
                now,
            )
            .await;
        for (&(room_id, _), result) in counts.iter().zip(results) {
            let renewed = match result {
                Ok(renewed) => renewed,
                Err(err) => {
                    tracing::warn!(room_id, %err, "renewing the node's registration failed");
                    continue;
                }
            };
            let Some(room) = lock(&self.table).get(&room_id).cloned() else {
                continue;
            };
            let report = {
                let mut state = lock(&room.state);
                self.saw_head(&room, &mut state, renewed.epoch, renewed.offset);
                let changed = state.last_reported != Some(renewed.viewers);
                if renewed.reporter && changed && !state.ended {
                    state.last_reported = Some(renewed.viewers);
                    true
                } else {
                    false
                }
            };
            if renewed.reporter {
                self.check_ended(room_id, renewed.viewers).await;
            }
            if report {
                self.publish_count(room_id, renewed.viewers).await;
            }
        }
    }

    /// The history's head as the store reported it: a newer epoch restarts
    /// the room's sequence, and a head past what was released starts a gap
    /// fill. Returns whether the node was behind.
    fn saw_head(
        self: &Arc<Self>,
        room: &Arc<Room>,
        state: &mut RoomState,
        epoch: u64,
        offset: u64,
    ) -> bool {
        if state.removed || state.ended || state.epoch == 0 {
            return false;
        }
        if epoch > state.epoch {
            // The room's history restarted (the hot store lost it) and
            // this node has seen no event of the new epoch yet.
            state.epoch = epoch;
            state.released = 0;
            state.known_head = 0;
            state.pending.clear();
        }
        if state.epoch != epoch || offset <= state.known_head {
            return false;
        }
        state.known_head = offset;
        let behind = state.gap().is_some();
        if behind && !state.gap_fill_running {
            state.gap_fill_running = true;
            tokio::spawn(self.clone().fill_gaps(room.clone()));
        }
        behind
    }

    /// One head check: for every room with viewers here, reads where its
    /// history stands and fetches what the node never got. A dispatcher
    /// that appended an event and died before its Deliver calls leaves no
    /// other trace; this bounds how long the node's viewers miss it.
    pub async fn check_heads_once(self: &Arc<Self>) {
        let rooms: Vec<Arc<Room>> = lock(&self.table)
            .values()
            .filter(|room| {
                let state = lock(&room.state);
                state.streams > 0 && state.epoch != 0 && !state.ended && !state.removed
            })
            .cloned()
            .collect();
        if rooms.is_empty() {
            return;
        }
        let ids: Vec<u64> = rooms.iter().map(|room| room.id).collect();
        let heads = self.store.heads(&ids).await;
        for (room, head) in rooms.iter().zip(heads) {
            match head {
                Ok(head) if head.epoch != 0 => {
                    let mut state = lock(&room.state);
                    if self.saw_head(room, &mut state, head.epoch, head.offset) {
                        self.stats.heads_behind.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    tracing::debug!(room_id = room.id, %err, "reading the room's head failed");
                }
            }
        }
    }

    async fn publish_count(&self, room_id: u64, count: u64) {
        let request = PublishRequest {
            room_id,
            event: Some(RoomEvent {
                kind: Some(room_event::Kind::ViewerCount(ViewerCount { count })),
                ..RoomEvent::default()
            }),
            ..PublishRequest::default()
        };
        match self.publish.clone().publish(request).await {
            Ok(_) => {
                self.stats.counts_published.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => {
                tracing::debug!(room_id, %status, "publishing the viewer count failed");
            }
        }
    }

    /// The dispatchers end rooms when ongoing-query's Watch says so; a room
    /// that ended while they were not watching is caught here: the
    /// reporter publishes the room's viewer count once more, and the
    /// dispatcher, finding the room ended at the rooms service, refuses the
    /// count and stores the room-ended event itself (only a dispatcher
    /// publishes it).
    async fn check_ended(&self, room_id: u64, viewers: u64) {
        let Ok(info) = self.rooms.get(room_id).await else {
            return;
        };
        if !info.ended {
            return;
        }
        let request = PublishRequest {
            room_id,
            event: Some(RoomEvent {
                kind: Some(room_event::Kind::ViewerCount(ViewerCount {
                    count: viewers,
                })),
                ..RoomEvent::default()
            }),
            ..PublishRequest::default()
        };
        match self.publish.clone().publish(request).await {
            Err(status) if status.code() == tonic::Code::FailedPrecondition => {}
            Err(status) => {
                tracing::debug!(room_id, %status, "telling the dispatcher of an ended room failed");
            }
            Ok(_) => tracing::debug!(room_id, "the dispatcher took a count for an ended room"),
        }
    }

    /// Ends every stream (the node is stopping) and leaves the hot store.
    pub async fn shut_down(&self) {
        let rooms: Vec<Arc<Room>> = lock(&self.table).drain().map(|(_, room)| room).collect();
        for room in &rooms {
            lock(&room.state).removed = true;
            room.feed.shut_down();
        }
        let leaves = rooms
            .iter()
            .map(|room| self.store.leave(room.id, &self.settings.node_id));
        futures::future::join_all(leaves).await;
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ordered(epoch: u64, offset: u64) -> Arc<RoomEvent> {
        Arc::new(RoomEvent {
            room_id: 1,
            epoch,
            offset,
            kind: Some(room_event::Kind::Comment(livemesh_proto::v1::Comment {
                viewer_id: 1,
                text: "x".into(),
            })),
            ..RoomEvent::default()
        })
    }

    /// Found by the property tests: releasing the event at offset u64::MAX
    /// overflowed `released + 1` (a panic in debug builds, a wrap to 0 and
    /// events released again in release builds).
    #[test]
    fn the_sequencer_stops_at_the_last_offset_instead_of_overflowing() {
        let mut state = RoomState {
            epoch: 7,
            released: u64::MAX - 2,
            ..RoomState::default()
        };
        assert!(
            state.sequence(ordered(7, u64::MAX)).is_empty(),
            "a gap first"
        );
        let ready = state.sequence(ordered(7, u64::MAX - 1));
        let offsets: Vec<u64> = ready.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, [u64::MAX - 1, u64::MAX]);
        assert_eq!(state.released, u64::MAX);
        assert!(
            state.sequence(ordered(7, u64::MAX)).is_empty(),
            "released once"
        );
        assert_eq!(state.gap(), None);
    }

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
