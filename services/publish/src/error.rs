//! What goes wrong in the dispatcher, and the one mapping of it to a gRPC
//! status: a client sees a precise code and what to change; internal causes
//! are logged here, not sent.

use livemesh_rooms::LookupError;
use tonic::Status;

/// Why a comment's text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TextError {
    #[error(
        "comment.text is empty once whitespace, control and invisible characters are removed; \
         send visible text"
    )]
    Blank,
    #[error("comment.text has {chars} characters; at most {max} are allowed")]
    TooLong { chars: usize, max: usize },
    #[error(
        "comment.text holds the bidirectional control character U+{code:04X} at character \
         {at}; remove embeddings, overrides and isolates (U+202A..U+202E, U+2066..U+2069)"
    )]
    Bidi { code: u32, at: usize },
    #[error(
        "comment.text holds the control character U+{code:04X} at character {at}; only tab \
         and line breaks are allowed"
    )]
    Control { code: u32, at: usize },
}

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Text(#[from] TextError),
    #[error("room {0} does not exist; start it first (RoomAdminService.StartRoom)")]
    UnknownRoom(u64),
    #[error("room {0} has ended; nothing more can be published to it")]
    RoomOver(u64),
    #[error("the rooms service did not answer: {0}")]
    Rooms(String),
    #[error(
        "room {room_id} has ended (its last event is at offset {offset}); nothing more can be published to it"
    )]
    Ended { room_id: u64, offset: u64 },
    #[error(transparent)]
    Store(#[from] livemesh_fanout::StoreError),
    #[error(
        "room_ended is published by the dispatcher itself when the rooms service reports \
         the room's end; end a room with RoomAdminService.EndRoom"
    )]
    RoomEndedNotFromPeer,
    #[error(
        "gift events are published by the gift-settler when a gift is paid; send the \
         gift with GiftsService.SendGift"
    )]
    GiftNotFromSettler,
    #[error(
        "only the mesh's own services may publish a batch of events; publish each with \
         Publish"
    )]
    BatchNotFromMesh,
    #[error("a batch takes at most {max} events, not {len}")]
    BatchTooLarge { len: usize, max: usize },
    #[error("comments are a viewer's: publish each with Publish, not in a batch")]
    CommentInBatch,
}

impl From<PublishError> for Status {
    fn from(err: PublishError) -> Self {
        match &err {
            PublishError::Invalid(_)
            | PublishError::Text(_)
            | PublishError::BatchTooLarge { .. }
            | PublishError::CommentInBatch => Status::invalid_argument(err.to_string()),
            PublishError::RoomEndedNotFromPeer
            | PublishError::GiftNotFromSettler
            | PublishError::BatchNotFromMesh => Status::permission_denied(err.to_string()),
            PublishError::UnknownRoom(_) => Status::not_found(err.to_string()),
            PublishError::Ended { .. } | PublishError::RoomOver(_) => {
                Status::failed_precondition(err.to_string())
            }
            // The rooms crate's one mapping (it logs the cause).
            PublishError::Rooms(cause) => LookupError::Unavailable(cause.clone()).into(),
            PublishError::Store(cause) => {
                tracing::warn!(%cause, "publish failed");
                Status::unavailable(
                    "the room's event store is unavailable; retry with the same idempotency_key",
                )
            }
        }
    }
}
