//! Anti-abuse validation of a batch of taps, as the seed warns: a client
//! that sends "a massive amount of counts in a single request" must not be
//! processed at face value.
//!
//! A batch is a list of tap timestamps in milliseconds of video time (the
//! time since the broadcast started). In order:
//! 1. duplicates are dropped and the rest sorted (clients may send disorder);
//! 2. taps after "now" in video time, beyond a small clock skew, are refused;
//! 3. at most `max_taps` per request are considered;
//! 4. a human rate: at most `taps_per_second` taps in any second of video
//!    time, and a per-viewer token bucket on the wall clock (refilled at the
//!    same rate, holding at most `burst`) so fabricated timestamps cannot
//!    buy more than a human could tap.
//!
//! Everything over a limit is clamped (not counted) and the reply says how
//! many taps were refused and why.

use std::collections::VecDeque;

/// Why taps were not counted; the first listed that applies is "the" reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    TooManyTaps,
    RateLimited,
    InTheFuture,
    Duplicate,
}

/// The limits, all configurable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_taps: usize,
    pub taps_per_second: u32,
    pub burst: u32,
    pub future_skew_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_taps: 200,
            taps_per_second: 20,
            burst: 200,
            future_skew_ms: 2_000,
        }
    }
}

/// A viewer's token bucket, in thousandths of a tap so refills stay exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    milli_tokens: u64,
    at_ms: i64,
}

impl Bucket {
    /// A full bucket.
    pub fn full(limits: &Limits, now_ms: i64) -> Self {
        Self {
            milli_tokens: u64::from(limits.burst) * 1000,
            at_ms: now_ms,
        }
    }

    fn refill(&mut self, limits: &Limits, now_ms: i64) {
        let elapsed = u64::try_from(now_ms.saturating_sub(self.at_ms)).unwrap_or(0);
        let cap = u64::from(limits.burst) * 1000;
        self.milli_tokens = self
            .milli_tokens
            .saturating_add(elapsed.saturating_mul(u64::from(limits.taps_per_second)))
            .min(cap);
        self.at_ms = self.at_ms.max(now_ms);
    }

    fn take(&mut self, n: u64) -> u64 {
        let granted = (self.milli_tokens / 1000).min(n);
        self.milli_tokens -= granted * 1000;
        granted
    }
}

/// What validation decided for one batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The taps that count, sorted.
    pub accepted: Vec<u64>,
    /// Refused taps per reason, in [`Reason`] order of precedence.
    pub rejected: Vec<(Reason, u64)>,
}

impl Verdict {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|(_, n)| n).sum()
    }

    /// The reason that refused the most taps (ties: the earlier in precedence).
    pub fn main_reason(&self) -> Option<Reason> {
        let mut best: Option<(Reason, u64)> = None;
        for (reason, n) in &self.rejected {
            if *n > 0 && best.is_none_or(|(_, m)| *n > m) {
                best = Some((*reason, *n));
            }
        }
        best.map(|(r, _)| r)
    }

    /// A sentence for the client: what was refused and what to change.
    pub fn detail(&self, limits: &Limits) -> String {
        let parts: Vec<String> = self
            .rejected
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(reason, n)| match reason {
                Reason::TooManyTaps => format!(
                    "{n} over the limit of {} taps per request (send batches more often)",
                    limits.max_taps
                ),
                Reason::RateLimited => {
                    format!("{n} faster than {} taps per second", limits.taps_per_second)
                }
                Reason::InTheFuture => format!(
                    "{n} with video timestamps ahead of the broadcast (more than {} ms)",
                    limits.future_skew_ms
                ),
                Reason::Duplicate => format!("{n} duplicate timestamps"),
            })
            .collect();
        if parts.is_empty() {
            String::new()
        } else {
            format!("not counted: {}", parts.join("; "))
        }
    }
}

/// Validates `taps` sent `video_now_ms` into the broadcast, drawing from the
/// viewer's `bucket` (updated in place; only accepted taps are drawn).
pub fn validate(
    taps: &[u64],
    video_now_ms: u64,
    now_ms: i64,
    limits: &Limits,
    bucket: &mut Bucket,
) -> Verdict {
    let mut sorted = taps.to_vec();
    sorted.sort_unstable();
    let before = sorted.len();
    sorted.dedup();
    let duplicates = (before - sorted.len()) as u64;

    let horizon = video_now_ms.saturating_add(limits.future_skew_ms);
    let in_time = sorted.partition_point(|t| *t <= horizon);
    let future = (sorted.len() - in_time) as u64;
    sorted.truncate(in_time);

    let too_many = sorted.len().saturating_sub(limits.max_taps) as u64;
    sorted.truncate(limits.max_taps);

    // At most `taps_per_second` taps in any 1000 ms of video time.
    let mut window: VecDeque<u64> = VecDeque::new();
    let mut human = Vec::with_capacity(sorted.len());
    for tap in sorted {
        while window.front().is_some_and(|first| tap - first >= 1000) {
            window.pop_front();
        }
        if window.len() < limits.taps_per_second as usize {
            window.push_back(tap);
            human.push(tap);
        }
    }
    let too_fast = (in_time.min(limits.max_taps) - human.len()) as u64;

    bucket.refill(limits, now_ms);
    let granted = bucket.take(human.len() as u64) as usize;
    let over_budget = (human.len() - granted) as u64;
    human.truncate(granted);

    Verdict {
        accepted: human,
        rejected: vec![
            (Reason::TooManyTaps, too_many),
            (Reason::RateLimited, too_fast + over_budget),
            (Reason::InTheFuture, future),
            (Reason::Duplicate, duplicates),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits::default()
    }

    #[test]
    fn an_honest_batch_counts_in_full_in_any_order() {
        let l = limits();
        let mut bucket = Bucket::full(&l, 0);
        let taps: Vec<u64> = (0..30).rev().map(|i| 10_000 + i * 100).collect();
        let v = validate(&taps, 20_000, 0, &l, &mut bucket);
        assert_eq!(v.accepted.len(), 30);
        assert_eq!(v.rejected_total(), 0);
        assert_eq!(v.main_reason(), None);
        assert!(v.accepted.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn an_abusive_batch_is_clamped_and_says_why() {
        let l = limits();
        let mut bucket = Bucket::full(&l, 0);
        // 10,000 taps in one video second, two of them duplicates, five in the future.
        let mut taps: Vec<u64> = (0..10_000).map(|i| 5_000 + i % 1000).collect();
        taps.extend([999_999_999; 5]);
        let v = validate(&taps, 6_000, 0, &l, &mut bucket);
        assert_eq!(
            v.accepted.len(),
            20,
            "one video second holds at most 20 taps"
        );
        assert_eq!(v.main_reason(), Some(Reason::Duplicate));
        assert!(
            v.detail(&l).contains("faster than 20 taps per second"),
            "{}",
            v.detail(&l)
        );
        assert_eq!(
            v.accepted.len() as u64 + v.rejected_total(),
            taps.len() as u64
        );
    }

    #[test]
    fn the_wall_clock_bucket_stops_fabricated_timestamps() {
        let l = Limits {
            burst: 40,
            ..limits()
        };
        let mut bucket = Bucket::full(&l, 0);
        // Well-spaced fabricated taps covering 10 s of video, sent at once.
        let taps: Vec<u64> = (0..100).map(|i| i * 100).collect();
        let v = validate(&taps, 20_000, 0, &l, &mut bucket);
        assert_eq!(v.accepted.len(), 40, "the bucket holds 40");
        // One second later the bucket has refilled by 20.
        let taps: Vec<u64> = (0..100).map(|i| 10_000 + i * 100).collect();
        let v = validate(&taps, 30_000, 1_000, &l, &mut bucket);
        assert_eq!(v.accepted.len(), 20);
        assert_eq!(v.main_reason(), Some(Reason::RateLimited));
    }

    proptest! {
        /// Every tap is either counted or refused for a reason, the counted
        /// ones are distinct, in time and within every limit.
        #[test]
        fn taps_are_accounted_for_and_limits_hold(
            taps in proptest::collection::vec(0_u64..20_000, 0..600),
            now in 0_u64..20_000,
        ) {
            let l = limits();
            let mut bucket = Bucket::full(&l, 0);
            let v = validate(&taps, now, 0, &l, &mut bucket);
            prop_assert_eq!(v.accepted.len() as u64 + v.rejected_total(), taps.len() as u64);
            prop_assert!(v.accepted.len() <= l.max_taps);
            prop_assert!(v.accepted.len() <= l.burst as usize);
            prop_assert!(v.accepted.windows(2).all(|w| w[0] < w[1]));
            prop_assert!(v.accepted.iter().all(|t| *t <= now + l.future_skew_ms));
            for (i, t) in v.accepted.iter().enumerate() {
                let in_second = v.accepted[i..].iter().take_while(|u| **u < t + 1000).count();
                prop_assert!(in_second <= l.taps_per_second as usize);
            }
        }
    }
}
