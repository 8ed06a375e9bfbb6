//! What tests and benches see of a dispatcher (cargo feature `testing`):
//! its figures and its breakers, and the dispatcher's state itself, to
//! drive it without a server (on a fixed room directory, say). Nothing here
//! is part of the service's contract.

use livemesh_mesh::breaker::BreakerState;

use crate::Dispatcher;
pub use crate::dispatch::{DispatchStats, DispatcherInner, DispatcherSettings};

impl Dispatcher {
    /// The dispatcher's figures (published, delivered, forwarded…).
    pub fn stats(&self) -> &DispatchStats {
        &self.inner.stats
    }

    /// The state of `node`'s circuit breaker, if the dispatcher has called it.
    pub fn node_breaker(&self, node: &str) -> Option<BreakerState> {
        self.inner.node_breaker(node)
    }
}
