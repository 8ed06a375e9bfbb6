//! Change feeds: how a replica hears, within milliseconds, of room changes
//! made anywhere (another replica, a migration, a plain SQL statement).
//!
//! - MariaDB/MySQL: the binlog, tailed as a replica ([`crate::binlog`]).
//! - SQLite: the `room_changes` table that triggers fill inside every
//!   writing transaction, polled in sequence order.
//!
//! Either way the position is saved in the region's `feed_positions` table
//! (at most once a second) and a restarted replica resumes from it. When a
//! feed breaks or its position is gone, the replica takes the current
//! position, rescans the region (telling watchers what the scan repaired),
//! and follows the feed again from that position: nothing committed is
//! missed, because everything before the position is in the scan and
//! everything after it comes through the feed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use livemesh_mesh::backoff::Backoff;
use livemesh_mesh::sql::Db;

use crate::binlog::{self, BinlogPosition, TailEvent};
use crate::room::{Status, room_id};
use crate::rooms::Rooms;
use crate::store::RegionStore;

/// Change-table entries read per poll.
const FEED_BATCH: u32 = 1_000;
/// Change-table entries kept behind the position, for other readers.
const FEED_KEEP: i64 = 10_000;
/// How often the position is saved while changes flow.
const SAVE_EVERY: Duration = Duration::from_secs(1);
/// How often a position that moved only past other tables' commits is saved.
const SAVE_IDLE_EVERY: Duration = Duration::from_secs(60);

/// How a replica follows its feeds.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    pub poll: Duration,
    pub consumer: String,
    /// 0: derived from the consumer and the region.
    pub server_id: u32,
}

impl FeedConfig {
    /// The configured consumer name, else the host name, else `ongoing-query`.
    pub fn consumer_name(configured: &str) -> String {
        if !configured.is_empty() {
            return configured.to_owned();
        }
        std::env::var("HOSTNAME")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "ongoing-query".to_owned())
    }

    /// The binlog replica id for `region`: configured, or a stable hash of
    /// consumer and region kept clear of the small ids servers usually have.
    fn server_id(&self, region: u16) -> u32 {
        if self.server_id != 0 {
            return self.server_id;
        }
        let mut h: u32 = 0x811c_9dc5;
        for byte in self.consumer.bytes().chain(region.to_le_bytes()) {
            h = (h ^ u32::from(byte)).wrapping_mul(0x0100_0193);
        }
        0x4000_0000 | (h & 0x3fff_ffff)
    }
}

/// Where a feed starts: the saved position, or the end of the feed taken
/// before the startup scan (so nothing committed in between is missed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedStart {
    Binlog(BinlogPosition),
    Table(i64),
}

/// The start position of `store`'s feed, read before the cache is filled.
/// `None` when neither a saved nor a current position can be read now; the
/// feed then takes the current position later and rescans.
pub async fn start_position(store: &RegionStore, consumer: &str) -> Option<FeedStart> {
    let region = store.region();
    let saved = match store.load_position(consumer).await {
        Ok(saved) => saved,
        Err(err) => {
            tracing::warn!(region, %err, "reading the saved feed position failed");
            None
        }
    };
    match store.db() {
        Db::Sqlite(_) => {
            if let Some(seq) = saved.and_then(|t| t.parse::<i64>().ok()) {
                return Some(FeedStart::Table(seq));
            }
            match store.feed_head().await {
                Ok(head) => Some(FeedStart::Table(head)),
                Err(err) => {
                    tracing::warn!(region, %err, "reading the change table failed");
                    None
                }
            }
        }
        Db::MySql(_) => {
            if let Some(position) = saved.and_then(|t| BinlogPosition::from_token(&t)) {
                tracing::info!(region, position = %position.to_token(), "resuming the binlog from the saved position");
                return Some(FeedStart::Binlog(position));
            }
            match binlog::current_position(store.url()).await {
                Ok(position) => Some(FeedStart::Binlog(position)),
                Err(err) => {
                    tracing::error!(region, %err, "cannot read the binlog position (is log_bin on, and does the user have REPLICATION CLIENT?); the feed will retry");
                    None
                }
            }
        }
    }
}

/// Follows `region`'s feed from `start` for as long as the future runs.
pub async fn follow(rooms: Arc<Rooms>, region: u16, config: FeedConfig, start: Option<FeedStart>) {
    let Some(store) = rooms.store(region).cloned() else {
        return;
    };
    match store.db() {
        Db::Sqlite(_) => {
            let start = match start {
                Some(FeedStart::Table(seq)) => Some(seq),
                _ => None,
            };
            follow_table(&rooms, &store, &config, start).await;
        }
        Db::MySql(_) => {
            let start = match start {
                Some(FeedStart::Binlog(position)) => Some(position),
                _ => None,
            };
            follow_binlog(&rooms, &store, &config, start).await;
        }
    }
}

/// Saves a feed position, throttled.
struct Saver<'a> {
    store: &'a RegionStore,
    consumer: &'a str,
    saved: Option<String>,
    saved_at: Option<Instant>,
}

impl<'a> Saver<'a> {
    fn new(store: &'a RegionStore, consumer: &'a str) -> Self {
        Self {
            store,
            consumer,
            saved: None,
            saved_at: None,
        }
    }

    async fn save(&mut self, token: String, every: Duration) {
        let recent = self.saved_at.is_some_and(|at| at.elapsed() < every);
        if self.saved.as_deref() == Some(token.as_str()) || recent {
            return;
        }
        self.save_now(token).await;
    }

    async fn save_now(&mut self, token: String) {
        match self.store.save_position(self.consumer, &token).await {
            Ok(()) => {
                self.saved = Some(token);
                self.saved_at = Some(Instant::now());
            }
            // Not fatal: a restart resumes from an older position and
            // replays a little more; versions make replays harmless.
            Err(err) => {
                tracing::warn!(region = self.store.region(), %err, "saving the feed position failed")
            }
        }
    }
}

/// The back-off of a region's feed: from 100 ms, doubling up to 30 s
/// (jittered), reset after progress; it never gives up.
fn feed_backoff(region: u16) -> Backoff {
    Backoff::new(
        format!("following the change feed of region {region}"),
        Duration::from_millis(100),
        Duration::from_secs(30),
    )
}

/// Rescans `region` until it succeeds, then counts the break.
async fn heal(rooms: &Rooms, region: u16, backoff: &mut Backoff) {
    rooms.stats().feed_breaks.fetch_add(1, Ordering::Relaxed);
    while let Err(err) = rooms.rescan_region(region).await {
        tracing::warn!(region, %err, "rescan after a feed break failed; retrying");
        backoff.wait().await;
    }
}

async fn follow_table(rooms: &Rooms, store: &RegionStore, config: &FeedConfig, start: Option<i64>) {
    let region = store.region();
    let mut saver = Saver::new(store, &config.consumer);
    let mut backoff = feed_backoff(region);
    let mut after = match start {
        Some(seq) => seq,
        None => {
            // No position from before the startup scan: take the head now
            // and rescan, so nothing in between is missed.
            let head = loop {
                match store.feed_head().await {
                    Ok(head) => break head,
                    Err(err) => {
                        tracing::warn!(region, %err, "reading the change table failed");
                        backoff.wait().await;
                    }
                }
            };
            heal(rooms, region, &mut backoff).await;
            head
        }
    };
    let mut tick = tokio::time::interval(config.poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut trimmed_at = Instant::now();
    loop {
        tick.tick().await;
        let entries = match store.feed_after(after, FEED_BATCH).await {
            Ok(entries) => entries,
            Err(err) => {
                tracing::warn!(region, %err, "reading the change table failed");
                backoff.wait().await;
                continue;
            }
        };
        backoff.reset();
        let Some(first) = entries.first() else {
            continue;
        };
        if first.seq > after + 1 && after > 0 {
            // Entries after our position were trimmed: what they said is
            // only in the table now.
            tracing::warn!(
                region,
                after,
                first = first.seq,
                "feed position is gone; rescanning"
            );
            let head = entries.last().map_or(after, |e| e.seq);
            heal(rooms, region, &mut backoff).await;
            after = head;
            continue;
        }
        for entry in &entries {
            if entry.deleted {
                rooms.forget_deleted(entry.room.room_id);
            } else {
                rooms.apply_feed([entry.room]);
            }
            after = entry.seq;
        }
        rooms
            .stats()
            .feed_changes
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        saver.save(after.to_string(), SAVE_EVERY).await;
        if trimmed_at.elapsed() > Duration::from_secs(60) {
            trimmed_at = Instant::now();
            if let Err(err) = store.trim_feed(after - FEED_KEEP).await {
                tracing::warn!(region, %err, "trimming the change table failed");
            }
        }
    }
}

async fn follow_binlog(
    rooms: &Rooms,
    store: &RegionStore,
    config: &FeedConfig,
    start: Option<BinlogPosition>,
) {
    let region = store.region();
    let url = store.url();
    let Some(database) = database_of(url) else {
        tracing::error!(
            region,
            "the rooms database URL names no database; the binlog cannot be filtered, so only the scan keeps this region fresh"
        );
        return;
    };
    let server_id = config.server_id(region);
    let lag = opentelemetry::global::meter("livemesh")
        .f64_histogram("livemesh.ongoing_query.binlog_lag")
        .with_unit("s")
        .with_description(
            "now − the commit time of a rooms change when the binlog tail applies it (1 s resolution)",
        )
        .with_boundaries(vec![0.0, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3_600.0])
        .build();
    let mut saver = Saver::new(store, &config.consumer);
    let mut backoff = feed_backoff(region);
    let mut from = match start {
        Some(position) => position,
        None => {
            // No position from before the startup scan: take the current
            // one and rescan, so nothing in between is missed.
            let position = current_position(url, region, &mut backoff).await;
            heal(rooms, region, &mut backoff).await;
            position
        }
    };
    loop {
        let mut events = binlog::spawn_tail(url, &database, from.clone(), server_id);
        let reason = loop {
            match events.recv().await {
                Some(Ok(TailEvent::Committed {
                    rows,
                    deleted,
                    position,
                    committed_at,
                })) => {
                    backoff.reset();
                    lag.record(
                        (livemesh_mesh::now_ms() / 1_000 - i64::from(committed_at)).max(0) as f64,
                        &[opentelemetry::KeyValue::new("region", i64::from(region))],
                    );
                    let count = rows.len() + deleted.len();
                    rooms.apply_feed(rows.into_iter().filter_map(|row| {
                        let status = Status::from_db(row.status);
                        if status.is_none() {
                            tracing::warn!(
                                region,
                                id = row.id,
                                status = row.status,
                                "binlog row with an unknown status skipped"
                            );
                        }
                        Some(crate::room::RoomRecord {
                            room_id: room_id(region, row.id),
                            anchor_id: row.anchor_id.unsigned_abs(),
                            status: status?,
                            started_at_ms: row.started_at_ms,
                            ended_at_ms: row.ended_at_ms,
                            version: row.version.unsigned_abs(),
                        })
                    }));
                    for id in deleted {
                        rooms.forget_deleted(room_id(region, id));
                    }
                    rooms
                        .stats()
                        .feed_changes
                        .fetch_add(count as u64, Ordering::Relaxed);
                    from = position;
                    saver.save(from.to_token(), SAVE_EVERY).await;
                }
                Some(Ok(TailEvent::Progress { position })) => {
                    from = position;
                    saver.save(from.to_token(), SAVE_IDLE_EVERY).await;
                }
                Some(Err(err)) => break err.to_string(),
                None => break "the tail ended".to_owned(),
            }
        };
        tracing::warn!(region, %reason, "binlog tail stopped; rescanning the region and tailing again from the current position");
        backoff.wait().await;
        // Position first, then the scan: whatever commits after the
        // position arrives through the new tail.
        from = current_position(url, region, &mut backoff).await;
        heal(rooms, region, &mut backoff).await;
        saver.save_now(from.to_token()).await;
    }
}

async fn current_position(url: &str, region: u16, backoff: &mut Backoff) -> BinlogPosition {
    loop {
        match binlog::current_position(url).await {
            Ok(position) => return position,
            Err(err) => {
                tracing::warn!(region, %err, "reading the binlog position failed; retrying");
                backoff.wait().await;
            }
        }
    }
}

fn database_of(url: &str) -> Option<String> {
    use std::str::FromStr as _;
    let url = url.replacen("mariadb:", "mysql:", 1);
    sqlx::mysql::MySqlConnectOptions::from_str(&url)
        .ok()?
        .get_database()
        .map(str::to_owned)
}
