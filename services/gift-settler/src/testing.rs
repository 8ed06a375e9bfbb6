//! What the gift-settler's tests (and benches) reach beyond the gRPC API,
//! behind the `testing` feature: the balance shards, settlement with
//! injected crashes, and the ledger's types. Not for production callers:
//! these names may change with the service's internals.

pub use crate::batch::lane;
pub use crate::error::{LedgerError, SettleError};
pub use crate::settle::{Step, cut_of};
pub use crate::store::{
    Applied, CLEARING, EXTERNAL, PLATFORM, SettlementRow, Shard, Silent, Transfer, room_account,
    user_account,
};

use crate::GiftSettler;

impl GiftSettler {
    /// The balance shards, in shard order.
    pub fn shards(&self) -> &[Shard] {
        &self.inner.shards
    }

    /// The shard holding `user_id`'s balance.
    pub fn shard(&self, user_id: u64) -> &Shard {
        self.inner.shard(user_id)
    }

    /// Settles an ended room as the settler does when the room ends, asking
    /// `crash` before each step and stopping there when it says so.
    pub async fn settle(
        &self,
        room_id: u64,
        streamer_id: u64,
        crash: &(dyn Fn(Step) -> bool + Sync),
    ) -> Result<SettlementRow, SettleError> {
        self.inner.settle(room_id, streamer_id, crash).await
    }
}
