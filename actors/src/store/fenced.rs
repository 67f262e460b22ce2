//! Fenced writes (a cluster): a flush's keys are written only for the shards the table
//! still gives this node under the epoch it holds.
//!
//! Optimistic transactions on a connection of this writer's own. A flush checks the
//! flush's shards against the table (`WATCH {iot}:shards`, `GET {iot}:version`, `HMGET`
//! of the shards), then writes those whose entry matches (`MULTI`, plain `SET`s, `EXEC`).
//! `EXEC` fails when the table changed after the `WATCH` (any claim or pass), and the
//! flush is checked again; so a node that pauses between its check and its writes, and
//! loses a shard meanwhile, writes nothing of it.
//!
//! The check is usually skipped: every transaction ends by watching the table again and
//! reading its version (`EXEC`, `WATCH`, `GET` in the same round trip). When the next
//! flush finds that version equal to the one its shards were last checked at, and every
//! shard of the flush was checked then and found this node's, the table has not changed
//! since, and the `WATCH` still covers it: the flush is one round trip (`MULTI`, `SET`s,
//! `EXEC`, `WATCH`, `GET`), and still writes nothing if the table changes before `EXEC`.
//! Every change of the shard hash raises the version in the same script, and the version
//! only goes up while this connection lives (a Redis restarted empty breaks it, and the
//! memory of checked shards goes with it).
//!
//! `WATCH` is state of a connection, and any `EXEC` on it clears it: the connection is
//! this writer's alone, and one transaction at a time runs on it (a `tokio` mutex, held
//! across the transaction's round trips on purpose: that is what it serialises).

use super::{DeviceWrite, Fence, StoreError};
use crate::cluster::table::{SHARDS_KEY, VERSION_KEY};
use crate::tuning::FENCED_ATTEMPTS;
use bb8_redis::redis::{self, aio::MultiplexedConnection, Value};
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// The shards of a flush that were not written.
#[derive(Default)]
struct Refused {
    /// Another node owns them now.
    taken: Vec<u32>,
    /// The table has no entry for them.
    missing: Vec<u32>,
    /// This node holds them under a newer epoch than its view's.
    behind: Vec<u32>,
}

/// The writes of one shard under one epoch.
struct Group {
    shard: u32,
    epoch: u64,
    writes: Vec<DeviceWrite>,
}

/// The writer's connection and what it knows of the table through it.
struct Session {
    conn: MultiplexedConnection,
    /// The table's version read right after the connection's current `WATCH`.
    watching: Option<String>,
    /// The version at which `checked` was read under a `WATCH` that held until `EXEC`.
    checked_at: Option<String>,
    /// Entries of shards as of `checked_at`.
    checked: HashMap<u32, String>,
}

impl Session {
    /// Whether every shard of `groups` was checked at the version the connection watches
    /// from, and found this node's under its epoch.
    fn still_mine(&self, owner: &str, groups: &[Group]) -> bool {
        self.watching.is_some()
            && self.watching == self.checked_at
            && groups.iter().all(|g| {
                self.checked
                    .get(&g.shard)
                    .is_some_and(|e| is_mine(e, g, owner))
            })
    }

    /// Remembers entries checked at `version`.
    fn remember(&mut self, version: Option<String>, entries: impl Iterator<Item = (u32, String)>) {
        if version.is_none() || self.checked_at != version {
            self.checked.clear();
            self.checked_at = version;
        }
        self.checked.extend(entries);
    }
}

fn is_mine(entry: &str, group: &Group, owner: &str) -> bool {
    entry
        .split_once(' ')
        .is_some_and(|(epoch, id)| id == owner && epoch.parse() == Ok(group.epoch))
}

/// Whether `entry` is this node's under another epoch than `group`'s: it took the shard
/// again (after its lease ran out) and its view has not caught up yet.
fn is_mine_later(entry: &str, owner: &str) -> bool {
    entry.split_once(' ').is_some_and(|(_, id)| id == owner)
}

/// Writes flushes under the shard table's fence.
pub struct FencedWriter {
    client: redis::Client,
    session: tokio::sync::Mutex<Option<Session>>,
    timeout: Duration,
}

impl FencedWriter {
    /// A writer dialling with `client`, each round trip bounded by `timeout`.
    pub fn new(client: redis::Client, timeout: Duration) -> Self {
        Self {
            client,
            session: tokio::sync::Mutex::new(None),
            timeout,
        }
    }

    /// Writes what the table lets this node write; tells `fence` about shards another
    /// node owns now, and about shards the table has lost (then fails with
    /// [`StoreError::Unowned`], so that the writer keeps those results for a retry; the
    /// same for shards this node holds under a newer epoch than its view's).
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
        let mut guard = self.session.lock().await;
        let result = self
            .transact(&mut guard, fence.owner(), &groups, ttl_ms)
            .await;
        if matches!(result, Err(StoreError::Redis(_) | StoreError::Timeout(_))) {
            // A broken or stuck connection: dial a new one next time.
            *guard = None;
        }
        let Refused {
            taken,
            missing,
            behind,
        } = result?;
        drop(guard);
        if !taken.is_empty() {
            fence.lost(&taken);
        }
        if !missing.is_empty() {
            fence.orphaned(&missing);
            return Err(StoreError::Unowned(missing.len()));
        }
        if !behind.is_empty() {
            return Err(StoreError::Unowned(behind.len()));
        }
        Ok(())
    }

    async fn session<'a>(
        &self,
        slot: &'a mut Option<Session>,
    ) -> Result<&'a mut Session, StoreError> {
        if slot.is_none() {
            let conn =
                tokio::time::timeout(self.timeout, self.client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| StoreError::Timeout(self.timeout))?
                    .map_err(StoreError::Connect)?;
            *slot = Some(Session {
                conn,
                watching: None,
                checked_at: None,
                checked: HashMap::new(),
            });
        }
        slot.as_mut().ok_or(StoreError::Contended)
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
    /// shards it did not write.
    async fn transact(
        &self,
        slot: &mut Option<Session>,
        owner: &str,
        groups: &[Group],
        ttl_ms: u64,
    ) -> Result<Refused, StoreError> {
        let session = self.session(slot).await?;
        for _ in 0..FENCED_ATTEMPTS {
            if session.still_mine(owner, groups) {
                let mine: Vec<&Group> = groups.iter().collect();
                if self.commit(session, &mine, ttl_ms).await? {
                    return Ok(Refused::default());
                }
                // The table changed since the last transaction: check it.
                session.checked.clear();
            }
            let mut check = redis::pipe();
            check.cmd("WATCH").arg(SHARDS_KEY).ignore();
            check.cmd("GET").arg(VERSION_KEY);
            check.cmd("HMGET").arg(SHARDS_KEY);
            for g in groups {
                check.arg(g.shard);
            }
            let (version, entries): (Option<String>, Vec<Option<String>>) =
                self.query(&check, &mut session.conn).await?;
            session.watching = None;
            let (mut refused, mut mine) = (Refused::default(), Vec::new());
            for (g, entry) in groups.iter().zip(&entries) {
                match entry {
                    Some(e) if is_mine(e, g, owner) => mine.push(g),
                    Some(e) if is_mine_later(e, owner) => refused.behind.push(g.shard),
                    Some(_) => refused.taken.push(g.shard),
                    None => refused.missing.push(g.shard),
                }
            }
            if mine.is_empty() {
                self.query::<()>(redis::pipe().cmd("UNWATCH").ignore(), &mut session.conn)
                    .await?;
                return Ok(refused);
            }
            if self.commit(session, &mine, ttl_ms).await? {
                let checked = groups
                    .iter()
                    .zip(entries)
                    .filter_map(|(g, e)| Some((g.shard, e?)));
                session.remember(version, checked);
                return Ok(refused);
            }
        }
        Err(StoreError::Contended)
    }

    /// `MULTI`, the `SET`s of `groups`, `EXEC`, then a new `WATCH` of the table and its
    /// version, in one round trip. False when `EXEC` found the table changed (nothing
    /// written).
    async fn commit(
        &self,
        session: &mut Session,
        groups: &[&Group],
        ttl_ms: u64,
    ) -> Result<bool, StoreError> {
        let mut tx = redis::pipe();
        tx.cmd("MULTI").ignore();
        for w in groups.iter().flat_map(|g| &g.writes) {
            let window = w.window.1.as_ref().map(|bytes| (&w.window.0, bytes));
            for (key, value) in std::iter::once((&w.analysis.0, &w.analysis.1)).chain(window) {
                tx.cmd("SET")
                    .arg(key)
                    .arg(&value[..])
                    .arg("PX")
                    .arg(ttl_ms)
                    .ignore();
            }
        }
        tx.cmd("EXEC");
        tx.cmd("WATCH").arg(SHARDS_KEY).ignore();
        tx.cmd("GET").arg(VERSION_KEY);
        let (done, version): (Value, Option<String>) = self.query(&tx, &mut session.conn).await?;
        session.watching = version;
        // Nil: the table changed after the WATCH; nothing was written.
        Ok(!matches!(done, Value::Nil))
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
