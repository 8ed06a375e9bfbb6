//! The flags every livemesh binary takes.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::{Config, ConfigError, Registry, Sources};

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

    /// Loads the configuration these flags describe, from the process
    /// environment, with the sections `registry` names.
    pub fn load(&self, registry: &Registry) -> Result<Config, ConfigError> {
        Config::load(
            registry,
            &Sources::from_process(self.config.clone(), self.overrides()),
        )
    }
}
