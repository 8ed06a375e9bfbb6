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
//!
//! Here: the table itself, joining and leaving rooms, and the delivery
//! path (Deliver → the room's [`Sequencer`](crate::sequencer::Sequencer)
//! → its feed). The gap fill and head checks are in [`gaps`], the
//! renewal round and its Publish calls in [`renew`].

mod gaps;
mod metrics;
mod renew;

use livemesh_mesh::lock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use livemesh_fanout::{FanoutStore, Head, StoreError};
use livemesh_mesh::MeshChannel;
use livemesh_proto::encoded::{Latest, Ordered};
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::{RoomEvent, room_event};
use livemesh_rooms::RoomDirectory;

use self::metrics::NodeMetrics;
use crate::error::JoinError;
use crate::room::{Joined, Room, RoomState, decode, latest_kind};

/// How a node runs.
#[derive(Debug, Clone)]
pub(crate) struct NodeSettings {
    /// How dispatchers reach this node (`http://host:port`); also its name
    /// in the hot store.
    pub(crate) node_id: String,
    pub(crate) queue_len: usize,
    /// The largest `EventBatch` message a stream sends (bytes of events).
    pub(crate) max_batch_bytes: usize,
    pub(crate) lease: Duration,
    pub(crate) report_interval: Duration,
    pub(crate) gap_wait: Duration,
    /// How often rooms with viewers are compared with their history's
    /// head ([`NodeInner::check_heads_once`]); zero: only at renewals.
    pub(crate) head_check: Duration,
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

/// The node's shared state.
pub(crate) struct NodeInner {
    pub(crate) settings: NodeSettings,
    pub(crate) store: FanoutStore,
    pub(crate) rooms: RoomDirectory,
    publish: PublishServiceClient<MeshChannel>,
    pub(crate) stats: NodeStats,
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

impl NodeInner {
    pub(crate) fn new(
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
    pub(crate) fn count_overflow(&self) {
        self.stats.overflows.fetch_add(1, Ordering::Relaxed);
        self.metrics.overflows.add(1, &[]);
    }

    /// How many rooms this node holds state for (its room table).
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn stored_rooms(&self) -> usize {
        lock(&self.table).len()
    }

    /// Local streams per room.
    pub(crate) fn stream_counts(&self) -> Vec<(u64, u64)> {
        let rooms: Vec<Arc<Room>> = lock(&self.table).values().cloned().collect();
        rooms
            .iter()
            .map(|room| (room.id, lock(&room.state).streams))
            .collect()
    }

    /// Adds a stream to the room, joining the room in the hot store first
    /// if this node has no viewer of it yet.
    pub(crate) async fn join(
        self: &Arc<Self>,
        room_id: u64,
        skip: (u64, u64),
    ) -> Result<Joined, JoinError> {
        loop {
            let room = lock(&self.table)
                .entry(room_id)
                .or_insert_with(|| {
                    Arc::new(Room::new(
                        room_id,
                        self.settings.queue_len,
                        self.metrics.write_delay.clone(),
                    ))
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
            if state.seq.ended {
                return Err(JoinError::Ended);
            }
            // Live events from here on (the feed's head is read under the
            // room's lock, which every release holds): those up to
            // `released` are replayed, and a client ahead of this node (it
            // resumed from a position another node had sent) gets nothing
            // twice. The room's newest latest values come first.
            let resume_offset = if skip.0 == state.seq.epoch { skip.1 } else { 0 };
            let start = (state.seq.epoch, state.seq.released.max(resume_offset));
            let cursor = room.feed.cursor(start, start);
            state.streams += 1;
            self.metrics.streams.add(1, &[]);
            let (epoch, released) = (state.seq.epoch, state.seq.released);
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
        state.seq.start(head.epoch, head.offset, head.ended);
        for (offset, payload) in &head.latest {
            if let Some(event) = decode(room.id, head.epoch, *offset, payload)
                && let Some(kind) = latest_kind(&event)
            {
                let event = Arc::new(event);
                if state.set_latest(kind, &event) {
                    room.feed
                        .set_latest(kind, Latest::new(&event), Instant::now());
                }
            }
        }
        let early = state.seq.take_early();
        drop(state);
        let received = Instant::now();
        for event in early {
            self.deliver_one(room, event, received);
        }
    }

    /// Removes a stream; the last one out takes the room off the table and
    /// out of the hot store.
    pub(crate) fn remove_stream(self: &Arc<Self>, room: &Arc<Room>) {
        {
            let mut state = lock(&room.state);
            state.streams = state.streams.saturating_sub(1);
        }
        self.metrics.streams.add(-1, &[]);
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
        take_off(&mut table, room);
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
    pub(crate) fn deliver(self: &Arc<Self>, room_id: u64, events: Vec<RoomEvent>) -> u64 {
        let received = Instant::now();
        self.stats.deliver_calls.fetch_add(1, Ordering::Relaxed);
        self.metrics.delivered(&events);
        let Some(room) = lock(&self.table).get(&room_id).cloned() else {
            return 0;
        };
        for event in events {
            self.deliver_one(&room, Arc::new(event), received);
        }
        lock(&room.state).streams
    }

    /// `received`: when the `Deliver` bringing `event` arrived.
    fn deliver_one(self: &Arc<Self>, room: &Arc<Room>, event: Arc<RoomEvent>, received: Instant) {
        let mut state = lock(&room.state);
        if state.removed || state.seq.ended {
            return;
        }
        if let Some(kind) = latest_kind(&event) {
            if state.seq.epoch == 0 {
                state.seq.hold_early(event);
            } else if state.set_latest(kind, &event) {
                // Encoded once for every stream of the room.
                room.feed.set_latest(kind, Latest::new(&event), received);
                self.metrics.deliveries.add(state.streams, &[]);
            }
            return;
        }
        let ready = state.seq.sequence(event);
        self.release(room, &mut state, ready, received);
        if state.seq.gap().is_some() && !state.gap_fill_running {
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
        received: Instant,
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
        self.metrics
            .deliveries
            .add(released as u64 * state.streams, &[]);
        room.feed.push_ordered(
            received,
            ready[..released]
                .iter()
                .map(|event| (event.epoch, event.offset, Ordered::new(event))),
        );
        if ends.is_some() {
            state.seq.end();
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
        take_off(&mut table, room);
        drop(table);
        let node = self.clone();
        let room_id = room.id;
        tokio::spawn(async move {
            let _ = node.store.leave(room_id, &node.settings.node_id).await;
        });
    }

    /// Ends every stream (the node is stopping) and leaves the hot store.
    pub(crate) async fn shut_down(&self) {
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

/// Takes `room` off the table, unless the table holds another room of the
/// same id by now (a new join after this one was emptied).
fn take_off(table: &mut HashMap<u64, Arc<Room>>, room: &Arc<Room>) {
    if table
        .get(&room.id)
        .is_some_and(|held| Arc::ptr_eq(held, room))
    {
        table.remove(&room.id);
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
