//! Who may call what: service and viewer tokens, the per-RPC policy, the
//! server layer that enforces it, rate limits, and TLS between services.
//!
//! The model (see ARCHITECTURE.md, "Security"):
//! - Every call carries `authorization: Bearer <token>`, an HS256 JWT signed
//!   with the mesh's shared secret; its `roles` say what the caller is
//!   (`counter`, `publish`, ..., `bff`, `finance`, `admin`, `payments`).
//!   Services mint their own token at start ([`ServiceCredential`]); the
//!   client stack adds it to every outgoing call, so no call site does.
//! - The server layer ([`AuthLayer`]) authenticates every call except health
//!   and reflection, and authorises it by its full method path against the
//!   table in [`policy`].
//! - A viewer's identity comes from a viewer token the BFF forwards in
//!   `x-livemesh-viewer`; handlers take the viewer id from it
//!   ([`viewer_id`]), never trusting the request field alone.
//! - With certificates configured, services speak TLS, and with a CA also
//!   mutual TLS: the certificate proves the peer is a member of the mesh,
//!   the token says which service it is.
//! - `mode = "dev"` (the default) turns all of it off and says so loudly.

mod config;
mod layer;
mod limits;
pub mod policy;
mod tls;
mod token;

use std::sync::Arc;

pub use config::{AuthConfig, AuthMode, Secret};
pub use layer::{AuthLayer, AuthService};
pub use limits::RateLimits;
pub use token::{Claims, Credential, FixedToken, ServiceCredential, TokenKeys};
use tonic::Status;

/// Metadata key of the viewer token the BFF forwards.
pub const VIEWER_HEADER: &str = "x-livemesh-viewer";

/// Why the security settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(
        "auth.mode = \"enforce\" needs a token secret: set auth.token_secret_file \
         or LIVEMESH_AUTH__TOKEN_SECRET"
    )]
    NoSecret,
    #[error("auth.token_secret_file {path}: {source}")]
    SecretFile {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "the token secret is {0} bytes; use at least 32 random bytes (e.g. `openssl rand -hex 32`)"
    )]
    WeakSecret(usize),
    #[error("{key} {path}: {source}")]
    TlsFile {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("auth.tls_cert and auth.tls_key must be set together")]
    TlsHalf,
    #[error("minting a token failed: {0}")]
    Mint(#[from] jsonwebtoken::errors::Error),
}

/// The security settings of one process, resolved from [`AuthConfig`]
/// (secret and certificate files read). Cheap to clone.
#[derive(Clone)]
pub struct Security {
    inner: Arc<SecurityInner>,
}

struct SecurityInner {
    config: AuthConfig,
    keys: Option<TokenKeys>,
    tls: Option<tls::TlsFiles>,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("mode", &self.inner.config.mode)
            .field("tls", &self.inner.tls.is_some())
            .finish_non_exhaustive()
    }
}

impl Security {
    /// Reads the secret and certificates `config` names.
    pub fn from_config(config: &AuthConfig) -> Result<Self, AuthError> {
        let keys = match config.secret()? {
            Some(secret) => Some(TokenKeys::new(&secret)?),
            None if config.mode == AuthMode::Enforce => return Err(AuthError::NoSecret),
            None => None,
        };
        Ok(Self {
            inner: Arc::new(SecurityInner {
                config: config.clone(),
                keys,
                tls: tls::TlsFiles::load(config)?,
            }),
        })
    }

    /// Dev mode: no authentication, no TLS.
    pub fn dev() -> Self {
        Self {
            inner: Arc::new(SecurityInner {
                config: AuthConfig::default(),
                keys: None,
                tls: None,
            }),
        }
    }

    pub fn mode(&self) -> AuthMode {
        self.inner.config.mode
    }

    pub fn config(&self) -> &AuthConfig {
        &self.inner.config
    }

    /// The token keys, when a secret is configured.
    pub fn keys(&self) -> Option<&TokenKeys> {
        self.inner.keys.as_ref()
    }

    /// The largest gRPC message a server or client accepts and sends.
    pub fn max_message_bytes(&self) -> usize {
        self.inner.config.max_message_bytes
    }

    /// The credential `service` sends on its outgoing calls: a token with
    /// `sub` and `roles` = `[service]`, when a secret is configured (in dev
    /// mode too, so a dev process can call an enforcing one).
    pub fn service_credential(
        &self,
        service: &str,
    ) -> Result<Option<ServiceCredential>, AuthError> {
        match &self.inner.keys {
            Some(keys) => Ok(Some(ServiceCredential::new(
                keys.clone(),
                service,
                std::time::Duration::from_secs(self.inner.config.service_token_ttl_secs),
            )?)),
            None => Ok(None),
        }
    }

    /// TLS for the server, when a certificate is configured; with a CA the
    /// server requires client certificates signed by it.
    pub fn server_tls(&self) -> Option<tonic::transport::ServerTlsConfig> {
        self.inner.tls.as_ref().map(tls::TlsFiles::server)
    }

    /// TLS for clients: trust the configured CA, present the certificate.
    pub fn client_tls(&self) -> Option<tonic::transport::ClientTlsConfig> {
        self.inner.tls.as_ref().map(tls::TlsFiles::client)
    }

    /// `https` when services speak TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.inner.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// The authenticated caller of a call, put in the request's extensions by
/// the [`AuthLayer`] (absent in dev mode).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's `sub`.
    pub principal: String,
    pub roles: Vec<String>,
    /// The viewer the call acts for, from a verified viewer token.
    pub viewer: Option<u64>,
    limits: Arc<RateLimits>,
}

impl Caller {
    /// Whether the caller is one of the mesh's own services.
    pub fn is_mesh_service(&self) -> bool {
        self.roles
            .iter()
            .any(|role| policy::MESH_SERVICES.contains(&role.as_str()))
    }
}

/// The viewer a call acts for. `claimed` is the request's field (`field`
/// names it for the message). In dev mode (no [`Caller`]) the field is
/// trusted. Otherwise the verified viewer token decides: a field of 0 takes
/// the token's viewer, a different one is refused. A mesh service calling
/// without a viewer token (e.g. a dispatcher forwarding a comment) is
/// trusted with the field; anyone else must send a viewer token.
pub fn viewer_id(extensions: &http::Extensions, claimed: u64, field: &str) -> Result<u64, Status> {
    let Some(caller) = extensions.get::<Caller>() else {
        return Ok(claimed);
    };
    match caller.viewer {
        Some(viewer) if claimed == 0 || claimed == viewer => Ok(viewer),
        Some(viewer) => Err(Status::permission_denied(format!(
            "{field} {claimed} is not the authenticated viewer {viewer}: leave {field} 0 \
             or set it to the viewer of the token in {VIEWER_HEADER}"
        ))),
        None if caller.is_mesh_service() => Ok(claimed),
        None => Err(Status::unauthenticated(format!(
            "this call acts for a viewer: send `{VIEWER_HEADER}: <viewer token>`"
        ))),
    }
}

/// Refuses callers that are neither a mesh service nor in dev mode: `what`
/// names what only the mesh's services may do.
pub fn require_mesh_service(extensions: &http::Extensions, what: &str) -> Result<(), Status> {
    match extensions.get::<Caller>() {
        Some(caller) if !caller.is_mesh_service() => Err(Status::permission_denied(format!(
            "{} (roles {:?}) may not {what}; only the mesh's own services may",
            caller.principal, caller.roles
        ))),
        _ => Ok(()),
    }
}

/// The mesh service making a call, if it is one. In enforce mode its
/// verified token says so. In dev mode nothing is verified, and the
/// `authorization` the caller sent is taken at its word: `Dev <service>`
/// (what a dev-mode service's client stack sends, see
/// [`Credential::dev`]) or, when a secret is configured, a service token.
/// Dev mode trusts every caller; this only keeps a careless one (a test
/// tool, a BFF without credentials) from doing what only a service does.
pub fn mesh_caller(
    extensions: &http::Extensions,
    metadata: &tonic::metadata::MetadataMap,
    security: &Security,
) -> Option<String> {
    let is_service = |role: &str| policy::MESH_SERVICES.contains(&role);
    if let Some(caller) = extensions.get::<Caller>() {
        return caller.roles.iter().find(|role| is_service(role)).cloned();
    }
    if security.mode() == AuthMode::Enforce {
        return None;
    }
    let value = metadata.get("authorization")?.to_str().ok()?;
    if let Some(service) = value.strip_prefix(token::DEV_SCHEME) {
        let service = service.trim();
        return is_service(service).then(|| service.to_owned());
    }
    let claims = security
        .keys()?
        .verify(value.strip_prefix("Bearer ")?.trim())
        .ok()?;
    claims.roles.into_iter().find(|role| is_service(role))
}

/// The per-room publish limit, for publishes that do not come from a mesh
/// service (viewers' comments through the BFF). No-op in dev mode.
pub fn check_room_publish(extensions: &http::Extensions, room_id: u64) -> Result<(), Status> {
    match extensions.get::<Caller>() {
        Some(caller) if !caller.is_mesh_service() => caller.limits.check_room(room_id),
        _ => Ok(()),
    }
}
