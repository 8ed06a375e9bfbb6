//! The sections of the services: gifts, fan-out, subscribe, publish, counter, rooms.

use serde::{Deserialize, Serialize};

/// Paid gifts and their settlement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GiftsConfig {
    /// The balance shards' databases, in shard order (a user's shard is a
    /// stable function of the user id and this list's length, so the list
    /// never changes length once money is in it). Empty: `shards` SQLite
    /// files `gifts-shard-<n>.db` under the data dir.
    pub shard_urls: Vec<String>,
    /// How many SQLite shards the embedded default uses.
    pub shards: u32,
    /// A room's virtual account is split over this many rows per shard, so
    /// that concurrent gifts to a hot room do not queue on one row.
    pub room_subaccounts: u32,
    /// The platform's cut of a room's gifts at settlement, in basis points
    /// (3000 = 30%); the streamer gets the rest.
    pub platform_cut_bps: u32,
    /// Group commit: deposits and gifts to one shard that arrive together
    /// are applied in one transaction of up to this many.
    pub max_batch: usize,
    /// Batch workers (transactions in flight) per shard. One by default:
    /// while its transaction commits, the gifts that arrive wait and make
    /// the next batch, so batches grow with the load (more workers split
    /// the waiting gifts into smaller batches that cost more per gift).
    pub batch_workers: usize,
    /// ongoing-query, for room lookups and the Watch of starts and ends.
    /// Empty: this process's own address.
    pub ongoing_query_url: String,
    /// The dispatcher committed gifts are published through. Empty: this
    /// process's own address.
    pub publish_url: String,
    /// The largest amount of one deposit or gift, in the smallest currency
    /// unit; larger ones are refused (INVALID_ARGUMENT).
    pub max_transfer_amount: i64,
    /// How long a gift batch waits for the dispatcher to take a gift's
    /// event before the gift is refused (UNAVAILABLE, retry with the same
    /// key). A gift is announced before it commits, so that no gift that
    /// answered OK is missing from its room's stream.
    pub announce_timeout_ms: u64,
}

impl Default for GiftsConfig {
    fn default() -> Self {
        Self {
            shard_urls: Vec::new(),
            shards: 4,
            room_subaccounts: 8,
            platform_cut_bps: 3_000,
            max_batch: 128,
            batch_workers: 1,
            ongoing_query_url: String::new(),
            publish_url: String::new(),
            max_transfer_amount: 1_000_000_000_000,
            announce_timeout_ms: 2_000,
        }
    }
}

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
}

impl Default for FanoutConfig {
    fn default() -> Self {
        Self {
            phase: "release".to_owned(),
            history_len: 1_000,
            idempotency_ttl_secs: 600,
            room_ttl_secs: 86_400,
            ended_ttl_secs: 3_600,
        }
    }
}

/// A subscribe node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubscribeConfig {
    /// The address dispatchers reach this node at (`http://host:port`).
    /// Empty: `http://<listen>`; set it when listening on 0.0.0.0 or behind NAT.
    pub node_url: String,
    /// ongoing-query, for room lookups. Empty: this process's own address.
    pub ongoing_query_url: String,
    /// The dispatcher viewer counts are published through. Empty: this
    /// process's own address.
    pub publish_url: String,
    /// Ordered events (comments, gifts) each room keeps for its streams (the
    /// size of its feed's ring): a stream further behind ends with
    /// RESOURCE_EXHAUSTED and its resume position.
    pub queue_len: usize,
    /// The node's registration for a room lives this long unless renewed
    /// (renewed every `report_interval_ms`); a dead node drops out after it.
    pub lease_ms: u64,
    /// How often the node renews its registrations, reports its viewer
    /// counts, and (one node per room) publishes the room's total.
    pub report_interval_ms: u64,
    /// How long an out-of-order event waits for the ones before it before
    /// the node fetches them from the room's history.
    pub gap_wait_ms: u64,
    /// How often the node compares, for every room it holds viewers of,
    /// what it has released with the head of the room's history, and
    /// fetches what it never got (an event appended by a dispatcher that
    /// died before its Deliver). An appended event reaches the node's
    /// viewers within `head_check_ms + gap_wait_ms` plus two store round
    /// trips. 0: only the renewals (`report_interval_ms`) compare.
    pub head_check_ms: u64,
    /// HTTP/2 streams one connection may carry (a BFF multiplexes many
    /// viewers over one connection).
    pub max_streams_per_connection: u32,
}

impl Default for SubscribeConfig {
    fn default() -> Self {
        Self {
            node_url: String::new(),
            ongoing_query_url: String::new(),
            publish_url: String::new(),
            queue_len: 256,
            lease_ms: 10_000,
            report_interval_ms: 2_000,
            gap_wait_ms: 50,
            head_check_ms: 250,
            max_streams_per_connection: 100_000,
        }
    }
}

/// A dispatcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublishConfig {
    /// This datacenter's name; publishes forwarded to peers carry it.
    pub datacenter: String,
    /// Dispatchers of other datacenters (`http://host:port`); every local
    /// publish of an ordered event (comment, gift, room
    /// ended) is forwarded to each once; love totals and viewer counts are
    /// each datacenter's own and stay local.
    pub peers: Vec<String>,
    /// ongoing-query, whose Watch tells of room ends. Empty: this process's
    /// own address.
    pub ongoing_query_url: String,
    /// How long a Deliver to one subscribe node may take. A Publish waits
    /// for every node whose breaker is closed, so until a dead node's
    /// breaker opens every Publish takes this long: it must stay below
    /// `client.breaker_slow_call_ms`, or the Publish callers' breakers count
    /// those publishes as slow and open on the dispatcher (one dead node
    /// would then stop all publishing). A healthy Deliver is an in-memory
    /// hand-off that answers in a few milliseconds.
    pub deliver_timeout_ms: u64,
    /// The longest comment, in characters.
    pub max_comment_chars: u32,
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            datacenter: "local".to_owned(),
            peers: Vec::new(),
            ongoing_query_url: String::new(),
            deliver_timeout_ms: 250,
            max_comment_chars: 2_000,
        }
    }
}

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

/// The rooms table and the ongoing-rooms cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsConfig {
    /// The region whose database is `database_url`.
    pub local_region: u16,
    /// Further regional rooms databases; a room id names its region.
    pub regions: Vec<RegionConfig>,
    /// Period of the full scan that reconciles the cache with the tables.
    pub scan_interval_ms: u64,
    /// How long an ended room stays in the cache before reads go to SQL.
    pub ended_retention_ms: u64,
    /// Follow each rooms database's change feed (MariaDB/MySQL: the binlog;
    /// SQLite: the change table its triggers fill) to see changes made
    /// anywhere within milliseconds. Off: only the write path and the scan.
    pub feed: bool,
    /// SQLite: how often the change table is polled.
    pub feed_poll_ms: u64,
    /// The name this replica saves its feed positions under. Empty: the
    /// host name (a StatefulSet pod's stable name), else `ongoing-query`.
    pub feed_consumer: String,
    /// The replica server id the binlog tail registers with; must differ
    /// from every server's and other tail's id. 0: derived from the
    /// consumer name and region.
    pub binlog_server_id: u32,
    /// How many changes `Watch` keeps for watchers that reconnect.
    pub watch_window: usize,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            local_region: 0,
            regions: Vec::new(),
            scan_interval_ms: 5_000,
            ended_retention_ms: 600_000,
            feed: true,
            feed_poll_ms: 10,
            feed_consumer: String::new(),
            binlog_server_id: 0,
            watch_window: 10_000,
        }
    }
}

/// One regional rooms database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub id: u16,
    pub database_url: String,
}
