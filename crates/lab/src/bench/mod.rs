//! `livemesh bench NAME`: benchmarks that measure livemesh next to a peer in
//! the same run and report ratios (absolute figures drift on a shared
//! machine). Every bench takes `--json FILE` and writes
//! `{"bench": NAME, "figures": {KEY: number, ...}}`.

mod breaker;
mod fanout;
mod gifts;
pub(crate) mod helpers;
mod loves;
mod rooms;
mod rpc;

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Rooms: (a) how long after a commit by plain SQL from another
    /// connection a room start or end is visible in the cache (through the
    /// change feed); (b) GetRoom/Partition reads from the service's cache
    /// against the same reads as SQL queries on the rooms database, at the
    /// same concurrency. MariaDB with the binlog under `scripts/bench`, else SQLite.
    Rooms(rooms::RoomsArgs),
    /// Loves: many concurrent viewers sending realistic tap batches to one
    /// hot room and to many rooms through two counter nodes sharing Redis
    /// (the harness's under `scripts/bench`), against raw INCRBY on the same
    /// Redis at the same concurrency; and how soon a reader on the other
    /// node sees a love counted.
    Loves(loves::LovesArgs),
    /// Fan-out: events delivered per second to many concurrent Subscribe
    /// streams (one hot room, then many rooms) on one subscribe node, a
    /// `livemesh up` child process, against the same fan-out through NATS
    /// core pub/sub (the private nats-server of `scripts/bench fanout`);
    /// publish-to-receive latency at a paced rate, and the node's memory per
    /// idle stream.
    Fanout(fanout::FanoutArgs),
    /// Gifts: many viewers gifting one hot room through the gift-settler's
    /// gRPC API on MariaDB balance shards (the harness's under
    /// `scripts/bench`), against the naive gift (one transaction on one
    /// database debiting the viewer and crediting the streamer's balance
    /// row) at the same concurrency; then the settlement time after the
    /// room's end and its reconciliation, which must sum to zero.
    Gifts(gifts::GiftsArgs),
    /// Breaker: publish→receive p99 at the viewers of three healthy
    /// subscribe nodes while a fourth is black-holed, against all four
    /// healthy, in the same run; and how fast the client stack refuses a
    /// call to the black-holed node once its circuit breaker is open. Needs
    /// no Redis or MariaDB (in-memory fan-out store, SQLite rooms).
    ///
    /// Set-up, all in this process: ongoing-query, one dispatcher and four
    /// subscribe nodes, each a server on a loopback port; one room with
    /// `--viewers-per-node` Subscribe streams on every node. Node 4
    /// registers under the address of a TCP proxy that forwards to it in
    /// the healthy phase and becomes a black hole (accepts TCP, never
    /// answers) in the degraded phase; the dispatcher reaches the nodes
    /// through the mesh's client stack, so its timeouts and breakers are
    /// what is measured.
    ///
    /// Each phase publishes comments at `--rate` per second, open loop,
    /// for `--duration` seconds, and measures (a) publish→receive latency
    /// at the viewers of nodes 1-3 and (b) the Publish RPC's latency at the
    /// publisher. Comments scheduled in the first `--warmup` seconds are
    /// left out of the percentiles and reported apart (with when publishes
    /// stopped waiting for node 4). Every acknowledged comment must reach
    /// every viewer of a healthy node, or the bench fails.
    ///
    /// open_reject: afterwards, health checks to node 4 through a fresh
    /// channel of the same stack until one is refused as UNAVAILABLE
    /// "circuit open", then `--rejected-calls` sequential calls; the p99 of
    /// the refused ones. Without a breaker nothing is refused and the
    /// figure is the request timeout (said so in the output).
    ///
    /// Figures: healthy_p99_ms, degraded_p99_ms (a), their ratio
    /// ratio_degraded_vs_healthy (target <= 1.5), the same for (b)
    /// (ratio_publish_rpc_degraded_vs_healthy), open_reject_p99_ms (target
    /// <= 1), warm-up, counts and settings.
    Breaker(breaker::BreakerArgs),
    /// RPC: one unary call with a small body (GetRoom of a fixed room)
    /// through the mesh's whole client stack (client span and metrics,
    /// credential, body buffering, retry budget, breaker, deadline) and
    /// server stack (server span and metrics, load shedding, auth), against
    /// the same call through a bare tonic channel and a bare tonic server,
    /// both in this process over loopback, in the same run. Needs no
    /// Redis or MariaDB.
    ///
    /// Five phases of `--duration`/5 each: bare, mesh (auth dev) and mesh
    /// (auth enforce, a service token verified on every call) with
    /// `--concurrency` callers for throughput, then bare and mesh (dev)
    /// with one caller for latency.
    ///
    /// Figures: ratio_vs_bare (calls/s, dev; target >= 0.85),
    /// enforce_ratio_vs_bare, p99_ms and bare_p99_ms (one caller),
    /// cpu_us_per_call and bare_cpu_us_per_call (this process's CPU, client
    /// and server together, per call at `--concurrency`).
    Rpc(rpc::RpcArgs),
    /// Every bench in turn (rooms, loves, fanout, gifts, gifts --durable,
    /// breaker, rpc), each as its own process with the same `--duration`,
    /// then one report in `--out`: report.json (the machine, each run's
    /// figures and latency distributions), summary.md (each headline
    /// figure, its peer, the ratio, the target, PASS/FAIL) and PNG charts
    /// (throughput and CPU per operation against the peer, latency
    /// distributions). Run it as `scripts/bench all`, which starts every
    /// server the benches need.
    All(crate::report::AllArgs),
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Rooms(args) => rooms::run(args).await,
        BenchCommand::Loves(args) => loves::run(args).await,
        BenchCommand::Fanout(args) => fanout::run(args).await,
        BenchCommand::Gifts(args) => gifts::run(args).await,
        BenchCommand::Breaker(args) => breaker::run(args).await,
        BenchCommand::Rpc(args) => rpc::run(args).await,
        BenchCommand::All(args) => crate::report::run(args).await,
    }
}
