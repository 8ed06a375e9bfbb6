//! What the report shows of each bench: the headline figures, each with
//! its peer (the figure the bench measured the same thing with on the other
//! side, in the same run), what kind of figure it is (which chart it goes
//! on), and its targets. The targets are the ones the issues that asked
//! for each bench set (issues 3-7, 13 and 14 of the project's tracker);
//! they are written here once, and the summary says PASS or FAIL against
//! them.

/// Which chart a figure goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Operations per second (more is better): the throughput chart.
    Throughput,
    /// Milliseconds (less is better): the latency distributions show them.
    Latency,
    /// Microseconds of CPU per operation: the CPU chart.
    Cpu,
    /// Anything else (memory, a count that must be zero, viewers held).
    Other,
}

/// What a target bounds: the figure itself, or the figure divided by its peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On {
    Value,
    Ratio,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    AtLeast,
    AtMost,
    Equal,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Target {
    pub on: On,
    pub cmp: Cmp,
    pub bound: f64,
}

impl Target {
    const fn new(on: On, cmp: Cmp, bound: f64) -> Self {
        Self { on, cmp, bound }
    }

    /// Whether `value` (the figure or the ratio, as `on` says) meets it.
    pub fn met(&self, value: f64) -> bool {
        match self.cmp {
            AtLeast => value >= self.bound,
            AtMost => value <= self.bound,
            Equal => value == self.bound,
        }
    }

    /// E.g. "ratio ≥ 50", "≤ 250 ms".
    pub fn describe(&self, unit: &str) -> String {
        let cmp = match self.cmp {
            AtLeast => "≥",
            AtMost => "≤",
            Equal => "=",
        };
        match self.on {
            Ratio => format!("ratio {cmp} {}", self.bound),
            Value if unit.is_empty() => format!("{cmp} {}", self.bound),
            Value => format!("{cmp} {} {unit}", self.bound),
        }
    }
}

/// One line of the summary: a figure of one bench.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// The bench (its JSON's `bench`).
    pub bench: &'static str,
    /// What the figure is, for people.
    pub label: &'static str,
    /// Its key in the bench's figures.
    pub figure: &'static str,
    pub unit: &'static str,
    pub kind: Kind,
    /// The peer's side of the same measurement: its name and figure key.
    pub peer: Option<(&'static str, &'static str)>,
    pub targets: &'static [Target],
    /// The row applies only when this figure has this value (a missing
    /// figure counts as 0): e.g. gifts' targets with and without `--durable`.
    pub only_if: Option<(&'static str, f64)>,
}

const fn row(
    bench: &'static str,
    label: &'static str,
    figure: &'static str,
    unit: &'static str,
    kind: Kind,
) -> Row {
    Row {
        bench,
        label,
        figure,
        unit,
        kind,
        peer: None,
        targets: &[],
        only_if: None,
    }
}

impl Row {
    const fn peer(mut self, name: &'static str, figure: &'static str) -> Self {
        self.peer = Some((name, figure));
        self
    }

    const fn targets(mut self, targets: &'static [Target]) -> Self {
        self.targets = targets;
        self
    }

    const fn only_if(mut self, figure: &'static str, value: f64) -> Self {
        self.only_if = Some((figure, value));
        self
    }
}

use Cmp::{AtLeast, AtMost, Equal};
use Kind::{Cpu, Latency, Other, Throughput};
use On::{Ratio, Value};

const SQL: &str = "the same reads as SQL";
const INCR: &str = "redis-benchmark INCR";
const NAIVE: &str = "naive hot-row gift";
const HEALTHY: &str = "all four nodes healthy";
const BARE: &str = "bare tonic";
const NATS: &str = "NATS core";

/// Every row of the summary, in the order the benches run.
pub const ROWS: &[Row] = &[
    // rooms (issue 3)
    row(
        "rooms",
        "reads/s, service read path (cache)",
        "service_reads_per_s",
        "/s",
        Throughput,
    )
    .peer(SQL, "sql_reads_per_s")
    .targets(&[Target::new(Ratio, AtLeast, 50.0)]),
    row(
        "rooms",
        "reads/s, service over gRPC",
        "grpc_reads_per_s",
        "/s",
        Throughput,
    )
    .peer(SQL, "sql_reads_per_s"),
    row(
        "rooms",
        "commit to visible in the cache, p99",
        "visibility_p99_ms",
        "ms",
        Latency,
    )
    .targets(&[Target::new(Value, AtMost, 50.0)]),
    row(
        "rooms",
        "CPU per read, service read path",
        "service_cpu_us_per_read",
        "µs",
        Cpu,
    )
    .peer(SQL, "sql_cpu_us_per_read"),
    row(
        "rooms",
        "CPU per read, service over gRPC",
        "grpc_cpu_us_per_read",
        "µs",
        Cpu,
    )
    .peer(SQL, "sql_cpu_us_per_read"),
    // loves (issues 4 and 13)
    row("loves", "loves accepted/s", "loves_per_s", "/s", Throughput)
        .peer(INCR, "incrby_ops_per_s")
        .targets(&[Target::new(Ratio, AtLeast, 17.0)]),
    row(
        "loves",
        "love visible on the other node, p99",
        "visible_p99_ms",
        "ms",
        Latency,
    )
    .targets(&[Target::new(Value, AtMost, 250.0)]),
    row(
        "loves",
        "SendLoves p99 (worse phase)",
        "request_p99_ms",
        "ms",
        Latency,
    ),
    row(
        "loves",
        "CPU per love (process + Redis)",
        "cpu_us_per_love",
        "µs",
        Cpu,
    )
    .peer(INCR, "incrby_cpu_us_per_op"),
    // fanout (issues 5 and 14)
    row(
        "fanout",
        "deliveries/s, mean of hot and many rooms",
        "delivered_per_s",
        "/s",
        Throughput,
    )
    .peer(NATS, "nats_delivered_per_s")
    .targets(&[Target::new(Ratio, AtLeast, 1.0)]),
    row(
        "fanout",
        "deliveries/s, one hot room",
        "hot_delivered_per_s",
        "/s",
        Throughput,
    )
    .peer(NATS, "hot_nats_delivered_per_s"),
    row(
        "fanout",
        "deliveries/s, many rooms",
        "many_delivered_per_s",
        "/s",
        Throughput,
    )
    .peer(NATS, "many_nats_delivered_per_s"),
    row(
        "fanout",
        "storm: viewers held at p99 ≤ 75 ms",
        "storm_viewers",
        "",
        Other,
    )
    .peer(NATS, "nats_storm_viewers")
    .targets(&[Target::new(Ratio, AtLeast, 2.0)]),
    row(
        "fanout",
        "publish to receive p99, paced, worse layout",
        "latency_p99_ms",
        "ms",
        Latency,
    )
    .peer(NATS, "nats_latency_p99_ms")
    .targets(&[Target::new(Value, AtMost, 75.0)]),
    row(
        "fanout",
        "publish to receive p99, paced, hot room",
        "hot_latency_p99_ms",
        "ms",
        Latency,
    )
    .peer(NATS, "hot_nats_latency_p99_ms")
    .targets(&[Target::new(Ratio, AtMost, 1.5)]),
    row(
        "fanout",
        "hop 1: publish → Deliver sent, p99, paced, hot room",
        "publish_to_deliver_p99_ms",
        "ms",
        Latency,
    ),
    row(
        "fanout",
        "hop 2: Deliver → written by the room's last stream (per event), p99, paced, hot room",
        "deliver_to_written_p99_ms",
        "ms",
        Latency,
    ),
    row(
        "fanout",
        "hop 3: written → received by the client, p99, paced, hot room",
        "written_to_receive_p99_ms",
        "ms",
        Latency,
    ),
    row(
        "fanout",
        "server CPU per delivery, hot room",
        "server_cpu_us_per_delivery",
        "µs",
        Cpu,
    )
    .peer(NATS, "nats_server_cpu_us_per_delivery")
    .targets(&[
        Target::new(Value, AtMost, 1.0),
        Target::new(Ratio, AtMost, 4.0),
    ]),
    row(
        "fanout",
        "bench client CPU per delivery, hot room",
        "hot_client_cpu_us_per_delivery",
        "µs",
        Cpu,
    )
    .peer(NATS, "hot_nats_client_cpu_us_per_delivery"),
    row(
        "fanout",
        "node memory per idle stream",
        "bytes_per_idle_stream",
        "B",
        Other,
    )
    .targets(&[Target::new(Value, AtMost, 4096.0)]),
    // gifts (issues 6 and 13)
    row(
        "gifts",
        "gifts committed/s",
        "gifts_per_s",
        "/s",
        Throughput,
    )
    .peer(NAIVE, "baseline_gifts_per_s")
    .targets(&[Target::new(Ratio, AtLeast, 3.0)])
    .only_if("durable", 0.0),
    row(
        "gifts",
        "gifts committed/s, durable commits",
        "gifts_per_s",
        "/s",
        Throughput,
    )
    .peer(NAIVE, "baseline_gifts_per_s")
    .targets(&[Target::new(Ratio, AtLeast, 5.0)])
    .only_if("durable", 1.0),
    row("gifts", "SendGift p99", "gift_p99_ms", "ms", Latency)
        .peer(NAIVE, "baseline_p99_ms")
        .targets(&[Target::new(Value, AtMost, 50.0)]),
    row(
        "gifts",
        "settlement after the room's end",
        "settle_ms",
        "ms",
        Latency,
    ),
    row(
        "gifts",
        "reconcile difference",
        "reconcile_difference",
        "",
        Other,
    )
    .targets(&[Target::new(Value, Equal, 0.0)]),
    row(
        "gifts",
        "CPU per gift (MariaDB + process)",
        "cpu_us_per_gift",
        "µs",
        Cpu,
    )
    .peer(NAIVE, "baseline_cpu_us_per_gift"),
    // breaker (issue 7)
    row(
        "breaker",
        "publish to receive p99, one node black-holed",
        "degraded_p99_ms",
        "ms",
        Latency,
    )
    .peer(HEALTHY, "healthy_p99_ms")
    .targets(&[Target::new(Ratio, AtMost, 1.5)]),
    row(
        "breaker",
        "Publish RPC p99, one node black-holed",
        "degraded_publish_rpc_p99_ms",
        "ms",
        Latency,
    )
    .peer(HEALTHY, "healthy_publish_rpc_p99_ms"),
    row(
        "breaker",
        "call refused by an open breaker, p99",
        "open_reject_p99_ms",
        "ms",
        Latency,
    )
    .targets(&[Target::new(Value, AtMost, 1.0)]),
    row(
        "breaker",
        "acknowledged comments missing at a healthy viewer",
        "missing_deliveries",
        "",
        Other,
    )
    .targets(&[Target::new(Value, Equal, 0.0)]),
    // rpc (issue 13)
    row(
        "rpc",
        "calls/s through the mesh's stacks, 64 callers",
        "calls_per_s",
        "/s",
        Throughput,
    )
    .peer(BARE, "bare_calls_per_s")
    .targets(&[Target::new(Ratio, AtLeast, 0.85)]),
    row(
        "rpc",
        "calls/s with auth enforced",
        "enforce_calls_per_s",
        "/s",
        Throughput,
    )
    .peer(BARE, "bare_calls_per_s"),
    row("rpc", "p99, 1 caller", "p99_ms", "ms", Latency).peer(BARE, "bare_p99_ms"),
    row(
        "rpc",
        "CPU per call (client + server)",
        "cpu_us_per_call",
        "µs",
        Cpu,
    )
    .peer(BARE, "bare_cpu_us_per_call"),
    row(
        "rpc",
        "CPU per call, auth enforced",
        "enforce_cpu_us_per_call",
        "µs",
        Cpu,
    )
    .peer(BARE, "bare_cpu_us_per_call"),
];

/// The rows of `bench` that apply to a run with these figures.
pub fn rows_for<'a>(
    bench: &'a str,
    figure: impl Fn(&str) -> Option<f64> + 'a,
) -> impl Iterator<Item = &'static Row> + 'a {
    ROWS.iter().filter(move |r| {
        r.bench == bench
            && r.only_if
                .is_none_or(|(key, value)| figure(key).unwrap_or(0.0) == value)
    })
}
