//! The room slice's domain: starting and ending rooms in their region's
//! table, and answering reads from the cache, which a periodic full scan
//! reconciles with the tables.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crossbeam_skiplist::SkipMap;
use std::time::{Duration, Instant};

use livemesh_mesh::now_ms;

use crate::cache::{Applied, RoomCache};
use crate::error::RoomError;
use crate::partition::{MAX_WORKERS, owner};
use crate::room::{RoomRecord, local_id, region_of};
use crate::store::{EndOutcome, RegionStore};

/// Pages of the scan; bounded so one scan never holds a huge result set.
const SCAN_PAGE: u32 = 1_000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;
pub const MAX_PAGE_SIZE: u32 = 1_000;

/// Figures about the cache, for logs and (later) metrics.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Cache entries a scan had to insert, update or drop after the first
    /// scan: changes the write path did not deliver.
    pub drift_repaired: AtomicU64,
    pub scans: AtomicU64,
    pub scan_failures: AtomicU64,
    /// Row changes the change feeds delivered.
    pub feed_changes: AtomicU64,
    /// Times a change feed broke (or lost its position) and was healed by a rescan.
    pub feed_breaks: AtomicU64,
}

/// The outcome of one full scan of one region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanReport {
    pub ongoing: usize,
    pub repaired: u64,
}

/// How many worker counts keep a memoised partition.
const PARTITION_MEMOS: usize = 16;

/// Every worker's share of the ongoing rooms of one cache generation.
#[derive(Debug)]
struct PartitionMemo {
    generation: u64,
    parts: Vec<Vec<u64>>,
}

/// The rooms of every configured region, and the cache in front of them.
#[derive(Debug)]
pub struct Rooms {
    /// Memoised partitions by worker count (lock-free like the cache).
    partitions: SkipMap<u32, Arc<PartitionMemo>>,
    regions: BTreeMap<u16, RegionStore>,
    cache: RoomCache,
    ended_retention: Duration,
    stats: CacheStats,
}

impl Rooms {
    /// Rooms over `regions`, with an empty cache: call [`Rooms::scan_all`]
    /// before serving reads.
    pub fn new(regions: Vec<RegionStore>, ended_retention: Duration, watch_window: usize) -> Self {
        Self {
            regions: regions.into_iter().map(|r| (r.region(), r)).collect(),
            cache: RoomCache::new(watch_window),
            partitions: SkipMap::new(),
            ended_retention,
            stats: CacheStats::default(),
        }
    }

    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    pub fn store(&self, region: u16) -> Option<&RegionStore> {
        self.regions.get(&region)
    }

    pub fn stores(&self) -> impl Iterator<Item = &RegionStore> {
        self.regions.values()
    }

    pub fn cache(&self) -> &RoomCache {
        &self.cache
    }

    /// Applies rows a change feed delivered, telling watchers.
    pub fn apply_feed(&self, rooms: impl IntoIterator<Item = RoomRecord>) {
        for room in rooms {
            self.cache.apply_and_emit(room);
        }
    }

    /// A change feed saw a room's row deleted. Rooms are never deleted by
    /// livemesh; the cache drops it and the log says so.
    pub fn forget_deleted(&self, room_id: u64) {
        if self.cache.forget(room_id, Instant::now()) {
            tracing::warn!(
                room_id,
                "a room row was deleted from its table; dropped from the cache"
            );
        }
    }

    /// Scans one region again after its change feed broke; what the scan
    /// repairs is told to watchers.
    pub async fn rescan_region(&self, region: u16) -> Result<ScanReport, RoomError> {
        let store = self.regions.get(&region).ok_or(RoomError::NotFound(0))?;
        let report = self.scan_region(store, true).await?;
        if report.repaired > 0 {
            self.stats
                .drift_repaired
                .fetch_add(report.repaired, Ordering::Relaxed);
            tracing::warn!(
                region,
                repaired = report.repaired,
                "rescan repaired cache entries the change feed had missed"
            );
        }
        Ok(report)
    }

    /// Starts a room for `anchor_id` in the anchor's region.
    pub async fn start_room(&self, anchor_id: u64) -> Result<RoomRecord, RoomError> {
        if anchor_id == 0 {
            return Err(RoomError::InvalidArgument(
                "anchor_id must be the streamer's user id; 0 is not a user".into(),
            ));
        }
        let region = region_of(anchor_id).ok_or_else(|| {
            RoomError::InvalidArgument(format!(
                "anchor_id {anchor_id} has bit 63 set; anchor ids are below 2^63"
            ))
        })?;
        let store = self
            .regions
            .get(&region)
            .ok_or(RoomError::RegionNotConfigured { anchor_id, region })?;
        let room = store
            .insert(anchor_id, now_ms())
            .await
            .map_err(|source| RoomError::Store { region, source })?;
        // Written through, so a GetRoom right after the start finds it.
        self.cache.apply_and_emit(room);
        tracing::info!(room_id = room.room_id, anchor_id, region, "room started");
        Ok(room)
    }

    /// Ends an ongoing room.
    pub async fn end_room(&self, room_id: u64) -> Result<RoomRecord, RoomError> {
        let (region, store) = self.route(room_id)?;
        // The change feed may see the ended row before this call applies
        // it: the end carries this call's trace either way.
        let log = self.cache.log();
        log.ending(
            room_id,
            livemesh_mesh::rpc_telemetry::Traceparent::current(),
        );
        let result = self.end_in(region, store, room_id).await;
        log.ended(room_id);
        result
    }

    async fn end_in(
        &self,
        region: u16,
        store: &RegionStore,
        room_id: u64,
    ) -> Result<RoomRecord, RoomError> {
        let outcome = store
            .end(room_id, now_ms())
            .await
            .map_err(|source| RoomError::Store { region, source })?;
        match outcome {
            EndOutcome::Ended(room) => {
                self.cache.apply_and_emit(room);
                tracing::info!(room_id, "room ended");
                Ok(room)
            }
            EndOutcome::AlreadyEnded(room) => {
                self.cache.apply_and_emit(room);
                Err(RoomError::AlreadyEnded {
                    room_id,
                    ended_at_ms: room.ended_at_ms.unwrap_or_default(),
                })
            }
            EndOutcome::NotFound => Err(RoomError::NotFound(room_id)),
        }
    }

    /// A room from the cache, or from its database on a miss.
    pub async fn get_room(&self, room_id: u64) -> Result<RoomRecord, RoomError> {
        if let Some(room) = self.cache.get(room_id) {
            return Ok(room);
        }
        let (region, store) = self.route(room_id)?;
        let room = store
            .get(room_id)
            .await
            .map_err(|source| RoomError::Store { region, source })?
            .ok_or(RoomError::NotFound(room_id))?;
        // A room this replica had not heard of yet is news for its watchers
        // if it is live or only just ended; long-ended rooms are not.
        let recent = room.ended_at_ms.is_none_or(|ended| {
            now_ms().saturating_sub(ended)
                < i64::try_from(self.ended_retention.as_millis()).unwrap_or(i64::MAX)
        });
        if recent {
            self.cache.apply_and_emit(room);
        } else {
            self.cache.apply(room);
        }
        Ok(room)
    }

    /// A page of ongoing rooms in ascending id order and the token of the next.
    pub fn list_ongoing(
        &self,
        page_size: u32,
        page_token: &str,
    ) -> Result<(Vec<RoomRecord>, String), RoomError> {
        let after = if page_token.is_empty() {
            None
        } else {
            Some(page_token.parse::<u64>().map_err(|_| {
                RoomError::InvalidArgument(format!(
                    "page_token {} was not issued by ListOngoing; pass the previous \
                     response's next_page_token, or leave it empty for the first page",
                    livemesh_mesh::excerpt(page_token)
                ))
            })?)
        };
        let size = match page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        };
        let (rooms, more) = self.cache.ongoing_page(after, size as usize);
        let next = match rooms.last() {
            Some(last) if more => last.room_id.to_string(),
            _ => String::new(),
        };
        Ok((rooms, next))
    }

    /// The ongoing rooms that worker `index` of `total` owns.
    pub fn partition(&self, index: u32, total: u32) -> Result<Vec<u64>, RoomError> {
        if total == 0 || total > MAX_WORKERS {
            return Err(RoomError::InvalidArgument(format!(
                "total must be between 1 and {MAX_WORKERS} (the number of workers sharing the rooms); got {total}"
            )));
        }
        if index >= total {
            return Err(RoomError::InvalidArgument(format!(
                "index {index} must be below total {total} (workers are numbered from 0)"
            )));
        }
        // Workers ask again and again while the ongoing set stands still:
        // one pass assigns every room of a generation, later asks reuse it.
        let generation = self.cache.generation();
        if let Some(memo) = self.partitions.get(&total)
            && memo.value().generation == generation
        {
            return Ok(memo.value().parts[index as usize].clone());
        }
        let mut parts = vec![Vec::new(); total as usize];
        for room in self.cache.ongoing_ids() {
            parts[owner(room, total) as usize].push(room);
        }
        let answer = parts[index as usize].clone();
        // Bounded: a client cycling through totals must not grow memory.
        if self.partitions.len() < PARTITION_MEMOS || self.partitions.contains_key(&total) {
            self.partitions
                .insert(total, Arc::new(PartitionMemo { generation, parts }));
        }
        Ok(answer)
    }

    /// Scans every region once; a failing region is logged and counted, the
    /// others still scan. Returns the first failure, if any.
    pub async fn scan_all(&self) -> Result<ScanReport, RoomError> {
        let mut total = ScanReport::default();
        let mut failure = None;
        // The first scan fills the cache; later ones repair it, and repairs
        // are changes watchers must hear of.
        let first = self.stats.scans.fetch_add(1, Ordering::Relaxed) == 0;
        for store in self.regions.values() {
            match self.scan_region(store, !first).await {
                Ok(report) => {
                    total.ongoing += report.ongoing;
                    total.repaired += report.repaired;
                }
                Err(err) => {
                    self.stats.scan_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(region = store.region(), %err, "full scan failed; the cache may be stale until the next scan");
                    failure.get_or_insert(err);
                }
            }
        }
        if !first && total.repaired > 0 {
            self.stats
                .drift_repaired
                .fetch_add(total.repaired, Ordering::Relaxed);
            tracing::warn!(
                repaired = total.repaired,
                "full scan repaired cache entries the write path had not delivered"
            );
        }
        match failure {
            Some(err) => Err(err),
            None => Ok(total),
        }
    }

    /// Reconciles the cache with one region's table: every ongoing row is
    /// applied (the version check keeps newer cached copies), and every
    /// cached ongoing room the scan did not see is read again.
    async fn scan_region(&self, store: &RegionStore, emit: bool) -> Result<ScanReport, RoomError> {
        let apply = |room| {
            if emit {
                self.cache.apply_and_emit(room)
            } else {
                self.cache.apply(room)
            }
        };
        let region = store.region();
        let err = |source| RoomError::Store { region, source };
        let started = Instant::now();
        let mut seen = HashSet::new();
        let mut repaired = 0;
        let mut after = 0;
        loop {
            let page = store.ongoing_page(after, SCAN_PAGE).await.map_err(err)?;
            for room in &page {
                seen.insert(room.room_id);
                if apply(*room) != Applied::Unchanged {
                    repaired += 1;
                }
            }
            match page.last() {
                Some(last) if page.len() == SCAN_PAGE as usize => after = local_id(last.room_id),
                _ => break,
            }
        }
        // A room cached as ongoing before the scan began and absent from it
        // has ended (or gone) since; its row says which.
        for room_id in self.cache.ongoing_in_region_cached_before(region, started) {
            if seen.contains(&room_id) {
                continue;
            }
            match store.get(room_id).await.map_err(err)? {
                Some(room) => {
                    if apply(room) != Applied::Unchanged {
                        repaired += 1;
                    }
                }
                None => {
                    if self.cache.forget(room_id, started) {
                        repaired += 1;
                    }
                }
            }
        }
        self.cache.prune_ended(Instant::now(), self.ended_retention);
        Ok(ScanReport {
            ongoing: seen.len(),
            repaired,
        })
    }

    fn route(&self, room_id: u64) -> Result<(u16, &RegionStore), RoomError> {
        if room_id == 0 {
            return Err(RoomError::InvalidArgument(
                "room_id must be a room id returned by StartRoom; 0 is not one".into(),
            ));
        }
        // An id naming no configured region names no room.
        let region = region_of(room_id).ok_or(RoomError::NotFound(room_id))?;
        let store = self
            .regions
            .get(&region)
            .ok_or(RoomError::NotFound(room_id))?;
        Ok((region, store))
    }
}
