//! What the report says of the machine: read from /proc and git, with
//! "unknown" where something cannot be read (a report is still written).

pub use super::model::Machine;

impl Machine {
    /// The machine now; `load_after` is the load now too until the runs end.
    pub fn now() -> Self {
        let load = load_average();
        Self {
            cores: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model: cpu_model().unwrap_or_else(|| "unknown CPU".into()),
            memory_gib: memory_gib().unwrap_or(f64::NAN),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|k| k.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
            load_before: load,
            load_after: load,
            git_rev: git_rev().unwrap_or_else(|| "unknown".into()),
            date: now_rfc3339(),
            build: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            }
            .into(),
        }
    }
}

/// The 1, 5 and 15-minute load averages (NaN where unknown).
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut fields = text
        .split_whitespace()
        .map(|f| f.parse().unwrap_or(f64::NAN));
    [(); 3].map(|()| fields.next().unwrap_or(f64::NAN))
}

fn cpu_model() -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, model)| model.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn memory_gib() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0 / 1024.0)
}

/// `git describe --always --dirty` in the current directory (the
/// repository's root under `scripts/bench`).
fn git_rev() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()?;
    let rev = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !rev.is_empty()).then_some(rev)
}

fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".into())
}

/// The machine's busy share of CPU time (0 to 1) over `window`, from
/// `/proc/stat`; `None` where it cannot be read.
pub async fn busy_share(window: std::time::Duration) -> Option<f64> {
    fn ticks() -> Option<(u64, u64)> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal ...: idle and iowait are idle.
        let idle = fields.get(3)? + fields.get(4).copied().unwrap_or(0);
        Some((fields.iter().sum(), idle))
    }
    let (total_before, idle_before) = ticks()?;
    tokio::time::sleep(window).await;
    let (total_after, idle_after) = ticks()?;
    let total = total_after.saturating_sub(total_before);
    let idle = idle_after.saturating_sub(idle_before);
    (total > 0).then(|| 1.0 - idle as f64 / total as f64)
}

/// Waits until the machine is quiet (under `QUIET` busy over one second)
/// before the next bench, at most `MAX_WAIT`: what one bench leaves behind
/// (MariaDB flushing and purging after the rooms or gifts bench, a server
/// still closing connections) would otherwise be charged to the next one
/// (the loves bench ran about 25% slower right after the rooms bench than
/// on its own). Returns the seconds waited and the last busy share.
pub async fn settle() -> (f64, Option<f64>) {
    const QUIET: f64 = 0.10;
    const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
    let started = std::time::Instant::now();
    let mut busy = None;
    while started.elapsed() < MAX_WAIT {
        busy = busy_share(std::time::Duration::from_secs(1)).await;
        if busy.is_none_or(|b| b < QUIET) {
            break;
        }
    }
    (started.elapsed().as_secs_f64(), busy)
}
