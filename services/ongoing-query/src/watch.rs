//! `Watch`: one task per watcher reads the shared change log from the
//! watcher's position and writes to its stream.
//!
//! - No position, a position from another process epoch, or one older than
//!   the replay window: a SNAPSHOT marker, every ongoing room as STARTED,
//!   then live changes. The snapshot is complete: a room the watcher thought
//!   ongoing and that is not in it has ended.
//! - A position inside the window: exactly the changes after it, then live.
//!
//! Changes after a snapshot may repeat what the snapshot already showed
//! (the snapshot is read while changes keep arriving); a room's `version`
//! tells a repeat from news. A slow watcher only slows its own task; once
//! it falls out of the window it gets a fresh snapshot.

use std::sync::Arc;

use livemesh_mesh::ShutdownSignal;
use livemesh_proto::v1::{ChangePosition, RoomChange, RoomChangeKind, WatchResponse};
use tokio::sync::mpsc;
use tonic::Status;

use crate::changes::{Change, ChangeKind, Lagged, Position};
use crate::error::RoomError;
use crate::rooms::Rooms;

/// Changes read from the log per lock.
const BATCH: usize = 256;
/// Messages buffered per watcher before its task waits for the client.
const BUFFER: usize = 128;

/// Where a new watcher starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    Snapshot,
    After(u64),
}

/// Resolves a client's `from` token against this process's log.
pub fn start_for(rooms: &Rooms, from: Option<&ChangePosition>) -> Result<Start, RoomError> {
    let Some(from) = from else {
        return Ok(Start::Snapshot);
    };
    let position = Position::parse(&from.token).ok_or_else(|| {
        RoomError::InvalidArgument(format!(
            "from.token {} is not a position this service issued; pass the token of the last \
             RoomChange received, or leave `from` unset to start with a snapshot",
            livemesh_mesh::excerpt(&from.token)
        ))
    })?;
    let log = rooms.cache().log();
    if position.epoch != log.epoch() {
        // Issued before a restart, or by another replica: only a snapshot is exact.
        return Ok(Start::Snapshot);
    }
    if position.seq > log.head().seq {
        return Err(RoomError::InvalidArgument(format!(
            "from.token {} is ahead of this service's newest change; pass a token received \
             from it",
            livemesh_mesh::excerpt(&from.token)
        )));
    }
    Ok(Start::After(position.seq))
}

/// Spawns the watcher's task; the receiver is its stream.
pub fn spawn(
    rooms: Arc<Rooms>,
    start: Start,
    stopping: ShutdownSignal,
) -> mpsc::Receiver<Result<WatchResponse, Status>> {
    let (tx, rx) = mpsc::channel(BUFFER);
    tokio::spawn(async move {
        // Ends when the client goes away (a send fails) or the server stops;
        // the client then reconnects with its last position.
        tokio::select! {
            _ = run(&rooms, start, &tx) => {}
            () = stopping => {
                let _ = tx.send(Err(RoomError::ShuttingDown.into())).await;
            }
        }
    });
    rx
}

type Sender = mpsc::Sender<Result<WatchResponse, Status>>;

/// The client went away.
struct Gone;

async fn run(rooms: &Rooms, start: Start, tx: &Sender) -> Result<(), Gone> {
    let log = rooms.cache().log();
    let mut head_rx = log.subscribe();
    let mut cursor = match start {
        Start::Snapshot => snapshot(rooms, tx).await?,
        Start::After(seq) => seq,
    };
    loop {
        // Mark the head as seen before reading, so a change appended after
        // this read wakes the wait below.
        head_rx.borrow_and_update();
        match log.since(cursor, BATCH) {
            Ok(changes) if changes.is_empty() => {
                if head_rx.changed().await.is_err() {
                    return Ok(()); // the log is gone: the service is stopping
                }
            }
            Ok(changes) => {
                for change in changes {
                    cursor = change.seq;
                    send(tx, to_proto(&change, log.epoch())).await?;
                }
            }
            Err(Lagged) => cursor = snapshot(rooms, tx).await?,
        }
    }
}

/// Sends a snapshot and returns the sequence number it stands at.
async fn snapshot(rooms: &Rooms, tx: &Sender) -> Result<u64, Gone> {
    let log = rooms.cache().log();
    // The head is read first: every change after it is sent after the
    // snapshot, so nothing falls between the two.
    let head = log.head();
    let position = Some(ChangePosition {
        token: head.token(),
    });
    send(
        tx,
        RoomChange {
            room: None,
            kind: RoomChangeKind::Snapshot.into(),
            position: position.clone(),
            traceparent: String::new(),
        },
    )
    .await?;
    let mut after = None;
    loop {
        let (page, more) = rooms.cache().ongoing_page(after, BATCH);
        after = page.last().map(|r| r.room_id);
        for room in page {
            send(
                tx,
                RoomChange {
                    room: Some(room.into()),
                    kind: RoomChangeKind::Started.into(),
                    position: position.clone(),
                    traceparent: String::new(),
                },
            )
            .await?;
        }
        if !more {
            return Ok(head.seq);
        }
    }
}

fn to_proto(change: &Change, epoch: u64) -> RoomChange {
    RoomChange {
        room: Some(change.room.into()),
        kind: match change.kind {
            ChangeKind::Started => RoomChangeKind::Started,
            ChangeKind::Ended => RoomChangeKind::Ended,
            ChangeKind::Updated => RoomChangeKind::Updated,
        }
        .into(),
        position: Some(ChangePosition {
            token: Position {
                epoch,
                seq: change.seq,
            }
            .token(),
        }),
        traceparent: change
            .origin
            .map(|origin| origin.header())
            .unwrap_or_default(),
    }
}

async fn send(tx: &Sender, change: RoomChange) -> Result<(), Gone> {
    tx.send(Ok(WatchResponse {
        change: Some(change),
    }))
    .await
    .map_err(|_| Gone)
}
