//! `livemesh-counter`: the love counter as its own process.

use clap::Parser;
use livemesh_mesh::CommonArgs;

/// Serve the love counter.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    livemesh_mesh::run_service_main("counter", &args.common, |_config| async {
        Ok(livemesh_counter::Counter)
    })
    .await
}
