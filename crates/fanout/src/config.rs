//! The `[fanout]` section: what subscribe nodes and dispatchers share in
//! the hot store.

use livemesh_mesh::config::{Config, Section};
use serde::{Deserialize, Serialize};

/// What subscribe nodes and dispatchers share in the hot store: the room ->
/// nodes table, viewer counts, and each room's history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FanoutConfig {
    /// The hot-store key phase: keys are `fanout|<phase>|{room:<id>}|…`.
    /// Subscribe nodes and dispatchers that work together use the same one.
    pub phase: String,
    /// Ordered events kept per room for resume (the big-key rule: a room's
    /// history is trimmed to this length).
    pub history_len: u32,
    /// How long a publish idempotency key is remembered.
    pub idempotency_ttl_secs: u64,
    /// A room's keys expire this long after its last publish.
    pub room_ttl_secs: u64,
    /// ... and this long after it ended (viewers may still resume until then).
    pub ended_ttl_secs: u64,
    /// A publish is acknowledged only once this many Redis replicas have
    /// the event (`WAIT` after the append), so a failover cannot lose an
    /// acknowledged event; one not replicated within `wait_timeout_ms` is
    /// UNAVAILABLE (it may be stored: retry with the same idempotency key).
    /// 0 (default): do not wait (a Redis without replicas). Redis only.
    pub wait_replicas: u32,
    /// How long `WAIT` waits for those replicas (ms).
    pub wait_timeout_ms: u64,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self {
            phase: "release".to_owned(),
            history_len: 1_000,
            idempotency_ttl_secs: 600,
            room_ttl_secs: 86_400,
            ended_ttl_secs: 3_600,
            wait_replicas: 0,
            wait_timeout_ms: 100,
        }
    }
}

impl Section for FanoutConfig {
    const NAME: &'static str = "fanout";

    fn validate(&self, _config: &Config) -> Result<(), String> {
        if self.history_len == 0 {
            return Err("fanout.history_len must be at least 1".into());
        }
        if self.wait_replicas > 0 && self.wait_timeout_ms == 0 {
            return Err(
                "fanout.wait_timeout_ms must be at least 1 when fanout.wait_replicas is set \
                 (WAIT with 0 waits forever)"
                    .into(),
            );
        }
        Ok(())
    }
}
