//! Breakers, budgets and load shedding: what keeps one slow or dead peer
//! from taking the rest of the mesh down.
//!
//! - [`grpc_breaker`]: a circuit breaker (tower-resilience's, time-based
//!   sliding window, failure-rate and slow-call thresholds) for one gRPC peer;
//!   [`crate::client`] puts one on every channel.
//! - [`RetryPolicy`]: tower's retry with a [`TpsBudget`], retrying only calls
//!   that are safe to send again.
//! - [`Deadline`]: the per-call time bound, honouring a shorter gRPC
//!   deadline the caller set (`grpc-timeout`), so a caller's own deadline
//!   is enforced inside the breaker and counts there.
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
use std::future::Future;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use http::{HeaderMap, Request, Response};
use opentelemetry::KeyValue;
use tokio::sync::{Semaphore, oneshot};
use tonic::body::Body;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::rng::HasherRng;
use tower::{Layer, Service, ServiceExt};
use tower_resilience_circuitbreaker::{
    CircuitBreakerError, CircuitBreakerLayer, CircuitState, FailureClassifier, SlidingWindowType,
};

use crate::BoxError;
use crate::client::MeshError;
use crate::config::ClientConfig;

/// A breaker's state, as tests and metrics see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BreakerState {
    /// Calls pass.
    Closed = 0,
    /// A few probes pass; their outcome closes or reopens the breaker.
    HalfOpen = 1,
    /// Every call is rejected at once with UNAVAILABLE.
    Open = 2,
}

impl BreakerState {
    fn from_u8(value: u8) -> Self {
        match value {
            0 => BreakerState::Closed,
            1 => BreakerState::HalfOpen,
            _ => BreakerState::Open,
        }
    }

    fn name(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }
}

impl From<CircuitState> for BreakerState {
    fn from(state: CircuitState) -> Self {
        match state {
            CircuitState::Closed => BreakerState::Closed,
            CircuitState::HalfOpen => BreakerState::HalfOpen,
            CircuitState::Open => BreakerState::Open,
        }
    }
}

struct BreakerShared {
    peer: String,
    kind: &'static str,
    state: AtomicU8,
}

/// A cheap, cloneable view of one breaker's state.
///
/// The state is the one of the last transition: an open breaker whose open
/// time has passed still reads `Open` until the next call turns it half-open.
#[derive(Clone)]
pub struct Breaker(Arc<BreakerShared>);

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("peer", &self.0.peer)
            .field("kind", &self.0.kind)
            .field("state", &self.state())
            .finish()
    }
}

impl Breaker {
    fn new(peer: &str, kind: &'static str) -> Self {
        let breaker = Breaker(Arc::new(BreakerShared {
            peer: peer.to_owned(),
            kind,
            state: AtomicU8::new(BreakerState::Closed as u8),
        }));
        registry()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .retain(|b| b.strong_count() > 0);
        registry()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Arc::downgrade(&breaker.0));
        record_state(peer, kind, BreakerState::Closed);
        breaker
    }

    /// The peer (URL, or the store's address) this breaker guards.
    pub fn peer(&self) -> &str {
        &self.0.peer
    }

    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.0.state.load(Ordering::Acquire))
    }

    /// Called by the breaker on every state change: log, count, remember.
    fn transition(&self, from: CircuitState, to: CircuitState) {
        let (from, to) = (BreakerState::from(from), BreakerState::from(to));
        self.0.state.store(to as u8, Ordering::Release);
        let (peer, kind) = (self.0.peer.as_str(), self.0.kind);
        match to {
            BreakerState::Open => tracing::warn!(
                peer,
                kind,
                from = from.name(),
                "circuit breaker opened: calls to this peer fail fast until it recovers"
            ),
            BreakerState::HalfOpen => {
                tracing::info!(peer, kind, "circuit breaker half-open: probing the peer")
            }
            BreakerState::Closed => tracing::info!(
                peer,
                kind,
                from = from.name(),
                "circuit breaker closed: the peer answers again"
            ),
        }
        // Instruments are looked up on each (rare) transition rather than
        // cached, so a meter provider installed after this breaker was built
        // still receives them.
        opentelemetry::global::meter("livemesh")
            .u64_counter("livemesh.breaker.transitions")
            .with_description("Circuit breaker state changes")
            .build()
            .add(
                1,
                &[
                    KeyValue::new("peer", peer.to_owned()),
                    KeyValue::new("kind", kind),
                    KeyValue::new("from", from.name()),
                    KeyValue::new("to", to.name()),
                ],
            );
        record_state(peer, kind, to);
    }
}

fn record_state(peer: &str, kind: &'static str, state: BreakerState) {
    opentelemetry::global::meter("livemesh")
        .i64_gauge("livemesh.breaker.state")
        .with_description("Circuit breaker state: 0 closed, 1 half-open, 2 open")
        .build()
        .record(
            state as i64,
            &[
                KeyValue::new("peer", peer.to_owned()),
                KeyValue::new("kind", kind),
            ],
        );
}

fn registry() -> &'static Mutex<Vec<Weak<BreakerShared>>> {
    static REGISTRY: OnceLock<Mutex<Vec<Weak<BreakerShared>>>> = OnceLock::new();
    REGISTRY.get_or_init(Mutex::default)
}

/// The state of this process's breakers for `peer` (the URL a channel was
/// built for, or a store's address): the worst of them when several
/// clients call the same peer; `None` when no live breaker guards it.
pub fn breaker_state(peer: &str) -> Option<BreakerState> {
    registry()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .filter(|b| b.peer == peer)
        .map(|b| BreakerState::from_u8(b.state.load(Ordering::Acquire)))
        .max()
}

/// The breaker settings of `[client]`, in the units the breaker takes.
#[derive(Debug, Clone)]
pub struct BreakerSettings {
    pub failure_rate: f64,
    pub slow_call: Duration,
    pub slow_call_rate: f64,
    pub window: Duration,
    pub min_calls: usize,
    pub open: Duration,
    pub half_open_calls: usize,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        Self::from(&ClientConfig::default())
    }
}

impl From<&ClientConfig> for BreakerSettings {
    fn from(config: &ClientConfig) -> Self {
        Self {
            failure_rate: config.breaker_failure_rate,
            slow_call: Duration::from_millis(config.breaker_slow_call_ms),
            slow_call_rate: config.breaker_slow_call_rate,
            window: Duration::from_millis(config.breaker_window_ms),
            min_calls: config.breaker_min_calls as usize,
            open: Duration::from_millis(config.breaker_open_ms),
            half_open_calls: config.breaker_half_open_calls as usize,
        }
    }
}

/// Why a breaker could not be built from the settings.
#[derive(Debug, thiserror::Error)]
#[error("invalid circuit breaker settings: {0}")]
pub struct InvalidBreaker(String);

impl BreakerSettings {
    /// A breaker layer for `peer` with `classifier`, and its state view.
    ///
    /// The window is time-based: tower-resilience's count-based window is
    /// cumulative since the last state change, not sliding.
    fn layer<C>(
        &self,
        peer: &str,
        kind: &'static str,
        classifier: C,
    ) -> Result<(CircuitBreakerLayer<C>, Breaker), InvalidBreaker> {
        let breaker = Breaker::new(peer, kind);
        let on_transition = breaker.clone();
        let layer = CircuitBreakerLayer::builder()
            .name(format!("{kind} {peer}"))
            .sliding_window_type(SlidingWindowType::TimeBased)
            .sliding_window_duration(self.window)
            .minimum_number_of_calls(self.min_calls)
            .failure_rate_threshold(self.failure_rate)
            .slow_call_duration_threshold(self.slow_call)
            .slow_call_rate_threshold(self.slow_call_rate)
            .wait_duration_in_open(self.open)
            .permitted_calls_in_half_open(self.half_open_calls)
            .on_state_transition(move |from, to| on_transition.transition(from, to))
            .failure_classifier_type(classifier)
            // With a handle, the layer shares one circuit between all the
            // services it wraps (a plain `build` gives each its own), which
            // `CallBreaker` relies on: it wraps a gate per call.
            .build_with_handle()
            .map_err(|e| InvalidBreaker(e.to_string()))?
            .0;
        Ok((layer, breaker))
    }
}

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

/// Classifies a gRPC call for its breaker. A named type rather than a
/// closure or `fn` pointer: a higher-ranked `fn(&T)` type held across an
/// await keeps rustc from proving callers' futures `Send`.
#[derive(Debug, Clone, Copy)]
pub struct GrpcClassifier;

impl FailureClassifier<Response<Body>, BoxError> for GrpcClassifier {
    fn classify(&self, result: &Result<Response<Body>, BoxError>) -> bool {
        match result {
            Ok(response) => header_code(response.headers()).is_some_and(code_counts_as_failure),
            // Transport errors and timeouts.
            Err(_) => true,
        }
    }
}

/// The breaker rejected a call without sending it.
#[derive(Debug, thiserror::Error)]
#[error("circuit to {peer} is open after repeated failures; failing fast, retry later")]
pub struct CircuitOpen {
    pub peer: String,
}

/// A breaker for calls to the gRPC peer `peer`, classifying by transport
/// errors and the `grpc-status` of the response headers.
pub fn grpc_breaker(
    settings: &BreakerSettings,
    peer: &str,
) -> Result<(CircuitBreakerLayer<GrpcClassifier>, Breaker), InvalidBreaker> {
    settings.layer(peer, "grpc", GrpcClassifier)
}

/// Maps the breaker's own error: a rejection becomes UNAVAILABLE naming the
/// peer (tonic would otherwise report `Unknown`), the inner error passes.
pub fn breaker_error(
    peer: &str,
) -> impl Fn(CircuitBreakerError<BoxError>) -> BoxError + Clone + use<> {
    let peer = peer.to_owned();
    move |err| match err {
        CircuitBreakerError::OpenCircuit => Box::new(tonic::Status::unavailable(
            CircuitOpen { peer: peer.clone() }.to_string(),
        )),
        CircuitBreakerError::Inner(err) => err,
    }
}

/// Bounds a call until its response headers arrive: the configured
/// timeout, or the caller's shorter gRPC deadline (`grpc-timeout`, set by
/// `tonic::Request::set_timeout`). An expired call fails with
/// DEADLINE_EXCEEDED naming the peer.
#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
    peer: Arc<str>,
}

impl<S> Deadline<S> {
    pub fn new(inner: S, limit: Duration, peer: &str) -> Self {
        Self {
            inner,
            limit,
            peer: peer.into(),
        }
    }
}

impl<S, B> Service<Request<B>> for Deadline<S>
where
    S: Service<Request<B>, Response = Response<Body>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response<Body>, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let limit = grpc_timeout(request.headers()).map_or(self.limit, |t| t.min(self.limit));
        let call = self.inner.call(request);
        let peer = self.peer.clone();
        Box::pin(async move {
            match tokio::time::timeout(limit, call).await {
                Ok(result) => result.map_err(Into::into),
                Err(_) => Err(Box::new(tonic::Status::deadline_exceeded(format!(
                    "{peer} did not answer within {} ms",
                    limit.as_millis()
                ))) as BoxError),
            }
        })
    }
}

/// The `grpc-timeout` header: an integer of at most 8 digits and a unit.
fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
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

/// Whether an operation's outcome is a success for the breaker.
#[derive(Debug)]
struct Failed;

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the operation failed")
    }
}

impl std::error::Error for Failed {}

/// What passes through a [`CallBreaker`]'s breaker: word that the call was
/// admitted goes out, the outcome comes back.
struct Gate {
    admitted: oneshot::Sender<()>,
    outcome: oneshot::Receiver<bool>,
}

type GateFn = fn(Gate) -> BoxFuture<'static, Result<(), Failed>>;

fn pass_gate(gate: Gate) -> BoxFuture<'static, Result<(), Failed>> {
    Box::pin(async move {
        let _ = gate.admitted.send(());
        match gate.outcome.await {
            Ok(false) => Ok(()),
            // A failure, or the operation was abandoned midway.
            Ok(true) | Err(_) => Err(Failed),
        }
    })
}

/// A gate's outcome is a failure when the operation's was.
#[derive(Debug, Clone, Copy)]
struct GateClassifier;

impl FailureClassifier<(), Failed> for GateClassifier {
    fn classify(&self, result: &Result<(), Failed>) -> bool {
        result.is_err()
    }
}

/// tower-resilience's breaker around any async operation (a Redis command,
/// a SQL transaction), for clients that are not tower services.
///
/// The operation need not be `'static`: the breaker's inner service is a
/// gate that admits the call and waits for its outcome, while the operation
/// itself runs in the caller's future. The breaker times the whole
/// operation (slow calls) and records its outcome as the operation's
/// [`StoreFailure`] says.
#[derive(Clone)]
pub struct CallBreaker {
    layer: CircuitBreakerLayer<GateClassifier>,
    breaker: Breaker,
    what: Arc<str>,
    open_ms: u128,
}

impl std::fmt::Debug for CallBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallBreaker")
            .field("breaker", &self.breaker)
            .finish()
    }
}

/// A [`CallBreaker`] refused the operation, or it failed.
#[derive(Debug)]
pub enum Guarded<E> {
    /// Not attempted: the breaker is open.
    Open(BreakerOpen),
    /// Attempted, and failed with the operation's own error.
    Failed(E),
}

/// A [`CallBreaker`]'s refusal.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "{what} at {peer} is failing: its circuit breaker is open, so calls fail fast for up to {open_ms} ms"
)]
pub struct BreakerOpen {
    pub what: String,
    pub peer: String,
    pub open_ms: u128,
}

impl CallBreaker {
    /// A breaker for `what` ("Redis", "SQL") at `peer` (its address,
    /// passwords masked).
    pub fn new(
        settings: &BreakerSettings,
        what: &str,
        peer: &str,
        kind: &'static str,
    ) -> Result<Self, InvalidBreaker> {
        let (layer, breaker) = settings.layer(peer, kind, GateClassifier)?;
        Ok(Self {
            layer,
            breaker,
            what: what.into(),
            open_ms: settings.open.as_millis(),
        })
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Runs `op` if the breaker admits it, and records its outcome.
    pub async fn run<T, E, F>(&self, op: F) -> Result<T, Guarded<E>>
    where
        F: Future<Output = Result<T, E>>,
        E: StoreFailure,
    {
        let (admitted_tx, admitted_rx) = oneshot::channel();
        let (outcome_tx, outcome_rx) = oneshot::channel();
        // Boxed, so that the breaker's types do not become part of the
        // caller's future (rustc then fails to prove such futures `Send`).
        let mut gate: BoxFuture<'static, Result<(), CircuitBreakerError<Failed>>> = Box::pin(
            self.layer
                .layer(tower::service_fn(pass_gate as GateFn))
                .oneshot(Gate {
                    admitted: admitted_tx,
                    outcome: outcome_rx,
                }),
        );
        // Drive the breaker until it admits the call (the gate's inner
        // service runs) or rejects it.
        tokio::select! {
            biased;
            admitted = admitted_rx => {
                if admitted.is_err() {
                    return Err(self.open());
                }
            }
            rejected = &mut gate => {
                // The gate only finishes before admission when rejected.
                let _ = rejected;
                return Err(self.open());
            }
        }
        let result = op.await;
        let failed = match &result {
            Ok(_) => false,
            Err(err) => err.counts_as_failure(),
        };
        let _ = outcome_tx.send(failed);
        let _ = gate.await;
        result.map_err(Guarded::Failed)
    }

    fn open<E>(&self) -> Guarded<E> {
        Guarded::Open(BreakerOpen {
            what: self.what.to_string(),
            peer: self.breaker.peer().to_owned(),
            open_ms: self.open_ms,
        })
    }
}

/// The server side: at most `max` calls in flight over all connections;
/// past it a call is answered at once with UNAVAILABLE ("server overloaded,
/// retry later"), a proper gRPC status the client's retry budget and
/// breaker understand. Built from tower's concurrency limit and load shed.
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
            limited: tower::load_shed::LoadShed::new(
                tower::limit::ConcurrencyLimit::with_semaphore(
                    inner.clone(),
                    self.semaphore.clone(),
                ),
            ),
            inner,
            max: self.max,
        }
    }
}

/// The service [`ShedLayer`] builds.
#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    limited: tower::load_shed::LoadShed<tower::limit::ConcurrencyLimit<S>>,
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
        // Readiness is taken per call below (a clone each), so that the
        // limit is checked when the call arrives, not held while idle.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        if never_shed(request.uri().path()) {
            let inner = self.inner.clone();
            return Box::pin(async move { inner.oneshot(request).await.map_err(Into::into) });
        }
        let limited = self.limited.clone();
        let max = self.max;
        let path = request.uri().path().to_owned();
        Box::pin(async move {
            match limited.oneshot(request).await {
                Err(err) if err.is::<tower::load_shed::error::Overloaded>() => {
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
                        .add(1, &[KeyValue::new("rpc.method", path)]);
                    Ok(tonic::Status::unavailable(format!(
                        "server overloaded ({max} calls in flight), retry later"
                    ))
                    .into_http())
                }
                other => other,
            }
        })
    }
}

#[cfg(test)]
mod tests {
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
