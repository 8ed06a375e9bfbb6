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

mod args;
mod runtime;
mod services;
#[cfg(test)]
mod tests;

pub use args::CommonArgs;
pub use runtime::{ClientConfig, ServerConfig, ShutdownConfig, TelemetryConfig};
pub use services::{
    CounterConfig, FanoutConfig, GiftsConfig, PublishConfig, RegionConfig, RoomsConfig,
    SubscribeConfig,
};

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

    /// The hot store's Redis URL(s) (one URL, or a comma-separated list of
    /// Cluster seeds), or `None` for the in-process store: the one reading
    /// of `redis_url` that the fan-out store and the counter share (unset,
    /// empty and blank all mean in-process).
    pub fn redis_urls(&self) -> Option<&str> {
        self.redis_url
            .as_deref()
            .map(str::trim)
            .filter(|urls| !urls.is_empty())
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
