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
mod section;
#[cfg(test)]
mod tests;

pub use args::CommonArgs;
pub use runtime::{ClientConfig, ServerConfig, ShutdownConfig, TelemetryConfig};
pub use section::{Peer, Registry, SERVICE_SECTIONS, Section, Sections};

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

/// A process's configuration: the shared runtime's keys, plus the sections
/// of the services it runs ([`Section`], read with [`Config::section`]).
/// The all-in-one binary reads every section from the same file.
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
    /// Authentication, authorisation, TLS and limits (see [`crate::auth`]).
    pub auth: crate::auth::AuthConfig,
    /// The services' sections this configuration holds; read and change
    /// them with [`Config::section`], [`Config::section_mut`] and
    /// [`Config::with`]. (Public only so that `Config { listen, ..config }`
    /// works outside this crate.)
    #[serde(skip)]
    pub sections: Sections,
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
            auth: crate::auth::AuthConfig::default(),
            sections: Sections::default(),
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
    /// Builds the configuration from `sources`, layered over the defaults:
    /// the runtime's keys and the sections `registry` names.
    pub fn load(registry: &Registry, sources: &Sources) -> Result<Self, ConfigError> {
        let invalid = |e: config::ConfigError| ConfigError::Invalid(e.to_string());
        let defaults = config::Config::try_from(&Config::default()).map_err(invalid)?;
        let mut builder = config::Config::builder().add_source(defaults);
        for section in registry.defaults()? {
            builder = builder.add_source(section);
        }
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
        let mut environment = config::Environment::with_prefix("LIVEMESH")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true);
        let list_keys = registry.list_keys();
        // (Without named list keys, a list separator would split every value.)
        if !list_keys.is_empty() {
            environment = environment.list_separator(",");
            for key in &list_keys {
                environment = environment.with_list_parse_key(key);
            }
        }
        builder = builder.add_source(environment.source(Some(env.clone())));
        for (key, value) in &sources.overrides {
            builder = builder
                .set_override(key.as_str(), value.as_str())
                .map_err(invalid)?;
        }
        let named =
            |e: config::ConfigError| ConfigError::Invalid(name_env_source(e.to_string(), &env));
        let built = builder.build().map_err(named)?;
        let sections = registry.parse(&built).map_err(named)?;
        // The runtime's keys: everything but the sections, read or not.
        let mut table: config::Map<String, config::Value> =
            built.try_deserialize().map_err(named)?;
        table.retain(|key, _| {
            !registry.is_registered(key) && !SERVICE_SECTIONS.contains(&key.as_str())
        });
        let mut config: Config = config::Value::new(None, config::ValueKind::Table(table))
            .try_deserialize()
            .map_err(named)?;
        config.sections = sections;
        config.validate()?;
        Ok(config)
    }

    /// The section `S`: as loaded, or its defaults when this configuration
    /// does not hold it.
    pub fn section<S: Section>(&self) -> std::borrow::Cow<'_, S> {
        self.sections.section()
    }

    /// The section `S` to change (its defaults are put in first when this
    /// configuration does not hold it).
    pub fn section_mut<S: Section>(&mut self) -> &mut S {
        self.sections.section_mut()
    }

    /// This configuration with `section` in place of its `S`.
    #[must_use]
    pub fn with<S: Section>(mut self, section: S) -> Self {
        self.sections.put(Box::new(section));
        self
    }

    /// Checks the runtime's keys and every section this configuration
    /// holds; the message names the key to change.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.client.request_timeout_ms == 0 || self.client.connect_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "client.connect_timeout_ms and client.request_timeout_ms must be at least 1".into(),
            ));
        }
        self.client.validate()?;
        self.server.validate()?;
        self.auth.validate().map_err(ConfigError::Invalid)?;
        for section in self.sections.iter() {
            section.validate(self).map_err(ConfigError::Invalid)?;
        }
        // auth: with TLS on, servers speak nothing else, so every peer is https.
        if self.auth.tls_enabled()
            && let Some(peer) = self
                .peers()
                .into_iter()
                .find(|peer| peer.url.starts_with("http://"))
        {
            return Err(ConfigError::Invalid(format!(
                "{} = {:?}: with auth.tls_cert set, peers speak TLS only; use https://",
                peer.key, peer.url
            )));
        }
        Ok(())
    }

    /// Every configured peer URL of every section, with its key.
    pub fn peers(&self) -> Vec<Peer<'_>> {
        self.sections.iter().flat_map(|s| s.peers()).collect()
    }

    /// Every SQL database URL the configuration names, with its key.
    pub fn sql_urls(&self) -> Vec<(String, &str)> {
        let mut urls: Vec<(String, &str)> = Vec::new();
        if let Some(url) = &self.database_url {
            urls.push(("database_url".into(), url));
        }
        urls.extend(self.sections.iter().flat_map(|s| s.sql_urls()));
        urls
    }

    /// The own-process checks of the section `name` (see
    /// [`Section::check_own_process`]).
    pub(crate) fn check_own_process(&self, name: &str, report: &mut dyn FnMut(&str, String)) {
        if let Some(section) = self.sections.get(name) {
            section.check_own_process(self, report);
        }
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
