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
//! With the chaos ([`chaos`], issue 16), rounds go on while, one after the
//! other, a replica of every service is SIGKILLed and restarted, the Redis
//! Cluster master of the first room's slot is killed (its replica takes
//! over) and MariaDB is SIGKILLed and restarted. Clients retry a "retry
//! later" answer (UNAVAILABLE, DEADLINE_EXCEEDED) with the same request
//! (idempotency key, batch id) on the next replica, as real clients do;
//! viewers whose node died resume on another node from the last position
//! they received. After the chaos every subscribe node gets one more viewer
//! per room, and a last round runs. Every check above must still hold, and
//! more: each love batch that answered OK is in its room's final total once,
//! each gift that answered OK is settled once (each sender's balance is its
//! deposit minus its gifts; the streamer's is the settlement's credit), and
//! every viewer that stayed or resumed saw every acknowledged comment and
//! gift once, in order (a late viewer: the same sequence from its start).

mod chaos;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    Comment, DepositRequest, EndRoomRequest, GetBalanceRequest, GetLovesRequest,
    GetSettlementRequest, PublishRequest, ReconcileRequest, RoomEvent, SendGiftRequest,
    SendLovesRequest, SettlementState, StartRoomRequest, StreamPosition, SubscribeRequest,
    room_event,
};
use serde::Deserialize;

use self::chaos::Chaos;
use tokio::sync::watch;

/// What `scripts/topology` started.
#[derive(Debug, Deserialize)]
pub struct Topology {
    /// Service name (`subscribe`, `publish`, ...) -> its processes.
    pub services: BTreeMap<String, Vec<Process>>,
    /// The counter's SQL database, where final love totals land.
    pub counter_database_url: String,
    /// The Redis Cluster's nodes (the chaos kills a master).
    #[serde(default)]
    pub redis_nodes: Vec<chaos::RedisNode>,
    /// MariaDB's pid file and option file (the chaos restarts it).
    #[serde(default)]
    pub mysql_pidfile: Option<PathBuf>,
    #[serde(default)]
    pub mysql_cnf: Option<PathBuf>,
    /// Where the chaos lists the processes it SIGKILLed and restarted.
    #[serde(default)]
    pub chaos_replaced: Option<PathBuf>,
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
    /// Its plaintext health URL, `http://127.0.0.1:P`.
    #[serde(default)]
    pub health: String,
    /// Its binary and environment (NUL-separated `KEY=VALUE`), to restart it.
    #[serde(default)]
    pub bin: String,
    #[serde(default)]
    pub env_file: String,
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
    /// Kill and restart processes and servers under the workload.
    pub chaos: bool,
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
            chaos: true,
        }
    }
}

/// How long the check waits for an outcome to show.
const SETTLE: Duration = Duration::from_secs(20);
const TOKEN_TTL: Duration = Duration::from_secs(3_600);
const DEPOSIT: i64 = 1_000_000;
/// How long a client keeps retrying a call that answers "retry later".
const RETRY_FOR: Duration = Duration::from_secs(60);

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
    let mut chaos = workload.chaos.then(|| {
        Chaos::new(
            started,
            ClientStack::new(&config.client),
            mesh.topology.chaos_replaced.clone(),
        )
    });
    let mut outcome = drive(&mesh, workload, chaos.as_mut()).await;
    if let Some(chaos) = &mut chaos {
        let stopped = chaos.stop().await;
        if outcome.is_ok() {
            outcome = stopped;
        }
        println!("chaos: {} disruptions:", chaos.events.len());
        for event in &chaos.events {
            println!("  {event}");
        }
    }
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
        viewer_request(self.keys.as_ref(), viewer, message)
    }

    /// [`Self::as_viewer`] for a call about to be made: a token that cannot
    /// be minted is an INTERNAL status (never retried).
    fn viewer_call<T>(&self, viewer: u64, message: T) -> Result<tonic::Request<T>, tonic::Status> {
        self.as_viewer(viewer, message)
            .map_err(|err| tonic::Status::internal(format!("{err:#}")))
    }
}

fn viewer_request<T>(
    keys: Option<&TokenKeys>,
    viewer: u64,
    message: T,
) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    if let Some(keys) = keys {
        let token = keys.mint(&Claims::viewer(viewer, TOKEN_TTL))?;
        request
            .metadata_mut()
            .insert(VIEWER_HEADER, token.parse().context("a minted token")?);
    }
    Ok(request)
}

/// A status a client retries with the same request: the call may not have
/// been applied, or its answer was lost (UNAVAILABLE, DEADLINE_EXCEEDED, a
/// broken connection), or a rate limit asks to come back later
/// (RESOURCE_EXHAUSTED).
fn retry_later(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::ResourceExhausted
    )
    // The connection broke mid-call (its server was SIGKILLed): the mesh's
    // client reports it as UNKNOWN "transport error"; applied or not, the
    // same request again is safe.
    || (status.code() == tonic::Code::Unknown && status.message().contains("transport error"))
}

/// Calls `call` on `replicas[first]`, and while it answers "retry later"
/// ([`retry_later`]) on the next replica, with the same request every time
/// (its idempotency key or batch id), as a real client behind a load
/// balancer does; counts each retry. Fails on any other status, or after
/// [`RETRY_FOR`].
async fn retrying<C, T, F, Fut>(
    what: &str,
    replicas: &[C],
    first: usize,
    retries: &AtomicU64,
    mut call: F,
) -> anyhow::Result<T>
where
    C: Clone,
    F: FnMut(C) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + RETRY_FOR;
    let mut i = first;
    loop {
        match call(replicas[i % replicas.len()].clone()).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status) if retry_later(&status) && Instant::now() < deadline => {
                retries.fetch_add(1, Ordering::Relaxed);
                i += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(status) => bail!("{what}: {:?}: {}", status.code(), status.message()),
        }
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
    /// SendLoves calls that answered OK.
    love_batches: u64,
    gifts: i64,
    /// Per gift sender: what its gifts that answered OK add up to.
    sent: BTreeMap<u64, i64>,
}

impl RoomPlan {
    fn ordered_events(&self) -> usize {
        self.comments.len() + self.gift_events.len()
    }
}

/// What the clients of the check did beyond the first try.
#[derive(Default)]
struct Retries {
    /// Calls retried (same request) after a "retry later" answer.
    calls: AtomicU64,
}

async fn drive(mesh: &Mesh, w: Workload, chaos: Option<&mut Chaos>) -> anyhow::Result<()> {
    let started = Instant::now();
    let admin = vec![RoomAdminServiceClient::new(
        mesh.channel(&mesh.topology.processes("ongoing-query")?[0].url, "admin")?,
    )];
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
    let retries = Retries::default();

    // 1. Rooms.
    let mut plans = Vec::new();
    for r in 0..w.rooms {
        let anchor_id = 9_000 + r;
        let room = admin[0]
            .clone()
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
    let rooms_started = Instant::now();
    let room_ids: Vec<u64> = plans.iter().map(|p| p.room_id).collect();
    println!("started rooms {room_ids:?}");

    // 2. Viewers, spread over the subscribe nodes.
    let audience = Audience {
        subscribers: subscribers.clone(),
        keys: mesh.keys.clone(),
        ..Audience::default()
    };
    for (r, plan) in plans.iter().enumerate() {
        for v in 0..w.viewers_per_room {
            audience
                .join(plan.room_id, viewer_id(r as u64, v), v as usize, false)
                .await?;
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
            let request = DepositRequest {
                idempotency_key: format!("topology-deposit-{user_id}"),
                user_id,
                amount: DEPOSIT,
            };
            retrying(
                &format!("Deposit for user {user_id}"),
                &payments,
                s as usize,
                &retries.calls,
                |mut client| {
                    let request = request.clone();
                    async move { client.deposit(request).await }
                },
            )
            .await?;
        }
    }

    // 4. Traffic, in rounds (rooms side by side), and the chaos beside it.
    let peers = Peers {
        dispatchers: &dispatchers,
        counters: &counters,
        gifts: &gifts,
        retries: &retries,
    };
    let rounds_started = watch::channel(0u64).0;
    let rounds_seen = rounds_started.subscribe();
    let chaos_over = AtomicBool::new(chaos.is_none());
    let mut round = 0u64;
    let traffic = async {
        // Owned here: when the traffic stops (done or failed), the chaos
        // waiting for a round learns it.
        let rounds_started = rounds_started;
        while round < w.rounds || !chaos_over.load(Ordering::Acquire) {
            run_round(
                mesh,
                &peers,
                &mut plans,
                round,
                rooms_started,
                w,
                &rounds_started,
            )
            .await?;
            round += 1;
        }
        anyhow::Ok(())
    };
    let disruption = async {
        let outcome = match chaos {
            Some(chaos) => disrupt(chaos, &mesh.topology, &room_ids, rounds_seen).await,
            None => Ok(()),
        };
        chaos_over.store(true, Ordering::Release);
        outcome
    };
    let (traffic, disruption) = tokio::join!(traffic, disruption);
    // The traffic's failure first: the chaos fails too when it stops.
    traffic?;
    disruption.context("the chaos")?;

    // Viewers that join after the chaos, one per room on every node (the
    // restarted one included), and one more round for them to see.
    for (r, plan) in plans.iter().enumerate() {
        for node in 0..subscribers.len() {
            let viewer = viewer_id(r as u64, w.viewers_per_room + node as u64);
            audience.join(plan.room_id, viewer, node, true).await?;
        }
    }
    let streams = streams + plans.len() * subscribers.len();
    audience
        .until("every late viewer stream starts", |all| {
            all.len() == streams && all.values().all(|v| v.started)
        })
        .await?;
    run_round(
        mesh,
        &peers,
        &mut plans,
        round,
        rooms_started,
        w,
        &watch::channel(0).0,
    )
    .await?;
    round += 1;
    ensure!(
        plans.iter().all(|p| p.loves > 0),
        "a room had no love accepted: {:?}",
        plans.iter().map(|p| p.loves).collect::<Vec<_>>()
    );
    println!(
        "{round} rounds in {:.1}s; {} calls retried with the same request (idempotency key, batch id) after a retry-later answer or a broken connection",
        started.elapsed().as_secs_f64(),
        retries.calls.load(Ordering::Relaxed)
    );

    // 5a. Every viewer sees every ordered event of its room once, in order.
    audience
        .until(
            "every viewer sees every comment and gift of its room",
            |all| {
                all.values().all(|v| {
                    let Some(plan) = plans.iter().find(|p| p.room_id == v.room_id) else {
                        return false;
                    };
                    if !v.late {
                        return v.ordered.len() >= plan.ordered_events();
                    }
                    // A late viewer: as far as those there from the start.
                    all.values()
                        .filter(|o| o.room_id == v.room_id && !o.late)
                        .all(|o| {
                            let since = o.ordered.iter().filter(|(at, _)| *at > v.start_offset);
                            o.ordered.len() >= plan.ordered_events()
                                && v.ordered.len() >= since.count()
                        })
                })
            },
        )
        .await?;
    let logs = audience.snapshot();
    let mut resumed = 0;
    for plan in &plans {
        let viewers: Vec<&ViewerLog> = logs
            .values()
            .filter(|v| v.room_id == plan.room_id)
            .collect();
        let first = viewers
            .iter()
            .find(|v| !v.late)
            .context("a room without viewers")?;
        for viewer in &viewers {
            ensure!(
                viewer.unrecovered.is_empty(),
                "viewer {} of room {} resumed without recovering every event: {:?}",
                viewer.viewer_id,
                plan.room_id,
                viewer.unrecovered
            );
            if !viewer.resumes.is_empty() {
                resumed += 1;
            }
            if viewer.late {
                // From its start on, the same sequence as everyone.
                let expected: Vec<(u64, String)> = first
                    .ordered
                    .iter()
                    .filter(|(offset, _)| *offset > viewer.start_offset)
                    .cloned()
                    .collect();
                ensure!(
                    viewer.ordered == expected,
                    "late viewer {} (node {}) of room {} joined at offset {}: saw {:?}, expected {:?}",
                    viewer.viewer_id,
                    viewer.node,
                    plan.room_id,
                    viewer.start_offset,
                    viewer.ordered,
                    expected
                );
                continue;
            }
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
    let comments: usize = plans.iter().map(|p| p.comments.len()).sum();
    let gifted_events: usize = plans.iter().map(|p| p.gift_events.len()).sum();
    let late = logs.values().filter(|v| v.late).count();
    println!(
        "viewers: {} streams ({resumed} resumed on another node after theirs died, {late} joined after the chaos); each saw every acknowledged comment and gift of its room once, in offset order, the same on every node ({ordered} events over {} rooms: {comments} comments whose Publish answered OK, {gifted_events} gifts whose SendGift answered OK)",
        logs.len(),
        plans.len()
    );
    for viewer in logs.values().filter(|v| !v.resumes.is_empty()) {
        println!(
            "  viewer {} of room {}: {}",
            viewer.viewer_id,
            viewer.room_id,
            viewer.resumes.join("; ")
        );
    }

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
            .await
            .with_context(|| format!("the counters accepted {} loves", plan.loves))?;
            ensure!(total == plan.loves);
        }
    }
    let loves: u64 = plans.iter().map(|p| p.loves).sum();
    println!("both counters report the accepted loves of every room ({loves} in all)");

    // 5c. End the rooms: viewers see the end, money settles, totals land in SQL.
    for plan in &plans {
        let room_id = plan.room_id;
        let mut tries = 0;
        let ended = retrying(
            &format!("EndRoom {room_id}"),
            &admin,
            0,
            &retries.calls,
            |mut admin| {
                tries += 1;
                let retried = tries > 1;
                async move {
                    match admin.end_room(EndRoomRequest { room_id }).await {
                        // A retry of an end that was applied, its answer lost.
                        Err(status)
                            if retried && status.code() == tonic::Code::FailedPrecondition =>
                        {
                            Ok(tonic::Response::new(Default::default()))
                        }
                        other => other,
                    }
                }
            },
        )
        .await;
        ended?;
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
        let mut credit = None;
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
                "room {room_id} settled {} to streamer {}; gifts that answered OK sent {} to anchor {}",
                settlement.gross,
                settlement.streamer_id,
                plan.gifts,
                plan.anchor_id
            );
            credit = Some(settlement.streamer_credit);
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
        // Paid once: the anchor's balance is this room's credit (it has no
        // other income), each sender's is its deposit minus its gifts.
        let credit = credit.context("no gift-settler")?;
        let balance = |user: u64| {
            let request = GetBalanceRequest { user_id: user };
            let mut client = gifts[0].clone();
            async move {
                anyhow::Ok(
                    client
                        .get_balance(mesh.as_viewer(user, request)?)
                        .await?
                        .into_inner()
                        .balance,
                )
            }
        };
        let paid = balance(plan.anchor_id).await?;
        ensure!(
            paid == credit,
            "streamer {} of room {room_id} holds {paid}; the settlement credited {credit}",
            plan.anchor_id
        );
        for (&sender, &sent) in &plan.sent {
            let left = balance(sender).await?;
            ensure!(
                left == DEPOSIT - sent,
                "sender {sender} holds {left}: deposited {DEPOSIT}, its gifts that answered OK sent {sent}"
            );
        }
        println!(
            "  room {room_id}: {} gifts answered OK, {} in all = settled gross; streamer {} paid {paid} once (= the settlement's credit); {} senders each debited exactly their gifts",
            plan.gift_events.len(),
            plan.gifts,
            plan.anchor_id,
            plan.sent.len()
        );
    }
    let gifted: i64 = plans.iter().map(|p| p.gifts).sum();
    println!(
        "every room settled its gifts ({gifted} in all) to its anchor once; Reconcile balanced on every gift-settler"
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
        println!(
            "  room {room_id}: {} SendLoves answered OK accepting {} loves; final total in SQL {total}",
            plan.love_batches, plan.loves
        );
        ensure!(
            u64::try_from(total).ok() == Some(plan.loves),
            "room {room_id}'s final total in SQL is {total}; the SendLoves that answered OK accepted {}",
            plan.loves
        );
    }
    db.close().await;
    println!("every room's final love total in SQL equals the loves accepted (each batch once)");

    // 5d. The metrics the alert rules read are exported where they belong.
    check_metrics(&mesh.topology).await?;
    Ok(())
}

/// The chaos, one disruption after the other, each in a round that began
/// after the previous disruption was over (so each strikes under traffic,
/// with calls in flight): one replica of every service SIGKILLed and restarted, the
/// Redis master of the first room's slot, MariaDB.
async fn disrupt(
    chaos: &mut Chaos,
    topology: &Topology,
    room_ids: &[u64],
    rounds: watch::Receiver<u64>,
) -> anyhow::Result<()> {
    // Each disruption strikes 50 ms into a round that started after the
    // previous one was over: while that round's calls are in flight.
    let after = |seen: u64| {
        let mut rounds = rounds.clone();
        async move {
            let round = rounds
                .wait_for(|&started| started > seen)
                .await
                .map(|r| *r)?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            anyhow::Ok(round)
        }
    };
    let mut seen = after(0).await?;
    for service in [
        "subscribe",
        "publish",
        "counter",
        "gift-settler",
        "ongoing-query",
    ] {
        let mut process = topology
            .processes(service)?
            .last()
            .cloned()
            .context("a service without processes")?;
        chaos.kill_and_restart(&mut process).await?;
        seen = after(seen).await?;
    }
    let room = room_ids.first().context("no room")?;
    chaos
        .fail_over_master(&topology.redis_nodes, &format!("{{room:{room}}}"))
        .await?;
    seen = after(seen).await?;
    let (Some(pidfile), Some(cnf)) = (&topology.mysql_pidfile, &topology.mysql_cnf) else {
        bail!("the topology file names no MariaDB pid and option files");
    };
    chaos
        .kill_and_restart_mariadb(pidfile, cnf, &topology.counter_database_url)
        .await?;
    after(seen).await?;
    Ok(())
}

/// One round of every room, side by side; adds what answered OK to the plans.
async fn run_round(
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
    retries: &'a Retries,
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
    /// The subscribe node it is on now.
    node: usize,
    started: bool,
    /// Joined after the chaos: checked from its start position on.
    late: bool,
    /// The offset of its first start (a late viewer sees what follows).
    start_offset: u64,
    /// Comments and gifts, as (offset, text) in the order received.
    ordered: Vec<(u64, String)>,
    /// Its stream broke and it resumed: on which node, after what.
    resumes: Vec<String>,
    /// Resumes whose start said not every missed event was replayed.
    unrecovered: Vec<String>,
    ended: bool,
    closed: Option<Result<(), (tonic::Code, String)>>,
}

/// Every viewer's log, and a signal that bumps on each change.
#[derive(Clone)]
struct Audience {
    logs: Arc<Mutex<BTreeMap<u64, ViewerLog>>>,
    changed: watch::Sender<u64>,
    /// The subscribe nodes viewers join and resume on.
    subscribers: Vec<SubscribeServiceClient<MeshChannel>>,
    keys: Option<TokenKeys>,
}

impl Default for Audience {
    fn default() -> Self {
        Self {
            logs: Arc::default(),
            changed: watch::channel(0).0,
            subscribers: Vec::new(),
            keys: None,
        }
    }
}

/// A stream ending with one of these is a broken connection or a node
/// going away: a client resumes elsewhere from its last position.
fn resumable(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Cancelled
            | tonic::Code::Internal
            | tonic::Code::DeadlineExceeded
    )
}

impl Audience {
    /// Opens `viewer_id`'s stream on subscribe node `node` and follows it
    /// (resuming on another node when it breaks).
    async fn join(
        &self,
        room_id: u64,
        viewer_id: u64,
        node: usize,
        late: bool,
    ) -> anyhow::Result<()> {
        let node = node % self.subscribers.len();
        let stream = self
            .open(room_id, viewer_id, node, None)
            .await
            .with_context(|| format!("viewer {viewer_id} subscribing on subscribe node {node}"))?;
        self.update(viewer_id, |log| {
            *log = ViewerLog {
                room_id,
                viewer_id,
                node,
                late,
                ..ViewerLog::default()
            }
        });
        let audience = self.clone();
        tokio::spawn(async move { audience.follow(room_id, viewer_id, node, stream).await });
        Ok(())
    }

    async fn open(
        &self,
        room_id: u64,
        viewer_id: u64,
        node: usize,
        resume: Option<StreamPosition>,
    ) -> Result<tonic::Streaming<livemesh_proto::v1::SubscribeResponse>, tonic::Status> {
        let request = viewer_request(
            self.keys.as_ref(),
            viewer_id,
            SubscribeRequest {
                room_id,
                viewer_id,
                resume,
                ..SubscribeRequest::default()
            },
        )
        .map_err(|err| tonic::Status::internal(format!("{err:#}")))?;
        Ok(self.subscribers[node]
            .clone()
            .subscribe(request)
            .await?
            .into_inner())
    }

    async fn follow(
        &self,
        room_id: u64,
        viewer_id: u64,
        mut node: usize,
        mut stream: tonic::Streaming<livemesh_proto::v1::SubscribeResponse>,
    ) {
        // The last position received: a safe resume point on any node.
        let mut last: Option<StreamPosition> = None;
        let mut resuming = false;
        loop {
            match stream.message().await {
                Ok(Some(response)) => {
                    self.update(viewer_id, |log| match response.message {
                        Some(Message::Started(started)) => {
                            if resuming && !started.recovered {
                                log.unrecovered
                                    .push(format!("on node {node} from {last:?}: {started:?}"));
                            }
                            if !log.started {
                                log.start_offset =
                                    started.position.as_ref().map_or(0, |p| p.offset);
                            }
                            if last.is_none() {
                                last = started.position;
                            }
                            log.started = true;
                            resuming = false;
                        }
                        Some(Message::Event(event)) => {
                            let text = match event.kind {
                                Some(room_event::Kind::Comment(Comment { text, .. })) => Some(text),
                                Some(room_event::Kind::Gift(gift)) => {
                                    Some(gift_text(&gift.transfer_id))
                                }
                                Some(room_event::Kind::RoomEnded(_)) => {
                                    log.ended = true;
                                    None
                                }
                                _ => None,
                            };
                            if let Some(text) = text {
                                log.ordered.push((event.offset, text));
                                last = Some(StreamPosition {
                                    epoch: event.epoch,
                                    offset: event.offset,
                                });
                            }
                        }
                        // This viewer does not accept batches.
                        Some(Message::Batch(_)) | None => {}
                    })
                }
                Ok(None) => {
                    self.update(viewer_id, |log| log.closed = Some(Ok(())));
                    return;
                }
                Err(status) => {
                    let ended = self.snapshot().get(&viewer_id).is_some_and(|v| v.ended);
                    if ended || !resumable(status.code()) {
                        self.update(viewer_id, |log| {
                            log.closed = Some(Err((status.code(), status.message().to_owned())));
                        });
                        return;
                    }
                    // Resume on the next node, as a client would; the node
                    // may be restarting too: keep trying the others.
                    let broke = format!("{:?} on node {node}", status.code());
                    let deadline = Instant::now() + RETRY_FOR;
                    let resumed = loop {
                        node = (node + 1) % self.subscribers.len();
                        match self.open(room_id, viewer_id, node, last).await {
                            Ok(resumed) => break Ok(resumed),
                            Err(status)
                                if (resumable(status.code())
                                    || status.code() == tonic::Code::ResourceExhausted)
                                    && Instant::now() < deadline =>
                            {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(status) => break Err(status),
                        }
                    };
                    match resumed {
                        Ok(resumed) => {
                            stream = resumed;
                            resuming = true;
                            self.update(viewer_id, |log| {
                                log.node = node;
                                log.resumes.push(format!(
                                    "{broke}, resumed on node {node} from offset {}",
                                    last.map_or(0, |p| p.offset)
                                ));
                            });
                        }
                        Err(status) => {
                            self.update(viewer_id, |log| {
                                log.closed = Some(Err((
                                    status.code(),
                                    format!("resuming after {broke}: {}", status.message()),
                                )));
                            });
                            return;
                        }
                    }
                }
            }
        }
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
