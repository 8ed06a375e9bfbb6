//! The `[subscribe]` section: a subscribe node.

use std::str::FromStr as _;

use livemesh_mesh::config::{Config, Peer, Section};
use serde::{Deserialize, Serialize};

/// A subscribe node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubscribeConfig {
    /// The address dispatchers reach this node at (`http://host:port`).
    /// Empty: `http://<listen>`; set it when listening on 0.0.0.0 or behind NAT.
    pub node_url: String,
    /// ongoing-query, for room lookups. Empty: this process's own address.
    pub ongoing_query_url: String,
    /// The dispatcher viewer counts are published through. Empty: this
    /// process's own address.
    pub publish_url: String,
    /// Ordered events (comments, gifts) each room keeps for its streams (the
    /// size of its feed's ring): a stream further behind ends with
    /// RESOURCE_EXHAUSTED and its resume position.
    pub queue_len: usize,
    /// The node's registration for a room lives this long unless renewed
    /// (renewed every `report_interval_ms`); a dead node drops out after it.
    pub lease_ms: u64,
    /// How often the node renews its registrations, reports its viewer
    /// counts, and (one node per room) publishes the room's total.
    pub report_interval_ms: u64,
    /// How long an out-of-order event waits for the ones before it before
    /// the node fetches them from the room's history.
    pub gap_wait_ms: u64,
    /// How often the node compares, for every room it holds viewers of,
    /// what it has released with the head of the room's history, and
    /// fetches what it never got (an event appended by a dispatcher that
    /// died before its Deliver). An appended event reaches the node's
    /// viewers within `head_check_ms + gap_wait_ms` plus two store round
    /// trips. 0: only the renewals (`report_interval_ms`) compare.
    pub head_check_ms: u64,
    /// HTTP/2 streams one connection may carry (a BFF multiplexes many
    /// viewers over one connection).
    pub max_streams_per_connection: u32,
}

impl Default for SubscribeConfig {
    fn default() -> Self {
        Self {
            node_url: String::new(),
            ongoing_query_url: String::new(),
            publish_url: String::new(),
            queue_len: 256,
            lease_ms: 10_000,
            report_interval_ms: 2_000,
            gap_wait_ms: 50,
            head_check_ms: 250,
            max_streams_per_connection: 100_000,
        }
    }
}

impl Section for SubscribeConfig {
    const NAME: &'static str = "subscribe";

    fn validate(&self, _config: &Config) -> Result<(), String> {
        if self.queue_len == 0
            || self.report_interval_ms == 0
            || self.gap_wait_ms == 0
            || self.max_streams_per_connection == 0
        {
            return Err("subscribe.queue_len, report_interval_ms, gap_wait_ms and \
                 max_streams_per_connection must be at least 1"
                .into());
        }
        if self.lease_ms < 2 * self.report_interval_ms {
            return Err(
                "subscribe.lease_ms must be at least twice subscribe.report_interval_ms, \
                 or a live node's registrations expire between renewals"
                    .into(),
            );
        }
        Ok(())
    }

    fn peers(&self) -> Vec<Peer<'_>> {
        vec![
            Peer {
                key: "subscribe.node_url",
                url: &self.node_url,
                required: None,
            },
            Peer {
                key: "subscribe.ongoing_query_url",
                url: &self.ongoing_query_url,
                required: Some("ongoing-query"),
            },
            Peer {
                key: "subscribe.publish_url",
                url: &self.publish_url,
                required: Some("publish"),
            },
        ]
    }

    fn check_own_process(&self, config: &Config, report: &mut dyn FnMut(&str, String)) {
        let node_url = config.peer_url(&self.node_url);
        let host = http::Uri::from_str(&node_url)
            .ok()
            .and_then(|uri| uri.host().map(str::to_owned));
        let unspecified = host
            .as_deref()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .and_then(|h| h.parse::<std::net::IpAddr>().ok())
            .is_some_and(|ip| ip.is_unspecified());
        if unspecified {
            report(
                "subscribe.node_url",
                format!(
                    "{node_url:?} is not an address dispatchers can call; set it to this node's own \
                     address (e.g. LIVEMESH_SUBSCRIBE__NODE_URL=http://$(POD_IP):50051)"
                ),
            );
        }
        if config.redis_urls().is_none() {
            report(
                "redis_url",
                "unset: this node would register its rooms in its own memory, where no dispatcher \
                 of another process looks; set it to the Redis (Cluster) the dispatchers use"
                    .into(),
            );
        }
    }
}
