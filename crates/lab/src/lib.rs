//! The lab around the livemesh product: the benchmarks (`livemesh bench`),
//! the scripted demo (`livemesh demo`) and the workload and checks of the
//! multi-process topology (`livemesh topology-check`, run by
//! `scripts/topology --check`).
//!
//! The `livemesh` binary carries these commands behind its default `lab`
//! feature ([`LabCommand`] is flattened into its command line); the
//! production image builds it without them.

pub mod bench;
pub mod demo;
pub mod report;
pub mod topology;

use std::future::Future;
use std::path::PathBuf;

use livemesh_mesh::server::ServiceSet;
use livemesh_mesh::{CommonArgs, Config};

/// The lab's subcommands of `livemesh`.
#[derive(Debug, clap::Subcommand)]
pub enum LabCommand {
    /// Drive a bounded workload through the processes `scripts/topology`
    /// started (listed in its topology file) and check the outcome: every
    /// viewer saw every comment and gift once in order, love totals equal
    /// the accepted loves, every room settled and reconciles. Run it through
    /// `scripts/topology --check`, which also starts and stops everything.
    TopologyCheck {
        #[command(flatten)]
        common: CommonArgs,
        /// The topology file scripts/topology wrote.
        #[arg(long, value_name = "FILE")]
        topology: PathBuf,
        /// Traffic rounds (each: comments, loves and gifts in every room).
        #[arg(long, value_name = "N", default_value_t = 3)]
        rounds: u64,
        /// Leave out the chaos (SIGKILLed replicas, a Redis master
        /// failover, a MariaDB restart under the workload).
        #[arg(long)]
        no_chaos: bool,
    },
    /// Start the mesh in this process and run, through the real gRPC
    /// clients, a short scripted walkthrough (every feature once, each
    /// step printed), then a live broadcast: a crowd of viewers subscribes
    /// over several HTTP/2 connections, taps loves in bursts, comments and
    /// sends gifts while a live view shows the mesh's figures (redrawn in
    /// place on a terminal, plain lines otherwise); the room ends on its top
    /// lovers and its settlement with the reconciliation.
    Demo {
        /// Keep the demo's SQLite files here instead of a temporary directory.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Viewers in the live broadcast.
        #[arg(long, value_name = "N", default_value_t = 2_000)]
        viewers: u64,
        /// How long the live broadcast's viewers tap, comment and gift.
        #[arg(long, value_name = "SECS", default_value_t = 20)]
        duration: u64,
        /// HTTP/2 connections the viewers are spread over.
        #[arg(long, value_name = "N", default_value_t = 8)]
        connections: usize,
        /// Only the scripted walkthrough.
        #[arg(long, conflicts_with = "live_only")]
        walkthrough_only: bool,
        /// Only the live broadcast.
        #[arg(long)]
        live_only: bool,
        /// Plain lines even on a terminal.
        #[arg(long)]
        plain: bool,
    },
    /// Run a benchmark; each prints ratios against a peer measured in the
    /// same run. Use `scripts/bench NAME` to run it against the private
    /// MariaDB/Redis servers.
    Bench {
        #[command(subcommand)]
        bench: bench::BenchCommand,
    },
}

impl LabCommand {
    /// Runs the command. `mesh` builds every service from a config whose
    /// `listen` is the address they are served on (the product's all-in-one
    /// mesh): the demo serves it in this process.
    pub async fn run<S, F>(self, mesh: impl FnOnce(Config) -> F) -> anyhow::Result<()>
    where
        S: ServiceSet + Send + 'static,
        F: Future<Output = anyhow::Result<S>>,
    {
        match self {
            Self::TopologyCheck {
                common,
                topology,
                rounds,
                no_chaos,
            } => {
                topology::run(
                    &common,
                    &topology,
                    topology::Workload {
                        rounds,
                        chaos: !no_chaos,
                        ..topology::Workload::default()
                    },
                )
                .await
            }
            Self::Demo {
                data_dir,
                viewers,
                duration,
                connections,
                walkthrough_only,
                live_only,
                plain,
            } => {
                let live = (!walkthrough_only).then(|| demo::Broadcast {
                    viewers,
                    duration: std::time::Duration::from_secs(duration),
                    connections,
                    plain,
                    ..demo::Broadcast::default()
                });
                let args = demo::DemoArgs {
                    data_dir,
                    walkthrough: !live_only,
                    live,
                };
                demo::run(args, mesh).await
            }
            Self::Bench { bench } => bench::run(bench).await,
        }
    }
}
