//! The heartbeat round, and the move of shards between nodes.
//!
//! Every CLUSTER_HEARTBEAT_INTERVAL (and at once when kicked: a peer passed a shard here,
//! an event found its shard without a reachable owner) a node:
//! 1. drops the shards the store's fence refused (another node owns them now);
//! 2. renews its heartbeat in Redis, reads the live members, and the table when its
//!    version changed; adopts the shards the table gives it and drops those it lost;
//!    extends its lease;
//! 3. takes the shards whose desired owner it is and that have no live owner (a new
//!    cluster, a dead member's after its lease ran out);
//! 4. hands off the shards it owns whose desired owner is another live member (a join,
//!    or this node leaving): stop admitting their events (they wait), let their device
//!    actors finish what is queued and stop (each writes its exact window), flush the
//!    writer, then pass the shards in the table with epoch + 1 and tell the new owner,
//!    which admits their events from then on.
//!
//! Akka Cluster Sharding's BeginHandOff → HandOff → ShardStopped, and dskit's
//! LEAVING → ACTIVE, are the same sequence.

use super::ownership::addr_of;
use super::shards::desired_owners;
use super::{Cluster, Member, TableError};
use crate::device::Slot;
use crate::metrics::{Direction, DirectionLabel};
use crate::store::WriterMsg;
use crate::tuning::{COLLECT_LOGS_EVERY, MIN_ROUND_GAP};
use ractor::rpc::CallResult;
use ractor::ActorCell;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A shard without a live owner, as one round saw it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Vacancy {
    /// No entry in the table.
    Free(u32),
    /// Owned by a member whose heartbeat has expired.
    Absent(Arc<str>),
}

impl Cluster {
    /// The first heartbeat: registers this node and reads the table. An error here (a
    /// table of another shard count, Redis unreachable) is for the caller to report.
    pub async fn join(self: &Arc<Self>) -> Result<(), TableError> {
        self.round().await
    }

    /// Runs heartbeat rounds until `stop` is cancelled.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.config.heartbeat);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        // Heartbeat failures are logged when they start and when they end, not per round.
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = self.ownership.round_wanted() => {}
                _ = stop.cancelled() => return,
            }
            tokio::time::sleep_until(last + MIN_ROUND_GAP).await;
            last = Instant::now();
            match self.round().await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("heartbeat renewed again");
                }
                Ok(()) => {}
                Err(e @ TableError::Mismatch { .. }) => {
                    tracing::error!(error = %e, "cluster table refused; this node stops admitting events");
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "heartbeat failed; this node admits events until its lease runs out, then answers 503 until Redis answers again");
                }
                Err(e) => tracing::debug!(error = %e, "heartbeat failed again"),
            }
        }
    }

    async fn round(self: &Arc<Self>) -> Result<(), TableError> {
        let lost = self.ownership.take_lost();
        if !lost.is_empty() {
            self.drop_shards(&lost).await;
        }
        if self.log.get().is_some() && self.ownership.lease_lapsed() {
            self.suspend();
        }
        // The stream exists before the heartbeat registers it.
        self.create_first_stream().await?;
        let started = Instant::now();
        let leaving = self.is_leaving();
        let stream = self.stream().map(|s| s.key().to_string());
        let beat = self
            .table
            .beat(
                self.config.advertise,
                leaving,
                self.known_version(),
                stream.as_deref(),
            )
            .await?;
        // The heartbeat key lives a lease from when it arrived; admitting stops a
        // heartbeat earlier than that, counted from when it was sent.
        self.ownership
            .renew_lease(started + self.config.lease.saturating_sub(self.config.heartbeat));
        self.set_version(beat.version);
        if let Some(entries) = &beat.entries {
            let (adopted, lost) = self.ownership.apply(entries);
            if !adopted.is_empty() {
                tracing::info!(shards = adopted.len(), "shards adopted");
                self.count(Direction::In, adopted.len());
            }
            if !lost.is_empty() {
                tracing::warn!(shards = ?lost, "shards taken by another node while this one could not renew its lease");
                self.drop_shards(&lost).await;
            }
        }
        self.reclaim_suspended().await?;
        self.publish(&beat.members);
        *self.members.lock().unwrap_or_else(PoisonError::into_inner) = beat.members.clone();
        self.registered.store(true, Ordering::Release);
        if self.rounds.fetch_add(1, Ordering::Relaxed) % COLLECT_LOGS_EVERY == 0 {
            self.collect_streams().await;
        }
        let desired = self.desired(&beat.members);
        self.claim_free(&beat.members, &desired).await?;
        self.start_moves(&desired);
        Ok(())
    }

    fn known_version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    pub(super) fn set_version(&self, v: u64) {
        self.version.store(v, Ordering::Release);
    }

    fn publish(&self, members: &[Member]) {
        self.metrics.cluster_members.set(members.len() as i64);
        self.metrics
            .cluster_shards_owned
            .set(self.ownership.owned().len() as i64);
    }

    fn count(&self, direction: Direction, n: usize) {
        self.metrics
            .shard_handoffs
            .get_or_create(&DirectionLabel { direction })
            .inc_by(n as u64);
    }

    /// The desired owner (a member id) of every shard: members that are not leaving.
    fn desired(&self, members: &[Member]) -> Vec<Option<Arc<str>>> {
        let mut active: Vec<&Member> = members.iter().filter(|m| !m.leaving).collect();
        active.sort_by_key(|m| m.addr);
        active.dedup_by_key(|m| m.addr);
        let addrs: Vec<_> = active.iter().map(|m| m.addr).collect();
        desired_owners(&addrs, self.ownership.shards())
            .into_iter()
            .map(|o| o.map(|i| active[i].id.clone()))
            .collect()
    }

    /// Claims shards. First those this node holds that the table has no entry for
    /// (Redis restarted empty: the holder keeps them, its epoch continues). Then those it
    /// should own that have no entry, or whose owner is absent from the members, when the
    /// same was true in its previous round too: when Redis comes back after an outage
    /// longer than the lease every heartbeat key has expired, and when it comes back
    /// empty every entry is gone; each node gets a round to renew its heartbeat and
    /// reclaim what it holds before anyone takes it.
    async fn claim_free(
        self: &Arc<Self>,
        members: &[Member],
        desired: &[Option<Arc<str>>],
    ) -> Result<(), TableError> {
        let live: HashSet<&str> = members.iter().map(|m| &*m.id).collect();
        let owners = self.ownership.owners();
        let vacant: HashSet<Vacancy> = owners
            .iter()
            .enumerate()
            .filter_map(|(s, o)| match o {
                None => Some(Vacancy::Free(s as u32)),
                Some(o) if !live.contains(&**o) => Some(Vacancy::Absent(o.clone())),
                Some(_) => None,
            })
            .collect();
        let before = std::mem::replace(
            &mut *self.vacant.lock().unwrap_or_else(PoisonError::into_inner),
            vacant,
        );
        let mut wanted = self.ownership.orphans();
        if !self.is_leaving() {
            let me = self.me().clone();
            for (s, (d, owner)) in desired.iter().zip(&owners).enumerate() {
                let s = s as u32;
                if d.as_deref() != Some(&*me) || wanted.iter().any(|(w, _)| *w == s) {
                    continue;
                }
                let was_vacant = match owner {
                    None => before.contains(&Vacancy::Free(s)),
                    Some(o) => !live.contains(&**o) && before.contains(&Vacancy::Absent(o.clone())),
                };
                if was_vacant {
                    wanted.push((s, self.ownership.state(s).epoch));
                }
            }
        }
        if wanted.is_empty() {
            return Ok(());
        }
        let claimed = self.table.claim(&wanted).await?;
        let taken = claimed.len();
        if taken > 0 {
            tracing::info!(shards = taken, "shards taken (no live owner)");
            self.adopt_claimed(claimed);
            self.publish(members);
        }
        if taken < wanted.len() {
            // Someone else's claim or heartbeat came first: read the table next round.
            self.set_version(0);
        }
        Ok(())
    }

    /// Starts handing off the shards whose desired owner is another live member, unless
    /// a handoff is under way already.
    fn start_moves(self: &Arc<Self>, desired: &[Option<Arc<str>>]) {
        let me = self.me().clone();
        let moves: Vec<(u32, Arc<str>)> = self
            .ownership
            .owned()
            .into_iter()
            .filter(|(_, _, local)| *local == super::Local::Active)
            .filter_map(|(s, _, _)| {
                let to = desired[s as usize].clone()?;
                (to != me).then_some((s, to))
            })
            .collect();
        if moves.is_empty() || self.moving.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        tokio::spawn(async move {
            this.hand_off(moves).await;
            this.moving.store(false, Ordering::Release);
            this.kick();
        });
    }

    /// How long one step of a handoff (the drain, the actors' stop, the flush) may take
    /// before the handoff is abandoned and the shards stay here.
    fn step_timeout(&self) -> Duration {
        self.config.forward_timeout * 2
    }

    /// Moves shards to their new owners (see the module doc).
    async fn hand_off(self: &Arc<Self>, moves: Vec<(u32, Arc<str>)>) {
        let mut moving: HashMap<u32, (u64, Arc<str>)> = HashMap::new();
        for (s, to) in moves {
            if let Some(epoch) = self.ownership.begin_move(s) {
                moving.insert(s, (epoch, to));
            }
        }
        if moving.is_empty() {
            return;
        }
        // Events admitted before the move began may still be in the ingest log's
        // appender: they are queued (or refused) before the queues are drained.
        let appended = self.appended(moving.keys().copied()).await;
        let ownership = self.ownership.clone();
        let (slots, stopping) = self
            .directory
            .close_where(|d| moving.contains_key(&ownership.shard(d)));
        let settled = appended && self.stop_slots(&slots, &stopping).await && self.flush().await;
        if !settled {
            tracing::warn!(shards = moving.len(), "handoff abandoned (queues did not drain or the store did not answer in time); the shards stay here");
            for slot in &slots {
                slot.reopen();
            }
            for s in moving.keys() {
                self.ownership.end_move(*s, None);
            }
            return;
        }
        for slot in &slots {
            self.directory.unlist(slot);
        }
        let passes: Vec<(u32, u64, Arc<str>)> = moving
            .iter()
            .map(|(s, (epoch, to))| (*s, *epoch, to.clone()))
            .collect();
        let passed: HashSet<u32> = match self.table.pass(&passes).await {
            Ok(passed) => passed.into_iter().collect(),
            Err(e) => {
                tracing::warn!(error = %e, "passing shards failed; they stay here");
                HashSet::new()
            }
        };
        let mut told = HashSet::new();
        for (s, (_, to)) in &moving {
            if passed.contains(s) {
                self.ownership.end_move(*s, Some(to));
                if told.insert(to.clone()) {
                    if let Some(addr) = addr_of(to) {
                        let transport = self.transport.clone();
                        tokio::spawn(async move {
                            let _ = transport.kick(addr).await;
                        });
                    }
                }
            } else {
                self.ownership.end_move(*s, None);
            }
        }
        // A shard not passed (the table moved it meanwhile) is settled by the next read.
        if passed.len() < moving.len() {
            self.set_version(0);
        }
        if !passed.is_empty() {
            tracing::info!(shards = passed.len(), to = ?told, "shards handed off");
        }
        self.count(Direction::Out, passed.len());
        self.metrics
            .cluster_shards_owned
            .set(self.ownership.owned().len() as i64);
    }

    /// Waits until no event of `shards` is between admission and its queue (with the
    /// ingest log on); false after the step timeout.
    async fn appended(&self, shards: impl Iterator<Item = u32> + Clone) -> bool {
        let Some(log) = self.log.get() else {
            return true;
        };
        tokio::time::timeout(self.step_timeout(), log.log.landed(shards))
            .await
            .is_ok()
    }

    /// Waits until the closed slots' queues are processed, then stops their actors (each
    /// deposits its window as it stops), and waits for actors that were stopping already.
    pub(super) async fn stop_slots(&self, slots: &[Arc<Slot>], stopping: &[ActorCell]) -> bool {
        let drained = futures_util::future::join_all(slots.iter().map(|s| s.drained()));
        if tokio::time::timeout(self.step_timeout(), drained)
            .await
            .is_err()
        {
            return false;
        }
        let stops = slots.iter().filter_map(|s| s.attached()).map(|actor| {
            let limit = self.step_timeout();
            async move {
                let _ = actor
                    .stop_and_wait(Some("shard handed off".into()), Some(limit))
                    .await;
            }
        });
        futures_util::future::join_all(stops).await;
        let waits = stopping
            .iter()
            .map(|cell| cell.wait(Some(self.step_timeout())));
        futures_util::future::join_all(waits).await;
        true
    }

    /// Every result deposited so far is in the store.
    pub(super) async fn flush(&self) -> bool {
        matches!(
            self.writer
                .call(WriterMsg::Barrier, Some(self.step_timeout()))
                .await,
            Ok(CallResult::Success(()))
        )
    }

    /// Stops processing shards another node owns now: their events still queued here are
    /// processed (their results are refused by the store's fence) and their actors
    /// stopped, so that nothing here keeps a window the new owner has moved on.
    async fn drop_shards(&self, shards: &[u32]) {
        let set: HashSet<u32> = shards.iter().copied().collect();
        let ownership = self.ownership.clone();
        let (slots, stopping) = self
            .directory
            .close_where(|d| set.contains(&ownership.shard(d)));
        let _ = self.stop_slots(&slots, &stopping).await;
        for slot in &slots {
            self.directory.unlist(slot);
        }
        self.metrics
            .cluster_shards_owned
            .set(self.ownership.owned().len() as i64);
    }
}
