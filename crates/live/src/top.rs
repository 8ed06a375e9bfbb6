//! `livemesh top`: the live view of any running mesh, read from its
//! services' Prometheus endpoints (the all-in-one `livemesh up`'s
//! `--metrics-listen`, or every pod of a deployment), summed.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::figures::{Figures, Window};
use crate::prom::{Endpoint, scrape_all};
use crate::view::View;

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
    let (first, errors) = scrape_all(&endpoints, timeout).await;
    if first.answered == 0 {
        bail!("no metrics endpoint answered: {}", errors.join("; "));
    }
    // Rates and percentiles over the last second at least.
    let mut window = Window::new(first, args.interval.max(Duration::from_secs(1)));
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
        let (sample, errors) = scrape_all(&endpoints, timeout).await;
        let elapsed = started.elapsed().as_secs_f64();
        // A scrape where nobody answered is no baseline for the next rates.
        let mut figures = if sample.answered > 0 {
            window.push(sample, elapsed)
        } else {
            Figures {
                elapsed,
                asked: sample.asked,
                ..Figures::default()
            }
        };
        if let Some(error) = errors.first() {
            figures.note = format!("not answering: {error}");
        }
        view.show(&figures);
        shown += 1;
        if args.count.is_some_and(|count| shown >= count) {
            break;
        }
    }
    view.close();
    Ok(())
}
