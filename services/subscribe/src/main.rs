//! `livemesh-subscribe`: one subscribe node as its own process.

use clap::Parser;
use livemesh_mesh::CommonArgs;

/// Serve viewers' room subscriptions (one subscribe node). Needs the shared
/// hot store (`--redis-url`), where dispatchers find the node.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    livemesh_mesh::run_service_main("subscribe", &args.common, |config| async move {
        let store = livemesh_fanout::connect(&config)?;
        if store.is_memory() {
            tracing::warn!(
                "no redis_url: this node registers rooms in its own memory, where no \
                 dispatcher of another process can find it; set --redis-url"
            );
        }
        livemesh_subscribe::SubscribeNode::from_config(&config, store)
    })
    .await
}
