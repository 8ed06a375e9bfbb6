//! The `[rooms]` section: the rooms tables and the ongoing-rooms cache.

use livemesh_mesh::config::{Config, Section};
use serde::{Deserialize, Serialize};

/// The rooms table and the ongoing-rooms cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RoomsConfig {
    /// The region whose database is `database_url`.
    pub local_region: u16,
    /// Further regional rooms databases; a room id names its region.
    pub regions: Vec<RegionConfig>,
    /// Period of the full scan that reconciles the cache with the tables.
    pub scan_interval_ms: u64,
    /// How long an ended room stays in the cache before reads go to SQL.
    pub ended_retention_ms: u64,
    /// Follow each rooms database's change feed (MariaDB/MySQL: the binlog;
    /// SQLite: the change table its triggers fill) to see changes made
    /// anywhere within milliseconds. Off: only the write path and the scan.
    pub feed: bool,
    /// SQLite: how often the change table is polled.
    pub feed_poll_ms: u64,
    /// The name this replica saves its feed positions under. Empty: the
    /// host name (a StatefulSet pod's stable name), else `ongoing-query`.
    pub feed_consumer: String,
    /// The replica server id the binlog tail registers with; must differ
    /// from every server's and other tail's id. 0: derived from the
    /// consumer name and region.
    pub binlog_server_id: u32,
    /// How many changes `Watch` keeps for watchers that reconnect.
    pub watch_window: usize,
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            local_region: 0,
            regions: Vec::new(),
            scan_interval_ms: 5_000,
            ended_retention_ms: 600_000,
            feed: true,
            feed_poll_ms: 10,
            feed_consumer: String::new(),
            binlog_server_id: 0,
            watch_window: 10_000,
        }
    }
}

/// One regional rooms database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionConfig {
    pub id: u16,
    pub database_url: String,
}

impl Section for RoomsConfig {
    const NAME: &'static str = "rooms";

    fn validate(&self, _config: &Config) -> Result<(), String> {
        if self.scan_interval_ms == 0 {
            return Err("rooms.scan_interval_ms must be at least 1".into());
        }
        if self.feed_poll_ms == 0 || self.watch_window == 0 {
            return Err("rooms.feed_poll_ms and rooms.watch_window must be at least 1".into());
        }
        let mut seen = vec![self.local_region];
        for region in &self.regions {
            if seen.contains(&region.id) {
                return Err(format!(
                    "region {} is configured twice (rooms.local_region and rooms.regions must name distinct regions)",
                    region.id
                ));
            }
            seen.push(region.id);
        }
        Ok(())
    }

    fn sql_urls(&self) -> Vec<(String, &str)> {
        self.regions
            .iter()
            .map(|region| {
                (
                    format!("rooms.regions[id = {}].database_url", region.id),
                    region.database_url.as_str(),
                )
            })
            .collect()
    }

    fn check_own_process(&self, config: &Config, report: &mut dyn FnMut(&str, String)) {
        if let Some(url) = &config.database_url
            && url.starts_with("mysql:")
            && self.feed
            && livemesh_mesh::check::sql_database(url).is_none()
        {
            report(
                "database_url",
                "names no database: the binlog tail filters the rooms table by database; \
                 use mysql://USER:PASS@HOST:PORT/DATABASE"
                    .into(),
            );
        }
    }
}
