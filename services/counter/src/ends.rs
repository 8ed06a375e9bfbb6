//! Room ends, told by ongoing-query's Watch stream: the room's last writes
//! are flushed, the room is closed in the hot store (one atomic step that
//! also takes the finaliser's lease, so one replica finalises), its final
//! total and top lovers go to SQL once, and its hot keys are deleted.
//! Flushes that reach the store after the close are refused by it and
//! added to the final total in SQL by their replica (`room_late_loves`), so
//! no love is lost and none counts twice. Every step is idempotent.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use livemesh_mesh::backoff::Backoff;
use livemesh_proto::v1::RoomChangeKind;

use crate::inner::Inner;
use crate::store::sql::FinalLoves;
use livemesh_rooms::RoomInfo;
use tracing::Instrument as _;

/// Top lovers kept in SQL per room.
const TOP_IN_SQL: u32 = 100;

/// Follows the Watch stream for as long as the future runs.
pub async fn follow(inner: Arc<Inner>) {
    // During a snapshot: its position and the ongoing rooms it listed.
    let mut snapshot: Option<(String, HashSet<u64>)> = None;
    let client = inner.watch_client.clone();
    livemesh_rooms::follow_changes(client, |change| {
        let token = change
            .position
            .as_ref()
            .map(|p| p.token.clone())
            .unwrap_or_default();
        let in_snapshot = snapshot.as_ref().is_some_and(|(t, _)| *t == token)
            && change.kind() == RoomChangeKind::Started;
        if let (Some((_, listed)), false) = (&snapshot, in_snapshot) {
            // The snapshot is complete: rooms we counted for that it did
            // not list have ended while we were not watching.
            for room in inner.touched_rooms() {
                if !listed.contains(&room) {
                    end_room(&inner, room);
                }
            }
            snapshot = None;
        }
        match change.kind() {
            RoomChangeKind::Snapshot => snapshot = Some((token, HashSet::new())),
            RoomChangeKind::Started if in_snapshot => {
                if let (Some((_, listed)), Some(room)) = (&mut snapshot, &change.room) {
                    listed.insert(room.room_id);
                }
            }
            RoomChangeKind::Ended => {
                if let Some(room) = &change.room {
                    inner.rooms.remember(RoomInfo::from_proto(room));
                    end_room(&inner, room.room_id);
                }
            }
            _ => {}
        }
    })
    .await;
}

/// Finalises `room_id` in the background, retrying until it is done.
pub fn end_room(inner: &Arc<Inner>, room_id: u64) {
    if !inner.begin_ending(room_id) {
        return; // already being finalised
    }
    let inner = inner.clone();
    tokio::spawn(async move {
        tokio::time::sleep(inner.end_grace).await;
        // Until it is done: 100 ms doubling up to 30 s, never given up.
        let mut backoff = Backoff::new(
            format!("finalising room {room_id}'s loves"),
            Duration::from_millis(100),
            Duration::from_secs(30),
        );
        loop {
            match finalize(&inner, room_id).await {
                Ok(written) => {
                    tracing::info!(
                        room_id,
                        written,
                        "room ended: final loves in SQL, hot keys deleted"
                    );
                    inner.done_ending(room_id);
                    return;
                }
                Err(err) => {
                    tracing::warn!(room_id, %err, "finalising the room's loves failed; retrying");
                    backoff.wait().await;
                }
            }
        }
    }.in_current_span());
}

/// One attempt: flush what waits, close the room and take the lease, write
/// SQL once, delete the hot keys. Returns whether this attempt wrote the SQL
/// row; fails (to be retried) while another replica holds the lease and has
/// not written the final total yet.
pub async fn finalize(inner: &Inner, room_id: u64) -> anyhow::Result<bool> {
    if inner.db.get(room_id).await?.is_some() {
        // Finalised before (by us or another replica): late loves, if any,
        // reach SQL through the flusher.
        inner.flush_once().await;
        return Ok(false);
    }
    // Our own loves first, so that they count before the close.
    if inner.core.local_waiting(room_id) > 0 {
        inner.flush_once().await;
    }
    let store = inner.core.store();
    let owner = store
        .close(room_id, inner.core.node_id(), inner.finaliser_lease)
        .await?;
    if !owner {
        anyhow::ensure!(
            inner.db.get(room_id).await?.is_some(),
            "another replica holds the room's finaliser lease and has not written its final total yet"
        );
        return Ok(false);
    }
    // The room is closed: its total and ranking no longer change. Loves of
    // ours still waiting (the store was unreachable) go to SQL as late ones.
    if inner.core.local_waiting(room_id) > 0 {
        inner.flush_once().await;
    }
    let total = store.total(room_id).await?;
    let top_lovers = store.top(room_id, TOP_IN_SQL).await?;
    let written = inner
        .db
        .write_once(&FinalLoves {
            room_id,
            total,
            top_lovers,
            finalized_at_ms: livemesh_mesh::now_ms(),
        })
        .await?;
    store.delete_room(room_id).await?;
    inner.core.forget_room(room_id);
    inner
        .finalised_here
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(
        inner.core.local_waiting(room_id) == 0,
        "late loves of the room still wait for SQL"
    );
    Ok(written)
}
