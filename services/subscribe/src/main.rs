//! `livemesh-subscribe`: one subscribe node as its own process.

use clap::Parser;
use livemesh_mesh::CommonArgs;

/// Serve viewers' room subscriptions (one subscribe node).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    livemesh_mesh::run_service_main("subscribe", &args.common, |_config| async {
        Ok(livemesh_subscribe::SubscribeNode)
    })
    .await
}
