//! What the broadcast's viewers do while they watch: tap loves in bursts,
//! comment, and send paid gifts, each through the real gRPC clients,
//! spread over the audience's connections. Every task counts what the
//! mesh accepted, so the end of the room can be checked against it.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use livemesh_mesh::MeshChannel;
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::gifts_service_client::GiftsServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::{
    Comment, DepositRequest, PublishRequest, RoomEvent, SendGiftRequest, SendLovesRequest,
    room_event,
};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::crowd::now_ns;

/// What the viewers got accepted, and what failed.
#[derive(Debug, Default)]
pub(super) struct Accepted {
    pub(super) loves: AtomicU64,
    pub(super) comments: AtomicU64,
    pub(super) gifts: AtomicU64,
    /// The sum of the gifts' amounts: the room's gross at settlement.
    pub(super) gross: AtomicI64,
    pub(super) errors: AtomicU64,
    /// The first error, for the failure report.
    pub(super) first_error: std::sync::Mutex<Option<String>>,
}

impl Accepted {
    fn failed(&self, what: &str, status: &tonic::Status) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert_with(|| format!("{what}: {:?} {}", status.code(), status.message()));
    }
}

/// The traffic's shape.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) room_id: u64,
    /// When the room started, in epoch milliseconds (taps are video time).
    pub(super) started_at_ms: i64,
    pub(super) viewers: u64,
    pub(super) first_viewer: u64,
    pub(super) comments_per_s: u32,
    pub(super) gifts_per_s: u32,
}

const PHRASES: &[&str] = &[
    "hello from the crowd",
    "this song!",
    "greetings from Osaka",
    "encore!",
    "first time here",
    "the view is amazing",
    "love it",
    "play it again",
];

/// Gifters top up first; a gift's amount is one of these.
const GIFTERS: u64 = 24;
const AMOUNTS: &[i64] = &[10, 25, 50, 100, 300];

/// Runs the viewers' traffic until `stop` turns true.
pub(super) async fn run(
    channels: Vec<MeshChannel>,
    plan: Plan,
    accepted: Arc<Accepted>,
    stop: watch::Receiver<bool>,
) {
    tokio::join!(
        loves(&channels, &plan, &accepted, stop.clone()),
        comments(&channels, &plan, &accepted, stop.clone()),
        gifts(&channels, &plan, &accepted, stop),
    );
}

/// A small deterministic generator (xorshift): the demo needs variety,
/// not randomness.
struct Dice(u64);

impl Dice {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Every `period` until `stop` turns true: the calls `next(tick)` makes
/// for that tick (from 1), spawned so that a slow reply never holds the
/// next tick back. The calls still in flight at the stop are awaited, so
/// what was sent is counted before the room ends.
async fn paced<F, Fut>(period: Duration, mut stop: watch::Receiver<bool>, mut next: F)
where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut ticker = tokio::time::interval(period);
    let mut inflight = JoinSet::new();
    let mut tick = 0_u64;
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => break,
        }
        while inflight.try_join_next().is_some() {}
        tick += 1;
        inflight.spawn(next(tick));
    }
    while inflight.join_next().await.is_some() {}
}

/// Every 100 ms a group of viewers sends the taps their apps buffered:
/// a calm stream, and every few seconds a burst five times as large (the
/// streamer did something).
async fn loves(
    channels: &[MeshChannel],
    plan: &Plan,
    accepted: &Arc<Accepted>,
    stop: watch::Receiver<bool>,
) {
    let clients: Vec<_> = channels
        .iter()
        .map(|c| CounterServiceClient::new(c.clone()))
        .collect();
    let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
    let calm = (plan.viewers / 150).clamp(1, 40);
    let started = Instant::now();
    let mut batch = 0_u64;
    paced(Duration::from_millis(100), stop, |_| {
        let second = started.elapsed().as_secs();
        let senders = if second % 6 >= 4 { calm * 5 } else { calm };
        let video_now = u64::try_from(livemesh_mesh::now_ms() - plan.started_at_ms).unwrap_or(0);
        let calls: Vec<_> = (0..senders)
            .map(|_| {
                batch += 1;
                let viewer_id = plan.first_viewer + dice.below(plan.viewers);
                let taps = 3 + dice.below(12);
                // Taps a human could make: 60 ms apart, ending now.
                let taps_ms = (0..taps)
                    .filter_map(|i| video_now.checked_sub(i * 60))
                    .collect();
                let mut client = clients[batch as usize % clients.len()].clone();
                let request = SendLovesRequest {
                    room_id: plan.room_id,
                    viewer_id,
                    batch_id: format!("live-{viewer_id}-{batch}"),
                    taps_ms,
                };
                let accepted = accepted.clone();
                async move {
                    match client.send_loves(request).await {
                        Ok(reply) => {
                            accepted
                                .loves
                                .fetch_add(reply.into_inner().accepted, Ordering::Relaxed);
                        }
                        Err(status) => accepted.failed("SendLoves", &status),
                    }
                }
            })
            .collect();
        async move {
            futures::future::join_all(calls).await;
        }
    })
    .await;
}

/// Comments at a steady rate from random viewers; the text starts with
/// its send time, so the viewers can time it.
async fn comments(
    channels: &[MeshChannel],
    plan: &Plan,
    accepted: &Arc<Accepted>,
    stop: watch::Receiver<bool>,
) {
    if plan.comments_per_s == 0 {
        return;
    }
    let clients: Vec<_> = channels
        .iter()
        .map(|c| PublishServiceClient::new(c.clone()))
        .collect();
    let mut dice = Dice(0x2545_f491_4f6c_dd1d);
    let period = Duration::from_secs(1) / plan.comments_per_s.max(1);
    paced(period, stop, |sent| {
        let viewer_id = plan.first_viewer + dice.below(plan.viewers);
        let phrase = PHRASES[dice.below(PHRASES.len() as u64) as usize];
        let mut client = clients[sent as usize % clients.len()].clone();
        let request = PublishRequest {
            room_id: plan.room_id,
            event: Some(RoomEvent {
                kind: Some(room_event::Kind::Comment(Comment {
                    viewer_id,
                    text: format!("{} {phrase}", now_ns()),
                })),
                ..RoomEvent::default()
            }),
            ..PublishRequest::default()
        };
        let accepted = accepted.clone();
        async move {
            match client.publish(request).await {
                Ok(_) => {
                    accepted.comments.fetch_add(1, Ordering::Relaxed);
                }
                Err(status) => accepted.failed("Publish (comment)", &status),
            }
        }
    })
    .await;
}

/// A few viewers top up, then send gifts at a steady rate; each gift's
/// amount is added to the gross once the gift-settler took it.
async fn gifts(
    channels: &[MeshChannel],
    plan: &Plan,
    accepted: &Arc<Accepted>,
    stop: watch::Receiver<bool>,
) {
    if plan.gifts_per_s == 0 {
        return;
    }
    let mut client = GiftsServiceClient::new(channels[0].clone());
    let gifters = GIFTERS.min(plan.viewers);
    for i in 0..gifters {
        let user_id = plan.first_viewer + i;
        if let Err(status) = client
            .deposit(DepositRequest {
                idempotency_key: format!("live-top-up-{user_id}"),
                user_id,
                amount: 100_000,
            })
            .await
        {
            accepted.failed("Deposit", &status);
        }
    }
    let mut dice = Dice(0xd1b5_4a32_d192_ed03);
    let period = Duration::from_secs(1) / plan.gifts_per_s.max(1);
    paced(period, stop, |sent| {
        let viewer_id = plan.first_viewer + dice.below(gifters);
        let amount = AMOUNTS[dice.below(AMOUNTS.len() as u64) as usize];
        let request = SendGiftRequest {
            idempotency_key: format!("live-gift-{sent}"),
            viewer_id,
            room_id: plan.room_id,
            gift_id: 1 + dice.below(9),
            amount,
        };
        let mut client = client.clone();
        let accepted = accepted.clone();
        async move {
            match client.send_gift(request).await {
                Ok(_) => {
                    accepted.gifts.fetch_add(1, Ordering::Relaxed);
                    accepted.gross.fetch_add(amount, Ordering::Relaxed);
                }
                Err(status) => accepted.failed("SendGift", &status),
            }
        }
    })
    .await;
}
