//! The `[auth]` section of the configuration.

use serde::{Deserialize, Serialize};

use super::AuthError;

/// Whether calls are authenticated and authorised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Nothing is checked; every server logs a warning saying so at start.
    #[default]
    Dev,
    /// Every call needs a valid token with a role the RPC's policy allows.
    Enforce,
}

/// A secret value: its Debug, Display and serialized forms are redacted, so
/// it cannot reach a log line or a dumped configuration by accident.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that needs it (signing keys).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[redacted]")
    }
}

/// Authentication, authorisation, TLS and limits between services.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `dev`: nothing is checked (the embedded default; logged loudly at
    /// start). `enforce`: every call but health and reflection needs a
    /// token whose roles the RPC allows.
    pub mode: AuthMode,
    /// A file holding the shared HS256 secret that signs service and viewer
    /// tokens (surrounding whitespace is ignored). Empty: `token_secret`.
    pub token_secret_file: String,
    /// The shared secret itself; set it through the environment
    /// (`LIVEMESH_AUTH__TOKEN_SECRET`), not in a file under version control.
    pub token_secret: Option<Secret>,
    /// Lifetime of the token a service mints for its own calls; it is
    /// renewed when half of it has passed.
    pub service_token_ttl_secs: u64,
    /// PEM certificate chain this service presents (server and client).
    /// With `tls_key`: services speak TLS (peer URLs are `https://`).
    pub tls_cert: String,
    /// PEM private key of `tls_cert`.
    pub tls_key: String,
    /// PEM CA that signs the mesh's certificates: clients trust servers
    /// signed by it, and servers require client certificates signed by it
    /// (mutual TLS).
    pub tls_ca: String,
    /// The name clients expect in servers' certificates. Empty: the host of
    /// the peer URL.
    pub tls_domain: String,
    /// The largest gRPC message (bytes) a server accepts or sends.
    pub max_message_bytes: usize,
    /// Calls per second one viewer may make to viewer-facing RPCs
    /// (SendLoves, SendGift, GetBalance, Subscribe), in enforce mode.
    pub viewer_calls_per_sec: u32,
    /// The burst above `viewer_calls_per_sec` a viewer may spend at once.
    pub viewer_burst: u32,
    /// Publishes per second to one room from callers that are not mesh
    /// services (viewers' comments through the BFF), in enforce mode.
    pub room_publishes_per_sec: u32,
    /// The burst above `room_publishes_per_sec`.
    pub room_burst: u32,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Dev,
            token_secret_file: String::new(),
            token_secret: None,
            service_token_ttl_secs: 3_600,
            tls_cert: String::new(),
            tls_key: String::new(),
            tls_ca: String::new(),
            tls_domain: String::new(),
            max_message_bytes: 4 * 1024 * 1024,
            viewer_calls_per_sec: 50,
            viewer_burst: 100,
            room_publishes_per_sec: 100,
            room_burst: 200,
        }
    }
}

/// The shortest secret accepted: HS256 wants at least 256 bits of key.
const MIN_SECRET_BYTES: usize = 32;

impl AuthConfig {
    /// The shared secret, from the file or the value; `None` when neither is set.
    pub(super) fn secret(&self) -> Result<Option<Secret>, AuthError> {
        let secret = if !self.token_secret_file.is_empty() {
            let text = std::fs::read_to_string(&self.token_secret_file).map_err(|source| {
                AuthError::SecretFile {
                    path: self.token_secret_file.clone(),
                    source,
                }
            })?;
            Secret::new(text.trim())
        } else if let Some(secret) = &self.token_secret {
            Secret::new(secret.expose().trim())
        } else {
            return Ok(None);
        };
        if secret.expose().len() < MIN_SECRET_BYTES {
            return Err(AuthError::WeakSecret(secret.expose().len()));
        }
        Ok(Some(secret))
    }

    /// Checks the values that need no files.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_message_bytes < 1024 {
            return Err("auth.max_message_bytes must be at least 1024".into());
        }
        if self.service_token_ttl_secs < 60 {
            return Err("auth.service_token_ttl_secs must be at least 60".into());
        }
        if self.viewer_calls_per_sec == 0
            || self.viewer_burst == 0
            || self.room_publishes_per_sec == 0
            || self.room_burst == 0
        {
            return Err(
                "auth.viewer_calls_per_sec, viewer_burst, room_publishes_per_sec \
                 and room_burst must be at least 1"
                    .into(),
            );
        }
        if self.mode == AuthMode::Enforce
            && self.token_secret_file.is_empty()
            && self.token_secret.is_none()
        {
            return Err("auth.mode = \"enforce\" needs a token secret: set \
                 auth.token_secret_file or LIVEMESH_AUTH__TOKEN_SECRET"
                .into());
        }
        if self.tls_cert.is_empty() != self.tls_key.is_empty() {
            return Err("auth.tls_cert and auth.tls_key must be set together".into());
        }
        if self.tls_enabled() && self.tls_ca.is_empty() {
            return Err(
                "auth.tls_ca must name the CA of the mesh's certificates when auth.tls_cert is set"
                    .into(),
            );
        }
        Ok(())
    }

    /// Whether services speak TLS.
    pub fn tls_enabled(&self) -> bool {
        !self.tls_cert.is_empty()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_secret_never_shows_in_debug_display_or_serialized_config() {
        let secret = "s3cr3t-value-that-must-never-be-logged-0123456789";
        let config = AuthConfig {
            token_secret: Some(Secret::new(secret)),
            ..AuthConfig::default()
        };
        let debug = format!("{config:?} {config:#?}");
        assert!(!debug.contains(secret), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
        let shown = format!("{}", config.token_secret.as_ref().unwrap());
        assert!(!shown.contains(secret));
        let json = serde_json::to_string(&config).unwrap();
        assert!(!json.contains(secret), "{json}");
    }

    #[test]
    fn the_secret_set_by_the_environment_works_and_the_config_debug_hides_it() {
        let secret = "env-secret-that-must-never-be-logged-0123456789";
        let config = crate::config::Config::load(
            &crate::config::Registry::new(),
            &crate::config::Sources {
                env: vec![
                    ("LIVEMESH_AUTH__MODE".into(), "enforce".into()),
                    ("LIVEMESH_AUTH__TOKEN_SECRET".into(), secret.into()),
                ],
                ..crate::config::Sources::default()
            },
        )
        .unwrap();
        assert_eq!(config.auth.mode, AuthMode::Enforce);
        assert_eq!(config.auth.secret().unwrap().unwrap().expose(), secret);
        let debug = format!("{config:?}");
        assert!(!debug.contains(secret), "{debug}");
    }

    #[test]
    fn enforce_without_a_secret_is_refused_naming_where_to_put_it() {
        let err = AuthConfig {
            mode: AuthMode::Enforce,
            ..AuthConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.contains("LIVEMESH_AUTH__TOKEN_SECRET"), "{err}");
    }

    #[test]
    fn short_secrets_are_refused_and_file_secrets_are_trimmed() {
        let weak = AuthConfig {
            token_secret: Some(Secret::new("short")),
            ..AuthConfig::default()
        };
        assert!(matches!(weak.secret(), Err(AuthError::WeakSecret(5))));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, format!("{}\n", "k".repeat(40))).unwrap();
        let from_file = AuthConfig {
            token_secret_file: file.display().to_string(),
            ..AuthConfig::default()
        };
        assert_eq!(
            from_file.secret().unwrap().unwrap().expose(),
            "k".repeat(40)
        );
    }
}
