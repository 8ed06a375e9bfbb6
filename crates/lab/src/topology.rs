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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use livemesh_mesh::auth::{Claims, Credential, Security, TokenKeys, VIEWER_HEADER};
use livemesh_mesh::{ClientStack, CommonArgs, MeshChannel};
use serde::Deserialize;

use self::chaos::Chaos;

mod audience;
mod drive;
mod metrics;
mod round;

use self::drive::drive;

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
    // The check reads only the runtime's keys (client, auth).
    let config = common.load(&livemesh_mesh::config::Registry::new())?;
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

    /// A client of every replica of `service`, each call with `role`'s token.
    fn clients<C>(
        &self,
        service: &str,
        role: &str,
        new: impl Fn(MeshChannel) -> C,
    ) -> anyhow::Result<Vec<C>> {
        self.topology
            .processes(service)?
            .iter()
            .map(|p| Ok(new(self.channel(&p.url, role)?)))
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
