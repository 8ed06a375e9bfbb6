//! A room's sequencer: which of its ordered events may go to the streams
//! now, in offset order, each once, and which range is missing. Pure: no
//! I/O, no lock, no clock; the room table holds it under the room's lock
//! and does the fetching (`table/gaps.rs`).
//!
//! Events come from Deliver calls, which may race (two publishes) or be lost
//! (a failed Deliver); one ahead of a missing one waits in `pending` until
//! the missing ones come, by a Deliver or a gap fill from the history.

use std::collections::BTreeMap;
use std::sync::Arc;

use livemesh_proto::v1::RoomEvent;

/// The order of one room's ordered events on this node.
#[derive(Debug, Default)]
pub(crate) struct Sequencer {
    /// 0 until the node has joined the room in the hot store.
    pub(crate) epoch: u64,
    /// The last offset handed to the streams.
    pub(crate) released: u64,
    /// Ordered events ahead of `released + 1`.
    pending: BTreeMap<u64, Arc<RoomEvent>>,
    /// The history's head as last seen by a renewal.
    known_head: u64,
    /// Events delivered before the join finished.
    early: Vec<Arc<RoomEvent>>,
    /// The room-ended event was released (or the room had ended when the
    /// node joined it): nothing more is.
    pub(crate) ended: bool,
}

impl Sequencer {
    /// Where the room's history stood when the node joined it.
    pub(crate) fn start(&mut self, epoch: u64, offset: u64, ended: bool) {
        self.epoch = epoch;
        self.released = offset;
        self.ended = ended;
    }

    /// Keeps an event delivered before the join finished.
    pub(crate) fn hold_early(&mut self, event: Arc<RoomEvent>) {
        self.early.push(event);
    }

    /// The events delivered before the join finished, to deliver again.
    pub(crate) fn take_early(&mut self) -> Vec<Arc<RoomEvent>> {
        std::mem::take(&mut self.early)
    }

    /// The room's history restarted (the hot store lost it): offsets count
    /// from 1 again.
    fn restart(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.released = 0;
        self.known_head = 0;
        self.pending.clear();
    }

    /// Adds an ordered event; returns the events now releasable, in order.
    pub(crate) fn sequence(&mut self, event: Arc<RoomEvent>) -> Vec<Arc<RoomEvent>> {
        if self.epoch == 0 {
            self.early.push(event);
            return Vec::new();
        }
        if event.epoch < self.epoch {
            return Vec::new(); // from a history that no longer exists
        }
        if event.epoch > self.epoch {
            self.restart(event.epoch);
        }
        if event.offset > self.released {
            self.pending.insert(event.offset, event);
        }
        self.drain()
    }

    fn drain(&mut self) -> Vec<Arc<RoomEvent>> {
        let mut ready = Vec::new();
        // Offsets come from Deliver calls: one at u64::MAX must end the
        // run, not overflow (the room has no offset after it).
        while let Some(next) = self.released.checked_add(1)
            && let Some(event) = self.pending.remove(&next)
        {
            self.released = next;
            ready.push(event);
        }
        ready
    }

    /// The range a gap fill should fetch, if any: (after, upto].
    pub(crate) fn gap(&self) -> Option<(u64, u64)> {
        if self.epoch == 0 || self.ended {
            return None;
        }
        let upto = match self.pending.keys().next() {
            Some(first) => first - 1,
            None => self.known_head,
        };
        (upto > self.released).then_some((self.released, upto))
    }

    /// Gives up on the events up to `upto` (the history no longer holds
    /// them) rather than hold the room's later events forever; returns the
    /// events now releasable.
    pub(crate) fn skip_to(&mut self, upto: u64) -> Vec<Arc<RoomEvent>> {
        self.released = upto;
        self.drain()
    }

    /// The history's head as the store reported it: a newer epoch restarts
    /// the sequence. Returns whether events up to it are missing here.
    pub(crate) fn saw_head(&mut self, epoch: u64, offset: u64) -> bool {
        if self.ended || self.epoch == 0 {
            return false;
        }
        if epoch > self.epoch {
            // This node has seen no event of the new epoch yet.
            self.restart(epoch);
        }
        if self.epoch != epoch || offset <= self.known_head {
            return false;
        }
        self.known_head = offset;
        self.gap().is_some()
    }

    /// The room-ended event was released: nothing after it is.
    pub(crate) fn end(&mut self) {
        self.ended = true;
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemesh_proto::v1::room_event;

    fn ordered(epoch: u64, offset: u64) -> Arc<RoomEvent> {
        Arc::new(RoomEvent {
            room_id: 1,
            epoch,
            offset,
            kind: Some(room_event::Kind::Comment(livemesh_proto::v1::Comment {
                viewer_id: 1,
                text: "x".into(),
            })),
            ..RoomEvent::default()
        })
    }

    fn offsets(events: &[Arc<RoomEvent>]) -> Vec<u64> {
        events.iter().map(|e| e.offset).collect()
    }

    /// A sequencer of epoch 7 that released up to `released`.
    fn joined(released: u64) -> Sequencer {
        let mut seq = Sequencer::default();
        seq.start(7, released, false);
        seq
    }

    /// Found by the property tests: releasing the event at offset u64::MAX
    /// overflowed `released + 1` (a panic in debug builds, a wrap to 0 and
    /// events released again in release builds).
    #[test]
    fn the_sequencer_stops_at_the_last_offset_instead_of_overflowing() {
        let mut state = Sequencer {
            epoch: 7,
            released: u64::MAX - 2,
            ..Sequencer::default()
        };
        assert!(
            state.sequence(ordered(7, u64::MAX)).is_empty(),
            "a gap first"
        );
        let ready = state.sequence(ordered(7, u64::MAX - 1));
        let offsets: Vec<u64> = ready.iter().map(|e| e.offset).collect();
        assert_eq!(offsets, [u64::MAX - 1, u64::MAX]);
        assert_eq!(state.released, u64::MAX);
        assert!(
            state.sequence(ordered(7, u64::MAX)).is_empty(),
            "released once"
        );
        assert_eq!(state.gap(), None);
    }

    #[test]
    fn events_in_order_are_released_at_once() {
        let mut seq = joined(3);
        assert_eq!(offsets(&seq.sequence(ordered(7, 4))), [4]);
        assert_eq!(offsets(&seq.sequence(ordered(7, 5))), [5]);
        assert_eq!(seq.released, 5);
        assert_eq!(seq.gap(), None);
    }

    #[test]
    fn an_event_ahead_of_a_missing_one_waits_and_names_the_gap() {
        let mut seq = joined(3);
        assert!(seq.sequence(ordered(7, 6)).is_empty());
        assert!(seq.sequence(ordered(7, 5)).is_empty());
        assert_eq!(seq.gap(), Some((3, 4)), "offset 4 is missing");
        assert_eq!(offsets(&seq.sequence(ordered(7, 4))), [4, 5, 6]);
        assert_eq!(seq.released, 6);
        assert_eq!(seq.gap(), None);
    }

    #[test]
    fn an_event_released_or_pending_is_not_released_twice() {
        let mut seq = joined(3);
        assert!(
            seq.sequence(ordered(7, 3)).is_empty(),
            "released at the join"
        );
        assert!(seq.sequence(ordered(7, 5)).is_empty());
        assert!(seq.sequence(ordered(7, 5)).is_empty());
        assert_eq!(offsets(&seq.sequence(ordered(7, 4))), [4, 5]);
        assert!(seq.sequence(ordered(7, 4)).is_empty());
        assert!(seq.sequence(ordered(7, 5)).is_empty());
    }

    #[test]
    fn events_of_an_older_epoch_are_dropped_and_a_newer_epoch_restarts() {
        let mut seq = joined(3);
        assert!(seq.sequence(ordered(7, 5)).is_empty());
        assert!(seq.sequence(ordered(6, 4)).is_empty(), "an old history's");
        // The history restarted: offsets count from 1 again, and what
        // waited from the old epoch is gone.
        assert!(seq.sequence(ordered(8, 2)).is_empty());
        assert_eq!((seq.epoch, seq.released), (8, 0));
        assert_eq!(seq.gap(), Some((0, 1)));
        assert_eq!(offsets(&seq.sequence(ordered(8, 1))), [1, 2]);
        assert_eq!(seq.gap(), None, "old epoch's offset 5 no longer waits");
    }

    #[test]
    fn events_before_the_join_are_held_for_it() {
        let mut seq = Sequencer::default();
        assert!(seq.sequence(ordered(7, 4)).is_empty());
        assert_eq!(seq.gap(), None, "no gap before the join");
        assert!(!seq.saw_head(7, 9), "no head before the join");
        seq.start(7, 3, false);
        let early = seq.take_early();
        assert_eq!(offsets(&early), [4]);
        assert!(seq.take_early().is_empty());
        let ready: Vec<_> = early.into_iter().flat_map(|e| seq.sequence(e)).collect();
        assert_eq!(offsets(&ready), [4]);
    }

    #[test]
    fn a_head_past_what_was_released_is_a_gap_once() {
        let mut seq = joined(3);
        assert!(!seq.saw_head(7, 3), "not behind");
        assert!(seq.saw_head(7, 5), "4 and 5 never came");
        assert_eq!(seq.gap(), Some((3, 5)));
        assert!(!seq.saw_head(7, 5), "the same head again is no news");
        assert!(!seq.saw_head(6, 9), "an older epoch's head");
        assert_eq!(offsets(&seq.sequence(ordered(7, 4))), [4]);
        assert_eq!(seq.gap(), Some((4, 5)));
        assert_eq!(offsets(&seq.sequence(ordered(7, 5))), [5]);
        assert_eq!(seq.gap(), None);
    }

    #[test]
    fn a_newer_epochs_head_restarts_the_sequence() {
        let mut seq = joined(3);
        assert!(seq.sequence(ordered(7, 6)).is_empty());
        assert!(seq.saw_head(8, 2));
        assert_eq!((seq.epoch, seq.released), (8, 0));
        assert_eq!(seq.gap(), Some((0, 2)));
    }

    #[test]
    fn skipping_a_lost_range_releases_what_waited_behind_it() {
        let mut seq = joined(3);
        assert!(seq.sequence(ordered(7, 6)).is_empty());
        assert!(seq.sequence(ordered(7, 7)).is_empty());
        assert_eq!(seq.gap(), Some((3, 5)));
        assert_eq!(offsets(&seq.skip_to(5)), [6, 7]);
        assert_eq!(seq.released, 7);
        assert_eq!(seq.gap(), None);
    }

    #[test]
    fn an_ended_room_has_no_gap_and_nothing_waits() {
        let mut seq = joined(3);
        assert!(seq.sequence(ordered(7, 6)).is_empty());
        seq.end();
        assert_eq!(seq.gap(), None);
        assert!(!seq.saw_head(7, 9));
        let mut ended = Sequencer::default();
        ended.start(7, 3, true);
        assert_eq!(ended.gap(), None);
        assert!(!ended.saw_head(7, 9));
    }
}
