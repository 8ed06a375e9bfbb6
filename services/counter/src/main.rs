//! `livemesh-counter`: the love counter as its own process.

use clap::Parser;
use livemesh_mesh::CommonArgs;

/// Serve the love counter. Point --redis-url at Redis (several
/// comma-separated URLs for a Cluster) and --database-url at the SQL
/// database for final totals; set counter.ongoing_query_url and
/// counter.publish_url in the config file.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    livemesh_mesh::run_service_main("counter", &args.common, |config| async move {
        livemesh_counter::Counter::from_config(&config).await
    })
    .await
}
