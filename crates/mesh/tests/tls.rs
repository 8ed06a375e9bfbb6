//! TLS and mutual TLS between services: a server with a certificate and a
//! client CA accepts a client that presents a certificate signed by the
//! CA, and refuses one without (and plaintext), through the server's own
//! incoming stack (write coalescing under TLS).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;

use livemesh_mesh::ClientStack;
use livemesh_mesh::auth::{AuthConfig, AuthMode, Claims, Credential, Secret, Security};
use livemesh_mesh::config::ClientConfig;
use livemesh_mesh::server::{LocalServer, ServerBuilder, ServiceSet};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use tonic::transport::{Certificate, ClientTlsConfig};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const SECRET: &str = "tls-test-secret-0123456789abcdefghijklmnopq";

/// A CA and one certificate it signed (for 127.0.0.1 and localhost), as
/// PEM files in `dir`; returns the config naming them.
fn write_certs(dir: &Path) -> AuthConfig {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "livemesh test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
        .distinguished_name
        .push(DnType::CommonName, "livemesh service");
    let cert = params.signed_by(&key, &issuer).unwrap();

    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path.display().to_string()
    };
    AuthConfig {
        tls_ca: write("ca.pem", ca_cert.pem()),
        tls_cert: write("service.pem", cert.pem()),
        tls_key: write("service.key", key.serialize_pem()),
        ..AuthConfig::default()
    }
}

/// A server with only health and reflection, secured by `security`.
struct Secured(Security);

impl ServiceSet for Secured {
    fn register(&self, server: &mut ServerBuilder) {
        server.secure(&self.0);
    }
}

async fn health_of(stack: &ClientStack, uri: &str) -> Result<(), tonic::Status> {
    HealthClient::new(stack.channel(uri).unwrap())
        .check(HealthCheckRequest::default())
        .await
        .map(|_| ())
}

#[tokio::test]
async fn mutual_tls_admits_clients_with_a_mesh_certificate_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = AuthConfig {
        mode: AuthMode::Enforce,
        token_secret: Some(Secret::new(SECRET)),
        ..write_certs(dir.path())
    };
    config.validate().unwrap();
    let security = Security::from_config(&config).unwrap();
    assert_eq!(security.scheme(), "https");
    let server = LocalServer::start(
        Secured(security.clone()),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .unwrap();
    let https = format!("https://{}", server.addr());

    // A member of the mesh: its certificate and token.
    let member = ClientStack::new(&ClientConfig::default())
        .secured(&security, "publish")
        .unwrap();
    health_of(&member, &https).await.unwrap();

    // Trusts the server but presents no certificate: the handshake fails.
    let ca = std::fs::read(&config.tls_ca).unwrap();
    let anonymous = ClientStack::new(&ClientConfig::default())
        .with_tls(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        .with_credential(
            Credential::bearer(
                &security
                    .keys()
                    .unwrap()
                    .mint(&Claims::new(
                        "intruder",
                        &["publish"],
                        std::time::Duration::from_secs(60),
                    ))
                    .unwrap(),
            )
            .unwrap(),
        );
    // The handshake fails: the call never reaches the server's handlers
    // (which would answer with a gRPC status of their own).
    let refused = health_of(&anonymous, &https).await.unwrap_err();
    assert!(
        matches!(
            refused.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown
        ),
        "{refused:?}"
    );
    assert!(
        format!("{refused:?}").contains("transport error"),
        "{refused:?}"
    );

    // Plaintext to a TLS server fails too.
    let plaintext = ClientStack::new(&ClientConfig::default());
    let uri = format!("http://{}", server.addr());
    assert!(health_of(&plaintext, &uri).await.is_err());

    // And the member still gets through after the refusals.
    health_of(&member, &https).await.unwrap();
    server.stop().await.unwrap();
}

#[test]
fn half_a_tls_configuration_is_refused_with_the_keys_named() {
    let err = AuthConfig {
        tls_cert: "cert.pem".into(),
        ..AuthConfig::default()
    }
    .validate()
    .unwrap_err();
    assert!(err.contains("tls_key"), "{err}");
    let err = AuthConfig {
        tls_cert: "cert.pem".into(),
        tls_key: "key.pem".into(),
        ..AuthConfig::default()
    }
    .validate()
    .unwrap_err();
    assert!(err.contains("tls_ca"), "{err}");
}
