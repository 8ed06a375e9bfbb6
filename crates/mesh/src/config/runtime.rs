//! The sections of the shared runtime: telemetry, shutdown, client, server.

use serde::{Deserialize, Serialize};

use super::ConfigError;

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
/// breakers around the hot store and SQL (see [`crate::breaker`]).
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
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
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
