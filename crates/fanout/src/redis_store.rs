//! The fan-out store on Redis (standalone or Cluster). Each step that
//! touches several keys of a room is one Lua script: Redis runs it without
//! interleaving, and the room's keys share one hash tag, hence one slot.

use futures::future::join_all;
use livemesh_redis::{RedisConn, RedisOptions, Script};
use redis::Value;

use crate::{Append, Appended, FanoutSettings, Head, History, Position, Renewed, Slot, StoreError};

/// Appends an ordered event, or sets a latest value; returns the live nodes.
///
/// KEYS: 1 seq, 2 epoch, 3 history, 4 ended, 5 nodes, 6 idempotency key,
/// 7 latest. ARGV: 1 payload, 2 now (ms), 3 history length, 4 slot ('' for
/// ordered, else the latest-value kind), 5 '1' if KEYS[6] is a real key, 6
/// its TTL (s), 7 '1' if the event ends the room, 8 room TTL (s), 9 ended
/// room TTL (s).
/// Returns {0 new | 1 duplicate | 2 ended, epoch, offset, nodes...}.
///
/// A room without an epoch gets `now` as its epoch and starts its offsets
/// over (its other keys are dropped), so offsets never repeat within an epoch.
/// History members are `<offset>:<payload>`, unique even for equal payloads.
const APPEND: &str = r"
local now = ARGV[2]
if ARGV[5] == '1' then
  local seen = redis.call('GET', KEYS[6])
  if seen then
    local epoch, offset = string.match(seen, '^(%d+):(%d+)$')
    return {1, epoch, offset}
  end
end
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = now
  redis.call('SET', KEYS[2], epoch)
  redis.call('DEL', KEYS[1], KEYS[3], KEYS[4], KEYS[7])
elseif redis.call('EXISTS', KEYS[4]) == 1 then
  return {2, epoch, redis.call('GET', KEYS[1]) or '0'}
end
local offset
if ARGV[4] == '' then
  offset = redis.call('INCR', KEYS[1])
  redis.call('ZADD', KEYS[3], offset, offset .. ':' .. ARGV[1])
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(tonumber(ARGV[3]) + 1))
else
  offset = tonumber(redis.call('GET', KEYS[1]) or '0')
  redis.call('HSET', KEYS[7], ARGV[4], offset .. ':' .. ARGV[1])
end
local ttl = ARGV[8]
if ARGV[7] == '1' then
  redis.call('SET', KEYS[4], '1')
  ttl = ARGV[9]
end
for _, key in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[7]}) do
  redis.call('EXPIRE', key, ttl)
end
if ARGV[5] == '1' then
  redis.call('SET', KEYS[6], epoch .. ':' .. offset, 'EX', ARGV[6])
end
redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', now)
local reply = {0, epoch, offset}
for _, node in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  reply[#reply + 1] = node
end
return reply
";

/// Registers a node for a room and returns the room's head.
///
/// KEYS: 1 nodes, 2 counts, 3 seq, 4 epoch, 5 latest, 6 ended, 7 history.
/// ARGV: 1 node, 2 lease expiry (ms), 3 viewers, 4 now (ms), 5 room TTL (s).
/// Returns {epoch, offset, ended (0/1), latest values...}.
const JOIN: &str = r"
local epoch = redis.call('GET', KEYS[4])
if not epoch then
  epoch = ARGV[4]
  redis.call('SET', KEYS[4], epoch, 'EX', ARGV[5])
  redis.call('DEL', KEYS[3], KEYS[5], KEYS[6], KEYS[7])
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
local reply = {epoch, redis.call('GET', KEYS[3]) or '0', redis.call('EXISTS', KEYS[6])}
for _, value in ipairs(redis.call('HVALS', KEYS[5])) do
  reply[#reply + 1] = value
end
return reply
";

/// Renews a node's registration and count; sums the live nodes' counts.
///
/// KEYS: 1 nodes, 2 counts, 3 seq, 4 epoch. ARGV: 1 node, 2 lease expiry
/// (ms), 3 viewers, 4 now (ms), 5 room TTL (s).
/// Returns {viewers, 1 if this node is the reporter, epoch, offset}. Counts
/// of nodes whose lease ended are dropped.
const RENEW: &str = r"
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
local live = {}
local first = nil
for _, node in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  live[node] = true
  if first == nil or node < first then first = node end
end
local counts = redis.call('HGETALL', KEYS[2])
local total = 0
for i = 1, #counts, 2 do
  local node = counts[i]
  if live[node] then
    total = total + tonumber(counts[i + 1])
  else
    redis.call('HDEL', KEYS[2], node)
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
local reporter = 0
if first == ARGV[1] then reporter = 1 end
return {total, reporter, redis.call('GET', KEYS[4]) or '0', redis.call('GET', KEYS[3]) or '0'}
";

/// The names of every key a room may have; they share the room's hash tag,
/// so one `EXISTS` sees them all, on a Cluster too.
const ROOM_KEYS: [&str; 8] = [
    "nodes", "counts", "seq", "epoch", "history", "ended", "idem", "latest",
];

/// The fan-out store on Redis; clones share the pool.
#[derive(Clone)]
pub struct RedisFanout {
    conn: RedisConn,
    settings: FanoutSettings,
    append: Script,
    join: Script,
    renew: Script,
}

impl RedisFanout {
    pub fn connect(
        urls: &str,
        settings: FanoutSettings,
        options: RedisOptions,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            conn: RedisConn::connect(urls, options)?,
            settings,
            append: Script::new(APPEND),
            join: Script::new(JOIN),
            renew: Script::new(RENEW),
        })
    }

    pub fn describe(&self) -> &str {
        self.conn.describe()
    }

    fn key(&self, room_id: u64, name: &str) -> String {
        format!("fanout|{}|{{room:{room_id}}}|{name}", self.settings.phase)
    }

    /// KEYS of the join and renew scripts: nodes, counts, seq, epoch, then `extra`.
    fn lease_keys(&self, room_id: u64, extra: &[&str]) -> Vec<String> {
        ["nodes", "counts", "seq", "epoch"]
            .iter()
            .chain(extra)
            .map(|name| self.key(room_id, name))
            .collect()
    }

    /// ARGV of the join and renew scripts: node, lease expiry, viewers, now, room TTL.
    fn lease_args(
        &self,
        cmd: &mut redis::Cmd,
        node: &str,
        viewers: u64,
        lease_ms: u64,
        now_ms: i64,
    ) {
        cmd.arg(node)
            .arg(expiry(now_ms, lease_ms))
            .arg(viewers)
            .arg(now_ms)
            .arg(self.settings.room_ttl_secs);
    }

    pub async fn append(&self, append: &Append<'_>) -> Result<Appended, StoreError> {
        let room = append.room_id;
        let keys = [
            self.key(room, "seq"),
            self.key(room, "epoch"),
            self.key(room, "history"),
            self.key(room, "ended"),
            self.key(room, "nodes"),
            match append.idempotency_key {
                Some(key) => self.key(room, &format!("idem|{key}")),
                None => self.key(room, "idem"),
            },
            self.key(room, "latest"),
        ];
        let slot = match append.slot {
            Slot::Ordered => "",
            Slot::Latest(kind) => kind,
        };
        let fill = |cmd: &mut redis::Cmd| {
            cmd.arg(append.payload)
                .arg(append.now_ms)
                .arg(self.settings.history_len)
                .arg(slot)
                .arg(if append.idempotency_key.is_some() {
                    "1"
                } else {
                    "0"
                })
                .arg(self.settings.idempotency_ttl_secs)
                .arg(if append.ends_room { "1" } else { "0" })
                .arg(self.settings.room_ttl_secs)
                .arg(self.settings.ended_ttl_secs);
        };
        let what = format!("publish to room {room}");
        let conn = self.conn.checkout().await?;
        let mut handle = conn.handle();
        let reply: Vec<Value> = self
            .conn
            .eval(&what, &mut handle, &self.append, &keys, fill)
            .await?;
        let mut reply = reply.into_iter();
        let status = self.number(&what, reply.next())?;
        let epoch = self.number(&what, reply.next())?;
        let offset = self.number(&what, reply.next())?;
        if status == 0 {
            // Acknowledged only once on the replicas asked for: a failover
            // must not lose it.
            let (replicas, timeout_ms) =
                (self.settings.wait_replicas, self.settings.wait_timeout_ms);
            self.conn
                .replicated(&mut handle, replicas, timeout_ms)
                .await?;
        }
        Ok(match status {
            0 => Appended::New {
                epoch,
                offset,
                nodes: reply
                    .map(|node| self.text(&what, node))
                    .collect::<Result<_, _>>()?,
            },
            1 => Appended::Duplicate { epoch, offset },
            _ => Appended::Ended { epoch, offset },
        })
    }

    pub async fn join(
        &self,
        room_id: u64,
        node: &str,
        viewers: u64,
        lease_ms: u64,
        now_ms: i64,
    ) -> Result<Head, StoreError> {
        let keys = self.lease_keys(room_id, &["latest", "ended", "history"]);
        let fill = |cmd: &mut redis::Cmd| self.lease_args(cmd, node, viewers, lease_ms, now_ms);
        let what = format!("join of room {room_id}");
        let conn = self.conn.checkout().await?;
        let reply: Vec<Value> = self
            .conn
            .eval(&what, &mut conn.handle(), &self.join, &keys, fill)
            .await?;
        let mut reply = reply.into_iter();
        let epoch = self.number(&what, reply.next())?;
        let offset = self.number(&what, reply.next())?;
        let ended = self.number(&what, reply.next())? == 1;
        let latest = reply
            .map(|value| self.bytes(&what, value).and_then(|b| self.split(&what, b)))
            .collect::<Result<_, _>>()?;
        Ok(Head {
            epoch,
            offset,
            ended,
            latest,
        })
    }

    pub async fn renew(
        &self,
        node: &str,
        rooms: &[(u64, u64)],
        lease_ms: u64,
        now_ms: i64,
    ) -> Vec<Result<Renewed, StoreError>> {
        let conn = match self.conn.checkout().await {
            Ok(conn) => conn,
            Err(e) => return rooms.iter().map(|_| Err(e.clone())).collect(),
        };
        // One script per room, concurrently over the one leased connection:
        // a Cluster spreads rooms over slots, which one pipeline cannot span.
        let calls = rooms.iter().map(|&(room_id, viewers)| {
            let mut handle = conn.handle();
            async move {
                let keys = self.lease_keys(room_id, &[]);
                let fill =
                    |cmd: &mut redis::Cmd| self.lease_args(cmd, node, viewers, lease_ms, now_ms);
                let what = format!("renewal of room {room_id}");
                let reply: Vec<Value> = self
                    .conn
                    .eval(&what, &mut handle, &self.renew, &keys, fill)
                    .await?;
                let mut reply = reply.into_iter();
                Ok(Renewed {
                    viewers: self.number(&what, reply.next())?,
                    reporter: self.number(&what, reply.next())? == 1,
                    epoch: self.number(&what, reply.next())?,
                    offset: self.number(&what, reply.next())?,
                })
            }
        });
        join_all(calls).await
    }

    pub async fn leave(&self, room_id: u64, node: &str) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZREM")
            .arg(self.key(room_id, "nodes"))
            .arg(node)
            .ignore()
            .cmd("HDEL")
            .arg(self.key(room_id, "counts"))
            .arg(node)
            .ignore();
        let conn = self.conn.checkout().await?;
        let mut handle = conn.handle();
        self.conn
            .bounded(
                &format!("leave of room {room_id}"),
                self.conn.command_timeout(),
                pipe.query_async::<()>(&mut handle),
            )
            .await
    }

    pub async fn history(
        &self,
        room_id: u64,
        after: u64,
        upto: u64,
    ) -> Result<History, StoreError> {
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("GET")
            .arg(self.key(room_id, "epoch"))
            .cmd("ZRANGEBYSCORE")
            .arg(self.key(room_id, "history"))
            .arg(format!("({after}"))
            .arg(upto);
        let what = format!("history of room {room_id}");
        let conn = self.conn.checkout().await?;
        let mut handle = conn.handle();
        let (epoch, members): (Option<u64>, Vec<Vec<u8>>) = self
            .conn
            .bounded(
                &what,
                self.conn.command_timeout(),
                pipe.query_async(&mut handle),
            )
            .await?;
        Ok(History {
            epoch: epoch.unwrap_or(0),
            entries: members
                .into_iter()
                .map(|member| self.split(&what, member))
                .collect::<Result<_, _>>()?,
        })
    }

    pub async fn heads(&self, rooms: &[u64]) -> Vec<Result<Position, StoreError>> {
        let conn = match self.conn.checkout().await {
            Ok(conn) => conn,
            Err(e) => return rooms.iter().map(|_| Err(e.clone())).collect(),
        };
        // One MGET per room (its two keys share the room's slot),
        // concurrently over the one leased connection.
        let calls = rooms.iter().map(|&room_id| {
            let mut handle = conn.handle();
            async move {
                let mut cmd = redis::cmd("MGET");
                cmd.arg(self.key(room_id, "epoch"))
                    .arg(self.key(room_id, "seq"));
                let (epoch, offset): (Option<u64>, Option<u64>) = self
                    .conn
                    .bounded(
                        &format!("head of room {room_id}"),
                        self.conn.command_timeout(),
                        cmd.query_async(&mut handle),
                    )
                    .await?;
                Ok(Position {
                    epoch: epoch.unwrap_or(0),
                    offset: offset.unwrap_or(0),
                })
            }
        });
        join_all(calls).await
    }

    pub async fn nodes(&self, room_id: u64, now_ms: i64) -> Result<Vec<String>, StoreError> {
        let mut cmd = redis::cmd("ZRANGEBYSCORE");
        cmd.arg(self.key(room_id, "nodes"))
            .arg(format!("({now_ms}"))
            .arg("+inf");
        self.conn
            .query(&format!("nodes of room {room_id}"), &cmd)
            .await
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        self.conn.ping().await
    }

    pub async fn holds(&self, room_id: u64) -> Result<bool, StoreError> {
        let mut cmd = redis::cmd("EXISTS");
        for name in ROOM_KEYS {
            cmd.arg(self.key(room_id, name));
        }
        let found: u64 = self
            .conn
            .query(&format!("keys of room {room_id}"), &cmd)
            .await?;
        Ok(found > 0)
    }

    pub async fn stored_rooms(&self) -> Result<usize, StoreError> {
        let prefix = format!("fanout|{}|{{room:", self.settings.phase);
        self.conn.rooms_under(&prefix).await
    }

    fn number(&self, what: &str, value: Option<Value>) -> Result<u64, StoreError> {
        let value = value.ok_or_else(|| self.conn.unavailable(what, "short reply"))?;
        redis::from_redis_value(value).map_err(|e| self.conn.unavailable(what, e))
    }

    fn text(&self, what: &str, value: Value) -> Result<String, StoreError> {
        redis::from_redis_value(value).map_err(|e| self.conn.unavailable(what, e))
    }

    fn bytes(&self, what: &str, value: Value) -> Result<Vec<u8>, StoreError> {
        redis::from_redis_value(value).map_err(|e| self.conn.unavailable(what, e))
    }

    /// Splits `<offset>:<payload>`.
    fn split(&self, what: &str, member: Vec<u8>) -> Result<(u64, Vec<u8>), StoreError> {
        let colon = member.iter().position(|&b| b == b':').ok_or_else(|| {
            self.conn
                .unavailable(what, "a history entry without offset")
        })?;
        let offset = std::str::from_utf8(&member[..colon])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                self.conn
                    .unavailable(what, "a history entry with a bad offset")
            })?;
        Ok((offset, member[colon + 1..].to_vec()))
    }
}

/// `now + lease`, in ms.
fn expiry(now_ms: i64, lease_ms: u64) -> i64 {
    now_ms.saturating_add(i64::try_from(lease_ms).unwrap_or(i64::MAX))
}
