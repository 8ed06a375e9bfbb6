//! Graceful shutdown: stop on SIGTERM or Ctrl-C, then let in-flight calls
//! finish, but never for longer than the drain timeout.

use std::future::Future;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;

/// A future that completes when the server should stop accepting calls.
pub type ShutdownSignal = BoxFuture<'static, ()>;

/// A trigger for one or more [`ShutdownSignal`]s. Tests use it to stop a
/// server they started; `main` fires it on SIGTERM or Ctrl-C.
#[derive(Debug, Clone)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self::new()
    }
}

impl Shutdown {
    pub fn new() -> Self {
        Self {
            tx: watch::channel(false).0,
        }
    }

    /// A signal that completes once [`Shutdown::trigger`] was called (or
    /// the trigger was dropped).
    pub fn signal(&self) -> ShutdownSignal {
        let mut rx = self.tx.subscribe();
        Box::pin(async move {
            // An error means the sender is gone, which also means: stop.
            let _ = rx.wait_for(|stop| *stop).await;
        })
    }

    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn os_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for Ctrl-C; only SIGTERM stops this process");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = term => tracing::info!("SIGTERM received"),
    }
}

/// Runs `serve` until it ends by itself or `stop` completes; after `stop`,
/// waits up to `drain` for in-flight calls, then gives up on them.
pub async fn run_with_drain<F, E>(
    serve: impl FnOnce(ShutdownSignal) -> F,
    stop: impl Future<Output = ()>,
    drain: Duration,
) -> anyhow::Result<()>
where
    F: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<anyhow::Error> + Send + 'static,
{
    let shutdown = Shutdown::new();
    let mut server = tokio::spawn(serve(shutdown.signal()));
    tokio::select! {
        joined = &mut server => return flatten(joined),
        () = stop => {}
    }
    tracing::info!(
        drain_ms = drain.as_millis(),
        "shutting down: draining in-flight calls"
    );
    shutdown.trigger();
    match tokio::time::timeout(drain, &mut server).await {
        Ok(joined) => {
            let result = flatten(joined);
            if result.is_ok() {
                tracing::info!("drained; bye");
            }
            result
        }
        Err(_) => {
            server.abort();
            tracing::warn!(
                drain_ms = drain.as_millis(),
                "drain timed out; closing the remaining calls"
            );
            Ok(())
        }
    }
}

fn flatten<E: Into<anyhow::Error>>(
    joined: Result<Result<(), E>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match joined {
        Ok(result) => result.map_err(Into::into),
        Err(err) => Err(anyhow::anyhow!("server task failed: {err}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_server_that_drains_in_time_returns_its_result() {
        let stop = Shutdown::new();
        let stop_signal = stop.signal();
        let run = tokio::spawn(run_with_drain(
            |signal| async move {
                signal.await;
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok::<(), anyhow::Error>(())
            },
            stop_signal,
            Duration::from_secs(5),
        ));
        stop.trigger();
        run.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_that_does_not_drain_is_cut_off_at_the_timeout() {
        let started = tokio::time::Instant::now();
        let result = run_with_drain(
            |signal| async move {
                signal.await;
                std::future::pending::<()>().await;
                Ok::<(), anyhow::Error>(())
            },
            async {},
            Duration::from_secs(3),
        )
        .await;
        assert!(result.is_ok());
        assert_eq!(started.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test]
    async fn a_server_error_is_returned_without_a_signal() {
        let err = run_with_drain(
            |_signal| async { Err::<(), _>(anyhow::anyhow!("bind failed")) },
            std::future::pending(),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("bind failed"));
    }
}
