//! The ownership table in Redis: members' heartbeats, and each shard's owner and epoch.
//!
//! Every key carries the hash tag `{iot}`, so the table lives in one Redis Cluster slot
//! and each script below touches one slot. Keys:
//! - `{iot}:meta`: hash, `format` and `shards`; written by the first node, checked by
//!   every node at every heartbeat (a node with another shard count or format refuses to
//!   run rather than re-shard silently).
//! - `{iot}:members`: set of node ids; `{iot}:member:<id>`: `"<ip:port> active|leaving"`
//!   with an expiry of CLUSTER_LEASE, renewed by every heartbeat. A member is live while
//!   its key exists: expiry is Redis's own clock, so clock drift between nodes does not
//!   matter.
//! - `{iot}:shards`: hash, shard → `"<epoch> <owner id>"`; `{iot}:version`: bumped on
//!   every change of it, so a heartbeat reads the table only when it changed.
//!
//! - `{iot}:logs`, `{iot}:logcur`, `{iot}:pending`: the members' ingest-log streams and
//!   the streams a shard's owner must replay before it admits events (see [`super::logs`]).
//!
//! An owner changes only by compare-and-set: [`Table::claim`] takes shards that have no
//! owner or whose owner's key expired (and records the dead owner's streams as the
//! shard's pending replay); [`Table::pass`] hands shards from this node to a live
//! member. Both raise the epoch; the store's writes of a shard are accepted only
//! under its current epoch and owner (see `store::redis`), so a node that lost a shard
//! while paused or cut off can write nothing of it.

use crate::store::{RedisStore, StoreError};
use bb8_redis::redis::{self, Value};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The table's format; a node refuses a table of another.
pub const FORMAT: &str = "1";
/// Key of the meta hash.
pub const META_KEY: &str = "{iot}:meta";
/// Key of the member set.
pub const MEMBERS_KEY: &str = "{iot}:members";
/// Prefix of a member's heartbeat key.
pub const MEMBER_PREFIX: &str = "{iot}:member:";
/// Key of the shard hash.
pub const SHARDS_KEY: &str = "{iot}:shards";
/// Key of the table's version counter.
pub const VERSION_KEY: &str = "{iot}:version";
/// Key of the hash of ingest-log streams (stream key → node id).
pub const LOGS_KEY: &str = "{iot}:logs";
/// Key of the hash of each node's current stream (node id → stream key).
pub const LOGCUR_KEY: &str = "{iot}:logcur";
/// Key of the hash of pending replays (shard → stream keys, space-separated).
pub const PENDING_KEY: &str = "{iot}:pending";

/// Renews this node's heartbeat (and the registration of its ingest-log stream, ARGV[8]
/// when not empty), checks the meta, and returns the live members, the table's version
/// and (when it differs from ARGV[6]) the table.
/// KEYS: meta, members, my member key, version, shards, logs, logcur.
/// ARGV: my id, my member value, lease ms, shard count, format, known version, prefix,
/// my stream key.
const HEARTBEAT: &str = r#"
local fmt = redis.call('HGET', KEYS[1], 'format')
local n = redis.call('HGET', KEYS[1], 'shards')
if not fmt then
  redis.call('HSET', KEYS[1], 'format', ARGV[5], 'shards', ARGV[4])
elseif fmt ~= ARGV[5] or n ~= ARGV[4] then
  return {0, fmt, n or ''}
end
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
if ARGV[8] ~= '' then
  redis.call('HSET', KEYS[6], ARGV[8], ARGV[1])
  redis.call('HSET', KEYS[7], ARGV[1], ARGV[8])
end
local live = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local v = redis.call('GET', ARGV[7] .. id)
  if v then
    table.insert(live, id)
    table.insert(live, v)
  else
    redis.call('SREM', KEYS[2], id)
  end
end
local version = redis.call('GET', KEYS[4]) or '0'
if version == ARGV[6] then
  return {1, live, version}
end
return {1, live, version, redis.call('HGETALL', KEYS[5])}
"#;

/// Lua functions over the ingest-log keys, shared by the scripts that move shards with
/// their pending replays (KEYS[3]: logs, stream → member; KEYS[4]: pending, shard →
/// streams to replay, space-separated).
pub(super) const PENDING_LUA: &str = r#"
local streams = {}
-- The streams registered by member OWNER.
local function streams_of(owner)
  if streams[owner] == nil then
    local found = {}
    local all = redis.call('HGETALL', KEYS[3])
    for j = 1, #all, 2 do
      if all[j + 1] == owner then table.insert(found, all[j]) end
    end
    streams[owner] = found
  end
  return streams[owner]
end
-- Adds OWNER's streams (none when OWNER is nil) to SHARD's pending replay; answers it.
local function add_pending(shard, owner)
  local pending = redis.call('HGET', KEYS[4], shard) or ''
  if owner == nil then return pending end
  for _, key in ipairs(streams_of(owner)) do
    if not string.find(' ' .. pending .. ' ', ' ' .. key .. ' ', 1, true) then
      if pending == '' then pending = key else pending = pending .. ' ' .. key end
    end
  end
  if pending ~= '' then redis.call('HSET', KEYS[4], shard, pending) end
  return pending
end
"#;

/// Claims shards for ARGV[1]: each pair (shard, floor) is taken when it has no owner or
/// its owner's heartbeat key is gone, with epoch max(current, floor) + 1; the dead
/// owner's ingest-log streams join the shard's pending replay. Answers the triples
/// (shard, epoch, pending streams) taken.
/// KEYS: shards, version, logs, pending. ARGV: my id, member prefix, then pairs.
/// After [`PENDING_LUA`].
const CLAIM: &str = r#"
local out = {}
for i = 3, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local epoch, free, owner = 0, true, nil
  if cur then
    local sp = string.find(cur, ' ', 1, true)
    epoch = tonumber(string.sub(cur, 1, sp - 1))
    owner = string.sub(cur, sp + 1)
    if owner == ARGV[1] or redis.call('EXISTS', ARGV[2] .. owner) == 1 then
      free = false
    end
  end
  if free then
    local floor = tonumber(ARGV[i + 1])
    if floor > epoch then epoch = floor end
    epoch = epoch + 1
    redis.call('HSET', KEYS[1], ARGV[i], epoch .. ' ' .. ARGV[1])
    local pending = add_pending(ARGV[i], owner)
    table.insert(out, ARGV[i])
    table.insert(out, tostring(epoch))
    table.insert(out, pending)
  end
end
if #out > 0 then redis.call('INCR', KEYS[2]) end
return out
"#;

/// Passes shards from ARGV[1] to a live member: each triple (shard, epoch, to) moves when
/// the shard is still (epoch, ARGV[1]) and `to`'s heartbeat key exists; epoch + 1.
/// Answers the shards passed.
/// KEYS: shards, version. ARGV: my id, member prefix, then triples.
const PASS: &str = r#"
local out = {}
for i = 3, #ARGV, 3 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur == ARGV[i + 1] .. ' ' .. ARGV[1]
     and redis.call('EXISTS', ARGV[2] .. ARGV[i + 2]) == 1 then
    redis.call('HSET', KEYS[1], ARGV[i], (tonumber(ARGV[i + 1]) + 1) .. ' ' .. ARGV[i + 2])
    table.insert(out, ARGV[i])
  end
end
if #out > 0 then redis.call('INCR', KEYS[2]) end
return out
"#;

/// Reads the table's version and the table.
const READ: &str = r#"
return {redis.call('GET', KEYS[1]) or '0', redis.call('HGETALL', KEYS[2])}
"#;

/// A live member, as its heartbeat key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its node id (address and incarnation).
    pub id: Arc<str>,
    /// Its internal address.
    pub addr: SocketAddr,
    /// Shutting down: owns nothing new, hands its shards off.
    pub leaving: bool,
}

/// A shard's owner and epoch, as the table says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The owner's node id.
    pub owner: Arc<str>,
    /// Raised by every change of owner.
    pub epoch: u64,
}

/// The table as read: entry per shard.
pub type Entries = Vec<Option<Entry>>;

/// What a heartbeat learnt.
#[derive(Debug, Clone)]
pub struct Beat {
    /// Live members, this node included.
    pub members: Vec<Member>,
    /// The table's version.
    pub version: u64,
    /// The table, when its version changed since the one given.
    pub entries: Option<Entries>,
}

/// Why the table cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    /// Redis did not answer or failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The table was written by nodes with another shard count or format.
    #[error("the cluster table in Redis has format {format} and {shards} shards; this node runs format {FORMAT} with {ours} shards (CLUSTER_SHARDS must be the same on every node; a cluster is never re-sharded silently)")]
    Mismatch {
        /// The stored format.
        format: String,
        /// The stored shard count.
        shards: String,
        /// This node's shard count.
        ours: u32,
    },
    /// An answer of an unexpected shape.
    #[error("unexpected answer from the table script: {0}")]
    Shape(&'static str),
}

/// This node's handle on the table.
#[derive(Clone)]
pub struct Table {
    redis: RedisStore,
    me: Arc<str>,
    shards: u32,
    lease: Duration,
    heartbeat: Arc<redis::Script>,
    claim: Arc<redis::Script>,
    pass: Arc<redis::Script>,
    read: Arc<redis::Script>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("me", &self.me).finish()
    }
}

pub(super) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

pub(super) fn items(v: &Value) -> Option<&[Value]> {
    match v {
        Value::Array(a) => Some(a),
        _ => None,
    }
}

/// A shard this node has taken: its new epoch, and the ingest-log streams of its
/// earlier owners to replay before its events are admitted (empty: none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The shard.
    pub shard: u32,
    /// Its epoch now.
    pub epoch: u64,
    /// Stream keys, as the table holds them (space-separated).
    pub pending: String,
}

impl Claimed {
    /// The stream keys to replay.
    pub fn streams(&self) -> impl Iterator<Item = &str> {
        self.pending.split_whitespace()
    }
}

/// Parses triples (shard, epoch, pending) answered by a script.
pub(super) fn claimed(answer: &Value) -> Option<Vec<Claimed>> {
    Some(
        items(answer)?
            .chunks_exact(3)
            .filter_map(|p| {
                Some(Claimed {
                    shard: text(&p[0])?.parse().ok()?,
                    epoch: text(&p[1])?.parse().ok()?,
                    pending: text(&p[2]).unwrap_or_default(),
                })
            })
            .collect(),
    )
}

/// Parses `"<ip:port> active|leaving"`.
fn member(id: String, value: &str) -> Option<Member> {
    let (addr, state) = value.split_once(' ')?;
    Some(Member {
        id: Arc::from(id),
        addr: addr.parse().ok()?,
        leaving: state == "leaving",
    })
}

/// Parses HGETALL of the shards hash; fields out of range or malformed are skipped.
fn entries(flat: &[Value], shards: u32) -> Entries {
    let mut out = vec![None; shards as usize];
    for pair in flat.chunks_exact(2) {
        let (Some(field), Some(value)) = (text(&pair[0]), text(&pair[1])) else {
            continue;
        };
        let Ok(s) = field.parse::<u32>() else {
            continue;
        };
        let Some((epoch, owner)) = value.split_once(' ') else {
            continue;
        };
        if let (Some(slot), Ok(epoch)) = (out.get_mut(s as usize), epoch.parse()) {
            *slot = Some(Entry {
                owner: Arc::from(owner),
                epoch,
            });
        }
    }
    out
}

impl Table {
    /// The table as node `me` sees it, with `shards` shards and heartbeats that last
    /// `lease`.
    pub fn new(redis: RedisStore, me: Arc<str>, shards: u32, lease: Duration) -> Self {
        Self {
            redis,
            me,
            shards,
            lease,
            heartbeat: Arc::new(redis::Script::new(HEARTBEAT)),
            claim: Arc::new(redis::Script::new(&format!("{PENDING_LUA}{CLAIM}"))),
            pass: Arc::new(redis::Script::new(PASS)),
            read: Arc::new(redis::Script::new(READ)),
        }
    }

    /// Renews this node's heartbeat (`addr`, leaving or not, appending to the ingest-log
    /// stream `stream` when the log is on) and reads the members, and the table when its
    /// version is not `known`.
    pub async fn beat(
        &self,
        addr: SocketAddr,
        leaving: bool,
        known: u64,
        stream: Option<&str>,
    ) -> Result<Beat, TableError> {
        let my_key = format!("{MEMBER_PREFIX}{}", self.me);
        let value = format!("{addr} {}", if leaving { "leaving" } else { "active" });
        let lease_ms = self.lease.as_millis().max(1).to_string();
        let answer: Value = self
            .redis
            .eval(
                &self.heartbeat,
                &[
                    META_KEY,
                    MEMBERS_KEY,
                    &my_key,
                    VERSION_KEY,
                    SHARDS_KEY,
                    LOGS_KEY,
                    LOGCUR_KEY,
                ],
                &[
                    &self.me,
                    &value,
                    &lease_ms,
                    &self.shards.to_string(),
                    FORMAT,
                    &known.to_string(),
                    MEMBER_PREFIX,
                    stream.unwrap_or(""),
                ],
            )
            .await?;
        let parts = items(&answer).ok_or(TableError::Shape("heartbeat"))?;
        if parts.first().and_then(text).as_deref() == Some("0") {
            return Err(TableError::Mismatch {
                format: parts.get(1).and_then(text).unwrap_or_default(),
                shards: parts.get(2).and_then(text).unwrap_or_default(),
                ours: self.shards,
            });
        }
        let flat = parts
            .get(1)
            .and_then(items)
            .ok_or(TableError::Shape("members"))?;
        let members = flat
            .chunks_exact(2)
            .filter_map(|p| member(text(&p[0])?, &text(&p[1])?))
            .collect();
        let version = parts
            .get(2)
            .and_then(text)
            .and_then(|v| v.parse().ok())
            .ok_or(TableError::Shape("version"))?;
        let entries = parts
            .get(3)
            .and_then(items)
            .map(|flat| entries(flat, self.shards));
        Ok(Beat {
            members,
            version,
            entries,
        })
    }

    /// Reads the table and its version.
    pub async fn read(&self) -> Result<(u64, Entries), TableError> {
        let answer: Value = self
            .redis
            .eval(&self.read, &[VERSION_KEY, SHARDS_KEY], &[])
            .await?;
        let parts = items(&answer).ok_or(TableError::Shape("read"))?;
        let version = parts
            .first()
            .and_then(text)
            .and_then(|v| v.parse().ok())
            .ok_or(TableError::Shape("version"))?;
        let flat = parts
            .get(1)
            .and_then(items)
            .ok_or(TableError::Shape("table"))?;
        Ok((version, entries(flat, self.shards)))
    }

    /// Takes each `(shard, floor)` that has no live owner; answers those taken, with
    /// their new epochs and the streams to replay before admitting their events.
    pub async fn claim(&self, shards: &[(u32, u64)]) -> Result<Vec<Claimed>, TableError> {
        if shards.is_empty() {
            return Ok(Vec::new());
        }
        let mut args: Vec<String> = vec![self.me.to_string(), MEMBER_PREFIX.to_string()];
        for (s, floor) in shards {
            args.push(s.to_string());
            args.push(floor.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let answer: Value = self
            .redis
            .eval(
                &self.claim,
                &[SHARDS_KEY, VERSION_KEY, LOGS_KEY, PENDING_KEY],
                &args,
            )
            .await?;
        claimed(&answer).ok_or(TableError::Shape("claim"))
    }

    /// Hands each `(shard, epoch, to)` from this node to `to`; answers the shards passed
    /// (their epoch is now `epoch + 1`).
    pub async fn pass(&self, moves: &[(u32, u64, Arc<str>)]) -> Result<Vec<u32>, TableError> {
        if moves.is_empty() {
            return Ok(Vec::new());
        }
        let mut args: Vec<String> = vec![self.me.to_string(), MEMBER_PREFIX.to_string()];
        for (s, epoch, to) in moves {
            args.push(s.to_string());
            args.push(epoch.to_string());
            args.push(to.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let answer: Value = self
            .redis
            .eval(&self.pass, &[SHARDS_KEY, VERSION_KEY], &args)
            .await?;
        let flat = items(&answer).ok_or(TableError::Shape("pass"))?;
        Ok(flat.iter().filter_map(|v| text(v)?.parse().ok()).collect())
    }

    /// Removes this node's heartbeat at exit, so that shards it still owns (none after a
    /// complete leave) are taken at once instead of after the lease.
    pub async fn forget_me(&self) -> Result<(), TableError> {
        let key = format!("{MEMBER_PREFIX}{}", self.me);
        self.redis.del(&key).await?;
        Ok(())
    }
}
