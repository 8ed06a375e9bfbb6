//! Layered configuration: built-in defaults < a TOML file < `LIVEMESH_*`
//! environment variables < command-line flags.
//!
//! Environment variables map to keys by lower-casing and reading `__` as a
//! section separator: `LIVEMESH_ROOMS__SCAN_INTERVAL_MS=2000` sets
//! `rooms.scan_interval_ms`. The environment is passed in as a list of pairs,
//! so tests hand over a map instead of mutating the process environment.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Variables with this prefix configure livemesh.
pub const ENV_PREFIX: &str = "LIVEMESH_";

/// Variables that share the prefix but are not configuration keys: the file
/// path itself, and `LIVEMESH_TEST_*`, which belong to the test harness
/// (server addresses, tool dirs). Any other `LIVEMESH_*` variable must name
/// a key, so a typo fails loudly instead of being ignored.
const ENV_NOT_CONFIG: &[&str] = &["LIVEMESH_CONFIG", "LIVEMESH_TEST_"];

/// Why configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    File {
        path: PathBuf,
        source: config::ConfigError,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole mesh's configuration. Each service reads the sections it needs;
/// the all-in-one binary reads them all from the same file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the gRPC server listens on.
    pub listen: SocketAddr,
    /// Where the embedded default keeps its SQLite files.
    pub data_dir: PathBuf,
    /// The service's SQL database (`sqlite://…` or `mysql://…`). For
    /// ongoing-query it is the rooms database of the local region.
    pub database_url: Option<String>,
    /// The hot store (`redis://…`); unset means the in-process store.
    pub redis_url: Option<String>,
    pub telemetry: TelemetryConfig,
    pub shutdown: ShutdownConfig,
    pub client: ClientConfig,
    pub server: ServerConfig,
    pub rooms: RoomsConfig,
    pub counter: CounterConfig,
    pub fanout: FanoutConfig,
    pub subscribe: SubscribeConfig,
    pub publish: PublishConfig,
    pub gifts: GiftsConfig,
    /// Authentication, authorisation, TLS and limits (see [`crate::auth`]).
    pub auth: crate::auth::AuthConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            data_dir: PathBuf::from("livemesh-data"),
            database_url: None,
            redis_url: None,
            telemetry: TelemetryConfig::default(),
            shutdown: ShutdownConfig::default(),
            client: ClientConfig::default(),
            server: ServerConfig::default(),
            rooms: RoomsConfig::default(),
            counter: CounterConfig::default(),
            fanout: FanoutConfig::default(),
            subscribe: SubscribeConfig::default(),
            publish: PublishConfig::default(),
            gifts: GiftsConfig::default(),
            auth: crate::auth::AuthConfig::default(),
        }
    }
}

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

/// Logs and traces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// A `tracing` filter, e.g. `info` or `livemesh=debug,info`. `RUST_LOG` wins when set.
    pub log: String,
    /// OTLP/gRPC collector for traces and metrics, e.g.
    /// `http://127.0.0.1:4317`. Unset: no export.
    pub otlp_endpoint: Option<String>,
    /// Address of the admin HTTP endpoint serving metrics as Prometheus
    /// text at `/metrics`. Each process on a host needs its own (port 0
    /// picks a free one); empty turns the endpoint off.
    pub metrics_listen: String,
    /// How often metrics are pushed to `otlp_endpoint`.
    pub metrics_export_interval_ms: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log: "info".to_owned(),
            otlp_endpoint: None,
            metrics_listen: "127.0.0.1:9464".to_owned(),
            metrics_export_interval_ms: 10_000,
        }
    }
}

/// Graceful shutdown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// After SIGTERM/Ctrl-C, how long in-flight calls may take to finish.
    pub drain_timeout_ms: u64,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 10_000,
        }
    }
}

/// The inter-service client stack (see [`crate::client`]) and the circuit
/// breakers around the hot store and SQL (see [`crate::resilience`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// TCP connect timeout to a peer.
    pub connect_timeout_ms: u64,
    /// Time a call may take until its response headers arrive (a call may
    /// ask for less with its own gRPC deadline).
    pub request_timeout_ms: u64,
    /// A peer's breaker opens when at least this share (0 < rate <= 1) of
    /// the calls in the window failed (transport errors, timeouts,
    /// UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, UNKNOWN, RESOURCE_EXHAUSTED;
    /// never a caller's own mistake such as INVALID_ARGUMENT).
    pub breaker_failure_rate: f64,
    /// A call that takes at least this long counts as slow.
    pub breaker_slow_call_ms: u64,
    /// A peer's breaker opens when at least this share of the calls in the
    /// window were slow (or abandoned by their callers). At least
    /// `breaker_failure_rate`: once this share is reached, slow calls count
    /// as failed ones.
    pub breaker_slow_call_rate: f64,
    /// The sliding window the rates are computed over (at least 1000): ten
    /// buckets of a tenth of it, each a running count, so a call costs the
    /// same whatever the traffic.
    pub breaker_window_ms: u64,
    /// Rates are judged only once the window holds this many calls.
    pub breaker_min_calls: u32,
    /// An open breaker rejects every call (UNAVAILABLE, at once) this long,
    /// then lets probes through (half-open).
    pub breaker_open_ms: u64,
    /// Probes a half-open breaker lets through at a time: 1 (seatbelt's
    /// quick half-open mode; a probe's success closes the breaker, its
    /// failure opens it again, and another probe goes only after
    /// `breaker_open_ms` if one never answers).
    pub breaker_half_open_calls: u32,
    /// Retries a client may add on top of its calls, in percent of the calls
    /// (the retry budget: a dead peer gets at most this much extra load).
    pub retry_budget_percent: u32,
    /// Retries per second always allowed, whatever the budget, so that a
    /// quiet client can still retry.
    pub retry_min_per_sec: u32,
    /// Retries of one call at most (only calls that never reached the
    /// peer, and UNAVAILABLE answers, are retried). 0 turns retries off.
    pub max_retries: u32,
    /// The first retry waits about this long (with jitter), doubling per retry.
    pub retry_backoff_ms: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: 1_000,
            request_timeout_ms: 2_000,
            breaker_failure_rate: 0.5,
            breaker_slow_call_ms: 1_000,
            breaker_slow_call_rate: 0.8,
            breaker_window_ms: 1_000,
            breaker_min_calls: 5,
            breaker_open_ms: 2_000,
            breaker_half_open_calls: 1,
            retry_budget_percent: 20,
            retry_min_per_sec: 10,
            max_retries: 2,
            retry_backoff_ms: 10,
        }
    }
}

impl ClientConfig {
    /// Checks the breaker and retry settings; the message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        for (key, rate) in [
            ("breaker_failure_rate", self.breaker_failure_rate),
            ("breaker_slow_call_rate", self.breaker_slow_call_rate),
        ] {
            if !(rate.is_finite() && rate > 0.0 && rate <= 1.0) {
                return invalid(format!(
                    "client.{key} is a share of calls: more than 0 and at most 1, not {rate}"
                ));
            }
        }
        if self.breaker_slow_call_ms == 0
            || self.breaker_open_ms == 0
            || self.breaker_min_calls == 0
            || self.breaker_half_open_calls == 0
            || self.retry_backoff_ms == 0
        {
            return invalid(
                "client.breaker_slow_call_ms, breaker_open_ms, breaker_min_calls, \
                 breaker_half_open_calls and retry_backoff_ms must be at least 1"
                    .to_owned(),
            );
        }
        if self.breaker_slow_call_rate < self.breaker_failure_rate {
            return invalid(format!(
                "client.breaker_slow_call_rate ({}) must be at least client.breaker_failure_rate \
                 ({}): once the slow share is reached, slow calls count as failed ones",
                self.breaker_slow_call_rate, self.breaker_failure_rate
            ));
        }
        if self.breaker_half_open_calls != 1 {
            return invalid(format!(
                "client.breaker_half_open_calls must be 1 (a half-open breaker lets one probe \
                 through at a time), not {}",
                self.breaker_half_open_calls
            ));
        }
        if self.breaker_window_ms < 1_000 {
            return invalid(format!(
                "client.breaker_window_ms must be at least 1000 (a window that short holds too few calls to judge), not {}",
                self.breaker_window_ms
            ));
        }
        if self.retry_budget_percent > 1_000 {
            return invalid(format!(
                "client.retry_budget_percent is at most 1000, not {}",
                self.retry_budget_percent
            ));
        }
        Ok(())
    }
}

/// What every gRPC server of the mesh admits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Calls a server works on at once (over all connections); a call past
    /// it is shed at once with UNAVAILABLE ("server overloaded, retry
    /// later") instead of queueing. A streaming call counts only until its
    /// stream starts; health checks and reflection are never shed.
    pub max_concurrent_requests: u32,
    /// A second, plaintext address serving only `grpc.health.v1` (the same
    /// statuses), for probes that speak no TLS (kubelet's gRPC probes).
    /// Empty: none.
    pub health_listen: String,
    /// Connections one server holds at once (each listener); a connection
    /// past it is closed as soon as it is accepted, logged and counted
    /// (`livemesh.server.connections.refused`). Keep it below the process's
    /// file limit.
    pub max_connections: u32,
    /// A connection must make its first request (TLS and HTTP/2 handshakes
    /// included) within this long, or it is closed.
    pub handshake_timeout_ms: u64,
    /// A connection with no call open for this long is closed (a stream,
    /// such as Subscribe or Watch, is a call for as long as it lasts).
    /// 0: never.
    pub idle_timeout_ms: u64,
    /// HTTP/2 keepalive: a PING after this long without a frame from the
    /// peer; the connection is closed when its answer does not come within
    /// `keepalive_timeout_ms`. 0: no keepalive.
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    /// The metadata one request may carry (HTTP/2 header list size: each
    /// header's name and value plus 32 bytes); a request over it is refused
    /// alone with RESOURCE_EXHAUSTED.
    pub max_header_bytes: u32,
    /// The header list size the server announces to HTTP/2 peers: past it
    /// the HTTP/2 layer resets the stream or, for a header block this large,
    /// the whole connection with every call on it. Kept well above
    /// `max_header_bytes`, so an oversized request is refused by itself.
    pub http2_max_header_list_bytes: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_concurrent_requests: 10_000,
            health_listen: String::new(),
            max_connections: 10_000,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            keepalive_interval_ms: 60_000,
            keepalive_timeout_ms: 20_000,
            max_header_bytes: 16 * 1024,
            http2_max_header_list_bytes: 256 * 1024,
        }
    }
}

impl ServerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: String| Err(ConfigError::Invalid(message));
        if self.max_concurrent_requests == 0 {
            return invalid("server.max_concurrent_requests must be at least 1".into());
        }
        if self.max_connections == 0 || self.handshake_timeout_ms == 0 {
            return invalid(
                "server.max_connections and server.handshake_timeout_ms must be at least 1".into(),
            );
        }
        if self.keepalive_interval_ms > 0 && self.keepalive_timeout_ms == 0 {
            return invalid(
                "server.keepalive_timeout_ms must be at least 1 when \
                 server.keepalive_interval_ms is set"
                    .into(),
            );
        }
        if self.max_header_bytes < 1024 {
            return invalid(format!(
                "server.max_header_bytes is {}; at least 1024 are needed for a call's own \
                 headers (path, content type, deadline, credentials, trace context)",
                self.max_header_bytes
            ));
        }
        if self.http2_max_header_list_bytes < self.max_header_bytes.saturating_mul(2) {
            return invalid(format!(
                "server.http2_max_header_list_bytes ({}) must be at least twice \
                 server.max_header_bytes ({}): requests between the two are refused one by one, \
                 past the first HTTP/2 resets the connection",
                self.http2_max_header_list_bytes, self.max_header_bytes
            ));
        }
        Ok(())
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

/// Where configuration comes from, lowest precedence first.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// A TOML file; it must exist when named.
    pub file: Option<PathBuf>,
    /// Environment pairs; only `LIVEMESH_*` ones are read.
    pub env: Vec<(String, String)>,
    /// Flag values by dotted key (`rooms.scan_interval_ms`), highest precedence.
    pub overrides: Vec<(String, String)>,
}

impl Sources {
    /// The process environment plus the given file and flag overrides.
    pub fn from_process(file: Option<PathBuf>, overrides: Vec<(String, String)>) -> Self {
        Self {
            file,
            env: std::env::vars().collect(),
            overrides,
        }
    }
}

impl Config {
    /// Builds the configuration from `sources`, layered over the defaults.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let invalid = |e: config::ConfigError| ConfigError::Invalid(e.to_string());
        let defaults = config::Config::try_from(&Config::default()).map_err(invalid)?;
        let mut builder = config::Config::builder().add_source(defaults);
        if let Some(path) = &sources.file {
            if !path.is_file() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            let file = config::Config::builder()
                .add_source(config::File::from(path.as_path()).format(config::FileFormat::Toml))
                .build()
                .map_err(|source| ConfigError::File {
                    path: path.clone(),
                    source,
                })?;
            builder = builder.add_source(file);
        }
        let env: HashMap<String, String> = sources
            .env
            .iter()
            .filter(|(k, _)| {
                k.starts_with(ENV_PREFIX) && !ENV_NOT_CONFIG.iter().any(|skip| k.starts_with(skip))
            })
            .cloned()
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix("LIVEMESH")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("publish.peers")
                .with_list_parse_key("gifts.shard_urls")
                .source(Some(env.clone())),
        );
        for (key, value) in &sources.overrides {
            builder = builder
                .set_override(key.as_str(), value.as_str())
                .map_err(invalid)?;
        }
        let config: Config = builder
            .build()
            .and_then(config::Config::try_deserialize)
            .map_err(|e| ConfigError::Invalid(name_env_source(e.to_string(), &env)))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |message: &str| Err(ConfigError::Invalid(message.to_owned()));
        let sub = &self.subscribe;
        if sub.queue_len == 0
            || sub.report_interval_ms == 0
            || sub.gap_wait_ms == 0
            || sub.max_streams_per_connection == 0
            || self.fanout.history_len == 0
            || self.publish.deliver_timeout_ms == 0
            || self.gifts.shards == 0
            || self.gifts.room_subaccounts == 0
            || self.gifts.max_batch == 0
            || self.gifts.batch_workers == 0
        {
            return invalid(
                "subscribe.queue_len, report_interval_ms, gap_wait_ms, \
                 max_streams_per_connection, fanout.history_len, \
                 publish.deliver_timeout_ms, gifts.shards, gifts.room_subaccounts, \
                 gifts.max_batch and gifts.batch_workers must be at least 1",
            );
        }
        if self.gifts.platform_cut_bps > 10_000 {
            return invalid("gifts.platform_cut_bps is at most 10000 (100%)");
        }
        if self.gifts.max_transfer_amount <= 0 {
            return invalid("gifts.max_transfer_amount must be at least 1");
        }
        if self.gifts.announce_timeout_ms == 0 {
            return invalid("gifts.announce_timeout_ms must be at least 1");
        }
        if sub.lease_ms < 2 * sub.report_interval_ms {
            return invalid(
                "subscribe.lease_ms must be at least twice subscribe.report_interval_ms, \
                 or a live node's registrations expire between renewals",
            );
        }
        if let Some(peer) = self
            .publish
            .peers
            .iter()
            .find(|p| !(p.starts_with("http://") || p.starts_with("https://")))
        {
            return Err(ConfigError::Invalid(format!(
                "publish.peers: {peer:?} is not an http:// or https:// URL"
            )));
        }
        if self.rooms.scan_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "rooms.scan_interval_ms must be at least 1".into(),
            ));
        }
        if self.rooms.feed_poll_ms == 0 || self.rooms.watch_window == 0 {
            return Err(ConfigError::Invalid(
                "rooms.feed_poll_ms and rooms.watch_window must be at least 1".into(),
            ));
        }
        let c = &self.counter;
        if c.max_taps_per_request == 0
            || c.taps_per_second == 0
            || c.burst == 0
            || c.flush_tick_ms == 0
            || c.publish_tick_ms == 0
            || c.total_shards == 0
            || c.top_length == 0
            || c.analytics_queue == 0
            || c.analytics_files == 0
        {
            return Err(ConfigError::Invalid(
                "counter.max_taps_per_request, taps_per_second, burst, flush_tick_ms, \
                 publish_tick_ms, total_shards, top_length, analytics_queue and analytics_files \
                 must be at least 1"
                    .into(),
            ));
        }
        if self.client.request_timeout_ms == 0 || self.client.connect_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "client.connect_timeout_ms and client.request_timeout_ms must be at least 1".into(),
            ));
        }
        self.client.validate()?;
        if self.publish.deliver_timeout_ms >= self.client.breaker_slow_call_ms {
            return Err(ConfigError::Invalid(format!(
                "publish.deliver_timeout_ms ({}) must be below client.breaker_slow_call_ms ({}): \
                 until a dead subscribe node's breaker opens, every Publish waits the Deliver \
                 timeout, and callers' breakers would count those publishes as slow and open on \
                 the dispatcher",
                self.publish.deliver_timeout_ms, self.client.breaker_slow_call_ms
            )));
        }
        self.server.validate()?;
        self.auth.validate().map_err(ConfigError::Invalid)?;
        // auth: with TLS on, servers speak nothing else, so every peer is https.
        if self.auth.tls_enabled()
            && let Some((key, url)) = self
                .peer_urls()
                .into_iter()
                .find(|(_, url)| url.starts_with("http://"))
        {
            return Err(ConfigError::Invalid(format!(
                "{key} = {url:?}: with auth.tls_cert set, peers speak TLS only; use https://"
            )));
        }
        let mut seen = vec![self.rooms.local_region];
        for region in &self.rooms.regions {
            if seen.contains(&region.id) {
                return Err(ConfigError::Invalid(format!(
                    "region {} is configured twice (rooms.local_region and rooms.regions must name distinct regions)",
                    region.id
                )));
            }
            seen.push(region.id);
        }
        Ok(())
    }

    /// Every configured peer URL, with its key.
    pub(crate) fn peer_urls(&self) -> Vec<(&'static str, &str)> {
        let mut urls = vec![
            (
                "counter.ongoing_query_url",
                self.counter.ongoing_query_url.as_str(),
            ),
            ("counter.publish_url", &self.counter.publish_url),
            ("subscribe.node_url", &self.subscribe.node_url),
            (
                "subscribe.ongoing_query_url",
                &self.subscribe.ongoing_query_url,
            ),
            ("subscribe.publish_url", &self.subscribe.publish_url),
            ("publish.ongoing_query_url", &self.publish.ongoing_query_url),
            ("gifts.ongoing_query_url", &self.gifts.ongoing_query_url),
            ("gifts.publish_url", &self.gifts.publish_url),
        ];
        urls.extend(
            self.publish
                .peers
                .iter()
                .map(|p| ("publish.peers", p.as_str())),
        );
        urls
    }

    /// The URL a service calls a peer at: `configured`, or when that is
    /// empty this process's own address (the all-in-one `livemesh up`).
    pub fn peer_url(&self, configured: &str) -> String {
        if configured.is_empty() {
            // auth: `https` when services speak TLS.
            let scheme = if self.auth.tls_enabled() {
                "https"
            } else {
                "http"
            };
            format!("{scheme}://{}", self.listen)
        } else {
            configured.to_owned()
        }
    }

    /// The SQLite URL of `file` under the data dir, created if missing.
    pub fn sqlite_url(&self, file: &str) -> String {
        sqlite_url(&self.data_dir.join(file))
    }
}

/// Points an "unknown field" error at the environment variable it came
/// from, when it came from one: the variable name is what the user must fix.
fn name_env_source(message: String, env: &HashMap<String, String>) -> String {
    let culprit = env.keys().find(|var| {
        let field = var[ENV_PREFIX.len()..].to_ascii_lowercase();
        let leaf = field.rsplit("__").next().unwrap_or(&field);
        message.contains(&format!("unknown field `{leaf}`"))
    });
    match culprit {
        Some(var) => format!(
            "{message} (set by the environment variable {var}; LIVEMESH_* variables are config keys)"
        ),
        None => message,
    }
}

/// A `sqlite://` URL for `path`, creating the file when it is missing.
pub fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}?mode=rwc", path.display())
}

/// Flags every livemesh binary takes. They override the file and environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct CommonArgs {
    /// TOML config file (see the README's configuration reference).
    #[arg(long, env = "LIVEMESH_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on [default: 127.0.0.1:50051].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for the embedded default's SQLite files [default: ./livemesh-data].
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// SQL database, `sqlite://FILE` or `mysql://USER:PASS@HOST:PORT/DB`.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Redis, `redis://HOST:PORT` (unset: the in-process hot store).
    #[arg(long, value_name = "URL")]
    pub redis_url: Option<String>,
    /// Log filter, e.g. `info` or `livemesh_ongoing_query=debug` [default: info].
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
    /// OTLP/gRPC endpoint to export traces and metrics to, e.g. `http://127.0.0.1:4317`.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics; port 0 picks a free
    /// one, "" turns it off [default: 127.0.0.1:9464].
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Load and validate the configuration exactly as the service would
    /// (defaults < file < environment < flags), read the secret and
    /// certificate files it names, bind nothing, and exit: 0 when it is
    /// usable, 2 with each wrong key named.
    #[arg(long)]
    pub check_config: bool,
}

impl CommonArgs {
    /// The flags as config overrides.
    pub fn overrides(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut put = |key: &str, value: Option<String>| {
            if let Some(value) = value {
                out.push((key.to_owned(), value));
            }
        };
        put("listen", self.listen.map(|a| a.to_string()));
        put(
            "data_dir",
            self.data_dir.as_ref().map(|d| d.display().to_string()),
        );
        put("database_url", self.database_url.clone());
        put("redis_url", self.redis_url.clone());
        put("telemetry.log", self.log.clone());
        put("telemetry.otlp_endpoint", self.otlp_endpoint.clone());
        put("telemetry.metrics_listen", self.metrics_listen.clone());
        out
    }

    /// Loads the configuration these flags describe, from the process environment.
    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::load(&Sources::from_process(
            self.config.clone(),
            self.overrides(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_apply_without_sources() {
        let config = Config::load(&Sources::default()).unwrap();
        assert_eq!(config, Config::default());
    }

    #[test]
    fn file_beats_defaults_env_beats_file_flags_beat_env() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("livemesh.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:7001\"\ndatabase_url = \"sqlite://file.db\"\n\
             [rooms]\nscan_interval_ms = 111\nended_retention_ms = 5\n\
             [[rooms.regions]]\nid = 3\ndatabase_url = \"mysql://r3\"\n",
        )
        .unwrap();
        let sources = Sources {
            file: Some(file),
            env: env(&[
                ("LIVEMESH_DATABASE_URL", "sqlite://env.db"),
                ("LIVEMESH_ROOMS__SCAN_INTERVAL_MS", "222"),
                ("LIVEMESH_TEST_MYSQL_URL", "mysql://not-config"),
                ("LIVEMESH_CONFIG", "ignored.toml"),
                ("UNRELATED", "x"),
            ]),
            overrides: vec![("rooms.scan_interval_ms".into(), "333".into())],
        };
        let config = Config::load(&sources).unwrap();
        assert_eq!(config.listen.port(), 7001, "file beats the default");
        assert_eq!(config.database_url.as_deref(), Some("sqlite://env.db"));
        assert_eq!(config.rooms.scan_interval_ms, 333, "flags beat env");
        assert_eq!(config.rooms.ended_retention_ms, 5);
        assert_eq!(
            config.rooms.regions,
            vec![RegionConfig {
                id: 3,
                database_url: "mysql://r3".into()
            }]
        );
        assert_eq!(config.client, ClientConfig::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected_with_the_key_named() {
        let err = Config::load(&Sources {
            env: env(&[("LIVEMESH_ROOMS__SCAN_INTERVL_MS", "1")]),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("scan_intervl_ms"), "{err}");
        assert!(err.contains("LIVEMESH_ROOMS__SCAN_INTERVL_MS"), "{err}");

        let err = Config::load(&Sources {
            overrides: vec![("listen".into(), "not-an-address".into())],
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("listen") || err.contains("address"), "{err}");

        let err = Config::load(&Sources {
            file: Some(PathBuf::from("/nonexistent/livemesh.toml")),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("does not exist"), "{err}");
    }

    #[test]
    fn peers_come_from_a_comma_list_and_leases_outlive_renewals() {
        let config = Config::load(&Sources {
            env: env(&[(
                "LIVEMESH_PUBLISH__PEERS",
                "http://dc2:50051,https://dc3:50051",
            )]),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(
            config.publish.peers,
            vec![
                "http://dc2:50051".to_owned(),
                "https://dc3:50051".to_owned()
            ]
        );
        let err = Config::load(&Sources {
            env: env(&[("LIVEMESH_PUBLISH__PEERS", "dc2:50051")]),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("publish.peers"), "{err}");
        let err = Config::load(&Sources {
            env: env(&[("LIVEMESH_SUBSCRIBE__LEASE_MS", "3000")]),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("lease_ms"), "{err}");
    }

    #[test]
    fn bad_breaker_retry_and_server_settings_are_rejected_with_the_key_named() {
        for (var, value, key) in [
            (
                "LIVEMESH_CLIENT__BREAKER_FAILURE_RATE",
                "1.5",
                "breaker_failure_rate",
            ),
            (
                "LIVEMESH_CLIENT__BREAKER_SLOW_CALL_RATE",
                "0",
                "breaker_slow_call_rate",
            ),
            (
                "LIVEMESH_CLIENT__BREAKER_WINDOW_MS",
                "10",
                "breaker_window_ms",
            ),
            ("LIVEMESH_CLIENT__BREAKER_OPEN_MS", "0", "breaker_open_ms"),
            (
                "LIVEMESH_CLIENT__RETRY_BUDGET_PERCENT",
                "5000",
                "retry_budget_percent",
            ),
            (
                "LIVEMESH_SERVER__MAX_CONCURRENT_REQUESTS",
                "0",
                "max_concurrent_requests",
            ),
        ] {
            let err = Config::load(&Sources {
                env: env(&[(var, value)]),
                ..Sources::default()
            })
            .unwrap_err()
            .to_string();
            assert!(err.contains(key), "{var}={value}: {err}");
        }
    }

    #[test]
    fn the_deliver_timeout_must_stay_below_the_slow_call_threshold() {
        let err = Config::load(&Sources {
            env: env(&[("LIVEMESH_PUBLISH__DELIVER_TIMEOUT_MS", "1000")]),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("publish.deliver_timeout_ms (1000)")
                && err.contains("client.breaker_slow_call_ms (1000)"),
            "{err}"
        );
        let config = Config::load(&Sources {
            env: env(&[
                ("LIVEMESH_PUBLISH__DELIVER_TIMEOUT_MS", "1000"),
                ("LIVEMESH_CLIENT__BREAKER_SLOW_CALL_MS", "2000"),
            ]),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(config.publish.deliver_timeout_ms, 1_000);
    }

    #[test]
    fn duplicate_regions_are_rejected() {
        let err = Config::load(&Sources {
            env: env(&[("LIVEMESH_ROOMS__LOCAL_REGION", "2")]),
            overrides: vec![],
            file: None,
        })
        .map(|mut c| {
            c.rooms.regions.push(RegionConfig {
                id: 2,
                database_url: "x".into(),
            });
            c.validate()
        })
        .unwrap()
        .unwrap_err();
        assert!(err.to_string().contains("region 2"), "{err}");
    }
}

#[cfg(test)]
mod example_file {
    use super::*;

    /// The documented example must stay loadable and equal to the defaults,
    /// so the reference cannot drift from the code.
    #[test]
    fn the_example_config_loads_and_documents_the_defaults() {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../config/livemesh.example.toml");
        let config = Config::load(&Sources {
            file: Some(path),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(config, Config::default());
    }
}
