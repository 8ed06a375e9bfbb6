//! The counter's shared state: the core, the room directory, SQL, the
//! analytics log, the clients of ongoing-query and the dispatcher, and the
//! rooms this replica counts for. The flusher (the group commit) writes the
//! core's pending increments through it; the publish tick sends changed
//! totals to the rooms' viewers.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use livemesh_mesh::MeshChannel;
use livemesh_mesh::lock;
use livemesh_mesh::rpc_telemetry::Origins;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::{LoveTotal, PublishRequest, RoomEvent, room_event};
use livemesh_rooms::RoomDirectory;
use tracing::Instrument as _;

use crate::analytics::AnalyticsLog;
use crate::core::CounterCore;
use crate::store::sql::{FinalLoves, LovesDb};

/// Shared state of the counter service.
#[derive(Debug)]
pub struct Inner {
    pub(crate) core: CounterCore,
    pub(crate) rooms: RoomDirectory,
    pub(crate) db: LovesDb,
    pub(crate) analytics: AnalyticsLog,
    pub(crate) watch_client: OngoingQueryServiceClient<MeshChannel>,
    pub(crate) publish_client: PublishServiceClient<MeshChannel>,
    /// Rooms this replica counted loves for and has not finalised.
    pub(crate) touched: Mutex<HashSet<u64>>,
    /// Rooms being finalised right now.
    pub(crate) ending: Mutex<HashSet<u64>>,
    /// Rooms whose total changed since the last publish tick.
    pub(crate) dirty: Mutex<HashSet<u64>>,
    /// Per room, the trace contexts of the SendLoves calls since its last
    /// publish: the publish tick's span continues their trace.
    pub(crate) origins: Mutex<HashMap<u64, Origins>>,
    pub(crate) end_grace: Duration,
    pub(crate) finaliser_lease: Duration,
    /// The pause before a failed flush round is retried.
    pub(crate) flush_tick: Duration,
    pub(crate) publish_tick: Duration,
    pub(crate) publish_failures: AtomicU64,
    pub(crate) published: AtomicU64,
    /// Rooms this replica finalised as the lease holder.
    pub(crate) finalised_here: AtomicU64,
    /// Late batches (their room was closed) this replica added to final totals.
    pub(crate) late_batches: AtomicU64,
}

impl Inner {
    pub(crate) fn touch(&self, room_id: u64) {
        lock(&self.touched).insert(room_id);
    }

    /// Remembers the current call (a SendLoves that counted loves) as an
    /// origin of `room_id`'s next published total.
    pub(crate) fn remember_origin(&self, room_id: u64) {
        if let Some(origin) = Origins::current() {
            let mut origins = lock(&self.origins);
            let room = origins.entry(room_id).or_default();
            if !room.is_full() {
                room.add(origin);
            }
        }
    }

    pub(crate) fn touched_rooms(&self) -> Vec<u64> {
        lock(&self.touched).iter().copied().collect()
    }

    /// True if the caller should finalise `room_id` (nobody else is).
    pub(crate) fn begin_ending(&self, room_id: u64) -> bool {
        lock(&self.ending).insert(room_id)
    }

    pub(crate) fn done_ending(&self, room_id: u64) {
        lock(&self.ending).remove(&room_id);
        lock(&self.touched).remove(&room_id);
        lock(&self.dirty).remove(&room_id);
        lock(&self.origins).remove(&room_id);
    }

    /// One flush round: write pending increments; mark the rooms for
    /// publishing; add flushes that found their room closed to its final
    /// total in SQL.
    pub async fn flush_once(&self) {
        let report = self.core.flush().await;
        if !report.rooms.is_empty() {
            lock(&self.dirty).extend(report.rooms);
        }
        for (flush, counted) in report.closed {
            let late: Vec<_> = flush
                .batches
                .iter()
                .enumerate()
                .filter(|(i, _)| !counted.contains(i))
                .map(|(_, b)| b.clone())
                .collect();
            let stored = match self.db.add_late(flush.room_id, &late).await {
                Ok(()) => true,
                Err(e) => {
                    tracing::warn!(room_id = flush.room_id, %e, "adding late loves to the final total failed; kept for retry");
                    false
                }
            };
            if self.core.settle_late(&flush.flush_id, &counted, stored) {
                self.late_batches
                    .fetch_add(late.len() as u64, Ordering::Relaxed);
                tracing::info!(
                    room_id = flush.room_id,
                    batches = late.len(),
                    "late loves of an ended room added to its final total"
                );
            }
        }
    }

    /// The final numbers of an ended room, once written (late batches added).
    pub async fn final_loves(&self, room_id: u64) -> Result<Option<FinalLoves>, sqlx::Error> {
        self.db.final_with_late(room_id).await
    }

    /// One publish tick: each changed room's new total, once, to its viewers.
    pub async fn publish_once(&self) {
        let rooms: Vec<u64> = lock(&self.dirty).drain().collect();
        let calls = rooms.into_iter().map(|room_id| {
            let span = tracing::info_span!(
                "counter.publish_total",
                room_id,
                total = tracing::field::Empty
            );
            if let Some(origins) = lock(&self.origins).remove(&room_id) {
                origins.adopt(&span);
            }
            self.publish_total(room_id).instrument(span)
        });
        futures::future::join_all(calls).await;
    }

    async fn publish_total(&self, room_id: u64) {
        let Ok(total) = self.core.total(room_id).await else {
            return;
        };
        tracing::Span::current().record("total", total);
        let event = RoomEvent {
            room_id,
            kind: Some(room_event::Kind::LoveTotal(LoveTotal { total })),
            ..RoomEvent::default()
        };
        let request = PublishRequest {
            room_id,
            event: Some(event),
            ..PublishRequest::default()
        };
        match self.publish_client.clone().publish(request).await {
            Ok(_) => {
                self.published.fetch_add(1, Ordering::Relaxed);
            }
            Err(status) => {
                // Counted, never fatal: viewers will see the next total.
                if self
                    .publish_failures
                    .fetch_add(1, Ordering::Relaxed)
                    .is_multiple_of(1000)
                {
                    tracing::warn!(room_id, %status, "publishing a love total failed (counted; logged once per 1000)");
                }
            }
        }
    }
}

/// The group commit: a flush round starts as soon as a batch waits and no
/// round is in flight, so batches that arrive during a round go into the
/// next one (rounds grow with the load) and a lone batch waits about one
/// store round trip. Flushes the store did not take are retried every
/// `flush_tick` (with whatever arrived meanwhile), not in a tight loop.
pub(crate) async fn flusher(inner: &Inner) {
    loop {
        if inner.core.retrying() {
            tokio::time::sleep(inner.flush_tick).await;
        } else if !inner.core.has_pending() {
            inner.core.work_arrived().await;
        }
        inner.flush_once().await;
    }
}
