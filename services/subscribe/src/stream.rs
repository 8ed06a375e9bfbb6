//! One viewer's stream: two delivery classes and how it ends.
//!
//! - **Ordered** events (comments, gifts, room ended) wait in a bounded
//!   queue. A stream whose queue is full is too slow to follow the room: it
//!   ends with `RESOURCE_EXHAUSTED` and the position of the last event it
//!   was sent, so the client resumes from there without loss.
//! - **Latest-value** events (love total, viewer count) sit in one slot per
//!   kind: a newer value replaces an unsent one, so a slow viewer gets the
//!   newest value, never a backlog. When sent, a latest-value event carries
//!   the position of the last ordered event this stream was sent, so the
//!   position of any event a client received is safe to resume from.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures::Stream;
use livemesh_proto::v1::{RoomEvent, SubscribeResponse, room_event, subscribe_response};
use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::table::{NodeInner, Room};

/// Trailer metadata of a stream that ended early: where to resume.
pub const RESUME_EPOCH: &str = "livemesh-resume-epoch";
pub const RESUME_OFFSET: &str = "livemesh-resume-offset";

/// Why a stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The room ended: after what is queued, the stream ends OK.
    Finish,
    /// The ordered queue overflowed.
    Overflow,
    /// The node is shutting down.
    Shutdown,
    /// The end was reported; nothing more.
    Done,
}

#[derive(Debug, Default)]
struct State {
    ordered: VecDeque<Arc<RoomEvent>>,
    love_total: Option<Arc<RoomEvent>>,
    viewer_count: Option<Arc<RoomEvent>>,
    waker: Option<Waker>,
    end: Option<End>,
    /// Ordered events at or before this (epoch, offset) were replayed or
    /// are older than the client's resume position: dropped when live.
    skip: (u64, u64),
}

/// The part of a stream the room table writes to.
#[derive(Debug, Default)]
pub struct Shared {
    state: Mutex<State>,
}

/// Whether a latest-value event is one of ours, and which slot.
pub fn is_latest(event: &RoomEvent) -> bool {
    matches!(
        event.kind,
        Some(room_event::Kind::LoveTotal(_) | room_event::Kind::ViewerCount(_))
    )
}

impl Shared {
    pub fn new(skip: (u64, u64)) -> Self {
        Self {
            state: Mutex::new(State {
                skip,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state whole; a poisoned lock
        // still holds a valid queue.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues an ordered event; returns false if the stream overflowed now.
    pub fn push_ordered(&self, event: &Arc<RoomEvent>, capacity: usize) -> bool {
        let mut state = self.lock();
        if state.end.is_some() || (event.epoch == state.skip.0 && event.offset <= state.skip.1) {
            return true;
        }
        let fits = state.ordered.len() < capacity;
        if fits {
            state.ordered.push_back(event.clone());
        } else {
            state.ordered = VecDeque::new();
            state.end = Some(End::Overflow);
        }
        wake(state);
        fits
    }

    /// Sets a latest-value slot (a newer value replaces an unsent one).
    pub fn push_latest(&self, event: &Arc<RoomEvent>) {
        let mut state = self.lock();
        if state.end.is_some() {
            return;
        }
        let slot = match event.kind {
            Some(room_event::Kind::LoveTotal(_)) => &mut state.love_total,
            _ => &mut state.viewer_count,
        };
        *slot = Some(event.clone());
        wake(state);
    }

    /// Ends the stream after what is queued (the room ended).
    pub fn finish(&self) {
        self.end_with(End::Finish);
    }

    /// Ends the stream now with UNAVAILABLE and a resume position.
    pub fn shut_down(&self) {
        self.end_with(End::Shutdown);
    }

    fn end_with(&self, end: End) {
        let mut state = self.lock();
        if state.end.is_none() {
            state.end = Some(end);
        }
        wake(state);
    }
}

/// Wakes the stream's task after the lock is released.
fn wake(mut state: MutexGuard<'_, State>) {
    let waker = state.waker.take();
    drop(state);
    if let Some(waker) = waker {
        waker.wake();
    }
}

/// The response stream of one `Subscribe` call.
pub struct ViewerStream {
    /// The start message and replayed events, sent before live ones.
    prefix: VecDeque<SubscribeResponse>,
    shared: Arc<Shared>,
    /// The position of the last ordered event sent (or where the stream went live).
    last: (u64, u64),
    /// Set for live streams: the registration removed when the stream is dropped.
    registration: Option<(Arc<NodeInner>, Arc<Room>, u64)>,
}

impl ViewerStream {
    pub fn new(
        prefix: VecDeque<SubscribeResponse>,
        shared: Arc<Shared>,
        last: (u64, u64),
        registration: Option<(Arc<NodeInner>, Arc<Room>, u64)>,
    ) -> Self {
        Self {
            prefix,
            shared,
            last,
            registration,
        }
    }

    /// Sets what is sent before live events: the start message, replayed events.
    pub fn set_prefix(&mut self, prefix: VecDeque<SubscribeResponse>) {
        self.prefix = prefix;
    }
}

/// The message for an event: an ordered event moves `last` to its
/// position; a latest-value event is sent with `last` as its position.
fn respond(last: &mut (u64, u64), event: &RoomEvent, ordered: bool) -> SubscribeResponse {
    let mut event = event.clone();
    if ordered {
        *last = (event.epoch, event.offset);
    } else {
        (event.epoch, event.offset) = *last;
    }
    SubscribeResponse {
        message: Some(subscribe_response::Message::Event(event)),
    }
}

/// `status` with the resume position in its trailers.
fn with_resume(last: (u64, u64), mut status: Status) -> Status {
    let (epoch, offset) = last;
    let metadata = status.metadata_mut();
    metadata.insert(RESUME_EPOCH, MetadataValue::from(epoch));
    metadata.insert(RESUME_OFFSET, MetadataValue::from(offset));
    status
}

impl Stream for ViewerStream {
    type Item = Result<SubscribeResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(message) = this.prefix.pop_front() {
            // Replayed events all lie at or before the start position, which
            // is where the stream resumes from if it ends during the replay.
            if let Some(subscribe_response::Message::Started(started)) = &message.message
                && let Some(position) = &started.position
            {
                this.last = (position.epoch, position.offset);
            }
            if this.prefix.is_empty() {
                // Idle streams are many: give the replay buffer back.
                this.prefix = VecDeque::new();
            }
            return Poll::Ready(Some(Ok(message)));
        }
        let mut state = this.shared.lock();
        match state.end {
            Some(End::Overflow) => {
                state.end = Some(End::Done);
                drop(state);
                let (epoch, offset) = this.last;
                let status = Status::resource_exhausted(format!(
                    "this stream fell too far behind the room's events and was ended; \
                     subscribe again with resume = {{epoch: {epoch}, offset: {offset}}} \
                     (or your last received position) to get every event after it"
                ));
                return Poll::Ready(Some(Err(with_resume(this.last, status))));
            }
            Some(End::Shutdown) => {
                state.end = Some(End::Done);
                drop(state);
                let status = Status::unavailable(
                    "this subscribe node is shutting down; subscribe again (on any node) \
                     with resume set to your last received position",
                );
                return Poll::Ready(Some(Err(with_resume(this.last, status))));
            }
            Some(End::Done) => return Poll::Ready(None),
            _ => {}
        }
        if let Some(event) = state.ordered.pop_front() {
            drop(state);
            return Poll::Ready(Some(Ok(respond(&mut this.last, &event, true))));
        }
        let latest = state
            .love_total
            .take()
            .or_else(|| state.viewer_count.take());
        if let Some(event) = latest {
            drop(state);
            return Poll::Ready(Some(Ok(respond(&mut this.last, &event, false))));
        }
        if state.end == Some(End::Finish) {
            state.end = Some(End::Done);
            return Poll::Ready(None);
        }
        if !state
            .waker
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            state.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for ViewerStream {
    fn drop(&mut self) {
        if let Some((node, room, id)) = self.registration.take() {
            node.remove_stream(&room, id);
        }
    }
}
