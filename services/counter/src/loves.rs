//! What the counter does for each of its RPCs, apart from their wire form
//! (`grpc.rs` decodes the request and encodes the reply): SendLoves (the
//! room check, taking the batch into the core, waiting for the flush that
//! carries it, the analytics line, the room's total), GetLoves and
//! TopLovers (an ended room's numbers from SQL once they are there).

use livemesh_proto::v1::SendLovesRequest;
use livemesh_rooms::RoomInfo;

use crate::analytics::LoveLine;
use crate::core::{BatchFate, BatchOutcome, Taken};
use crate::error::CounterError;
use crate::inner::Inner;
use crate::store::sql::FinalLoves;

const DEFAULT_TOP: u32 = 10;
const MAX_TOP: u32 = 100;

/// What became of a batch of loves, with the room's total after it.
#[derive(Debug)]
pub enum Sent {
    /// The batch id was taken before (a retry, here or on another replica):
    /// it counts once, so nothing was counted now.
    Duplicate { room_total: u64 },
    /// Validated and taken: `outcome` says how many taps counted.
    Taken {
        outcome: BatchOutcome,
        room_total: u64,
    },
}

/// Takes a viewer's batch of taps; answers once the hot store has taken it
/// (or could not, and it waits here for a retry), so that GetLoves and
/// TopLovers show it.
pub async fn send(inner: &Inner, request: &SendLovesRequest) -> Result<Sent, CounterError> {
    if request.viewer_id == 0 {
        return Err(CounterError::InvalidArgument(
            "viewer_id must be the viewer's user id; 0 is not a user".into(),
        ));
    }
    if request.batch_id.is_empty() || request.batch_id.len() > 128 {
        return Err(CounterError::InvalidArgument(
            "batch_id must be 1 to 128 bytes, unique per batch of this viewer (e.g. a UUID), so that a retry counts once".into(),
        ));
    }
    let room = ongoing_room(inner, request.room_id).await?;
    let now = livemesh_mesh::now_ms();
    let video_now = u64::try_from(now.saturating_sub(room.started_at_ms)).unwrap_or(0);
    let taken = inner.core.send(
        room.room_id,
        request.viewer_id,
        &request.batch_id,
        &request.taps_ms,
        video_now,
        now,
    )?;
    let outcome = match taken {
        Taken::Duplicate => {
            // Answer as the first attempt will be: after its flush.
            inner
                .core
                .tried(room.room_id, request.viewer_id, &request.batch_id)
                .await;
            None
        }
        Taken::New {
            outcome,
            accepted,
            fate,
        } => {
            if !accepted.is_empty() {
                inner.touch(room.room_id);
                inner.remember_origin(room.room_id);
            }
            // Answer once the store took the batch (or could not, and it
            // waits here for a retry): then GetLoves and TopLovers show it.
            let fate = match fate {
                Some(told) => told.await.unwrap_or(BatchFate::Buffered),
                None => BatchFate::Counted,
            };
            if fate == BatchFate::Duplicate {
                None
            } else {
                if !accepted.is_empty() {
                    inner.analytics.record(LoveLine {
                        room_id: room.room_id,
                        viewer_id: request.viewer_id,
                        batch_id: request.batch_id.clone(),
                        taps_ms: accepted,
                        at_ms: now,
                    });
                }
                Some(outcome)
            }
        }
    };
    // The loves are taken even when the store cannot tell the total now.
    let room_total = match inner.core.total(room.room_id).await {
        Ok(total) => total,
        Err(_) => inner.core.local_waiting(room.room_id),
    };
    Ok(match outcome {
        None => Sent::Duplicate { room_total },
        Some(outcome) => Sent::Taken {
            outcome,
            room_total,
        },
    })
}

/// The room's total: its final one once the room has ended and it is in
/// SQL, otherwise the hot store's.
pub async fn total(inner: &Inner, room_id: u64) -> Result<u64, CounterError> {
    let room = room_exists(inner, room_id).await?;
    if let Some(fin) = final_of(inner, &room).await? {
        return Ok(fin.total);
    }
    Ok(inner.core.total(room_id).await?)
}

/// The room's top lovers, most loves first, at most `limit` of them (0:
/// the default of 10; at most 100).
pub async fn top(inner: &Inner, room_id: u64, limit: u32) -> Result<Vec<(u64, u64)>, CounterError> {
    let room = room_exists(inner, room_id).await?;
    let limit = match limit {
        0 => DEFAULT_TOP,
        n => n.min(MAX_TOP),
    };
    if let Some(fin) = final_of(inner, &room).await? {
        return Ok(fin.top_lovers.into_iter().take(limit as usize).collect());
    }
    let mut top = inner.core.store().top(room_id, limit).await?;
    // Loves this replica accepted and the store has not confirmed yet
    // count here too, as they do in GetLoves.
    let waiting = inner.core.local_waiting_viewers(room_id);
    if !waiting.is_empty() {
        for (viewer, loves) in waiting {
            match top.iter_mut().find(|(v, _)| *v == viewer) {
                Some(entry) => entry.1 += loves,
                None => top.push((viewer, loves)),
            }
        }
        top.sort_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| b.0.to_string().cmp(&a.0.to_string()))
        });
        top.truncate(limit as usize);
    }
    Ok(top)
}

async fn ongoing_room(inner: &Inner, room_id: u64) -> Result<RoomInfo, CounterError> {
    let room = room_exists(inner, room_id).await?;
    if room.ended {
        return Err(CounterError::RoomEnded(room_id));
    }
    Ok(room)
}

async fn room_exists(inner: &Inner, room_id: u64) -> Result<RoomInfo, CounterError> {
    if room_id == 0 {
        return Err(CounterError::InvalidArgument(
            "room_id must be a room id from StartRoom; 0 is not one".into(),
        ));
    }
    Ok(inner.rooms.get(room_id).await?)
}

/// The final numbers of an ended room, once they are in SQL (until then
/// the hot store still holds them).
async fn final_of(inner: &Inner, room: &RoomInfo) -> Result<Option<FinalLoves>, CounterError> {
    if !room.ended {
        return Ok(None);
    }
    inner
        .final_loves(room.room_id)
        .await
        .map_err(|cause| CounterError::Final {
            room_id: room.room_id,
            cause,
        })
}
