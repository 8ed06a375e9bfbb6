//! TLS and mutual TLS between services: a server with a certificate and a
//! client CA accepts a client that presents a certificate signed by the
//! CA, and refuses one without (and plaintext), through the server's own
//! incoming stack (write coalescing under TLS).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use livemesh_mesh::ClientStack;
use livemesh_mesh::auth::{AuthConfig, AuthMode, Claims, Credential, Secret, Security};
use livemesh_mesh::config::ClientConfig;
use livemesh_mesh::server::{LocalServer, ServerBuilder, ServiceSet};
use tonic::transport::{Certificate, ClientTlsConfig};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const SECRET: &str = "tls-test-secret-0123456789abcdefghijklmnopq";

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
        ..livemesh_testkit::mesh_certificates(dir.path())
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

    // With TLS on, a plaintext peer URL could never connect.
    let dir = tempfile::tempdir().unwrap();
    let certs = livemesh_testkit::mesh_certificates(dir.path());
    let err = livemesh_mesh::config::Config::load(
        &livemesh::config_sections(),
        &livemesh_mesh::config::Sources {
            env: vec![
                ("LIVEMESH_AUTH__TLS_CERT".into(), certs.tls_cert),
                ("LIVEMESH_AUTH__TLS_KEY".into(), certs.tls_key),
                ("LIVEMESH_AUTH__TLS_CA".into(), certs.tls_ca),
                (
                    "LIVEMESH_COUNTER__PUBLISH_URL".into(),
                    "http://10.0.0.7:50051".into(),
                ),
            ],
            ..livemesh_mesh::config::Sources::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("counter.publish_url"), "{err}");
    assert!(err.contains("https://"), "{err}");
}

/// The all-in-one mesh enforcing auth over mutual TLS: its services reach
/// each other at `https://` (room lookups, counter -> publish -> subscribe)
/// and a viewer sees the love total.
#[tokio::test]
async fn the_mesh_works_end_to_end_over_mutual_tls_with_auth_enforced() {
    use livemesh_proto::v1::SendLovesRequest;
    use livemesh_proto::v1::counter_service_client::CounterServiceClient;

    let dir = tempfile::tempdir().unwrap();
    let auth = AuthConfig {
        mode: AuthMode::Enforce,
        token_secret: Some(Secret::new(SECRET)),
        ..livemesh_testkit::mesh_certificates(dir.path())
    };
    let security = Security::from_config(&auth).unwrap();
    let server = common::mesh(dir.path(), auth).await;
    let https = format!("https://{}", server.addr);
    let keys = security.keys().unwrap();
    let as_role = |role: &str| {
        let token = common::role_token(keys, role);
        ClientStack::new(&ClientConfig::default())
            .with_tls(security.client_tls().unwrap())
            .with_credential(Credential::bearer(&token).unwrap())
            .channel(&https)
            .unwrap()
    };
    let room_id = livemesh_testkit::start_room(as_role("admin"), 77).await;
    let mut stream = common::subscribe_as(as_role("bff"), keys, 3, room_id).await;
    CounterServiceClient::new(as_role("bff"))
        .send_loves(common::for_viewer(
            keys,
            4,
            SendLovesRequest {
                room_id,
                viewer_id: 0,
                batch_id: "tls".into(),
                taps_ms: vec![0, 100, 200, 300],
            },
        ))
        .await
        .unwrap();
    common::love_total_reaches(&mut stream, 4).await;
}
