//! The members' ingest-log streams in the table, and the replays they owe.
//!
//! With the ingest log on, each member appends the events it admits to a stream of its
//! own (`<INGEST_LOG_KEY>:<node id>:<term>`), registered in `{iot}:logs` (stream → node)
//! and `{iot}:logcur` (node → its current stream) by every heartbeat. Its entries carry
//! each shard's epoch, and a window's position is (epoch, entry, index).
//!
//! - A member that takes a dead member's shard ([`super::Table::claim`]) finds the dead
//!   member's streams in the shard's pending replay (`{iot}:pending`): it seals them
//!   (a zombie's later appends fail, so it acknowledges nothing more), replays the
//!   shard's events from them, writes the replayed windows, and only then clears the
//!   pending replay ([`Logs::clear`]) and admits the shard's events. A taker that dies
//!   halfway leaves the pending replay in place, and the next taker adds its own streams.
//! - A member whose lease ran out (paused, cut off) may have been declared dead and its
//!   stream sealed: it takes its own shards again ([`Logs::reclaim`]: epoch + 1, its
//!   streams pending), replays them, and appends to a new stream (the next term).
//! - [`Logs::collect`] drops the streams nobody can need any more: not a live member's
//!   current stream, not owed by a pending replay, not of a dead member that still owns
//!   shards.

use super::table::{
    claimed, items, text, Claimed, TableError, LOGCUR_KEY, LOGS_KEY, MEMBER_PREFIX, PENDING_KEY,
    PENDING_LUA, SHARDS_KEY, VERSION_KEY,
};
use crate::store::RedisStore;
use bb8_redis::redis::{self, Value};
use std::sync::Arc;

/// Takes ARGV[1]'s own shards again after its lease ran out: each pair (shard, epoch)
/// still (epoch, ARGV[1]) gets epoch + 1, and ARGV[1]'s registered streams join its
/// pending replay; then ARGV[2] becomes ARGV[1]'s current stream. Answers the triples
/// (shard, epoch, pending).
/// KEYS: shards, version, logs, pending, logcur. ARGV: my id, my new stream, then pairs.
/// After [`PENDING_LUA`].
const RECLAIM: &str = r#"
local out = {}
for i = 3, #ARGV, 2 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] .. ' ' .. ARGV[1] then
    local epoch = tonumber(ARGV[i + 1]) + 1
    redis.call('HSET', KEYS[1], ARGV[i], epoch .. ' ' .. ARGV[1])
    local pending = add_pending(ARGV[i], ARGV[1])
    table.insert(out, ARGV[i])
    table.insert(out, tostring(epoch))
    table.insert(out, pending)
  end
end
redis.call('HSET', KEYS[3], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[2])
if #out > 0 then redis.call('INCR', KEYS[2]) end
return out
"#;

/// Clears pending replays that are done: each triple (shard, epoch, pending) whose shard
/// is still (epoch, ARGV[1]) and whose pending replay is still exactly that. Answers the
/// shards cleared.
/// KEYS: shards, pending. ARGV: my id, then triples.
const CLEAR: &str = r#"
local out = {}
for i = 2, #ARGV, 3 do
  if redis.call('HGET', KEYS[1], ARGV[i]) == ARGV[i + 1] .. ' ' .. ARGV[1] then
    local pending = redis.call('HGET', KEYS[2], ARGV[i]) or ''
    if pending == ARGV[i + 2] then
      redis.call('HDEL', KEYS[2], ARGV[i])
      table.insert(out, ARGV[i])
    end
  end
end
return out
"#;

/// Unregisters the streams nobody can need (see the module doc) and answers them, for
/// the caller to delete.
/// KEYS: shards, pending, logs, logcur. ARGV: member prefix.
const COLLECT: &str = r#"
local owners = {}
local table_ = redis.call('HGETALL', KEYS[1])
for j = 2, #table_, 2 do
  local sp = string.find(table_[j], ' ', 1, true)
  if sp then owners[string.sub(table_[j], sp + 1)] = true end
end
local owed = {}
for _, v in ipairs(redis.call('HVALS', KEYS[2])) do
  for key in string.gmatch(v, '%S+') do owed[key] = true end
end
local out = {}
local all = redis.call('HGETALL', KEYS[3])
for j = 1, #all, 2 do
  local key, node = all[j], all[j + 1]
  local keep = owed[key]
  if not keep then
    if redis.call('EXISTS', ARGV[1] .. node) == 1 then
      keep = redis.call('HGET', KEYS[4], node) == key
    else
      keep = owners[node]
    end
  end
  if not keep then
    redis.call('HDEL', KEYS[3], key)
    if redis.call('HGET', KEYS[4], node) == key then redis.call('HDEL', KEYS[4], node) end
    table.insert(out, key)
  end
end
return out
"#;

/// This node's handle on the log registry of the table.
#[derive(Clone)]
pub struct Logs {
    redis: RedisStore,
    me: Arc<str>,
    reclaim: Arc<redis::Script>,
    clear: Arc<redis::Script>,
    collect: Arc<redis::Script>,
}

impl Logs {
    /// The registry as node `me` sees it.
    pub fn new(redis: RedisStore, me: Arc<str>) -> Self {
        Self {
            redis,
            me,
            reclaim: Arc::new(redis::Script::new(&format!("{PENDING_LUA}{RECLAIM}"))),
            clear: Arc::new(redis::Script::new(CLEAR)),
            collect: Arc::new(redis::Script::new(COLLECT)),
        }
    }

    /// Takes this node's `(shard, epoch)` again with epoch + 1 and its streams pending,
    /// and registers `stream` as its current one; answers the shards it got.
    pub async fn reclaim(
        &self,
        shards: &[(u32, u64)],
        stream: &str,
    ) -> Result<Vec<Claimed>, TableError> {
        let mut args: Vec<String> = vec![self.me.to_string(), stream.to_string()];
        for (s, epoch) in shards {
            args.push(s.to_string());
            args.push(epoch.to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let answer: Value = self
            .redis
            .eval(
                &self.reclaim,
                &[SHARDS_KEY, VERSION_KEY, LOGS_KEY, PENDING_KEY, LOGCUR_KEY],
                &args,
            )
            .await?;
        claimed(&answer).ok_or(TableError::Shape("reclaim"))
    }

    /// Clears the pending replays of `done` (replayed and written); answers the shards
    /// cleared (the others changed meanwhile: another node owns them now).
    pub async fn clear(&self, done: &[Claimed]) -> Result<Vec<u32>, TableError> {
        if done.is_empty() {
            return Ok(Vec::new());
        }
        let mut args: Vec<String> = vec![self.me.to_string()];
        for c in done {
            args.push(c.shard.to_string());
            args.push(c.epoch.to_string());
            args.push(c.pending.clone());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let answer: Value = self
            .redis
            .eval(&self.clear, &[SHARDS_KEY, PENDING_KEY], &args)
            .await?;
        let flat = items(&answer).ok_or(TableError::Shape("clear"))?;
        Ok(flat.iter().filter_map(|v| text(v)?.parse().ok()).collect())
    }

    /// Unregisters and deletes the streams nobody needs any more; answers how many.
    pub async fn collect(&self) -> Result<usize, TableError> {
        let answer: Value = self
            .redis
            .eval(
                &self.collect,
                &[SHARDS_KEY, PENDING_KEY, LOGS_KEY, LOGCUR_KEY],
                &[MEMBER_PREFIX],
            )
            .await?;
        let keys: Vec<String> = items(&answer)
            .ok_or(TableError::Shape("collect"))?
            .iter()
            .filter_map(text)
            .collect();
        for key in &keys {
            self.redis.del(key).await?;
        }
        Ok(keys.len())
    }
}
