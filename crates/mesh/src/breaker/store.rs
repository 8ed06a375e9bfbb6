//! The breaker around any async operation (Redis, SQL).

use std::future::Future;
use std::sync::Arc;

use super::*;

/// The breaker around any async operation (a Redis command, a SQL
/// transaction), for clients that are not tower services. The operation
/// runs in the caller's future; the breaker times it (slow calls) and
/// records its outcome as the operation's [`StoreFailure`] says.
#[derive(Clone)]
pub struct CallBreaker {
    circuit: Circuit,
    what: Arc<str>,
    open_ms: u128,
}

impl std::fmt::Debug for CallBreaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallBreaker")
            .field("breaker", &self.circuit.view)
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
        Ok(Self {
            circuit: settings.circuit(peer, kind)?,
            what: what.into(),
            open_ms: settings.open.as_millis(),
        })
    }

    pub fn breaker(&self) -> &Breaker {
        &self.circuit.view
    }

    /// Runs `op` if the breaker admits it, and records its outcome.
    pub async fn run<T, E, F>(&self, op: F) -> Result<T, Guarded<E>>
    where
        F: Future<Output = Result<T, E>>,
        E: StoreFailure,
    {
        let Some(permit) = self.circuit.admit() else {
            return Err(Guarded::Open(BreakerOpen {
                what: self.what.to_string(),
                peer: self.circuit.view.peer().to_owned(),
                open_ms: self.open_ms,
            }));
        };
        let result = op.await;
        permit.finish(match &result {
            Err(err) if err.counts_as_failure() => Outcome::Failed,
            _ => Outcome::Answered,
        });
        result.map_err(Guarded::Failed)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU8, Ordering};

    use super::*;

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
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let probe: Result<(), Guarded<sqlx::Error>> = guard.run(async { Ok(()) }).await;
            if probe.is_ok() {
                break;
            }
            assert!(Instant::now() < deadline, "no probe was let through");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(guard.breaker().state(), BreakerState::Closed);
        assert_eq!(breaker_state("sqlite://test"), Some(BreakerState::Closed));
    }
}
