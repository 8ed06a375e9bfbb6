//! The renewal round: a node renews its rooms' registrations (leases) with
//! their viewer counts, notices events it never got, and as a room's
//! reporter publishes the room's viewer count, and catches unnoticed ends.

use livemesh_mesh::lock;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use livemesh_proto::v1::{PublishRequest, RoomEvent, ViewerCount, room_event};

use super::{NodeInner, duration_ms};

impl NodeInner {
    /// One renewal round: renews this node's registrations with its viewer
    /// counts, notices events it never got, and (as a room's reporter)
    /// publishes the room's viewer count when it changed.
    pub(crate) async fn renew_once(self: &Arc<Self>) {
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
                if renewed.reporter && changed && !state.seq.ended {
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
}
