//! Retries within a budget (tower's retry with a `TpsBudget`), only of
//! what is safe to send again.

use std::collections::hash_map::RandomState;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use tonic::body::Body;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::rng::HasherRng;

use crate::breaker::header_code;
use crate::client::MeshError;
use crate::config::ClientConfig;

/// Retries within a budget, and only what is safe to send again: calls
/// that never reached the peer (the connection could not be made) and
/// UNAVAILABLE answers. Never a circuit-open rejection (the breaker said
/// not to call), never DEADLINE_EXCEEDED (the caller's time is spent), never
/// anything else the peer may have acted on.
pub struct RetryPolicy {
    budget: Arc<TpsBudget>,
    max_retries: u32,
    first_backoff: Duration,
    backoff: ExponentialBackoff<HasherRng>,
    retries: u32,
}

impl std::fmt::Debug for RetryPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryPolicy")
            .field("max_retries", &self.max_retries)
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// How long a deposit into the retry budget counts (the budget's memory).
const BUDGET_TTL: Duration = Duration::from_secs(10);

impl RetryPolicy {
    pub fn new(config: &ClientConfig) -> Self {
        let budget = TpsBudget::new(
            BUDGET_TTL,
            config.retry_min_per_sec,
            config.retry_budget_percent as f32 / 100.0,
        );
        Self::with_budget(
            Arc::new(budget),
            config.max_retries,
            Duration::from_millis(config.retry_backoff_ms),
        )
    }

    fn with_budget(budget: Arc<TpsBudget>, max_retries: u32, first_backoff: Duration) -> Self {
        Self {
            budget,
            max_retries,
            backoff: Self::backoff(first_backoff),
            first_backoff,
            retries: 0,
        }
    }

    /// Exponential from `first`, up to 16 times it, with up to 100% jitter
    /// drawn from a freshly seeded generator (so concurrent retries spread).
    fn backoff(first: Duration) -> ExponentialBackoff<HasherRng> {
        let first = first.max(Duration::from_millis(1));
        let rng = HasherRng::with_hasher(RandomState::new());
        // With min <= max, max > 0 and jitter 1.0 the maker cannot refuse;
        // tower's default backoff stands in rather than a panic.
        ExponentialBackoffMaker::new(first, first.saturating_mul(16), 1.0, rng)
            .unwrap_or_default()
            .make_backoff()
    }
}

impl Clone for RetryPolicy {
    fn clone(&self) -> Self {
        Self::with_budget(self.budget.clone(), self.max_retries, self.first_backoff)
    }
}

/// Whether `err` says the call never reached the peer: the connection could
/// not be made (refused, unreachable, connect timeout).
pub fn never_reached_peer(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(err) = source {
        if err.is::<tonic::ConnectError>() {
            return true;
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = err.source();
    }
    false
}

impl tower::retry::Policy<Request<bytes::Bytes>, Response<Body>, MeshError> for RetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _request: &mut Request<bytes::Bytes>,
        result: &mut Result<Response<Body>, MeshError>,
    ) -> Option<Self::Future> {
        if self.retries == 0 {
            // One deposit per call (not per attempt): retries are a share of calls.
            self.budget.deposit();
        }
        let safe = match result {
            Ok(response) => header_code(response.headers()) == Some(tonic::Code::Unavailable),
            Err(err) => never_reached_peer(err),
        };
        if !safe || self.retries >= self.max_retries {
            return None;
        }
        if !self.budget.withdraw() {
            tracing::debug!("retry budget spent: not retrying");
            return None;
        }
        self.retries += 1;
        Some(self.backoff.next_backoff())
    }

    fn clone_request(&mut self, request: &Request<bytes::Bytes>) -> Option<Request<bytes::Bytes>> {
        if self.max_retries == 0 {
            return None;
        }
        let mut copy = Request::new(request.body().clone());
        *copy.method_mut() = request.method().clone();
        *copy.uri_mut() = request.uri().clone();
        *copy.version_mut() = request.version();
        *copy.headers_mut() = request.headers().clone();
        *copy.extensions_mut() = request.extensions().clone();
        Some(copy)
    }
}
