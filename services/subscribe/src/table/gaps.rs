//! Events a node never got: the gap fill that fetches a room's missing
//! ordered events from its history, and the head check that compares each
//! room with its history's head (a lost last Deliver leaves no other trace).

use livemesh_mesh::lock;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::NodeInner;
use crate::room::{Room, RoomState, decode};

impl NodeInner {
    /// Fetches missing ordered events from the history until the room has
    /// no gap. Gives up on events the history no longer holds (counted).
    pub(super) async fn fill_gaps(self: Arc<Self>, room: Arc<Room>) {
        let mut failures = 0u32;
        loop {
            tokio::time::sleep(self.settings.gap_wait).await;
            let (epoch, (after, upto)) = {
                let mut state = lock(&room.state);
                match state.seq.gap() {
                    Some(gap) if !state.removed => (state.seq.epoch, gap),
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
            if state.seq.epoch != epoch || history.epoch != epoch {
                continue; // a new epoch: its own events drive it
            }
            let mut ready = Vec::new();
            for (offset, payload) in history.entries {
                if let Some(event) = decode(room.id, epoch, offset, &payload) {
                    self.stats.gap_filled.fetch_add(1, Ordering::Relaxed);
                    ready.extend(state.seq.sequence(Arc::new(event)));
                }
            }
            if state.seq.released < upto {
                // The history no longer holds them: skip ahead rather than
                // hold the room's later events forever.
                let skipped = upto - state.seq.released;
                self.stats.gap_skipped.fetch_add(skipped, Ordering::Relaxed);
                tracing::warn!(
                    room = room.id,
                    after = state.seq.released,
                    upto,
                    "events missing from the room's history were skipped"
                );
                ready.extend(state.seq.skip_to(upto));
            }
            self.release(&room, &mut state, ready, std::time::Instant::now());
        }
    }

    /// The history's head as the store reported it: a newer epoch restarts
    /// the room's sequence, and a head past what was released starts a gap
    /// fill. Returns whether the node was behind.
    pub(super) fn saw_head(
        self: &Arc<Self>,
        room: &Arc<Room>,
        state: &mut RoomState,
        epoch: u64,
        offset: u64,
    ) -> bool {
        if state.removed {
            return false;
        }
        let behind = state.seq.saw_head(epoch, offset);
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
                state.streams > 0 && state.seq.epoch != 0 && !state.seq.ended && !state.removed
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
}
