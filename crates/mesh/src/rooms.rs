//! What a service knows of rooms: asked of ongoing-query (through the
//! mesh's client stack) and kept for a moment, and told of ends by the
//! Watch stream at once.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::MeshChannel;
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
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error("room {0} does not exist")]
    NotFound(u64),
    #[error("ongoing-query did not answer: {0}")]
    Unavailable(String),
}

/// Room lookups with a short-lived cache.
#[derive(Debug)]
pub struct RoomDirectory {
    /// `None`: a fixed set of rooms (see [`Self::fixed`]).
    client: Option<OngoingQueryServiceClient<MeshChannel>>,
    cache: Mutex<HashMap<u64, (RoomInfo, Instant)>>,
}

impl RoomDirectory {
    pub fn new(channel: MeshChannel) -> Self {
        Self {
            client: Some(OngoingQueryServiceClient::new(channel)),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// A directory that knows exactly `rooms` and asks no one (for a
    /// component tested or benchmarked without ongoing-query).
    pub fn fixed(rooms: impl IntoIterator<Item = RoomInfo>) -> Self {
        let now = Instant::now();
        Self {
            client: None,
            cache: Mutex::new(rooms.into_iter().map(|r| (r.room_id, (r, now))).collect()),
        }
    }

    /// The room, from the cache or from ongoing-query.
    pub async fn get(&self, room_id: u64) -> Result<RoomInfo, LookupError> {
        let cached = self.lock().get(&room_id).copied();
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
        let reply = client
            .clone()
            .get_room(GetRoomRequest { room_id })
            .await
            .map_err(|status| match status.code() {
                tonic::Code::NotFound => LookupError::NotFound(room_id),
                _ => LookupError::Unavailable(status.message().to_owned()),
            })?;
        let info = reply
            .into_inner()
            .room
            .as_ref()
            .map(RoomInfo::from_proto)
            .ok_or_else(|| LookupError::Unavailable("GetRoom returned no room".into()))?;
        self.remember(info);
        Ok(info)
    }

    /// Records what the Watch stream said.
    pub fn remember(&self, info: RoomInfo) {
        let mut cache = self.lock();
        if cache.len() >= ENDED_KEPT {
            // Forget the ended rooms first: they are the ones never asked again.
            cache.retain(|_, (i, _)| !i.ended);
        }
        cache.insert(info.room_id, (info, Instant::now()));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (RoomInfo, Instant)>> {
        // Inserts leave the map consistent; a poisoned lock holds valid data.
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
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
    let mut backoff = Duration::from_millis(100);
    loop {
        let request = livemesh_proto::v1::WatchRequest { from: from.clone() };
        let mut stream = match client.clone().watch(request).await {
            Ok(stream) => stream.into_inner(),
            Err(status) => {
                tracing::debug!(%status, "watching room changes failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
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
                    crate::rpc_telemetry::Traceparent::adopt(&change.traceparent, &span);
                    span.in_scope(|| on_change(&change));
                }
                from = change.position;
            }
        }
        tracing::debug!("room watch ended; reconnecting");
    }
}
