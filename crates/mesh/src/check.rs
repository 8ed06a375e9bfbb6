//! `config check`: load a process's configuration exactly as it would at
//! start (defaults < file < `LIVEMESH_*` environment < flags), validate it
//! for the role it is about to play, read the secret and certificate files
//! it names, and bind nothing.
//!
//! Every service binary takes `--check-config`, and `livemesh config check`
//! does the same for the all-in-one, so a deployment (the Helm chart's
//! rendered containers, a hand-written systemd unit) can be checked before
//! anything starts: exit 0 when the configuration is usable, exit 2 with
//! one line per problem, each naming the key and what is wrong.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr as _;

use crate::auth::Security;
use crate::config::{CommonArgs, Config, Registry, Sources};

/// One thing wrong with a configuration: the key and what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Loads and checks the configuration `sources` describe, with the
/// sections `registry` names; when the registry names the process's own
/// service section, as that service running on its own. Returns the
/// configuration when nothing is wrong, else every problem.
pub fn check(registry: &Registry, sources: &Sources) -> Result<Config, Vec<Problem>> {
    let config = match Config::load(registry, sources) {
        Ok(config) => config,
        // Loading stops at the first problem; its message names the key.
        Err(err) => {
            return Err(vec![Problem {
                key: "config".into(),
                message: err.to_string(),
            }]);
        }
    };
    let mut problems = Vec::new();
    let mut report = |key: &str, message: String| {
        problems.push(Problem {
            key: key.to_owned(),
            message,
        })
    };

    if !config.telemetry.metrics_listen.is_empty()
        && config
            .telemetry
            .metrics_listen
            .parse::<SocketAddr>()
            .is_err()
    {
        report(
            "telemetry.metrics_listen",
            format!(
                "{:?} is not an address like 0.0.0.0:9464 (\"\" turns the endpoint off)",
                config.telemetry.metrics_listen
            ),
        );
    }
    if !config.server.health_listen.is_empty()
        && config.server.health_listen.parse::<SocketAddr>().is_err()
    {
        report(
            "server.health_listen",
            format!(
                "{:?} is not an address like 0.0.0.0:50052 (\"\" turns it off)",
                config.server.health_listen
            ),
        );
    }
    if let Some(endpoint) = &config.telemetry.otlp_endpoint
        && let Err(why) = http_url(endpoint)
    {
        report("telemetry.otlp_endpoint", why);
    }

    // SQL URLs: parsed as the pools would, without connecting.
    for (key, url) in config.sql_urls() {
        if let Err(why) = sql_url(url) {
            report(&key, why);
        }
    }
    if let Some(urls) = &config.redis_url {
        for url in urls.split(',').filter(|u| !u.trim().is_empty()) {
            if let Err(why) = redis_url(url.trim()) {
                report("redis_url", why);
            }
        }
    }

    // Peers: every configured one must be a URL a channel can dial; as its
    // own process a service has no sibling in the process to fall back to.
    let own = registry.own_section();
    for peer in config.peers() {
        if !peer.url.is_empty()
            && let Err(why) = http_url(peer.url)
        {
            report(peer.key, why);
        }
    }
    if let Some(own) = own {
        for peer in config.peers() {
            if peer.key.split('.').next() == Some(own)
                && let Some(service) = peer.required
                && peer.url.is_empty()
            {
                report(
                    peer.key,
                    format!(
                        "empty: as its own process this service would call itself at {}, which \
                         serves no {service} service; set it to {service}'s address",
                        config.peer_url("")
                    ),
                );
            }
        }
        config.check_own_process(own, &mut report);
    }

    // The files the service reads before it binds: the token secret and
    // the TLS certificates.
    if let Err(err) = Security::from_config(&config.auth) {
        report("auth", err.to_string());
    } else if config.auth.tls_enabled() {
        // Read fine; now make sure each file holds what its key says, so
        // a swapped or empty mount fails here rather than at the first call.
        for (key, path, marker) in [
            (
                "auth.tls_cert",
                &config.auth.tls_cert,
                "-----BEGIN CERTIFICATE-----",
            ),
            ("auth.tls_key", &config.auth.tls_key, "PRIVATE KEY-----"),
            (
                "auth.tls_ca",
                &config.auth.tls_ca,
                "-----BEGIN CERTIFICATE-----",
            ),
        ] {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if !text.contains(marker) {
                report(key, format!("{path} holds no PEM {marker:?} block"));
            }
        }
    }

    if problems.is_empty() {
        Ok(config)
    } else {
        Err(problems)
    }
}

/// Checks an `http(s)://host[:port]` URL; the message says what is wrong.
pub fn http_url(url: &str) -> Result<(), String> {
    let uri = http::Uri::from_str(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("{url:?} must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{url:?} names no host"));
    }
    Ok(())
}

fn redis_url(url: &str) -> Result<(), String> {
    let shown = crate::sql::redact(url);
    let uri = http::Uri::from_str(url).map_err(|e| format!("{shown:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("redis" | "rediss") => {}
        _ => return Err(format!("{shown:?} must start with redis:// or rediss://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("{shown:?} names no host"));
    }
    Ok(())
}

fn sql_url(url: &str) -> Result<(), String> {
    let shown = crate::sql::redact(url);
    if url.starts_with("sqlite:") {
        return sqlx::sqlite::SqliteConnectOptions::from_str(url)
            .map(drop)
            .map_err(|e| format!("{shown:?}: {e}"));
    }
    if url.starts_with("mysql:") || url.starts_with("mariadb:") {
        return sqlx::mysql::MySqlConnectOptions::from_str(&url.replacen("mariadb:", "mysql:", 1))
            .map(drop)
            .map_err(|e| format!("{shown:?}: {e}"));
    }
    Err(format!(
        "{shown:?} is not a database URL: use sqlite://PATH or mysql://USER:PASS@HOST:PORT/DATABASE"
    ))
}

/// The SQL databases the configuration names, passwords masked.
fn summarize_sql(config: &Config) -> String {
    let mut urls: Vec<String> = config
        .sql_urls()
        .into_iter()
        .map(|(_, url)| crate::sql::redact(url))
        .collect();
    if urls.is_empty() {
        return "SQLite files under data_dir".to_owned();
    }
    if urls.len() > 2 {
        let more = urls.len() - 1;
        urls.truncate(1);
        urls.push(format!("{more} more"));
    }
    urls.join(", ")
}

/// The database a MySQL/MariaDB URL names, if any.
pub fn sql_database(url: &str) -> Option<String> {
    sqlx::mysql::MySqlConnectOptions::from_str(&url.replacen("mariadb:", "mysql:", 1))
        .ok()?
        .get_database()
        .map(str::to_owned)
}

/// `--check-config` / `config check`: checks the configuration `args`
/// describe (from the process environment) for the service `name`, prints
/// the outcome, and returns the exit code (0 usable, 2 not).
pub fn run(name: &str, registry: &Registry, args: &CommonArgs) -> ExitCode {
    let sources = Sources::from_process(args.config.clone(), args.overrides());
    match check(registry, &sources) {
        Ok(config) => {
            println!(
                "{name}: configuration OK (listen {}, auth.mode {}, TLS {}, redis {}, sql {})",
                config.listen,
                match config.auth.mode {
                    crate::auth::AuthMode::Dev => "dev",
                    crate::auth::AuthMode::Enforce => "enforce",
                },
                if config.auth.tls_enabled() {
                    "on"
                } else {
                    "off"
                },
                config.redis_urls().map_or_else(
                    || "in-process".to_owned(),
                    |urls| format!("{} URL(s)", urls.split(',').count())
                ),
                summarize_sql(&config),
            );
            ExitCode::SUCCESS
        }
        Err(problems) => {
            for problem in &problems {
                eprintln!("{name}: {problem}");
            }
            eprintln!(
                "{name}: configuration check FAILED ({} problem{})",
                problems.len(),
                if problems.len() == 1 { "" } else { "s" }
            );
            ExitCode::from(2)
        }
    }
}
