//! Settlements this process has begun (a room ended) and not finished, as
//! metrics, so an alert fires when one is stuck: `settle_until_done` retries
//! forever, which is right for money but silent without these.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

use opentelemetry::metrics::ObservableGauge;

struct Pending {
    rooms: Mutex<HashMap<u64, Instant>>,
    _gauges: OnceLock<[ObservableGauge<f64>; 2]>,
}

fn pending() -> &'static Pending {
    static PENDING: OnceLock<Pending> = OnceLock::new();
    PENDING.get_or_init(|| Pending {
        rooms: Mutex::default(),
        _gauges: OnceLock::new(),
    })
}

/// Registers the gauges with the global meter provider (once per process;
/// call it after telemetry is installed).
pub fn install_metrics() {
    pending()._gauges.get_or_init(|| {
        let meter = opentelemetry::global::meter("livemesh");
        [
            meter
                .f64_observable_gauge("livemesh.gifts.settlement_pending_age")
                .with_unit("s")
                .with_description(
                    "Age of the oldest settlement this gift-settler began (its room ended) and has \
                     not finished; 0 when none is pending",
                )
                .with_callback(|observer| observer.observe(oldest_age_secs(), &[]))
                .build(),
            meter
                .f64_observable_gauge("livemesh.gifts.settlements_pending")
                .with_description("Settlements this gift-settler began and has not finished")
                .with_callback(|observer| observer.observe(count() as f64, &[]))
                .build(),
        ]
    });
}

/// A room's settlement began.
pub fn begin(room_id: u64) {
    lock().entry(room_id).or_insert_with(Instant::now);
}

/// A room's settlement finished.
pub fn finish(room_id: u64) {
    lock().remove(&room_id);
}

fn lock() -> std::sync::MutexGuard<'static, HashMap<u64, Instant>> {
    pending()
        .rooms
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

fn oldest_age_secs() -> f64 {
    lock()
        .values()
        .map(|since| since.elapsed().as_secs_f64())
        .fold(0.0, f64::max)
}

fn count() -> usize {
    lock().len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pending_settlement_ages_until_it_finishes() {
        let room = u64::MAX - 7;
        begin(room);
        let first = lock()[&room];
        begin(room);
        assert_eq!(lock()[&room], first, "a retry keeps the first start");
        assert!(count() >= 1);
        assert!(oldest_age_secs() > 0.0);
        finish(room);
        assert!(!lock().contains_key(&room));
    }
}
