//! The metrics the alert rules read, scraped from every process.

use anyhow::{Context as _, ensure};

use super::Topology;

/// The metric families the alert rules (helm/livemesh/files/alerts.yaml)
/// read, and the services whose every process must export them once the
/// workload ran.
const ALERT_METRICS: &[(&str, &str)] = &[
    ("subscribe", "livemesh_fanout_lag_seconds_bucket"),
    (
        "ongoing-query",
        "livemesh_ongoing_query_binlog_lag_seconds_bucket",
    ),
    (
        "gift-settler",
        "livemesh_gifts_settlement_pending_age_seconds",
    ),
    ("publish", "rpc_server_calls_total"),
    ("counter", "rpc_server_calls_total"),
];

pub(super) async fn check_metrics(topology: &Topology) -> anyhow::Result<()> {
    for (service, family) in ALERT_METRICS {
        for process in topology.processes(service)? {
            let text = scrape(&process.metrics).await?;
            ensure!(
                text.lines().any(|l| l.starts_with(family)),
                "{} ({}) exports no {family}",
                process.name,
                process.metrics
            );
        }
    }
    // Nothing is left pending once every room settled.
    for process in topology.processes("gift-settler")? {
        let text = scrape(&process.metrics).await?;
        let age = text
            .lines()
            .find(|l| l.starts_with("livemesh_gifts_settlement_pending_age_seconds"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        ensure!(
            age == Some(0.0),
            "{}: livemesh_gifts_settlement_pending_age_seconds is {age:?} after every room settled",
            process.name
        );
    }
    println!("the metrics the alert rules read are exported by every process that owns them");
    Ok(())
}

/// `GET` of a plain-HTTP metrics URL, without an HTTP client dependency:
/// one request on a fresh connection, read to its end.
async fn scrape(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// metrics URLs"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut socket = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    socket
        .write_all(
            format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("{url}: no HTTP response"))?;
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "{url}: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_owned())
}
