//! The `[counter]` section: the love counter.

use livemesh_mesh::config::{Config, Peer, Section};
use serde::{Deserialize, Serialize};

/// The love counter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CounterConfig {
    /// The hot-store key phase: keys are `counter|<phase>|{room:<id>}|…`
    /// (e.g. `release`, `staging`), so stages can share one Redis.
    pub phase: String,
    /// ongoing-query, for room lookups and the Watch of room ends. Empty:
    /// this process's own address (the all-in-one `livemesh up`).
    pub ongoing_query_url: String,
    /// The dispatcher that live totals are published through. Empty: this
    /// process's own address.
    pub publish_url: String,
    /// SQL for the final totals (`room_loves`). Empty: `database_url`, else
    /// `counter.db` under the data dir.
    pub database_url: String,
    /// At most this many taps of one request are considered.
    pub max_taps_per_request: u32,
    /// A human's tap rate: per second of video time, and the refill of the
    /// per-viewer token bucket on the wall clock.
    pub taps_per_second: u32,
    /// The per-viewer token bucket's size.
    pub burst: u32,
    /// How far ahead of the broadcast's current video time a tap may be.
    pub future_skew_ms: u64,
    /// The pause before a failed hot-store flush is retried. (Flushes are
    /// a group commit: one starts as soon as loves wait and none is in
    /// flight, so this no longer delays a healthy flush.)
    pub flush_tick_ms: u64,
    /// At most one live total per room is published per this period.
    pub publish_tick_ms: u64,
    /// How long a room total read from the hot store is reused.
    pub total_cache_ms: u64,
    /// A room's total is split over this many hot-store keys.
    pub total_shards: u32,
    /// The per-viewer ranking keeps this many top viewers.
    pub top_length: u32,
    /// Loves held in memory while the hot store is unreachable; past this,
    /// SendLoves answers UNAVAILABLE.
    pub max_pending_loves: u64,
    /// After a room ends, how long to wait for every replica's last writes
    /// before the final total goes to SQL and the hot keys are deleted.
    pub end_grace_ms: u64,
    /// How long the hot store remembers a counted SendLoves batch id: a
    /// retry within this window counts nothing again, on any replica.
    pub batch_ttl_secs: u64,
    /// The finaliser's lease on an ended room (one replica finalises it;
    /// another takes over once the lease lapses).
    pub finaliser_lease_ms: u64,
    /// How long an ended room stays closed in the hot store: flushes that
    /// arrive meanwhile go to the final total in SQL.
    pub closed_ttl_secs: u64,
    /// A flush leaves the retry buffer only once this many Redis replicas
    /// have it (`WAIT`). 0: do not wait (a Redis without replicas).
    pub wait_replicas: u32,
    /// How long `WAIT` waits for those replicas before the flush is kept
    /// for retry.
    pub wait_timeout_ms: u64,
    /// Directory of the analytics log (JSON lines). Empty: `analytics`
    /// under the data dir.
    pub analytics_dir: String,
    /// The analytics log rotates at this size.
    pub analytics_max_bytes: u64,
    /// Rotated analytics files kept.
    pub analytics_files: u32,
    /// Lines waiting for the analytics writer; past this, lines are
    /// dropped and counted, never waited for.
    pub analytics_queue: usize,
}

impl Default for CounterConfig {
    fn default() -> Self {
        Self {
            phase: "release".to_owned(),
            ongoing_query_url: String::new(),
            publish_url: String::new(),
            database_url: String::new(),
            max_taps_per_request: 200,
            taps_per_second: 20,
            burst: 200,
            future_skew_ms: 2_000,
            flush_tick_ms: 10,
            publish_tick_ms: 200,
            total_cache_ms: 100,
            total_shards: 4,
            top_length: 1_000,
            max_pending_loves: 10_000_000,
            end_grace_ms: 1_000,
            batch_ttl_secs: 600,
            finaliser_lease_ms: 10_000,
            closed_ttl_secs: 7 * 86_400,
            wait_replicas: 0,
            wait_timeout_ms: 100,
            analytics_dir: String::new(),
            analytics_max_bytes: 64 * 1024 * 1024,
            analytics_files: 5,
            analytics_queue: 65_536,
        }
    }
}

impl Section for CounterConfig {
    const NAME: &'static str = "counter";

    fn validate(&self, _config: &Config) -> Result<(), String> {
        if self.max_taps_per_request == 0
            || self.taps_per_second == 0
            || self.burst == 0
            || self.flush_tick_ms == 0
            || self.publish_tick_ms == 0
            || self.total_shards == 0
            || self.top_length == 0
            || self.analytics_queue == 0
            || self.analytics_files == 0
        {
            return Err(
                "counter.max_taps_per_request, taps_per_second, burst, flush_tick_ms, \
                 publish_tick_ms, total_shards, top_length, analytics_queue and analytics_files \
                 must be at least 1"
                    .into(),
            );
        }
        Ok(())
    }

    fn peers(&self) -> Vec<Peer<'_>> {
        vec![
            Peer {
                key: "counter.ongoing_query_url",
                url: &self.ongoing_query_url,
                required: Some("ongoing-query"),
            },
            Peer {
                key: "counter.publish_url",
                url: &self.publish_url,
                required: Some("publish"),
            },
        ]
    }

    fn sql_urls(&self) -> Vec<(String, &str)> {
        if self.database_url.is_empty() {
            Vec::new()
        } else {
            vec![("counter.database_url".into(), self.database_url.as_str())]
        }
    }

    fn check_own_process(&self, config: &Config, report: &mut dyn FnMut(&str, String)) {
        if config.redis_urls().is_none() {
            report(
                "redis_url",
                "unset: this process would keep its state in its own memory, where no \
                 other process looks; set it to the Redis (Cluster) the mesh shares"
                    .into(),
            );
        }
    }
}
