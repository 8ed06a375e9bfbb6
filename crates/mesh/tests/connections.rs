//! Server connection limits (`[server]`, `server/conn/`; issue 12, defect 4 and
//! the metadata half of defect 6), against real servers on loopback ports:
//! silent sockets are closed after the handshake timeout, idle connections
//! after the idle timeout (never one with an open stream), keepalive PINGs
//! go out and an unanswered one closes the connection, connections past the
//! maximum are closed at once, a request with too much metadata is refused
//! alone, and a stop with a silent connection open finishes at once.
//!
//! Some tests speak raw HTTP/2 (a handful of hand-made frames) to see what a
//! client library would hide: PINGs and the connection's end.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use livemesh_mesh::Shutdown;
use livemesh_mesh::config::{Registry, ServerConfig};
use livemesh_mesh::server::ServerBuilder;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;

/// Longer than any wait below should take: reaching it is the failure.
const PATIENCE: Duration = Duration::from_secs(8);

/// An empty server (health and reflection only) with `limits`.
async fn serve(limits: ServerConfig) -> common::Running {
    let mut server = ServerBuilder::new();
    server.limits(&limits);
    common::serve(server).await
}

/// Reads (and drops) whatever the server sends until it closes the
/// connection; returns when it did, or `None` past `within`.
async fn closed_within(socket: &mut TcpStream, within: Duration) -> Option<Instant> {
    let mut buf = vec![0u8; 64 * 1024];
    tokio::time::timeout(within, async {
        loop {
            match socket.read(&mut buf).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    })
    .await
    .ok()
}

// --- a few raw HTTP/2 frames -------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// HPACK "literal header field without indexing, new name", no Huffman
/// (names and values below 127 bytes).
fn header(block: &mut Vec<u8>, name: &str, value: &str) {
    block.push(0);
    block.push(name.len() as u8);
    block.extend_from_slice(name.as_bytes());
    block.push(value.len() as u8);
    block.extend_from_slice(value.as_bytes());
}

/// Opens a connection and sends one call to `method` of grpc.health.v1
/// with an empty request, on stream 1.
async fn raw_call(addr: SocketAddr, method: &str) -> TcpStream {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let mut block = Vec::new();
    header(&mut block, ":method", "POST");
    header(&mut block, ":scheme", "http");
    header(
        &mut block,
        ":path",
        &format!("/grpc.health.v1.Health/{method}"),
    );
    header(&mut block, ":authority", "localhost");
    header(&mut block, "content-type", "application/grpc");
    header(&mut block, "te", "trailers");
    let mut bytes = PREFACE.to_vec();
    bytes.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    bytes.extend(frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS
    bytes.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0])); // DATA: an empty message, END_STREAM
    socket.write_all(&bytes).await.unwrap();
    socket
}

/// Reads frames until one of `kind` arrives (its arrival time), or the
/// connection closes or `within` passes (`None`).
async fn frame_within(socket: &mut TcpStream, kind: u8, within: Duration) -> Option<Instant> {
    tokio::time::timeout(within, async {
        let mut head = [0u8; 9];
        loop {
            socket.read_exact(&mut head).await.ok()?;
            let len =
                (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
            let mut payload = vec![0u8; len];
            socket.read_exact(&mut payload).await.ok()?;
            if head[3] == kind {
                return Some(Instant::now());
            }
        }
    })
    .await
    .ok()
    .flatten()
}

// --- the tests -------------------------------------------------------------

#[tokio::test]
async fn a_silent_connection_is_closed_after_the_handshake_timeout() {
    let limits = ServerConfig {
        handshake_timeout_ms: 300,
        ..ServerConfig::default()
    };
    let server = serve(limits).await;
    let opened = Instant::now();
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let closed = closed_within(&mut silent, PATIENCE)
        .await
        .expect("a silent connection was never closed");
    assert!(
        closed - opened >= Duration::from_millis(300),
        "closed before the handshake timeout: {:?}",
        closed - opened
    );
    // A connection that speaks is served as usual.
    let status = common::serving_status(&mut common::health(server.addr).await).await;
    assert_eq!(status, ServingStatus::Serving);
}

#[tokio::test]
async fn an_idle_connection_is_closed_but_not_one_with_an_open_stream() {
    let limits = ServerConfig {
        idle_timeout_ms: 300,
        keepalive_interval_ms: 0,
        ..ServerConfig::default()
    };
    let server = serve(limits).await;

    // Watch streams until the server stops: its connection is never idle.
    let mut watching = raw_call(server.addr, "Watch").await;
    // One unary call, then nothing.
    let called = Instant::now();
    let mut idle = raw_call(server.addr, "Check").await;
    let closed = closed_within(&mut idle, PATIENCE)
        .await
        .expect("an idle connection was never closed");
    assert!(
        closed - called >= Duration::from_millis(300),
        "closed before the idle timeout: {:?}",
        closed - called
    );
    // Three idle timeouts later the watching connection is still open. (A
    // negative can only be shown by waiting: nothing happens to await.)
    assert!(
        closed_within(&mut watching, Duration::from_millis(900))
            .await
            .is_none(),
        "a connection with an open stream was closed as idle"
    );
}

#[tokio::test]
async fn keepalive_pings_a_quiet_peer_and_closes_when_it_does_not_answer() {
    let limits = ServerConfig {
        keepalive_interval_ms: 200,
        keepalive_timeout_ms: 200,
        ..ServerConfig::default()
    };
    let server = serve(limits).await;
    // An open stream (so the idle timeout plays no part), then silence: the
    // PING this client never answers.
    let mut quiet = raw_call(server.addr, "Watch").await;
    frame_within(&mut quiet, 0x6, PATIENCE)
        .await
        .expect("no keepalive PING came");
    closed_within(&mut quiet, PATIENCE)
        .await
        .expect("an unanswered keepalive did not close the connection");
}

#[tokio::test]
async fn connections_past_the_maximum_are_closed_at_once() {
    let limits = ServerConfig {
        max_connections: 2,
        handshake_timeout_ms: 60_000,
        ..ServerConfig::default()
    };
    let server = serve(limits).await;
    let first = TcpStream::connect(server.addr).await.unwrap();
    let _second = TcpStream::connect(server.addr).await.unwrap();
    let opened = Instant::now();
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    let closed = closed_within(&mut third, PATIENCE)
        .await
        .expect("a connection past server.max_connections was kept open");
    assert!(
        closed - opened < Duration::from_secs(2),
        "refused late: {:?}",
        closed - opened
    );

    // Once one closes, a new connection is served again (the server
    // notices the close asynchronously: retry until it has).
    drop(first);
    let deadline = Instant::now() + PATIENCE;
    loop {
        let served = async {
            common::health(server.addr)
                .await
                .check(HealthCheckRequest::default())
                .await
        };
        match tokio::time::timeout(Duration::from_secs(1), served).await {
            Ok(Ok(_)) => break,
            _ if Instant::now() < deadline => {}
            other => panic!("no connection is served after one closed: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_request_with_too_much_metadata_is_refused_alone() {
    let server = serve(ServerConfig::default()).await;
    let mut client = common::health(server.addr).await;
    // A stream on the same connection, which must outlive the refusal.
    let mut watch = client
        .watch(HealthCheckRequest::default())
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    // About 70 KB of metadata: past server.max_header_bytes (16 KiB), below
    // the HTTP/2 limit that would reset the whole connection.
    let mut request = tonic::Request::new(HealthCheckRequest::default());
    for i in 0..7 {
        let name: tonic::metadata::MetadataKey<tonic::metadata::Ascii> =
            format!("x-filler-{i}").parse().unwrap();
        request
            .metadata_mut()
            .insert(name, "f".repeat(10_000).parse().unwrap());
    }
    let err = client.check(request).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("server.max_header_bytes"), "{err:?}");

    // The connection and its stream are unharmed: a call with ordinary
    // metadata is answered, and the stream sees the server stop.
    let status = common::serving_status(&mut client).await;
    assert_eq!(status, ServingStatus::Serving);
    server.shutdown.trigger();
    let last = tokio::time::timeout(PATIENCE, watch.message())
        .await
        .expect("the stream saw nothing of the stop")
        .expect("the stream ended with an error")
        .expect("the stream ended without its last status");
    assert_eq!(last.status(), ServingStatus::NotServing);
    drop((watch, client));
    tokio::time::timeout(PATIENCE, server.task)
        .await
        .expect("the server did not stop")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn stopping_with_a_silent_connection_open_finishes_at_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = Shutdown::new();
    let stopped = stop.signal();
    let run = tokio::spawn(livemesh_mesh::shutdown::run_with_drain(
        |signal| ServerBuilder::new().serve(listener, signal),
        stopped,
        Duration::from_secs(30),
    ));
    let _silent = TcpStream::connect(addr).await.unwrap();
    // Accepted in order: once a later connection is served, the silent one
    // is held by the server. That one stays open too, idle after its call.
    let mut client = common::health(addr).await;
    client.check(HealthCheckRequest::default()).await.unwrap();

    let stopping = Instant::now();
    stop.trigger();
    tokio::time::timeout(PATIENCE, run)
        .await
        .expect("the server waited on its idle connections")
        .unwrap()
        .unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "stopping took {:?}",
        stopping.elapsed()
    );
}

#[test]
fn the_limits_are_validated() {
    use livemesh_mesh::config::{Config, Sources};
    for (var, value, named) in [
        (
            "LIVEMESH_SERVER__MAX_CONNECTIONS",
            "0",
            "server.max_connections",
        ),
        (
            "LIVEMESH_SERVER__HANDSHAKE_TIMEOUT_MS",
            "0",
            "server.handshake_timeout_ms",
        ),
        (
            "LIVEMESH_SERVER__MAX_HEADER_BYTES",
            "100",
            "server.max_header_bytes",
        ),
        (
            "LIVEMESH_SERVER__HTTP2_MAX_HEADER_LIST_BYTES",
            "20000",
            "server.http2_max_header_list_bytes",
        ),
    ] {
        let err = Config::load(
            &Registry::new(),
            &Sources {
                env: vec![(var.to_owned(), value.to_owned())],
                ..Sources::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(named), "{var}={value}: {err}");
    }
    let defaults = Config::load(&Registry::new(), &Sources::default())
        .unwrap()
        .server;
    assert!(defaults.max_header_bytes * 2 <= defaults.http2_max_header_list_bytes);
    assert!(defaults.idle_timeout_ms > 0 && defaults.keepalive_interval_ms > 0);
}
