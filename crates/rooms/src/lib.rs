//! What a service knows of rooms: asked of ongoing-query (through the
//! mesh's client stack) and kept for a moment, and told of ends by the
//! Watch stream at once.

use livemesh_mesh::backoff::Backoff;
use livemesh_mesh::lock;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use futures::future::{BoxFuture, Shared};

use livemesh_mesh::MeshChannel;
use livemesh_proto::time::ms_from_timestamp;
use livemesh_proto::v1::ongoing_query_service_client::OngoingQueryServiceClient;
use livemesh_proto::v1::{GetRoomRequest, Room, RoomStatus};

/// How long an ongoing room's record is trusted without asking again; the
/// Watch stream usually tells of an end sooner.
const ONGOING_TTL: Duration = Duration::from_secs(1);
/// Ended rooms remembered (they never start again).
const ENDED_KEPT: usize = 100_000;

/// A room as the other services need it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoomInfo {
    pub room_id: u64,
    /// The streamer.
    pub anchor_id: u64,
    pub started_at_ms: i64,
    pub ended: bool,
}

impl RoomInfo {
    pub fn from_proto(room: &Room) -> Self {
        Self {
            room_id: room.room_id,
            anchor_id: room.anchor_id,
            started_at_ms: room.started_at.as_ref().map_or(0, ms_from_timestamp),
            ended: room.status() == RoomStatus::Ended,
        }
    }
}

/// Why a room could not be looked up.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("room {0} does not exist")]
    NotFound(u64),
    #[error("ongoing-query did not answer: {0}")]
    Unavailable(String),
}

/// The one mapping of a failed lookup to the caller's status: an unknown
/// room is `NOT_FOUND` (the caller named a room that was never started); an
/// unreachable ongoing-query is `UNAVAILABLE` (logged here, with its cause;
/// the caller is told to retry).
impl From<LookupError> for tonic::Status {
    fn from(err: LookupError) -> Self {
        match &err {
            LookupError::NotFound(_) => tonic::Status::not_found(err.to_string()),
            LookupError::Unavailable(cause) => {
                tracing::warn!(%cause, "room lookup failed");
                tonic::Status::unavailable(
                    "rooms cannot be looked up right now (ongoing-query did not answer); \
                     retry shortly, with the same idempotency_key where the call has one",
                )
            }
        }
    }
}

type Lookup = Shared<BoxFuture<'static, Result<RoomInfo, LookupError>>>;

/// Room lookups with a short-lived cache. One GetRoom per room is in
/// flight at a time: callers asking meanwhile share its answer, and a room
/// known to be ongoing is answered from the cache while it is refreshed (a
/// thousand Subscribes to one room opening at once make one call, not a
/// thousand).
pub struct RoomDirectory {
    /// `None`: a fixed set of rooms (see [`Self::fixed`]).
    client: Option<OngoingQueryServiceClient<MeshChannel>>,
    cache: Mutex<HashMap<u64, (RoomInfo, Instant)>>,
    asking: Mutex<HashMap<u64, Lookup>>,
}

impl std::fmt::Debug for RoomDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RoomDirectory")
            .field("fixed", &self.client.is_none())
            .field("cached", &lock(&self.cache).len())
            .field("asking", &lock(&self.asking).len())
            .finish()
    }
}

impl RoomDirectory {
    pub fn new(channel: MeshChannel) -> Self {
        Self {
            client: Some(OngoingQueryServiceClient::new(channel)),
            cache: Mutex::new(HashMap::new()),
            asking: Mutex::new(HashMap::new()),
        }
    }

    /// A directory that knows exactly `rooms` and asks no one (for a
    /// component tested or benchmarked without ongoing-query).
    pub fn fixed(rooms: impl IntoIterator<Item = RoomInfo>) -> Self {
        let now = Instant::now();
        Self {
            client: None,
            cache: Mutex::new(rooms.into_iter().map(|r| (r.room_id, (r, now))).collect()),
            asking: Mutex::new(HashMap::new()),
        }
    }

    /// The room, from the cache or from ongoing-query.
    pub async fn get(&self, room_id: u64) -> Result<RoomInfo, LookupError> {
        let cached = lock(&self.cache).get(&room_id).copied();
        let Some(client) = &self.client else {
            return cached
                .map(|(info, _)| info)
                .ok_or(LookupError::NotFound(room_id));
        };
        if let Some((info, at)) = cached
            && (info.ended || at.elapsed() < ONGOING_TTL)
        {
            return Ok(info);
        }
        let lookup = {
            let mut asking = lock(&self.asking);
            if let Some(lookup) = asking.get(&room_id) {
                if let Some((info, _)) = cached {
                    // Being refreshed: the record a moment old stands in
                    // (the Watch stream tells of an end sooner anyway).
                    return Ok(info);
                }
                lookup.clone()
            } else {
                let lookup = ask(client.clone(), room_id).boxed().shared();
                asking.insert(room_id, lookup.clone());
                lookup
            }
        };
        let answer = lookup.clone().await;
        {
            let mut asking = lock(&self.asking);
            if asking.get(&room_id).is_some_and(|l| l.ptr_eq(&lookup)) {
                asking.remove(&room_id);
            }
        }
        let info = answer?;
        self.remember(info);
        Ok(lock(&self.cache).get(&room_id).map_or(info, |(i, _)| *i))
    }

    /// Records what the Watch stream said.
    pub fn remember(&self, info: RoomInfo) {
        let mut cache = lock(&self.cache);
        if cache.len() >= ENDED_KEPT {
            // Forget the ended rooms first: they are the ones never asked again.
            cache.retain(|_, (i, _)| !i.ended);
        }
        // A room never starts again: an answer asked for before the end
        // and arriving after it does not bring the room back.
        if cache.get(&info.room_id).is_some_and(|(i, _)| i.ended) && !info.ended {
            return;
        }
        cache.insert(info.room_id, (info, Instant::now()));
    }
}

/// One GetRoom call.
async fn ask(
    mut client: OngoingQueryServiceClient<MeshChannel>,
    room_id: u64,
) -> Result<RoomInfo, LookupError> {
    let reply = client
        .get_room(GetRoomRequest { room_id })
        .await
        .map_err(|status| match status.code() {
            tonic::Code::NotFound => LookupError::NotFound(room_id),
            _ => LookupError::Unavailable(status.message().to_owned()),
        })?;
    reply
        .into_inner()
        .room
        .as_ref()
        .map(RoomInfo::from_proto)
        .ok_or_else(|| LookupError::Unavailable("GetRoom returned no room".into()))
}

/// Follows ongoing-query's Watch stream for as long as the future runs,
/// handing each change to `on_change` and reconnecting (with back-off) from
/// the last position seen, so no change is missed or seen twice across a
/// reconnect unless the server answers with a snapshot.
pub async fn follow_changes(
    client: OngoingQueryServiceClient<MeshChannel>,
    mut on_change: impl FnMut(&livemesh_proto::v1::RoomChange),
) {
    let mut from = None;
    let mut backoff = Backoff::new(
        "watching room changes",
        Duration::from_millis(100),
        Duration::from_secs(10),
    );
    loop {
        let request = livemesh_proto::v1::WatchRequest { from: from.clone() };
        let mut stream = match client.clone().watch(request).await {
            Ok(stream) => stream.into_inner(),
            Err(status) => {
                tracing::debug!(%status, "watching room changes failed; retrying");
                backoff.wait().await;
                continue;
            }
        };
        backoff.reset();
        while let Ok(Some(message)) = stream.message().await {
            if let Some(change) = message.change {
                // The follower's work on the change (spawned tasks too, when
                // they take the current span) continues the trace of the
                // call that made it.
                if change.traceparent.is_empty() {
                    on_change(&change);
                } else {
                    let span = tracing::info_span!(
                        "room_change",
                        room_id = change.room.as_ref().map_or(0, |r| r.room_id),
                        kind = ?change.kind(),
                    );
                    livemesh_mesh::rpc_telemetry::Traceparent::adopt(&change.traceparent, &span);
                    span.in_scope(|| on_change(&change));
                }
                from = change.position;
            }
        }
        tracing::debug!("room watch ended; reconnecting");
    }
}
