//! What the settler does as rooms start and end (ongoing-query's Watch):
//! a started room's virtual accounts are opened in every shard, an ended
//! room stops taking gifts and is settled; and at start-up, settlements a
//! stopped settler left unfinished are finished.

use std::sync::Arc;
use std::time::Duration;

use livemesh_mesh::rooms::RoomInfo;
use livemesh_proto::v1::RoomChangeKind;
use tracing::Instrument as _;

use crate::gifts::Inner;
use crate::pending;

/// Retries `step` with back-off until it succeeds (room opens and ends
/// must happen; each is idempotent).
async fn until_done<F, Fut>(what: &str, room_id: u64, step: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), sqlx::Error>>,
{
    let mut backoff = Duration::from_millis(100);
    while let Err(err) = step().await {
        tracing::warn!(room_id, %err, "{what} failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Settles the room, retrying until it is done (each step is idempotent).
async fn settle_until_done(inner: &Inner, room_id: u64, streamer_id: u64) {
    let mut backoff = Duration::from_millis(100);
    pending::begin(room_id);
    loop {
        match inner.settle(room_id, streamer_id, &|_| false).await {
            Ok(row) => {
                pending::finish(room_id);
                tracing::info!(
                    room_id,
                    gross = row.gross,
                    platform_cut = row.platform_cut,
                    streamer_credit = row.streamer_credit,
                    "room settled"
                );
                return;
            }
            Err(err) => {
                tracing::warn!(room_id, %err, "settling the room failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Finishes the settlements a settler that stopped mid-settlement started.
pub(crate) async fn resume_unfinished(inner: Arc<Inner>) {
    let rooms = loop {
        match inner.shards[0].unfinished_settlements().await {
            Ok(rooms) => break rooms,
            Err(err) => {
                tracing::warn!(%err, "reading unfinished settlements failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    for room_id in rooms {
        // The recorded streamer is the one paid (see `settle`).
        settle_until_done(&inner, room_id, 0).await;
    }
}

/// Follows room starts and ends for as long as the service runs.
pub(crate) async fn follow_rooms(inner: Arc<Inner>) {
    let watch = inner.watch.clone();
    livemesh_mesh::rooms::follow_changes(watch, |change| {
        let Some(room) = change.room else { return };
        let kind = change.kind();
        if kind == RoomChangeKind::Ended {
            // Gifts are refused from here on, before the shards know.
            inner.rooms.remember(RoomInfo::from_proto(&room));
        }
        let inner = inner.clone();
        tokio::spawn(
            async move {
                match kind {
                    RoomChangeKind::Started => {
                        until_done("opening the room's virtual accounts", room.room_id, || {
                            inner.open_room(room.room_id)
                        })
                        .await;
                    }
                    RoomChangeKind::Ended => {
                        until_done("ending the room's gifts", room.room_id, || {
                            inner.end_room(room.room_id)
                        })
                        .await;
                        settle_until_done(&inner, room.room_id, room.anchor_id).await;
                    }
                    _ => {}
                }
            }
            .in_current_span(),
        );
    })
    .await;
}
