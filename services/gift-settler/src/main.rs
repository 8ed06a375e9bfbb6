//! `livemesh-gift-settler`: gifts and settlement as their own process.

use clap::Parser;
use livemesh_mesh::CommonArgs;

/// Serve gifts, balances and settlement.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(flatten)]
    common: CommonArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    livemesh_mesh::run_service_main("gift-settler", &args.common, |config| async move {
        livemesh_gift_settler::GiftSettler::from_config(&config).await
    })
    .await
}
