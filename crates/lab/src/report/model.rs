//! The JSON a bench writes (`--json FILE`) and the report `bench all`
//! assembles from them: one schema, read and written here.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The quantiles a latency distribution is given at: the body, then the
/// tail (plotted on a scale of 1 / (1 - q), where each nine is one step).
pub const QUANTILES: [f64; 8] = [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999];

/// One bench's `--json` file: `{"bench": NAME, "figures": {KEY: number},
/// "distributions": [...]}`. A figure that could not be measured (NaN) is
/// written as `null`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchFile {
    pub bench: String,
    pub figures: BTreeMap<String, Option<f64>>,
    /// Latency distributions, livemesh's series and the peer's together;
    /// absent in files written before they were added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub distributions: Vec<Distribution>,
}

impl BenchFile {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }
}

/// What one kind of call took, on each side of a bench.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Distribution {
    /// What was timed, e.g. "GetRoom, 1 caller".
    pub title: String,
    /// The quantiles every series is given at ([`QUANTILES`] when written
    /// by this version).
    pub quantiles: Vec<f64>,
    pub series: Vec<Series>,
}

/// One side's latencies at the distribution's quantiles, in milliseconds
/// (`null` where nothing was recorded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Series {
    pub label: String,
    /// The peer's side (drawn dashed), not livemesh's.
    pub peer: bool,
    pub ms: Vec<Option<f64>>,
}

impl Distribution {
    /// An empty distribution at [`QUANTILES`].
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            quantiles: QUANTILES.to_vec(),
            series: Vec::new(),
        }
    }

    /// Adds a series given at [`QUANTILES`]; NaN (nothing recorded) becomes `None`.
    pub fn with(
        mut self,
        label: impl Into<String>,
        peer: bool,
        ms: [f64; QUANTILES.len()],
    ) -> Self {
        self.series.push(Series {
            label: label.into(),
            peer,
            ms: ms.iter().map(|v| v.is_finite().then_some(*v)).collect(),
        });
        self
    }
}

/// `report.json`: where and when, and every bench's run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// How the run was asked for, e.g. `scripts/bench all --duration 10`.
    pub command: String,
    pub machine: Machine,
    /// `--duration` as asked; a run's own is in its command.
    pub duration_s: u64,
    pub runs: Vec<Run>,
}

/// The machine a report came from, and its state around the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    /// 1, 5 and 15-minute load averages before the first bench and after the last.
    pub load_before: [f64; 3],
    pub load_after: [f64; 3],
    /// `git describe --always --dirty` of the working tree, or "unknown".
    pub git_rev: String,
    /// When the run started, RFC 3339 UTC.
    pub date: String,
    /// "release" or "debug": how the benches were built.
    pub build: String,
}

/// One bench's run in a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// The run's name (`gifts-durable` is the `gifts` bench with `--durable`).
    pub name: String,
    /// The bench it ran (its JSON's `bench`).
    pub bench: String,
    /// The command line's arguments after the binary.
    pub args: Vec<String>,
    /// Exit code (`None`: killed by a signal, or never started).
    pub exit_code: Option<i32>,
    pub seconds: f64,
    pub figures: BTreeMap<String, Option<f64>>,
    #[serde(default)]
    pub distributions: Vec<Distribution>,
    /// Why the run has no figures or failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Run {
    /// A figure, when measured.
    pub fn figure(&self, key: &str) -> Option<f64> {
        self.figures.get(key).copied().flatten()
    }

    pub fn ok(&self) -> bool {
        self.exit_code == Some(0) && self.error.is_none()
    }
}
