//! The fan-out store: what subscribe nodes and dispatchers share.
//!
//! Per room (all keys hash-tagged `{room:<id>}`, so one Cluster slot holds a
//! room and every multi-key step is one atomic script):
//!
//! - **nodes**: the subscribe nodes holding viewers of the room, each with a
//!   lease (an expiry time) that the node renews; a dead node drops out when
//!   its lease ends. Alongside, each node's viewer count for the room.
//! - **history**: the room's ordered events (comments, gifts, room ended),
//!   each with its offset, trimmed to `history_len` entries (seed part II's
//!   big-key rule). Offsets count from 1 within an **epoch**; a room whose
//!   history was lost (Redis restarted empty, keys expired) gets a new epoch.
//! - **latest**: the newest latest-value event of each kind (love total,
//!   viewer count); these are not in the history.
//! - **ended**: set by the room-ended event; nothing is appended after it.
//! - idempotency keys of publishes, each remembering the position it got.
//!
//! Events are stored without their room id and position (the payload is a
//! `RoomEvent` with those fields zero); readers put them back.
//!
//! Two backends share one meaning: [`FanoutStore::Memory`] (the embedded
//! default: one process's dispatchers and nodes share it) and
//! [`FanoutStore::Redis`] (standalone or Cluster).

mod config;
mod memory;
mod redis_store;

use std::sync::Arc;

pub use livemesh_redis::{RedisError as StoreError, RedisOptions};

pub use self::config::FanoutConfig;
pub use self::memory::MemoryFanout;
pub use self::redis_store::RedisFanout;

/// The idempotency key of a room's room-ended event: whoever publishes it
/// (a dispatcher following Watch, a node catching up), it is published once.
pub const ROOM_ENDED_KEY: &str = "room-ended";

/// How the store keeps rooms.
#[derive(Debug, Clone)]
pub struct FanoutSettings {
    /// Keys are `fanout|<phase>|{room:<id>}|…`.
    pub phase: String,
    pub history_len: u32,
    pub idempotency_ttl_secs: u64,
    pub room_ttl_secs: u64,
    pub ended_ttl_secs: u64,
    /// Redis replicas an append waits for (0: none), and how long (ms).
    pub wait_replicas: u32,
    pub wait_timeout_ms: u64,
}

impl From<&FanoutConfig> for FanoutSettings {
    fn from(c: &FanoutConfig) -> Self {
        Self {
            phase: c.phase.clone(),
            history_len: c.history_len.max(1),
            idempotency_ttl_secs: c.idempotency_ttl_secs.max(1),
            room_ttl_secs: c.room_ttl_secs.max(1),
            ended_ttl_secs: c.ended_ttl_secs.max(1),
            wait_replicas: c.wait_replicas,
            wait_timeout_ms: c.wait_timeout_ms.max(1),
        }
    }
}

impl Default for FanoutSettings {
    fn default() -> Self {
        Self::from(&FanoutConfig::default())
    }
}

/// Where an event goes: the ordered history, or one latest-value slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Slot {
    Ordered,
    /// A latest-value kind, named for the store (`love_total`, `viewer_count`).
    Latest(&'static str),
}

/// One publish for [`FanoutStore::append`].
#[derive(Debug, Clone)]
pub struct Append<'a> {
    pub room_id: u64,
    /// The encoded event without room id and position.
    pub payload: &'a [u8],
    pub slot: Slot,
    pub idempotency_key: Option<&'a str>,
    /// This event ends the room (room ended).
    pub ends_room: bool,
    pub now_ms: i64,
}

/// What an append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Stored at this position; `nodes` hold viewers of the room now.
    New {
        epoch: u64,
        offset: u64,
        nodes: Vec<String>,
    },
    /// The idempotency key was seen: the first publish's position.
    Duplicate { epoch: u64, offset: u64 },
    /// The room has ended; nothing was stored. Its last position.
    Ended { epoch: u64, offset: u64 },
}

/// A room as a node finds it when it joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub epoch: u64,
    /// The last offset of the history (0: none yet).
    pub offset: u64,
    pub ended: bool,
    /// (offset at the time, payload) of the newest event of each latest-value kind.
    pub latest: Vec<(u64, Vec<u8>)>,
}

/// Part of a room's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct History {
    pub epoch: u64,
    /// (offset, payload), ascending.
    pub entries: Vec<(u64, Vec<u8>)>,
}

/// What a node learns when it renews its registration for a room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Renewed {
    /// Viewers of the room over every live node.
    pub viewers: u64,
    /// This node is the room's reporter (the smallest live node id): it
    /// publishes the room's viewer count.
    pub reporter: bool,
    pub epoch: u64,
    /// The history's last offset.
    pub offset: u64,
}

/// Where a room's history stands: its epoch and last offset (0: empty).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub epoch: u64,
    pub offset: u64,
}

/// The fan-out store. Clones share it.
#[derive(Clone)]
pub enum FanoutStore {
    Memory(Arc<MemoryFanout>),
    Redis(Arc<RedisFanout>),
}

impl std::fmt::Debug for FanoutStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FanoutStore::Memory(_) => f.write_str("FanoutStore::Memory"),
            FanoutStore::Redis(store) => write!(f, "FanoutStore::Redis({})", store.describe()),
        }
    }
}

/// The store `config` names: Redis at `redis_url` (standalone or Cluster),
/// else a new in-process store (which only reaches the dispatchers and
/// nodes of this process).
pub fn connect(config: &livemesh_mesh::Config) -> Result<FanoutStore, StoreError> {
    let settings = FanoutSettings::from(&*config.section::<FanoutConfig>());
    match config.redis_urls() {
        Some(urls) => FanoutStore::redis_with(
            urls,
            settings,
            RedisOptions {
                breaker: livemesh_mesh::breaker::BreakerSettings::from(&config.client),
                ..RedisOptions::default()
            },
        ),
        None => Ok(FanoutStore::memory(settings)),
    }
}

impl FanoutStore {
    /// True for the in-process store.
    pub fn is_memory(&self) -> bool {
        matches!(self, FanoutStore::Memory(_))
    }

    /// The in-process store (share the returned value between the
    /// dispatchers and nodes of one process).
    pub fn memory(settings: FanoutSettings) -> Self {
        FanoutStore::Memory(Arc::new(MemoryFanout::new(settings)))
    }

    /// Redis at `urls` (one URL: standalone; comma-separated: Cluster seeds).
    pub fn redis(urls: &str, settings: FanoutSettings) -> Result<Self, StoreError> {
        Self::redis_with(urls, settings, RedisOptions::default())
    }

    /// [`Self::redis`] with explicit pool, timeouts and breaker settings.
    pub fn redis_with(
        urls: &str,
        settings: FanoutSettings,
        options: RedisOptions,
    ) -> Result<Self, StoreError> {
        Ok(FanoutStore::Redis(Arc::new(RedisFanout::connect(
            urls, settings, options,
        )?)))
    }

    /// Appends an event: assigns its position (ordered: the next offset;
    /// latest-value: the history's last offset), stores it, and returns the
    /// room's live nodes, all in one atomic step. An idempotency key seen
    /// before returns the first position and stores nothing.
    #[tracing::instrument(name = "fanout.append", skip_all, fields(room_id = append.room_id))]
    pub async fn append(&self, append: &Append<'_>) -> Result<Appended, StoreError> {
        match self {
            FanoutStore::Memory(store) => Ok(store.append(append)),
            FanoutStore::Redis(store) => store.append(append).await,
        }
    }

    /// Registers `node` for the room until `now_ms + lease_ms` with its
    /// viewer count, and returns the room's head (creating its epoch if the
    /// room has none yet, so that later appends continue it).
    #[tracing::instrument(name = "fanout.join", skip_all, fields(room_id = room_id))]
    pub async fn join(
        &self,
        room_id: u64,
        node: &str,
        viewers: u64,
        lease_ms: u64,
        now_ms: i64,
    ) -> Result<Head, StoreError> {
        match self {
            FanoutStore::Memory(store) => Ok(store.join(room_id, node, viewers, lease_ms, now_ms)),
            FanoutStore::Redis(store) => store.join(room_id, node, viewers, lease_ms, now_ms).await,
        }
    }

    /// Renews `node`'s registration for each `(room, viewers)`; one result
    /// per room, in order.
    #[tracing::instrument(name = "fanout.renew", skip_all, fields(rooms = rooms.len()))]
    pub async fn renew(
        &self,
        node: &str,
        rooms: &[(u64, u64)],
        lease_ms: u64,
        now_ms: i64,
    ) -> Vec<Result<Renewed, StoreError>> {
        match self {
            FanoutStore::Memory(store) => rooms
                .iter()
                .map(|&(room, viewers)| Ok(store.renew(room, node, viewers, lease_ms, now_ms)))
                .collect(),
            FanoutStore::Redis(store) => store.renew(node, rooms, lease_ms, now_ms).await,
        }
    }

    /// Removes `node`'s registration for the room.
    #[tracing::instrument(name = "fanout.leave", skip_all, fields(room_id = room_id))]
    pub async fn leave(&self, room_id: u64, node: &str) -> Result<(), StoreError> {
        match self {
            FanoutStore::Memory(store) => {
                store.leave(room_id, node);
                Ok(())
            }
            FanoutStore::Redis(store) => store.leave(room_id, node).await,
        }
    }

    /// The ordered events with `after < offset <= upto` that the history
    /// still holds, and the room's current epoch.
    #[tracing::instrument(name = "fanout.history", skip_all, fields(room_id = room_id, after = after, upto = upto))]
    pub async fn history(
        &self,
        room_id: u64,
        after: u64,
        upto: u64,
    ) -> Result<History, StoreError> {
        match self {
            FanoutStore::Memory(store) => Ok(store.history(room_id, after, upto)),
            FanoutStore::Redis(store) => store.history(room_id, after, upto).await,
        }
    }

    /// Where each room's history stands (epoch 0: the store holds no
    /// history for it); one result per room, in order. Read only: the
    /// subscribe node's head check, which notices an event appended by a
    /// dispatcher that died before its `Deliver`.
    #[tracing::instrument(name = "fanout.heads", skip_all, fields(rooms = rooms.len()))]
    pub async fn heads(&self, rooms: &[u64]) -> Vec<Result<Position, StoreError>> {
        match self {
            FanoutStore::Memory(store) => rooms.iter().map(|&room| Ok(store.head(room))).collect(),
            FanoutStore::Redis(store) => store.heads(rooms).await,
        }
    }

    /// The room's live nodes.
    #[tracing::instrument(name = "fanout.nodes", skip_all, fields(room_id = room_id))]
    pub async fn nodes(&self, room_id: u64, now_ms: i64) -> Result<Vec<String>, StoreError> {
        match self {
            FanoutStore::Memory(store) => Ok(store.nodes(room_id, now_ms)),
            FanoutStore::Redis(store) => store.nodes(room_id, now_ms).await,
        }
    }

    /// Whether the store holds anything for the room (a publish to a room
    /// the rooms service does not know must leave nothing behind).
    pub async fn holds(&self, room_id: u64) -> Result<bool, StoreError> {
        match self {
            FanoutStore::Memory(store) => Ok(store.holds(room_id)),
            FanoutStore::Redis(store) => store.holds(room_id).await,
        }
    }

    /// How many rooms have anything stored (for tests and diagnostics: on
    /// Redis this is a `KEYS` over the store's phase, on every master of a
    /// Cluster, which walks the whole keyspace).
    pub async fn stored_rooms(&self) -> Result<usize, StoreError> {
        match self {
            FanoutStore::Memory(store) => Ok(store.stored_rooms()),
            FanoutStore::Redis(store) => store.stored_rooms().await,
        }
    }

    /// Checks that the store answers; always `Ok` in memory.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            FanoutStore::Memory(_) => Ok(()),
            FanoutStore::Redis(store) => store.ping().await,
        }
    }
}
