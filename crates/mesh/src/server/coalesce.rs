//! Write coalescing for server connections.
//!
//! An HTTP/2 connection that carries thousands of viewer streams gets its
//! frames one stream task at a time, and hyper's connection task writes and
//! flushes after each wake-up: with tokio's habit of running a woken task
//! next, that was one `writev` per 2.4 deliveries in `bench fanout` (NATS:
//! one per 150). [`Coalesce`] buffers what the connection writes and, the
//! first time it is asked to flush, yields once to the back of the run
//! queue: the stream tasks already queued add their frames meanwhile, and
//! the next flush writes them all in one system call. The delay is one turn
//! of the scheduler; under no load that is microseconds.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Past this many buffered bytes, a write first drains the buffer.
const HIGH_WATER: usize = 256 * 1024;

/// An IO whose writes are buffered and whose flushes are deferred once.
#[derive(Debug)]
pub struct Coalesce<T> {
    io: T,
    out: Vec<u8>,
    /// Bytes of `out` already written to `io`.
    drained: usize,
    /// The current flush has yielded once already.
    yielded: bool,
}

impl<T> Coalesce<T> {
    pub fn new(io: T) -> Self {
        Self {
            io,
            out: Vec::new(),
            drained: 0,
            yielded: false,
        }
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes the whole buffer to the IO.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.drained < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.drained..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.drained += n;
        }
        self.out.clear();
        self.drained = 0;
        if self.out.capacity() > HIGH_WATER {
            // A burst's buffer is not kept by an idle connection.
            self.out = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.out.len() >= HIGH_WATER {
            ready!(this.poll_drain(cx))?;
        }
        this.out.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.out.is_empty() && !this.yielded {
            // Waking ourselves while running puts this task at the back of
            // the run queue (tokio treats it as a yield), behind the tasks
            // that are about to add frames to this connection.
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.poll_drain(cx))?;
        this.yielded = false;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: Connected> Connected for Coalesce<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn writes_reach_the_peer_at_flush_in_one_piece() {
        let (client, mut server) = tokio::io::duplex(1 << 20);
        let mut client = Coalesce::new(client);
        client.write_all(b"hello ").await.unwrap();
        client.write_all(b"world").await.unwrap();
        // Nothing is sent before the flush.
        let mut probe = [0u8; 16];
        let early = tokio::time::timeout(
            std::time::Duration::from_millis(20),
            server.read(&mut probe),
        )
        .await;
        assert!(early.is_err(), "bytes went out before the flush");
        client.flush().await.unwrap();
        let n = server.read(&mut probe).await.unwrap();
        assert_eq!(&probe[..n], b"hello world");
    }

    #[tokio::test]
    async fn a_large_write_drains_past_the_high_water_mark_and_shutdown_sends_the_rest() {
        let (client, mut server) = tokio::io::duplex(64 * 1024);
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            server.read_to_end(&mut all).await.unwrap();
            all
        });
        let mut client = Coalesce::new(client);
        let chunk = vec![7u8; 100 * 1024];
        for _ in 0..5 {
            client.write_all(&chunk).await.unwrap();
        }
        client.shutdown().await.unwrap();
        let all = reader.await.unwrap();
        assert_eq!(all.len(), 500 * 1024);
        assert!(all.iter().all(|&b| b == 7));
    }
}
