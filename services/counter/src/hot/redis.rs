//! The hot store on Redis, standalone or Cluster, through deadpool-redis.
//!
//! A flush is one Lua script per room ([`FLUSH_SCRIPT`]): Redis runs a script
//! without interleaving other commands, so the marker, the total, the ranking
//! and the trim change together; the script starts with `SET <marker> 1 NX EX
//! ttl` and stops when the marker exists, so a replayed flush id is a no-op.
//! All of a room's keys share the `{room:<id>}` hash tag, hence one Cluster
//! slot, which a script's keys must. Different rooms live in different slots,
//! and the Cluster client rejects a pipeline spanning slots, so a multi-room
//! flush sends one script call per room, concurrently, over one multiplexed
//! connection taken from the pool.
//!
//! Every call is bounded in time ([`RedisOptions`]) so that a dead or hung
//! Redis yields [`HotError::Unavailable`] instead of a hang: the pool bounds
//! waiting for and creating connections, the standalone connection bounds
//! responses, and every command is additionally wrapped in a tokio timeout
//! (the Cluster client has no response timeout by default and retries with
//! back-off for a long time).

use std::future::Future;
use std::time::Duration;

use ::redis::aio::{ConnectionLike, MultiplexedConnection};
use ::redis::cluster_async::ClusterConnection;
use ::redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisFuture,
    ServerErrorKind, Value,
};
use deadpool_redis::Runtime;
use futures::future::join_all;
use livemesh_mesh::sql::redact;

use super::{HotConfig, HotError, RoomFlush, clamped, keys, warn_if_clamped};

/// Applies one flush of one room.
///
/// KEYS: 1 the flush marker, 2 the chosen total shard, 3 the ranking.
/// ARGV: 1 marker TTL (s), 2 total delta, 3 ranking length, then pairs of
/// viewer id and loves (loves > 0).
/// Returns 1 when applied, 0 when the marker already existed (a replay).
///
/// The marker is the first write: if Redis refuses it (e.g. out of memory)
/// nothing was changed. Counts are clamped to 2^53 before the call (so
/// `INCRBY` cannot overflow on one flush and scores stay exact) and passed as
/// strings, so Lua's doubles never round them.
const FLUSH_SCRIPT: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
if ARGV[2] ~= '0' then
  redis.call('INCRBY', KEYS[2], ARGV[2])
end
if #ARGV > 3 then
  for i = 4, #ARGV, 2 do
    redis.call('ZINCRBY', KEYS[3], ARGV[i + 1], ARGV[i])
  end
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[3]) + 1))
end
return 1
";

/// Pool size and time bounds of a Redis hot store.
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
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            pool_size: 16,
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_secs(1),
        }
    }
}

/// A Redis hot store (standalone or Cluster); clones share the pool.
#[derive(Clone)]
pub struct RedisStore {
    pools: Pools,
    config: HotConfig,
    options: RedisOptions,
    /// The URLs with passwords masked, for messages.
    shown: std::sync::Arc<str>,
    /// The flush script (for its SHA1).
    script: std::sync::Arc<::redis::Script>,
}

#[derive(Clone)]
enum Pools {
    Standalone(deadpool_redis::Pool),
    Cluster(deadpool_redis::cluster::Pool),
}

/// A connection taken from the pool; it goes back when dropped. Only held,
/// never read: the work goes through a [`Handle`] cloned from it.
#[expect(dead_code, reason = "held to keep the pooled connection checked out")]
enum Lease {
    Standalone(deadpool_redis::Connection),
    Cluster(deadpool_redis::cluster::Connection),
}

/// A clone of the leased multiplexed connection: clones send over the same
/// socket(s), so one lease serves many concurrent commands.
#[derive(Clone)]
enum Handle {
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

/// Parses `url` without connecting; the error names the URL, password masked.
fn check_url(url: &str) -> Result<(), HotError> {
    url.into_connection_info()
        .map(|_| ())
        .map_err(|e| HotError::Unavailable(format!("bad Redis URL {}: {e}", redact(url))))
}

impl RedisStore {
    /// A store on one standalone Redis; connects lazily.
    pub(super) fn standalone(
        url: &str,
        config: HotConfig,
        options: RedisOptions,
    ) -> Result<Self, HotError> {
        check_url(url)?;
        let shown = redact(url);
        let connection = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(options.connect_timeout))
            .set_response_timeout(Some(options.command_timeout));
        let manager = deadpool_redis::Manager::new_with_config(url, connection)
            .map_err(|e| HotError::Unavailable(format!("bad Redis URL {shown}: {e}")))?;
        let pool = deadpool_redis::Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.command_timeout))
            .build()
            .map_err(|e| HotError::Unavailable(format!("Redis pool for {shown}: {e}")))?;
        Ok(Self::new(Pools::Standalone(pool), config, options, shown))
    }

    /// A store on a Redis Cluster found through `seeds`; connects lazily.
    pub(super) fn cluster(
        seeds: &[&str],
        config: HotConfig,
        options: RedisOptions,
    ) -> Result<Self, HotError> {
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
            .map_err(|e| HotError::Unavailable(format!("bad Redis Cluster URLs {shown}: {e}")))?;
        let pool = deadpool_redis::cluster::Pool::builder(manager)
            .max_size(options.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout))
            .create_timeout(Some(options.connect_timeout))
            .recycle_timeout(Some(options.command_timeout))
            .build()
            .map_err(|e| HotError::Unavailable(format!("Redis Cluster pool for {shown}: {e}")))?;
        Ok(Self::new(Pools::Cluster(pool), config, options, shown))
    }

    fn new(pools: Pools, config: HotConfig, options: RedisOptions, shown: String) -> Self {
        Self {
            pools,
            config: config.normalized(),
            options,
            shown: shown.into(),
            script: std::sync::Arc::new(::redis::Script::new(FLUSH_SCRIPT)),
        }
    }

    /// The store's address(es), passwords masked.
    pub fn describe(&self) -> &str {
        &self.shown
    }

    fn unavailable(&self, what: &str, error: impl std::fmt::Display) -> HotError {
        HotError::Unavailable(format!("{what} on {}: {error}", self.shown))
    }

    /// Runs `fut` for at most `limit`.
    async fn bounded<T, E: std::fmt::Display>(
        &self,
        what: &str,
        limit: Duration,
        fut: impl Future<Output = Result<T, E>>,
    ) -> Result<T, HotError> {
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(self.unavailable(what, e)),
            Err(_) => Err(self.unavailable(
                what,
                format_args!("no answer within {} ms", limit.as_millis()),
            )),
        }
    }

    /// Takes a connection from the pool (bounded by the pool's timeouts, and
    /// by ours around them: a connection check on a hung Cluster node must
    /// not hang us either).
    async fn checkout(&self) -> Result<(Lease, Handle), HotError> {
        let limit = self.options.connect_timeout + self.options.command_timeout;
        match &self.pools {
            Pools::Standalone(pool) => {
                let conn = self.bounded("connect", limit, pool.get()).await?;
                let handle = Handle::Standalone((*conn).clone());
                Ok((Lease::Standalone(conn), handle))
            }
            Pools::Cluster(pool) => {
                let conn = self.bounded("connect", limit, pool.get()).await?;
                let handle = Handle::Cluster((*conn).clone());
                Ok((Lease::Cluster(conn), handle))
            }
        }
    }

    pub(super) async fn flush(&self, flushes: &[RoomFlush]) -> Vec<(u64, Result<(), HotError>)> {
        if flushes.is_empty() {
            return Vec::new();
        }
        let (_lease, handle) = match self.checkout().await {
            Ok(connection) => connection,
            Err(e) => {
                return flushes
                    .iter()
                    .map(|flush| (flush.room_id, Err(e.clone())))
                    .collect();
            }
        };
        // `_lease` keeps the pooled connection checked out while its clones work.
        let applies = flushes.iter().map(|flush| {
            let mut conn = handle.clone();
            async move { (flush.room_id, self.apply(&mut conn, flush).await) }
        });
        join_all(applies).await
    }

    async fn apply(&self, conn: &mut Handle, flush: &RoomFlush) -> Result<(), HotError> {
        warn_if_clamped(flush);
        let room = flush.room_id;
        let shard = self.config.shard_of(&flush.flush_id);
        let call = |verb: &str, script: &str| {
            let mut cmd = ::redis::cmd(verb);
            cmd.arg(script)
                .arg(3)
                .arg(keys::flush(&self.config.phase, room, &flush.flush_id))
                .arg(keys::total(&self.config.phase, room, shard))
                .arg(keys::lovers(&self.config.phase, room))
                .arg(self.config.flush_id_ttl_secs)
                .arg(clamped(flush.total_delta))
                .arg(self.config.top_length);
            for &(viewer, loves) in &flush.viewers {
                // A viewer with no loves is not a lover (and ZINCRBY 0 would add one).
                if loves > 0 {
                    cmd.arg(viewer).arg(clamped(loves));
                }
            }
            cmd
        };
        // EVALSHA, and EVAL (which also caches the script) on the node that
        // lacks it. Not redis-rs's `Script::invoke_async`: it falls back to
        // `SCRIPT LOAD`, which the Cluster client sends to EVERY node, so
        // while one node is down no node could learn the script and no flush
        // would apply, even to healthy slots.
        let run = async {
            let evalsha = call("EVALSHA", self.script.get_hash());
            match evalsha.query_async::<i64>(conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    call("EVAL", FLUSH_SCRIPT).query_async::<i64>(conn).await
                }
                other => other,
            }
        };
        let what = format!("flush {} of room {room}", flush.flush_id);
        let applied = self
            .bounded(&what, self.options.command_timeout, run)
            .await?;
        if applied == 0 {
            tracing::debug!(room, flush_id = %flush.flush_id, "replayed flush ignored");
        }
        Ok(())
    }

    /// One command on a pooled connection, bounded.
    async fn query<T: ::redis::FromRedisValue>(
        &self,
        what: &str,
        cmd: &Cmd,
    ) -> Result<T, HotError> {
        let (_lease, mut conn) = self.checkout().await?;
        self.bounded(
            what,
            self.options.command_timeout,
            cmd.query_async(&mut conn),
        )
        .await
    }

    pub(super) async fn total(&self, room_id: u64) -> Result<u64, HotError> {
        // All shards share the room's slot: one MGET, even on a Cluster.
        let shards: Vec<String> = (0..self.config.total_shards)
            .map(|shard| keys::total(&self.config.phase, room_id, shard))
            .collect();
        let mut cmd = ::redis::cmd("MGET");
        cmd.arg(&shards);
        let values: Vec<Option<u64>> = self
            .query(&format!("total of room {room_id}"), &cmd)
            .await?;
        Ok(values.into_iter().flatten().fold(0u64, u64::saturating_add))
    }

    pub(super) async fn top(&self, room_id: u64, limit: u32) -> Result<Vec<(u64, u64)>, HotError> {
        if limit == 0 {
            // ZREVRANGE 0 -1 would be the whole ranking.
            return Ok(Vec::new());
        }
        let mut cmd = ::redis::cmd("ZREVRANGE");
        cmd.arg(keys::lovers(&self.config.phase, room_id))
            .arg(0)
            .arg(i64::from(limit) - 1)
            .arg("WITHSCORES");
        let what = format!("ranking of room {room_id}");
        let reply: Value = self.query(&what, &cmd).await?;
        scored(reply).map_err(|e| self.unavailable(&what, e))
    }

    pub(super) async fn delete_room(&self, room_id: u64) -> Result<(), HotError> {
        // One DEL (one slot); flush markers stay until they expire.
        let mut cmd = ::redis::cmd("DEL");
        for shard in 0..self.config.total_shards {
            cmd.arg(keys::total(&self.config.phase, room_id, shard));
        }
        cmd.arg(keys::lovers(&self.config.phase, room_id));
        let _deleted: i64 = self
            .query(&format!("delete of room {room_id}"), &cmd)
            .await?;
        Ok(())
    }

    pub(super) async fn ping(&self) -> Result<(), HotError> {
        let _pong: String = self.query("ping", &::redis::cmd("PING")).await?;
        Ok(())
    }
}

/// Reads a `WITHSCORES` reply: flat `[member, score, …]` under RESP2, or
/// `[[member, score], …]` under RESP3 (a URL may ask for `protocol=resp3`).
fn scored(reply: Value) -> Result<Vec<(u64, u64)>, String> {
    let Value::Array(items) = reply else {
        return Err(format!("unexpected ranking reply {reply:?}"));
    };
    let mut ranking = Vec::with_capacity(items.len() / 2);
    let mut items = items.into_iter();
    while let Some(item) = items.next() {
        let (member, score) = match item {
            Value::Array(pair) => {
                let mut pair = pair.into_iter();
                match (pair.next(), pair.next(), pair.next()) {
                    (Some(member), Some(score), None) => (member, score),
                    _ => return Err("a ranking entry is not a (member, score) pair".to_owned()),
                }
            }
            member => match items.next() {
                Some(score) => (member, score),
                None => return Err("a ranking member has no score".to_owned()),
            },
        };
        let viewer: u64 = ::redis::from_redis_value(member)
            .map_err(|e| format!("a ranking member is not a viewer id: {e}"))?;
        let score: f64 = ::redis::from_redis_value(score)
            .map_err(|e| format!("a ranking score is not a number: {e}"))?;
        // Scores are sums of clamped counts, integers kept exactly below
        // 2^53; the cast saturates anything else instead of wrapping.
        ranking.push((viewer, score as u64));
    }
    Ok(ranking)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn scored_reads_resp2_and_resp3() {
        let resp2 = Value::Array(vec![bulk("7"), bulk("12"), bulk("3"), bulk("1")]);
        assert_eq!(scored(resp2), Ok(vec![(7, 12), (3, 1)]));
        let resp3 = Value::Array(vec![
            Value::Array(vec![bulk("7"), Value::Double(12.0)]),
            Value::Array(vec![bulk("3"), Value::Double(1.0)]),
        ]);
        assert_eq!(scored(resp3), Ok(vec![(7, 12), (3, 1)]));
        assert!(scored(Value::Array(vec![bulk("7")])).is_err());
        assert!(scored(Value::Nil).is_err());
    }

    #[test]
    fn malformed_urls_are_config_errors() {
        let err = check_url("http://user:secret@host:1").err();
        let Some(HotError::Unavailable(message)) = err else {
            panic!("expected a configuration error, got {err:?}");
        };
        assert!(!message.contains("secret"), "{message}");
        assert!(check_url("redis://127.0.0.1:6379").is_ok());
    }
}
