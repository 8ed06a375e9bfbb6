//! `bench rooms`: commit-to-visible latency through the change feed, and
//! cached reads against the same reads as SQL.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use livemesh_mesh::on_db;
use livemesh_mesh::server::LocalServer;
use livemesh_mesh::{ClientStack, Config};
use livemesh_ongoing_query::testing::{RegionStore, RoomRecord, owner, room_id};
use livemesh_ongoing_query::{OngoingQuery, Rooms};
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::{GetRoomRequest, PartitionRequest};

use super::helpers::{FiguresFile, Latencies, measure, write_json};
use livemesh_ongoing_query::RoomsConfig;

/// Options of `bench rooms`.
#[derive(Debug, clap::Args)]
pub struct RoomsArgs {
    #[command(flatten)]
    pub out: FiguresFile,
    /// Seconds the whole bench may take (split over its phases).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Concurrent readers on each side of the read comparison.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Ongoing rooms while reading.
    #[arg(long, default_value_t = 1_000)]
    pub rooms: u64,
    /// The rooms database. Default: a new database on the MariaDB named by
    /// LIVEMESH_TEST_MYSQL_URL (set by scripts/bench), else a temporary SQLite file.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
}

/// Every tenth read is a Partition, the rest GetRoom: the mix of a lobby
/// and its shard workers.
const PARTITION_EVERY: u64 = 10;
const WORKERS: u32 = 8;

pub async fn run(args: RoomsArgs) -> anyhow::Result<()> {
    ensure!(
        args.rooms > 0 && args.concurrency > 0 && args.duration >= 3,
        "--rooms and --concurrency must be positive and --duration at least 3"
    );
    let temp = tempfile::tempdir()?;
    let (url, backend) = match (&args.database_url, std::env::var("LIVEMESH_TEST_MYSQL_URL")) {
        (Some(url), _) => (url.clone(), "the given database"),
        (None, Ok(base)) if !base.is_empty() => (
            format!(
                "{}/livemesh_bench_{}",
                base.trim_end_matches('/'),
                std::process::id()
            ),
            "MariaDB (binlog)",
        ),
        _ => (
            livemesh_mesh::config::sqlite_url(&temp.path().join("rooms.db")),
            "SQLite (change table)",
        ),
    };
    let mut config = Config {
        database_url: Some(url.clone()),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    };
    // Only the change feed may explain what becomes visible.
    config.section_mut::<RoomsConfig>().scan_interval_ms = 3_600_000;
    config.section_mut::<RoomsConfig>().feed_consumer = format!("bench-{}", std::process::id());
    let service = OngoingQuery::from_config(&config).await?;
    let rooms = service.rooms().clone();
    let server = LocalServer::start(service, config.listen).await?;
    // Another application's connection, writing plain SQL.
    let outsider = RegionStore::open(0, &url).await?;
    let phase = Duration::from_secs(args.duration) / 4;
    println!(
        "bench rooms on {backend}: visibility for {:.1} s, then reads with {} callers over {} rooms, {:.1} s per side",
        phase.as_secs_f64(),
        args.concurrency,
        args.rooms,
        phase.as_secs_f64()
    );

    // (a) Commit-to-visible, for starts and ends. "Commit" is when the
    // writer's COMMIT returned; the time from sending the statement is
    // reported too, as an upper bound that includes the commit itself.
    let (mut visible, mut from_send) = (Latencies::new(), Latencies::new());
    let started = Instant::now();
    let mut anchor = 1_000_000_u64;
    while started.elapsed() < phase {
        anchor += 1;
        let sent = Instant::now();
        let room = sql_start(&outsider, anchor).await?;
        let committed = Instant::now();
        wait_visible(&rooms, room.room_id, true).await?;
        visible.record(committed.elapsed());
        from_send.record(sent.elapsed());
        let sent = Instant::now();
        sql_end(&outsider, room.room_id).await?;
        let committed = Instant::now();
        wait_visible(&rooms, room.room_id, false).await?;
        visible.record(committed.elapsed());
        from_send.record(sent.elapsed());
    }
    let (vis_p50, vis_p99) = (visible.quantile_ms(0.5), visible.quantile_ms(0.99));
    let send_p99 = from_send.quantile_ms(0.99);

    // (b) Reads.
    let mut ids = Vec::new();
    for anchor in 1..=args.rooms {
        ids.push(rooms.start_room(anchor).await?.room_id);
    }
    let ids = Arc::new(ids);
    let service_side = {
        let (ids, rooms) = (ids.clone(), rooms.clone());
        measure(args.concurrency, phase, move |n| {
            let rooms = rooms.clone();
            let room_id = ids[(n % ids.len() as u64) as usize];
            async move {
                if n % PARTITION_EVERY == 0 {
                    rooms.partition((n % u64::from(WORKERS)) as u32, WORKERS)?;
                } else {
                    rooms.get_room(room_id).await?;
                }
                Ok(())
            }
        })
        .await?
    };
    let sql_side = {
        let (ids, store) = (ids.clone(), outsider.clone());
        measure(args.concurrency, phase, move |n| {
            let store = store.clone();
            let room_id = ids[(n % ids.len() as u64) as usize];
            async move {
                if n % PARTITION_EVERY == 0 {
                    sql_partition(&store, (n % u64::from(WORKERS)) as u32, WORKERS).await?;
                } else {
                    store.get(room_id).await?.context("seeded room missing")?;
                }
                Ok(())
            }
        })
        .await?
    };
    let channel = ClientStack::new(&config.client).channel(&server.uri())?;
    let grpc_side = {
        let ids = ids.clone();
        measure(args.concurrency, phase, move |n| {
            let mut client = OngoingQueryServiceClient::new(channel.clone());
            let room_id = ids[(n % ids.len() as u64) as usize];
            async move {
                if n % PARTITION_EVERY == 0 {
                    client
                        .partition(PartitionRequest {
                            index: (n % u64::from(WORKERS)) as u32,
                            total: WORKERS,
                        })
                        .await?;
                } else {
                    client.get_room(GetRoomRequest { room_id }).await?;
                }
                Ok(())
            }
        })
        .await?
    };
    server.stop().await?;

    let ratio = service_side.per_sec / sql_side.per_sec;
    let grpc_ratio = grpc_side.per_sec / sql_side.per_sec;
    println!(
        "\n  visible in the cache after COMMIT returned ({} starts and ends): p50 {vis_p50:.3} ms, p99 {vis_p99:.3} ms",
        visible.len()
    );
    println!("  visible after the statement was sent (includes the commit): p99 {send_p99:.3} ms");
    println!(
        "\n  {:<46} {:>12} {:>9} {:>9}",
        "reads (9 GetRoom : 1 Partition of 8)", "reads/s", "p50 ms", "p99 ms"
    );
    for (name, side) in [
        ("service read path, cache (in process)", &service_side),
        ("service over gRPC (loopback, same process)", &grpc_side),
        ("peer: the same reads as SQL queries", &sql_side),
    ] {
        println!(
            "  {name:<46} {:>12.0} {:>9.3} {:>9.3}",
            side.per_sec, side.p50_ms, side.p99_ms
        );
    }
    println!("  ratio service / SQL: {ratio:.1}x (over gRPC: {grpc_ratio:.1}x)");

    let figures = BTreeMap::from([
        ("visibility_p50_ms", vis_p50),
        ("visibility_p99_ms", vis_p99),
        ("visibility_from_send_p99_ms", send_p99),
        ("service_reads_per_s", service_side.per_sec),
        ("sql_reads_per_s", sql_side.per_sec),
        ("read_ratio_vs_sql", ratio),
        ("grpc_reads_per_s", grpc_side.per_sec),
        ("grpc_read_ratio_vs_sql", grpc_ratio),
    ]);
    if let Some(path) = &args.out.json {
        write_json(path, "rooms", &figures)?;
    }
    Ok(())
}

/// Waits (woken by each change the cache takes in) until `room_id` is
/// cached as ongoing (`true`) or ended (`false`); at most 10 s.
async fn wait_visible(rooms: &Rooms, room_id: u64, ongoing: bool) -> anyhow::Result<()> {
    let mut head = rooms.cache().log().subscribe();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        head.borrow_and_update();
        if rooms
            .cache()
            .get(room_id)
            .is_some_and(|r| r.is_ongoing() == ongoing)
        {
            return Ok(());
        }
        tokio::time::timeout_at(deadline, head.changed())
            .await
            .with_context(|| {
                format!("room {room_id} not visible after 10 s: is the change feed running?")
            })??;
    }
}

async fn sql_start(store: &RegionStore, anchor: u64) -> anyhow::Result<RoomRecord> {
    // Through the store's own SQL, but on the outsider's connection pool:
    // the service's cache only hears of it through the change feed.
    Ok(store.insert(anchor, livemesh_mesh::now_ms()).await?)
}

async fn sql_end(store: &RegionStore, room_id: u64) -> anyhow::Result<()> {
    store.end(room_id, livemesh_mesh::now_ms()).await?;
    Ok(())
}

/// What `Partition` answers, computed the way a client without the cache
/// would: read every ongoing room id from SQL and hash them itself.
async fn sql_partition(store: &RegionStore, index: u32, total: u32) -> anyhow::Result<Vec<u64>> {
    let ids: Vec<(i64,)> = on_db!(store.db(), pool => {
        sqlx::query_as("SELECT id FROM rooms WHERE status = 1").fetch_all(pool).await?
    });
    Ok(ids
        .into_iter()
        .map(|(id,)| room_id(store.region(), id))
        .filter(|room| owner(*room, total) == index)
        .collect())
}
