//! `livemesh-publish`: one dispatcher as its own process.

use clap::Parser;
use livemesh_mesh::CommonArgs;

/// Serve the dispatcher that fans room events out to the subscribe nodes
/// holding viewers of each room. Needs the shared hot store (`--redis-url`),
/// where the nodes register.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    livemesh_mesh::run_service_main("publish", &args.common, |config| async move {
        let store = livemesh_fanout::connect(&config)?;
        if store.is_memory() {
            tracing::warn!(
                "no redis_url: this dispatcher looks for subscribe nodes in its own memory, \
                 where no node of another process registers; set --redis-url"
            );
        }
        livemesh_publish::Dispatcher::from_config(&config, store)
    })
    .await
}
