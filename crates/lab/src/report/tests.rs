//! The report from sample bench files: the table's figures, ratios and
//! verdicts, the markdown, and charts that are real PNG files. Nothing
//! here runs a bench.

use std::collections::BTreeMap;
use std::path::Path;

use super::model::{BenchFile, Distribution, Machine, Report, Run};
use super::summary::{Verdict, lines, markdown};
use super::{AllArgs, charts};

const RPC: &str = r#"{
  "bench": "rpc",
  "figures": {
    "calls_per_s": 45000.0, "bare_calls_per_s": 50000.0,
    "enforce_calls_per_s": 40000.0,
    "p99_ms": 0.21, "bare_p99_ms": 0.15,
    "cpu_us_per_call": 33.0, "bare_cpu_us_per_call": 27.5,
    "enforce_cpu_us_per_call": null
  },
  "distributions": [{
    "title": "GetRoom, 1 caller",
    "quantiles": [0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9999],
    "series": [
      {"label": "mesh stacks (auth dev)", "peer": false,
       "ms": [0.08, 0.09, 0.1, 0.12, 0.21, 0.25, 0.4, 1.2]},
      {"label": "bare tonic", "peer": true,
       "ms": [0.06, 0.07, 0.08, 0.09, 0.15, 0.18, 0.3, null]}
    ]
  }]
}"#;

const GIFTS_DURABLE: &str = r#"{
  "bench": "gifts",
  "figures": {
    "gifts_per_s": 6600.0, "baseline_gifts_per_s": 1500.0,
    "gift_p99_ms": 18.0, "baseline_p99_ms": 60.0,
    "reconcile_difference": 0.0, "durable": 1.0
  }
}"#;

fn machine() -> Machine {
    Machine {
        cores: 2,
        cpu_model: "Test CPU @ 2.0GHz".into(),
        memory_gib: 24.0,
        kernel: "6.1.0".into(),
        load_before: [0.1, 0.2, 0.3],
        load_after: [1.5, 0.9, 0.4],
        git_rev: "abc1234".into(),
        date: "2026-12-06T14:00:00Z".into(),
        build: "release".into(),
    }
}

fn run_of(name: &str, json: &str) -> Run {
    let file: BenchFile = serde_json::from_str(json).expect("sample JSON parses");
    Run {
        name: name.into(),
        bench: file.bench,
        args: vec![
            "bench".into(),
            name.into(),
            "--duration".into(),
            "10".into(),
        ],
        exit_code: Some(0),
        seconds: 12.0,
        figures: file.figures,
        distributions: file.distributions,
        error: None,
    }
}

fn sample() -> Report {
    Report {
        command: "scripts/bench all --duration 10".into(),
        machine: machine(),
        duration_s: 10,
        runs: vec![run_of("rpc", RPC), run_of("gifts-durable", GIFTS_DURABLE)],
    }
}

#[test]
fn each_line_has_its_peer_ratio_and_verdict() {
    let report = sample();
    let rpc = lines(&report.runs[0]);
    let calls = rpc
        .iter()
        .find(|l| l.label.starts_with("calls/s through"))
        .expect("the rpc throughput line");
    assert_eq!(calls.value, Some(45_000.0));
    assert_eq!(calls.peer, Some("bare tonic"));
    assert_eq!(calls.peer_value, Some(50_000.0));
    assert!((calls.ratio.expect("a ratio") - 0.9).abs() < 1e-12);
    assert_eq!(calls.target, "ratio ≥ 0.85");
    assert_eq!(calls.verdict, Verdict::Pass);

    let p99 = rpc
        .iter()
        .find(|l| l.label == "p99, 1 caller")
        .expect("p99");
    assert_eq!(p99.verdict, Verdict::NoTarget);
    // A figure written as null (NaN) is not measured, and has no ratio.
    let enforce_cpu = rpc
        .iter()
        .find(|l| l.label == "CPU per call, auth enforced")
        .expect("enforce CPU");
    assert_eq!((enforce_cpu.value, enforce_cpu.ratio), (None, None));

    // The durable run is held to the durable target (≥ 5), not the other.
    let gifts = lines(&report.runs[1]);
    let throughput: Vec<_> = gifts
        .iter()
        .filter(|l| l.label.starts_with("gifts committed"))
        .collect();
    assert_eq!(throughput.len(), 1, "{throughput:?}");
    assert_eq!(throughput[0].target, "ratio ≥ 5");
    assert_eq!(throughput[0].verdict, Verdict::Fail, "4.4x < 5");
    let reconcile = gifts
        .iter()
        .find(|l| l.label == "reconcile difference")
        .expect("reconcile");
    assert_eq!(reconcile.verdict, Verdict::Pass);
    // A target whose figure the run did not write.
    let settle = gifts
        .iter()
        .find(|l| l.label == "CPU per gift (MariaDB + process)")
        .expect("cpu");
    assert_eq!(settle.value, None);
}

#[test]
fn a_target_without_its_figure_is_not_measured_and_one_failure_fails_the_line() {
    let mut report = sample();
    report.runs[0].figures.remove("calls_per_s");
    let calls = lines(&report.runs[0])
        .into_iter()
        .find(|l| l.label.starts_with("calls/s through"))
        .expect("line");
    assert_eq!(calls.verdict, Verdict::Missing);

    // fanout's CPU line has two targets: the value and the ratio.
    let mut figures = BTreeMap::new();
    figures.insert("server_cpu_us_per_delivery".to_owned(), Some(0.9));
    figures.insert("nats_server_cpu_us_per_delivery".to_owned(), Some(0.2));
    let fanout = Run {
        name: "fanout".into(),
        bench: "fanout".into(),
        figures,
        ..report.runs[0].clone()
    };
    let cpu = lines(&fanout)
        .into_iter()
        .find(|l| l.label == "server CPU per delivery, hot room")
        .expect("line");
    assert_eq!(cpu.target, "≤ 1 µs; ratio ≤ 4");
    assert_eq!(cpu.verdict, Verdict::Fail, "4.5x > 4 though 0.9 µs ≤ 1");
}

#[test]
fn the_summary_names_the_machine_and_has_a_row_per_figure() {
    let report = sample();
    let charts = vec![charts::Chart {
        run: "rpc".into(),
        file: "rpc-throughput.png".into(),
        title: "rpc: throughput against the peer".into(),
    }];
    let text = markdown(&report, &charts);
    assert!(text.contains("`scripts/bench all --duration 10` on 2026-12-06T14:00:00Z, git `abc1234`, release build"), "{text}");
    assert!(
        text.contains("2 cores (Test CPU @ 2.0GHz), 24.0 GiB"),
        "{text}"
    );
    assert!(text.contains("0.10 0.20 0.30 before"), "{text}");
    assert!(
        text.contains(
            "| rpc | calls/s through the mesh's stacks, 64 callers | 45,000 | bare tonic | 50,000 | 0.90x | ratio ≥ 0.85 | PASS |"
        ),
        "{text}"
    );
    assert!(
        text.contains("| gifts-durable | gifts committed/s, durable commits | 6,600 | naive hot-row gift | 1,500 | 4.40x | ratio ≥ 5 | **FAIL** |"),
        "{text}"
    );
    assert!(text.contains("| gifts-durable | SendGift p99 | 18.0 ms | naive hot-row gift | 60.0 ms | 0.30x | ≤ 50 ms | PASS |"), "{text}");
    assert!(
        text.contains("| rpc | `livemesh bench rpc --duration 10` | 0 | 12 |"),
        "{text}"
    );
    assert!(
        text.contains("### rpc\n\n![rpc: throughput against the peer](rpc-throughput.png)"),
        "{text}"
    );
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.len() > 2_000,
        "{} is only {} bytes",
        path.display(),
        bytes.len()
    );
    assert_eq!(
        &bytes[..8],
        b"\x89PNG\r\n\x1a\n",
        "{} is not a PNG",
        path.display()
    );
}

#[test]
fn charts_render_to_png_files() {
    let dir = tempfile::tempdir().expect("temp dir");
    let report = sample();
    // A chart of an earlier report goes; other files stay.
    std::fs::write(dir.path().join("rooms-latency-3.png"), b"old").expect("written");
    std::fs::write(dir.path().join("notes.png"), b"mine").expect("written");
    let charts = charts::render(&report, dir.path(), &["rooms", "rpc", "gifts-durable"])
        .expect("charts render");
    assert!(!dir.path().join("rooms-latency-3.png").exists());
    assert!(dir.path().join("notes.png").exists());
    let files: Vec<&str> = charts.iter().map(|c| c.file.as_str()).collect();
    assert_eq!(
        files,
        [
            "rpc-throughput.png",
            "rpc-cpu.png",
            "rpc-latency-1.png",
            "gifts-durable-throughput.png"
        ]
    );
    for chart in &charts {
        assert_png(&dir.path().join(&chart.file));
    }
}

#[test]
fn a_distribution_without_any_latency_draws_no_chart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut report = sample();
    report.runs.truncate(1);
    report.runs[0].distributions =
        vec![Distribution::new("nothing").with("livemesh", false, [f64::NAN; 8])];
    let charts = charts::render(&report, dir.path(), &["rpc"]).expect("charts render");
    assert!(
        charts.iter().all(|c| !c.file.contains("latency")),
        "{charts:?}"
    );
}

#[test]
fn a_bench_file_written_by_the_benches_reads_back() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("x.json");
    let figures = BTreeMap::from([("a_per_s", 12.5), ("unmeasured", f64::NAN)]);
    let distributions = [Distribution::new("t").with("ours", false, [1.0; 8])];
    crate::bench::helpers::write_json(&path, "x", &figures, &distributions).expect("written");
    let file = BenchFile::read(&path).expect("read back");
    assert_eq!(file.bench, "x");
    assert_eq!(file.figures["a_per_s"], Some(12.5));
    assert_eq!(file.figures["unmeasured"], None);
    assert_eq!(file.distributions.as_slice(), &distributions);
    // Files without distributions (before they were added) still read.
    std::fs::write(&path, r#"{"bench": "y", "figures": {"f": 1.0}}"#).expect("written");
    assert!(
        BenchFile::read(&path)
            .expect("read")
            .distributions
            .is_empty()
    );
}

#[test]
fn bench_all_runs_every_bench_at_least_as_long_as_it_needs() {
    let args = AllArgs {
        duration: 1,
        out: "out".into(),
        only: vec!["gifts-durable".into(), "rpc".into()],
        fanout_streams: None,
        render_only: false,
    };
    let plan = args.plan().expect("known runs");
    let argv: Vec<String> = plan
        .iter()
        .map(|p| args.args(p, Path::new("out/x.json")).join(" "))
        .collect();
    assert_eq!(
        argv,
        [
            "bench gifts --durable --duration 2 --json out/x.json",
            "bench rpc --duration 5 --json out/x.json"
        ]
    );
    let unknown = AllArgs {
        only: vec!["nope".into()],
        ..args
    };
    let err = unknown.plan().expect_err("an unknown run");
    assert!(err.to_string().contains("no run named \"nope\""), "{err}");
}
