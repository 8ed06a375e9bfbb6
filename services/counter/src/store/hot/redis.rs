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

use futures::future::join_all;
use livemesh_redis::{Handle, RedisConn, RedisOptions, Script};
use redis::Value;

use std::time::Duration;

use super::{Applied, HotConfig, HotError, RoomFlush, clamped, keys, warn_if_clamped};

/// Applies one flush of one room.
///
/// KEYS: 1 the flush marker, 2 the chosen total shard, 3 the ranking, 4 the
/// room's closed mark, then one batch marker per batch.
/// ARGV: 1 flush marker TTL (s), 2 total delta, 3 ranking length, 4 batch
/// marker TTL (s), 5 the number of batches n, then per batch its viewer id
/// and loves, then pairs of viewer id and loves (the flush's counts).
/// Returns `{1, duplicate batch indexes…}` when applied, `{0}` when the
/// flush marker already existed (a replay), `{-1, counted batch indexes…}`
/// when the room is closed (nothing changed). Indexes are 1-based.
///
/// The flush marker is the first write: if Redis refuses it (e.g. out of
/// memory) nothing was changed. A batch whose marker exists was counted
/// before (by any replica): its loves are left out of the total and of its
/// viewer's count. Counts are clamped to 2^53 before the call (so `INCRBY`
/// cannot overflow on one flush and scores stay exact) and passed as
/// strings; the subtraction of duplicates works on doubles, exact below 2^53.
const FLUSH_SCRIPT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0}
end
local n = tonumber(ARGV[5])
if redis.call('EXISTS', KEYS[4]) == 1 then
  local counted = {-1}
  for i = 1, n do
    if redis.call('EXISTS', KEYS[4 + i]) == 1 then
      counted[#counted + 1] = i
    end
  end
  return counted
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
local result = {1}
local total = ARGV[2]
local minus = {}
for i = 1, n do
  local viewer = ARGV[4 + 2 * i]
  local loves = ARGV[5 + 2 * i]
  if not redis.call('SET', KEYS[4 + i], loves, 'NX', 'EX', ARGV[4]) then
    result[#result + 1] = i
    total = string.format('%.0f', tonumber(total) - tonumber(loves))
    minus[viewer] = (minus[viewer] or 0) + tonumber(loves)
  end
end
if total ~= '0' then
  redis.call('INCRBY', KEYS[2], total)
end
local first = 6 + 2 * n
if #ARGV >= first then
  for i = first, #ARGV, 2 do
    local loves = ARGV[i + 1]
    if minus[ARGV[i]] then
      loves = string.format('%.0f', tonumber(loves) - minus[ARGV[i]])
    end
    if loves ~= '0' then
      redis.call('ZINCRBY', KEYS[3], loves, ARGV[i])
    end
  end
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[3]) + 1))
end
return result
";

/// Closes a room and takes or renews the finaliser's lease.
///
/// KEYS: 1 the closed mark, 2 the lease. ARGV: 1 closed TTL (s), 2 the
/// owner, 3 the lease (ms). Returns 1 if the owner holds the lease.
const CLOSE_SCRIPT: &str = r"
redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1])
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[2] then
  return 0
end
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
";

/// A Redis hot store (standalone or Cluster); clones share the pool.
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConn,
    config: HotConfig,
    script: Script,
    close_script: Script,
}

impl RedisStore {
    /// A store on `urls` (the project's URL rule, see [`RedisConn::connect`]); connects lazily.
    pub(super) fn connect(
        urls: &str,
        config: HotConfig,
        options: RedisOptions,
    ) -> Result<Self, HotError> {
        Ok(Self {
            conn: RedisConn::connect(urls, options)?,
            config: config.normalized(),
            script: Script::new(FLUSH_SCRIPT),
            close_script: Script::new(CLOSE_SCRIPT),
        })
    }

    /// True for a Cluster.
    pub fn is_cluster(&self) -> bool {
        self.conn.is_cluster()
    }

    /// The store's address(es), passwords masked.
    pub fn describe(&self) -> &str {
        self.conn.describe()
    }

    pub(super) async fn flush(
        &self,
        flushes: &[RoomFlush],
    ) -> Vec<(u64, Result<Applied, HotError>)> {
        if flushes.is_empty() {
            return Vec::new();
        }
        let lease = match self.conn.checkout().await {
            Ok(connection) => connection,
            Err(e) => {
                return flushes
                    .iter()
                    .map(|flush| (flush.room_id, Err(e.clone())))
                    .collect();
            }
        };
        // `lease` keeps the pooled connection checked out while its clones work.
        let applies = flushes.iter().map(|flush| {
            let mut conn = lease.handle();
            async move { (flush.room_id, self.apply(&mut conn, flush).await) }
        });
        let mut results = join_all(applies).await;
        let written = results
            .iter()
            .any(|(_, r)| matches!(r, Ok(Applied::Counted { .. } | Applied::Replayed)));
        if written && let Err(e) = self.replicated(&mut lease.handle()).await {
            // Not known to be on a replica: kept and retried (the flush id
            // makes the retry count once).
            for (_, result) in &mut results {
                if matches!(result, Ok(Applied::Counted { .. } | Applied::Replayed)) {
                    *result = Err(e.clone());
                }
            }
        }
        results
    }

    /// `WAIT` for the configured replicas, after this connection's writes.
    async fn replicated(&self, conn: &mut Handle) -> Result<(), HotError> {
        let (replicas, timeout_ms) = (self.config.wait_replicas, self.config.wait_timeout_ms);
        self.conn.replicated(conn, replicas, timeout_ms).await
    }

    async fn apply(&self, conn: &mut Handle, flush: &RoomFlush) -> Result<Applied, HotError> {
        warn_if_clamped(flush);
        let room = flush.room_id;
        let phase = &self.config.phase;
        let shard = self.config.shard_of(&flush.flush_id);
        let mut keys = vec![
            keys::flush(phase, room, &flush.flush_id),
            keys::total(phase, room, shard),
            keys::lovers(phase, room),
            keys::closed(phase, room),
        ];
        keys.extend(
            flush
                .batches
                .iter()
                .map(|b| keys::batch(phase, room, b.viewer_id, &b.batch_id)),
        );
        let fill = |cmd: &mut redis::Cmd| {
            cmd.arg(self.config.flush_id_ttl_secs)
                .arg(clamped(flush.total_delta))
                .arg(self.config.top_length)
                .arg(self.config.batch_ttl_secs)
                .arg(flush.batches.len());
            for batch in &flush.batches {
                cmd.arg(batch.viewer_id).arg(clamped(batch.loves));
            }
            for &(viewer, loves) in &flush.viewers {
                // A viewer with no loves is not a lover (and ZINCRBY 0 would add one).
                if loves > 0 {
                    cmd.arg(viewer).arg(clamped(loves));
                }
            }
        };
        let what = format!("flush {} of room {room}", flush.flush_id);
        let reply: Vec<i64> = self
            .conn
            .eval(&what, conn, &self.script, &keys, fill)
            .await?;
        let indexes = || {
            reply
                .iter()
                .skip(1)
                .filter_map(|i| usize::try_from(*i - 1).ok())
                .collect()
        };
        match reply.first() {
            Some(1) => Ok(Applied::Counted {
                duplicates: indexes(),
            }),
            Some(0) => {
                tracing::debug!(room, flush_id = %flush.flush_id, "replayed flush ignored");
                Ok(Applied::Replayed)
            }
            Some(-1) => Ok(Applied::Closed { counted: indexes() }),
            _ => Err(self
                .conn
                .unavailable(&what, format!("unexpected reply {reply:?}"))),
        }
    }

    pub(super) async fn close(
        &self,
        room_id: u64,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, HotError> {
        let phase = &self.config.phase;
        let keys = [
            keys::closed(phase, room_id),
            keys::finaliser(phase, room_id),
        ];
        let what = format!("close of room {room_id}");
        let connection = self.conn.checkout().await?;
        let mut handle = connection.handle();
        let owned: i64 = self
            .conn
            .eval(&what, &mut handle, &self.close_script, &keys, |cmd| {
                cmd.arg(self.config.closed_ttl_secs)
                    .arg(owner)
                    .arg(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX).max(1));
            })
            .await?;
        // The closed mark must outlive a failover, or a late flush could
        // count into keys nobody reads any more.
        self.replicated(&mut handle).await?;
        Ok(owned == 1)
    }

    pub(super) async fn total(&self, room_id: u64) -> Result<u64, HotError> {
        // All shards share the room's slot: one MGET, even on a Cluster.
        let shards: Vec<String> = (0..self.config.total_shards)
            .map(|shard| keys::total(&self.config.phase, room_id, shard))
            .collect();
        let mut cmd = redis::cmd("MGET");
        cmd.arg(&shards);
        let values: Vec<Option<u64>> = self
            .conn
            .query(&format!("total of room {room_id}"), &cmd)
            .await?;
        Ok(values.into_iter().flatten().fold(0u64, u64::saturating_add))
    }

    pub(super) async fn top(&self, room_id: u64, limit: u32) -> Result<Vec<(u64, u64)>, HotError> {
        if limit == 0 {
            // ZREVRANGE 0 -1 would be the whole ranking.
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("ZREVRANGE");
        cmd.arg(keys::lovers(&self.config.phase, room_id))
            .arg(0)
            .arg(i64::from(limit) - 1)
            .arg("WITHSCORES");
        let what = format!("ranking of room {room_id}");
        let reply: Value = self.conn.query(&what, &cmd).await?;
        scored(reply).map_err(|e| self.conn.unavailable(&what, e))
    }

    pub(super) async fn delete_room(&self, room_id: u64) -> Result<(), HotError> {
        // One DEL (one slot); flush markers stay until they expire.
        let mut cmd = redis::cmd("DEL");
        for shard in 0..self.config.total_shards {
            cmd.arg(keys::total(&self.config.phase, room_id, shard));
        }
        cmd.arg(keys::lovers(&self.config.phase, room_id));
        let _deleted: i64 = self
            .conn
            .query(&format!("delete of room {room_id}"), &cmd)
            .await?;
        Ok(())
    }

    #[cfg(any(test, feature = "testing"))]
    pub(super) async fn stored_rooms(&self) -> Result<usize, HotError> {
        let prefix = format!("counter|{}|{{room:", self.config.phase);
        self.conn.rooms_under(&prefix).await
    }

    #[cfg(any(test, feature = "testing"))]
    pub(super) async fn ping(&self) -> Result<(), HotError> {
        self.conn.ping().await
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
        let viewer: u64 = redis::from_redis_value(member)
            .map_err(|e| format!("a ranking member is not a viewer id: {e}"))?;
        let score: f64 = redis::from_redis_value(score)
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
}
