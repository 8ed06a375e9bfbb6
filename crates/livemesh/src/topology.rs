//! `livemesh topology-check`: the workload `scripts/topology --check` drives
//! through the production shape (every service its own process, several
//! replicas each, Redis Cluster, MariaDB with the binlog), and the checks of
//! its outcome.
//!
//! The script starts the processes and writes what it started to a JSON
//! file (see [`Topology`]); this reads it, and:
//!
//! 1. starts rooms (ongoing-query, as `admin`);
//! 2. opens viewers' streams, each room's viewers spread over every
//!    subscribe node (as the `bff`, with each viewer's own token);
//! 3. tops up gift senders (as `payments`, alternating gift-settlers);
//! 4. runs `rounds` rounds of traffic: per room, comments alternating
//!    between the dispatchers, love batches alternating between the
//!    counters, gifts alternating between the gift-settlers;
//! 5. ends the rooms, and checks: every viewer saw every comment and gift of
//!    its room once, in offset order, then the room's end; every counter
//!    reports the accepted loves while the room is live and the final total
//!    in SQL equals them after its end; every room settles with the gifts'
//!    sum, and Reconcile says balanced; the metrics the alert rules use are
//!    exported by the processes that own them.
//!
//! Rounds are the seam for disruption: issue 16's chaos (SIGKILL of a
//! replica, a Redis master failover, a MariaDB restart) goes between rounds,
//! using the pids in the topology file; every check above must still hold.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use livemesh_mesh::auth::{Claims, Credential, Security, TokenKeys, VIEWER_HEADER};
use livemesh_mesh::{ClientStack, CommonArgs, MeshChannel};
use livemesh_proto::v1::counter_service_client::CounterServiceClient;
use livemesh_proto::v1::gifts_service_client::GiftsServiceClient;
use livemesh_proto::v1::publish_service_client::PublishServiceClient;
use livemesh_proto::v1::room_admin_service_client::RoomAdminServiceClient;
use livemesh_proto::v1::settlement_service_client::SettlementServiceClient;
use livemesh_proto::v1::subscribe_response::Message;
use livemesh_proto::v1::subscribe_service_client::SubscribeServiceClient;
use livemesh_proto::v1::{
    Comment, DepositRequest, EndRoomRequest, GetLovesRequest, GetSettlementRequest, PublishRequest,
    ReconcileRequest, RoomEvent, SendGiftRequest, SendLovesRequest, SettlementState,
    StartRoomRequest, SubscribeRequest, room_event,
};
use serde::Deserialize;
use tokio::sync::watch;

/// What `scripts/topology` started.
#[derive(Debug, Deserialize)]
pub struct Topology {
    /// Service name (`subscribe`, `publish`, ...) -> its processes.
    pub services: BTreeMap<String, Vec<Process>>,
    /// The counter's SQL database, where final love totals land.
    pub counter_database_url: String,
}

/// One service process.
#[derive(Debug, Clone, Deserialize)]
pub struct Process {
    pub name: String,
    /// Its gRPC URL (`https://127.0.0.1:P` with TLS).
    pub url: String,
    /// Its metrics endpoint, `http://127.0.0.1:P/metrics`.
    pub metrics: String,
    pub pid: u32,
    pub log: String,
}

impl Topology {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn processes(&self, service: &str) -> anyhow::Result<&[Process]> {
        match self.services.get(service) {
            Some(list) if !list.is_empty() => Ok(list),
            _ => bail!("the topology has no {service} process"),
        }
    }
}

/// How much traffic the check drives.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub rooms: u64,
    pub viewers_per_room: u64,
    pub rounds: u64,
    pub comments_per_round: u64,
    pub lovers_per_room: u64,
    pub senders_per_room: u64,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            rooms: 4,
            viewers_per_room: 6,
            rounds: 3,
            comments_per_round: 4,
            lovers_per_room: 3,
            senders_per_room: 2,
        }
    }
}

/// How long the check waits for an outcome to show.
const SETTLE: Duration = Duration::from_secs(20);
const TOKEN_TTL: Duration = Duration::from_secs(3_600);
const DEPOSIT: i64 = 1_000_000;

/// Runs the workload against `topology` and checks the outcome.
pub async fn run(common: &CommonArgs, topology: &Path, workload: Workload) -> anyhow::Result<()> {
    let topology = Topology::read(topology)?;
    let config = common.load()?;
    let security = Security::from_config(&config.auth)?;
    let mut base = ClientStack::new(&config.client);
    if let Some(tls) = security.client_tls() {
        base = base.with_tls(tls);
    }
    let mesh = Mesh {
        base,
        keys: security.keys().cloned(),
        topology,
    };
    let started = Instant::now();
    let outcome = drive(&mesh, workload).await;
    match &outcome {
        Ok(()) => println!(
            "topology check: OK in {:.1}s",
            started.elapsed().as_secs_f64()
        ),
        Err(err) => println!("topology check FAILED: {err:#}"),
    }
    outcome
}

/// Clients for the processes of the topology, as the outside callers.
struct Mesh {
    base: ClientStack,
    keys: Option<TokenKeys>,
    topology: Topology,
}

impl Mesh {
    /// A channel to `url` whose calls carry a token with `role`.
    fn channel(&self, url: &str, role: &str) -> anyhow::Result<MeshChannel> {
        let stack = match &self.keys {
            Some(keys) => {
                let token = keys.mint(&Claims::new(
                    format!("topology-check-{role}"),
                    &[role],
                    TOKEN_TTL,
                ))?;
                self.base
                    .clone()
                    .with_credential(Credential::bearer(&token).context("a minted token")?)
            }
            None => self.base.clone(),
        };
        Ok(stack.channel(url)?)
    }

    fn channels(&self, service: &str, role: &str) -> anyhow::Result<Vec<MeshChannel>> {
        self.topology
            .processes(service)?
            .iter()
            .map(|p| self.channel(&p.url, role))
            .collect()
    }

    /// `message` acting for `viewer` (its token in `x-livemesh-viewer`).
    fn as_viewer<T>(&self, viewer: u64, message: T) -> anyhow::Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        if let Some(keys) = &self.keys {
            let token = keys.mint(&Claims::viewer(viewer, TOKEN_TTL))?;
            request
                .metadata_mut()
                .insert(VIEWER_HEADER, token.parse().context("a minted token")?);
        }
        Ok(request)
    }
}

/// What the check expects of one room.
#[derive(Debug, Default)]
struct RoomPlan {
    room_id: u64,
    anchor_id: u64,
    /// Comments published, by the offset their Publish answered.
    comments: BTreeMap<u64, String>,
    /// Gifts committed (their events are published by the gift-settler, at
    /// offsets the check does not learn), as the text viewers see.
    gift_events: BTreeSet<String>,
    loves: u64,
    gifts: i64,
}

impl RoomPlan {
    fn ordered_events(&self) -> usize {
        self.comments.len() + self.gift_events.len()
    }
}

async fn drive(mesh: &Mesh, w: Workload) -> anyhow::Result<()> {
    let mut admin = RoomAdminServiceClient::new(
        mesh.channel(&mesh.topology.processes("ongoing-query")?[0].url, "admin")?,
    );
    let subscribers: Vec<_> = mesh
        .channels("subscribe", "bff")?
        .into_iter()
        .map(SubscribeServiceClient::new)
        .collect();
    let dispatchers: Vec<_> = mesh
        .channels("publish", "bff")?
        .into_iter()
        .map(PublishServiceClient::new)
        .collect();
    let counters: Vec<_> = mesh
        .channels("counter", "bff")?
        .into_iter()
        .map(CounterServiceClient::new)
        .collect();
    let gifts: Vec<_> = mesh
        .channels("gift-settler", "bff")?
        .into_iter()
        .map(GiftsServiceClient::new)
        .collect();
    let payments: Vec<_> = mesh
        .channels("gift-settler", "payments")?
        .into_iter()
        .map(GiftsServiceClient::new)
        .collect();
    let finance: Vec<_> = mesh
        .channels("gift-settler", "finance")?
        .into_iter()
        .map(SettlementServiceClient::new)
        .collect();
    println!(
        "topology: {} ongoing-query, {} publish, {} subscribe, {} counter, {} gift-settler",
        mesh.topology.processes("ongoing-query")?.len(),
        dispatchers.len(),
        subscribers.len(),
        counters.len(),
        gifts.len()
    );

    // 1. Rooms.
    let mut plans = Vec::new();
    for r in 0..w.rooms {
        let anchor_id = 9_000 + r;
        let room = admin
            .start_room(StartRoomRequest { anchor_id })
            .await
            .context("StartRoom")?
            .into_inner()
            .room
            .context("StartRoom returned no room")?;
        plans.push(RoomPlan {
            room_id: room.room_id,
            anchor_id,
            ..RoomPlan::default()
        });
    }
    let room_ids: Vec<u64> = plans.iter().map(|p| p.room_id).collect();
    println!("started rooms {room_ids:?}");

    // 2. Viewers, spread over the subscribe nodes.
    let audience = Audience::default();
    for (r, plan) in plans.iter().enumerate() {
        for v in 0..w.viewers_per_room {
            let viewer = viewer_id(r as u64, v);
            let node = (v as usize) % subscribers.len();
            let mut client = subscribers[node].clone();
            let stream = client
                .subscribe(mesh.as_viewer(
                    viewer,
                    SubscribeRequest {
                        room_id: plan.room_id,
                        viewer_id: viewer,
                        resume: None,
                    },
                )?)
                .await
                .with_context(|| format!("viewer {viewer} subscribing on subscribe node {node}"))?
                .into_inner();
            audience.follow(plan.room_id, viewer, node, stream);
        }
    }
    let streams = (w.rooms * w.viewers_per_room) as usize;
    audience
        .until("every viewer stream starts", |all| {
            all.len() == streams && all.values().all(|v| v.started)
        })
        .await?;
    println!(
        "{streams} viewer streams live over {} subscribe nodes",
        subscribers.len()
    );

    // 3. Balances for the gift senders.
    for r in 0..w.rooms {
        for s in 0..w.senders_per_room {
            let user_id = sender_id(r, s);
            let mut client = payments[(s as usize) % payments.len()].clone();
            client
                .deposit(DepositRequest {
                    idempotency_key: format!("topology-deposit-{user_id}"),
                    user_id,
                    amount: DEPOSIT,
                })
                .await
                .with_context(|| format!("Deposit for user {user_id}"))?;
        }
    }

    // 4. Traffic, in rounds; rooms side by side.
    let peers = Peers {
        dispatchers: &dispatchers,
        counters: &counters,
        gifts: &gifts,
    };
    for round in 0..w.rounds {
        let outcomes = futures::future::try_join_all(
            plans
                .iter()
                .enumerate()
                .map(|(r, plan)| room_round(mesh, &peers, r as u64, plan.room_id, round, w)),
        )
        .await?;
        for (plan, outcome) in plans.iter_mut().zip(outcomes) {
            plan.comments.extend(outcome.comments);
            plan.gift_events.extend(outcome.gift_events);
            plan.loves += outcome.loves;
            plan.gifts += outcome.gifts;
        }
        println!(
            "round {}: in every room {} comments over {} dispatchers, {} love batches over {} counters, {} gifts over {} gift-settlers",
            round + 1,
            w.comments_per_round,
            dispatchers.len(),
            w.lovers_per_room,
            counters.len(),
            w.senders_per_room,
            gifts.len()
        );
    }
    ensure!(
        plans.iter().all(|p| p.loves > 0),
        "a room had no love accepted: {:?}",
        plans.iter().map(|p| p.loves).collect::<Vec<_>>()
    );

    // 5a. Every viewer sees every ordered event of its room once, in order.
    audience
        .until(
            "every viewer sees every comment and gift of its room",
            |all| {
                all.values().all(|v| {
                    plans
                        .iter()
                        .find(|p| p.room_id == v.room_id)
                        .is_some_and(|p| v.ordered.len() >= p.ordered_events())
                })
            },
        )
        .await?;
    let logs = audience.snapshot();
    for plan in &plans {
        let viewers: Vec<&ViewerLog> = logs
            .values()
            .filter(|v| v.room_id == plan.room_id)
            .collect();
        let first = viewers.first().context("a room without viewers")?;
        for viewer in &viewers {
            check_ordered(plan, viewer)?;
            ensure!(
                viewer.ordered == first.ordered,
                "viewers {} (node {}) and {} (node {}) of room {} saw different sequences",
                first.viewer_id,
                first.node,
                viewer.viewer_id,
                viewer.node,
                plan.room_id
            );
        }
    }
    let ordered: usize = plans.iter().map(RoomPlan::ordered_events).sum();
    println!(
        "every viewer saw each comment and gift of its room once, in offset order, the same on every node ({ordered} events over {} rooms)",
        plans.len()
    );

    // 5b. Live love totals on every counter.
    for plan in &plans {
        for (c, counter) in counters.iter().enumerate() {
            let room_id = plan.room_id;
            let total = eventually(
                &format!("counter {c} reports room {room_id}'s loves"),
                || {
                    let mut counter = counter.clone();
                    async move {
                        let total = counter
                            .get_loves(GetLovesRequest { room_id })
                            .await?
                            .into_inner()
                            .total;
                        Ok((total == plan.loves).then_some(total))
                    }
                },
            )
            .await?;
            ensure!(total == plan.loves);
        }
    }
    let loves: u64 = plans.iter().map(|p| p.loves).sum();
    println!("both counters report the accepted loves of every room ({loves} in all)");

    // 5c. End the rooms: viewers see the end, money settles, totals land in SQL.
    for plan in &plans {
        admin
            .end_room(EndRoomRequest {
                room_id: plan.room_id,
            })
            .await
            .with_context(|| format!("EndRoom {}", plan.room_id))?;
    }
    audience
        .until(
            "every viewer sees its room end and its stream close",
            |all| all.values().all(|v| v.ended && v.closed.is_some()),
        )
        .await?;
    for viewer in audience.snapshot().values() {
        if let Some(Err(status)) = &viewer.closed {
            bail!(
                "viewer {}'s stream ended with {:?}: {}",
                viewer.viewer_id,
                status.0,
                status.1
            );
        }
    }
    println!("every viewer saw its room end; every stream closed cleanly");

    for plan in &plans {
        let room_id = plan.room_id;
        for (f, finance) in finance.iter().enumerate() {
            let settlement = eventually(
                &format!("room {room_id} settles (asked gift-settler {f})"),
                || {
                    let mut finance = finance.clone();
                    async move {
                        let settlement = finance
                            .get_settlement(GetSettlementRequest { room_id })
                            .await?
                            .into_inner()
                            .settlement;
                        Ok(settlement.filter(|s| s.state() == SettlementState::Settled))
                    }
                },
            )
            .await?;
            ensure!(
                settlement.gross == plan.gifts && settlement.streamer_id == plan.anchor_id,
                "room {room_id} settled {} to streamer {}; gifts sent {} to anchor {}",
                settlement.gross,
                settlement.streamer_id,
                plan.gifts,
                plan.anchor_id
            );
            let reconcile = finance
                .clone()
                .reconcile(ReconcileRequest { room_id })
                .await?
                .into_inner();
            ensure!(
                reconcile.balanced,
                "Reconcile of room {room_id} is not balanced: {:?}",
                reconcile.shards
            );
        }
    }
    let gifted: i64 = plans.iter().map(|p| p.gifts).sum();
    println!(
        "every room settled its gifts ({gifted} in all) to its anchor; Reconcile balanced on every gift-settler"
    );

    let db = sqlx::mysql::MySqlPool::connect(&mesh.topology.counter_database_url)
        .await
        .context("connecting to the counter's database")?;
    for plan in &plans {
        let room_id = plan.room_id;
        let total = eventually(&format!("room {room_id}'s final love total in SQL"), || {
            let db = db.clone();
            async move {
                let row: Option<(i64,)> =
                    sqlx::query_as("SELECT total FROM room_loves WHERE room_id = ?")
                        .bind(i64::try_from(room_id)?)
                        .fetch_optional(&db)
                        .await?;
                Ok(row.map(|(total,)| total))
            }
        })
        .await?;
        ensure!(
            u64::try_from(total).ok() == Some(plan.loves),
            "room {room_id}'s final total in SQL is {total}; the counters accepted {}",
            plan.loves
        );
    }
    db.close().await;
    println!("every room's final love total in SQL equals the loves accepted");

    // 5d. The metrics the alert rules read are exported where they belong.
    check_metrics(&mesh.topology).await?;
    Ok(())
}

fn viewer_id(room: u64, k: u64) -> u64 {
    100_000 + room * 1_000 + k
}

fn sender_id(room: u64, k: u64) -> u64 {
    200_000 + room * 1_000 + k
}

/// The services the traffic goes through, as the BFF.
struct Peers<'a> {
    dispatchers: &'a [PublishServiceClient<MeshChannel>],
    counters: &'a [CounterServiceClient<MeshChannel>],
    gifts: &'a [GiftsServiceClient<MeshChannel>],
}

/// What one room's round put in.
struct RoundOutcome {
    comments: BTreeMap<u64, String>,
    gift_events: BTreeSet<String>,
    loves: u64,
    gifts: i64,
}

/// One round of one room: comments in sequence alternating between the
/// dispatchers (so their offsets define the order viewers must see), love
/// batches alternating between the counters, gifts alternating between the
/// gift-settlers.
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
        gifts: 0,
    };
    for i in 0..w.comments_per_round {
        let n = round * w.comments_per_round + i;
        let viewer = viewer_id(r, n % w.viewers_per_room);
        let text = format!("room {room_id} comment {n}");
        let mut dispatcher = peers.dispatchers[(n as usize) % peers.dispatchers.len()].clone();
        let position = dispatcher
            .publish(mesh.as_viewer(
                viewer,
                PublishRequest {
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
                },
            )?)
            .await
            .with_context(|| format!("Publish of {text:?}"))?
            .into_inner()
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
        let mut counter = peers.counters[((l + round) as usize) % peers.counters.len()].clone();
        // Ten taps 100 ms apart of video time: a human's pace.
        let taps_ms = (0..10).map(|t| round * 1_000 + t * 100).collect();
        let reply = counter
            .send_loves(mesh.as_viewer(
                viewer,
                SendLovesRequest {
                    room_id,
                    viewer_id: viewer,
                    batch_id: format!("topology-{round}-{l}"),
                    taps_ms,
                },
            )?)
            .await
            .with_context(|| format!("SendLoves of viewer {viewer} in room {room_id}"))?
            .into_inner();
        outcome.loves += reply.accepted;
    }
    for s in 0..w.senders_per_room {
        let sender = sender_id(r, s);
        let amount = 10 + i64::try_from(s + round)?;
        let mut settler = peers.gifts[((s + round) as usize) % peers.gifts.len()].clone();
        let reply = settler
            .send_gift(mesh.as_viewer(
                sender,
                SendGiftRequest {
                    idempotency_key: format!("topology-gift-{room_id}-{round}-{s}"),
                    viewer_id: sender,
                    room_id,
                    gift_id: 1 + s,
                    amount,
                },
            )?)
            .await
            .with_context(|| format!("SendGift of user {sender} in room {room_id}"))?
            .into_inner();
        outcome.gift_events.insert(gift_text(&reply.transfer_id));
        outcome.gifts += amount;
    }
    Ok(outcome)
}

/// A viewer saw its room's comments at the offsets their Publish answered,
/// every gift, nothing twice, in offset order.
fn check_ordered(plan: &RoomPlan, viewer: &ViewerLog) -> anyhow::Result<()> {
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
async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> anyhow::Result<T>
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

/// What one viewer's stream showed.
#[derive(Debug, Clone, Default)]
struct ViewerLog {
    room_id: u64,
    viewer_id: u64,
    node: usize,
    started: bool,
    /// Comments and gifts, as (offset, text) in the order received.
    ordered: Vec<(u64, String)>,
    ended: bool,
    closed: Option<Result<(), (tonic::Code, String)>>,
}

/// Every viewer's log, and a signal that bumps on each change.
#[derive(Clone)]
struct Audience {
    logs: Arc<Mutex<BTreeMap<u64, ViewerLog>>>,
    changed: watch::Sender<u64>,
}

impl Default for Audience {
    fn default() -> Self {
        Self {
            logs: Arc::default(),
            changed: watch::channel(0).0,
        }
    }
}

impl Audience {
    fn follow(
        &self,
        room_id: u64,
        viewer_id: u64,
        node: usize,
        mut stream: tonic::Streaming<livemesh_proto::v1::SubscribeResponse>,
    ) {
        self.update(viewer_id, |log| {
            *log = ViewerLog {
                room_id,
                viewer_id,
                node,
                ..ViewerLog::default()
            }
        });
        let audience = self.clone();
        tokio::spawn(async move {
            loop {
                match stream.message().await {
                    Ok(Some(response)) => {
                        audience.update(viewer_id, |log| match response.message {
                            Some(Message::Started(_)) => log.started = true,
                            Some(Message::Event(event)) => match event.kind {
                                Some(room_event::Kind::Comment(Comment { text, .. })) => {
                                    log.ordered.push((event.offset, text));
                                }
                                Some(room_event::Kind::Gift(gift)) => {
                                    log.ordered
                                        .push((event.offset, gift_text(&gift.transfer_id)));
                                }
                                Some(room_event::Kind::RoomEnded(_)) => log.ended = true,
                                _ => {}
                            },
                            None => {}
                        })
                    }
                    Ok(None) => {
                        audience.update(viewer_id, |log| log.closed = Some(Ok(())));
                        return;
                    }
                    Err(status) => {
                        audience.update(viewer_id, |log| {
                            log.closed = Some(Err((status.code(), status.message().to_owned())));
                        });
                        return;
                    }
                }
            }
        });
    }

    fn update(&self, viewer_id: u64, change: impl FnOnce(&mut ViewerLog)) {
        change(
            self.logs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(viewer_id)
                .or_default(),
        );
        self.changed.send_modify(|n| *n += 1);
    }

    fn snapshot(&self) -> BTreeMap<u64, ViewerLog> {
        self.logs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Waits until `done` holds of the logs, at most [`SETTLE`].
    async fn until(
        &self,
        what: &str,
        done: impl Fn(&BTreeMap<u64, ViewerLog>) -> bool,
    ) -> anyhow::Result<()> {
        let mut changes = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + SETTLE;
        loop {
            if done(&self.snapshot()) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                let stuck: Vec<String> = self
                    .snapshot()
                    .values()
                    .map(|v| {
                        format!(
                            "viewer {} room {} node {}: started {}, {} ordered, ended {}, closed {:?}",
                            v.viewer_id,
                            v.room_id,
                            v.node,
                            v.started,
                            v.ordered.len(),
                            v.ended,
                            v.closed
                        )
                    })
                    .collect();
                bail!("{what}: not within {SETTLE:?}:\n  {}", stuck.join("\n  "));
            }
        }
    }
}

fn gift_text(transfer_id: &str) -> String {
    format!("gift {transfer_id}")
}

/// The metric families the alert rules (helm/livemesh/files/alerts.yaml)
/// read, and the services whose every process must export them once the
/// workload ran.
const ALERT_METRICS: &[(&str, &str)] = &[
    ("subscribe", "livemesh_fanout_lag_seconds_bucket"),
    (
        "ongoing-query",
        "livemesh_ongoing_query_binlog_lag_seconds_bucket",
    ),
    (
        "gift-settler",
        "livemesh_gifts_settlement_pending_age_seconds",
    ),
    ("publish", "rpc_server_calls_total"),
    ("counter", "rpc_server_calls_total"),
];

async fn check_metrics(topology: &Topology) -> anyhow::Result<()> {
    for (service, family) in ALERT_METRICS {
        for process in topology.processes(service)? {
            let text = scrape(&process.metrics).await?;
            ensure!(
                text.lines().any(|l| l.starts_with(family)),
                "{} ({}) exports no {family}",
                process.name,
                process.metrics
            );
        }
    }
    // Nothing is left pending once every room settled.
    for process in topology.processes("gift-settler")? {
        let text = scrape(&process.metrics).await?;
        let age = text
            .lines()
            .find(|l| l.starts_with("livemesh_gifts_settlement_pending_age_seconds"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok());
        ensure!(
            age == Some(0.0),
            "{}: livemesh_gifts_settlement_pending_age_seconds is {age:?} after every room settled",
            process.name
        );
    }
    println!("the metrics the alert rules read are exported by every process that owns them");
    Ok(())
}

/// `GET` of a plain-HTTP metrics URL, without an HTTP client dependency:
/// one request on a fresh connection, read to its end.
async fn scrape(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url
        .strip_prefix("http://")
        .with_context(|| format!("{url}: only http:// metrics URLs"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut socket = tokio::net::TcpStream::connect(host)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    socket
        .write_all(
            format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("{url}: no HTTP response"))?;
    ensure!(
        head.starts_with("HTTP/1.1 200"),
        "{url}: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_owned())
}
