//! TLS and mutual TLS between services (rustls through tonic).
//!
//! With `tls_cert` + `tls_key` a server speaks TLS only; with `tls_ca` too
//! it requires every client to present a certificate signed by that CA.
//! Clients trust servers signed by `tls_ca` and present the same
//! certificate. The certificate proves the peer belongs to the mesh; which
//! service it is comes from its token (one certificate per deployment is
//! enough, and a service's role never depends on a SAN naming scheme).

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use super::{AuthConfig, AuthError};

/// The PEM files, read once at start.
#[derive(Clone)]
pub(super) struct TlsFiles {
    identity: Identity,
    ca: Option<Certificate>,
    domain: String,
}

fn read(key: &'static str, path: &str) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|source| AuthError::TlsFile {
        key,
        path: path.to_owned(),
        source,
    })
}

impl TlsFiles {
    pub(super) fn load(config: &AuthConfig) -> Result<Option<Self>, AuthError> {
        match (config.tls_cert.is_empty(), config.tls_key.is_empty()) {
            (true, true) => return Ok(None),
            (false, false) => {}
            _ => return Err(AuthError::TlsHalf),
        }
        let cert = read("auth.tls_cert", &config.tls_cert)?;
        let key = read("auth.tls_key", &config.tls_key)?;
        let ca = if config.tls_ca.is_empty() {
            None
        } else {
            Some(Certificate::from_pem(read("auth.tls_ca", &config.tls_ca)?))
        };
        Ok(Some(Self {
            identity: Identity::from_pem(cert, key),
            ca,
            domain: config.tls_domain.clone(),
        }))
    }

    pub(super) fn server(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(self.identity.clone());
        match &self.ca {
            Some(ca) => config.client_ca_root(ca.clone()),
            None => config,
        }
    }

    pub(super) fn client(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new().identity(self.identity.clone());
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(ca.clone());
        }
        if !self.domain.is_empty() {
            config = config.domain_name(self.domain.clone());
        }
        config
    }
}
