//! `livemesh bench NAME`: benchmarks that measure livemesh next to a peer in
//! the same run and report ratios (absolute figures drift on a shared
//! machine). Every bench takes `--json FILE` and writes
//! `{"bench": NAME, "figures": {KEY: number, ...}}`.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use livemesh_mesh::server::LocalServer;
use livemesh_mesh::{ClientStack, Config};
use livemesh_ongoing_query::OngoingQuery;
use livemesh_proto::v1::GetRoomRequest;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Room reads: a lookup in the room cache against the peer it shields, a
    /// primary-key SELECT on the rooms table (MariaDB under `scripts/bench`,
    /// else SQLite), both in process; plus `GetRoom` over gRPC end to end.
    Rooms(RoomsArgs),
}

/// Options of `bench rooms`.
#[derive(Debug, clap::Args)]
pub struct RoomsArgs {
    /// Write the figures as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Seconds each side is measured for.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Concurrent callers on each side.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Rooms started before measuring.
    #[arg(long, default_value_t = 1_000)]
    pub rooms: u64,
    /// The rooms database. Default: a new database on the MariaDB named by
    /// LIVEMESH_TEST_MYSQL_URL (set by scripts/bench), else a temporary SQLite file.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Rooms(args) => rooms(args).await,
    }
}

/// Calls per second and latency percentiles of one side of a bench.
#[derive(Debug)]
struct Side {
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Runs `call` from `concurrency` tasks for `duration`.
async fn measure<F, Fut>(concurrency: usize, duration: Duration, call: F) -> anyhow::Result<Side>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let call = Arc::new(call);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for task in 0..concurrency {
        let call = call.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut seed = task as u64 * 7_919 + 1;
            while Instant::now() < deadline {
                seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                let t = Instant::now();
                call(seed >> 33).await?;
                latencies.push(t.elapsed());
            }
            anyhow::Ok(latencies)
        });
    }
    let mut all = Vec::new();
    while let Some(joined) = tasks.join_next().await {
        all.extend(joined??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    ensure!(!all.is_empty(), "no call completed");
    all.sort_unstable();
    let at = |q: f64| all[((all.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3;
    Ok(Side {
        per_sec: all.len() as f64 / elapsed,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
    })
}

async fn rooms(args: RoomsArgs) -> anyhow::Result<()> {
    ensure!(
        args.rooms > 0 && args.concurrency > 0 && args.seconds > 0,
        "--rooms, --concurrency and --seconds must be positive"
    );
    let temp = tempfile::tempdir()?;
    let (url, backend) = match (&args.database_url, std::env::var("LIVEMESH_TEST_MYSQL_URL")) {
        (Some(url), _) => (url.clone(), "given"),
        (None, Ok(base)) if !base.is_empty() => (
            format!(
                "{}/livemesh_bench_{}",
                base.trim_end_matches('/'),
                std::process::id()
            ),
            "MariaDB",
        ),
        _ => (
            livemesh_mesh::config::sqlite_url(&temp.path().join("rooms.db")),
            "SQLite",
        ),
    };
    let config = Config {
        database_url: Some(url),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    };
    let service = OngoingQuery::from_config(&config).await?;
    let rooms = service.rooms().clone();
    let server = LocalServer::start(service, config.listen).await?;

    println!(
        "bench rooms: {} rooms on {backend}, {} callers, {} s per side",
        args.rooms, args.concurrency, args.seconds
    );
    let mut ids = Vec::new();
    for anchor in 1..=args.rooms {
        ids.push(rooms.start_room(anchor).await?.room_id);
    }
    let ids = Arc::new(ids);
    let duration = Duration::from_secs(args.seconds);

    let cache = {
        let (ids, rooms) = (ids.clone(), rooms.clone());
        measure(args.concurrency, duration, move |n| {
            let rooms = rooms.clone();
            let room_id = ids[(n % ids.len() as u64) as usize];
            async move {
                rooms.get_room(room_id).await?;
                Ok(())
            }
        })
        .await?
    };
    let store = rooms.store(0).context("region 0")?.clone();
    let sql = {
        let ids = ids.clone();
        measure(args.concurrency, duration, move |n| {
            let store = store.clone();
            let room_id = ids[(n % ids.len() as u64) as usize];
            async move {
                store.get(room_id).await?.context("seeded room missing")?;
                Ok(())
            }
        })
        .await?
    };
    let channel = ClientStack::new(&config.client).channel(&server.uri())?;
    let grpc = {
        let ids = ids.clone();
        measure(args.concurrency, duration, move |n| {
            let mut client = OngoingQueryServiceClient::new(channel.clone());
            let room_id = ids[(n % ids.len() as u64) as usize];
            async move {
                client.get_room(GetRoomRequest { room_id }).await?;
                Ok(())
            }
        })
        .await?
    };
    server.stop().await?;

    let ratio = cache.per_sec / sql.per_sec;
    println!(
        "  {:<44} {:>12} {:>9} {:>9}",
        "side", "calls/s", "p50 ms", "p99 ms"
    );
    println!(
        "  {:<44} {:>12.0} {:>9.3} {:>9.3}",
        "cache lookup (in process)", cache.per_sec, cache.p50_ms, cache.p99_ms
    );
    println!(
        "  {:<44} {:>12.0} {:>9.3} {:>9.3}",
        format!("peer: SELECT by primary key ({backend})"),
        sql.per_sec,
        sql.p50_ms,
        sql.p99_ms
    );
    println!(
        "  {:<44} {:>12.0} {:>9.3} {:>9.3}",
        "GetRoom over gRPC (cache behind it)", grpc.per_sec, grpc.p50_ms, grpc.p99_ms
    );
    println!("  ratio cache / SQL: {ratio:.2}x");

    let figures = BTreeMap::from([
        ("cache_gets_per_sec", cache.per_sec),
        ("cache_get_p99_ms", cache.p99_ms),
        ("sql_gets_per_sec", sql.per_sec),
        ("sql_get_p99_ms", sql.p99_ms),
        ("ratio_cache_vs_sql", ratio),
        ("grpc_get_room_per_sec", grpc.per_sec),
        ("grpc_get_room_p99_ms", grpc.p99_ms),
    ]);
    if let Some(path) = &args.json {
        write_json(path, "rooms", &figures)?;
    }
    Ok(())
}

/// Writes `{"bench": NAME, "figures": {...}}` to `path`.
fn write_json(path: &Path, bench: &str, figures: &BTreeMap<&str, f64>) -> anyhow::Result<()> {
    let body = serde_json::json!({ "bench": bench, "figures": figures });
    std::fs::write(path, serde_json::to_vec_pretty(&body)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("  figures written to {}", path.display());
    Ok(())
}
