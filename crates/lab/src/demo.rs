//! `livemesh demo`: the whole mesh in this process, driven through the real
//! gRPC clients: first a short scripted walkthrough, then a live broadcast
//! to a crowd. Every step checks what it got, so the demo fails loudly when
//! the mesh misbehaves.
//!
//! [`script`] lists the walkthrough's steps; each is one function that
//! prints its title, what it got, and fails unless it got what it
//! expected: the rooms' steps in `rooms`, the live room's viewers in
//! `stream` (on the viewer tasks of `viewers`), loves, gifts and the
//! settlement in `money`. The broadcast is `broadcast` (its crowd in
//! `crowd`, what the crowd does in `traffic`).

mod broadcast;
mod crowd;
mod money;
mod rooms;
mod stream;
mod traffic;
mod viewers;

pub use broadcast::Broadcast;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use livemesh_gift_settler::GiftsConfig;
use livemesh_mesh::config::TelemetryConfig;
use livemesh_mesh::server::{LocalServer, ServiceSet};
use livemesh_mesh::{ClientStack, Config, MeshChannel};
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::gifts_service_client::GiftsServiceClient;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::settlement_service_client::SettlementServiceClient;
use livemesh_subscribe::SubscribeConfig;
use tonic_health::pb::health_client::HealthClient;

/// How often the demo's subscribe node reports viewer counts.
const REPORT_INTERVAL_MS: u64 = 250;

/// The longest the script waits for viewers to see something.
const VIEWER_WAIT: Duration = Duration::from_secs(3);

/// The longest the script waits for a room's settlement after its end, and
/// how often it asks meanwhile.
const SETTLE_WAIT: Duration = Duration::from_secs(10);
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// What `livemesh demo` runs.
#[derive(Debug, Clone, Default)]
pub struct DemoArgs {
    /// Keep the SQLite files here instead of a temporary directory.
    pub data_dir: Option<PathBuf>,
    pub walkthrough: bool,
    /// The broadcast after the walkthrough, if any.
    pub live: Option<Broadcast>,
}

/// Runs the demo against the services `mesh` builds (the all-in-one mesh
/// of the product).
pub async fn run<S, F>(args: DemoArgs, mesh: impl FnOnce(Config) -> F) -> anyhow::Result<()>
where
    S: ServiceSet + Send + 'static,
    F: Future<Output = anyhow::Result<S>>,
{
    let began = std::time::Instant::now();
    // While the live view is redrawn in place, a warning written to the
    // same terminal would tear it: only errors then (RUST_LOG still wins).
    let in_place = args
        .live
        .as_ref()
        .is_some_and(|live| !live.plain && std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let telemetry = livemesh_mesh::telemetry::init(
        &TelemetryConfig {
            log: if in_place { "error" } else { "warn" }.into(),
            // The demo is a short run in the foreground: no metrics
            // endpoint; its live view reads the process's metrics directly.
            metrics_listen: String::new(),
            ..TelemetryConfig::default()
        },
        "livemesh-demo",
    )?;
    let temp = tempfile::tempdir().context("creating a temporary data dir")?;
    let data_dir = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_owned());
    let config = Config {
        data_dir: data_dir.clone(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        ..Config::default()
    }
    // Viewer counts every quarter second rather than every two, so the
    // demo's viewers see them change within its few seconds.
    .with(SubscribeConfig {
        report_interval_ms: REPORT_INTERVAL_MS,
        ..SubscribeConfig::default()
    });
    let server = LocalServer::bind_then(config.listen, |addr| {
        mesh(Config {
            listen: addr,
            ..config.clone()
        })
    })
    .await?;
    println!(
        "livemesh demo: all services in one process on {}, data in {}",
        server.addr(),
        data_dir.display()
    );
    let channel = ClientStack::new(&config.client).channel(&server.uri())?;
    // The demo also plays the gift-settler once, to show what a committed
    // gift's event looks like before the real gifts further down.
    let as_gift_settler = ClientStack::new(&config.client)
        .secured(
            &livemesh_mesh::auth::Security::dev(),
            livemesh_mesh::auth::policy::GIFT_SETTLER,
        )?
        .channel(&server.uri())?;
    let platform_cut_bps = config.section::<GiftsConfig>().platform_cut_bps;
    let result = async {
        if args.walkthrough {
            script(channel.clone(), as_gift_settler, platform_cut_bps).await?;
        }
        if let Some(plan) = &args.live {
            let metrics = telemetry
                .metrics()
                .context("the demo's metrics are not installed")?;
            // The viewers' connections, as BFFs would hold them: the
            // script's own and as many more as asked.
            let mut channels = vec![channel.clone()];
            for _ in 1..plan.connections.max(1) {
                channels.push(ClientStack::new(&config.client).channel(&server.uri())?);
            }
            let mut c = Clients::new(channel);
            broadcast::run(&mut c, channels, metrics, plan, platform_cut_bps).await?;
        }
        anyhow::Ok(())
    }
    .await;
    server.stop().await?;
    match &result {
        Ok(()) => println!(
            "\ndemo complete in {:.1} s: every step got the answer it expected.",
            began.elapsed().as_secs_f64()
        ),
        Err(err) => println!("\ndemo FAILED: {err:#}"),
    }
    result
}

/// The script: every step in order, each checking what it got. The rooms'
/// life is told around the second room's viewers and the third room's money.
async fn script(
    channel: MeshChannel,
    as_gift_settler: MeshChannel,
    platform_cut_bps: u32,
) -> anyhow::Result<()> {
    let mut c = Clients::new(channel);
    rooms::health(&mut c).await?;
    let mut watch = rooms::watch(&mut c).await?;
    let started = rooms::start_rooms(&mut c).await?;
    rooms::get_room(&mut c, &started[0]).await?;
    rooms::lobby(&mut c, &started).await?;
    rooms::partition(&mut c, &started).await?;
    rooms::end_first(&mut c, &started[0]).await?;
    rooms::mistakes(&mut c, &started[0]).await?;
    let mut live = stream::subscribe(&c, started[1].room_id, started[0].room_id).await?;
    stream::comments_and_gift(&mut c, &mut live, as_gift_settler).await?;
    stream::resume(&mut c, &mut live).await?;
    money::loves(&mut c, &mut live.audience).await?;
    let gross = money::gifts(&mut c, &started[2]).await?;
    rooms::end_the_others(&mut c, &started[1..]).await?;
    stream::streams_closed(&mut live).await?;
    rooms::watcher_saw_everything(&mut watch, &started).await?;
    money::settlement_statement(
        &mut c.settlement,
        &mut c.gifts,
        started[2].room_id,
        gross,
        platform_cut_bps,
    )
    .await
}

/// The script's clients, all on one channel to the mesh.
struct Clients {
    channel: MeshChannel,
    health: HealthClient<MeshChannel>,
    admin: RoomAdminServiceClient<MeshChannel>,
    query: OngoingQueryServiceClient<MeshChannel>,
    counter: CounterServiceClient<MeshChannel>,
    publish: PublishServiceClient<MeshChannel>,
    gifts: GiftsServiceClient<MeshChannel>,
    settlement: SettlementServiceClient<MeshChannel>,
}

impl Clients {
    fn new(channel: MeshChannel) -> Self {
        Self {
            health: HealthClient::new(channel.clone()),
            admin: RoomAdminServiceClient::new(channel.clone()),
            query: OngoingQueryServiceClient::new(channel.clone()),
            counter: CounterServiceClient::new(channel.clone()),
            publish: PublishServiceClient::new(channel.clone()),
            gifts: GiftsServiceClient::new(channel.clone()),
            settlement: SettlementServiceClient::new(channel.clone()),
            channel,
        }
    }
}

fn step(title: &str) {
    println!("\n> {title}");
}

async fn expect_error<T>(
    what: &str,
    call: impl Future<Output = Result<T, tonic::Status>>,
    code: tonic::Code,
) -> anyhow::Result<()> {
    match call.await {
        Ok(_) => bail!("{what}: succeeded, expected {code:?}"),
        Err(status) if status.code() == code => {
            println!("  {what}: {:?} \"{}\"", status.code(), status.message());
            Ok(())
        }
        Err(status) => bail!("{what}: got {status:?}, expected {code:?}"),
    }
}

/// `HH:MM:SS.mmm UTC` of epoch milliseconds.
fn clock(ms: i64) -> String {
    let day_ms = ms.rem_euclid(86_400_000);
    format!(
        "{:02}:{:02}:{:02}.{:03} UTC",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1_000 % 60,
        day_ms % 1_000
    )
}
