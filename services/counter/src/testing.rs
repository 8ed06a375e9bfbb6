//! What tests and benches see of a running counter (cargo feature
//! `testing`): its figures, its hot store, the loves it still holds, and
//! the steps its background tasks take, to drive them by hand. Nothing
//! here is part of the service's contract.

use std::sync::atomic::Ordering;

use livemesh_mesh::lock;

use crate::Counter;
pub use crate::core::{BatchFate, CounterStats, Taken};
pub use crate::error::SendError;
/// The hot store, for tests of its backends.
pub use crate::store::hot;
pub use crate::store::hot::HotStore;
pub use crate::store::sql::{FinalLoves, LovesDb};

impl Counter {
    /// The counter's figures (accepted, flushed, refused…).
    pub fn stats(&self) -> &CounterStats {
        self.inner.core.stats()
    }

    /// Loves accepted here that the hot store has not confirmed yet.
    pub fn waiting(&self) -> u64 {
        self.inner.core.waiting()
    }

    /// The hot store the counter writes to.
    pub fn hot_store(&self) -> &HotStore {
        self.inner.core.store()
    }

    /// Validates and takes a batch as `SendLoves` does, without the room
    /// lookup or the wait for its flush.
    pub fn take_batch(
        &self,
        room_id: u64,
        viewer_id: u64,
        batch_id: &str,
        taps: &[u64],
        video_now_ms: u64,
        now_ms: i64,
    ) -> Result<Taken, SendError> {
        self.inner
            .core
            .send(room_id, viewer_id, batch_id, taps, video_now_ms, now_ms)
    }

    /// One flush round, as the flusher runs it.
    pub async fn flush_once(&self) {
        self.inner.flush_once().await;
    }

    /// One attempt at finalising an ended room (see `ends.rs`); true if
    /// this attempt wrote its final total.
    pub async fn finalize(&self, room_id: u64) -> anyhow::Result<bool> {
        crate::ends::finalize(&self.inner, room_id).await
    }

    /// True while this replica is finalising `room_id`.
    pub fn is_ending(&self, room_id: u64) -> bool {
        lock(&self.inner.ending).contains(&room_id)
    }

    /// Rooms this replica finalised as the lease holder.
    pub fn finalised_here(&self) -> u64 {
        self.inner.finalised_here.load(Ordering::Relaxed)
    }

    /// Late batches (their room was closed) this replica added to final totals.
    pub fn late_batches(&self) -> u64 {
        self.inner.late_batches.load(Ordering::Relaxed)
    }
}
