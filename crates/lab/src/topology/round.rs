//! One round of traffic in every room, and the checks of what viewers saw.

use anyhow::{Context as _, bail, ensure};
use livemesh_mesh::MeshChannel;
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::gifts_service_client::GiftsServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::{
    Comment, PublishRequest, RoomEvent, SendGiftRequest, SendLovesRequest, room_event,
};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::watch;

use super::audience::{ViewerLog, gift_text};
use super::{Mesh, Retries, RoomPlan, SETTLE, Workload, retrying};

/// One round of every room, side by side; adds what answered OK to the plans.
pub(super) async fn run_round(
    mesh: &Mesh,
    peers: &Peers<'_>,
    plans: &mut [RoomPlan],
    round: u64,
    rooms_started: Instant,
    w: Workload,
    started: &watch::Sender<u64>,
) -> anyhow::Result<()> {
    // A human's pace: round n taps at video seconds n..n+1, so it starts
    // no earlier than n + 1 s after the rooms started.
    let not_before = rooms_started + Duration::from_secs(round + 1);
    tokio::time::sleep_until(not_before.into()).await;
    // Rounds count from 1 for the chaos, which strikes in them.
    started.send_replace(round + 1);
    let outcomes = futures::future::try_join_all(
        plans
            .iter()
            .enumerate()
            .map(|(r, plan)| room_round(mesh, peers, r as u64, plan.room_id, round, w)),
    )
    .await?;
    for (plan, outcome) in plans.iter_mut().zip(outcomes) {
        plan.comments.extend(outcome.comments);
        plan.gift_events.extend(outcome.gift_events);
        plan.loves += outcome.loves;
        plan.love_batches += outcome.love_batches;
        plan.gifts += outcome.gifts;
        for (sender, amount) in outcome.sent {
            *plan.sent.entry(sender).or_default() += amount;
        }
    }
    println!(
        "round {}: in every room {} comments over {} dispatchers, {} love batches over {} counters, {} gifts over {} gift-settlers",
        round + 1,
        w.comments_per_round,
        peers.dispatchers.len(),
        w.lovers_per_room,
        peers.counters.len(),
        w.senders_per_room,
        peers.gifts.len()
    );
    Ok(())
}

pub(super) fn viewer_id(room: u64, k: u64) -> u64 {
    100_000 + room * 1_000 + k
}

pub(super) fn sender_id(room: u64, k: u64) -> u64 {
    200_000 + room * 1_000 + k
}

/// The services the traffic goes through, as the BFF.
pub(super) struct Peers<'a> {
    pub(super) dispatchers: &'a [PublishServiceClient<MeshChannel>],
    pub(super) counters: &'a [CounterServiceClient<MeshChannel>],
    pub(super) gifts: &'a [GiftsServiceClient<MeshChannel>],
    pub(super) retries: &'a Retries,
}

/// What one room's round put in (what answered OK).
struct RoundOutcome {
    comments: BTreeMap<u64, String>,
    gift_events: BTreeSet<String>,
    loves: u64,
    love_batches: u64,
    gifts: i64,
    sent: BTreeMap<u64, i64>,
}

/// One round of one room: comments in sequence alternating between the
/// dispatchers (so their offsets define the order viewers must see), love
/// batches alternating between the counters, gifts alternating between the
/// gift-settlers; each call retried with the same request on the next
/// replica while it answers "retry later".
async fn room_round(
    mesh: &Mesh,
    peers: &Peers<'_>,
    r: u64,
    room_id: u64,
    round: u64,
    w: Workload,
) -> anyhow::Result<RoundOutcome> {
    let mut outcome = RoundOutcome {
        comments: BTreeMap::new(),
        gift_events: BTreeSet::new(),
        loves: 0,
        love_batches: 0,
        gifts: 0,
        sent: BTreeMap::new(),
    };
    let retries = &peers.retries.calls;
    for i in 0..w.comments_per_round {
        let n = round * w.comments_per_round + i;
        let viewer = viewer_id(r, n % w.viewers_per_room);
        let text = format!("room {room_id} comment {n}");
        let request = PublishRequest {
            room_id,
            event: Some(RoomEvent {
                kind: Some(room_event::Kind::Comment(Comment {
                    viewer_id: viewer,
                    text: text.clone(),
                })),
                ..RoomEvent::default()
            }),
            idempotency_key: Some(format!("topology-comment-{room_id}-{n}")),
            forwarded_from: None,
        };
        let position = retrying(
            &format!("Publish of {text:?}"),
            peers.dispatchers,
            n as usize,
            retries,
            |mut dispatcher| {
                let request = mesh.viewer_call(viewer, request.clone());
                async move { dispatcher.publish(request?).await }
            },
        )
        .await?
        .position
        .context("Publish of a comment answered no position")?;
        ensure!(
            outcome.comments.insert(position.offset, text).is_none(),
            "two comments of room {room_id} got offset {}",
            position.offset
        );
    }
    for l in 0..w.lovers_per_room {
        let viewer = viewer_id(r, l);
        // Ten taps 100 ms apart of video time: a human's pace.
        let taps_ms = (0..10).map(|t| round * 1_000 + t * 100).collect();
        let request = SendLovesRequest {
            room_id,
            viewer_id: viewer,
            batch_id: format!("topology-{round}-{l}"),
            taps_ms,
        };
        let mut attempts = 0u32;
        let reply = retrying(
            &format!("SendLoves of viewer {viewer} in room {room_id}"),
            peers.counters,
            (l + round) as usize,
            retries,
            |mut counter| {
                attempts += 1;
                let request = mesh.viewer_call(viewer, request.clone());
                async move { counter.send_loves(request?).await }
            },
        )
        .await?;
        if reply.reason == livemesh_proto::v1::RejectReason::DuplicateBatch as i32 {
            // A retry whose earlier attempt was counted, its answer lost (the
            // replica died, or the call timed out while the flush waited for
            // the store): the batch is in the total, once.
            ensure!(
                attempts > 1,
                "SendLoves of viewer {viewer} in room {room_id} answered DUPLICATE_BATCH on its first attempt"
            );
            outcome.loves += reply.rejected;
        } else {
            outcome.loves += reply.accepted;
        }
        outcome.love_batches += 1;
    }
    for s in 0..w.senders_per_room {
        let sender = sender_id(r, s);
        let amount = 10 + i64::try_from(s + round)?;
        let request = SendGiftRequest {
            idempotency_key: format!("topology-gift-{room_id}-{round}-{s}"),
            viewer_id: sender,
            room_id,
            gift_id: 1 + s,
            amount,
        };
        let reply = retrying(
            &format!("SendGift of user {sender} in room {room_id}"),
            peers.gifts,
            (s + round) as usize,
            retries,
            |mut settler| {
                let request = mesh.viewer_call(sender, request.clone());
                async move { settler.send_gift(request?).await }
            },
        )
        .await?;
        outcome.gift_events.insert(gift_text(&reply.transfer_id));
        outcome.gifts += amount;
        *outcome.sent.entry(sender).or_default() += amount;
    }
    Ok(outcome)
}

/// A viewer saw its room's comments at the offsets their Publish answered,
/// every gift, nothing twice, in offset order.
pub(super) fn check_ordered(plan: &RoomPlan, viewer: &ViewerLog) -> anyhow::Result<()> {
    let who = format!(
        "viewer {} of room {} (subscribe node {})",
        viewer.viewer_id, viewer.room_id, viewer.node
    );
    ensure!(
        viewer.ordered.windows(2).all(|p| p[0].0 < p[1].0),
        "{who}: offsets out of order or repeated: {:?}",
        viewer.ordered.iter().map(|(o, _)| o).collect::<Vec<_>>()
    );
    let mut comments = BTreeMap::new();
    let mut gifts = BTreeSet::new();
    for (offset, text) in &viewer.ordered {
        if text.starts_with("gift ") {
            ensure!(gifts.insert(text.clone()), "{who}: {text} twice");
        } else {
            comments.insert(*offset, text.clone());
        }
    }
    ensure!(
        comments == plan.comments,
        "{who}: saw comments {comments:?}, published {:?}",
        plan.comments
    );
    ensure!(
        gifts == plan.gift_events,
        "{who}: saw gifts {gifts:?}, committed {:?}",
        plan.gift_events
    );
    Ok(())
}

/// Asks `probe` until it answers `Some` or [`SETTLE`] passes.
pub(super) async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + SETTLE;
    let mut last_error = None;
    loop {
        match probe().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(err) => last_error = Some(err),
        }
        if Instant::now() >= deadline {
            match last_error {
                Some(err) => bail!("{what}: not within {SETTLE:?}; last error: {err:#}"),
                None => bail!("{what}: not within {SETTLE:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
