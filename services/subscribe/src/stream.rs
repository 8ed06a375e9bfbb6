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
//! (Those statuses are built in [`crate::error`], with the trailers
//! [`RESUME_EPOCH`](crate::RESUME_EPOCH) and [`RESUME_OFFSET`](crate::RESUME_OFFSET).)
//!
//! A subscriber that set `stamp_writes` gets each message with the time the
//! encoder wrote it (`written_at`); other streams send the frames as they are.
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

use crate::error::SubscribeError;
use crate::feed::{Cursor, Delivery, Read};
use crate::room::Room;
use crate::table::NodeInner;

/// A stream's registration in its room: it reads the room's feed, and is
/// removed from the room when dropped.
pub(crate) struct Live {
    pub(crate) node: Arc<NodeInner>,
    pub(crate) room: Arc<Room>,
    pub(crate) cursor: Cursor,
}

/// The response stream of one `Subscribe` call.
pub struct ViewerStream {
    /// The start message and replayed events, sent before live ones.
    prefix: VecDeque<Frame>,
    /// `None` for a stream that only replays (its room has ended).
    live: Option<Live>,
    delivery: Delivery,
    /// The subscriber asked for `stamp_writes`.
    stamp: bool,
    done: bool,
}

impl ViewerStream {
    pub(crate) fn new(live: Option<Live>, delivery: Delivery, stamp: bool) -> Self {
        Self {
            prefix: VecDeque::new(),
            live,
            delivery,
            stamp,
            done: false,
        }
    }

    /// `frame`, stamped with its write time if the subscriber asked.
    fn out(&self, frame: Frame) -> Poll<Option<Result<Frame, Status>>> {
        Poll::Ready(Some(Ok(if self.stamp { frame.stamped() } else { frame })))
    }

    /// Sets what is sent before live events: the start message, replayed events.
    pub(crate) fn set_prefix(&mut self, prefix: VecDeque<Frame>) {
        self.prefix = prefix;
    }
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
            return this.out(frame);
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
        let (epoch, offset) = live.cursor.last;
        match read {
            Read::Frame(frame) => this.out(frame),
            Read::Finished => {
                this.done = true;
                Poll::Ready(None)
            }
            Read::Overflow => {
                this.done = true;
                live.node.count_overflow();
                Poll::Ready(Some(Err(
                    SubscribeError::FellBehind { epoch, offset }.into()
                )))
            }
            Read::Shutdown => {
                this.done = true;
                Poll::Ready(Some(Err(
                    SubscribeError::ShuttingDown { epoch, offset }.into()
                )))
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
