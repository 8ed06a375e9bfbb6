//! The one back-off policy of every retry loop in livemesh.
//!
//! A loop that retries something that must eventually happen (settling an
//! ended room, following a change feed, forwarding to a peer datacenter)
//! waits between attempts with a [`Backoff`]: exponential (doubling), capped,
//! and jittered so that the replicas and nodes that lost the same dependency
//! at the same moment do not retry in lockstep. The delays come from
//! `backon`'s exponential policy; this module adds what every loop here also
//! needs: a reset after progress, an optional limit on attempts, and one log
//! line when a bounded loop gives up.
//!
//! Jitter: each delay is drawn from `[d/2, d)` where `d` doubles from `first`
//! up to `max`, so no wait is longer than the un-jittered policy's and the
//! spread is wide enough to break lockstep.
//!
//! ```
//! # use std::time::Duration;
//! # use livemesh_mesh::backoff::Backoff;
//! # async fn flaky() -> Result<(), String> { Ok(()) }
//! # async fn demo() {
//! let mut backoff = Backoff::new("settling room 7", Duration::from_millis(100), Duration::from_secs(30));
//! while let Err(err) = flaky().await {
//!     tracing::warn!(%err, "settling failed; retrying");
//!     backoff.wait().await; // unbounded: never gives up
//! }
//! # }
//! ```

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Jittered, capped, exponential delays between the attempts of one retry
/// loop. See the module documentation.
#[derive(Debug)]
pub struct Backoff {
    what: String,
    policy: ExponentialBuilder,
    delays: ExponentialBackoff,
    attempts: Option<usize>,
}

impl Backoff {
    /// Delays doubling from about `first` up to about `max`, for ever.
    /// `what` names the work in the log line of a bounded loop that gives up.
    pub fn new(what: impl Into<String>, first: Duration, max: Duration) -> Self {
        let policy = ExponentialBuilder::default()
            .with_min_delay(first / 2)
            .with_max_delay((max / 2).max(first / 2))
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            what: what.into(),
            delays: policy.build(),
            policy,
            attempts: None,
        }
    }

    /// Gives up after `retries` waits: the next [`Backoff::wait`] returns
    /// `false` and logs (once) that `what` was given up.
    pub fn with_retries(mut self, retries: usize) -> Self {
        self.policy = self.policy.with_max_times(retries);
        self.delays = self.policy.build();
        self.attempts = Some(retries);
        self
    }

    /// The next delay, or `None` once a bounded loop's retries are used up
    /// (logged at warn, naming the work and how many attempts it made).
    pub fn next_delay(&mut self) -> Option<Duration> {
        let delay = self.delays.next();
        if delay.is_none() {
            let attempts = self.attempts.map_or(0, |retries| retries + 1);
            tracing::warn!(what = %self.what, attempts, "giving up after {attempts} attempts");
        }
        delay
    }

    /// Sleeps the next delay and returns `true`; returns `false` at once
    /// when a bounded loop has used its retries (see [`Self::next_delay`]).
    pub async fn wait(&mut self) -> bool {
        match self.next_delay() {
            Some(delay) => {
                tokio::time::sleep(delay).await;
                true
            }
            None => false,
        }
    }

    /// Back to the first delay (and the full number of retries): call it
    /// after progress, so the next failure is retried quickly again.
    pub fn reset(&mut self) {
        self.delays = self.policy.build();
    }

    /// Runs `op` until it succeeds, `retryable` says an error is final, or
    /// the retries are used up; each failure that will be retried is logged
    /// at `debug` with the work's name. Returns the last result.
    pub async fn retry<T, E, F, Fut>(
        mut self,
        mut op: F,
        retryable: impl Fn(&E) -> bool,
    ) -> Result<T, E>
    where
        E: Display,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        loop {
            match op().await {
                Ok(value) => return Ok(value),
                Err(err) if !retryable(&err) => return Err(err),
                Err(err) => {
                    tracing::debug!(what = %self.what, %err, "failed; retrying");
                    if !self.wait().await {
                        return Err(err);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_within_the_jittered_bounds_and_stop_at_the_cap() {
        let first = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let mut backoff = Backoff::new("test", first, max);
        let mut nominal = first;
        for _ in 0..12 {
            let delay = backoff.next_delay().expect("unbounded");
            assert!(
                delay >= nominal / 2 && delay < nominal,
                "{delay:?} outside [{:?}, {nominal:?})",
                nominal / 2
            );
            nominal = (nominal * 2).min(max);
        }
    }

    #[test]
    fn a_bounded_loop_gives_up_and_a_reset_starts_over() {
        let mut backoff =
            Backoff::new("test", Duration::from_millis(10), Duration::from_millis(80))
                .with_retries(3);
        for _ in 0..3 {
            assert!(backoff.next_delay().is_some());
        }
        assert_eq!(backoff.next_delay(), None);
        backoff.reset();
        let first = backoff.next_delay().expect("reset gives the retries back");
        assert!(first < Duration::from_millis(10), "{first:?}");
    }

    #[tokio::test]
    async fn retry_stops_at_success_at_a_final_error_and_when_retries_run_out() {
        let mut calls = 0;
        let result: Result<u32, String> =
            Backoff::new("ok", Duration::from_millis(10), Duration::from_secs(1))
                .retry(
                    || {
                        calls += 1;
                        let n = calls;
                        async move {
                            if n < 3 {
                                Err(format!("try {n}"))
                            } else {
                                Ok(n)
                            }
                        }
                    },
                    |_| true,
                )
                .await;
        assert_eq!(result, Ok(3));

        let mut calls = 0;
        let result: Result<(), String> =
            Backoff::new("final", Duration::from_millis(10), Duration::from_secs(1))
                .retry(
                    || {
                        calls += 1;
                        async { Err("refused".to_owned()) }
                    },
                    |err: &String| err != "refused",
                )
                .await;
        assert_eq!((result, calls), (Err("refused".to_owned()), 1));

        let mut calls = 0;
        let result: Result<(), String> =
            Backoff::new("bounded", Duration::from_millis(10), Duration::from_secs(1))
                .with_retries(5)
                .retry(
                    || {
                        calls += 1;
                        async { Err("down".to_owned()) }
                    },
                    |_| true,
                )
                .await;
        assert_eq!((result, calls), (Err("down".to_owned()), 6));
    }
}
