//! `summary.md`: the machine, one table of every headline figure with its
//! peer, the ratio, the target and the verdict, the runs, and the charts.

use std::fmt::Write as _;

use super::charts::Chart;
use super::format::{number, ratio};
use super::model::{Report, Run};
use super::spec::{On, Row, rows_for};

/// One evaluated line of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub run: String,
    pub label: &'static str,
    pub unit: &'static str,
    pub value: Option<f64>,
    pub peer: Option<&'static str>,
    pub peer_value: Option<f64>,
    pub ratio: Option<f64>,
    pub target: String,
    pub verdict: Verdict,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    /// The row has no target.
    NoTarget,
    /// A number the target needs was not measured.
    Missing,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Self::Pass => "PASS",
            Self::Fail => "**FAIL**",
            Self::NoTarget => "",
            Self::Missing => "not measured",
        }
    }
}

/// Evaluates the rows that apply to `run`.
pub fn lines(run: &Run) -> Vec<Line> {
    let finite = |v: Option<f64>| v.filter(|v| v.is_finite());
    rows_for(&run.bench, |key| run.figure(key))
        .map(|row: &Row| {
            let value = finite(run.figure(row.figure));
            let peer_value = row.peer.and_then(|(_, key)| finite(run.figure(key)));
            let ratio = match (value, peer_value) {
                (Some(v), Some(p)) if p != 0.0 => Some(v / p),
                _ => None,
            };
            let mut verdict = if row.targets.is_empty() {
                Verdict::NoTarget
            } else {
                Verdict::Pass
            };
            for target in row.targets {
                let measured = match target.on {
                    On::Value => value,
                    On::Ratio => ratio,
                };
                verdict = match (verdict, measured) {
                    (Verdict::Fail, _) => Verdict::Fail,
                    (_, Some(m)) if !target.met(m) => Verdict::Fail,
                    (_, None) => Verdict::Missing,
                    (v, Some(_)) => v,
                };
            }
            Line {
                run: run.name.clone(),
                label: row.label,
                unit: row.unit,
                value,
                peer: row.peer.map(|(name, _)| name),
                peer_value,
                ratio,
                target: row
                    .targets
                    .iter()
                    .map(|t| t.describe(row.unit))
                    .collect::<Vec<_>>()
                    .join("; "),
                verdict,
            }
        })
        .collect()
}

fn with_unit(value: Option<f64>, unit: &str) -> String {
    match value {
        None => "-".into(),
        Some(v) if unit.is_empty() || unit == "/s" => number(v),
        Some(v) => format!("{} {unit}", number(v)),
    }
}

/// The whole `summary.md`.
pub fn markdown(report: &Report, charts: &[Chart]) -> String {
    let m = &report.machine;
    let mut out = String::new();
    let load = |l: &[f64; 3]| format!("{:.2} {:.2} {:.2}", l[0], l[1], l[2]);
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# livemesh benchmarks\n");
    let _ = writeln!(
        out,
        "`{}` on {}, git `{}`, {} build.\n",
        report.command, m.date, m.git_rev, m.build
    );
    let _ = writeln!(
        out,
        "Machine: {} cores ({}), {:.1} GiB of memory, Linux {}; load average (1, 5, 15 min) \
         {} before the first bench, {} after the last. Every bench runs livemesh and its peer \
         on this machine, one after the other in the same run, and the benches' own clients \
         share the cores with them.\n",
        m.cores,
        m.cpu_model,
        m.memory_gib,
        m.kernel,
        load(&m.load_before),
        load(&m.load_after)
    );

    let _ = writeln!(
        out,
        "| bench | figure | livemesh | peer | peer's | ratio | target | result |\n\
         |---|---|--:|---|--:|--:|---|---|"
    );
    for run in &report.runs {
        for line in lines(run) {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                line.run,
                line.label,
                with_unit(line.value, line.unit),
                line.peer.unwrap_or(""),
                if line.peer.is_some() {
                    with_unit(line.peer_value, line.unit)
                } else {
                    String::new()
                },
                line.ratio.map(ratio).unwrap_or_default(),
                line.target,
                line.verdict.as_str()
            );
        }
    }

    let _ = writeln!(
        out,
        "\nRatios are livemesh's figure over the peer's: above 1 is better for throughput, \
         below 1 for latency and CPU. Each bench's full output is in `NAME.log` beside this \
         file, its figures in `NAME.json` and all of them in `report.json`.\n"
    );
    let _ = writeln!(out, "| run | command | exit | seconds |\n|---|---|---|--:|");
    for run in &report.runs {
        let exit = match (&run.error, run.exit_code) {
            (Some(error), _) => format!("**{error}**"),
            (None, Some(0)) => "0".into(),
            (None, Some(code)) => format!("**{code}**"),
            (None, None) => "**killed**".into(),
        };
        let _ = writeln!(
            out,
            "| {} | `livemesh {}` | {exit} | {:.0} |",
            run.name,
            run.args.join(" "),
            run.seconds
        );
    }

    if !charts.is_empty() {
        let _ = writeln!(out, "\n## Charts");
        let mut current = "";
        for chart in charts {
            if chart.run != current {
                current = &chart.run;
                let _ = writeln!(out, "\n### {current}\n");
            }
            let _ = writeln!(out, "![{}]({})", chart.title, chart.file);
        }
    }
    out
}
