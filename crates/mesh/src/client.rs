//! The one client stack. Every inter-service client (and the demo's and the
//! tests' clients) is built here, so timeouts now, and breakers, retry
//! budgets and trace propagation later, apply to every hop from one place.

use std::time::Duration;

use tonic::body::Body;
use tonic::transport::Endpoint;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;

use crate::BoxError;
use crate::config::ClientConfig;

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
    connect_timeout: Duration,
    request_timeout: Duration,
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
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            credential: None,
            tls: None,
        }
    }

    /// The stack of `service`'s own outgoing calls: they carry its service
    /// token (when a secret is configured) and use TLS (when certificates are).
    pub fn secured(
        self,
        security: &crate::auth::Security,
        service: &str,
    ) -> Result<Self, crate::auth::AuthError> {
        Ok(Self {
            credential: security
                .service_credential(service)?
                .map(crate::auth::Credential::Service),
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
        let invalid = |e: tonic::transport::Error| InvalidPeer {
            uri: uri.to_owned(),
            reason: e.to_string(),
        };
        let mut endpoint = Endpoint::from_shared(uri.to_owned())
            .map_err(invalid)?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true);
        // auth: TLS to `https://` peers.
        if let (Some(tls), true) = (&self.tls, uri.starts_with("https://")) {
            endpoint = endpoint.tls_config(tls.clone()).map_err(invalid)?;
        }
        Ok(self.wrap(endpoint.connect_lazy(), uri))
    }

    /// The middleware, top to bottom as a request passes it:
    /// 0. add the credential (`authorization`);
    /// 1. turn a timeout into `DEADLINE_EXCEEDED` naming the peer (tonic
    ///    would otherwise report `Unknown`);
    /// 2. bound the time until the response headers arrive;
    /// 3. the transport.
    fn wrap<S>(&self, transport: S, peer: &str) -> MeshChannel
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
            + Clone
            + Send
            + Sync
            + 'static,
        S::Error: Into<BoxError>,
        S::Future: Send + 'static,
    {
        let peer = peer.to_owned();
        let timeout = self.request_timeout;
        let credential = self.credential.clone();
        let service = ServiceBuilder::new()
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
            .map_err(move |err: BoxError| {
                if err.is::<tower::timeout::error::Elapsed>() {
                    MeshError(Box::new(tonic::Status::deadline_exceeded(format!(
                        "{peer} did not answer within {} ms",
                        timeout.as_millis()
                    ))))
                } else {
                    MeshError(err)
                }
            })
            .timeout(timeout)
            .map_err(Into::<BoxError>::into)
            .service(transport);
        BoxCloneSyncService::new(service)
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
