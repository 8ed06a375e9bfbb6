//! Circuit breakers: seatbelt's, with the mesh's state view, logs and
//! metrics around it.
//!
//! seatbelt keeps each breaker's window as ten buckets of a tenth of the
//! window with a running sum (resilience4j's partial aggregations), so
//! recording a call costs the same whatever the traffic. It judges one
//! failure rate, plus a separate rate of *abandoned* calls (admitted, never
//! finished): a slow call is reported to it as abandoned (its answer came,
//! too late to count as healthy), so `breaker_slow_call_rate` is seatbelt's
//! abandoned-rate threshold. Once that share is reached, slow calls count
//! as failed ones; `ClientConfig::validate` keeps the slow-call rate at or
//! above the failure rate, so reaching it always opens the breaker. A call
//! whose caller gave up midway is abandoned too, and counts like a slow one.
//!
//! Half-open is seatbelt's quick mode: after `breaker_open_ms` one probe is
//! let through (another only if it has not answered within the open time);
//! its success closes the breaker, its failure opens it again.
//!
//! seatbelt's breaker is driven through a *gate*: its inner service is a
//! future that waits for the outcome the caller reports ([`Permit`]), while
//! the guarded work runs in the caller's own future. So one breaker serves
//! a tower stack ([`PeerGuard`], every channel of the client stack) and any
//! async operation ([`CallBreaker`]: Redis, SQL) alike.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use opentelemetry::KeyValue;
use seatbelt::breaker::{AbandonedPolicy, BreakerFuture, HalfOpenMode};
use seatbelt::{RecoveryInfo, ResilienceContext};
use tokio::sync::oneshot;
use tower::Service;

use crate::config::ClientConfig;

mod failure;
mod peer;
mod store;

pub(crate) use failure::grpc_timeout;
pub use failure::{StoreFailure, code_counts_as_failure, header_code};
pub use peer::{PeerGuard, PeerGuardLayer};
pub use store::{BreakerOpen, CallBreaker, Guarded};

/// A breaker's state, as tests and metrics see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BreakerState {
    /// Calls pass.
    Closed = 0,
    /// A probe passes; its outcome closes or reopens the breaker.
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
        let mut registry = registry()
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        registry.retain(|b| b.strong_count() > 0);
        registry.push(Arc::downgrade(&breaker.0));
        drop(registry);
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

    /// The breaker moved to `to` (from whatever it was).
    fn moved_to(&self, to: BreakerState) {
        let from = BreakerState::from_u8(self.0.state.swap(to as u8, Ordering::AcqRel));
        if from != to {
            self.report(from, to);
        }
    }

    /// The breaker moved from `from` to `to`, if it was at `from`.
    fn moved_from(&self, from: BreakerState, to: BreakerState) {
        if self
            .0
            .state
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.report(from, to);
        }
    }

    /// Every state change: log, count.
    fn report(&self, from: BreakerState, to: BreakerState) {
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
    /// Kept for configurations that set it; the breaker lets one probe
    /// through at a time (see the module docs).
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

/// What the gate hands seatbelt's breaker: the outcome to wait for, and
/// whether the breaker admitted it as a probe.
struct Gate {
    outcome: oneshot::Receiver<bool>,
    probe: bool,
}

/// An admitted call that finished; `failed` as the caller reported it.
#[derive(Debug, Clone, Copy)]
struct Passed {
    failed: bool,
    probe: bool,
}

/// The breaker refused the call (it is open).
#[derive(Debug, Clone, Copy)]
struct Refused;

type GateOutput = Result<Passed, Refused>;

/// The breaker's inner service: resolves when the caller reports.
#[derive(Debug, Clone, Copy)]
struct GateService;

struct GateFuture {
    outcome: oneshot::Receiver<bool>,
    probe: bool,
}

impl Future for GateFuture {
    type Output = GateOutput;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<GateOutput> {
        let probe = self.probe;
        Pin::new(&mut self.outcome).poll(cx).map(|outcome| {
            Ok(Passed {
                // A dropped sender never reaches here: the permit drops
                // this future first (an abandoned call).
                failed: outcome.unwrap_or(true),
                probe,
            })
        })
    }
}

impl Service<Gate> for GateService {
    type Response = Passed;
    type Error = Refused;
    type Future = GateFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Refused>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, gate: Gate) -> GateFuture {
        GateFuture {
            outcome: gate.outcome,
            probe: gate.probe,
        }
    }
}

type Seatbelt = seatbelt::breaker::Breaker<Gate, GateOutput, GateService>;

/// The clock seatbelt reads the time from. The breaker sets no timers, so
/// the clock's timer driver is not run.
fn clock() -> &'static tick::Clock {
    static CLOCK: OnceLock<tick::Clock> = OnceLock::new();
    CLOCK.get_or_init(|| {
        tick::runtime::InactiveClock::default()
            .activate(std::task::Waker::noop().clone())
            .0
    })
}

/// One breaker: seatbelt's circuit and the mesh's view of it.
#[derive(Clone)]
struct Circuit {
    seatbelt: Seatbelt,
    view: Breaker,
    slow_call: Duration,
}

impl BreakerSettings {
    /// A breaker for `peer` of `kind` (`grpc`, `redis`, `sql`).
    fn circuit(&self, peer: &str, kind: &'static str) -> Result<Circuit, InvalidBreaker> {
        for (name, rate) in [
            ("failure rate", self.failure_rate),
            ("slow-call rate", self.slow_call_rate),
        ] {
            if !(rate > 0.0 && rate <= 1.0) {
                return Err(InvalidBreaker(format!(
                    "the {name} must be above 0 and at most 1, not {rate}"
                )));
            }
        }
        let view = Breaker::new(peer, kind);
        let context: ResilienceContext<Gate, GateOutput> = ResilienceContext::new(clock());
        let (opened, probing, closed) = (view.clone(), view.clone(), view.clone());
        let layer = seatbelt::breaker::Breaker::layer(format!("{kind} {peer}"), &context)
            .recovery_with(|output: &GateOutput, _| match output {
                Ok(Passed { failed: true, .. }) => RecoveryInfo::retry(),
                _ => RecoveryInfo::never(),
            })
            .rejected_input_error(|_, _| Refused)
            .failure_threshold(self.failure_rate as f32)
            .min_throughput(u32::try_from(self.min_calls).unwrap_or(u32::MAX))
            .sampling_duration(self.window)
            .break_duration(self.open)
            .half_open_mode(HalfOpenMode::quick())
            .abandoned_policy(AbandonedPolicy::rate_threshold(self.slow_call_rate as f32))
            .on_opened(move |_, _| opened.moved_to(BreakerState::Open))
            .on_probing(move |gate: &mut Gate, _| {
                gate.probe = true;
                probing.moved_from(BreakerState::Open, BreakerState::HalfOpen);
            })
            .on_closed(move |_, _| closed.moved_to(BreakerState::Closed));
        Ok(Circuit {
            seatbelt: layered::Layer::layer(&layer, GateService),
            view,
            slow_call: self.slow_call,
        })
    }
}

impl Circuit {
    /// A permit for one call, or `None` when the breaker refuses it.
    fn admit(&self) -> Option<Permit> {
        let (report, outcome) = oneshot::channel();
        let mut seatbelt = self.seatbelt.clone();
        let mut pending = seatbelt.call(Gate {
            outcome,
            probe: false,
        });
        // A refusal is ready at once; an admitted call waits for its report.
        match (&mut pending).now_or_never() {
            Some(_) => None,
            None => Some(Permit {
                pending: Some(pending),
                report: Some(report),
                view: self.view.clone(),
                slow_call: self.slow_call,
                started: Instant::now(),
            }),
        }
    }
}

/// How an admitted call went, as far as the breaker cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The peer answered (a refusal of the request is an answer too).
    Answered,
    /// The peer is in trouble: unreachable, timed out, or said so.
    Failed,
}

/// One admitted call. Dropped without [`Permit::finish`] (the caller gave
/// up), it is recorded as abandoned, like a slow call.
struct Permit {
    pending: Option<BreakerFuture<GateOutput>>,
    report: Option<oneshot::Sender<bool>>,
    view: Breaker,
    slow_call: Duration,
    started: Instant,
}

impl Permit {
    /// Records the call's outcome; an answer that took the slow-call
    /// threshold or longer is recorded as abandoned.
    fn finish(mut self, outcome: Outcome) {
        let failed = outcome == Outcome::Failed;
        if !failed && self.started.elapsed() >= self.slow_call {
            return; // dropping the pending gate abandons it
        }
        let (Some(report), Some(pending)) = (self.report.take(), self.pending.take()) else {
            return;
        };
        let _ = report.send(failed);
        // The gate is ready now; completing it records the outcome (and
        // runs the transition callbacks) before the caller sees the answer.
        if let Some(Ok(passed)) = pending.now_or_never()
            && passed.failed
            && passed.probe
        {
            // In quick half-open mode a failed probe reopens the breaker
            // (seatbelt has no callback for that transition).
            self.view
                .moved_from(BreakerState::HalfOpen, BreakerState::Open);
        }
    }
}

/// The breaker rejected a call without sending it.
#[derive(Debug, thiserror::Error)]
#[error("circuit to {peer} is open after repeated failures; failing fast, retry later")]
pub struct CircuitOpen {
    pub peer: String,
}
