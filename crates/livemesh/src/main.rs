//! `livemesh`: the whole mesh in one process (`up`), a scripted broadcast
//! against it (`demo`), and the benchmarks (`bench`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use livemesh::{Mesh, bench, demo};
use livemesh_mesh::CommonArgs;

/// livemesh: the interaction backend of a live-streaming platform (loves,
/// comments, gifts and viewer counts for live rooms) as a mesh of gRPC
/// services. This binary runs all of them in one process on the embedded
/// default: SQLite files under the data dir and an in-process hot store.
#[derive(Debug, Parser)]
#[command(version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve every livemesh service on one port until SIGTERM or Ctrl-C.
    ///
    /// Health (grpc.health.v1) reports SERVING for each fully-qualified
    /// service name, and server reflection lists them all, so
    /// `grpcurl -plaintext 127.0.0.1:50051 list` works without .proto files.
    Up {
        #[command(flatten)]
        common: CommonArgs,
    },
    /// Start the mesh in this process and run a short scripted broadcast
    /// against it through the real gRPC clients, printing each step.
    Demo {
        /// Keep the demo's SQLite files here instead of a temporary directory.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
    },
    /// Run a benchmark; each prints ratios against a peer measured in the
    /// same run. Use `scripts/bench NAME` to run it against the private
    /// MariaDB/Redis servers.
    Bench {
        #[command(subcommand)]
        bench: bench::BenchCommand,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Up { common } => {
            livemesh_mesh::run_service_main("livemesh", &common, |config| async move {
                Mesh::from_config(&config).await
            })
            .await
        }
        Command::Demo { data_dir } => report(demo::run(data_dir).await),
        Command::Bench { bench } => report(bench::run(bench).await),
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("livemesh: {err:#}");
            ExitCode::FAILURE
        }
    }
}
