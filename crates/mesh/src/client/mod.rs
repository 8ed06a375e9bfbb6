//! The one client stack. Every inter-service client (and the demo's and the
//! tests' clients) is built here, so timeouts, circuit breakers and retry
//! budgets (see [`crate::breaker`], [`retry`]) apply to every hop from one place.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use tonic::body::Body;
use tonic::transport::Endpoint;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt as _};

use crate::BoxError;
use crate::breaker::{Breaker, BreakerSettings, InvalidBreaker, PeerGuardLayer};
use crate::config::ClientConfig;

mod retry;
pub use retry::{RetryPolicy, never_reached_peer};

/// A channel to one peer, wrapped in the mesh's middleware. Generated
/// clients take it as their transport: `CounterServiceClient::new(channel)`.
pub type MeshChannel = BoxCloneSyncService<http::Request<Body>, http::Response<Body>, MeshError>;

/// The error of a [`MeshChannel`] call. A concrete type rather than a bare
/// `Box<dyn Error>`: with the latter, futures calling a client cannot be
/// spawned (rustc cannot prove `From` for every lifetime of the trait
/// object). tonic finds a `Status` inside through `source()`.
#[derive(Debug)]
pub struct MeshError(BoxError);

impl std::fmt::Display for MeshError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for MeshError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// Builds [`MeshChannel`]s with the configured middleware.
#[derive(Debug, Clone)]
pub struct ClientStack {
    config: ClientConfig,
    breaker: BreakerSettings,
    // auth: what every channel of this stack sends and how it connects
    // (see `crate::auth`); `None`: no credentials, plaintext.
    credential: Option<crate::auth::Credential>,
    tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Why a channel could not be built.
#[derive(Debug, thiserror::Error)]
#[error("invalid peer address {uri:?}: {reason}")]
pub struct InvalidPeer {
    uri: String,
    reason: String,
}

impl ClientStack {
    pub fn new(config: &ClientConfig) -> Self {
        Self {
            config: config.clone(),
            breaker: BreakerSettings::from(config),
            credential: None,
            tls: None,
        }
    }

    /// What a service's `from_config` starts from: the process's security
    /// (tokens, TLS, limits, from `config.auth`) and the stack of
    /// `service`'s own outgoing calls ([`ClientStack::secured`]).
    pub fn for_service(
        config: &crate::Config,
        service: &str,
    ) -> Result<(crate::auth::Security, Self), crate::auth::AuthError> {
        let security = crate::auth::Security::from_config(&config.auth)?;
        let stack = Self::new(&config.client).secured(&security, service)?;
        Ok((security, stack))
    }

    /// The stack of `service`'s own outgoing calls: they carry its service
    /// token (when a secret is configured) and use TLS (when certificates are).
    pub fn secured(
        self,
        security: &crate::auth::Security,
        service: &str,
    ) -> Result<Self, crate::auth::AuthError> {
        Ok(Self {
            // A dev-mode service without a secret still names itself.
            credential: match security.service_credential(service)? {
                Some(credential) => Some(crate::auth::Credential::Service(credential)),
                None => crate::auth::Credential::dev(service),
            },
            tls: security.client_tls(),
            ..self
        })
    }

    /// Every call of this stack's channels sends `credential` (a caller
    /// outside the mesh: a BFF, an operator's tool, a test).
    pub fn with_credential(self, credential: crate::auth::Credential) -> Self {
        Self {
            credential: Some(credential),
            ..self
        }
    }

    /// Channels to `https://` peers use `tls`.
    pub fn with_tls(self, tls: tonic::transport::ClientTlsConfig) -> Self {
        Self {
            tls: Some(tls),
            ..self
        }
    }

    /// A channel to `uri` (`http://host:port`) that connects on first use and
    /// reconnects by itself.
    pub fn channel(&self, uri: &str) -> Result<MeshChannel, InvalidPeer> {
        self.channel_with_breaker(uri).map(|(channel, _)| channel)
    }

    /// [`Self::channel`], and a view of the channel's own circuit breaker
    /// (one per channel, so one per peer for a caller that keeps one
    /// channel per peer).
    pub fn channel_with_breaker(&self, uri: &str) -> Result<(MeshChannel, Breaker), InvalidPeer> {
        let invalid = |reason: String| InvalidPeer {
            uri: uri.to_owned(),
            reason,
        };
        let mut endpoint = Endpoint::from_shared(uri.to_owned())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(Duration::from_millis(self.config.connect_timeout_ms))
            .tcp_nodelay(true);
        // auth: TLS to `https://` peers.
        if let (Some(tls), true) = (&self.tls, uri.starts_with("https://")) {
            endpoint = endpoint
                .tls_config(tls.clone())
                .map_err(|e| invalid(e.to_string()))?;
        }
        self.wrap(endpoint.connect_lazy(), uri)
            .map_err(|e| invalid(e.to_string()))
    }

    /// The middleware, top to bottom as a request passes it:
    /// 0. the call's client span, its W3C trace context into the metadata,
    ///    and per-RPC client metrics ([`crate::rpc_telemetry`]); outermost,
    ///    so that retries stay inside the call's one client span;
    /// 0b. the caller's credential (`authorization`), unless the call
    ///    brought its own ([`crate::auth`]);
    /// 1. buffer the (unary) request body once, so that a retry can send it
    ///    again (not at all with `max_retries = 0`: then no retry is taken);
    /// 2. retry within the budget what is safe to retry
    ///    ([`RetryPolicy`]), with jittered backoff;
    /// 3. the peer's circuit breaker: rejects at once (UNAVAILABLE) while
    ///    open, counts failures (transport errors, timeouts, and the
    ///    `grpc-status` of the response headers) and slow calls;
    /// 4. bound the time until the response headers arrive (the configured
    ///    timeout or the call's shorter gRPC deadline), inside the breaker
    ///    so that timeouts count as failures;
    /// 5. the transport.
    fn wrap<S>(&self, transport: S, peer: &str) -> Result<(MeshChannel, Breaker), InvalidBreaker>
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let timeout = Duration::from_millis(self.config.request_timeout_ms);
        let (guard, breaker) = PeerGuardLayer::new(&self.breaker, peer, timeout)?;
        let guarded = BoxCloneSyncService::new(
            ServiceBuilder::new()
                .map_err(MeshError)
                .layer(guard)
                .service(transport),
        );
        // Without retries nothing is sent twice, so the body goes through
        // as it comes: no buffering, no copy kept per call.
        let channel: MeshChannel = if self.config.max_retries == 0 {
            guarded
        } else {
            let retrying = ServiceBuilder::new()
                .retry(RetryPolicy::new(&self.config))
                .map_request(|request: http::Request<Bytes>| {
                    request.map(|bytes| Body::new(Full::new(bytes)))
                })
                .service(guarded);
            BoxCloneSyncService::new(tower::service_fn(move |request: http::Request<Body>| {
                let retrying = retrying.clone();
                async move {
                    let (parts, body) = request.into_parts();
                    let bytes = body
                        .collect()
                        .await
                        .map_err(|status| MeshError(Box::new(status)))?
                        .to_bytes();
                    retrying
                        .oneshot(http::Request::from_parts(parts, bytes))
                        .await
                }
            }))
        };
        let credential = self.credential.clone();
        let channel = ServiceBuilder::new()
            .layer(crate::rpc_telemetry::ClientTelemetryLayer::new(peer))
            // auth: the caller's credential, unless the call brought its own.
            .map_request(move |mut request: http::Request<Body>| {
                if let Some(credential) = &credential {
                    request
                        .headers_mut()
                        .entry(http::header::AUTHORIZATION)
                        .or_insert_with(|| credential.header());
                }
                request
            })
            .service(channel);
        Ok((BoxCloneSyncService::new(channel), breaker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemesh_proto::v1::GetRoomRequest;
    use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;

    #[test]
    fn a_malformed_peer_address_is_rejected_with_the_address_named() {
        let stack = ClientStack::new(&ClientConfig::default());
        let err = stack.channel("not a uri").unwrap_err().to_string();
        assert!(err.contains("not a uri"), "{err}");
    }

    #[tokio::test]
    async fn a_peer_that_never_answers_yields_deadline_exceeded() {
        // Accepts TCP connections and never speaks: a black-holed peer.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hold = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let stack = ClientStack::new(&ClientConfig {
            connect_timeout_ms: 1_000,
            request_timeout_ms: 200,
            ..ClientConfig::default()
        });
        let channel = stack.channel(&format!("http://{addr}")).unwrap();
        let status = OngoingQueryServiceClient::new(channel)
            .get_room(GetRoomRequest { room_id: 1 })
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
        assert!(status.message().contains(&addr.to_string()), "{status:?}");
        hold.abort();
    }
}
