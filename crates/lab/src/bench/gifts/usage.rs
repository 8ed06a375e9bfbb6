//! What a side cost the server: MariaDB's counters and CPU time, and this
//! process's, over a window.

use crate::bench::helpers::{Side, cpu_seconds};
use sqlx::mysql::MySqlPool;
use std::collections::BTreeMap;

use super::STATUS;

/// Server counters and CPU time at one moment, or their change over a window.
#[derive(Debug)]
pub(super) struct Usage {
    pub(super) status: BTreeMap<String, f64>,
    mariadb_cpu_s: Option<f64>,
    own_cpu_s: Option<f64>,
    /// The whole machine's (busy, all) CPU ticks.
    host_ticks: Option<(f64, f64)>,
}

impl Usage {
    pub(super) async fn take(admin: &MySqlPool, mariadb_pid: Option<u32>) -> anyhow::Result<Self> {
        let rows: Vec<(String, String)> = sqlx::query_as("SHOW GLOBAL STATUS")
            .fetch_all(admin)
            .await?;
        let status = rows
            .into_iter()
            .filter(|(name, _)| STATUS.iter().any(|s| s.eq_ignore_ascii_case(name)))
            .filter_map(|(name, value)| Some((name, value.parse().ok()?)))
            .collect();
        Ok(Self {
            status,
            mariadb_cpu_s: mariadb_pid.and_then(|pid| cpu_seconds(Some(pid))),
            own_cpu_s: cpu_seconds(None),
            host_ticks: host_ticks(),
        })
    }

    pub(super) fn since(&self, earlier: &Self) -> Self {
        let status = self
            .status
            .iter()
            .map(|(k, v)| (k.clone(), v - earlier.status.get(k).copied().unwrap_or(0.0)))
            .collect();
        let diff = |a: Option<f64>, b: Option<f64>| Some(a? - b?);
        Self {
            status,
            mariadb_cpu_s: diff(self.mariadb_cpu_s, earlier.mariadb_cpu_s),
            own_cpu_s: diff(self.own_cpu_s, earlier.own_cpu_s),
            host_ticks: self
                .host_ticks
                .zip(earlier.host_ticks)
                .map(|((busy, all), (b0, a0))| (busy - b0, all - a0)),
        }
    }

    /// How busy the machine's CPUs were over a window, in percent.
    fn host_busy_pct(&self) -> Option<f64> {
        let (busy, all) = self.host_ticks?;
        (all > 0.0).then(|| busy * 100.0 / all)
    }

    /// Microseconds of CPU per gift over a window: (mariadbd, this
    /// process); NaN where unknown.
    pub(super) fn cpu_us_per_gift(&self, gifts: u64) -> (f64, f64) {
        let per = |s: Option<f64>| s.map_or(f64::NAN, |s| s * 1e6 / gifts.max(1) as f64);
        (per(self.mariadb_cpu_s), per(self.own_cpu_s))
    }

    /// A counter's change per gift.
    pub(super) fn per(&self, name: &str, gifts: u64) -> f64 {
        self.status.get(name).copied().unwrap_or(0.0) / gifts.max(1) as f64
    }
}

pub(super) fn print_side(name: &str, side: &Side, gifts: u64, usage: &Usage) {
    let cpu = match (usage.mariadb_cpu_s, usage.own_cpu_s) {
        (Some(db), Some(own)) => format!(
            "{:.0}+{:.0}",
            db * 1e6 / gifts.max(1) as f64,
            own * 1e6 / gifts.max(1) as f64
        ),
        _ => "-".into(),
    };
    println!(
        "  {name:<44} {:>9.0} {:>8.2} {:>8.2} {:>10.1} {:>11.0} {:>12.0} {:>12.1} {:>10}",
        side.per_sec,
        side.p50_ms,
        side.p99_ms,
        usage.per("Questions", gifts),
        usage
            .status
            .get("Innodb_row_lock_waits")
            .copied()
            .unwrap_or(0.0),
        usage
            .status
            .get("Innodb_row_lock_time")
            .copied()
            .unwrap_or(0.0),
        usage.per("Innodb_data_fsyncs", gifts) * 1e3,
        cpu
    );
    let commits = usage.status.get("Binlog_commits").copied().unwrap_or(0.0);
    let groups = usage
        .status
        .get("Binlog_group_commits")
        .copied()
        .unwrap_or(0.0);
    println!(
        "  {:<44} {:.2} gifts per commit, {commits:.0} binlog commits in {groups:.0} groups, \
         {:.1} log fsyncs per 1k gifts, machine CPU {} busy",
        "",
        gifts as f64 / commits.max(1.0),
        usage.per("Innodb_os_log_fsyncs", gifts) * 1e3,
        usage
            .host_busy_pct()
            .map_or_else(|| "-".to_owned(), |p| format!("{p:.0}%"))
    );
}

/// The machine's busy and total CPU ticks so far (`/proc/stat`).
fn host_ticks() -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks: Vec<f64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is in user).
    let all: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4)?;
    Some((all - idle, all))
}
