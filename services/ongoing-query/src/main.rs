//! `livemesh-ongoing-query`: the rooms service as its own process.

use clap::Parser;
use livemesh_mesh::CommonArgs;

/// Serve room starts and ends (RoomAdmin) and the cache of ongoing rooms
/// (OngoingQuery). Point --database-url at the local region's rooms
/// database; further regions go in the config file's [[rooms.regions]].
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    livemesh_mesh::run_service_main("ongoing-query", &args.common, |config| async move {
        livemesh_ongoing_query::OngoingQuery::from_config(&config).await
    })
    .await
}
