//! Fenced writes (a cluster): a flush's keys are written only for the shards the table
//! still gives this node under the epoch it holds.
//!
//! One optimistic transaction per flush, on a connection of its own: `WATCH` the shard
//! table, `HMGET` the flush's shards, then `MULTI`, the plain `SET`s of the shards whose
//! entry matches, `EXEC`. `EXEC` fails when the table changed after the `WATCH` (any
//! claim or pass), and the flush is checked again; so a node that pauses between its
//! check and its writes, and loses a shard meanwhile, writes nothing of it. This costs a
//! few commands per flush, where a script doing the same check paid Lua's overhead on
//! every key.
//!
//! `WATCH` is state of a connection, and any `EXEC` on it clears it: the connection is
//! this writer's alone, and one transaction at a time runs on it (a `tokio` mutex, held
//! across the transaction's round trips on purpose: that is what it serialises).

use super::{DeviceWrite, Fence, StoreError};
use crate::cluster::table::SHARDS_KEY;
use bb8_redis::redis::{self, aio::MultiplexedConnection, Value};
use std::collections::BTreeMap;
use std::time::Duration;

/// Transactions tried per flush when the table keeps changing under it; then the flush
/// fails and the writer retries it with backoff.
const ATTEMPTS: usize = 3;

/// The writes of one shard under one epoch.
struct Group {
    shard: u32,
    epoch: u64,
    writes: Vec<DeviceWrite>,
}

/// Writes flushes under the shard table's fence.
pub struct FencedWriter {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    timeout: Duration,
}

impl FencedWriter {
    /// A writer dialling with `client`, each round trip bounded by `timeout`.
    pub fn new(client: redis::Client, timeout: Duration) -> Self {
        Self {
            client,
            conn: tokio::sync::Mutex::new(None),
            timeout,
        }
    }

    /// Writes what the table lets this node write; tells `fence` about shards another
    /// node owns now, and about shards the table has lost (then fails with
    /// [`StoreError::Unowned`], so that the writer keeps those results for a retry).
    pub async fn write(
        &self,
        fence: &dyn Fence,
        writes: Vec<DeviceWrite>,
        ttl_ms: u64,
    ) -> Result<(), StoreError> {
        let groups = groups(fence, writes);
        if groups.is_empty() {
            return Ok(());
        }
        let mut guard = self.conn.lock().await;
        let result = self
            .transact(&mut guard, fence.owner(), &groups, ttl_ms)
            .await;
        if matches!(result, Err(StoreError::Redis(_) | StoreError::Timeout(_))) {
            // A broken or stuck connection: dial a new one next time.
            *guard = None;
        }
        let (taken, missing) = result?;
        drop(guard);
        if !taken.is_empty() {
            fence.lost(&taken);
        }
        if !missing.is_empty() {
            fence.orphaned(&missing);
            return Err(StoreError::Unowned(missing.len()));
        }
        Ok(())
    }

    async fn connection(
        &self,
        slot: &mut Option<MultiplexedConnection>,
    ) -> Result<MultiplexedConnection, StoreError> {
        if let Some(conn) = slot {
            return Ok(conn.clone());
        }
        let conn =
            tokio::time::timeout(self.timeout, self.client.get_multiplexed_async_connection())
                .await
                .map_err(|_| StoreError::Timeout(self.timeout))?
                .map_err(StoreError::Connect)?;
        *slot = Some(conn.clone());
        Ok(conn)
    }

    async fn query<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
        conn: &mut MultiplexedConnection,
    ) -> Result<T, StoreError> {
        tokio::time::timeout(self.timeout, pipe.query_async(conn))
            .await
            .map_err(|_| StoreError::Timeout(self.timeout))?
            .map_err(StoreError::Redis)
    }

    /// The transaction, tried again while the table changes under it. Answers the
    /// shards another node owns and the shards the table has no entry for.
    async fn transact(
        &self,
        slot: &mut Option<MultiplexedConnection>,
        owner: &str,
        groups: &[Group],
        ttl_ms: u64,
    ) -> Result<(Vec<u32>, Vec<u32>), StoreError> {
        let mut conn = self.connection(slot).await?;
        for _ in 0..ATTEMPTS {
            let mut check = redis::pipe();
            check.cmd("WATCH").arg(SHARDS_KEY).ignore();
            check.cmd("HMGET").arg(SHARDS_KEY);
            for g in groups {
                check.arg(g.shard);
            }
            let (entries,): (Vec<Option<String>>,) = self.query(&check, &mut conn).await?;
            let (mut taken, mut missing) = (Vec::new(), Vec::new());
            let mut tx = redis::pipe();
            tx.atomic();
            let mut keys = 0;
            for (g, entry) in groups.iter().zip(&entries) {
                match entry {
                    Some(e) if *e == format!("{} {owner}", g.epoch) => {
                        for w in &g.writes {
                            let window = w.window.1.as_ref().map(|bytes| (&w.window.0, bytes));
                            for (key, value) in
                                std::iter::once((&w.analysis.0, &w.analysis.1)).chain(window)
                            {
                                tx.cmd("SET")
                                    .arg(key)
                                    .arg(&value[..])
                                    .arg("PX")
                                    .arg(ttl_ms)
                                    .ignore();
                                keys += 1;
                            }
                        }
                    }
                    Some(_) => taken.push(g.shard),
                    None => missing.push(g.shard),
                }
            }
            if keys == 0 {
                redis::cmd("UNWATCH")
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(StoreError::Redis)?;
                return Ok((taken, missing));
            }
            // Nil: the table changed after the WATCH; nothing was written.
            let done: Value = self.query(&tx, &mut conn).await?;
            if !matches!(done, Value::Nil) {
                return Ok((taken, missing));
            }
        }
        Err(StoreError::Contended)
    }
}

/// Groups writes by shard, dropping those of shards this node no longer holds (the
/// shard's owner has their windows).
fn groups(fence: &dyn Fence, writes: Vec<DeviceWrite>) -> Vec<Group> {
    let mut by_shard: BTreeMap<(u32, u64), Vec<DeviceWrite>> = BTreeMap::new();
    for w in writes {
        if let Some(lease) = fence.lease(&w.device) {
            by_shard.entry(lease).or_default().push(w);
        }
    }
    by_shard
        .into_iter()
        .map(|((shard, epoch), writes)| Group {
            shard,
            epoch,
            writes,
        })
        .collect()
}
