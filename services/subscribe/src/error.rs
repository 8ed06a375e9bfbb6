//! What goes wrong in a subscribe node, and the one mapping of it to a
//! gRPC status: a client sees a precise code and what to change (a stream
//! that ends early also where to resume, in its trailers); internal causes
//! are logged here, not sent.

use livemesh_fanout::StoreError;
use livemesh_rooms::LookupError;
use tonic::Status;
use tonic::metadata::MetadataValue;

/// Trailer metadata of a stream that ended early: where to resume.
pub const RESUME_EPOCH: &str = "livemesh-resume-epoch";
pub const RESUME_OFFSET: &str = "livemesh-resume-offset";

/// Why a subscription was refused.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    #[error("{0}")]
    Invalid(&'static str),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(
        "room {0} has ended; subscribe to an ongoing room, or pass `resume` to replay what you missed before its end"
    )]
    Ended(u64),
    #[error(
        "resume position (epoch {epoch}, offset {offset}) is past room {room_id}'s newest event \
         (offset {head}); resume from a position this stream gave you"
    )]
    AheadOfHead {
        room_id: u64,
        epoch: u64,
        offset: u64,
        head: u64,
    },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error(
        "this stream fell too far behind the room's events and was ended; \
         subscribe again with resume = {{epoch: {epoch}, offset: {offset}}} \
         (or your last received position) to get every event after it"
    )]
    FellBehind {
        /// The position of the last ordered event the stream sent.
        epoch: u64,
        offset: u64,
    },
    #[error(
        "this subscribe node is shutting down; subscribe again (on any node) \
         with resume set to your last received position"
    )]
    ShuttingDown { epoch: u64, offset: u64 },
}

/// Why a stream could not join its room.
#[derive(Debug)]
pub(crate) enum JoinError {
    Ended,
    Store(StoreError),
}

impl From<SubscribeError> for Status {
    fn from(err: SubscribeError) -> Self {
        match &err {
            SubscribeError::Invalid(_) => Status::invalid_argument(err.to_string()),
            // The rooms crate's one mapping (it logs an unreachable ongoing-query).
            SubscribeError::Lookup(cause) => cause.clone().into(),
            SubscribeError::Store(_) => {
                tracing::warn!(%err, "subscribe failed");
                Status::unavailable(
                    "the room's event stream is unavailable right now; retry shortly",
                )
            }
            SubscribeError::Ended(_) => Status::failed_precondition(err.to_string()),
            SubscribeError::AheadOfHead { .. } => Status::out_of_range(err.to_string()),
            SubscribeError::FellBehind { epoch, offset } => with_resume(
                (*epoch, *offset),
                Status::resource_exhausted(err.to_string()),
            ),
            SubscribeError::ShuttingDown { epoch, offset } => {
                with_resume((*epoch, *offset), Status::unavailable(err.to_string()))
            }
        }
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
