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
//!
//! This file holds the limits, the count of open connections and the
//! accept loop; `watchdog.rs` the watchdog, `layer.rs` the layer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use super::coalesce::Coalesce;
use crate::config::ServerConfig;

mod layer;
mod watchdog;

pub use layer::ConnLayer;
pub use watchdog::{ConnInfo, Tracked};

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
        ConnLayer::new(self.shared.limits.max_header_bytes)
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
