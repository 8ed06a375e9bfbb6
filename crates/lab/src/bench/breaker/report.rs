//! The report: the table, the targets and the JSON figures.

use crate::bench::helpers::write_json;
use crate::report::model::Distribution;
use std::collections::BTreeMap;

use super::PHASES;
use super::open::OpenReject;
use super::phase::{Bench, PhaseResult};

fn pass(ok: bool) -> &'static str {
    if ok { "PASS" } else { "FAIL" }
}

/// Prints the table and targets, writes the JSON; the number of lost
/// deliveries and failed publishes.
pub(super) fn report(
    bench: &Bench,
    healthy: &PhaseResult,
    degraded: &PhaseResult,
    reject: &OpenReject,
    load: (f64, f64),
) -> anyhow::Result<u64> {
    let args = &bench.args;
    println!(
        "  machine load average (1 min) before {:.1}, after {:.1}, on {} cores; every server and \
         every viewer share them with this process",
        load.0,
        load.1,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "  (a) = publish->receive at the viewers of nodes 1-3; (b) = the Publish RPC at the \
         publisher; percentiles in ms, warm-up excluded"
    );
    println!(
        "  {:<9} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>6} {:>8} {:>9}",
        "phase",
        "pub ok",
        "errors",
        "(a)p50",
        "(a)p99",
        "(a)max",
        "(b)p50",
        "(b)p99",
        "(b)max",
        "slow",
        "missing",
        "dlv fail"
    );
    for (name, r) in PHASES.iter().zip([healthy, degraded]) {
        println!(
            "  {:<9} {:>6} {:>6} {:>7.2} {:>7.2} {:>7.1} {:>7.2} {:>7.2} {:>7.1} {:>6} {:>8} {:>9}",
            name,
            r.ok,
            r.errors,
            r.receive.p50,
            r.receive.p99,
            r.receive.max,
            r.rpc.p50,
            r.rpc.p99,
            r.rpc.max,
            r.slow,
            r.missing,
            r.deliver_failures,
        );
    }
    println!(
        "  warm-up (first {} s of each phase, excluded above; \"slow\" = a Publish over half the \
         {} ms Deliver timeout):",
        args.warmup,
        bench.deliver_timeout.as_millis()
    );
    for (name, r) in PHASES.iter().zip([healthy, degraded]) {
        println!(
            "  {:<9} {} comments; (a) p99 {:.1} max {:.1} ms; (b) p99 {:.1} max {:.1} ms; {} slow; \
             publishes stopped waiting for a dead node {}",
            name,
            r.rpc_warm.count,
            r.receive_warm.p99,
            r.receive_warm.max,
            r.rpc_warm.p99,
            r.rpc_warm.max,
            r.slow_warm,
            r.settled_after.map_or(
                "never (no run of 50 fast publishes)".to_owned(),
                |s| format!("{s:.2} s into the phase")
            ),
        );
        println!(
            "  {:<9} the dispatcher's breaker for node 4: {}",
            "",
            match r.node4.first_open {
                Some(first) => format!(
                    "first open {first:.2} s into the phase, opened {} times, not closed {:.0}% of the phase",
                    r.node4.openings,
                    r.node4.not_closed * 100.0
                ),
                None => "never open".to_owned(),
            }
        );
    }
    for (name, r) in PHASES.iter().zip([healthy, degraded]) {
        if let Some(error) = &r.first_error {
            println!(
                "  {name}: {} publishes failed; the first: {error}",
                r.errors
            );
        }
        if r.duplicates > 0 {
            println!(
                "  {name}: {} comments arrived twice at a viewer",
                r.duplicates
            );
        }
    }
    println!(
        "  node 4's viewers got {:.0} of {} comments while healthy, {:.0} of {} while black-holed \
         (the node catches up from the history when it renews its lease); the dispatcher's \
         Deliver calls answered / failed (with the nodes' viewer-count publishes): healthy {} / {}, \
         degraded {} / {}",
        healthy.node4_received,
        healthy.ok,
        degraded.node4_received,
        degraded.ok,
        healthy.deliveries,
        healthy.deliver_failures,
        degraded.deliveries,
        degraded.deliver_failures,
    );

    let ratio = degraded.receive.p99 / healthy.receive.p99;
    let ratio_rpc = degraded.rpc.p99 / healthy.rpc.p99;
    let open_reject_p99 = if reject.tripped {
        reject.rejected.p99
    } else {
        reject.other.p99
    };
    println!(
        "  ratio_degraded_vs_healthy (a) p99: {ratio:.2}x ({:.2} / {:.2} ms); Publish RPC (b) p99: \
         {ratio_rpc:.2}x ({:.2} / {:.2} ms)",
        degraded.receive.p99, healthy.receive.p99, degraded.rpc.p99, healthy.rpc.p99
    );
    let kinds: Vec<String> = reject
        .other_kinds
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    if reject.tripped {
        println!(
            "  open_reject: the breaker refused a call {:.2} s after the first health check to node \
             4; then {} sequential calls: {} refused as circuit open, p50 {:.3} p99 {:.3} max {:.3} \
             ms; {} not refused{}",
            reject.trip_time.as_secs_f64(),
            reject.calls,
            reject.rejected.count,
            reject.rejected.p50,
            reject.rejected.p99,
            reject.rejected.max,
            reject.other.count,
            if kinds.is_empty() {
                String::new()
            } else {
                format!(" ({}; p99 {:.1} ms)", kinds.join(", "), reject.other.p99)
            },
        );
    } else {
        println!(
            "  open_reject: NO call was refused as circuit open within {:.1} s of health checks to \
             node 4 (no breaker in the client stack?): the figure is the p99 of {} concurrent calls \
             that each waited for their outcome ({}), i.e. the timeout: p50 {:.1} p99 {:.1} ms",
            reject.trip_time.as_secs_f64(),
            reject.calls,
            kinds.join(", "),
            reject.other.p50,
            reject.other.p99,
        );
    }
    let node4_out = healthy.node4.out.0 + degraded.node4.out.0;
    if node4_out > 0 {
        println!(
            "  node 4 was NOT registered for the room in {} of {} samples (healthy) and {} of {} \
             (degraded): the dispatcher skipped it then",
            healthy.node4.out.0, healthy.node4.out.1, degraded.node4.out.0, degraded.node4.out.1
        );
    }
    let lost = healthy.missing + degraded.missing + healthy.errors + degraded.errors + node4_out;
    println!(
        "  targets: ratio_degraded_vs_healthy {ratio:.2} <= 1.5: {}; open_reject_p99_ms {open_reject_p99:.3} \
         <= 1: {}; every acknowledged comment at every healthy viewer, no failed publish, node 4 \
         registered throughout: {}",
        pass(ratio <= 1.5),
        pass(open_reject_p99 <= 1.0),
        pass(lost == 0),
    );

    if let Some(path) = &args.out.json {
        let mut figures: BTreeMap<&str, f64> = BTreeMap::new();
        figures.insert("healthy_p99_ms", healthy.receive.p99);
        figures.insert("degraded_p99_ms", degraded.receive.p99);
        figures.insert("ratio_degraded_vs_healthy", ratio);
        figures.insert("open_reject_p99_ms", open_reject_p99);
        figures.insert(
            "open_reject_is_timeout",
            f64::from(u8::from(!reject.tripped)),
        );
        figures.insert("open_reject_calls", reject.calls as f64);
        figures.insert("open_reject_refused", reject.rejected.count as f64);
        figures.insert("open_reject_p50_ms", reject.rejected.p50);
        figures.insert("open_reject_trip_s", reject.trip_time.as_secs_f64());
        figures.insert("healthy_p50_ms", healthy.receive.p50);
        figures.insert("degraded_p50_ms", degraded.receive.p50);
        figures.insert("healthy_publish_rpc_p50_ms", healthy.rpc.p50);
        figures.insert("healthy_publish_rpc_p99_ms", healthy.rpc.p99);
        figures.insert("degraded_publish_rpc_p50_ms", degraded.rpc.p50);
        figures.insert("degraded_publish_rpc_p99_ms", degraded.rpc.p99);
        figures.insert("degraded_publish_rpc_max_ms", degraded.rpc.max);
        figures.insert("ratio_publish_rpc_degraded_vs_healthy", ratio_rpc);
        figures.insert("degraded_slow_publishes", degraded.slow as f64);
        figures.insert("degraded_warmup_p99_ms", degraded.receive_warm.p99);
        figures.insert("degraded_warmup_max_ms", degraded.receive_warm.max);
        figures.insert("degraded_warmup_publish_rpc_max_ms", degraded.rpc_warm.max);
        figures.insert("degraded_warmup_slow_publishes", degraded.slow_warm as f64);
        figures.insert(
            "degraded_settled_after_s",
            degraded.settled_after.unwrap_or(f64::NAN),
        );
        figures.insert("healthy_publishes_ok", healthy.ok as f64);
        figures.insert("degraded_publishes_ok", degraded.ok as f64);
        figures.insert("publish_errors", (healthy.errors + degraded.errors) as f64);
        figures.insert(
            "missing_deliveries",
            (healthy.missing + degraded.missing) as f64,
        );
        figures.insert(
            "duplicate_deliveries",
            (healthy.duplicates + degraded.duplicates) as f64,
        );
        figures.insert("healthy_samples", healthy.receive.count as f64);
        figures.insert("degraded_samples", degraded.receive.count as f64);
        figures.insert(
            "degraded_deliver_failures",
            degraded.deliver_failures as f64,
        );
        figures.insert("node4_unregistered_samples", node4_out as f64);
        figures.insert(
            "degraded_breaker_first_open_s",
            degraded.node4.first_open.unwrap_or(f64::NAN),
        );
        figures.insert("degraded_breaker_openings", degraded.node4.openings as f64);
        figures.insert("healthy_breaker_openings", healthy.node4.openings as f64);
        figures.insert("rate", args.rate);
        figures.insert("duration_s", args.duration as f64);
        figures.insert("warmup_s", args.warmup);
        figures.insert("viewers_per_node", args.viewers_per_node as f64);
        figures.insert(
            "deliver_timeout_ms",
            bench.deliver_timeout.as_millis() as f64,
        );
        figures.insert("scheduled_per_phase", healthy.scheduled as f64);
        figures.insert("load_average_before", load.0);
        figures.insert("load_average_after", load.1);
        let distributions = [
            Distribution::new("(a) publish to receive at the viewers of nodes 1-3")
                .with("node 4 black-holed", false, degraded.receive.percentiles)
                .with("all four healthy", true, healthy.receive.percentiles),
            Distribution::new("(b) the Publish RPC at the publisher")
                .with("node 4 black-holed", false, degraded.rpc.percentiles)
                .with("all four healthy", true, healthy.rpc.percentiles),
        ];
        write_json(path, "breaker", &figures, &distributions)?;
    }
    Ok(lost)
}
