//! `livemesh health`: asks servers' `grpc.health.v1` whether they serve,
//! through the mesh's own client stack (so mutual TLS works as for any
//! peer). The Helm chart's `helm test` hook and `scripts/topology` use it.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use livemesh_mesh::auth::Security;
use livemesh_mesh::{ClientStack, CommonArgs};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Checks every `addrs` entry until each reports SERVING for `service`
/// ("" = the server as a whole) or `wait` passes.
pub async fn run(
    common: &CommonArgs,
    addrs: &[String],
    service: &str,
    wait: Duration,
) -> anyhow::Result<()> {
    if addrs.is_empty() {
        bail!("give at least one --addr URL");
    }
    // A health check needs only the runtime's keys (client, auth).
    let config = common.load(&livemesh_mesh::config::Registry::new())?;
    let security = Security::from_config(&config.auth)?;
    let stack = ClientStack::new(&config.client).secured(&security, "health-check")?;
    let deadline = Instant::now() + wait;
    let mut failed = Vec::new();
    for addr in addrs {
        let url = if addr.contains("://") {
            addr.clone()
        } else {
            format!("http://{addr}")
        };
        let mut client = HealthClient::new(stack.channel(&url).with_context(|| url.clone())?);
        let status = loop {
            let answer = client
                .check(HealthCheckRequest {
                    service: service.to_owned(),
                })
                .await;
            let status = match answer {
                Ok(reply) => Ok(reply.into_inner().status()),
                Err(status) => Err(status),
            };
            if matches!(status, Ok(ServingStatus::Serving)) || Instant::now() >= deadline {
                break status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        match status {
            Ok(ServingStatus::Serving) => println!("{url}: SERVING"),
            Ok(other) => {
                println!("{url}: {}", other.as_str_name());
                failed.push(url);
            }
            Err(status) => {
                println!("{url}: {:?}: {}", status.code(), status.message());
                failed.push(url);
            }
        }
    }
    if !failed.is_empty() {
        bail!("not serving: {}", failed.join(", "));
    }
    Ok(())
}
