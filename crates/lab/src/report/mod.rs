//! `livemesh bench all` (through `scripts/bench all`): every bench in turn,
//! each as its own child process (`livemesh bench NAME --duration S --json
//! DIR/NAME.json`, its output shown and kept in `DIR/NAME.log`), then one
//! report in `DIR`: `report.json` (the machine, each run's command, exit
//! status, figures and latency distributions), `summary.md` (every headline
//! figure with its peer, the ratio, the target and PASS/FAIL, see
//! [`spec`]) and the PNG charts ([`charts`]).
//!
//! A bench that fails leaves its run in the report with its exit status
//! (and whatever figures it wrote); the others still run, and the command
//! fails at the end. A target not met does not fail the command: the
//! summary says so.

mod charts;
mod format;
mod machine;
pub mod model;
mod spec;
mod summary;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context as _, bail, ensure};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};

use self::model::{BenchFile, Report, Run};

/// Options of `bench all`.
#[derive(Debug, clap::Args)]
pub struct AllArgs {
    /// Seconds each bench runs (its `--duration`), raised to what a bench
    /// needs at least where it needs more (rooms 3, loves 4, fanout 4,
    /// breaker 3, rpc 5).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Where the report goes: report.json, summary.md, the charts, and
    /// each run's JSON and output.
    #[arg(long, value_name = "DIR", default_value = "target/bench-report")]
    pub out: PathBuf,
    /// The runs to make, comma-separated (rooms, loves, fanout, gifts,
    /// gifts-durable, breaker, rpc). Default: all of them, in that order.
    #[arg(long, value_name = "RUN", value_delimiter = ',')]
    pub only: Vec<String>,
    /// `--streams` of the fanout bench. Default: the bench's own.
    #[arg(long, value_name = "N")]
    pub fanout_streams: Option<u64>,
    /// Run nothing: draw summary.md and the charts again from
    /// DIR/report.json.
    #[arg(long)]
    pub render_only: bool,
}

/// One run of `bench all`.
#[derive(Debug, Clone, Copy)]
struct Planned {
    name: &'static str,
    bench: &'static str,
    extra: &'static [&'static str],
    /// The least `--duration` the bench accepts (its own checks say so too).
    min_duration: u64,
}

const PLAN: [Planned; 7] = [
    Planned {
        name: "rooms",
        bench: "rooms",
        extra: &[],
        min_duration: 3,
    },
    Planned {
        name: "loves",
        bench: "loves",
        extra: &[],
        min_duration: 4,
    },
    Planned {
        name: "fanout",
        bench: "fanout",
        extra: &[],
        min_duration: 4,
    },
    Planned {
        name: "gifts",
        bench: "gifts",
        extra: &[],
        min_duration: 2,
    },
    Planned {
        name: "gifts-durable",
        bench: "gifts",
        extra: &["--durable"],
        min_duration: 2,
    },
    // Its default warm-up is 2 s of each phase.
    Planned {
        name: "breaker",
        bench: "breaker",
        extra: &[],
        min_duration: 3,
    },
    Planned {
        name: "rpc",
        bench: "rpc",
        extra: &[],
        min_duration: 5,
    },
];

impl AllArgs {
    /// The command line, as `scripts/bench` takes it.
    fn command(&self) -> String {
        let mut command = format!("scripts/bench all --duration {}", self.duration);
        if !self.only.is_empty() {
            command += &format!(" --only {}", self.only.join(","));
        }
        if let Some(streams) = self.fanout_streams {
            command += &format!(" --fanout-streams {streams}");
        }
        command
    }

    fn plan(&self) -> anyhow::Result<Vec<Planned>> {
        for name in &self.only {
            ensure!(
                PLAN.iter().any(|p| p.name == name),
                "--only: no run named {name:?}; the runs are {}",
                PLAN.map(|p| p.name).join(", ")
            );
        }
        Ok(PLAN
            .into_iter()
            .filter(|p| self.only.is_empty() || self.only.iter().any(|n| n == p.name))
            .collect())
    }

    /// The arguments of `livemesh` for one run.
    fn args(&self, planned: &Planned, json: &Path) -> Vec<String> {
        let mut args = vec!["bench".to_owned(), planned.bench.to_owned()];
        args.extend(planned.extra.iter().map(|a| (*a).to_owned()));
        args.push("--duration".into());
        args.push(self.duration.max(planned.min_duration).to_string());
        if planned.bench == "fanout"
            && let Some(streams) = self.fanout_streams
        {
            args.push("--streams".into());
            args.push(streams.to_string());
        }
        args.push("--json".into());
        args.push(json.display().to_string());
        args
    }
}

pub async fn run(args: AllArgs) -> anyhow::Result<()> {
    let dir = &args.out;
    if args.render_only {
        let path = dir.join("report.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let report: Report =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        return write_report(&report, dir);
    }
    let plan = args.plan()?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let exe = std::env::current_exe().context("finding the livemesh binary")?;
    let mut machine = machine::Machine::now();
    println!(
        "bench all: {} runs ({}) into {}; {} cores, load {:.2} {:.2} {:.2}",
        plan.len(),
        plan.iter().map(|p| p.name).collect::<Vec<_>>().join(", "),
        dir.display(),
        machine.cores,
        machine.load_before[0],
        machine.load_before[1],
        machine.load_before[2]
    );
    let mut runs = Vec::new();
    for planned in &plan {
        runs.push(run_one(&exe, &args, planned, dir).await);
    }
    machine.load_after = machine::load_average();
    let report = Report {
        command: args.command(),
        machine,
        duration_s: args.duration,
        runs,
    };
    let path = dir.join("report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)
        .with_context(|| format!("writing {}", path.display()))?;
    write_report(&report, dir)?;
    let failed: Vec<&str> = report
        .runs
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} runs failed ({}): see their logs in {}",
            failed.len(),
            report.runs.len(),
            failed.join(", "),
            dir.display()
        );
    }
    Ok(())
}

/// summary.md and the charts, from a report; prints the summary's table.
fn write_report(report: &Report, dir: &Path) -> anyhow::Result<()> {
    let runs = PLAN.map(|p| p.name);
    let charts = charts::render(report, dir, &runs)?;
    let text = summary::markdown(report, &charts);
    let path = dir.join("summary.md");
    std::fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
    println!("\nbench all: summary\n");
    for line in text.lines().filter(|l| l.starts_with("| ")) {
        println!("{line}");
    }
    println!(
        "\nbench all: {} and {} charts written to {}",
        path.display(),
        charts.len(),
        dir.display()
    );
    Ok(())
}

/// Runs one bench as a child process, its output shown and kept in
/// `NAME.log`; its figures from `NAME.json`.
async fn run_one(exe: &Path, args: &AllArgs, planned: &Planned, dir: &Path) -> Run {
    let json = dir.join(format!("{}.json", planned.name));
    let log = dir.join(format!("{}.log", planned.name));
    let argv = args.args(planned, &json);
    let (waited, busy) = machine::settle().await;
    println!(
        "\nbench all: machine settled in {waited:.0} s (busy {}); livemesh {}",
        busy.map_or_else(|| "unknown".to_owned(), |b| format!("{:.0}%", b * 100.0)),
        argv.join(" ")
    );
    let started = Instant::now();
    // A file from an earlier run must not pass for this one's.
    let _ = std::fs::remove_file(&json);
    let exit = spawn_logged(exe, &argv, &log).await;
    let seconds = started.elapsed().as_secs_f64();
    let mut run = Run {
        name: planned.name.to_owned(),
        bench: planned.bench.to_owned(),
        args: argv,
        exit_code: None,
        seconds,
        figures: Default::default(),
        distributions: Vec::new(),
        error: None,
    };
    match exit {
        Ok(code) => run.exit_code = code,
        Err(err) => run.error = Some(format!("{err:#}")),
    }
    if json.exists() {
        match BenchFile::read(&json) {
            Ok(file) if file.bench == planned.bench => {
                run.figures = file.figures;
                run.distributions = file.distributions;
            }
            Ok(file) => {
                run.error = Some(format!(
                    "{} holds the figures of bench {:?}",
                    json.display(),
                    file.bench
                ))
            }
            Err(err) => run.error = Some(format!("{err:#}")),
        }
    } else if run.error.is_none() && run.exit_code == Some(0) {
        run.error = Some(format!("it wrote no {}", json.display()));
    }
    println!(
        "bench all: {} {} in {seconds:.0} s",
        planned.name,
        if run.ok() { "done" } else { "FAILED" }
    );
    run
}

/// Runs `exe argv`, copying its standard output to ours and to `log`; its
/// exit code (`None` when a signal ended it).
async fn spawn_logged(exe: &Path, argv: &[String], log: &Path) -> anyhow::Result<Option<i32>> {
    let mut file = tokio::fs::File::create(log)
        .await
        .with_context(|| format!("creating {}", log.display()))?;
    let mut child = tokio::process::Command::new(exe)
        .args(argv)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))?;
    let stdout = child.stdout.take().context("the child's stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    while let Some(line) = lines.next_line().await? {
        println!("{line}");
        file.write_all(line.as_bytes()).await?;
        file.write_all(b"\n").await?;
    }
    file.flush().await?;
    let status = child.wait().await?;
    Ok(status.code())
}
