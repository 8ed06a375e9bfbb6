//! The gift-settler's errors, and the one place they become gRPC statuses
//! ([`From<GiftError> for Status`]): internal causes are logged there and
//! the caller is told what to do; a caller's own mistakes are not logged.

use livemesh_mesh::breaker::{BreakerOpen, StoreFailure};
use livemesh_rooms::LookupError;
use tonic::Status;

use crate::settle::Step;

/// Why a transfer was not applied.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("insufficient funds: the balance is {balance}, the transfer needs {amount}")]
    Insufficient { balance: i64, amount: i64 },
    #[error("this idempotency key was already used for a different request ({first})")]
    KeyReused { first: String },
    #[error("room {0} has ended; gifts are no longer accepted")]
    RoomEnded(u64),
    /// The room's virtual accounts are not open in this shard yet.
    #[error("room {0} is not open in this shard")]
    RoomNotOpen(u64),
    /// The transfer would take a balance past what an account can hold.
    #[error(
        "the transfer would take the balance of {account} {direction} {limit}, the {what} an \
         account can hold; it was not applied"
    )]
    BalanceLimit {
        account: String,
        direction: &'static str,
        limit: i64,
        what: &'static str,
    },
    /// The database refused the transfer for one of the ledger's
    /// constraints: permanent, a retry cannot help.
    #[error("the transfer breaks the ledger's constraint ({0}); it was not applied")]
    Constraint(String),
    /// The database refused the statement for another reason than a
    /// constraint or a conflict (a schema or permission problem): a retry
    /// cannot help, and it is the server's fault, not the caller's.
    #[error("the balance database refused the transfer: {0}")]
    Rejected(String),
    /// The room's viewers could not be told of the gift (the dispatcher
    /// did not answer); nothing was applied.
    #[error("the room's event stream did not take the gift's event: {0}")]
    Unannounced(String),
    /// A concurrent transaction won (same transfer id, a deadlock): try again.
    #[error("a concurrent transaction conflicted; try again")]
    Conflict,
    #[error("balance database: {0}")]
    Db(#[from] sqlx::Error),
    /// The shard's circuit breaker is open: it failed repeatedly just now.
    #[error(transparent)]
    Unavailable(BreakerOpen),
}

impl LedgerError {
    /// A refusal of the database that the same transfer would meet again.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Constraint(_) | Self::Rejected(_))
    }
}

impl StoreFailure for LedgerError {
    fn counts_as_failure(&self) -> bool {
        match self {
            LedgerError::Db(err) => err.counts_as_failure(),
            // Refusals and contention are not the database failing.
            _ => false,
        }
    }
}

/// Why a settlement did not finish.
#[derive(Debug, thiserror::Error)]
pub enum SettleError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("balance database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("injected crash before {0:?}")]
    Crash(Step),
    #[error("room {0}'s gifts add up to more than a balance can hold")]
    Overflow(u64),
}

/// Why a request of the gift-settler's gRPC services failed.
#[derive(Debug, thiserror::Error)]
pub enum GiftError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Lookup(#[from] LookupError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("balance database: {0}")]
    Db(#[from] sqlx::Error),
    /// `SettleRoom` for a room that has not ended.
    #[error("room {0} is ongoing; it is settled when it ends")]
    Ongoing(u64),
    /// `SettleRoom`: the settlement stopped before it finished.
    #[error("settling room {room_id} did not finish ({source})")]
    Settle { room_id: u64, source: SettleError },
    /// `ExportLedger`: a shard failed while the export streamed.
    #[error("exporting the ledger: {0}")]
    Export(sqlx::Error),
}

impl From<GiftError> for Status {
    fn from(err: GiftError) -> Self {
        match &err {
            GiftError::Invalid(_) => Status::invalid_argument(err.to_string()),
            GiftError::Ledger(LedgerError::Insufficient { .. } | LedgerError::RoomEnded(_)) => {
                Status::failed_precondition(err.to_string())
            }
            GiftError::Ledger(LedgerError::BalanceLimit { .. }) => {
                Status::out_of_range(err.to_string())
            }
            GiftError::Ledger(LedgerError::Constraint(_)) => {
                // Logged with the transfer id where the database refused it.
                Status::failed_precondition(
                    "the transfer would break a rule of the ledger (a balance below zero or \
                     out of range); it was not applied and a retry is refused the same way",
                )
            }
            GiftError::Ledger(LedgerError::Rejected(_)) => {
                tracing::error!(%err, "the balance database refused a transfer");
                Status::internal(
                    "the balance database refused the transfer; it was not applied (the \
                     operators have the cause in the log)",
                )
            }
            GiftError::Ledger(LedgerError::KeyReused { .. }) => {
                Status::already_exists(err.to_string())
            }
            GiftError::Ledger(LedgerError::Unannounced(_)) => {
                tracing::warn!(%err, "a gift was not applied: its event was not taken");
                Status::unavailable(
                    "the room's event stream did not take the gift, so it was not applied; \
                     retry with the same idempotency_key",
                )
            }
            GiftError::Ledger(
                LedgerError::Conflict
                | LedgerError::RoomNotOpen(_)
                | LedgerError::Db(_)
                | LedgerError::Unavailable(_),
            )
            | GiftError::Db(_) => {
                tracing::warn!(%err, "gift or deposit failed");
                Status::unavailable(
                    "the balance store is unavailable right now; retry with the same idempotency_key",
                )
            }
            // A room lookup's one mapping is the rooms client's.
            GiftError::Lookup(lookup) => lookup.clone().into(),
            GiftError::Ongoing(_) => Status::failed_precondition(err.to_string()),
            GiftError::Settle { room_id, source } => {
                tracing::warn!(room_id, err = %source, "settlement failed");
                Status::unavailable(format!(
                    "settling room {room_id} did not finish ({source}); it resumes by itself, or call SettleRoom again"
                ))
            }
            GiftError::Export(source) => {
                tracing::warn!(err = %source, "exporting the ledger failed");
                Status::unavailable("a balance shard did not answer; export again")
            }
        }
    }
}
