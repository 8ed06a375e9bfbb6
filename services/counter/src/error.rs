//! What goes wrong in the counter, and the one mapping of it to a gRPC
//! status: a client sees a precise code and what to change; internal causes
//! are logged here, not sent.

use livemesh_rooms::LookupError;
use tonic::Status;

use crate::store::hot::HotError;

/// Why a batch was not taken.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(
        "the hot store is unreachable and {waiting} loves already wait to be written (limit {limit}); retry later"
    )]
    Backlogged { waiting: u64, limit: u64 },
}

/// What went wrong with a counter request.
#[derive(Debug, thiserror::Error)]
pub enum CounterError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error("room {0} has ended; loves are no longer counted")]
    RoomEnded(u64),
    #[error(transparent)]
    Backlogged(#[from] SendError),
    #[error(transparent)]
    Hot(#[from] HotError),
    #[error("the room's final loves cannot be read right now; retry later")]
    Final {
        room_id: u64,
        #[source]
        cause: sqlx::Error,
    },
}

impl From<CounterError> for Status {
    fn from(err: CounterError) -> Self {
        match &err {
            CounterError::InvalidArgument(_) => Status::invalid_argument(err.to_string()),
            // The rooms crate's one mapping (it logs an unreachable ongoing-query).
            CounterError::Lookup(cause) => cause.clone().into(),
            CounterError::RoomEnded(_) => Status::failed_precondition(err.to_string()),
            CounterError::Backlogged(_) => Status::unavailable(err.to_string()),
            CounterError::Final { room_id, cause } => {
                tracing::warn!(room_id, e = %cause, "reading a final total failed");
                Status::unavailable(err.to_string())
            }
            CounterError::Hot(cause) => {
                tracing::warn!(%cause, "hot store call failed");
                Status::unavailable("love totals cannot be read right now; retry later")
            }
        }
    }
}
