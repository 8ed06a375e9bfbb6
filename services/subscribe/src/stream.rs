//! One viewer's stream: what it sends first, how it reads its room's feed,
//! and how it ends.
//!
//! A stream first sends its prefix (the `started` message and any replayed
//! events), then reads the room's [`Feed`](crate::feed::Feed) through its
//! own cursor: ordered events in order, then the newest latest value of each
//! kind it has not sent, one per message or, for a subscriber that set
//! `accept_batches`, everything waiting in one `EventBatch`. Its messages
//! are the feed's pre-encoded bytes (`livemesh_proto::encoded`).
//!
//! It ends:
//! - OK after the room-ended event (and whatever came before it);
//! - with `RESOURCE_EXHAUSTED` and the position of the last ordered event it
//!   sent in its trailers when it fell more than `subscribe.queue_len`
//!   ordered events behind, so the client resumes from there without loss;
//! - with `UNAVAILABLE` and the same trailers when the node shuts down.
//!
//! When sent, a latest-value event carries the position of the last
//! ordered event this stream was sent, so the position of any event a
//! client received is safe to resume from.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use livemesh_proto::encoded::Frame;
use tonic::Status;
use tonic::metadata::MetadataValue;

use crate::feed::{Cursor, Delivery, Read};
use crate::table::{NodeInner, Room};

/// Trailer metadata of a stream that ended early: where to resume.
pub const RESUME_EPOCH: &str = "livemesh-resume-epoch";
pub const RESUME_OFFSET: &str = "livemesh-resume-offset";

/// A stream's registration in its room: it reads the room's feed, and is
/// removed from the room when dropped.
pub struct Live {
    pub node: Arc<NodeInner>,
    pub room: Arc<Room>,
    pub cursor: Cursor,
}

/// The response stream of one `Subscribe` call.
pub struct ViewerStream {
    /// The start message and replayed events, sent before live ones.
    prefix: VecDeque<Frame>,
    /// `None` for a stream that only replays (its room has ended).
    live: Option<Live>,
    delivery: Delivery,
    done: bool,
}

impl ViewerStream {
    pub fn new(live: Option<Live>, delivery: Delivery) -> Self {
        Self {
            prefix: VecDeque::new(),
            live,
            delivery,
            done: false,
        }
    }

    /// Sets what is sent before live events: the start message, replayed events.
    pub fn set_prefix(&mut self, prefix: VecDeque<Frame>) {
        self.prefix = prefix;
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
    type Item = Result<Frame, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if let Some(frame) = this.prefix.pop_front() {
            if this.prefix.is_empty() {
                // Idle streams are many: give the replay buffer back.
                this.prefix = VecDeque::new();
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if this.done {
            return Poll::Ready(None);
        }
        let Some(live) = &mut this.live else {
            this.done = true;
            return Poll::Ready(None);
        };
        let read = std::task::ready!(
            live.room
                .feed
                .poll_read(&mut live.cursor, this.delivery, cx)
        );
        let last = live.cursor.last;
        let (epoch, offset) = last;
        match read {
            Read::Frame(frame) => Poll::Ready(Some(Ok(frame))),
            Read::Finished => {
                this.done = true;
                Poll::Ready(None)
            }
            Read::Overflow => {
                this.done = true;
                live.node.count_overflow();
                let status = Status::resource_exhausted(format!(
                    "this stream fell too far behind the room's events and was ended; \
                     subscribe again with resume = {{epoch: {epoch}, offset: {offset}}} \
                     (or your last received position) to get every event after it"
                ));
                Poll::Ready(Some(Err(with_resume(last, status))))
            }
            Read::Shutdown => {
                this.done = true;
                let status = Status::unavailable(
                    "this subscribe node is shutting down; subscribe again (on any node) \
                     with resume set to your last received position",
                );
                Poll::Ready(Some(Err(with_resume(last, status))))
            }
        }
    }
}

impl Drop for ViewerStream {
    fn drop(&mut self) {
        if let Some(live) = self.live.take() {
            live.room.feed.forget(&live.cursor);
            live.node.remove_stream(&live.room);
        }
    }
}
