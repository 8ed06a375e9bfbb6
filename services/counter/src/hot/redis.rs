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

/// A Redis hot store (standalone or Cluster); clones share the pool.
#[derive(Clone)]
pub struct RedisStore {
    conn: RedisConn,
    config: HotConfig,
    script: Script,
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

    pub(super) async fn flush(&self, flushes: &[RoomFlush]) -> Vec<(u64, Result<(), HotError>)> {
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
        join_all(applies).await
    }

    async fn apply(&self, conn: &mut Handle, flush: &RoomFlush) -> Result<(), HotError> {
        warn_if_clamped(flush);
        let room = flush.room_id;
        let shard = self.config.shard_of(&flush.flush_id);
        let keys = [
            keys::flush(&self.config.phase, room, &flush.flush_id),
            keys::total(&self.config.phase, room, shard),
            keys::lovers(&self.config.phase, room),
        ];
        let fill = |cmd: &mut redis::Cmd| {
            cmd.arg(self.config.flush_id_ttl_secs)
                .arg(clamped(flush.total_delta))
                .arg(self.config.top_length);
            for &(viewer, loves) in &flush.viewers {
                // A viewer with no loves is not a lover (and ZINCRBY 0 would add one).
                if loves > 0 {
                    cmd.arg(viewer).arg(clamped(loves));
                }
            }
        };
        let what = format!("flush {} of room {room}", flush.flush_id);
        let applied: i64 = self
            .conn
            .eval(&what, conn, &self.script, &keys, fill)
            .await?;
        if applied == 0 {
            tracing::debug!(room, flush_id = %flush.flush_id, "replayed flush ignored");
        }
        Ok(())
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

    pub(super) async fn stored_rooms(&self) -> Result<usize, HotError> {
        let prefix = format!("counter|{}|{{room:", self.config.phase);
        let mut cmd = redis::cmd("KEYS");
        cmd.arg(format!("{}*", livemesh_redis::glob_escape(&prefix)));
        // On a Cluster, KEYS goes to every master and the replies are joined.
        let keys: Vec<String> = self.conn.query("keys of every room", &cmd).await?;
        let rooms: std::collections::HashSet<&str> = keys
            .iter()
            .filter_map(|key| key.strip_prefix(&prefix)?.split('}').next())
            .collect();
        Ok(rooms.len())
    }

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
