//! A TCP proxy for chaos tests: it passes bytes through to one upstream
//! address, or black-holes them — the way a hung host or a silently dropped
//! route looks to a client: connections are accepted and never answered.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyMode {
    /// Bytes flow both ways, as if the proxy were not there.
    Pass,
    /// New connections are accepted and never answered; open connections
    /// stop forwarding in both directions (what they send is held, not
    /// dropped, and flows once the mode is `Pass` again, as after a
    /// network partition heals).
    BlackHole,
}

/// A loopback TCP proxy to one upstream, stopped when dropped.
#[derive(Debug)]
pub struct TcpProxy {
    pub addr: SocketAddr,
    mode: watch::Sender<ProxyMode>,
    accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Listens on a free loopback port and forwards to `upstream`. Not
    /// async, so that it can run inside `TestServer::start_with`'s builder
    /// (the proxy's address is then the server's advertised address);
    /// it must be called within a tokio runtime.
    pub fn start(upstream: SocketAddr) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        listener.set_nonblocking(true).expect("non-blocking");
        let listener = TcpListener::from_std(listener).expect("a tokio listener");
        Self::forward(listener, upstream).expect("proxy address")
    }

    /// Forwards the connections of `listener`, bound beforehand (say, so
    /// that its address can be handed out before `upstream` exists), to
    /// `upstream`. Must be called within a tokio runtime.
    pub fn forward(listener: TcpListener, upstream: SocketAddr) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (mode, watch) = watch::channel(ProxyMode::Pass);
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(accept_loop(listener, upstream, watch, accepted.clone()));
        Ok(Self {
            addr,
            mode,
            accepted,
            task,
        })
    }

    /// `http://<addr>`, for a service's advertised URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_mode(&self, mode: ProxyMode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> ProxyMode {
        *self.mode.borrow()
    }

    /// Connections accepted so far (in either mode).
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        // The accept loop owns every connection task (a JoinSet): aborting
        // it closes them all.
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    mode: watch::Receiver<ProxyMode>,
    accepted: Arc<AtomicU64>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((client, _)) = conn else { continue };
                accepted.fetch_add(1, Ordering::Relaxed);
                connections.spawn(proxy_one(client, upstream, mode.clone()));
            }
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Waits until the mode is `Pass`; false if the proxy is gone.
async fn passing(mode: &mut watch::Receiver<ProxyMode>) -> bool {
    mode.wait_for(|m| *m == ProxyMode::Pass).await.is_ok()
}

async fn proxy_one(client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<ProxyMode>) {
    // A connection opened during a black hole hangs here: accepted, unanswered.
    if !passing(&mut mode).await {
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return; // the client sees the connection close, as with a dead upstream
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        pipe(client_read, server_write, mode.clone()),
        pipe(server_read, client_write, mode),
    );
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<ProxyMode>,
) {
    let mut buf = vec![0_u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(n) => n,
        };
        // Checked after the read: whatever arrives during a black hole is
        // held until traffic passes again.
        if !passing(&mut mode).await || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// An echo server on a loopback port.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn roundtrip(socket: &mut TcpStream, msg: &[u8]) -> Option<Vec<u8>> {
        roundtrip_within(socket, msg, Duration::from_millis(200)).await
    }

    async fn roundtrip_within(
        socket: &mut TcpStream,
        msg: &[u8],
        within: Duration,
    ) -> Option<Vec<u8>> {
        socket.write_all(msg).await.unwrap();
        let mut reply = vec![0; msg.len()];
        tokio::time::timeout(within, socket.read_exact(&mut reply))
            .await
            .ok()
            .map(|r| {
                r.unwrap();
                reply
            })
    }

    #[tokio::test]
    async fn passes_then_black_holes_then_passes_again() {
        let proxy = TcpProxy::start(echo().await);
        let mut open = TcpStream::connect(proxy.addr).await.unwrap();
        assert_eq!(
            roundtrip(&mut open, b"one").await.as_deref(),
            Some(&b"one"[..])
        );

        proxy.set_mode(ProxyMode::BlackHole);
        assert_eq!(
            roundtrip(&mut open, b"two").await,
            None,
            "held on an open connection"
        );
        // A new connection is accepted but never answered.
        let mut fresh =
            tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(proxy.addr))
                .await
                .expect("accepted during the black hole")
                .unwrap();
        assert_eq!(roundtrip(&mut fresh, b"new").await, None);
        assert_eq!(proxy.accepted(), 2);

        proxy.set_mode(ProxyMode::Pass);
        // What was held flows, in order, then new bytes.
        let mut held = [0; 3];
        tokio::time::timeout(Duration::from_secs(1), open.read_exact(&mut held))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&held, b"two");
        assert_eq!(
            roundtrip(&mut open, b"six").await.as_deref(),
            Some(&b"six"[..])
        );
        let mut held = [0; 3];
        tokio::time::timeout(Duration::from_secs(1), fresh.read_exact(&mut held))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&held, b"new");
    }

    /// The breaker bench's use: a listener bound first, then switched into a
    /// black hole for good.
    #[tokio::test]
    async fn forwards_until_swallowed_then_holds_old_and_new_connections_silently() {
        let upstream = echo().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = TcpProxy::forward(listener, upstream).unwrap();

        let mut old = TcpStream::connect(proxy.addr).await.unwrap();
        let answered = roundtrip_within(&mut old, b"ping", Duration::from_secs(5)).await;
        assert_eq!(
            answered.as_deref(),
            Some(&b"ping"[..]),
            "the proxy forwards while healthy"
        );

        proxy.set_mode(ProxyMode::BlackHole);
        assert_eq!(
            roundtrip_within(&mut old, b"ping", Duration::from_millis(300)).await,
            None,
            "an open connection stops answering"
        );
        let mut new = TcpStream::connect(proxy.addr)
            .await
            .expect("still accepts TCP");
        assert_eq!(
            roundtrip_within(&mut new, b"ping", Duration::from_millis(300)).await,
            None,
            "a new connection is held, not answered"
        );
    }
}
