//! `bench rpc`: what a call through the mesh's own client and server stacks
//! costs next to the same call through a bare tonic channel and server.
//!
//! Both sides serve the same trivial handler (`OngoingQueryService.GetRoom`
//! answering a fixed room: a small body, no store) on a loopback port of
//! this process, and both are called from this process over one HTTP/2
//! connection, so the only difference is the middleware: on the mesh side
//! `ClientStack` (client span and metrics, credential, body buffering,
//! retry budget, breaker, deadline) and `ServerBuilder` (server span and
//! metrics, load shedding, authentication); on the bare side none of it.
//! Telemetry is installed as every service installs it (`telemetry::init`
//! with the default log filter; no metrics endpoint), so spans and metrics
//! cost what they cost in production.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use livemesh_mesh::auth::{AuthConfig, AuthMode, Secret, Security, policy};
use livemesh_mesh::config::{ClientConfig, TelemetryConfig};
use livemesh_mesh::server::{LocalServer, ServerBuilder, ServiceSet};
use livemesh_mesh::{ClientStack, Shutdown};
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::ongoing_query_service_server::{
    OngoingQueryService, OngoingQueryServiceServer,
};
use livemesh_proto::v1::{
    GetRoomRequest, GetRoomResponse, ListOngoingRequest, ListOngoingResponse, PartitionRequest,
    PartitionResponse, Room, RoomStatus, WatchRequest, WatchResponse,
};
use tonic::{Request, Response, Status};

use super::helpers::{FiguresFile, Side, cpu_seconds, measure, write_json};
use crate::report::model::Distribution;

/// Options of `bench rpc`.
#[derive(Debug, clap::Args)]
pub struct RpcArgs {
    #[command(flatten)]
    pub out: FiguresFile,
    /// Seconds the whole bench takes (five phases of equal length).
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Concurrent callers of the throughput phases (the latency phases
    /// have one).
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
}

/// The handler both servers run: a fixed room, nothing else.
#[derive(Debug, Clone, Copy)]
struct Fixed;

#[tonic::async_trait]
impl OngoingQueryService for Fixed {
    async fn get_room(
        &self,
        request: Request<GetRoomRequest>,
    ) -> Result<Response<GetRoomResponse>, Status> {
        let room_id = request.into_inner().room_id;
        Ok(Response::new(GetRoomResponse {
            room: Some(Room {
                room_id,
                anchor_id: 7,
                status: RoomStatus::Ongoing as i32,
                started_at: None,
                ended_at: None,
                version: 1,
            }),
        }))
    }

    async fn list_ongoing(
        &self,
        _request: Request<ListOngoingRequest>,
    ) -> Result<Response<ListOngoingResponse>, Status> {
        Err(Status::unimplemented("bench rpc serves GetRoom only"))
    }

    async fn partition(
        &self,
        _request: Request<PartitionRequest>,
    ) -> Result<Response<PartitionResponse>, Status> {
        Err(Status::unimplemented("bench rpc serves GetRoom only"))
    }

    type WatchStream = futures::stream::Empty<Result<WatchResponse, Status>>;

    async fn watch(
        &self,
        _request: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented("bench rpc serves GetRoom only"))
    }
}

/// The handler as a mesh service set, under `security`.
struct MeshSide(Security);

impl ServiceSet for MeshSide {
    fn register(&self, server: &mut ServerBuilder) {
        server.secure(&self.0);
        server.add_service(OngoingQueryServiceServer::new(Fixed));
    }
}

/// A bare tonic server of the same handler (`TCP_NODELAY` as on the mesh side).
async fn bare_server() -> anyhow::Result<(SocketAddr, Shutdown)> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let shutdown = Shutdown::new();
    let signal = shutdown.signal();
    tokio::spawn(async move {
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        if let Err(err) = tonic::transport::Server::builder()
            .add_service(OngoingQueryServiceServer::new(Fixed))
            .serve_with_incoming_shutdown(incoming, signal)
            .await
        {
            eprintln!("bench rpc: the bare server failed: {err}");
        }
    });
    Ok((addr, shutdown))
}

/// One phase of `call`s from `concurrency` callers, and the CPU this
/// process spent on it in microseconds per call.
async fn phase<F, Fut>(concurrency: usize, length: Duration, call: F) -> anyhow::Result<(Side, f64)>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    // Warm up: the connection, the breaker's window, the allocator.
    for n in 0..200 {
        call(n).await.context("a warm-up call failed")?;
    }
    let cpu_before = cpu_seconds(None);
    let calls = Arc::new(AtomicU64::new(0));
    let side = measure(concurrency, length, {
        let calls = calls.clone();
        move |n| {
            let done = call(n);
            let calls = calls.clone();
            async move {
                done.await?;
                calls.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    })
    .await?;
    let cpu = match (cpu_seconds(None), cpu_before) {
        (Some(after), Some(before)) => {
            (after - before) * 1e6 / calls.load(Ordering::Relaxed).max(1) as f64
        }
        _ => f64::NAN,
    };
    Ok((side, cpu))
}

/// One GetRoom through `client`, checking the answer.
async fn get_room<T>(mut client: OngoingQueryServiceClient<T>, room_id: u64) -> anyhow::Result<()>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::ResponseBody: tonic::codegen::Body<Data = tonic::codegen::Bytes> + Send + 'static,
    <T::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    T::Error: Into<tonic::codegen::StdError>,
{
    let room = client
        .get_room(GetRoomRequest { room_id })
        .await?
        .into_inner()
        .room
        .context("GetRoom answered no room")?;
    ensure!(room.room_id == room_id, "GetRoom answered another room");
    Ok(())
}

pub async fn run(args: RpcArgs) -> anyhow::Result<()> {
    ensure!(
        args.concurrency > 0 && args.duration >= 5,
        "--concurrency must be positive and --duration at least 5"
    );
    // As every service does (see `main_shape`): the default log filter and
    // the global meter provider; no scrape endpoint.
    let _telemetry = livemesh_mesh::telemetry::init(
        &TelemetryConfig {
            metrics_listen: String::new(),
            ..TelemetryConfig::default()
        },
        "livemesh-bench-rpc",
    )?;
    let length = Duration::from_secs(args.duration) / 5;
    let any = SocketAddr::from(([127, 0, 0, 1], 0));

    // A fresh secret per run, longer than the 32 bytes a secret needs.
    let secret = format!(
        "bench-rpc-secret-{:016x}-{:016x}",
        std::process::id(),
        livemesh_mesh::now_ms()
    );
    let enforce = Security::from_config(&AuthConfig {
        mode: AuthMode::Enforce,
        token_secret: Some(Secret::new(secret)),
        ..AuthConfig::default()
    })?;
    let dev_server = LocalServer::start(MeshSide(Security::dev()), any).await?;
    let enforce_server = LocalServer::start(MeshSide(enforce.clone()), any).await?;
    let (bare_addr, bare_shutdown) = bare_server().await?;

    let client_config = ClientConfig::default();
    let dev_client = OngoingQueryServiceClient::new(
        ClientStack::new(&client_config).channel(&dev_server.uri())?,
    );
    // A mesh service's own stack: its token on every call.
    let enforce_client = OngoingQueryServiceClient::new(
        ClientStack::new(&client_config)
            .secured(&enforce, policy::COUNTER)?
            .channel(&enforce_server.uri())?,
    );
    let bare_channel = tonic::transport::Endpoint::from_shared(format!("http://{bare_addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await
        .context("connecting to the bare server")?;
    let bare_client = OngoingQueryServiceClient::new(bare_channel);

    let loadavg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "bench rpc: GetRoom (a small body), {} callers then 1, {:.1} s per phase; load {}",
        args.concurrency,
        length.as_secs_f64(),
        loadavg
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let bare = {
        let client = bare_client.clone();
        move |n| get_room(client.clone(), n)
    };
    let dev = {
        let client = dev_client.clone();
        move |n| get_room(client.clone(), n)
    };
    let enforced = move |n| get_room(enforce_client.clone(), n);
    let (bare_many, bare_cpu) = phase(args.concurrency, length, bare.clone()).await?;
    let (dev_many, dev_cpu) = phase(args.concurrency, length, dev.clone()).await?;
    let (enforced, enforce_cpu) = phase(args.concurrency, length, enforced).await?;
    let (bare_one, _) = phase(1, length, bare).await?;
    let (dev_one, _) = phase(1, length, dev).await?;
    let (bare, dev) = (bare_many, dev_many);

    dev_server.stop().await?;
    enforce_server.stop().await?;
    bare_shutdown.trigger();

    println!(
        "  {:<44} {:>10} {:>9} {:>9} {:>12}",
        "side", "calls/s", "p50 ms", "p99 ms", "CPU us/call"
    );
    for (name, side, cpu) in [
        (
            format!("bare tonic, {} callers", args.concurrency),
            &bare,
            Some(bare_cpu),
        ),
        (
            format!("mesh stacks, auth dev, {} callers", args.concurrency),
            &dev,
            Some(dev_cpu),
        ),
        (
            format!("mesh stacks, auth enforce, {} callers", args.concurrency),
            &enforced,
            Some(enforce_cpu),
        ),
        ("bare tonic, 1 caller".to_owned(), &bare_one, None),
        ("mesh stacks, auth dev, 1 caller".to_owned(), &dev_one, None),
    ] {
        println!(
            "  {name:<44} {:>10.0} {:>9.3} {:>9.3} {:>12}",
            side.per_sec,
            side.p50_ms,
            side.p99_ms,
            cpu.map_or_else(|| "-".to_owned(), |c| format!("{c:.1}"))
        );
    }
    let ratio = dev.per_sec / bare.per_sec;
    let enforce_ratio = enforced.per_sec / bare.per_sec;
    println!(
        "  (CPU: this process, which runs both the client and the server of each side)\n  \
         calls/s vs bare: {ratio:.2}x (auth dev), {enforce_ratio:.2}x (auth enforce); \
         1-caller p99 {:.3} ms vs {:.3} ms bare",
        dev_one.p99_ms, bare_one.p99_ms
    );

    let figures = BTreeMap::from([
        ("calls_per_s", dev.per_sec),
        ("bare_calls_per_s", bare.per_sec),
        ("enforce_calls_per_s", enforced.per_sec),
        ("ratio_vs_bare", ratio),
        ("enforce_ratio_vs_bare", enforce_ratio),
        ("p50_ms", dev_one.p50_ms),
        ("p99_ms", dev_one.p99_ms),
        ("bare_p50_ms", bare_one.p50_ms),
        ("bare_p99_ms", bare_one.p99_ms),
        ("loaded_p99_ms", dev.p99_ms),
        ("bare_loaded_p99_ms", bare.p99_ms),
        ("cpu_us_per_call", dev_cpu),
        ("enforce_cpu_us_per_call", enforce_cpu),
        ("bare_cpu_us_per_call", bare_cpu),
        ("concurrency", args.concurrency as f64),
    ]);
    let distributions = [
        Distribution::new("GetRoom, 1 caller")
            .with(
                "mesh stacks (auth dev)",
                false,
                dev_one.latencies.percentiles(),
            )
            .with("bare tonic", true, bare_one.latencies.percentiles()),
        Distribution::new(format!("GetRoom, {} callers", args.concurrency))
            .with("mesh stacks (auth dev)", false, dev.latencies.percentiles())
            .with(
                "mesh stacks (auth enforce)",
                false,
                enforced.latencies.percentiles(),
            )
            .with("bare tonic", true, bare.latencies.percentiles()),
    ];
    if let Some(path) = &args.out.json {
        write_json(path, "rpc", &figures, &distributions)?;
    }
    Ok(())
}
