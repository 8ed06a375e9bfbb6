//! Each connection's watchdog, [`Tracked`] (see the parent module's doc):
//! run inside the connection's reads, it ends them when the connection
//! stays silent past the handshake timeout, idle past the idle timeout, or
//! idle once the server stops.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::{Connections, DRAIN_GRACE, Shared, count, count_open};
use crate::shutdown::ShutdownSignal;

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
    pub(super) fn call_started(self: &Arc<Self>) -> CallGuard {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.active.store(true, Ordering::SeqCst);
        CallGuard {
            state: self.clone(),
        }
    }
}

/// Held while a call is open; its drop may make the connection idle.
pub(super) struct CallGuard {
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
    pub(super) state: Arc<ConnState>,
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
    pub(super) fn new(io: T, connections: &Connections) -> Self
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
