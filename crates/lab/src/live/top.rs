//! `livemesh top`: the live view of any running mesh, read from its
//! services' Prometheus endpoints (the all-in-one `livemesh up`'s
//! `--metrics-listen`, or every pod of a deployment), summed.

use std::time::{Duration, Instant};

use anyhow::bail;

use super::figures::Figures;
use super::prom::{Endpoint, scrape_all};
use super::view::View;

/// How `top` runs.
#[derive(Debug, Clone)]
pub struct TopArgs {
    pub metrics: Vec<String>,
    pub interval: Duration,
    /// Stop after this many refreshes (default: until Ctrl-C).
    pub count: Option<u64>,
    pub plain: bool,
}

/// Scrapes every endpoint each interval and shows the figures between the
/// last two scrapes, until Ctrl-C or `count` refreshes.
pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let endpoints = args
        .metrics
        .iter()
        .flat_map(|list| list.split(','))
        .filter(|url| !url.trim().is_empty())
        .map(Endpoint::parse)
        .collect::<anyhow::Result<Vec<_>>>()?;
    if endpoints.is_empty() {
        bail!(
            "give the metrics endpoints to read: --metrics http://127.0.0.1:9464/metrics[,URL...]"
        );
    }
    let timeout = args.interval.max(Duration::from_millis(500));
    let (mut before, errors) = scrape_all(&endpoints, timeout).await;
    if before.answered == 0 {
        bail!("no metrics endpoint answered: {}", errors.join("; "));
    }
    let started = Instant::now();
    let mut view = View::new("livemesh top", args.plain);
    if !view.in_place() {
        println!(
            "livemesh top: {} endpoint(s), a line every {:?}",
            endpoints.len(),
            args.interval
        );
    }
    let mut shown = 0;
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let (after, errors) = scrape_all(&endpoints, timeout).await;
        let mut figures = Figures::between(&before, &after, started.elapsed().as_secs_f64());
        if let Some(error) = errors.first() {
            figures.note = format!("not answering: {error}");
        }
        view.show(&figures);
        shown += 1;
        // A scrape where nobody answered is no baseline for the next rates.
        if after.answered > 0 {
            before = after;
        }
        if args.count.is_some_and(|count| shown >= count) {
            break;
        }
    }
    view.close();
    Ok(())
}
