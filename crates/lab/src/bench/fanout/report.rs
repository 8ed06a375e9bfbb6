//! The report: the figures of every layout and side, printed and saved.

use crate::bench::helpers::write_json;
use crate::report::model::Distribution;
use std::collections::BTreeMap;
use std::time::Duration;

use super::storm;
use super::{FanoutArgs, Layout, Measured};

pub(super) fn print_and_save(
    args: &FanoutArgs,
    rooms: u64,
    payload: usize,
    window: Duration,
    load: (f64, f64),
    results: &[(&Layout, Option<Measured>, Option<Measured>)],
    storms: &(Option<storm::Storm>, Option<storm::Storm>),
) -> anyhow::Result<()> {
    println!(
        "  machine load average (1 min) before {:.1}, after {:.1}, on {} cores: other work \
         shares them with the servers and this process",
        load.0,
        load.1,
        std::thread::available_parallelism().map_or(0, usize::from)
    );
    println!(
        "  {:<14} {:<9} {:>8} {:>12} {:>8} {:>8} {:>10} {:>8} {:>8} {:>10}",
        "layout",
        "side",
        "open s",
        "delivered/s",
        "sat p50",
        "sat p99",
        "paced ev/s",
        "p50 ms",
        "p99 ms",
        "B/idle str"
    );
    for (layout, lm, nats) in results {
        for (side, m) in [("livemesh", lm), ("NATS", nats)] {
            let Some(m) = m else { continue };
            println!(
                "  {:<14} {:<9} {:>8.1} {:>12.0} {:>8.1} {:>8.1} {:>10.1} {:>8.1} {:>8.1} {:>10}",
                layout.label,
                side,
                m.open_s,
                m.saturated.delivered_per_s,
                m.saturated.p50_ms,
                m.saturated.p99_ms,
                m.paced.events_per_s,
                m.paced.p50_ms,
                m.paced.p99_ms,
                m.bytes_per_idle_stream
                    .map_or("-".into(), |b| format!("{b:.0}")),
            );
        }
    }

    println!(
        "  while saturating, per delivery: CPU µs of the server and of this process \
         (decoding); the server's write syscalls per 1,000"
    );
    for (layout, lm, nats) in results {
        for (side, m) in [("livemesh", lm), ("NATS", nats)] {
            let Some(m) = m else { continue };
            println!(
                "  {:<14} {:<9} server {:>6.2}  bench client {:>6.2}  writes {:>7.1}",
                layout.label,
                side,
                m.saturated.server_cpu_us,
                m.saturated.client_cpu_us,
                m.saturated.server_writes_per_k
            );
        }
    }

    let mut figures: BTreeMap<String, f64> = BTreeMap::new();
    let mut put = |key: String, value: f64| {
        figures.insert(key, value);
    };
    put("streams".into(), args.streams as f64);
    put("connections".into(), args.connections() as f64);
    put("rooms".into(), rooms as f64);
    put("payload_bytes".into(), payload as f64);
    put("window_s".into(), window.as_secs_f64());
    put("in_flight_fanouts".into(), args.in_flight as f64);
    put("load_average_before".into(), load.0);
    put("load_average_after".into(), load.1);
    for (prefix, side) in [("", 0), ("nats_", 1)] {
        let measured: Vec<Measured> = results
            .iter()
            .filter_map(|(_, lm, nats)| if side == 0 { *lm } else { *nats })
            .collect();
        if measured.is_empty() {
            continue;
        }
        let mean = measured
            .iter()
            .map(|m| m.saturated.delivered_per_s)
            .sum::<f64>()
            / measured.len() as f64;
        let worst = |f: fn(&Measured) -> f64| measured.iter().map(f).fold(f64::MIN, f64::max);
        put(format!("{prefix}delivered_per_s"), mean);
        put(format!("{prefix}latency_p50_ms"), worst(|m| m.paced.p50_ms));
        put(format!("{prefix}latency_p99_ms"), worst(|m| m.paced.p99_ms));
        put(
            format!("{prefix}saturated_latency_p99_ms"),
            worst(|m| m.saturated.p99_ms),
        );
        put(
            format!("{prefix}undelivered"),
            measured
                .iter()
                .map(|m| (m.saturated.undelivered + m.paced.undelivered) as f64)
                .sum(),
        );
        put(
            format!("{prefix}lost_streams"),
            measured.iter().map(|m| m.lost_streams as f64).sum(),
        );
        if side == 0 {
            put(
                "bytes_per_idle_stream".into(),
                worst(|m| m.bytes_per_idle_stream.unwrap_or(f64::NAN)),
            );
        }
    }
    for (layout, lm, nats) in results {
        let k = layout.key;
        for (prefix, m) in [("", lm), ("nats_", nats)] {
            let Some(m) = m else { continue };
            let mut put = |name: &str, value: f64| put(format!("{k}_{prefix}{name}"), value);
            put("delivered_per_s", m.saturated.delivered_per_s);
            put("saturated_events_per_s", m.saturated.events_per_s);
            put("saturated_latency_p50_ms", m.saturated.p50_ms);
            put("saturated_latency_p99_ms", m.saturated.p99_ms);
            put("paced_events_per_s", m.paced.events_per_s);
            put("latency_p50_ms", m.paced.p50_ms);
            put("latency_p99_ms", m.paced.p99_ms);
            if let Some((p50, p99)) = m.paced.last_hop_ms {
                put("written_to_receive_p50_ms", p50);
                put("written_to_receive_p99_ms", p99);
            }
            if let Some(hops) = m.paced.node_hops {
                put("publish_to_deliver_p50_ms", hops.deliver.0);
                put("publish_to_deliver_p99_ms", hops.deliver.1);
                put("deliver_to_written_p50_ms", hops.write.0);
                put("deliver_to_written_p99_ms", hops.write.1);
            }
            put("open_s", m.open_s);
            put("server_cpu_us_per_delivery", m.saturated.server_cpu_us);
            put("client_cpu_us_per_delivery", m.saturated.client_cpu_us);
            put(
                "server_writes_per_1k_deliveries",
                m.saturated.server_writes_per_k,
            );
            if let Some(b) = m.bytes_per_idle_stream {
                put("bytes_per_idle_stream", b);
            }
            if let (Some(base), Some(open)) = (m.rss_base, m.rss_open) {
                put("node_rss_base_bytes", base as f64);
                put("node_rss_open_bytes", open as f64);
                put("node_rss_settled", f64::from(u8::from(m.settled)));
            }
        }
        if let (Some(lm), Some(nats)) = (lm, nats) {
            put(
                format!("{k}_ratio_vs_nats"),
                lm.saturated.delivered_per_s / nats.saturated.delivered_per_s,
            );
        }
    }
    if let (Some(&ours), Some(&theirs)) = (
        figures.get("delivered_per_s"),
        figures.get("nats_delivered_per_s"),
    ) {
        let ratio = ours / theirs;
        figures.insert("ratio_vs_nats".into(), ratio);
        let per_layout: Vec<String> = results
            .iter()
            .filter_map(|(l, _, _)| {
                figures
                    .get(&format!("{}_ratio_vs_nats", l.key))
                    .map(|r| format!("{} {r:.2}x", l.label))
            })
            .collect();
        println!(
            "  delivered/s vs NATS at saturation: {ratio:.2}x (mean over the layouts; {})",
            per_layout.join(", ")
        );
    }
    if let Some(p99) = figures.get("latency_p99_ms") {
        println!(
            "  livemesh publish->receive at the paced rate: p50 {:.1} ms, p99 {p99:.1} ms (the worse layout){}",
            figures.get("latency_p50_ms").copied().unwrap_or(f64::NAN),
            figures
                .get("nats_latency_p99_ms")
                .map(|n| format!("; NATS p99 {n:.1} ms at the same rate"))
                .unwrap_or_default()
        );
    }
    // The headline per-delivery figures are the hot room's, where a fan-out
    // is widest.
    let hot = |key: &str| figures.get(&format!("hot_{key}")).copied();
    let (cpu, nats_cpu) = (
        hot("server_cpu_us_per_delivery"),
        hot("nats_server_cpu_us_per_delivery"),
    );
    let (p99, nats_p99) = (hot("latency_p99_ms"), hot("nats_latency_p99_ms"));
    let hops_p99 = [
        "publish_to_deliver_p99_ms",
        "deliver_to_written_p99_ms",
        "written_to_receive_p99_ms",
    ]
    .map(|key| (key, hot(key)));
    let last_hop = (hot("written_to_receive_p50_ms"), hops_p99[2].1);
    if let Some(ours) = cpu {
        figures.insert("server_cpu_us_per_delivery".into(), ours);
    }
    if let Some(theirs) = nats_cpu {
        figures.insert("nats_server_cpu_us_per_delivery".into(), theirs);
    }
    if let (Some(ours), Some(theirs)) = (cpu, nats_cpu) {
        figures.insert("cpu_ratio_vs_nats".into(), ours / theirs);
        println!(
            "  hot room, server CPU per delivery while saturating: livemesh {ours:.2} µs, \
             NATS {theirs:.2} µs ({:.2}x)",
            ours / theirs
        );
    }
    if let (Some(ours), Some(theirs)) = (p99, nats_p99) {
        figures.insert("p99_ratio_vs_nats".into(), ours / theirs);
        println!(
            "  hot room, paced p99 at the same rate: livemesh {ours:.1} ms, NATS {theirs:.1} ms \
             ({:.2}x)",
            ours / theirs
        );
    }
    if let (Some(hop_p50), Some(hop_p99)) = last_hop {
        figures.insert("written_to_receive_p50_ms".into(), hop_p50);
        println!(
            "  hot room, paced: the last hop, written by the node -> received here (the streams that \
             asked for write stamps): p50 {hop_p50:.2} ms, p99 {hop_p99:.2} ms"
        );
    }
    for (key, value) in hops_p99 {
        if let Some(value) = value {
            figures.insert(key.into(), value);
        }
    }
    if let [(_, Some(deliver)), (_, Some(write)), (_, Some(receive))] = hops_p99 {
        println!(
            "  hot room, paced, p99 of each hop: publish -> Deliver sent {deliver:.2} ms and Deliver -> \
             written by the room's last stream {write:.2} ms (the node's metrics, per event: the \
             slowest of its streams), written -> received {receive:.2} ms (per message); publish -> \
             received {:.2} ms (per delivery). The p99s do not add up: each is of its own population",
            p99.unwrap_or(f64::NAN)
        );
    }
    for (prefix, storm) in [("", &storms.0), ("nats_", &storms.1)] {
        let Some(storm) = storm else { continue };
        figures.insert(format!("{prefix}storm_viewers"), storm.viewers as f64);
        figures.insert(format!("{prefix}storm_levels"), storm.levels.len() as f64);
        if let Some(best) = storm.best() {
            figures.insert(format!("{prefix}storm_latency_p50_ms"), best.p50_ms);
            figures.insert(format!("{prefix}storm_latency_p99_ms"), best.p99_ms);
            figures.insert(
                format!("{prefix}storm_server_cpu_us_per_delivery"),
                best.server_cpu_us,
            );
            figures.insert(
                format!("{prefix}storm_delivered_per_s"),
                best.delivered_per_s,
            );
        }
    }
    if let (Some(ours), Some(theirs)) = (&storms.0, &storms.1) {
        let ratio = ours.viewers as f64 / theirs.viewers as f64;
        figures.insert("storm_ratio_vs_nats".into(), ratio);
        println!(
            "  storm: viewers held at p99 <= {} ms: livemesh {} (batched), NATS {} ({ratio:.2}x)",
            storm::STORM_P99_MS,
            ours.viewers,
            theirs.viewers
        );
    }
    if let Some(bytes) = figures.get("bytes_per_idle_stream") {
        println!(
            "  node memory per idle stream: {bytes:.0} B (RSS growth / streams, the worse layout)"
        );
    }
    if let Some(path) = &args.out.json {
        let view: BTreeMap<&str, f64> = figures.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        // Per layout: the paced window (the same rate on both sides), then
        // the saturated one.
        let mut distributions = Vec::new();
        for (window, label) in [(false, "paced rate"), (true, "saturated")] {
            for (layout, lm, nats) in results {
                let mut d = Distribution::new(format!(
                    "publish to receive, {}, {} streams, {label}",
                    layout.label, args.streams
                ));
                for (side, m, peer) in [("livemesh", lm, false), ("NATS", nats, true)] {
                    if let Some(m) = m {
                        let w = if window { &m.saturated } else { &m.paced };
                        d = d.with(side, peer, w.percentiles);
                    }
                }
                if !d.series.is_empty() {
                    distributions.push(d);
                }
            }
        }
        write_json(path, "fanout", &view, &distributions)?;
    }
    Ok(())
}
