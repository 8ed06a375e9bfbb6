//! The `[gifts]` section: paid gifts and their settlement.

use livemesh_mesh::config::{Config, Peer, Section};
use serde::{Deserialize, Serialize};

/// Paid gifts and their settlement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GiftsConfig {
    /// The balance shards' databases, in shard order (a user's shard is a
    /// stable function of the user id and this list's length, so the list
    /// never changes length once money is in it). Empty: `shards` SQLite
    /// files `gifts-shard-<n>.db` under the data dir.
    pub shard_urls: Vec<String>,
    /// How many SQLite shards the embedded default uses.
    pub shards: u32,
    /// A room's virtual account is split over this many rows per shard, so
    /// that concurrent gifts to a hot room do not queue on one row.
    pub room_subaccounts: u32,
    /// The platform's cut of a room's gifts at settlement, in basis points
    /// (3000 = 30%); the streamer gets the rest.
    pub platform_cut_bps: u32,
    /// Group commit: deposits and gifts to one shard that arrive together
    /// are applied in one transaction of up to this many.
    pub max_batch: usize,
    /// Batch workers (transactions in flight) per shard. One by default:
    /// while its transaction commits, the gifts that arrive wait and make
    /// the next batch, so batches grow with the load (more workers split
    /// the waiting gifts into smaller batches that cost more per gift).
    pub batch_workers: usize,
    /// ongoing-query, for room lookups and the Watch of starts and ends.
    /// Empty: this process's own address.
    pub ongoing_query_url: String,
    /// The dispatcher committed gifts are published through. Empty: this
    /// process's own address.
    pub publish_url: String,
    /// The largest amount of one deposit or gift, in the smallest currency
    /// unit; larger ones are refused (INVALID_ARGUMENT).
    pub max_transfer_amount: i64,
    /// How long a gift batch waits for the dispatcher to take a gift's
    /// event before the gift is refused (UNAVAILABLE, retry with the same
    /// key). A gift is announced before it commits, so that no gift that
    /// answered OK is missing from its room's stream.
    pub announce_timeout_ms: u64,
}

impl Default for GiftsConfig {
    fn default() -> Self {
        Self {
            shard_urls: Vec::new(),
            shards: 4,
            room_subaccounts: 8,
            platform_cut_bps: 3_000,
            max_batch: 128,
            batch_workers: 1,
            ongoing_query_url: String::new(),
            publish_url: String::new(),
            max_transfer_amount: 1_000_000_000_000,
            announce_timeout_ms: 2_000,
        }
    }
}

impl Section for GiftsConfig {
    const NAME: &'static str = "gifts";
    const LIST_KEYS: &'static [&'static str] = &["shard_urls"];

    fn validate(&self, _config: &Config) -> Result<(), String> {
        if self.shards == 0
            || self.room_subaccounts == 0
            || self.max_batch == 0
            || self.batch_workers == 0
        {
            return Err(
                "gifts.shards, gifts.room_subaccounts, gifts.max_batch and gifts.batch_workers \
                 must be at least 1"
                    .into(),
            );
        }
        if self.platform_cut_bps > 10_000 {
            return Err("gifts.platform_cut_bps is at most 10000 (100%)".into());
        }
        if self.max_transfer_amount <= 0 {
            return Err("gifts.max_transfer_amount must be at least 1".into());
        }
        if self.announce_timeout_ms == 0 {
            return Err("gifts.announce_timeout_ms must be at least 1".into());
        }
        Ok(())
    }

    fn peers(&self) -> Vec<Peer<'_>> {
        vec![
            Peer {
                key: "gifts.ongoing_query_url",
                url: &self.ongoing_query_url,
                required: Some("ongoing-query"),
            },
            Peer {
                key: "gifts.publish_url",
                url: &self.publish_url,
                required: Some("publish"),
            },
        ]
    }

    fn sql_urls(&self) -> Vec<(String, &str)> {
        self.shard_urls
            .iter()
            .enumerate()
            .map(|(i, url)| (format!("gifts.shard_urls[{i}]"), url.as_str()))
            .collect()
    }
}
