//! What the benches share: the closed-loop driver ([`measure`]), latency
//! percentiles ([`Latencies`], an HDR histogram), readings from /proc, the
//! wall clock that published events carry, StartRoom's answer, and the JSON
//! figures file (its schema is `crate::report::model`'s `BenchFile`).

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, ensure};
use hdrhistogram::Histogram;
use livemesh_proto::v1::{Room, StartRoomResponse};

use crate::report::model::{Distribution, QUANTILES};

/// `--json FILE`, which every bench takes.
#[derive(Debug, clap::Args)]
pub struct FiguresFile {
    /// Write the figures as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

/// Calls per second and latency percentiles of one side of a bench.
#[derive(Debug)]
pub(crate) struct Side {
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Every call's latency (for the distribution in the JSON).
    pub latencies: Latencies,
}

/// Latencies to the microsecond in an HDR histogram with five significant
/// digits: exact below 262 ms (2^18 µs), within 0.001% above. A quantile is
/// the nearest rank: `q` of n latencies is the ceil(q·n)-th smallest.
#[derive(Debug, Clone)]
pub(crate) struct Latencies(Histogram<u64>);

impl Latencies {
    pub(crate) fn new() -> Self {
        // Five significant digits is the most hdrhistogram supports, so this
        // cannot fail; the histogram grows to the largest value recorded.
        #[allow(clippy::expect_used)]
        Self(Histogram::new(5).expect("5 significant digits are supported"))
    }

    pub(crate) fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.0.saturating_record(micros);
    }

    /// How many latencies were recorded.
    pub(crate) fn len(&self) -> u64 {
        self.0.len()
    }

    pub(crate) fn reset(&mut self) {
        self.0.reset();
    }

    /// The `q` quantile in milliseconds; NaN when nothing was recorded.
    pub(crate) fn quantile_ms(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        self.0.value_at_quantile(q) as f64 / 1e3
    }

    /// The latencies at [`QUANTILES`] in milliseconds (NaN when empty).
    pub(crate) fn percentiles(&self) -> [f64; QUANTILES.len()] {
        QUANTILES.map(|q| self.quantile_ms(q))
    }
}

impl FromIterator<Duration> for Latencies {
    fn from_iter<I: IntoIterator<Item = Duration>>(latencies: I) -> Self {
        let mut all = Self::new();
        for latency in latencies {
            all.record(latency);
        }
        all
    }
}

/// Runs `call` from `concurrency` tasks for `duration`.
pub(crate) async fn measure<F, Fut>(
    concurrency: usize,
    duration: Duration,
    call: F,
) -> anyhow::Result<Side>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let call = Arc::new(call);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let call = call.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut seed = task as u64 * 7_919 + 1;
            while Instant::now() < deadline {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let t = Instant::now();
                call(seed >> 33).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = Latencies::new();
    while let Some(joined) = tasks.join_next().await {
        joined??.into_iter().for_each(|latency| all.record(latency));
    }
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(all.len() > 0, "no call completed");
    Ok(Side {
        per_sec: all.len() as f64 / elapsed,
        p50_ms: all.quantile_ms(0.50),
        p99_ms: all.quantile_ms(0.99),
        latencies: all,
    })
}

/// The room a StartRoom call started.
pub(crate) fn started_room(
    reply: Result<tonic::Response<StartRoomResponse>, tonic::Status>,
) -> anyhow::Result<Room> {
    reply
        .map_err(|s| anyhow::anyhow!("StartRoom: {s}"))?
        .into_inner()
        .room
        .context("StartRoom returned no room")
}

/// Writes `{"bench": NAME, "figures": {...}, "distributions": [...]}` to
/// `path` (NaN figures as `null`; no `distributions` key when there are none).
pub(crate) fn write_json(
    path: &Path,
    bench: &str,
    figures: &BTreeMap<&str, f64>,
    distributions: &[Distribution],
) -> anyhow::Result<()> {
    let mut body = serde_json::json!({ "bench": bench, "figures": figures });
    if !distributions.is_empty() {
        body["distributions"] = serde_json::to_value(distributions)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(&body)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("  figures written to {}", path.display());
    Ok(())
}

/// CPU seconds a process has used so far (user + system); this process
/// when `pid` is `None`.
pub(crate) fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    stat_seconds(pid, 11)
}

/// CPU seconds used so far by this process and `others` together; `None`
/// when one of them cannot be read.
pub(crate) fn cpu_total(others: &[u32]) -> Option<f64> {
    others.iter().try_fold(cpu_seconds(None)?, |sum, pid| {
        Some(sum + cpu_seconds(Some(*pid))?)
    })
}

/// The pid of the harness's MariaDB (`LIVEMESH_TEST_MYSQL_PID`, set by
/// `scripts/bench`), to read its CPU time.
pub(crate) fn mariadb_pid() -> Option<u32> {
    std::env::var("LIVEMESH_TEST_MYSQL_PID").ok()?.parse().ok()
}

/// CPU seconds (user + system) of this process's children that have
/// exited and been waited for (e.g. a `redis-benchmark` run).
pub(crate) fn children_cpu_seconds() -> Option<f64> {
    stat_seconds(None, 13)
}

/// Two consecutive tick fields of `/proc/PID/stat`, counted from the
/// field after the command name, summed, in seconds.
fn stat_seconds(pid: Option<u32>, first: usize) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".into(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // After the command name: utime and stime are fields 14 and 15,
    // cutime and cstime 16 and 17 (11-14 here).
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks =
        fields.get(first)?.parse::<u64>().ok()? + fields.get(first + 1)?.parse::<u64>().ok()?;
    // USER_HZ, 100 on Linux.
    Some(ticks as f64 / 100.0)
}

/// Microseconds of CPU per operation between two readings (NaN when
/// either is missing or nothing was done).
pub(crate) fn cpu_us_per(before: Option<f64>, after: Option<f64>, operations: f64) -> f64 {
    match (before, after) {
        (Some(before), Some(after)) if operations > 0.0 => (after - before) * 1e6 / operations,
        _ => f64::NAN,
    }
}

/// The machine's 1-minute load average (NaN if unknown).
pub(crate) fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Nanoseconds since the Unix epoch: the send time events carry, so that a
/// receiver (in this process) can tell how long it took.
pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_are_nearest_rank_and_nan_when_empty() {
        let all: Latencies = (1..=100).map(Duration::from_millis).collect();
        assert!((all.quantile_ms(0.5) - 50.0).abs() < 1e-9);
        assert!((all.quantile_ms(0.99) - 99.0).abs() < 1e-9);
        assert!((all.quantile_ms(1.0) - 100.0).abs() < 1e-9);
        assert!(Latencies::new().quantile_ms(0.5).is_nan());
    }
}
