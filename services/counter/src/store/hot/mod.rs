//! The hot store: where loves are counted while a room is live.
//!
//! Taps are aggregated in process for a few milliseconds and then applied as
//! one [`RoomFlush`] per room. Three backends share one meaning:
//!
//! - [`HotStore::Memory`], the in-process store of the embedded default;
//! - [`HotStore::Redis`], one standalone Redis;
//! - [`HotStore::Cluster`], a Redis Cluster.
//!
//! Per room the store keeps (names are the project's key rule, hash-tagged so
//! that every key of a room lives in one Cluster slot, see [`keys`]):
//!
//! - the total, split over [`HotConfig::total_shards`] counters (the hot-room
//!   rule: a flush increments one of them, a read sums all);
//! - the ranking of viewers by loves, trimmed to [`HotConfig::top_length`];
//! - one marker per applied flush id, kept for [`HotConfig::flush_id_ttl_secs`],
//!   so that a flush replayed with the same id is applied once.
//!
//! A flush is applied atomically: either all of it (marker, total, ranking,
//! trim) or none of it. On Redis that is one Lua script per room; in memory it
//! is one critical section under the room's stripe lock.

pub mod keys;
pub mod memory;
pub mod redis;

use std::time::Duration;

pub use self::memory::MemoryStore;
pub use self::redis::RedisStore;
pub use livemesh_redis::RedisOptions;

/// One room's increments of one aggregation tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomFlush {
    pub room_id: u64,
    /// Unique per flush, e.g. "<node id>:<room seq>"; a flush replayed with the same id is applied once.
    pub flush_id: String,
    pub total_delta: u64,
    /// (viewer_id, loves) for this tick; a viewer appears once.
    pub viewers: Vec<(u64, u64)>,
    /// The SendLoves batches the counts came from (empty for a flush built
    /// from counts alone). Each batch id is checked in the store in the same
    /// atomic step that counts it: a batch already counted by any replica
    /// (within [`HotConfig::batch_ttl_secs`]) is left out of `total_delta`
    /// and of its viewer's count. `total_delta` and `viewers` include every
    /// batch's loves.
    pub batches: Vec<BatchMark>,
}

/// One SendLoves batch inside a flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchMark {
    pub viewer_id: u64,
    pub batch_id: String,
    pub loves: u64,
}

/// What the store did with a flush.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Applied now; `duplicates` are the indexes of the batches that were
    /// already counted (left out).
    Counted { duplicates: Vec<usize> },
    /// This flush id had been applied before: nothing changed.
    Replayed,
    /// The room was closed for its final total ([`HotStore::close`]):
    /// nothing changed. `counted` are the indexes of the batches counted
    /// before the close; the others are late and must go to the final total
    /// in SQL.
    Closed { counted: Vec<usize> },
}

impl Applied {
    /// Loves the store added with this flush.
    pub fn added(&self, flush: &RoomFlush) -> u64 {
        match self {
            Applied::Counted { duplicates } => {
                let dropped: u64 = duplicates
                    .iter()
                    .filter_map(|i| flush.batches.get(*i))
                    .map(|b| b.loves)
                    .sum();
                flush.total_delta.saturating_sub(dropped)
            }
            Applied::Replayed | Applied::Closed { .. } => 0,
        }
    }
}

impl RoomFlush {
    /// Counts per viewer without the batches at `skip` (sorted indexes).
    fn viewers_without(&self, skip: &[usize]) -> (u64, Vec<(u64, u64)>) {
        let mut total = self.total_delta;
        let mut viewers = self.viewers.clone();
        for i in skip {
            if let Some(b) = self.batches.get(*i) {
                total = total.saturating_sub(b.loves);
                if let Some(v) = viewers.iter_mut().find(|(id, _)| *id == b.viewer_id) {
                    v.1 = v.1.saturating_sub(b.loves);
                }
            }
        }
        (total, viewers)
    }
}

/// How the hot store lays out and keeps a room's counters.
#[derive(Debug, Clone)]
pub struct HotConfig {
    /// The key phase: keys are `counter|<phase>|{room:<id>}|…` (`release`,
    /// `staging`, …), so stages, or tests, can share one Redis.
    pub phase: String,
    /// The room total is split over this many keys (hot-room rule); each flush increments ONE of them
    /// (chosen by hashing flush_id), reads sum all. Default 4. Must be >= 1 (0 is treated as 1).
    ///
    /// Readers must use at least the largest value any writer of the same
    /// store has used, or [`HotStore::total`] misses the higher shards.
    pub total_shards: u32,
    /// The per-viewer ranking is trimmed to this many top entries after each flush. Default 1000.
    pub top_length: u32,
    /// How long a flush id is remembered for idempotent replay (seconds). Default 600.
    /// 0 is treated as 1 (Redis rejects `EX 0`).
    pub flush_id_ttl_secs: u64,
    /// How long a counted SendLoves batch id is remembered by the store
    /// (seconds): a retry within this window counts nothing again, whichever
    /// replica takes it. Default 600.
    pub batch_ttl_secs: u64,
    /// How long a room stays closed after its final total was taken
    /// (seconds): flushes that arrive meanwhile are refused by the store and
    /// go to the final total in SQL instead. Default 7 days.
    pub closed_ttl_secs: u64,
    /// After each write, wait until this many replicas have it (`WAIT`);
    /// a write not replicated in time is kept and retried. 0 (default): do
    /// not wait (a standalone Redis without replicas). Redis only.
    pub wait_replicas: u32,
    /// How long `WAIT` waits for the replicas (ms). Default 100.
    pub wait_timeout_ms: u64,
}

impl Default for HotConfig {
    fn default() -> Self {
        Self {
            phase: "release".to_owned(),
            total_shards: 4,
            top_length: 1000,
            // Covers any retry of an in-doubt flush (retries come every
            // tick) while keeping markers bounded: a room flushing every
            // 10 ms keeps about 60,000 of them.
            flush_id_ttl_secs: 600,
            batch_ttl_secs: 600,
            closed_ttl_secs: 7 * 86_400,
            wait_replicas: 0,
            wait_timeout_ms: 100,
        }
    }
}

impl HotConfig {
    /// The longest flush-id memory the stores accept: 100 years is "forever",
    /// and keeps `EX` far from the range where Redis rejects expire times.
    const MAX_TTL_SECS: u64 = 100 * 365 * 86_400;

    /// The values the backends work with: at least one total shard, a flush
    /// id TTL between 1 s and [`Self::MAX_TTL_SECS`].
    fn normalized(&self) -> Self {
        Self {
            phase: self.phase.clone(),
            total_shards: self.total_shards.max(1),
            top_length: self.top_length,
            flush_id_ttl_secs: self.flush_id_ttl_secs.clamp(1, Self::MAX_TTL_SECS),
            batch_ttl_secs: self.batch_ttl_secs.clamp(1, Self::MAX_TTL_SECS),
            closed_ttl_secs: self.closed_ttl_secs.clamp(1, Self::MAX_TTL_SECS),
            wait_replicas: self.wait_replicas,
            wait_timeout_ms: self.wait_timeout_ms.max(1),
        }
    }

    fn flush_id_ttl(&self) -> Duration {
        Duration::from_secs(self.flush_id_ttl_secs)
    }

    fn batch_ttl(&self) -> Duration {
        Duration::from_secs(self.batch_ttl_secs)
    }

    fn closed_ttl(&self) -> Duration {
        Duration::from_secs(self.closed_ttl_secs)
    }

    /// The total shard a flush increments: a stable hash of its id (FNV-1a),
    /// so a replay targets the same key and flushes spread over the shards.
    fn shard_of(&self, flush_id: &str) -> u32 {
        let hash = livemesh_mesh::fnv1a(flush_id.as_bytes());
        let shards = u64::from(self.total_shards.max(1));
        // The remainder is below `total_shards`, a u32.
        u32::try_from(hash % shards).unwrap_or(0)
    }
}

/// Why the hot store could not do what was asked: always "try again later"
/// (the caller retries a flush with the same flush id).
pub use livemesh_redis::RedisError as HotError;

/// The largest count a flush applies for a viewer or the total: 2^53.
/// Redis keeps ranking scores as doubles, which hold integers exactly only up
/// to here. Larger counts cannot come from validated taps; they are clamped
/// (and logged) rather than refused, so such a flush cannot block the
/// caller's retry queue forever.
pub const MAX_DELTA: u64 = 1 << 53;

/// `count`, clamped to [`MAX_DELTA`].
fn clamped(count: u64) -> u64 {
    count.min(MAX_DELTA)
}

/// Logs a flush whose counts are clamped; both backends call it before applying.
fn warn_if_clamped(flush: &RoomFlush) {
    if flush.total_delta > MAX_DELTA || flush.viewers.iter().any(|(_, loves)| *loves > MAX_DELTA) {
        tracing::warn!(
            room = flush.room_id,
            flush_id = %flush.flush_id,
            total_delta = flush.total_delta,
            "flush counts above {MAX_DELTA} clamped"
        );
    }
}

/// The hot store: the in-process one (embedded default) or Redis (standalone or Cluster).
///
/// Clones are cheap and share the store.
#[derive(Clone)]
pub enum HotStore {
    Memory(MemoryStore),
    Redis(RedisStore),
    Cluster(RedisStore),
}

impl std::fmt::Debug for HotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HotStore::Memory(_) => f.write_str("HotStore::Memory"),
            HotStore::Redis(store) => write!(f, "HotStore::Redis({})", store.describe()),
            HotStore::Cluster(store) => write!(f, "HotStore::Cluster({})", store.describe()),
        }
    }
}

impl HotStore {
    /// The in-process store.
    pub fn memory(config: HotConfig) -> Self {
        HotStore::Memory(MemoryStore::new(config))
    }

    /// `redis://host:port` standalone, or several comma-separated `redis://…` URLs for a Cluster
    /// (a list with a comma is a Cluster even with one seed: `redis://host:port,`).
    ///
    /// Connects lazily: a malformed URL fails here (the message names it,
    /// password masked), an unreachable server fails the later calls.
    #[cfg(any(test, feature = "testing"))]
    pub async fn connect(urls: &str, config: HotConfig) -> Result<Self, HotError> {
        Self::connect_with(urls, config, RedisOptions::default()).await
    }

    /// [`HotStore::connect`] with explicit pool size and timeouts.
    pub async fn connect_with(
        urls: &str,
        config: HotConfig,
        options: RedisOptions,
    ) -> Result<Self, HotError> {
        let store = RedisStore::connect(urls, config, options)?;
        Ok(if store.is_cluster() {
            HotStore::Cluster(store)
        } else {
            HotStore::Redis(store)
        })
    }

    /// Applies every flush; each atomically and idempotently (the same flush
    /// id twice is applied once). Different rooms are applied concurrently.
    ///
    /// Returns one result per flush, in the order given: `Ok` if it was
    /// applied now or had already been applied. A failed flush is to be
    /// retried later with the SAME flush id; a failure after the store applied
    /// it (a lost reply, a timeout) is then harmless.
    #[tracing::instrument(name = "counter.hot.flush", skip_all, fields(rooms = flushes.len()))]
    pub async fn flush(&self, flushes: &[RoomFlush]) -> Vec<(u64, Result<Applied, HotError>)> {
        match self {
            HotStore::Memory(store) => store.flush(flushes),
            HotStore::Redis(store) | HotStore::Cluster(store) => store.flush(flushes).await,
        }
    }

    /// The room's total: the sum of its total shards (0 for an unknown room).
    #[tracing::instrument(name = "counter.hot.total", skip_all, fields(room_id = room_id))]
    pub async fn total(&self, room_id: u64) -> Result<u64, HotError> {
        match self {
            HotStore::Memory(store) => Ok(store.total(room_id)),
            HotStore::Redis(store) | HotStore::Cluster(store) => store.total(room_id).await,
        }
    }

    /// Top viewers by loves, highest first, at most `limit` (and at most
    /// [`HotConfig::top_length`], as the ranking is trimmed to that). Equal
    /// scores are ordered as Redis orders them: by the viewer id's decimal
    /// string, descending.
    #[tracing::instrument(name = "counter.hot.top", skip_all, fields(room_id = room_id, limit = limit))]
    pub async fn top(&self, room_id: u64, limit: u32) -> Result<Vec<(u64, u64)>, HotError> {
        match self {
            HotStore::Memory(store) => Ok(store.top(room_id, limit)),
            HotStore::Redis(store) | HotStore::Cluster(store) => store.top(room_id, limit).await,
        }
    }

    /// Deletes the room's totals and ranking. Its flush-id markers stay until
    /// they expire, so that a late replay of an applied flush cannot bring the
    /// room's counters back.
    #[tracing::instrument(name = "counter.hot.delete_room", skip_all, fields(room_id = room_id))]
    pub async fn delete_room(&self, room_id: u64) -> Result<(), HotError> {
        match self {
            HotStore::Memory(store) => {
                store.delete_room(room_id);
                Ok(())
            }
            HotStore::Redis(store) | HotStore::Cluster(store) => store.delete_room(room_id).await,
        }
    }

    /// How many rooms have anything stored (for tests and diagnostics: on
    /// Redis this is a `KEYS` over the store's phase, on every master of a
    /// Cluster, which walks the whole keyspace).
    #[cfg(any(test, feature = "testing"))]
    pub async fn stored_rooms(&self) -> Result<usize, HotError> {
        match self {
            HotStore::Memory(store) => Ok(store.stored_rooms()),
            HotStore::Redis(store) | HotStore::Cluster(store) => store.stored_rooms().await,
        }
    }

    /// Closes the room for its final total and takes (or renews) the
    /// finaliser's lease for `owner`: from now on flushes of the room are
    /// refused ([`Applied::Closed`]), so its total and ranking no longer
    /// change. Returns true if `owner` holds the lease (for `lease`), false
    /// if another finaliser does. Idempotent.
    #[tracing::instrument(name = "counter.hot.close", skip_all, fields(room_id = room_id))]
    pub async fn close(
        &self,
        room_id: u64,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, HotError> {
        match self {
            HotStore::Memory(store) => Ok(store.close(room_id, owner, lease)),
            HotStore::Redis(store) | HotStore::Cluster(store) => {
                store.close(room_id, owner, lease).await
            }
        }
    }

    /// Checks that the store answers (a readiness probe); always `Ok` in memory.
    #[cfg(any(test, feature = "testing"))]
    pub async fn ping(&self) -> Result<(), HotError> {
        match self {
            HotStore::Memory(_) => Ok(()),
            HotStore::Redis(store) | HotStore::Cluster(store) => store.ping().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_normalized() {
        let config = HotConfig {
            phase: "t".into(),
            total_shards: 0,
            top_length: 0,
            flush_id_ttl_secs: 0,
            ..HotConfig::default()
        }
        .normalized();
        assert_eq!(config.total_shards, 1);
        assert_eq!(config.top_length, 0);
        assert_eq!(config.flush_id_ttl_secs, 1);
        assert_eq!(config.shard_of("anything"), 0);
    }

    #[test]
    fn flushes_spread_over_shards() {
        let config = HotConfig::default();
        let mut seen = [false; 4];
        for seq in 0..64 {
            let shard = config.shard_of(&format!("node-a:{seq}"));
            assert!(shard < 4);
            seen[shard as usize] = true;
        }
        assert_eq!(seen, [true; 4]);
        assert_eq!(config.shard_of("n:1"), config.shard_of("n:1"));
    }

    #[test]
    fn counts_are_clamped_to_what_doubles_hold() {
        assert_eq!(clamped(7), 7);
        assert_eq!(clamped(MAX_DELTA), MAX_DELTA);
        assert_eq!(clamped(u64::MAX), MAX_DELTA);
    }
}
