//! What tests and benches see of a subscribe node (cargo feature
//! `testing`): its figures and its room table. Nothing here is part of the
//! service's contract.

use crate::SubscribeNode;
pub use crate::table::NodeStats;

impl SubscribeNode {
    /// The node's figures (Deliver calls, overflows, gap fills…).
    pub fn stats(&self) -> &NodeStats {
        &self.inner.stats
    }

    /// The node's name in the hot store (how dispatchers reach it).
    pub fn node_id(&self) -> &str {
        &self.inner.settings.node_id
    }

    /// How many rooms this node holds state for (its room table).
    pub fn stored_rooms(&self) -> usize {
        self.inner.stored_rooms()
    }

    /// Local streams per room.
    pub fn stream_counts(&self) -> Vec<(u64, u64)> {
        self.inner.stream_counts()
    }
}
