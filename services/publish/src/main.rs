//! `livemesh-publish`: one dispatcher as its own process.

use clap::Parser;
use livemesh_mesh::CommonArgs;

/// Serve the dispatcher that fans room events out to subscribe nodes.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    livemesh_mesh::run_service_main("publish", &args.common, |_config| async {
        Ok(livemesh_publish::Dispatcher)
    })
    .await
}
