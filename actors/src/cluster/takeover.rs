//! With the ingest log on: replaying earlier owners' streams before a shard's events are
//! admitted here, and taking this node's own shards again after its lease ran out (see
//! [`super::logs`]).
//!
//! A replay seals each stream it reads, so that the node that wrote it (dead, or a
//! zombie that does not know it yet) can append and acknowledge nothing more, then queues
//! the shards' events from it, each with its position (the epoch in its entry's tags):
//! device actors skip what their stored windows hold. Then it stops those devices' actors
//! (each writes its window), waits for the store, and clears the shards' pending replay;
//! only then does this node admit the shards' events. A failure leaves the shards
//! waiting and is tried again; pushing an event twice is harmless (positions).

use super::{Claimed, Cluster};
use crate::cluster::wire;
use crate::device::Queued;
use crate::ingest::redis_log::{RawEntry, RedisLog};
use crate::position::{Logged, Pins, Position};
use crate::tuning::LOG_REPLAY_CHUNK;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};

/// Why a replay did not finish (it is tried again).
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Table(#[from] super::TableError),
    #[error("the replayed devices' windows could not be written in time")]
    NotWritten,
}

impl Cluster {
    /// Records shards just taken: active at once when nothing is pending, else
    /// replaying until their earlier owners' streams are replayed (in the background).
    pub(super) fn adopt_claimed(self: &Arc<Self>, claimed: Vec<Claimed>) {
        let (owed, free): (Vec<Claimed>, Vec<Claimed>) = claimed
            .into_iter()
            .partition(|c| self.log.get().is_some() && c.streams().next().is_some());
        let pairs = |cs: &[Claimed]| cs.iter().map(|c| (c.shard, c.epoch)).collect::<Vec<_>>();
        self.ownership.claimed(&pairs(&free), false);
        if owed.is_empty() {
            return;
        }
        self.ownership.claimed(&pairs(&owed), true);
        let this = self.clone();
        tokio::spawn(async move { this.replay_until_done(owed).await });
    }

    /// Replays `owed` until it succeeds or the shards are no longer replaying here.
    async fn replay_until_done(self: Arc<Self>, mut owed: Vec<Claimed>) {
        let _one = self.replaying.lock().await;
        loop {
            owed.retain(|c| {
                let state = self.ownership.state(c.shard);
                state.local == super::Local::Replaying && state.epoch == c.epoch
            });
            if owed.is_empty() {
                return;
            }
            match self.replay(&owed).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, shards = owed.len(), "replaying earlier owners' ingest logs failed; their events wait, trying again");
                    tokio::time::sleep(self.config.heartbeat).await;
                }
            }
        }
    }

    /// One replay of `owed` (see the module doc).
    async fn replay(&self, owed: &[Claimed]) -> Result<(), ReplayError> {
        let Some(log) = self.log.get() else {
            return Ok(());
        };
        let started = tokio::time::Instant::now();
        let mut by_stream: BTreeMap<&str, HashSet<u32>> = BTreeMap::new();
        for c in owed {
            for key in c.streams() {
                by_stream.entry(key).or_default().insert(c.shard);
            }
        }
        let stream = log.log.stream();
        let mut events = 0;
        for (key, shards) in &by_stream {
            let dead = stream.with_key(key.to_string());
            dead.seal().await?;
            events += self.replay_stream(&dead, shards).await?;
        }
        let shards: HashSet<u32> = owed.iter().map(|c| c.shard).collect();
        let ownership = self.ownership.clone();
        let (slots, stopping) = self
            .directory
            .close_where(|d| shards.contains(&ownership.shard(d)));
        if !(self.stop_slots(&slots, &stopping).await && self.flush().await) {
            for slot in &slots {
                slot.reopen();
            }
            return Err(ReplayError::NotWritten);
        }
        for slot in &slots {
            self.directory.unlist(slot);
        }
        let cleared: HashSet<u32> = log.logs.clear(owed).await?.into_iter().collect();
        let done: Vec<(u32, u64)> = owed
            .iter()
            .filter(|c| cleared.contains(&c.shard))
            .map(|c| (c.shard, c.epoch))
            .collect();
        self.ownership.replayed(&done);
        tracing::info!(shards = done.len(), streams = by_stream.len(), events, elapsed = ?started.elapsed(), "earlier owners' ingest logs replayed; the shards' events are admitted here now");
        Ok(())
    }

    /// Queues the events of `shards` from one stream, oldest first; answers how many.
    async fn replay_stream(
        &self,
        stream: &RedisLog,
        shards: &HashSet<u32>,
    ) -> Result<usize, ReplayError> {
        // The entries live in another node's stream: their pins hold nothing here.
        let pins = Pins::default();
        let (mut after, mut queued) = (None, 0);
        loop {
            let chunk = stream.range(after, LOG_REPLAY_CHUNK).await?;
            let last = chunk.len() < LOG_REPLAY_CHUNK;
            for raw in chunk {
                after = Some(raw.id);
                queued += self.queue_entry(stream, &pins, raw, shards);
            }
            if last {
                return Ok(queued);
            }
        }
    }

    /// Queues one entry's events of `shards`, each at its position; answers how many.
    fn queue_entry(
        &self,
        stream: &RedisLog,
        pins: &Pins,
        raw: RawEntry,
        shards: &HashSet<u32>,
    ) -> usize {
        let Some(bytes) = raw.events else {
            // The seal, or a foreign entry.
            return 0;
        };
        let decoded = match wire::decode(bytes) {
            Ok(decoded) => decoded,
            Err(e) => {
                self.metrics.ingest_log_undecodable.inc();
                tracing::error!(stream = stream.key(), entry = %raw.id, error = %e, "ingest log entry does not decode; skipped");
                return 0;
            }
        };
        let epochs: HashMap<u32, u64> = raw.tags.into_iter().collect();
        let pin = pins.pin(raw.id);
        let mut queued = 0;
        for (index, (device, event)) in (0u32..).zip(decoded) {
            let shard = self.ownership.shard(&device);
            if !shards.contains(&shard) {
                continue;
            }
            let logged = Logged {
                position: Position {
                    epoch: epochs.get(&shard).copied().unwrap_or(0),
                    entry: raw.id,
                    index,
                },
                pin: pin.clone(),
                replayed: true,
            };
            self.directory.admit_regardless(1);
            // Fails only at the end of shutdown; the pending replay stays for the next
            // owner.
            let _ = self.directory.push_admitted(
                &device,
                Queued {
                    event,
                    logged: Some(logged),
                },
            );
            queued += 1;
        }
        queued
    }

    /// This node's lease ran out: stops admitting every shard it holds (they are taken
    /// again by [`Cluster::reclaim_suspended`] once the heartbeat is renewed, and this
    /// node appends to a new stream: its current one may have been sealed).
    pub(super) fn suspend(&self) {
        let shards = self.ownership.suspend();
        let mut suspended = self
            .suspended
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if suspended.is_none() || !shards.is_empty() {
            tracing::warn!(shards = shards.len(), "this node's lease ran out (paused, or cut off from Redis): it may have been declared dead; its shards are taken again and its ingest log replayed before their events are admitted, and it appends to a new stream");
        }
        suspended.get_or_insert_with(Vec::new).extend(shards);
    }

    /// Creates this node's first stream, once, before the first heartbeat registers it.
    /// Every stream of this node is created before it is registered, and appends never
    /// create one ([`RedisLog::create`]): a stream sealed and collected after this node
    /// was declared dead stays gone, and a late append to it fails instead of being
    /// acknowledged where nobody replays it.
    pub(super) async fn create_first_stream(&self) -> Result<(), super::TableError> {
        let Some(log) = self.log.get() else {
            return Ok(());
        };
        if !log.created.load(Ordering::Acquire) {
            log.log.stream().create().await?;
            log.created.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// After a lapse of the lease: takes the suspended shards that the table still gives
    /// this node again, with a new epoch and this node's streams pending, and appends to
    /// a new stream from now on. Also when the stream appended to is gone (collected
    /// after this node was declared dead, or lost by Redis), with no shard to take again.
    pub(super) async fn reclaim_suspended(self: &Arc<Self>) -> Result<(), super::TableError> {
        let Some(log) = self.log.get() else {
            return Ok(());
        };
        let suspended = self
            .suspended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let suspended = match suspended {
            Some(suspended) => suspended,
            None if self.stream_lost(log).await? => Vec::new(),
            None => return Ok(()),
        };
        let mine: Vec<(u32, u64)> = suspended
            .iter()
            .map(|s| (*s, self.ownership.state(*s)))
            .filter(|(_, state)| {
                state.local == super::Local::Replaying
                    && state.owner.as_deref() == Some(&**self.me())
            })
            .map(|(s, state)| (s, state.epoch))
            .collect();
        // A new term at every try, so that no stream key is ever created twice: each is
        // created before the table registers it (a sealed, collected stream never comes
        // back: see `create_first_stream`).
        let term = log.term.fetch_add(1, Ordering::AcqRel) + 1;
        let key = Cluster::stream_key(&log.base, self.me(), term);
        let stream = log.log.stream().with_key(key.clone());
        stream.create().await?;
        let claimed = log.logs.reclaim(&mine, &key).await?;
        *self
            .suspended
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
        log.log.switch(stream).await;
        if claimed.len() < mine.len() {
            // The others were taken meanwhile: the next read of the table drops them.
            self.set_version(0);
        }
        self.adopt_claimed(claimed);
        Ok(())
    }

    /// Whether the stream this node appends to is gone: an append found it so, or
    /// Redis lost the table (this node holds shards it has no entry for: Redis restarted
    /// empty) and the stream with it. It is never created again (see
    /// `create_first_stream`): this node appends to a new one.
    async fn stream_lost(&self, log: &super::ClusterLog) -> Result<bool, super::TableError> {
        if log.log.stream_gone() {
            return Ok(true);
        }
        if self.ownership.orphans().is_empty() {
            return Ok(false);
        }
        let stream = log.log.stream();
        let gone = !stream.exists().await?;
        if gone {
            tracing::warn!(stream = stream.key(), "this node's ingest-log stream is gone with the cluster table (Redis restarted empty?); it appends to a new stream");
        }
        Ok(gone)
    }

    /// Deletes streams nobody needs any more (every few rounds).
    pub(super) async fn collect_streams(&self) {
        let Some(log) = self.log.get() else {
            return;
        };
        match log.logs.collect().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                streams = n,
                "ingest-log streams nobody needs any more deleted"
            ),
            Err(e) => tracing::debug!(error = %e, "collecting ingest-log streams failed"),
        }
    }
}
