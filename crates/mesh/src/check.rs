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
use crate::config::{CommonArgs, Config, Sources};

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

/// What the checked process runs: one service as its own process, or the
/// all-in-one `livemesh up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    AllInOne,
    OngoingQuery,
    Publish,
    Subscribe,
    Counter,
    GiftSettler,
}

impl Role {
    /// The role of a `run_service_main` name (`counter`, `publish`, ...;
    /// anything else is the all-in-one).
    pub fn from_name(name: &str) -> Self {
        match name {
            crate::auth::policy::ONGOING_QUERY => Self::OngoingQuery,
            crate::auth::policy::PUBLISH => Self::Publish,
            crate::auth::policy::SUBSCRIBE => Self::Subscribe,
            crate::auth::policy::COUNTER => Self::Counter,
            crate::auth::policy::GIFT_SETTLER => Self::GiftSettler,
            _ => Self::AllInOne,
        }
    }

    /// The peer-URL keys this role calls, with the service each must name.
    fn peers(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::AllInOne | Self::OngoingQuery => &[],
            Self::Publish => &[("publish.ongoing_query_url", "ongoing-query")],
            Self::Subscribe => &[
                ("subscribe.ongoing_query_url", "ongoing-query"),
                ("subscribe.publish_url", "publish"),
            ],
            Self::Counter => &[
                ("counter.ongoing_query_url", "ongoing-query"),
                ("counter.publish_url", "publish"),
            ],
            Self::GiftSettler => &[
                ("gifts.ongoing_query_url", "ongoing-query"),
                ("gifts.publish_url", "publish"),
            ],
        }
    }
}

/// Loads and checks the configuration `sources` describe for `role`.
/// Returns the configuration when nothing is wrong, else every problem.
pub fn check(role: Role, sources: &Sources) -> Result<Config, Vec<Problem>> {
    let config = match Config::load(sources) {
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
    let mut sql_urls: Vec<(String, &str)> = Vec::new();
    if let Some(url) = &config.database_url {
        sql_urls.push(("database_url".into(), url));
    }
    if !config.counter.database_url.is_empty() {
        sql_urls.push(("counter.database_url".into(), &config.counter.database_url));
    }
    for (i, url) in config.gifts.shard_urls.iter().enumerate() {
        sql_urls.push((format!("gifts.shard_urls[{i}]"), url));
    }
    for region in &config.rooms.regions {
        sql_urls.push((
            format!("rooms.regions[id = {}].database_url", region.id),
            &region.database_url,
        ));
    }
    for (key, url) in &sql_urls {
        if let Err(why) = sql_url(url) {
            report(key, why);
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
    for (key, url) in config.peer_urls() {
        if !url.is_empty()
            && let Err(why) = http_url(url)
        {
            report(key, why);
        }
    }
    for (key, peer) in role.peers() {
        if peer_value(&config, key).is_empty() {
            report(
                key,
                format!(
                    "empty: as its own process this service would call itself at {}, which \
                     serves no {peer} service; set it to {peer}'s address",
                    config.peer_url("")
                ),
            );
        }
    }

    match role {
        Role::Subscribe => check_node_url(&config, &mut report),
        Role::Publish | Role::Counter => {
            if config.redis_urls().is_none() {
                report(
                    "redis_url",
                    "unset: this process would keep its state in its own memory, where no \
                     other process looks; set it to the Redis (Cluster) the mesh shares"
                        .into(),
                );
            }
        }
        Role::AllInOne | Role::OngoingQuery | Role::GiftSettler => {}
    }
    if role == Role::OngoingQuery
        && let Some(url) = &config.database_url
        && url.starts_with("mysql:")
        && config.rooms.feed
        && sql_database(url).is_none()
    {
        report(
            "database_url",
            "names no database: the binlog tail filters the rooms table by database; \
             use mysql://USER:PASS@HOST:PORT/DATABASE"
                .into(),
        );
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

fn check_node_url(config: &Config, report: &mut impl FnMut(&str, String)) {
    let node_url = config.peer_url(&config.subscribe.node_url);
    let host = http::Uri::from_str(&node_url)
        .ok()
        .and_then(|uri| uri.host().map(str::to_owned));
    let unspecified = host
        .as_deref()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|h| h.parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| ip.is_unspecified());
    if unspecified {
        report(
            "subscribe.node_url",
            format!(
                "{node_url:?} is not an address dispatchers can call; set it to this node's own \
                 address (e.g. LIVEMESH_SUBSCRIBE__NODE_URL=http://$(POD_IP):50051)"
            ),
        );
    }
    if config.redis_urls().is_none() {
        report(
            "redis_url",
            "unset: this node would register its rooms in its own memory, where no dispatcher \
             of another process looks; set it to the Redis (Cluster) the dispatchers use"
                .into(),
        );
    }
}

fn peer_value<'a>(config: &'a Config, key: &str) -> &'a str {
    config
        .peer_urls()
        .into_iter()
        .find(|(k, _)| *k == key)
        .map_or("", |(_, url)| url)
}

/// An `http(s)://host[:port]` URL.
fn http_url(url: &str) -> Result<(), String> {
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
        .database_url
        .iter()
        .chain(std::iter::once(&config.counter.database_url).filter(|u| !u.is_empty()))
        .chain(&config.gifts.shard_urls)
        .map(|u| crate::sql::redact(u))
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

fn sql_database(url: &str) -> Option<String> {
    sqlx::mysql::MySqlConnectOptions::from_str(&url.replacen("mariadb:", "mysql:", 1))
        .ok()?
        .get_database()
        .map(str::to_owned)
}

/// `--check-config` / `config check`: checks the configuration `args`
/// describe (from the process environment) for the service `name`, prints
/// the outcome, and returns the exit code (0 usable, 2 not).
pub fn run(name: &str, args: &CommonArgs) -> ExitCode {
    let sources = Sources::from_process(args.config.clone(), args.overrides());
    match check(Role::from_name(name), &sources) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn sources(pairs: &[(&str, &str)]) -> Sources {
        Sources {
            env: pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Sources::default()
        }
    }

    fn keys(problems: &[Problem]) -> Vec<&str> {
        problems.iter().map(|p| p.key.as_str()).collect()
    }

    const SUBSCRIBE_OK: &[(&str, &str)] = &[
        ("LIVEMESH_LISTEN", "0.0.0.0:50051"),
        ("LIVEMESH_REDIS_URL", "redis://r1:6379,redis://r2:6379"),
        ("LIVEMESH_SUBSCRIBE__NODE_URL", "http://10.1.2.3:50051"),
        (
            "LIVEMESH_SUBSCRIBE__ONGOING_QUERY_URL",
            "http://ongoing-query:50051",
        ),
        ("LIVEMESH_SUBSCRIBE__PUBLISH_URL", "http://publish:50051"),
        ("LIVEMESH_TELEMETRY__METRICS_LISTEN", "0.0.0.0:9464"),
    ];

    #[test]
    fn a_complete_service_configuration_passes() {
        check(Role::Subscribe, &sources(SUBSCRIBE_OK)).unwrap();
        check(Role::AllInOne, &Sources::default()).unwrap();
    }

    #[test]
    fn a_service_on_its_own_needs_its_peers_its_store_and_a_callable_node_url() {
        let problems = check(
            Role::Subscribe,
            &sources(&[("LIVEMESH_LISTEN", "0.0.0.0:50051")]),
        )
        .unwrap_err();
        assert_eq!(
            keys(&problems),
            [
                "subscribe.ongoing_query_url",
                "subscribe.publish_url",
                "subscribe.node_url",
                "redis_url"
            ],
            "{problems:?}"
        );
        assert!(problems[2].message.contains("0.0.0.0"), "{problems:?}");
        let problems = check(Role::Counter, &Sources::default()).unwrap_err();
        assert_eq!(
            keys(&problems),
            [
                "counter.ongoing_query_url",
                "counter.publish_url",
                "redis_url"
            ]
        );
    }

    #[test]
    fn malformed_urls_and_addresses_are_named_by_key() {
        let mut env = SUBSCRIBE_OK.to_vec();
        env.extend([
            ("LIVEMESH_DATABASE_URL", "postgres://x/y"),
            ("LIVEMESH_GIFTS__SHARD_URLS", "mysql://u:p@db:3306/s0,db1"),
            ("LIVEMESH_TELEMETRY__METRICS_LISTEN", "localhost"),
            ("LIVEMESH_TELEMETRY__OTLP_ENDPOINT", "collector:4317"),
        ]);
        env.retain(|(k, v)| !(k == &"LIVEMESH_TELEMETRY__METRICS_LISTEN" && v == &"0.0.0.0:9464"));
        env.retain(|(k, _)| k != &"LIVEMESH_REDIS_URL");
        env.push(("LIVEMESH_REDIS_URL", "http://r1:6379"));
        let problems = check(Role::Subscribe, &sources(&env)).unwrap_err();
        assert_eq!(
            keys(&problems),
            [
                "telemetry.metrics_listen",
                "telemetry.otlp_endpoint",
                "database_url",
                "gifts.shard_urls[1]",
                "redis_url"
            ],
            "{problems:?}"
        );
    }

    #[test]
    fn an_unknown_key_and_a_plaintext_peer_under_tls_fail_with_the_key_named() {
        let mut env = SUBSCRIBE_OK.to_vec();
        env.push(("LIVEMESH_SUBSCRIBE__QUEUE_LENGTH", "5"));
        let problems = check(Role::Subscribe, &sources(&env)).unwrap_err();
        assert!(
            problems[0].message.contains("queue_length")
                && problems[0]
                    .message
                    .contains("LIVEMESH_SUBSCRIBE__QUEUE_LENGTH"),
            "{problems:?}"
        );
        let mut env = SUBSCRIBE_OK.to_vec();
        env.extend([
            ("LIVEMESH_AUTH__TLS_CERT", "/tls/tls.crt"),
            ("LIVEMESH_AUTH__TLS_KEY", "/tls/tls.key"),
            ("LIVEMESH_AUTH__TLS_CA", "/tls/ca.crt"),
        ]);
        let problems = check(Role::Subscribe, &sources(&env)).unwrap_err();
        assert!(
            problems[0].message.contains("subscribe.node_url")
                && problems[0].message.contains("https://"),
            "{problems:?}"
        );
    }

    #[test]
    fn missing_secret_and_certificate_files_are_reported() {
        let mut env = SUBSCRIBE_OK.to_vec();
        env.extend([
            ("LIVEMESH_AUTH__MODE", "enforce"),
            ("LIVEMESH_AUTH__TOKEN_SECRET_FILE", "/nonexistent/secret"),
        ]);
        let problems = check(Role::Subscribe, &sources(&env)).unwrap_err();
        assert_eq!(keys(&problems), ["auth"], "{problems:?}");
        assert!(
            problems[0].message.contains("auth.token_secret_file"),
            "{problems:?}"
        );
    }
}
