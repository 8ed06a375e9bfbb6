//! A TCP proxy in front of one server that can be switched into a black
//! hole: it keeps accepting connections and holding them open, but stops
//! passing bytes in either direction, so a peer sees a server that is up
//! (connects succeed, nothing is refused) and never answers, the way a hung
//! process or a partition that drops packets looks from the outside.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The proxy; dropping it closes every connection it holds.
pub struct BlackHole {
    addr: SocketAddr,
    switch: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    /// Listens on `listener` and forwards each connection to `upstream`
    /// until [`BlackHole::swallow`] is called.
    pub fn forward(listener: TcpListener, upstream: SocketAddr) -> anyhow::Result<Self> {
        let addr = listener.local_addr()?;
        let (switch, mode) = watch::channel(false);
        let task = tokio::spawn(accept(listener, upstream, mode));
        Ok(Self { addr, switch, task })
    }

    /// `http://ADDR`, the address peers are told to use.
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// From now on nothing passes: connections already open stop moving
    /// bytes (both sockets stay open, unread), new ones are accepted and
    /// held without an upstream.
    pub fn swallow(&self) {
        self.switch.send_replace(true);
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts (and so
        // closes) every connection task.
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, mode: watch::Receiver<bool>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => {
                    connections.spawn(connection(socket, upstream, mode.clone()));
                }
                Err(err) => {
                    tracing::warn!(%err, "black-hole proxy: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            // Reap finished connections so the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn connection(mut client: TcpStream, upstream: SocketAddr, mut mode: watch::Receiver<bool>) {
    if *mode.borrow_and_update() {
        return hold(&client).await;
    }
    let Ok(mut server) = TcpStream::connect(upstream).await else {
        return; // closing the client's socket is what a dead upstream looks like
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let swallowed = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => false,
        _ = mode.wait_for(|swallow| *swallow) => true,
    };
    if swallowed {
        hold(&client).await;
        drop(server);
    }
}

/// Keeps the socket open and unread until the proxy is dropped.
async fn hold(_socket: &TcpStream) {
    std::future::pending::<()>().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// An echo server on loopback.
    async fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut rd, mut wr) = socket.split();
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                });
            }
        });
        addr
    }

    async fn round_trip(stream: &mut TcpStream, within: Duration) -> Option<[u8; 4]> {
        stream.write_all(b"ping").await.unwrap();
        let mut reply = [0; 4];
        tokio::time::timeout(within, stream.read_exact(&mut reply))
            .await
            .ok()
            .map(|read| {
                read.unwrap();
                reply
            })
    }

    #[tokio::test]
    async fn forwards_until_swallowed_then_holds_old_and_new_connections_silently() {
        let upstream = echo().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = BlackHole::forward(listener, upstream).unwrap();
        let addr = proxy.uri().trim_start_matches("http://").to_owned();

        let mut old = TcpStream::connect(&addr).await.unwrap();
        let answered = round_trip(&mut old, Duration::from_secs(5)).await;
        assert_eq!(answered, Some(*b"ping"), "the proxy forwards while healthy");

        proxy.swallow();
        assert_eq!(
            round_trip(&mut old, Duration::from_millis(300)).await,
            None,
            "an open connection stops answering"
        );
        let mut new = TcpStream::connect(&addr).await.expect("still accepts TCP");
        assert_eq!(
            round_trip(&mut new, Duration::from_millis(300)).await,
            None,
            "a new connection is held, not answered"
        );
    }
}
