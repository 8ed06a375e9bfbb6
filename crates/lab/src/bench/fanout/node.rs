//! livemesh's side: `livemesh up` as a child process, its viewers, and
//! one layout measured through it.

use crate::bench::helpers::started_room;
use anyhow::{Context as _, bail};
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::subscribe_response::Message;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{RoomEvent, StartRoomRequest, SubscribeRequest, room_event};
use prost::Message as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use super::recorder::{Recorder, parse_sent};
use super::windows::{Target, first_end, measure_windows};
use super::{
    FanoutArgs, Layout, MAX_STREAMS_DEFAULT, MAX_STREAMS_ENV, Measured, OPEN_CONCURRENCY,
    OPEN_RETRIES,
};
use livemesh_live::prom;

/// One livemesh stream in this many asks for write stamps
/// (`stamp_writes`), to time the last hop, written → received, apart from
/// the rest; the others are plain subscribers, as NATS's are.
const STAMPED_EVERY: u64 = 64;

/// `livemesh up` as a child process on a fresh data dir.
pub(super) struct Node {
    child: tokio::process::Child,
    pub(super) pid: u32,
    addr: SocketAddr,
    /// Its Prometheus endpoint.
    metrics: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    pub(super) async fn start(streams_per_connection: u64) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let free_port = || -> std::io::Result<SocketAddr> {
            std::net::TcpListener::bind(("127.0.0.1", 0))?.local_addr()
        };
        let (addr, metrics) = (free_port()?, free_port()?);
        let log = dir.path().join("node.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let mut command = tokio::process::Command::new(std::env::current_exe()?);
        command
            .arg("up")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--log")
            .arg("warn")
            // A port of its own, read for the node's hops.
            .arg("--metrics-listen")
            .arg(metrics.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        if streams_per_connection > MAX_STREAMS_DEFAULT {
            command.env(MAX_STREAMS_ENV, (streams_per_connection + 16).to_string());
        }
        let child = command.spawn().context("starting `livemesh up`")?;
        let pid = child.id().context("the node exited at once")?;
        let mut node = Self {
            child,
            pid,
            addr,
            metrics,
            log,
            _dir: dir,
        };
        node.wait_serving().await?;
        Ok(node)
    }

    pub(super) fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The node's Prometheus endpoint.
    pub(super) fn metrics(&self) -> prom::Endpoint {
        prom::Endpoint {
            authority: self.metrics.to_string(),
            path: "/metrics".into(),
        }
    }

    async fn wait_serving(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("`livemesh up` exited with {status}{}", self.log_tail());
            }
            if let Ok(channel) = Endpoint::from_shared(self.uri())?.connect().await {
                let reply = HealthClient::new(channel)
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await;
                if reply.is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!("`livemesh up` not serving after 30 s{}", self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(20)..].join("\n");
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its log ends:\n{tail}")
        }
    }

    fn rss(&self) -> anyhow::Result<u64> {
        rss_bytes(self.pid)
    }

    /// The RSS once two samples 500 ms apart agree (within 1 MiB or 0.5%),
    /// for at most 15 s; whether it settled.
    async fn settled_rss(&self) -> anyhow::Result<(u64, bool)> {
        let mut previous = self.rss()?;
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let current = self.rss()?;
            if current.abs_diff(previous) <= (1 << 20).max(current / 200) {
                return Ok((current, true));
            }
            previous = current;
        }
        Ok((previous, false))
    }

    pub(super) async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "`livemesh up` exited during the bench with {status}{}",
                self.log_tail()
            );
        }
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .with_context(|| format!("{path} has no VmRSS"))
}

/// One BFF-like HTTP/2 connection.
pub(super) async fn connect(uri: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(uri.to_owned())?
        .initial_connection_window_size(16 << 20)
        .initial_stream_window_size(1 << 20)
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {uri}"))
}

/// Streams that are being opened: how many made it, the first failure.
#[derive(Default)]
pub(super) struct Opening {
    opened: AtomicU64,
    /// Subscribe calls retried after UNAVAILABLE.
    retried: AtomicU64,
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Opening {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert(why);
    }

    /// Waits until `n` streams opened; fails on the first failure or after `limit`.
    pub(super) async fn wait(&self, n: u64, limit: Duration, what: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let (opened, failed) = (
                self.opened.load(Ordering::Acquire),
                self.failed.load(Ordering::Acquire),
            );
            if failed > 0 {
                let why = self
                    .first_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone()
                    .unwrap_or_default();
                bail!("{failed} {what} failed to open ({opened} of {n} open); the first: {why}");
            }
            if opened >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "only {opened} of {n} {what} open after {:.0} s",
                    limit.as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

pub(super) fn open_limit(streams: u64) -> Duration {
    Duration::from_secs(30) + Duration::from_millis(streams)
}

/// One viewer's stream: open it, report `started`, then count events.
pub(super) async fn viewer(
    mut client: SubscribeServiceClient<Channel>,
    request: SubscribeRequest,
    rec: Arc<Recorder>,
    opening: Arc<Opening>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    // UNAVAILABLE says "retry shortly" (a room lookup or the store was
    // slow while the node opens hundreds of thousands of streams): a
    // client does, with a pause; the retries are counted and printed.
    let mut tries = 0;
    let mut stream = loop {
        match client.subscribe(request).await {
            Ok(reply) => break reply.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable && tries < OPEN_RETRIES => {
                tries += 1;
                opening.retried.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100 * tries)).await;
            }
            Err(status) => return opening.fail(format!("Subscribe: {status}")),
        }
    };
    match stream.message().await {
        Ok(Some(first)) if matches!(first.message, Some(Message::Started(_))) => {
            opening.opened.fetch_add(1, Ordering::Release);
        }
        Ok(Some(first)) => {
            return opening.fail(format!(
                "the first message was not `started`: {:?}",
                first.message
            ));
        }
        Ok(None) => return opening.fail("the stream ended before `started`".into()),
        Err(status) => return opening.fail(format!("Subscribe stream: {status}")),
    }
    drop(permit);
    let comment = |event: &RoomEvent| {
        if let Some(room_event::Kind::Comment(comment)) = &event.kind
            && let Some(sent) = parse_sent(comment.text.as_bytes())
        {
            if rec.event_len.load(Ordering::Relaxed) == 0 {
                rec.event_len.store(event.encoded_len(), Ordering::Relaxed);
            }
            rec.received(sent);
        }
    };
    loop {
        match stream.message().await {
            Ok(Some(reply)) => {
                if let Some(written) = reply.written_at {
                    rec.written(livemesh_proto::time::since(written));
                }
                match &reply.message {
                    Some(Message::Event(event)) => comment(event),
                    Some(Message::Batch(batch)) => batch.events.iter().for_each(comment),
                    _ => {}
                }
            }
            Ok(None) => return rec.stream_ended("the server ended a stream".into()),
            Err(status) => return rec.stream_ended(format!("a stream failed: {status}")),
        }
    }
}

pub(super) async fn run_livemesh(
    args: &FanoutArgs,
    layout: &Layout,
    window: Duration,
    payload: &mut usize,
) -> anyhow::Result<Measured> {
    let connections = args.connections() as usize;
    let per_connection = args.streams.div_ceil(args.connections());
    let node = Node::start(per_connection).await?;
    let uri = node.uri();
    let control = connect(&uri).await?;
    let mut admin = RoomAdminServiceClient::new(control.clone());
    let mut room_ids = Vec::with_capacity(layout.rooms());
    for anchor in 0..layout.rooms() as u64 {
        let room = started_room(
            admin
                .start_room(StartRoomRequest {
                    anchor_id: 1_000 + anchor,
                })
                .await,
        )?;
        room_ids.push(room.room_id);
    }
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(connect(&uri).await?);
    }

    // Warm-up: one stream per room, opened and closed.
    let rec = Recorder::new();
    {
        let opening = Arc::new(Opening::default());
        let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
        let mut warm = JoinSet::new();
        for (r, &room_id) in room_ids.iter().enumerate() {
            let permit = gate.clone().acquire_owned().await?;
            warm.spawn(viewer(
                SubscribeServiceClient::new(channels[r % connections].clone()),
                SubscribeRequest {
                    room_id,
                    viewer_id: 100_000_000 + r as u64,
                    ..SubscribeRequest::default()
                },
                rec.clone(),
                opening.clone(),
                permit,
            ));
        }
        opening
            .wait(
                room_ids.len() as u64,
                open_limit(room_ids.len() as u64),
                "warm-up streams",
            )
            .await?;
        warm.shutdown().await;
    }
    let (rss_base, base_settled) = node.settled_rss().await?;

    // The streams.
    let opening = Arc::new(Opening::default());
    let gate = Arc::new(Semaphore::new(OPEN_CONCURRENCY));
    let mut streams = JoinSet::new();
    let opened_at = Instant::now();
    for i in 0..args.streams {
        let permit = gate.clone().acquire_owned().await?;
        streams.spawn(viewer(
            SubscribeServiceClient::new(channels[i as usize % connections].clone()),
            SubscribeRequest {
                room_id: room_ids[i as usize % room_ids.len()],
                viewer_id: 1_000_000 + i,
                stamp_writes: i % STAMPED_EVERY == 0,
                ..SubscribeRequest::default()
            },
            rec.clone(),
            opening.clone(),
            permit,
        ));
        if opening.failed.load(Ordering::Relaxed) > 0 {
            break;
        }
    }
    opening
        .wait(args.streams, open_limit(args.streams), "Subscribe streams")
        .await?;
    let open_s = opened_at.elapsed().as_secs_f64();
    let retried = opening.retried.load(Ordering::Relaxed);
    if retried > 0 {
        println!(
            "  livemesh, {}: {retried} Subscribe calls answered UNAVAILABLE while opening and were retried",
            layout.label
        );
    }
    let (rss_open, open_settled) = node.settled_rss().await?;
    let per_stream = (rss_open as f64 - rss_base as f64) / args.streams as f64;
    println!(
        "  livemesh, {}: {} streams open in {open_s:.1} s ({:.0}/s); node RSS {} -> {} MiB{}: {per_stream:.0} B per idle stream",
        layout.label,
        args.streams,
        args.streams as f64 / open_s,
        rss_base >> 20,
        rss_open >> 20,
        if base_settled && open_settled {
            ""
        } else {
            " (not settled after 15 s)"
        },
    );

    let target = Arc::new(Target::Livemesh {
        client: PublishServiceClient::new(control.clone()),
        rooms: room_ids,
        metrics: node.metrics(),
    });
    let (saturated, paced, rate) = measure_windows(
        args,
        Some(node.pid),
        target,
        &rec,
        &layout.counts,
        window,
        args.rate,
    )
    .await?;
    let seen = rec.event_len.load(Ordering::Relaxed);
    if seen > 0 {
        *payload = seen;
    }
    let lost_streams = rec.ended.load(Ordering::Relaxed);
    if lost_streams > 0 {
        println!(
            "  livemesh, {}: {lost_streams} streams ended early{}",
            layout.label,
            first_end(&rec)
        );
    }
    streams.shutdown().await;
    drop(channels);
    node.stop().await?;
    Ok(Measured {
        open_s,
        saturated,
        paced,
        rate,
        bytes_per_idle_stream: Some(per_stream),
        rss_base: Some(rss_base),
        rss_open: Some(rss_open),
        settled: base_settled && open_settled,
        lost_streams,
    })
}
