//! The `[publish]` section: a dispatcher.

use livemesh_mesh::config::{Config, Peer, Section};
use serde::{Deserialize, Serialize};

/// A dispatcher.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PublishConfig {
    /// This datacenter's name; publishes forwarded to peers carry it.
    pub datacenter: String,
    /// Dispatchers of other datacenters (`http://host:port`); every local
    /// publish of an ordered event (comment, gift, room
    /// ended) is forwarded to each once; love totals and viewer counts are
    /// each datacenter's own and stay local.
    pub peers: Vec<String>,
    /// ongoing-query, whose Watch tells of room ends. Empty: this process's
    /// own address.
    pub ongoing_query_url: String,
    /// How long a Deliver to one subscribe node may take. A Publish waits
    /// for every node whose breaker is closed, so until a dead node's
    /// breaker opens every Publish takes this long: it must stay below
    /// `client.breaker_slow_call_ms`, or the Publish callers' breakers count
    /// those publishes as slow and open on the dispatcher (one dead node
    /// would then stop all publishing). A healthy Deliver is an in-memory
    /// hand-off that answers in a few milliseconds.
    pub deliver_timeout_ms: u64,
    /// The longest comment, in characters.
    pub max_comment_chars: u32,
}

impl Default for PublishConfig {
    fn default() -> Self {
        Self {
            datacenter: "local".to_owned(),
            peers: Vec::new(),
            ongoing_query_url: String::new(),
            deliver_timeout_ms: 250,
            max_comment_chars: 2_000,
        }
    }
}

impl Section for PublishConfig {
    const NAME: &'static str = "publish";
    const LIST_KEYS: &'static [&'static str] = &["peers"];

    fn validate(&self, config: &Config) -> Result<(), String> {
        if self.deliver_timeout_ms == 0 {
            return Err("publish.deliver_timeout_ms must be at least 1".into());
        }
        if let Some(peer) = self
            .peers
            .iter()
            .find(|p| !(p.starts_with("http://") || p.starts_with("https://")))
        {
            return Err(format!(
                "publish.peers: {peer:?} is not an http:// or https:// URL"
            ));
        }
        if self.deliver_timeout_ms >= config.client.breaker_slow_call_ms {
            return Err(format!(
                "publish.deliver_timeout_ms ({}) must be below client.breaker_slow_call_ms ({}): \
                 until a dead subscribe node's breaker opens, every Publish waits the Deliver \
                 timeout, and callers' breakers would count those publishes as slow and open on \
                 the dispatcher",
                self.deliver_timeout_ms, config.client.breaker_slow_call_ms
            ));
        }
        Ok(())
    }

    fn peers(&self) -> Vec<Peer<'_>> {
        let mut peers = vec![Peer {
            key: "publish.ongoing_query_url",
            url: &self.ongoing_query_url,
            required: Some("ongoing-query"),
        }];
        peers.extend(self.peers.iter().map(|url| Peer {
            key: "publish.peers",
            url,
            required: None,
        }));
        peers
    }

    fn check_own_process(&self, config: &Config, report: &mut dyn FnMut(&str, String)) {
        if config.redis_urls().is_none() {
            report(
                "redis_url",
                "unset: this process would keep its state in its own memory, where no \
                 other process looks; set it to the Redis (Cluster) the mesh shares"
                    .into(),
            );
        }
    }
}
