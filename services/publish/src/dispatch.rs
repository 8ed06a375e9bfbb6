//! The dispatcher's work: position, store, fan out to the nodes holding
//! viewers, forward to the other datacenters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::join_all;
use livemesh_fanout::{Append, Appended, FanoutStore, ROOM_ENDED_KEY, Slot};
use livemesh_mesh::backoff::Backoff;
use livemesh_mesh::breaker::{Breaker, BreakerState};
use livemesh_mesh::{ClientStack, MeshChannel};
use livemesh_proto::time::timestamp_from_ms;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{
    DeliverRequest, PublishRequest, PublishResponse, RoomEnded, RoomEvent, StreamPosition,
    room_event,
};
use livemesh_rooms::{LookupError, RoomDirectory};
use prost::Message as _;
use tracing::Instrument as _;

use crate::error::PublishError;
use crate::metrics::PublishMetrics;

/// How a dispatcher runs.
#[derive(Debug, Clone)]
pub struct DispatcherSettings {
    pub datacenter: String,
    pub peers: Vec<String>,
    pub deliver_timeout: Duration,
    pub max_comment_chars: usize,
}

/// Counters of what the dispatcher did.
#[derive(Debug, Default)]
pub struct DispatchStats {
    pub published: AtomicU64,
    pub duplicates: AtomicU64,
    /// Deliver calls answered.
    pub deliveries: AtomicU64,
    /// Deliver calls that failed or timed out (the node fetches the event
    /// from the history when it notices the gap).
    pub deliver_failures: AtomicU64,
    pub forwarded: AtomicU64,
    pub forward_failures: AtomicU64,
}

/// The dispatcher's shared state.
pub struct DispatcherInner {
    pub settings: DispatcherSettings,
    pub store: FanoutStore,
    pub stats: DispatchStats,
    metrics: PublishMetrics,
    stack: ClientStack,
    /// Which rooms exist and have not ended: nothing is stored for a room
    /// the rooms service does not know.
    rooms: RoomDirectory,
    nodes: Mutex<HashMap<String, (SubscribeServiceClient<MeshChannel>, Breaker)>>,
    peers: Vec<(String, PublishServiceClient<MeshChannel>)>,
    /// Makes forwarded publishes' idempotency keys unique to this process.
    instance: u64,
    forward_seq: AtomicU64,
}

impl std::fmt::Debug for DispatcherInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DispatcherInner")
            .field("datacenter", &self.settings.datacenter)
            .finish_non_exhaustive()
    }
}

/// Where an event of this kind is kept.
fn slot_of(kind: &room_event::Kind) -> Slot {
    match kind {
        room_event::Kind::LoveTotal(_) => Slot::Latest("love_total"),
        room_event::Kind::ViewerCount(_) => Slot::Latest("viewer_count"),
        _ => Slot::Ordered,
    }
}

const MAX_KEY_BYTES: usize = 200;

impl DispatcherInner {
    pub fn new(
        settings: DispatcherSettings,
        store: FanoutStore,
        stack: ClientStack,
        rooms: RoomDirectory,
    ) -> anyhow::Result<Self> {
        let peers = settings
            .peers
            .iter()
            .map(|url| Ok((url.clone(), PublishServiceClient::new(stack.channel(url)?))))
            .collect::<anyhow::Result<_>>()?;
        let instance = u64::from(std::process::id()) << 32
            ^ u64::try_from(livemesh_mesh::now_ms()).unwrap_or(0);
        Ok(Self {
            settings,
            store,
            stats: DispatchStats::default(),
            metrics: PublishMetrics::new(),
            stack,
            rooms,
            nodes: Mutex::new(HashMap::new()),
            peers,
            instance,
            forward_seq: AtomicU64::new(0),
        })
    }

    fn validate(&self, request: &PublishRequest) -> Result<room_event::Kind, PublishError> {
        let invalid = |m: String| Err(PublishError::Invalid(m));
        if request.room_id == 0 {
            return invalid("room_id is required".into());
        }
        let Some(event) = &request.event else {
            return invalid("event is required".into());
        };
        if event.room_id != 0 && event.room_id != request.room_id {
            return invalid(format!(
                "event.room_id {} differs from room_id {}; leave it unset",
                event.room_id, request.room_id
            ));
        }
        if request
            .idempotency_key
            .as_ref()
            .is_some_and(|k| k.is_empty() || k.len() > MAX_KEY_BYTES)
        {
            return invalid(format!(
                "idempotency_key must be 1 to {MAX_KEY_BYTES} bytes, or unset"
            ));
        }
        let Some(kind) = &event.kind else {
            return invalid(
                "event.kind is required: love_total, comment, gift, viewer_count or room_ended"
                    .into(),
            );
        };
        match kind {
            room_event::Kind::Comment(comment) => {
                crate::comment::check(&comment.text, self.settings.max_comment_chars)?;
            }
            room_event::Kind::Gift(gift) if gift.amount <= 0 => {
                return invalid(format!("gift.amount must be positive, not {}", gift.amount));
            }
            _ => {}
        }
        Ok(kind.clone())
    }

    /// Publishes one event (see `PublishService.Publish` in the proto for
    /// what OK guarantees) to a room the rooms service knows and that has
    /// not ended.
    pub async fn publish(
        self: &Arc<Self>,
        request: PublishRequest,
    ) -> Result<PublishResponse, PublishError> {
        let accepted = Instant::now();
        let kind = self.validate(&request)?;
        self.check_room(request.room_id, &kind).await?;
        self.append(request, kind, accepted).await
    }

    /// Refuses rooms the rooms service does not know, and rooms it says
    /// have ended (a room-ended event only needs the room to exist). A
    /// dispatcher that learns of an end this way, before its Watch told it,
    /// stores the room-ended event itself.
    async fn check_room(
        self: &Arc<Self>,
        room_id: u64,
        kind: &room_event::Kind,
    ) -> Result<(), PublishError> {
        let info = match self.rooms.get(room_id).await {
            Ok(info) => info,
            Err(LookupError::NotFound(_)) => return Err(PublishError::UnknownRoom(room_id)),
            Err(LookupError::Unavailable(why)) => return Err(PublishError::Rooms(why)),
        };
        if info.ended && !matches!(kind, room_event::Kind::RoomEnded(_)) {
            let this = self.clone();
            tokio::spawn(
                async move {
                    if let Err(err) = this.end_room(room_id, None).await
                        && !matches!(err, PublishError::Ended { .. })
                    {
                        tracing::warn!(room_id, %err, "storing a late room-ended event failed");
                    }
                }
                .in_current_span(),
            );
            return Err(PublishError::RoomOver(room_id));
        }
        Ok(())
    }

    /// Positions, stores and fans out a validated event of a checked room.
    async fn append(
        self: &Arc<Self>,
        request: PublishRequest,
        mut kind: room_event::Kind,
        accepted: Instant,
    ) -> Result<PublishResponse, PublishError> {
        let now = livemesh_mesh::now_ms();
        if let room_event::Kind::RoomEnded(RoomEnded {
            ended_at: ended_at @ None,
        }) = &mut kind
        {
            *ended_at = Some(timestamp_from_ms(now));
        }
        let room_id = request.room_id;
        let server_time = request
            .event
            .as_ref()
            .and_then(|e| e.server_time)
            .filter(|_| request.forwarded_from.is_some())
            .unwrap_or_else(|| timestamp_from_ms(now));
        let stored = RoomEvent {
            server_time: Some(server_time),
            kind: Some(kind.clone()),
            ..RoomEvent::default()
        };
        let payload = stored.encode_to_vec();
        // Keys are scoped by the event's kind: a comment and a gift sent
        // with the same key are two publishes (unscoped, the gift answered
        // as a duplicate of the comment and its event was never stored).
        let scoped_key = request
            .idempotency_key
            .as_deref()
            .map(|key| scoped_key(&kind, key));
        let appended = self
            .store
            .append(&Append {
                room_id,
                payload: &payload,
                slot: slot_of(&kind),
                idempotency_key: scoped_key.as_deref(),
                ends_room: matches!(kind, room_event::Kind::RoomEnded(_)),
                now_ms: now,
            })
            .await?;
        let (epoch, offset, nodes) = match appended {
            Appended::New {
                epoch,
                offset,
                nodes,
            } => (epoch, offset, nodes),
            Appended::Duplicate { epoch, offset } => {
                self.stats.duplicates.fetch_add(1, Ordering::Relaxed);
                return Ok(response(epoch, offset, 0));
            }
            Appended::Ended { offset, .. } => {
                return Err(PublishError::Ended { room_id, offset });
            }
        };
        self.stats.published.fetch_add(1, Ordering::Relaxed);
        self.metrics.stored(&kind);
        let event = RoomEvent {
            room_id,
            epoch,
            offset,
            ..stored
        };
        if !nodes.is_empty() {
            self.metrics.delivering(accepted);
        }
        let handed = self.deliver(&event, &nodes).await;
        // Ordered events (comments, gifts, room ended) go to every
        // datacenter's viewers. Latest values (love totals, viewer counts)
        // are each datacenter's own aggregates: a peer's value would
        // overwrite the local one, so they stay local.
        if request.forwarded_from.is_none()
            && !self.peers.is_empty()
            && slot_of(&kind) == Slot::Ordered
        {
            self.forward(&event, request.idempotency_key);
        }
        Ok(response(epoch, offset, handed))
    }

    /// Calls `Deliver` on each node once, concurrently; returns how many answered.
    ///
    /// Each node has its own circuit breaker (one cached channel per node).
    /// A node whose breaker is closed is awaited, bounded by the Deliver
    /// timeout, which the client stack enforces inside the breaker so that
    /// a timeout counts against the node. A node whose breaker is not
    /// closed is not awaited: open, its call would be rejected at once
    /// anyway; half-open, the call may be the probe, which against a
    /// black-holed node waits the full Deliver timeout, and no publish
    /// should pay that for a node already known to be failing. Such a
    /// call still goes out, in the background, so the probe can close the
    /// breaker; the node is not counted as handed the event, and fetches it
    /// from the history if it missed it.
    async fn deliver(&self, event: &RoomEvent, nodes: &[String]) -> u64 {
        let calls = nodes.iter().map(|node| {
            let target = self.node_client(node);
            let mut request = tonic::Request::new(DeliverRequest {
                room_id: event.room_id,
                events: vec![event.clone()],
            });
            request.set_timeout(self.settings.deliver_timeout);
            async move {
                let Some((mut client, breaker)) = target else {
                    return false;
                };
                if breaker.state() != BreakerState::Closed {
                    let node = node.clone();
                    tokio::spawn(async move {
                        if let Err(status) = client.deliver(request).await {
                            tracing::debug!(node, %status, "Deliver to a failing node failed");
                        }
                    });
                    return false;
                }
                // Retries (of calls that never reached the node) may add to
                // the Deliver timeout; this bounds the whole call.
                let bound = self.settings.deliver_timeout * 2;
                match tokio::time::timeout(bound, client.deliver(request)).await {
                    Ok(Ok(_)) => true,
                    Ok(Err(status)) => {
                        tracing::debug!(node, %status, "Deliver failed");
                        false
                    }
                    Err(_) => {
                        tracing::debug!(node, "Deliver timed out");
                        false
                    }
                }
            }
        });
        let answered = join_all(calls).await;
        let ok = answered.iter().filter(|ok| **ok).count() as u64;
        let failed = answered.len() as u64 - ok;
        self.stats.deliveries.fetch_add(ok, Ordering::Relaxed);
        if failed > 0 {
            self.stats
                .deliver_failures
                .fetch_add(failed, Ordering::Relaxed);
        }
        ok
    }

    /// The cached client of `node`, with its breaker.
    fn node_client(&self, node: &str) -> Option<(SubscribeServiceClient<MeshChannel>, Breaker)> {
        let mut nodes = self
            .nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(client) = nodes.get(node) {
            return Some(client.clone());
        }
        match self.stack.channel_with_breaker(node) {
            Ok((channel, breaker)) => {
                let client = (SubscribeServiceClient::new(channel), breaker);
                nodes.insert(node.to_owned(), client.clone());
                Some(client)
            }
            Err(err) => {
                tracing::warn!(node, %err, "a registered node's address is not usable");
                None
            }
        }
    }

    /// The state of `node`'s circuit breaker, if the dispatcher has called it.
    #[cfg(feature = "testing")]
    pub fn node_breaker(&self, node: &str) -> Option<BreakerState> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(node)
            .map(|(_, breaker)| breaker.state())
    }

    /// Forwards a local publish to every peer datacenter, in the
    /// background, retrying with the same idempotency key so that each peer
    /// takes it once.
    fn forward(self: &Arc<Self>, event: &RoomEvent, idempotency_key: Option<String>) {
        let key = idempotency_key.unwrap_or_else(|| {
            let seq = self.forward_seq.fetch_add(1, Ordering::Relaxed);
            format!("fwd|{}|{:x}|{seq}", self.settings.datacenter, self.instance)
        });
        for (url, client) in &self.peers {
            let request = PublishRequest {
                room_id: event.room_id,
                event: Some(RoomEvent {
                    server_time: event.server_time,
                    kind: event.kind.clone(),
                    ..RoomEvent::default()
                }),
                idempotency_key: Some(key.clone()),
                forwarded_from: Some(self.settings.datacenter.clone()),
            };
            let mut client = client.clone();
            let url = url.clone();
            let this = self.clone();
            tokio::spawn(
                async move {
                    let forwarded = this.forward_one(&mut client, &url, request).await;
                    let counter = if forwarded {
                        &this.stats.forwarded
                    } else {
                        &this.stats.forward_failures
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                .in_current_span(),
            );
        }
    }

    async fn forward_one(
        &self,
        client: &mut PublishServiceClient<MeshChannel>,
        url: &str,
        request: PublishRequest,
    ) -> bool {
        // Six attempts, 50 ms doubling between them; the back-off logs
        // when it gives up.
        let mut backoff = Backoff::new(
            format!("forwarding a publish to the peer datacenter {url}"),
            Duration::from_millis(50),
            Duration::from_millis(50 << 4),
        )
        .with_retries(5);
        for attempt in 1.. {
            match client.publish(request.clone()).await {
                Ok(_) => return true,
                // The peer refused the event itself: retrying cannot help.
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
                    ) =>
                {
                    tracing::debug!(%url, %status, "peer refused a forwarded publish");
                    return false;
                }
                Err(status) => {
                    tracing::debug!(%url, %status, attempt, "forwarding failed; retrying");
                    if !backoff.wait().await {
                        return false;
                    }
                }
            }
        }
        false
    }

    /// Publishes the room-ended event (once, whoever asks) of a room the
    /// rooms service reported ended.
    pub async fn end_room(
        self: &Arc<Self>,
        room_id: u64,
        ended_at: Option<prost_types::Timestamp>,
    ) -> Result<PublishResponse, PublishError> {
        let kind = room_event::Kind::RoomEnded(RoomEnded { ended_at });
        let request = PublishRequest {
            room_id,
            event: Some(RoomEvent {
                kind: Some(kind.clone()),
                ..RoomEvent::default()
            }),
            idempotency_key: Some(ROOM_ENDED_KEY.to_owned()),
            forwarded_from: None,
        };
        self.append(request, kind, Instant::now()).await
    }
}

/// The store's idempotency key of a publish: `<kind>|<key>`.
fn scoped_key(kind: &room_event::Kind, key: &str) -> String {
    let kind = match kind {
        room_event::Kind::LoveTotal(_) => "love_total",
        room_event::Kind::Comment(_) => "comment",
        room_event::Kind::Gift(_) => "gift",
        room_event::Kind::ViewerCount(_) => "viewer_count",
        room_event::Kind::RoomEnded(_) => "room_ended",
    };
    format!("{kind}|{key}")
}

fn response(epoch: u64, offset: u64, nodes: u64) -> PublishResponse {
    PublishResponse {
        position: Some(StreamPosition { epoch, offset }),
        nodes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use livemesh_proto::v1::{Comment, GiftSent};

    /// Found by the property tests: one key on a comment and on a gift
    /// named one store entry, so the gift was answered as the comment's
    /// duplicate and never stored.
    #[test]
    fn idempotency_keys_are_scoped_by_kind() {
        let comment = room_event::Kind::Comment(Comment::default());
        let gift = room_event::Kind::Gift(GiftSent::default());
        assert_eq!(scoped_key(&comment, "k"), "comment|k");
        assert_eq!(scoped_key(&gift, "k"), "gift|k");
        assert_ne!(scoped_key(&comment, "gift|k"), scoped_key(&gift, "k"));
    }
}
