//! What the settler does as rooms start and end (ongoing-query's Watch):
//! a started room's virtual accounts are opened in every shard, an ended
//! room stops taking gifts and is settled; and at start-up, settlements a
//! stopped settler left unfinished are finished.

use std::sync::Arc;
use std::time::Duration;

use livemesh_mesh::backoff::Backoff;
use livemesh_proto::v1::RoomChangeKind;
use livemesh_rooms::RoomInfo;
use tracing::Instrument as _;

use crate::gifts::Inner;
use crate::pending;

/// Retries `step` with back-off (from 100 ms, doubling up to 10 s) until it
/// succeeds (room opens and ends must happen; each is idempotent).
async fn until_done<F, Fut>(what: &str, room_id: u64, step: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), sqlx::Error>>,
{
    let mut backoff = Backoff::new(
        format!("{what} (room {room_id})"),
        Duration::from_millis(100),
        Duration::from_secs(10),
    );
    while let Err(err) = step().await {
        tracing::warn!(room_id, %err, "{what} failed; retrying");
        backoff.wait().await;
    }
}

/// Settles the room, retrying (from 100 ms, doubling up to 30 s) until it is
/// done (each step is idempotent).
async fn settle_until_done(inner: &Inner, room_id: u64, streamer_id: u64) {
    let mut backoff = Backoff::new(
        format!("settling room {room_id}"),
        Duration::from_millis(100),
        Duration::from_secs(30),
    );
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
                backoff.wait().await;
            }
        }
    }
}

/// Finishes the settlements a settler that stopped mid-settlement started.
pub(crate) async fn resume_unfinished(inner: Arc<Inner>) {
    // Every second (jittered), until the coordinating shard answers.
    let mut backoff = Backoff::new(
        "reading unfinished settlements",
        Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let rooms = loop {
        match inner.shards[0].unfinished_settlements().await {
            Ok(rooms) => break rooms,
            Err(err) => {
                tracing::warn!(%err, "reading unfinished settlements failed; retrying");
                backoff.wait().await;
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
    livemesh_rooms::follow_changes(watch, |change| {
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
