//! The gRPC server bootstrap: every livemesh server, alone or all-in-one,
//! serves `grpc.health.v1` and reflection (v1 and v1alpha, so older grpcurl
//! builds work too) next to its own services.

use std::convert::Infallible;
use std::future::Future;

use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tonic::body::Body;
use tonic::server::NamedService;
use tonic::service::RoutesBuilder;
use tonic_health::ServingStatus;
use tower::Service;

mod coalesce;
mod conn;
mod shed;
pub use conn::ConnInfo;
pub use shed::ShedLayer;

/// A service crate's way of adding itself to a server, so the same code
/// serves it alone (`main.rs`) or inside the all-in-one `livemesh` binary.
pub trait ServiceSet {
    fn register(&self, server: &mut ServerBuilder);
}

/// Collects gRPC services and their background work, then serves them.
#[derive(Default)]
pub struct ServerBuilder {
    routes: RoutesBuilder,
    names: Vec<&'static str>,
    background: Vec<(&'static str, BoxFuture<'static, ()>)>,
    hooks: Vec<BoxFuture<'static, ()>>,
    stopping: crate::Shutdown,
    max_concurrent_streams: Option<u32>,
    limits: crate::config::ServerConfig,
    // auth: the first service set's security settings (one process has one).
    security: Option<crate::auth::Security>,
    // prod: a plaintext listener serving only grpc.health.v1 (kubelet probes).
    health_listener: Option<TcpListener>,
}

impl ServerBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires when shutdown begins. Long-lived streams (Watch, Subscribe)
    /// end on it, or the drain would wait for them until its timeout.
    pub fn stopping(&self) -> crate::Shutdown {
        self.stopping.clone()
    }

    /// HTTP/2 streams one connection may carry (the largest any service
    /// of the set asks for; unset: the transport's default).
    pub fn max_concurrent_streams(&mut self, streams: u32) -> &mut Self {
        self.max_concurrent_streams = Some(self.max_concurrent_streams.unwrap_or(0).max(streams));
        self
    }

    /// What this server admits (`[server]`; unset: the defaults).
    pub fn limits(&mut self, limits: &crate::config::ServerConfig) -> &mut Self {
        self.limits = limits.clone();
        self
    }

    /// The security settings this server enforces (authentication, policy,
    /// rate limits, TLS). Every service calls it in `register`; in one
    /// process they share one config, so the first one counts. Unset: dev mode.
    pub fn secure(&mut self, security: &crate::auth::Security) -> &mut Self {
        if self.security.is_none() {
            self.security = Some(security.clone());
        }
        self
    }

    /// Also serves `grpc.health.v1`, and nothing else, in plaintext on
    /// `listener` (`server.health_listen`): kubelet's gRPC probes speak no
    /// TLS, so with mutual TLS on the main port they probe this one.
    pub fn health_listener(&mut self, listener: TcpListener) -> &mut Self {
        self.health_listener = Some(listener);
        self
    }

    /// Work to finish when shutdown begins, before background tasks are
    /// cancelled (e.g. writing out what is held in memory).
    pub fn add_shutdown_hook(
        &mut self,
        hook: impl Future<Output = ()> + Send + 'static,
    ) -> &mut Self {
        self.hooks.push(Box::pin(hook));
        self
    }

    /// Adds a generated tonic server; health will report it `SERVING`.
    pub fn add_service<S>(&mut self, service: S) -> &mut Self
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes.add_service(service);
        self
    }

    /// Work that runs while the server serves (scans, tails, lease
    /// renewals) and is cancelled when serving ends.
    pub fn add_background(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> &mut Self {
        self.background.push((name, Box::pin(task)));
        self
    }

    /// The fully-qualified names of the services added so far.
    pub fn service_names(&self) -> &[&'static str] {
        &self.names
    }

    /// Serves on `listener` until `shutdown` completes, then lets in-flight
    /// calls finish (bounded by the caller's drain timeout).
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServeError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        // Reflection lists exactly the services this server carries.
        let reflection = || {
            let mut builder = tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(livemesh_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name("grpc.health.v1.Health");
            for name in &self.names {
                builder = builder.with_service_name(*name);
            }
            builder
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;

        for name in &self.names {
            health
                .set_service_status(*name, ServingStatus::Serving)
                .await;
        }
        health.set_service_status("", ServingStatus::Serving).await;

        // auth: the layer that checks every call (a pass-through in dev mode).
        let security = self
            .security
            .clone()
            .unwrap_or_else(crate::auth::Security::dev);
        let auth = crate::auth::AuthLayer::new(&security);
        let mut background = JoinSet::new();
        if let Some(limits) = auth.limits() {
            background.spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    limits.forget_idle();
                }
            });
        }
        // One set of connection limits per listener (see `conn`).
        let connections = conn::Connections::new((&self.limits).into());
        if let Some(listener) = self.health_listener {
            let health_only = health_service.clone();
            let probes = conn::Connections::new((&self.limits).into());
            let limits = self.limits.clone();
            background.spawn(async move {
                let incoming = probes.incoming(listener);
                if let Err(err) = transport(&limits)
                    .layer(probes.layer())
                    .add_service(health_only)
                    .serve_with_incoming(incoming)
                    .await
                {
                    tracing::warn!(%err, "the plaintext health endpoint stopped");
                }
            });
        }
        for (name, task) in self.background {
            background.spawn(async move {
                task.await;
                tracing::debug!(task = name, "background task ended");
            });
        }

        let names = self.names.clone();
        let addr = listener.local_addr().ok();
        tracing::info!(?addr, services = ?names, "serving gRPC");
        if security.mode() == crate::auth::AuthMode::Dev {
            tracing::warn!(
                ?addr,
                "authentication is OFF (auth.mode = dev): any caller may call any RPC as any \
                 viewer. Set auth.mode = \"enforce\" and a token secret outside a developer machine."
            );
        } else {
            tracing::info!(
                tls = security.server_tls().is_some(),
                "authentication enforced (auth.mode = enforce)"
            );
        }
        // Report NOT_SERVING as soon as shutdown starts, so load balancers
        // stop sending new calls while the in-flight ones drain.
        let stopping = self.stopping.clone();
        let hooks = self.hooks;
        let background = std::sync::Arc::new(std::sync::Mutex::new(background));
        let cancel = background.clone();
        let closing = connections.clone();
        let shutdown = async move {
            shutdown.await;
            stopping.trigger();
            for hook in hooks {
                hook.await;
            }
            // Background tasks may hold streams into this very server (the
            // all-in-one's services watch each other); they end now so the
            // drain is not kept waiting by them.
            cancel
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .abort_all();
            for name in &names {
                health
                    .set_service_status(*name, ServingStatus::NotServing)
                    .await;
            }
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            // tonic's graceful shutdown starts now: connections without a
            // call close at once instead of holding the drain (a silent
            // socket held it for the whole drain timeout).
            closing.close_idle();
        };
        // Connections within `[server]`'s limits, Nagle off, writes
        // coalesced (see `conn` and `coalesce`).
        let incoming = connections.incoming(listener);
        // Load shedding (see `shed::ShedLayer`): past the limit a call
        // gets UNAVAILABLE at once; streams hold a permit only until they start.
        let shed = ShedLayer::new(self.limits.max_concurrent_requests as usize);
        let mut server = transport(&self.limits);
        // auth: TLS (mutual with a CA) when certificates are configured.
        if let Some(tls) = security.server_tls() {
            server = server.tls_config(tls)?;
        }
        let result = server
            .max_concurrent_streams(self.max_concurrent_streams)
            // telem: the server span (child of the caller's trace context) and
            // per-RPC server metrics, for every service of the server.
            .layer(crate::rpc_telemetry::ServerTelemetryLayer::new())
            // Calls open per connection (idle timeout) and the per-request
            // metadata limit (see `conn`).
            .layer(connections.layer())
            .layer(shed)
            // auth: authenticate and authorise every call (see `crate::auth`).
            .layer(auth)
            .add_routes(self.routes.routes())
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        background
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .abort_all();
        result.map_err(ServeError::from)
    }
}

/// The HTTP/2 settings of `[server]` every listener uses.
fn transport(limits: &crate::config::ServerConfig) -> tonic::transport::Server {
    let ms = std::time::Duration::from_millis;
    let keepalive = (limits.keepalive_interval_ms > 0).then(|| ms(limits.keepalive_interval_ms));
    tonic::transport::Server::builder()
        .http2_keepalive_interval(keepalive)
        .http2_keepalive_timeout(Some(ms(limits.keepalive_timeout_ms)))
        .http2_max_header_list_size(limits.http2_max_header_list_bytes)
}

/// Why a server could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building server reflection failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds `addr`, with a message that says what to change when it fails.
pub async fn bind(addr: std::net::SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|err| {
        anyhow::anyhow!("cannot listen on {addr}: {err} (choose another address with --listen)")
    })
}

/// Serves one service set alone on `listener` until `shutdown`, with the
/// default `[server]` limits.
pub async fn serve_set(
    set: impl ServiceSet,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    serve_set_with(
        set,
        listener,
        shutdown,
        &crate::config::ServerConfig::default(),
    )
    .await
}

/// [`serve_set`] with the given `[server]` limits.
pub async fn serve_set_with(
    set: impl ServiceSet,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    limits: &crate::config::ServerConfig,
) -> Result<(), ServeError> {
    let mut server = ServerBuilder::new();
    server.limits(limits);
    set.register(&mut server);
    server.serve(listener, shutdown).await
}

/// A server running in this process on its own task: what the demo, the
/// benchmarks and tests use to talk to a service through real gRPC.
#[derive(Debug)]
pub struct LocalServer {
    addr: std::net::SocketAddr,
    shutdown: crate::Shutdown,
    task: Option<tokio::task::JoinHandle<Result<(), ServeError>>>,
}

impl LocalServer {
    /// Binds `addr` (port 0 picks a free one) and serves `set` on it.
    pub async fn start(
        set: impl ServiceSet + Send + 'static,
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<Self> {
        Self::bind_then(addr, |_| async { Ok(set) }).await
    }

    /// Binds `addr`, then builds the set knowing the bound address (services
    /// of one process that call each other through it), then serves.
    pub async fn bind_then<S, F>(
        addr: std::net::SocketAddr,
        build: impl FnOnce(std::net::SocketAddr) -> F,
    ) -> anyhow::Result<Self>
    where
        S: ServiceSet + Send + 'static,
        F: Future<Output = anyhow::Result<S>>,
    {
        let listener = bind(addr).await?;
        let addr = listener.local_addr()?;
        let set = build(addr).await?;
        let shutdown = crate::Shutdown::new();
        let task = tokio::spawn(serve_set(set, listener, shutdown.signal()));
        Ok(Self {
            addr,
            shutdown,
            task: Some(task),
        })
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for [`crate::ClientStack::channel`].
    pub fn uri(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops serving and waits until in-flight calls have drained.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        match self.task.take() {
            Some(task) => Ok(task.await??),
            None => Ok(()),
        }
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}
