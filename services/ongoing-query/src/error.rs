//! The room slice's errors, and the one place they become gRPC statuses
//! ([`From<RoomError> for Status`]): a database failure is logged there with
//! its cause and the caller is told to retry; a caller's own mistakes are
//! not logged.

use tonic::Status;

use crate::store::StoreError;

/// What went wrong with a room request; mapped to a gRPC status below.
#[derive(Debug, thiserror::Error)]
pub enum RoomError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("room {0} does not exist")]
    NotFound(u64),
    #[error("room {room_id} already ended (at {ended_at_ms} ms since the epoch); a room ends once")]
    AlreadyEnded { room_id: u64, ended_at_ms: i64 },
    #[error(
        "anchor {anchor_id} belongs to region {region} (bits 48..62 of the anchor id), \
         and no rooms database is configured for that region"
    )]
    RegionNotConfigured { anchor_id: u64, region: u16 },
    #[error("the rooms database of region {region} failed: {source}")]
    Store { region: u16, source: StoreError },
    /// A Watch stream ends because the server is stopping.
    #[error("the server is shutting down; reconnect with your last position")]
    ShuttingDown,
}

impl From<RoomError> for Status {
    fn from(err: RoomError) -> Self {
        match &err {
            RoomError::InvalidArgument(_) => Status::invalid_argument(err.to_string()),
            RoomError::NotFound(_) => Status::not_found(err.to_string()),
            RoomError::AlreadyEnded { .. } | RoomError::RegionNotConfigured { .. } => {
                Status::failed_precondition(err.to_string())
            }
            RoomError::Store { region, source } => {
                // The cause stays in the log; the caller learns what to do.
                tracing::error!(region, %source, "rooms database call failed");
                Status::unavailable(format!(
                    "the rooms database of region {region} is unavailable; retry later"
                ))
            }
            RoomError::ShuttingDown => Status::unavailable(err.to_string()),
        }
    }
}
