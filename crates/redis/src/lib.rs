//! One way to reach Redis for every livemesh service: a standalone server or
//! a Cluster, pooled through deadpool-redis, every call bounded in time.
//!
//! [`RedisConn::connect`] reads the project's URL rule: one `redis://` URL
//! is a standalone server; several comma-separated (or one followed by a
//! comma) are the seeds of a Cluster. Every call is bounded
//! ([`RedisOptions`]) so that a dead or hung Redis yields
//! [`RedisError::Unavailable`] instead of a hang: the pool bounds waiting for
//! and creating connections, the standalone connection bounds responses, and
//! every command is additionally wrapped in a tokio timeout (the Cluster
//! client has no response timeout by default and retries with back-off for a
//! long time).
//!
//! Scripts go through [`RedisConn::eval`]: `EVALSHA`, then `EVAL` on the
//! node that lacks the script. Not redis-rs's `Script::invoke_async`: it
//! falls back to `SCRIPT LOAD`, which the Cluster client sends to EVERY node,
//! so while one node is down no node could learn the script and nothing
//! would apply, even to healthy slots.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument as _;

use deadpool_redis::Runtime;
use livemesh_mesh::breaker::{BreakerSettings, CallBreaker, Guarded, StoreFailure};
use livemesh_mesh::sql::redact;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, FromRedisValue, IntoConnectionInfo, Pipeline,
    RedisFuture, ServerErrorKind, Value,
};

/// Pool size, time bounds and the circuit breaker.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// Connections in the pool. Each is multiplexed (many requests in
    /// flight), so a few suffice; set explicitly because deadpool's default
    /// depends on the CPU count (4 on a 2-core machine).
    pub pool_size: usize,
    /// Bound on waiting for a pooled connection and on opening one.
    pub connect_timeout: Duration,
    /// Bound on each command (a script call, a read).
    pub command_timeout: Duration,
    /// The breaker in front of every call (`[client]`'s `breaker_*` settings).
    pub breaker: BreakerSettings,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(1),
            breaker: BreakerSettings::default(),
        }
    }
}

/// Why Redis could not do what was asked.
///
/// One variant on purpose: every failure is "try again later". A malformed
/// URL also reports as `Unavailable`, with a message naming the URL
/// (password masked).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RedisError {
    #[error("hot store unavailable: {0}")]
    Unavailable(String),
}

/// A pooled connection to a standalone Redis or a Cluster; clones share the pool.
#[derive(Clone)]
pub struct RedisConn {
    pools: Pools,
    options: RedisOptions,
    /// Every call goes through it: while Redis is down, calls fail at once
    /// instead of each waiting for its timeout.
    breaker: CallBreaker,
    /// The URLs with passwords masked, for messages.
    shown: Arc<str>,
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.pools {
            Pools::Standalone(_) => "Redis",
            Pools::Cluster(_) => "Redis Cluster",
        };
        write!(f, "{kind}({})", self.shown)
    }
}

#[derive(Clone)]
enum Pools {
    Standalone(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

/// A connection taken from the pool; it goes back when dropped. Clones of
/// it send over the same socket(s), so one lease serves many concurrent
/// commands.
pub struct Connection {
    _lease: Lease,
    handle: Handle,
}

impl Connection {
    /// A handle on the leased connection, for one concurrent command.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }
}

/// Only held, never read: it keeps the pooled connection checked out.
#[expect(dead_code, reason = "held to keep the pooled connection checked out")]
enum Lease {
    Standalone(deadpool_redis::Connection),
    Cluster(deadpool_redis::cluster::Connection),
}

/// A clone of a leased multiplexed connection.
#[derive(Clone)]
pub enum Handle {
    Standalone(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Handle {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Handle::Standalone(conn) => conn.req_packed_command(cmd),
            Handle::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Handle::Standalone(conn) => conn.req_packed_commands(pipeline, offset, count),
            Handle::Cluster(conn) => conn.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Handle::Standalone(conn) => conn.get_db(),
            Handle::Cluster(conn) => conn.get_db(),
        }
    }
}

/// A failed call, and whether it counts against Redis.
struct CallError {
    failure: bool,
    message: String,
}

impl StoreFailure for CallError {
    fn counts_as_failure(&self) -> bool {
        self.failure
    }
}

/// Whether `error` says Redis is in trouble (unreachable, timing out,
/// failing over) rather than refusing this one command.
fn redis_failure<E: 'static>(error: &E) -> bool {
    match (error as &dyn std::any::Any).downcast_ref::<redis::RedisError>() {
        Some(e) => {
            e.is_io_error()
                || e.is_connection_dropped()
                || e.is_timeout()
                || e.is_unrecoverable_error()
                || matches!(
                    e.kind(),
                    ErrorKind::Server(
                        ServerErrorKind::ClusterDown
                            | ServerErrorKind::TryAgain
                            | ServerErrorKind::MasterDown
                            | ServerErrorKind::BusyLoading
                    )
                )
        }
        // Pool errors: no connection could be had or made.
        None => true,
    }
}

fn breaker(options: &RedisOptions, shown: &str) -> Result<CallBreaker, RedisError> {
    CallBreaker::new(&options.breaker, "Redis", shown, "redis")
        .map_err(|e| RedisError::Unavailable(format!("Redis at {shown}: {e}")))
}

/// Parses `url` without connecting; the error names the URL, password masked.
fn check_url(url: &str) -> Result<(), RedisError> {
    url.into_connection_info()
        .map(|_| ())
        .map_err(|e| RedisError::Unavailable(format!("bad Redis URL {}: {e}", redact(url))))
}

/// `text` with the glob characters of a `KEYS`/`SCAN` pattern escaped, so
/// that a key prefix matches only itself.
pub fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A Lua script and its SHA1, for [`RedisConn::eval`].
#[derive(Debug, Clone)]
pub struct Script {
    source: &'static str,
    hash: Arc<str>,
}

impl Script {
    pub fn new(source: &'static str) -> Self {
        let hash = redis::Script::new(source).get_hash().into();
        Self { source, hash }
    }
}

impl RedisConn {
    /// `redis://host:port` standalone, or several comma-separated `redis://…`
    /// URLs for a Cluster (a list with a comma is a Cluster even with one
    /// seed: `redis://host:port,`).
    ///
    /// Connects lazily: a malformed URL fails here (the message names it,
    /// password masked), an unreachable server fails the later calls.
    pub fn connect(urls: &str, options: RedisOptions) -> Result<Self, RedisError> {
        let list: Vec<&str> = urls
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect();
        match list.as_slice() {
            [] => Err(RedisError::Unavailable("no Redis URL given".to_owned())),
            [url] if !urls.contains(',') => Self::standalone(url, options),
            seeds => Self::cluster(seeds, options),
        }
    }

    fn standalone(url: &str, options: RedisOptions) -> Result<Self, RedisError> {
        check_url(url)?;
        let shown = redact(url);
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.command_timeout));
        let manager = deadpool_redis::Manager::new_with_config(url, connection)
            .map_err(|e| RedisError::Unavailable(format!("bad Redis URL {shown}: {e}")))?;
        let pool = deadpool_redis::Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.command_timeout))
            .build()
            .map_err(|e| RedisError::Unavailable(format!("Redis pool for {shown}: {e}")))?;
        Ok(Self {
            breaker: breaker(&options, &shown)?,
            pools: Pools::Standalone(pool),
            options,
            shown: shown.into(),
        })
    }

    fn cluster(seeds: &[&str], options: RedisOptions) -> Result<Self, RedisError> {
        for seed in seeds {
            check_url(seed)?;
        }
        let shown = seeds
            .iter()
            .map(|seed| redact(seed))
            .collect::<Vec<_>>()
            .join(",");
        // deadpool-redis builds the cluster client itself and offers no way
        // to set its timeouts: the pool's and our own per-command timeouts
        // bound every call instead.
        let manager = deadpool_redis::cluster::Manager::new(seeds.to_vec(), false)
            .map_err(|e| RedisError::Unavailable(format!("bad Redis Cluster URLs {shown}: {e}")))?;
        let pool = deadpool_redis::cluster::Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.command_timeout))
            .build()
            .map_err(|e| RedisError::Unavailable(format!("Redis Cluster pool for {shown}: {e}")))?;
        Ok(Self {
            breaker: breaker(&options, &shown)?,
            pools: Pools::Cluster(pool),
            options,
            shown: shown.into(),
        })
    }

    /// True for a Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.pools, Pools::Cluster(_))
    }

    /// The address(es), passwords masked.
    pub fn describe(&self) -> &str {
        &self.shown
    }

    /// The time bound of one command.
    pub fn command_timeout(&self) -> Duration {
        self.options.command_timeout
    }

    /// An error naming `what` and the server.
    pub fn unavailable(&self, what: &str, error: impl std::fmt::Display) -> RedisError {
        RedisError::Unavailable(format!("{what} on {}: {error}", self.shown))
    }

    /// `WAIT` until `replicas` replicas have this connection's writes, for
    /// at most `timeout_ms`; `Ok` at once when none are asked for. On a
    /// Cluster the client sends it to every master and answers the fewest
    /// replicas. Fewer acknowledgements than asked for is `Unavailable`: the
    /// write may be on the master alone, and a failover would lose it.
    pub async fn replicated(
        &self,
        conn: &mut Handle,
        replicas: u32,
        timeout_ms: u64,
    ) -> Result<(), RedisError> {
        if replicas == 0 {
            return Ok(());
        }
        let mut cmd = redis::cmd("WAIT");
        cmd.arg(replicas).arg(timeout_ms);
        let what = "WAIT for replicas";
        let bound = self.options.command_timeout + Duration::from_millis(timeout_ms);
        let acked: i64 = self.bounded(what, bound, cmd.query_async(conn)).await?;
        if acked < i64::from(replicas) {
            return Err(self.unavailable(
                what,
                format!("{acked} of {replicas} replicas acknowledged within {timeout_ms} ms"),
            ));
        }
        Ok(())
    }

    /// Runs `fut` for at most `limit`, through the circuit breaker: while it
    /// is open, fails at once. Timeouts, lost connections and pool errors
    /// count against Redis; an error Redis answered with (a script error, a
    /// wrong type) does not.
    pub async fn bounded<T, E: std::fmt::Display + 'static>(
        &self,
        what: &str,
        limit: Duration,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, RedisError> {
        // Every call to Redis passes here (connection checkouts, commands,
        // scripts, pipelines): one client span each.
        let span = tracing::info_span!(
            "redis",
            otel.name = what,
            otel.kind = "client",
            db.system = "redis",
            db.operation = what,
            server.address = %self.shown,
        );
        let run = async {
            match tokio::time::timeout(limit, fut).await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) => Err(CallError {
                    failure: redis_failure(&e),
                    message: e.to_string(),
                }),
                Err(_) => Err(CallError {
                    failure: true,
                    message: format!("no answer within {} ms", limit.as_millis()),
                }),
            }
        };
        match self.breaker.run(run).instrument(span).await {
            Ok(value) => Ok(value),
            Err(Guarded::Failed(e)) => Err(self.unavailable(what, e.message)),
            Err(Guarded::Open(open)) => Err(self.unavailable(what, open)),
        }
    }

    /// The state of this connection's circuit breaker.
    pub fn breaker_state(&self) -> livemesh_mesh::breaker::BreakerState {
        self.breaker.breaker().state()
    }

    /// Takes a connection from the pool (bounded by the pool's timeouts, and
    /// by ours around them: a connection check on a hung Cluster node must
    /// not hang us either).
    pub async fn checkout(&self) -> Result<Connection, RedisError> {
        let limit = self.options.connect_timeout + self.options.command_timeout;
        match &self.pools {
            Pools::Standalone(pool) => {
                let conn = self.bounded("connect", limit, pool.get()).await?;
                let handle = Handle::Standalone((*conn).clone());
                Ok(Connection {
                    _lease: Lease::Standalone(conn),
                    handle,
                })
            }
            Pools::Cluster(pool) => {
                let conn = self.bounded("connect", limit, pool.get()).await?;
                let handle = Handle::Cluster((*conn).clone());
                Ok(Connection {
                    _lease: Lease::Cluster(conn),
                    handle,
                })
            }
        }
    }

    /// One command on a pooled connection, bounded.
    pub async fn query<T: FromRedisValue>(&self, what: &str, cmd: &Cmd) -> Result<T, RedisError> {
        let conn = self.checkout().await?;
        let mut handle = conn.handle();
        self.bounded(
            what,
            self.options.command_timeout,
            cmd.query_async(&mut handle),
        )
        .await
    }

    /// How many rooms have a key under `prefix` (keys shaped
    /// `<prefix><room id>}…`, the room's hash tag closing after its id): a
    /// `KEYS` over the prefix, which on a Cluster goes to every master and
    /// walks the whole keyspace, so for tests and diagnostics only.
    pub async fn rooms_under(&self, prefix: &str) -> Result<usize, RedisError> {
        let mut cmd = redis::cmd("KEYS");
        cmd.arg(format!("{}*", glob_escape(prefix)));
        let keys: Vec<String> = self.query("keys of every room", &cmd).await?;
        let rooms: std::collections::HashSet<&str> = keys
            .iter()
            .filter_map(|key| key.strip_prefix(prefix)?.split('}').next())
            .collect();
        Ok(rooms.len())
    }

    /// Runs `script` with `args` appended by `fill` (after the key count and
    /// the keys) on `conn`, bounded: `EVALSHA`, then `EVAL` where the node
    /// lacks the script.
    pub async fn eval<T: FromRedisValue>(
        &self,
        what: &str,
        conn: &mut Handle,
        script: &Script,
        keys: &[String],
        fill: impl Fn(&mut Cmd),
    ) -> Result<T, RedisError> {
        let call = |verb: &str, body: &str| {
            let mut cmd = redis::cmd(verb);
            cmd.arg(body).arg(keys.len()).arg(keys);
            fill(&mut cmd);
            cmd
        };
        let run = async {
            match call("EVALSHA", &script.hash).query_async::<T>(conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    call("EVAL", script.source).query_async::<T>(conn).await
                }
                other => other,
            }
        };
        self.bounded(what, self.options.command_timeout, run).await
    }

    /// Checks that Redis answers (a readiness probe).
    pub async fn ping(&self) -> Result<(), RedisError> {
        let _pong: String = self.query("ping", &redis::cmd("PING")).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_are_escaped() {
        assert_eq!(glob_escape("a|{room:1}|x"), "a|{room:1}|x");
        assert_eq!(glob_escape("p*?[x]\\"), "p\\*\\?\\[x\\]\\\\");
    }

    #[test]
    fn malformed_urls_are_config_errors() {
        let err = check_url("http://user:secret@host:1").err();
        let Some(RedisError::Unavailable(message)) = err else {
            panic!("expected a configuration error, got {err:?}");
        };
        assert!(!message.contains("secret"), "{message}");
        assert!(check_url("redis://127.0.0.1:6379").is_ok());
    }

    #[test]
    fn a_comma_makes_a_cluster() {
        let options = RedisOptions::default();
        let one = RedisConn::connect("redis://127.0.0.1:1", options.clone()).ok();
        assert!(one.is_some_and(|c| !c.is_cluster()));
        let seeds = RedisConn::connect("redis://127.0.0.1:1,", options.clone()).ok();
        assert!(seeds.is_some_and(|c| c.is_cluster()));
        assert!(RedisConn::connect(" , ", options).is_err());
    }
}
