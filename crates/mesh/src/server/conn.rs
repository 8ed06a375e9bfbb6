//! Connection limits of every server (`[server]`): how many connections it
//! holds, how long a connection may stay silent before its first request or
//! idle between calls, how much metadata one request may carry, and closing
//! idle connections at once when the server stops.
//!
//! Three parts work together:
//! - [`Incoming`], the accept loop: it refuses connections past
//!   `server.max_connections` (closed at once, logged and counted), backs off
//!   instead of spinning when the process runs out of file descriptors, turns
//!   Nagle off, and wraps each socket in [`Coalesce`] and then [`Tracked`].
//! - [`Tracked`], each connection's watchdog, run inside its reads (hyper
//!   always has a read pending on a connection, and during a TLS handshake
//!   so does rustls): a connection that has not made its first request
//!   within `server.handshake_timeout_ms` (TLS and HTTP/2 handshakes
//!   included), or that has had no call open for `server.idle_timeout_ms`,
//!   reads end-of-file, and hyper closes it. A long-lived stream (Subscribe,
//!   Watch) is an open call: its connection is never idle. When the server
//!   stops, a connection that never made a request is closed at once, and
//!   one without an open call shortly after (HTTP/2's graceful shutdown
//!   usually closes it first).
//! - [`ConnLayer`], the server layer that tells the watchdog when calls open
//!   and close (a call is open until its response body ends), and refuses a
//!   request whose metadata is over `server.max_header_bytes` with
//!   `RESOURCE_EXHAUSTED` on that request alone. HTTP/2 itself is told a far
//!   larger limit (`server.http2_max_header_list_bytes`): past that one, h2
//!   resets the whole connection, and every call multiplexed on it with it.
//!
//! A closed connection is closed without GOAWAY (the watchdog only sees
//! bytes): a call sent at the very moment its connection is closed for
//! idleness fails before it reached a handler, which is what clients retry.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tonic::body::Body;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use super::coalesce::Coalesce;
use crate::config::ServerConfig;
use crate::shutdown::ShutdownSignal;

/// How long the accept loop pauses when the process is out of file
/// descriptors (or the kernel out of buffers): retrying at once would spin a
/// core while nothing can be accepted.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// When the server stops, a connection that has made requests and has no
/// call open is closed this long after the stop (or its last call's end),
/// if HTTP/2's graceful shutdown has not closed it by then.
const DRAIN_GRACE: Duration = Duration::from_millis(500);

/// A warning about refused connections is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The connection limits, read from `[server]`.
#[derive(Debug, Clone)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    /// `None`: a connection may stay idle forever.
    pub idle_timeout: Option<Duration>,
    pub max_header_bytes: usize,
}

impl From<&ServerConfig> for ConnLimits {
    fn from(config: &ServerConfig) -> Self {
        Self {
            max_connections: config.max_connections as usize,
            handshake_timeout: Duration::from_millis(config.handshake_timeout_ms),
            idle_timeout: (config.idle_timeout_ms > 0)
                .then(|| Duration::from_millis(config.idle_timeout_ms)),
            max_header_bytes: config.max_header_bytes as usize,
        }
    }
}

/// The connections of one listener: their count, their limits, and the
/// signal that closes the idle ones when the server stops.
#[derive(Clone)]
pub struct Connections {
    shared: Arc<Shared>,
}

struct Shared {
    limits: ConnLimits,
    open: AtomicUsize,
    closing: crate::Shutdown,
    /// Milliseconds since `started` of the last refusal warning.
    last_warning_ms: AtomicU64,
    started: Instant,
}

impl Connections {
    pub fn new(limits: ConnLimits) -> Self {
        Self {
            shared: Arc::new(Shared {
                limits,
                open: AtomicUsize::new(0),
                closing: crate::Shutdown::new(),
                last_warning_ms: AtomicU64::new(0),
                started: Instant::now(),
            }),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Closes every connection without an open call, now (or, for one that
    /// has made requests, within [`DRAIN_GRACE`]) and after each one's last
    /// call ends. The server calls it when its graceful shutdown
    /// starts (after the shutdown hooks, which may still make calls through
    /// this very server), so idle connections do not hold the drain.
    pub fn close_idle(&self) {
        self.shared.closing.trigger();
    }

    /// Accepts connections from `listener` within the limits.
    pub fn incoming(&self, listener: TcpListener) -> Incoming {
        Incoming {
            listener,
            connections: self.clone(),
            backoff: None,
        }
    }

    /// The layer that tracks calls per connection and bounds request metadata.
    pub fn layer(&self) -> ConnLayer {
        ConnLayer {
            max_header_bytes: self.shared.limits.max_header_bytes,
        }
    }

    /// Logs a warning at most every [`WARN_EVERY`].
    fn should_warn(&self) -> bool {
        let now = self.shared.started.elapsed().as_millis() as u64;
        let last = self.shared.last_warning_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= WARN_EVERY.as_millis() as u64)
            && self
                .shared
                .last_warning_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

fn count(name: &'static str, description: &'static str, reason: &'static str) {
    // Looked up per event (connections, not calls), so a meter provider
    // installed after the server started still counts it.
    opentelemetry::global::meter("livemesh")
        .u64_counter(name)
        .with_description(description)
        .build()
        .add(1, &[opentelemetry::KeyValue::new("reason", reason)]);
}

fn count_open(delta: i64) {
    opentelemetry::global::meter("livemesh")
        .i64_up_down_counter("livemesh.server.connections")
        .with_description("Connections a server holds open")
        .build()
        .add(delta, &[]);
}

/// The accept loop's stream of connections (see the module doc).
pub struct Incoming {
    listener: TcpListener,
    connections: Connections,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Stream for Incoming {
    type Item = io::Result<Tracked<Coalesce<TcpStream>>>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(backoff) = &mut this.backoff {
                futures::ready!(backoff.as_mut().poll(cx));
                this.backoff = None;
            }
            let (stream, peer) = match futures::ready!(this.listener.poll_accept(cx)) {
                Ok(accepted) => accepted,
                Err(err) if out_of_resources(&err) => {
                    if this.connections.should_warn() {
                        tracing::warn!(
                            %err,
                            open = this.connections.open(),
                            "cannot accept connections: out of file descriptors or memory; \
                             lower server.max_connections or raise the process's file limit"
                        );
                    }
                    count(
                        "livemesh.server.connections.refused",
                        "Connections a server closed at once or could not accept",
                        "out_of_resources",
                    );
                    this.backoff = Some(Box::pin(tokio::time::sleep(ACCEPT_BACKOFF)));
                    continue;
                }
                // A peer that gave up before we accepted it: nothing to do.
                Err(err) => {
                    tracing::debug!(%err, "accept failed");
                    continue;
                }
            };
            let shared = &this.connections.shared;
            let max = shared.limits.max_connections;
            if shared.open.load(Ordering::SeqCst) >= max {
                drop(stream);
                if this.connections.should_warn() {
                    tracing::warn!(
                        %peer,
                        max,
                        "connection refused: the server holds server.max_connections connections"
                    );
                }
                count(
                    "livemesh.server.connections.refused",
                    "Connections a server closed at once or could not accept",
                    "max_connections",
                );
                continue;
            }
            // Nagle's algorithm must be off on every accepted socket: with
            // it, a reply written in several frames waits for the peer's
            // delayed ACK (~40 ms).
            if let Err(err) = stream.set_nodelay(true) {
                tracing::debug!(%err, "cannot set TCP_NODELAY");
            }
            return Poll::Ready(Some(Ok(Tracked::new(
                Coalesce::new(stream),
                &this.connections,
            ))));
        }
    }
}

fn out_of_resources(err: &io::Error) -> bool {
    // EMFILE, ENFILE, ENOBUFS, ENOMEM.
    matches!(err.raw_os_error(), Some(24 | 23 | 105 | 12))
        || err.kind() == io::ErrorKind::OutOfMemory
}

/// What one connection's watchdog and its calls share.
#[derive(Debug)]
pub struct ConnState {
    /// Calls open on the connection (a call is open until its response ends).
    calls: AtomicUsize,
    /// The connection has made its first request.
    active: AtomicBool,
    /// When the last call ended, in nanoseconds since `accepted`.
    idle_since_ns: AtomicU64,
    accepted: Instant,
    /// The connection's reader, woken when its last call ends.
    reader: AtomicWaker,
}

impl ConnState {
    fn call_started(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.active.store(true, Ordering::SeqCst);
        CallGuard {
            state: self.clone(),
        }
    }
}

/// Held while a call is open; its drop may make the connection idle.
struct CallGuard {
    state: Arc<ConnState>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let state = &self.state;
        let since = state.accepted.elapsed().as_nanos() as u64;
        state.idle_since_ns.store(since, Ordering::SeqCst);
        if state.calls.fetch_sub(1, Ordering::SeqCst) == 1 {
            state.reader.wake();
        }
    }
}

/// The connect info of a tracked connection: the TCP peer and the state its
/// calls share with its watchdog.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub tcp: TcpConnectInfo,
    state: Arc<ConnState>,
}

/// Why a watchdog closed its connection.
#[derive(Debug, Clone, Copy)]
enum Close {
    Handshake,
    Idle,
    Shutdown,
}

impl Close {
    fn reason(self) -> &'static str {
        match self {
            Close::Handshake => "handshake_timeout",
            Close::Idle => "idle_timeout",
            Close::Shutdown => "shutdown",
        }
    }
}

/// A connection with its watchdog (see the module doc).
pub struct Tracked<T> {
    io: T,
    state: Arc<ConnState>,
    shared: Arc<Shared>,
    timer: Pin<Box<Sleep>>,
    /// Fires when the server closes its idle connections; `None` once it has.
    closing: Option<ShutdownSignal>,
    /// Since when the server is closing its idle connections.
    draining: Option<Instant>,
    /// The watchdog closed the connection: every read is end-of-file.
    closed: bool,
    peer: Option<std::net::SocketAddr>,
}

impl<T> Tracked<T> {
    fn new(io: T, connections: &Connections) -> Self
    where
        T: Connected<ConnectInfo = TcpConnectInfo>,
    {
        let shared = connections.shared.clone();
        shared.open.fetch_add(1, Ordering::SeqCst);
        count_open(1);
        let accepted = Instant::now();
        let peer = io.connect_info().remote_addr();
        Self {
            io,
            state: Arc::new(ConnState {
                calls: AtomicUsize::new(0),
                active: AtomicBool::new(false),
                idle_since_ns: AtomicU64::new(0),
                accepted,
                reader: AtomicWaker::new(),
            }),
            closing: Some(shared.closing.signal()),
            shared,
            timer: Box::pin(tokio::time::sleep_until(accepted)),
            draining: None,
            closed: false,
            peer,
        }
    }

    /// Whether the connection must close now; otherwise arranges to be
    /// polled again when that may change (a deadline, the last call
    /// ending, the server closing idle connections).
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Option<Close> {
        self.state.reader.register(cx.waker());
        if let Some(closing) = &mut self.closing
            && closing.as_mut().poll(cx).is_ready()
        {
            self.closing = None;
            self.draining = Some(Instant::now());
        }
        loop {
            let state = &self.state;
            let idle = state.calls.load(Ordering::SeqCst) == 0;
            if !idle {
                return None;
            }
            let active = state.active.load(Ordering::SeqCst);
            let idle_since =
                state.accepted + Duration::from_nanos(state.idle_since_ns.load(Ordering::SeqCst));
            let (deadline, why) = match (self.draining, active) {
                // Nothing in HTTP/2 ends a connection still in its handshake
                // (hyper waits for it to finish): it goes now.
                (Some(_), false) => return Some(Close::Shutdown),
                // HTTP/2's graceful shutdown (GOAWAY, a PING, close once the
                // calls end) closes the others, unless the peer never
                // answers the PING. Ending reads the moment the last call
                // ends could drop its trailers, still queued in h2: a
                // moment's grace, then it goes.
                (Some(draining), true) => (draining.max(idle_since) + DRAIN_GRACE, Close::Shutdown),
                (None, false) => (
                    state.accepted + self.shared.limits.handshake_timeout,
                    Close::Handshake,
                ),
                (None, true) => match self.shared.limits.idle_timeout {
                    Some(idle_timeout) => (idle_since + idle_timeout, Close::Idle),
                    None => return None,
                },
            };
            if Instant::now() >= deadline {
                return Some(why);
            }
            if self.timer.deadline() != deadline {
                self.timer.as_mut().reset(deadline);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return None;
            }
        }
    }
}

impl<T> Drop for Tracked<T> {
    fn drop(&mut self) {
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
        count_open(-1);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.closed {
            return Poll::Ready(Ok(()));
        }
        if let Some(why) = this.poll_close(cx) {
            // End-of-file: hyper (or the TLS handshake) ends the connection.
            this.closed = true;
            tracing::debug!(peer = ?this.peer, reason = why.reason(), "closing a connection");
            count(
                "livemesh.server.connections.closed",
                "Connections a server closed: silent past the handshake timeout, idle past \
                 the idle timeout, or idle when the server stopped",
                why.reason(),
            );
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: Connected<ConnectInfo = TcpConnectInfo>> Connected for Tracked<T> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            tcp: self.io.connect_info(),
            state: self.state.clone(),
        }
    }
}

/// The server layer of [`Connections`]: see the module doc.
#[derive(Debug, Clone)]
pub struct ConnLayer {
    max_header_bytes: usize,
}

impl<S> Layer<S> for ConnLayer {
    type Service = ConnService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnService {
            inner,
            max_header_bytes: self.max_header_bytes,
        }
    }
}

/// The service [`ConnLayer`] builds.
#[derive(Debug, Clone)]
pub struct ConnService<S> {
    inner: S,
    max_header_bytes: usize,
}

/// A request's metadata size as HTTP/2 counts it (RFC 9113 §6.5.2: each
/// field's name and value plus 32), pseudo-headers included.
fn header_list_size<B>(request: &http::Request<B>) -> usize {
    let pseudo = [":method", ":scheme", ":authority", ":path"];
    let uri = request.uri();
    let pseudo_values = request.method().as_str().len()
        + uri.scheme_str().map_or(0, str::len)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len());
    let pseudo_size: usize =
        pseudo.iter().map(|name| name.len() + 32).sum::<usize>() + pseudo_values;
    request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum::<usize>()
        + pseudo_size
}

impl<S> Service<http::Request<Body>> for ConnService<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let extensions = request.extensions();
        let state = extensions
            .get::<ConnInfo>()
            .or_else(|| {
                extensions
                    .get::<TlsConnectInfo<ConnInfo>>()
                    .map(TlsConnectInfo::get_ref)
            })
            .map(|info| info.state.clone());
        let guard = state.map(|state| state.call_started());
        let size = header_list_size(&request);
        if size > self.max_header_bytes {
            let max = self.max_header_bytes;
            tracing::debug!(size, max, path = %crate::excerpt(request.uri().path()), "request metadata over the limit");
            let status = tonic::Status::resource_exhausted(format!(
                "the request's metadata is {size} bytes, over this server's limit of {max} \
                 bytes (server.max_header_bytes); send less metadata"
            ));
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        // The inner service was made ready by `poll_ready`; take it and
        // leave a fresh clone (tower's usual pattern for boxed futures).
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let response = inner.call(request).await?;
            Ok(match guard {
                Some(guard) => response.map(|body| Body::new(GuardedBody { body, guard })),
                None => response,
            })
        })
    }
}

/// A response body that keeps its call open until it ends.
struct GuardedBody {
    body: Body,
    #[allow(dead_code)] // held for its drop
    guard: CallGuard,
}

impl HttpBody for GuardedBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
