//! Signed tokens (HS256 JWTs): what a caller is (`roles`) and, for viewer
//! tokens, which viewer it acts for.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::HeaderValue;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::{AuthError, Secret};

/// What a token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The principal: a service, a BFF instance, a person.
    pub sub: String,
    /// What the principal may do, matched against the RPC policy.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: u64,
    /// For viewer tokens: the viewer's user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub viewer: Option<u64>,
}

impl Claims {
    /// Claims for `sub` with `roles`, valid for `ttl` from now.
    pub fn new(sub: impl Into<String>, roles: &[&str], ttl: Duration) -> Self {
        Self {
            sub: sub.into(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            exp: jsonwebtoken::get_current_timestamp().saturating_add(ttl.as_secs()),
            viewer: None,
        }
    }

    /// A viewer token's claims: `viewer` is the user id it proves.
    pub fn viewer(viewer: u64, ttl: Duration) -> Self {
        Self {
            viewer: Some(viewer),
            ..Self::new(format!("viewer:{viewer}"), &[], ttl)
        }
    }
}

/// Signs and verifies tokens with the mesh's shared secret.
#[derive(Clone)]
pub struct TokenKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKeys([redacted])")
    }
}

impl TokenKeys {
    pub fn new(secret: &Secret) -> Result<Self, AuthError> {
        let mut validation = Validation::new(Algorithm::HS256);
        // Clocks of one mesh agree within seconds; a minute of leeway
        // (the crate's default) would keep expired tokens alive needlessly.
        validation.leeway = 5;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Self {
            encoding: EncodingKey::from_secret(secret.expose().as_bytes()),
            decoding: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation,
        })
    }

    /// A signed token carrying `claims`.
    pub fn mint(&self, claims: &Claims) -> Result<String, AuthError> {
        Ok(jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &self.encoding,
        )?)
    }

    /// The claims of `token` if its signature and expiry hold. The error
    /// says what is wrong without echoing the token.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        use jsonwebtoken::errors::ErrorKind;
        jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map(|data| data.claims)
            .map_err(|err| match err.kind() {
                ErrorKind::ExpiredSignature => "the token has expired; get a new one".to_owned(),
                ErrorKind::InvalidSignature => {
                    "the token's signature does not verify with this mesh's secret".to_owned()
                }
                ErrorKind::InvalidAlgorithm => "the token must be signed with HS256".to_owned(),
                ErrorKind::MissingRequiredClaim(claim) => {
                    format!("the token lacks the `{claim}` claim")
                }
                _ => "the token is not a well-formed JWT".to_owned(),
            })
    }
}

/// A service's own token for its outgoing calls, renewed when half of its
/// lifetime has passed so a long-running process never sends an expired one.
#[derive(Clone)]
pub struct ServiceCredential {
    inner: Arc<ServiceCredentialInner>,
}

struct ServiceCredentialInner {
    keys: TokenKeys,
    service: String,
    ttl: Duration,
    /// The header value and when to renew it (seconds since the epoch).
    current: RwLock<(HeaderValue, u64)>,
}

impl std::fmt::Debug for ServiceCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceCredential")
            .field("service", &self.inner.service)
            .finish_non_exhaustive()
    }
}

impl ServiceCredential {
    pub(super) fn new(keys: TokenKeys, service: &str, ttl: Duration) -> Result<Self, AuthError> {
        let current = Self::mint(&keys, service, ttl)?;
        Ok(Self {
            inner: Arc::new(ServiceCredentialInner {
                keys,
                service: service.to_owned(),
                ttl,
                current: RwLock::new(current),
            }),
        })
    }

    fn mint(
        keys: &TokenKeys,
        service: &str,
        ttl: Duration,
    ) -> Result<(HeaderValue, u64), AuthError> {
        let claims = Claims::new(service, &[service], ttl);
        let token = keys.mint(&claims)?;
        let mut value = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| AuthError::Mint(jsonwebtoken::errors::ErrorKind::InvalidToken.into()))?;
        value.set_sensitive(true);
        let renew_at = jsonwebtoken::get_current_timestamp() + ttl.as_secs() / 2;
        Ok((value, renew_at))
    }

    /// The `authorization` header value to send now.
    pub fn header(&self) -> HeaderValue {
        let inner = &*self.inner;
        let now = jsonwebtoken::get_current_timestamp();
        {
            let current = inner
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if now < current.1 {
                return current.0.clone();
            }
        }
        let mut current = inner
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now >= current.1 {
            match Self::mint(&inner.keys, &inner.service, inner.ttl) {
                Ok(fresh) => *current = fresh,
                // Cannot happen with a valid HMAC key; the old token still
                // has half its life left, so it is sent meanwhile.
                Err(err) => tracing::error!(%err, "renewing the service token failed"),
            }
        }
        current.0.clone()
    }
}

/// The `authorization` scheme a dev-mode service sends with its name.
pub(super) const DEV_SCHEME: &str = "Dev ";

/// What a client sends in `authorization`: a service's own renewing
/// token, or a fixed token (a BFF's, an operator's, a test's).
#[derive(Clone, Debug)]
pub enum Credential {
    Service(ServiceCredential),
    Fixed(FixedToken),
    /// `Dev <service>`: a dev-mode service names itself, unsigned (no
    /// secret is configured). A dev-mode server takes it at its word for
    /// what only a service may do (see [`super::mesh_caller`]); an
    /// enforcing server refuses it like a missing token.
    Dev(HeaderValue),
}

/// A fixed bearer token; its Debug form is redacted.
#[derive(Clone)]
pub struct FixedToken(HeaderValue);

impl std::fmt::Debug for FixedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FixedToken([redacted])")
    }
}

impl Credential {
    /// `authorization: Bearer <token>`; `None` when the token cannot be a
    /// header value (it is not a JWT then either).
    pub fn bearer(token: &str) -> Option<Self> {
        let mut value = HeaderValue::try_from(format!("Bearer {token}")).ok()?;
        value.set_sensitive(true);
        Some(Self::Fixed(FixedToken(value)))
    }

    /// A dev-mode service's unsigned name; `None` when `service` cannot
    /// be a header value.
    pub fn dev(service: &str) -> Option<Self> {
        HeaderValue::try_from(format!("{DEV_SCHEME}{service}"))
            .ok()
            .map(Self::Dev)
    }

    /// The header value to send now.
    pub fn header(&self) -> HeaderValue {
        match self {
            Self::Service(service) => service.header(),
            Self::Fixed(FixedToken(value)) | Self::Dev(value) => value.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn keys(secret: &str) -> TokenKeys {
        TokenKeys::new(&Secret::new(secret)).unwrap()
    }

    #[test]
    fn a_token_verifies_only_with_its_secret_and_before_it_expires() {
        let a = keys(&"a".repeat(32));
        let b = keys(&"b".repeat(32));
        let claims = Claims::new("counter", &["counter"], Duration::from_secs(60));
        let token = a.mint(&claims).unwrap();
        assert_eq!(a.verify(&token).unwrap(), claims);
        assert!(b.verify(&token).unwrap_err().contains("signature"));
        let expired = Claims {
            exp: jsonwebtoken::get_current_timestamp() - 60,
            ..claims
        };
        let token = a.mint(&expired).unwrap();
        assert!(a.verify(&token).unwrap_err().contains("expired"));
        assert!(a.verify("not.a.jwt").unwrap_err().contains("well-formed"));
    }

    #[test]
    fn the_service_credential_is_a_sensitive_bearer_header() {
        let keys = keys(&"k".repeat(32));
        let credential =
            ServiceCredential::new(keys.clone(), "publish", Duration::from_secs(600)).unwrap();
        let header = credential.header();
        assert!(header.is_sensitive());
        let token = header.to_str().unwrap().strip_prefix("Bearer ").unwrap();
        let claims = keys.verify(token).unwrap();
        assert_eq!(claims.sub, "publish");
        assert_eq!(claims.roles, vec!["publish".to_owned()]);
    }
}
