//! Opening a viewer's subscription: validation, the join of its room, the
//! replay of what it missed after `resume`, and the start message; a room
//! that has ended only replays.

use std::collections::VecDeque;
use std::sync::Arc;

use livemesh_proto::encoded::{BatchWriter, Frame, Ordered};
use livemesh_proto::v1::{
    RoomEvent, StreamPosition, StreamStarted, SubscribeRequest, SubscribeResponse,
    subscribe_response,
};

use crate::error::{JoinError, SubscribeError};
use crate::feed::Delivery;
use crate::room::decode;
use crate::stream::{Live, ViewerStream};
use crate::table::NodeInner;

/// Opens the stream of one `Subscribe` call.
pub(crate) async fn open(
    node: &Arc<NodeInner>,
    request: SubscribeRequest,
) -> Result<ViewerStream, SubscribeError> {
    if request.room_id == 0 {
        return Err(SubscribeError::Invalid("room_id is required"));
    }
    if request.viewer_id == 0 {
        return Err(SubscribeError::Invalid("viewer_id is required"));
    }
    let resume = request.resume.map(|p| (p.epoch, p.offset));
    if resume.is_some_and(|(epoch, _)| epoch == 0) {
        return Err(SubscribeError::Invalid(
            "resume.epoch must be the epoch of an event you received (it is never 0)",
        ));
    }
    let room_id = request.room_id;
    let delivery = if request.accept_batches {
        Delivery::Batches {
            max_bytes: node.settings.max_batch_bytes,
        }
    } else {
        Delivery::Single
    };
    let info = node.rooms.get(room_id).await?;
    if info.ended {
        return match resume {
            Some(resume) => {
                replay_only(node, room_id, resume, delivery, request.stamp_writes).await
            }
            None => Err(SubscribeError::Ended(room_id)),
        };
    }
    let joined = match node.join(room_id, resume.unwrap_or((0, 0))).await {
        Ok(joined) => joined,
        Err(JoinError::Store(err)) => return Err(err.into()),
        Err(JoinError::Ended) => {
            return match resume {
                Some(resume) => {
                    replay_only(node, room_id, resume, delivery, request.stamp_writes).await
                }
                None => Err(SubscribeError::Ended(room_id)),
            };
        }
    };
    let (epoch, released) = (joined.epoch, joined.released);
    let live = Live {
        node: node.clone(),
        room: joined.room,
        cursor: joined.cursor,
    };
    // From here the stream is registered; dropping `stream` on an error
    // below unregisters it.
    let mut stream = ViewerStream::new(Some(live), delivery, request.stamp_writes);
    if let Some((resume_epoch, offset)) = resume
        && resume_epoch == epoch
        && offset > released
    {
        // This node may trail the history; only a position past the
        // history's head is refused (it would drop live events).
        let head = node
            .store
            .history(room_id, released, u64::MAX)
            .await?
            .entries
            .last()
            .map_or(released, |(offset, _)| *offset);
        if offset > head {
            return Err(SubscribeError::AheadOfHead {
                room_id,
                epoch,
                offset,
                head,
            });
        }
    }
    let prefix = match resume {
        None => start(epoch, released, None, Vec::new(), delivery),
        Some(resume) => {
            let replay = replay(node, room_id, epoch, resume, released).await?;
            start(epoch, released, Some(resume), replay, delivery)
        }
    };
    stream.set_prefix(prefix);
    Ok(stream)
}

/// The events after `resume` up to `upto` that the history holds.
async fn replay(
    node: &NodeInner,
    room_id: u64,
    epoch: u64,
    resume: (u64, u64),
    upto: u64,
) -> Result<Vec<RoomEvent>, SubscribeError> {
    let after = if resume.0 == epoch { resume.1 } else { 0 };
    if after >= upto {
        return Ok(Vec::new());
    }
    let history = node.store.history(room_id, after, upto).await?;
    if history.epoch != epoch {
        // The history restarted while we read it; the live stream
        // carries the new epoch's events.
        return Ok(Vec::new());
    }
    Ok(history
        .entries
        .iter()
        .filter_map(|(offset, payload)| decode(room_id, epoch, *offset, payload))
        .collect())
}

/// A resumed stream of a room that has ended: what the history holds
/// after `resume` (the room-ended event last), then the end.
async fn replay_only(
    node: &NodeInner,
    room_id: u64,
    resume: (u64, u64),
    delivery: Delivery,
    stamp: bool,
) -> Result<ViewerStream, SubscribeError> {
    let history = node.store.history(room_id, 0, u64::MAX).await?;
    if history.epoch == 0 {
        return Err(SubscribeError::Ended(room_id));
    }
    let upto = history.entries.last().map_or(0, |(offset, _)| *offset);
    if resume.0 == history.epoch && resume.1 > upto {
        return Err(SubscribeError::AheadOfHead {
            room_id,
            epoch: resume.0,
            offset: resume.1,
            head: upto,
        });
    }
    let replay = replay(node, room_id, history.epoch, resume, upto).await?;
    let prefix = start(history.epoch, upto, Some(resume), replay, delivery);
    let mut stream = ViewerStream::new(None, delivery, stamp);
    stream.set_prefix(prefix);
    Ok(stream)
}

/// The start message and the replayed events (in batches for a
/// subscriber that accepts them).
fn start(
    epoch: u64,
    released: u64,
    resume: Option<(u64, u64)>,
    replay: Vec<RoomEvent>,
    delivery: Delivery,
) -> VecDeque<Frame> {
    let (recovered, epoch_changed) = match resume {
        None => (false, false),
        Some((resume_epoch, _)) if resume_epoch != epoch => (false, true),
        Some((_, after)) => {
            // Complete when the replay is exactly after+1 ..= released.
            let wanted = released.saturating_sub(after);
            let first_ok = replay.first().is_none_or(|e| e.offset == after + 1);
            (first_ok && replay.len() as u64 == wanted, false)
        }
    };
    let position = match resume {
        Some((resume_epoch, after)) if resume_epoch == epoch => released.max(after),
        _ => released,
    };
    let mut prefix = VecDeque::with_capacity(replay.len() + 1);
    prefix.push_back(Frame::message(&SubscribeResponse {
        message: Some(subscribe_response::Message::Started(StreamStarted {
            position: Some(StreamPosition {
                epoch,
                offset: position,
            }),
            recovered,
            epoch_changed,
            replayed: replay.len() as u64,
        })),
        written_at: None,
    }));
    let events = replay.iter().map(Ordered::new);
    match delivery {
        Delivery::Single => prefix.extend(events.map(|event| event.frame())),
        Delivery::Batches { max_bytes } => {
            let mut batch = BatchWriter::new();
            for event in events {
                if !batch.is_empty() && batch.len() + event.len() > max_bytes {
                    prefix.extend(std::mem::take(&mut batch).finish());
                }
                batch.push_ordered(&event);
            }
            prefix.extend(batch.finish());
        }
    }
    prefix
}
