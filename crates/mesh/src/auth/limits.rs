//! Per-viewer and per-room rate limits (GCRA, keyed, from `governor`).

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use tonic::Status;

use super::AuthConfig;

/// The limits of one server: one bucket per viewer across the viewer-facing
/// RPCs, one per room for publishes from outside the mesh.
#[derive(Debug)]
pub struct RateLimits {
    viewers: DefaultKeyedRateLimiter<u64>,
    rooms: DefaultKeyedRateLimiter<u64>,
    viewer_rate: u32,
    room_rate: u32,
    clock: DefaultClock,
}

fn quota(per_sec: u32, burst: u32) -> Quota {
    // `validate` keeps both at least 1; the fallback only satisfies types.
    let per_sec = NonZeroU32::new(per_sec).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(per_sec).allow_burst(burst)
}

impl RateLimits {
    pub fn new(config: &AuthConfig) -> Self {
        Self {
            viewers: DefaultKeyedRateLimiter::dashmap(quota(
                config.viewer_calls_per_sec,
                config.viewer_burst,
            )),
            rooms: DefaultKeyedRateLimiter::dashmap(quota(
                config.room_publishes_per_sec,
                config.room_burst,
            )),
            viewer_rate: config.viewer_calls_per_sec,
            room_rate: config.room_publishes_per_sec,
            clock: DefaultClock::default(),
        }
    }

    /// Takes one call from `viewer`'s bucket.
    pub fn check_viewer(&self, viewer: u64) -> Result<(), Status> {
        self.viewers.check_key(&viewer).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            Status::resource_exhausted(format!(
                "viewer {viewer} makes more than {} calls per second; retry after {} ms",
                self.viewer_rate,
                wait.as_millis().max(1)
            ))
        })
    }

    /// Takes one publish from `room`'s bucket.
    pub fn check_room(&self, room: u64) -> Result<(), Status> {
        self.rooms.check_key(&room).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            Status::resource_exhausted(format!(
                "room {room} receives more than {} publishes per second; retry after {} ms",
                self.room_rate,
                wait.as_millis().max(1)
            ))
        })
    }

    /// Forgets buckets that are full again, so idle viewers and rooms do
    /// not hold memory.
    pub fn forget_idle(&self) {
        self.viewers.retain_recent();
        self.rooms.retain_recent();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_viewer_past_the_burst_is_told_when_to_retry_and_others_are_not_affected() {
        let limits = RateLimits::new(&AuthConfig {
            viewer_calls_per_sec: 1,
            viewer_burst: 3,
            ..AuthConfig::default()
        });
        for _ in 0..3 {
            limits.check_viewer(7).unwrap();
        }
        let refused = limits.check_viewer(7).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
        assert!(refused.message().contains("retry after"), "{refused:?}");
        limits.check_viewer(8).unwrap();
        limits.check_room(1).unwrap();
    }
}
