//! `bench gifts`: many viewers gifting one hot room through the
//! gift-settler's gRPC API on MariaDB balance shards, against the naive gift
//! (one transaction on one database that debits the viewer and credits the
//! streamer's single balance row) at the same concurrency and pool size;
//! then how long the room's settlement takes after its end, and whether it
//! reconciles to zero.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use futures::StreamExt as _;
use livemesh_gift_settler::GiftSettler;
use livemesh_mesh::server::LocalServer;
use livemesh_mesh::{ClientStack, Config};
use livemesh_ongoing_query::OngoingQuery;
use livemesh_proto::v1::gifts_service_client::GiftsServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::settlement_service_client::SettlementServiceClient;
use livemesh_proto::v1::{
    DepositRequest, EndRoomRequest, GetSettlementRequest, ReconcileRequest, SendGiftRequest,
    SettlementState, StartRoomRequest,
};
use sqlx::mysql::{MySqlPool, MySqlPoolOptions};

use super::helpers::{FiguresFile, measure, started_room, write_json};
use livemesh_gift_settler::GiftsConfig;
use livemesh_publish::PublishConfig;

mod naive;
mod usage;

use self::naive::{naive_check, naive_gift, naive_setup};
use self::usage::{Usage, print_side};

/// Options of `bench gifts`.
#[derive(Debug, clap::Args)]
pub struct GiftsArgs {
    #[command(flatten)]
    pub out: FiguresFile,
    /// Seconds the two measuring windows take together (half each).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Concurrent gift senders on each side.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Viewers who gift (each topped up first).
    #[arg(long, default_value_t = 4_096)]
    pub viewers: u64,
    /// Balance shards of the gift-settler (one database each).
    #[arg(long, default_value_t = 4)]
    pub shards: usize,
    /// The MariaDB server, without a database path. Default:
    /// LIVEMESH_TEST_MYSQL_URL (set by scripts/bench).
    #[arg(long, value_name = "URL")]
    pub mysql_url: Option<String>,
    /// Make every commit durable for the run, on both sides
    /// (`innodb_flush_log_at_trx_commit=1`, `sync_binlog=1`, set globally
    /// and restored afterwards): what a production server runs with; the
    /// harness's server flushes once a second.
    #[arg(long)]
    pub durable: bool,
}

/// The streamer (the room's anchor); never one of the viewers `1..=viewers`.
const STREAMER: u64 = 1 << 40;
/// Each viewer's top-up: far more than a window can spend.
const DEPOSIT: i64 = 1_000_000_000;
/// Gift prices in the smallest unit, picked per gift.
const PRICES: [i64; 6] = [1, 5, 10, 52, 99, 520];
/// Connections of the naive side's pool: as many as each balance shard's
/// pool in the service (`livemesh_mesh::sql::Db`).
const NAIVE_POOL: u32 = 16;
/// Server counters read before and after each window.
const STATUS: &[&str] = &[
    "Questions",
    "Innodb_row_lock_waits",
    "Innodb_row_lock_time",
    "Innodb_data_fsyncs",
    "Innodb_os_log_fsyncs",
    "Binlog_commits",
    "Binlog_group_commits",
];

pub async fn run(args: GiftsArgs) -> anyhow::Result<()> {
    ensure!(
        args.concurrency > 0 && args.viewers > 0 && args.shards > 0 && args.duration >= 2,
        "--concurrency, --viewers and --shards must be positive and --duration at least 2"
    );
    let base = match args.mysql_url.clone() {
        Some(url) => url,
        None => std::env::var("LIVEMESH_TEST_MYSQL_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .context(
                "bench gifts needs MariaDB: run it as `scripts/bench gifts` (it starts a private \
                 server and sets LIVEMESH_TEST_MYSQL_URL), or pass --mysql-url",
            )?,
    };
    let base = base.trim_end_matches('/').to_owned();
    let unique = format!(
        "{}_{:x}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default()
    );
    let admin_db = MySqlPoolOptions::new()
        .max_connections(1)
        .connect(&base)
        .await
        .with_context(|| format!("connecting to {}", livemesh_mesh::sql::redact(&base)))?;
    let (flush, sync_binlog): (i64, i64) = sqlx::query_as(
        "SELECT CAST(@@innodb_flush_log_at_trx_commit AS SIGNED), CAST(@@sync_binlog AS SIGNED)",
    )
    .fetch_one(&admin_db)
    .await?;
    if args.durable {
        sqlx::query("SET GLOBAL innodb_flush_log_at_trx_commit = 1, sync_binlog = 1")
            .execute(&admin_db)
            .await
            .context("--durable needs the right to SET GLOBAL")?;
    }
    let result = bench(&args, &base, &unique, &admin_db).await;
    if args.durable {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET GLOBAL innodb_flush_log_at_trx_commit = {flush}, sync_binlog = {sync_binlog}"
        )))
        .execute(&admin_db)
        .await?;
    }
    result
}

async fn bench(
    args: &GiftsArgs,
    base: &str,
    unique: &str,
    admin_db: &MySqlPool,
) -> anyhow::Result<()> {
    let mariadb_pid = std::env::var("LIVEMESH_TEST_MYSQL_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok());

    // ongoing-query on SQLite (the rooms), the gift-settler on MariaDB shards.
    let dir = tempfile::tempdir()?;
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let rooms_config = Config {
        data_dir: dir.path().join("rooms"),
        ..Config::default()
    };
    let rooms_server =
        LocalServer::start(OngoingQuery::from_config(&rooms_config).await?, any).await?;
    let shard_dbs: Vec<String> = (0..args.shards)
        .map(|n| format!("bench_gifts_{n}_{unique}"))
        .collect();
    let mut config = Config {
        data_dir: dir.path().join("gifts"),
        ..Config::default()
    };
    config.section_mut::<GiftsConfig>().shard_urls =
        shard_dbs.iter().map(|db| format!("{base}/{db}")).collect();
    config.section_mut::<GiftsConfig>().ongoing_query_url = rooms_server.uri();
    // A dispatcher (in-process fan-out store, no viewers) takes each gift's
    // event before the gift commits, as in production.
    config.section_mut::<PublishConfig>().ongoing_query_url = rooms_server.uri();
    let fanout = livemesh_fanout::FanoutStore::memory(livemesh_fanout::FanoutSettings::default());
    let publish_server = LocalServer::start(
        livemesh_publish::Dispatcher::from_config(&config, fanout)?,
        any,
    )
    .await?;
    config.section_mut::<GiftsConfig>().publish_url = publish_server.uri();
    let subaccounts = config.section::<GiftsConfig>().room_subaccounts;
    let gifts_server = LocalServer::start(GiftSettler::from_config(&config).await?, any).await?;
    let stack = ClientStack::new(&config.client);
    let mut admin = RoomAdminServiceClient::new(stack.channel(&rooms_server.uri())?);
    let gifts = GiftsServiceClient::new(stack.channel(&gifts_server.uri())?);
    let mut settlement = SettlementServiceClient::new(stack.channel(&gifts_server.uri())?);
    let room_id = started_room(
        admin
            .start_room(StartRoomRequest {
                anchor_id: STREAMER,
            })
            .await,
    )?
    .room_id;

    let (version, flush, sync_binlog, log_bin): (String, i64, i64, i64) = sqlx::query_as(
        "SELECT @@version, CAST(@@innodb_flush_log_at_trx_commit AS SIGNED), \
         CAST(@@sync_binlog AS SIGNED), CAST(@@log_bin AS SIGNED)",
    )
    .fetch_one(admin_db)
    .await?;
    let window = Duration::from_secs(args.duration) / 2;
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "bench gifts on MariaDB {version} (binlog {}, innodb_flush_log_at_trx_commit={flush}, \
         sync_binlog={sync_binlog}), {cpus} CPUs for everything",
        if log_bin == 1 { "on" } else { "off" }
    );
    println!(
        "  one hot room, {} viewers, {} senders, {:.1} s per side; livemesh: {} shards x {subaccounts} \
         sub-accounts; naive: one database, {NAIVE_POOL} connections",
        args.viewers,
        args.concurrency,
        window.as_secs_f64(),
        args.shards
    );

    // Top every viewer up through the API (not measured).
    let topped = Instant::now();
    let mut deposits = futures::stream::iter(1..=args.viewers)
        .map(|viewer| {
            let mut client = gifts.clone();
            async move {
                client
                    .deposit(DepositRequest {
                        idempotency_key: format!("bench-topup-{viewer}"),
                        user_id: viewer,
                        amount: DEPOSIT,
                    })
                    .await
                    .with_context(|| format!("Deposit for viewer {viewer}"))
            }
        })
        .buffer_unordered(args.concurrency);
    while let Some(done) = deposits.next().await {
        done?;
    }
    drop(deposits);
    println!(
        "  {} deposits in {:.1} s",
        args.viewers,
        topped.elapsed().as_secs_f64()
    );

    // (a) livemesh: SendGift through gRPC.
    let next_key = Arc::new(AtomicU64::new(0));
    let gifted = Arc::new(AtomicI64::new(0));
    let before = Usage::take(admin_db, mariadb_pid).await?;
    let service = measure(args.concurrency, window, {
        let (next_key, gifted, viewers) = (next_key.clone(), gifted.clone(), args.viewers);
        move |n| {
            let mut client = gifts.clone();
            let key = next_key.fetch_add(1, Ordering::Relaxed);
            let gifted = gifted.clone();
            let (viewer, amount) = pick(n, viewers);
            async move {
                client
                    .send_gift(SendGiftRequest {
                        idempotency_key: format!("bench-gift-{key}"),
                        viewer_id: viewer,
                        room_id,
                        gift_id: amount.unsigned_abs(),
                        amount,
                    })
                    .await
                    .with_context(|| format!("SendGift from viewer {viewer}"))?;
                gifted.fetch_add(amount, Ordering::Relaxed);
                Ok(())
            }
        }
    })
    .await?;
    let service_gifts = next_key.load(Ordering::Relaxed);
    let service_use = Usage::take(admin_db, mariadb_pid).await?.since(&before);

    // (b) The naive gift on one database.
    let naive_db = format!("bench_gifts_naive_{unique}");
    let naive = naive_setup(admin_db, base, &naive_db, args.viewers).await?;
    let naive_count = Arc::new(AtomicU64::new(0));
    let naive_gifted = Arc::new(AtomicI64::new(0));
    let before = Usage::take(admin_db, mariadb_pid).await?;
    let baseline = measure(args.concurrency, window, {
        let (count, gifted, pool, viewers) = (
            naive_count.clone(),
            naive_gifted.clone(),
            naive.clone(),
            args.viewers,
        );
        move |n| {
            let key = count.fetch_add(1, Ordering::Relaxed);
            let (pool, gifted) = (pool.clone(), gifted.clone());
            let (viewer, amount) = pick(n, viewers);
            async move {
                naive_gift(&pool, key, viewer, amount).await?;
                gifted.fetch_add(amount, Ordering::Relaxed);
                Ok(())
            }
        }
    })
    .await?;
    let naive_gifts = naive_count.load(Ordering::Relaxed);
    let naive_use = Usage::take(admin_db, mariadb_pid).await?.since(&before);
    naive_check(&naive, args.viewers, naive_gifted.load(Ordering::Relaxed)).await?;

    // (c) End the room; the Settler runs on the Watch's end event.
    let ended = Instant::now();
    admin.end_room(EndRoomRequest { room_id }).await?;
    let settled = loop {
        let s = settlement
            .get_settlement(GetSettlementRequest { room_id })
            .await?
            .into_inner()
            .settlement
            .context("GetSettlement returned no settlement")?;
        if s.state() == SettlementState::Settled {
            break s;
        }
        ensure!(
            ended.elapsed() < Duration::from_secs(60),
            "room {room_id} not settled 60 s after its end (state {:?})",
            s.state()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let settle_ms = ended.elapsed().as_secs_f64() * 1e3;
    let statement = settlement
        .reconcile(ReconcileRequest { room_id })
        .await?
        .into_inner();

    gifts_server.stop().await?;
    rooms_server.stop().await?;
    naive.close().await;

    // Figures.
    let ratio = service.per_sec / baseline.per_sec;
    println!(
        "\n  {:<44} {:>9} {:>8} {:>8} {:>10} {:>11} {:>12} {:>12} {:>10}",
        "one hot room",
        "gifts/s",
        "p50 ms",
        "p99 ms",
        "stmts/gift",
        "lock waits",
        "lock wait ms",
        "fsyncs/1k",
        "CPU us/gift"
    );
    for (name, side, gifts, usage) in [
        (
            "livemesh: SendGift over gRPC",
            &service,
            service_gifts,
            &service_use,
        ),
        (
            "naive: one txn, one database",
            &baseline,
            naive_gifts,
            &naive_use,
        ),
    ] {
        print_side(name, side, gifts, usage);
    }
    println!(
        "  (lock waits and fsyncs: server totals in the window; CPU: mariadbd + this process, \
         which runs every livemesh server and client)"
    );
    println!("  ratio livemesh / naive: {ratio:.2}x");

    println!(
        "\n  settled {settle_ms:.1} ms after EndRoom: gross {}, platform cut {}, streamer credit {}",
        settled.gross, settled.platform_cut, settled.streamer_credit
    );
    println!(
        "  {:>5} {:>13} {:>16} {:>13} {:>12} {:>15} {:>8} {:>10} {:>8}",
        "shard",
        "gifts_debited",
        "virtual_credited",
        "settled",
        "platform_cut",
        "streamer_credit",
        "gift_d",
        "settle_d",
        "virtual"
    );
    let mut difference = 0_i64;
    for s in &statement.shards {
        println!(
            "  {:>5} {:>13} {:>16} {:>13} {:>12} {:>15} {:>8} {:>10} {:>8}",
            s.shard,
            s.gifts_debited,
            s.virtual_credited,
            s.settled,
            s.platform_cut,
            s.streamer_credit,
            s.gift_difference,
            s.settlement_difference,
            s.virtual_balance
        );
        difference +=
            s.gift_difference.abs() + s.settlement_difference.abs() + s.virtual_balance.abs();
    }
    let gifted = gifted.load(Ordering::Relaxed);
    println!(
        "  reconcile: balanced = {}, sum of |differences| and virtual balances = {difference}; \
         gifted through SendGift {gifted}, settled gross {}",
        statement.balanced, settled.gross
    );

    let figures = BTreeMap::from([
        ("gifts_per_s", service.per_sec),
        ("baseline_gifts_per_s", baseline.per_sec),
        ("ratio_vs_baseline", ratio),
        ("gift_p99_ms", service.p99_ms),
        ("baseline_p99_ms", baseline.p99_ms),
        ("gift_p50_ms", service.p50_ms),
        ("baseline_p50_ms", baseline.p50_ms),
        ("settle_ms", settle_ms),
        ("reconcile_difference", difference as f64),
        ("gifts", service_gifts as f64),
        ("baseline_gifts", naive_gifts as f64),
        (
            "statements_per_gift",
            service_use.per(STATUS[0], service_gifts),
        ),
        (
            "baseline_statements_per_gift",
            naive_use.per(STATUS[0], naive_gifts),
        ),
        (
            "gifts_per_commit",
            service_gifts as f64
                / service_use
                    .status
                    .get("Binlog_commits")
                    .copied()
                    .unwrap_or(0.0)
                    .max(1.0),
        ),
        (
            "baseline_gifts_per_commit",
            naive_gifts as f64
                / naive_use
                    .status
                    .get("Binlog_commits")
                    .copied()
                    .unwrap_or(0.0)
                    .max(1.0),
        ),
        ("concurrency", args.concurrency as f64),
        ("shards", args.shards as f64),
    ]);
    if let Some(path) = &args.out.json {
        write_json(path, "gifts", &figures)?;
    }
    if difference != 0 || !statement.balanced {
        bail!("room {room_id} does not reconcile: the differences sum to {difference}");
    }
    if settled.gross != gifted {
        bail!(
            "room {room_id} settled a gross of {} but the bench gifted {gifted}",
            settled.gross
        );
    }
    for db in shard_dbs.iter().chain([&naive_db]) {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE `{db}`")))
            .execute(admin_db)
            .await?;
    }
    Ok(())
}

/// The viewer and the price of gift `n`.
fn pick(n: u64, viewers: u64) -> (u64, i64) {
    let viewer = 1 + n % viewers;
    let price = PRICES[((n / viewers) % PRICES.len() as u64) as usize];
    (viewer, price)
}
