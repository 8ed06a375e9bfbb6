//! Breakers, budgets and load shedding: what keeps one slow or dead peer
//! from taking the rest of the mesh down.
//!
//! - [`PeerGuardLayer`]: a circuit breaker (seatbelt's, see
//!   [`crate::breaker`]: failure-rate and slow-call thresholds over a
//!   bucketed window) and the per-call time bound for one gRPC peer,
//!   honouring a shorter gRPC deadline the caller set (`grpc-timeout`), so
//!   a caller's own deadline is enforced inside the breaker and counts
//!   there; [`crate::client`] puts one on every channel.
//! - [`RetryPolicy`]: tower's retry with a [`TpsBudget`], retrying only calls
//!   that are safe to send again.
//! - [`CallBreaker`]: the same breaker around any async operation (Redis,
//!   SQL), for clients that are not tower services.
//! - [`ShedLayer`]: the server side: a global concurrency limit with load
//!   shedding that answers UNAVAILABLE at once.
//!
//! Every breaker's state change is logged (warn when it opens, info
//! otherwise) and counted through the global OpenTelemetry meter
//! (`livemesh.breaker.transitions{peer,kind,from,to}` and the gauge
//! `livemesh.breaker.state{peer,kind}`: 0 closed, 1 half-open, 2 open).

use std::collections::hash_map::RandomState;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use tokio::sync::Semaphore;
use tonic::body::Body;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::rng::HasherRng;
use tower::{Layer, Service, ServiceExt};

use crate::BoxError;
pub use crate::breaker::{
    Breaker, BreakerOpen, BreakerSettings, BreakerState, CallBreaker, CircuitOpen, Guarded,
    InvalidBreaker, PeerGuard, PeerGuardLayer, breaker_state,
};
use crate::client::MeshError;
use crate::config::ClientConfig;

/// The gRPC status code a response carries in its headers (a trailers-only
/// error); `None` for a response whose status comes in the trailers.
pub fn header_code(headers: &HeaderMap) -> Option<tonic::Code> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map(tonic::Code::from_i32)
}

/// Whether a gRPC outcome says the peer is in trouble (as opposed to the
/// caller having asked for something wrong).
pub fn code_counts_as_failure(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Internal
            | tonic::Code::Unknown
            | tonic::Code::ResourceExhausted
    )
}

/// The `grpc-timeout` header: an integer of at most 8 digits and a unit.
pub(crate) fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3_600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

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

/// Something that can say whether it means the guarded store is in
/// trouble (a timeout, a lost connection) rather than a refusal of this one
/// operation (a constraint, a script error).
pub trait StoreFailure {
    fn counts_as_failure(&self) -> bool;
}

/// A SQL error counts against the database when the database could not be
/// reached or talked to; an error it answered with (a constraint, a
/// deadlock, bad SQL) is about the statement.
impl StoreFailure for sqlx::Error {
    fn counts_as_failure(&self) -> bool {
        matches!(
            self,
            sqlx::Error::Io(_)
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
        )
    }
}

/// The server side: at most `max` calls in flight over all connections;
/// past it a call is answered at once with UNAVAILABLE ("server overloaded,
/// retry later"), a proper gRPC status the client's retry budget and
/// breaker understand. A semaphore's permit per call, taken at once or not.
///
/// A call holds its permit until its response headers are ready: a unary
/// call for its whole work, a streaming call (Subscribe, Watch,
/// ExportLedger) only until its stream starts, so long-lived streams do not
/// use up the limit. Health checks and reflection are never shed, so an
/// overloaded server is not also taken for dead.
#[derive(Debug, Clone)]
pub struct ShedLayer {
    semaphore: Arc<Semaphore>,
    max: usize,
}

impl ShedLayer {
    pub fn new(max: usize) -> Self {
        Self {
            semaphore: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl<S: Clone> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Shed {
            inner,
            semaphore: self.semaphore.clone(),
            max: self.max,
        }
    }
}

/// The service [`ShedLayer`] builds.
#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    semaphore: Arc<Semaphore>,
    max: usize,
}

/// Paths never shed: health checks and reflection.
fn never_shed(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

impl<S, B> Service<Request<B>> for Shed<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // The limit is checked when a call arrives (a permit taken or
        // not, at once), not held while idle.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        if never_shed(request.uri().path()) {
            return Box::pin(async move { inner.oneshot(request).await.map_err(Into::into) });
        }
        // A permit now or never: a call past the limit is answered at once
        // (tower's load shed over a concurrency limit, in one step: no
        // per-call semaphore future to build).
        let Ok(permit) = self.semaphore.clone().try_acquire_owned() else {
            let max = self.max;
            tracing::debug!(max, "call shed: the server is at its concurrency limit");
            // Looked up per shed call (rare), like the breaker's
            // instruments, so a provider installed later counts it.
            opentelemetry::global::meter("livemesh")
                .u64_counter("livemesh.server.shed")
                .with_description(
                    "Calls answered UNAVAILABLE at once because the server was at \
                     server.max_concurrent_requests",
                )
                .build()
                .add(
                    1,
                    &[opentelemetry::KeyValue::new(
                        "rpc.method",
                        request.uri().path().to_owned(),
                    )],
                );
            return Box::pin(std::future::ready(Ok(tonic::Status::unavailable(format!(
                "server overloaded ({max} calls in flight), retry later"
            ))
            .into_http())));
        };
        Box::pin(async move {
            let response = inner.oneshot(request).await.map_err(Into::into);
            // Held until the response headers are ready.
            drop(permit);
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::*;

    #[test]
    fn grpc_timeouts_parse_in_every_unit() {
        let mut headers = HeaderMap::new();
        for (value, expected) in [
            ("250m", Duration::from_millis(250)),
            ("3S", Duration::from_secs(3)),
            ("2M", Duration::from_secs(120)),
            ("1H", Duration::from_secs(3_600)),
            ("40u", Duration::from_micros(40)),
            ("7n", Duration::from_nanos(7)),
        ] {
            headers.insert("grpc-timeout", value.parse().unwrap());
            assert_eq!(grpc_timeout(&headers), Some(expected), "{value}");
        }
        for bad in ["", "m", "12x", "-1S"] {
            headers.insert("grpc-timeout", bad.parse().unwrap());
            assert_eq!(grpc_timeout(&headers), None, "{bad:?}");
        }
    }

    #[tokio::test]
    async fn a_call_breaker_opens_on_store_failures_not_on_refusals_and_recovers() {
        let settings = BreakerSettings {
            min_calls: 3,
            open: Duration::from_millis(100),
            half_open_calls: 1,
            window: Duration::from_secs(10),
            ..BreakerSettings::default()
        };
        let guard = CallBreaker::new(&settings, "SQL", "sqlite://test", "sql").unwrap();
        // The database answering "no such row" is not the database failing.
        for _ in 0..10 {
            let refused: Result<(), Guarded<sqlx::Error>> =
                guard.run(async { Err(sqlx::Error::RowNotFound) }).await;
            assert!(matches!(
                refused,
                Err(Guarded::Failed(sqlx::Error::RowNotFound))
            ));
        }
        assert_eq!(guard.breaker().state(), BreakerState::Closed);

        // Ten failures among ten answers: half the window, the threshold.
        let ran = AtomicU8::new(0);
        for _ in 0..10 {
            let failed: Result<(), _> = guard
                .run(async {
                    ran.fetch_add(1, Ordering::SeqCst);
                    Err(sqlx::Error::PoolTimedOut)
                })
                .await;
            assert!(matches!(failed, Err(Guarded::Failed(_))));
        }
        assert_eq!(guard.breaker().state(), BreakerState::Open);
        let rejected: Result<(), _> = guard
            .run(async {
                ran.fetch_add(1, Ordering::SeqCst);
                Ok::<(), sqlx::Error>(())
            })
            .await;
        let Err(Guarded::Open(open)) = rejected else {
            panic!("an open breaker ran the operation");
        };
        assert!(open.to_string().contains("sqlite://test"), "{open}");
        assert_eq!(ran.load(Ordering::SeqCst), 10, "not run while open");

        // After the open time a probe runs; its success closes the breaker.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let probe: Result<(), Guarded<sqlx::Error>> = guard.run(async { Ok(()) }).await;
            if probe.is_ok() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no probe was let through"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(guard.breaker().state(), BreakerState::Closed);
        assert_eq!(breaker_state("sqlite://test"), Some(BreakerState::Closed));
    }

    #[test]
    fn only_trouble_at_the_peer_counts_as_failure() {
        for code in [
            tonic::Code::Unavailable,
            tonic::Code::DeadlineExceeded,
            tonic::Code::Internal,
            tonic::Code::Unknown,
            tonic::Code::ResourceExhausted,
        ] {
            assert!(code_counts_as_failure(code), "{code:?}");
        }
        for code in [
            tonic::Code::Ok,
            tonic::Code::InvalidArgument,
            tonic::Code::NotFound,
            tonic::Code::FailedPrecondition,
            tonic::Code::AlreadyExists,
            tonic::Code::PermissionDenied,
            tonic::Code::Unauthenticated,
        ] {
            assert!(!code_counts_as_failure(code), "{code:?}");
        }
    }
}
