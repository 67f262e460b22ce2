//! Scale-out: one authoritative owner per shard, kept in Redis, so the analytics stay
//! exact through every membership change.
//!
//! - [`shards`]: a device's shard, and the desired owner of each shard (pure).
//! - [`table`]: the table in Redis: heartbeats, each shard's owner and epoch, the
//!   compare-and-set scripts.
//! - [`ownership`]: this node's copy of the table and the shards it admits events for;
//!   also the store's fence.
//! - [`handoff`]: the heartbeat round: register, read the table, take free shards, hand
//!   shards to their desired owners (stop admitting, drain, write, pass with epoch + 1).
//! - [`logs`]: the members' ingest-log streams in the table, and the replays a new owner
//!   owes before it admits a shard's events (`takeover` runs them).
//! - [`forwarder`]: one actor per peer, batching events with idempotency keys.
//! - [`transport`]: how nodes talk (implemented over HTTP by the binary), its errors, the
//!   batches' idempotency keys.
//! - `received`: batches forwarded here, taken once per key.
//! - [`wire`]: the binary body of a forwarded batch and of its answer.
//!
//! [`Cluster`] ties them together: [`Cluster::submit`] and [`Cluster::submit_batch`]
//! queue an event here when this node owns its shard, else forward it to the owner the
//! table names, and answer once the owner has queued it; the internal listener calls
//! [`Cluster::receive`] with the batches other nodes forward. HTTP itself is the
//! binary's business: it implements [`Transport`].

pub mod forwarder;
pub mod handoff;
pub mod logs;
pub mod ownership;
mod received;
pub mod shards;
pub mod table;
mod takeover;
pub mod transport;
pub mod wire;

pub use ownership::{Local, Ownership, Route};
pub use table::{Claimed, Member, Table, TableError};
pub use transport::{BatchId, ForwardError, Transport};

use crate::device::{Directory, SubmitError};
use crate::event::Event;
use crate::ingest::log::{settled, Appended, IngestLog};
use crate::ingest::redis_log::RedisLog;
use crate::ingest::shared::Tag;
use crate::metrics::Metrics;
use crate::store::WriterMsg;
use crate::tuning::OWNER_WAIT_STEP;
use dashmap::DashMap;
use forwarder::{Forwarder, ForwarderArgs, ForwarderMsg};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

/// The cluster settings, validated.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// CLUSTER_ADVERTISE_ADDR: this node as its peers reach it.
    pub advertise: SocketAddr,
    /// CLUSTER_SHARDS.
    pub shards: u32,
    /// CLUSTER_HEARTBEAT_INTERVAL.
    pub heartbeat: Duration,
    /// CLUSTER_LEASE: a member whose heartbeat is older is dead, and its shards are taken.
    pub lease: Duration,
    /// CLUSTER_FORWARD_TIMEOUT.
    pub forward_timeout: Duration,
}

impl ClusterConfig {
    /// How long an event may wait for its shard to have a reachable owner (a handoff, a
    /// dead owner's lease running out and its shards taken) before it is refused with 503.
    pub fn route_deadline(&self) -> Duration {
        self.lease + 3 * self.heartbeat + self.forward_timeout
    }
}

/// Why an event was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    /// An owner's MAX_PENDING_EVENTS.
    Overloaded,
    /// No owner could take it within the route deadline.
    Unroutable,
    /// Forwarded here, but its shard is another node's: its sender routes it again.
    Moved,
    /// The ingest log could not be written.
    NotDurable,
    /// Forwarded to an owner that failed before it answered (see
    /// [`SubmitError::OutcomeUnknown`]).
    Unknown,
}

/// This node's ingest log in the cluster.
struct ClusterLog {
    log: Arc<IngestLog>,
    logs: logs::Logs,
    /// INGEST_LOG_KEY: the prefix of this node's streams.
    base: String,
    /// The current stream's term (raised when this node was declared dead).
    term: AtomicU64,
    /// The first stream (term 0) exists: created before the first heartbeat registers
    /// it (see [`RedisLog::create`]).
    created: AtomicBool,
}

/// Events with their positions in the request and their devices.
type Positioned = Vec<(usize, Arc<str>, Event)>;

/// This node's part of the cluster.
pub struct Cluster {
    config: ClusterConfig,
    ownership: Arc<Ownership>,
    table: Table,
    transport: Arc<dyn Transport>,
    directory: Directory,
    writer: ActorRef<WriterMsg>,
    metrics: Metrics,
    forwarders: DashMap<SocketAddr, ActorRef<ForwarderMsg>>,
    incarnation: u64,
    sequence: Arc<AtomicU64>,
    received: Mutex<received::Received>,
    /// The first heartbeat has registered this node.
    registered: AtomicBool,
    leaving: AtomicBool,
    /// Live members as of the last heartbeat.
    members: Arc<Mutex<Vec<Member>>>,
    /// A handoff is under way (one at a time).
    moving: AtomicBool,
    /// The table's version as last read (0: read it at the next heartbeat).
    version: AtomicU64,
    /// Shards without a live owner at the last heartbeat round.
    vacant: Mutex<std::collections::HashSet<handoff::Vacancy>>,
    /// The ingest log, when it is on.
    log: OnceLock<ClusterLog>,
    /// With the log on, after this node's lease ran out: the shards it suspended, to take
    /// again with a new stream (`None`: no lapse since).
    suspended: Mutex<Option<Vec<u32>>>,
    /// One replay of earlier owners' streams at a time.
    replaying: tokio::sync::Mutex<()>,
    /// Heartbeat rounds so far.
    rounds: AtomicU64,
}

impl Cluster {
    /// This node's id in the table: its advertised address and incarnation.
    pub fn node_id(advertise: SocketAddr, incarnation: u64) -> Arc<str> {
        Arc::from(format!("{advertise}#{incarnation:x}"))
    }

    /// Prepares this node's part: nothing owned and not registered until
    /// [`Cluster::run`] has done its first heartbeat. `ownership` must be the fence the
    /// store was built with.
    pub fn new(
        config: ClusterConfig,
        ownership: Arc<Ownership>,
        table: Table,
        transport: Arc<dyn Transport>,
        incarnation: u64,
        system: &crate::System,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            ownership,
            table,
            transport,
            directory: system.directory().clone(),
            writer: system.writer().clone(),
            metrics: system.metrics().clone(),
            forwarders: DashMap::new(),
            incarnation,
            sequence: Arc::new(AtomicU64::new(0)),
            received: Mutex::new(received::Received::default()),
            registered: AtomicBool::new(false),
            leaving: AtomicBool::new(false),
            members: Arc::new(Mutex::new(Vec::new())),
            moving: AtomicBool::new(false),
            version: AtomicU64::new(0),
            vacant: Mutex::new(Default::default()),
            log: OnceLock::new(),
            suspended: Mutex::new(None),
            replaying: tokio::sync::Mutex::new(()),
            rounds: AtomicU64::new(0),
        })
    }

    /// The stream key of this node's `term` under the prefix `base` (INGEST_LOG_KEY).
    pub fn stream_key(base: &str, me: &str, term: u64) -> String {
        format!("{base}:{me}:{term}")
    }

    /// Appends the events this node admits to `log` (whose stream must be
    /// [`Cluster::stream_key`] of term 0) before they are answered; `redis` reads the
    /// streams of earlier owners. Set before the first heartbeat.
    pub fn use_log(&self, log: Arc<IngestLog>, base: String, redis: crate::store::RedisStore) {
        let logs = logs::Logs::new(redis, self.me().clone());
        let _ = self.log.set(ClusterLog {
            log,
            logs,
            base,
            term: AtomicU64::new(0),
            created: AtomicBool::new(false),
        });
    }

    /// This node's current stream, when the log is on.
    fn stream(&self) -> Option<RedisLog> {
        self.log.get().map(|l| l.log.stream())
    }

    /// This node's id.
    pub fn me(&self) -> &Arc<str> {
        self.ownership.me()
    }

    /// Whether the first heartbeat has registered this node.
    pub fn is_registered(&self) -> bool {
        self.registered.load(Ordering::Acquire)
    }

    /// Whether this node is shutting down.
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// Leaves the cluster: the next heartbeat says so, and this node hands every shard
    /// to its desired owner among the others. Forwarded events are still taken.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::Release);
        self.kick();
    }

    /// Resolves once this node owns no shard any more, or no other member could take
    /// them (it is the last one).
    pub async fn left(&self) {
        let mut changed = self.ownership.subscribe();
        loop {
            let others = self
                .members()
                .iter()
                .any(|m| !m.leaving && m.id != *self.me());
            if self.ownership.owned().is_empty() || !others {
                return;
            }
            let _ = tokio::time::timeout(self.config.heartbeat, changed.changed()).await;
        }
    }

    /// A round of the heartbeat now (a peer passed a shard here).
    pub fn kick(&self) {
        self.ownership.want_round();
    }

    /// Live members as of the last heartbeat.
    pub fn members(&self) -> Vec<Member> {
        self.members
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Removes this node's heartbeat (at exit, after its last flush).
    pub async fn forget_me(&self) {
        if let Err(e) = self.table.forget_me().await {
            tracing::debug!(error = %e, "could not remove this node's heartbeat; it expires after the lease");
        }
    }

    async fn forwarder(self: &Arc<Self>, peer: SocketAddr) -> Option<ActorRef<ForwarderMsg>> {
        if let Some(f) = self.forwarders.get(&peer) {
            return Some(f.clone());
        }
        let members = self.members.clone();
        let args = ForwarderArgs {
            peer,
            transport: self.transport.clone(),
            metrics: self.metrics.clone(),
            incarnation: self.incarnation,
            sequence: self.sequence.clone(),
            peer_alive: Arc::new(move || {
                members
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .iter()
                    .any(|m| m.addr == peer)
            }),
            retry_for: self.config.route_deadline() * 2,
        };
        let (actor, _) = Actor::spawn(None, Forwarder, args).await.ok()?;
        let winner = self.forwarders.entry(peer).or_insert(actor.clone()).clone();
        if winner.get_id() != actor.get_id() {
            actor.stop(None);
        }
        Some(winner)
    }

    /// Sends events to `peer` through its forwarder; answers the positions not taken
    /// (and whether because they belong elsewhere).
    async fn forward(
        self: &Arc<Self>,
        peer: SocketAddr,
        events: Vec<(Arc<str>, Event)>,
    ) -> Result<Vec<(usize, bool)>, ForwardError> {
        let Some(forwarder) = self.forwarder(peer).await else {
            return Err(ForwardError::Unreachable("no forwarder".into()));
        };
        // The forwarder bounds its own retries; this bounds the queue in front of it.
        let limit = self.config.route_deadline() * 2 + self.config.forward_timeout * 2;
        match forwarder
            .call(|port| ForwarderMsg::Forward(events, port), Some(limit))
            .await
        {
            Ok(CallResult::Success(ack)) => ack,
            Ok(CallResult::Timeout) => Err(ForwardError::Timeout),
            _ => {
                // The forwarder died: the next call starts a new one.
                self.forwarders.remove(&peer);
                Err(ForwardError::Unreachable("forwarder stopped".into()))
            }
        }
    }

    /// Queues a shard's events here, all or none (MAX_PENDING_EVENTS); called under the
    /// shard's lock. With the ingest log on they are handed to the appender instead,
    /// tagged with the shard's epoch, and the answer comes once they are in the log.
    fn push_local(
        &self,
        shard: u32,
        epoch: u64,
        events: &Positioned,
    ) -> Result<Option<Appended>, SubmitError> {
        if let Some(log) = self.log.get() {
            let part = events.iter().map(|(_, d, e)| (d.clone(), *e)).collect();
            return log.log.enqueue(part, Some(Tag { shard, epoch })).map(Some);
        }
        if !self.directory.admit(events.len()) {
            return Err(SubmitError::Overloaded);
        }
        for (i, (_, device, event)) in events.iter().enumerate() {
            if let Err(e) = self.directory.push_admitted(device, (*event).into()) {
                // Only Unavailable (the very end of shutdown) is possible while the
                // shard is active here: the events before this one are queued.
                self.directory.unadmit(events.len() - i - 1);
                return Err(e);
            }
        }
        Ok(None)
    }

    /// Takes one shard's events (in order): queued here while this node owns the shard,
    /// else forwarded to the owner the table names; waits while the shard is moving or
    /// has no reachable owner, up to the route deadline. Answers the positions not taken,
    /// each with whether it was because they belong to another node.
    ///
    /// `received`: the events were forwarded here, and this node's last rejoin as of
    /// their arrival. They are never forwarded again (two nodes whose copies of the table
    /// disagree for a moment would send them back and forth): those of a shard another
    /// node owns are answered as moved, and their sender routes them again. And they are
    /// acted on only while this node's lease holds and has not lapsed since they arrived:
    /// once it has, their sender may have given up on this node and sent them elsewhere,
    /// so they are refused.
    async fn submit_shard(
        self: &Arc<Self>,
        shard: u32,
        events: Positioned,
        received: Option<u64>,
    ) -> Vec<(usize, Refused)> {
        let deadline = Instant::now() + self.config.route_deadline();
        let mut changed = self.ownership.subscribe();
        let all = |why: Refused| events.iter().map(|e| (e.0, why)).collect::<Vec<_>>();
        loop {
            if let Some(rejoined) = received {
                if self.ownership.rejoined_at() != rejoined {
                    return all(Refused::Unroutable);
                }
            }
            let lease_ok = received.is_none() || self.ownership.lease_valid();
            match self
                .ownership
                .route(shard, |epoch| self.push_local(shard, epoch, &events))
            {
                Ok(Ok(None)) => return Vec::new(),
                Ok(Ok(Some(appended))) => {
                    return match settled(appended).await {
                        Ok(()) => Vec::new(),
                        Err(e) => {
                            tracing::debug!(shard, error = %e, "events not appended");
                            all(refusal(e))
                        }
                    }
                }
                Ok(Err(e)) => {
                    tracing::debug!(shard, error = %e, "events not admitted");
                    return all(refusal(e));
                }
                Err(Route::Remote(_)) if received.is_some() && lease_ok => {
                    return all(Refused::Moved)
                }
                Err(Route::Remote(peer)) if received.is_none() => {
                    let part = events.iter().map(|(_, d, e)| (d.clone(), *e)).collect();
                    match self.forward(peer, part).await {
                        // Not the owner any more (its table is newer than ours): read the
                        // table and route again.
                        Ok(refused) if !refused.is_empty() && refused.iter().all(|r| r.1) => {
                            self.kick()
                        }
                        // The owner could not take them (its bound, or no owner in time).
                        Ok(refused) => {
                            return refused
                                .into_iter()
                                .map(|(i, _)| (events[i].0, Refused::Overloaded))
                                .collect()
                        }
                        Err(ForwardError::Overloaded) => return all(Refused::Overloaded),
                        // With the log on, the owner may have logged them before it
                        // failed, and its successor replays them: sent elsewhere they
                        // could be counted twice, so they are refused.
                        Err(e) if e.maybe_delivered() && self.log.get().is_some() => {
                            return all(Refused::Unknown)
                        }
                        // Not delivered, or timed out while the table moved the shard
                        // (without the log): the table decides where they go now.
                        Err(_) => self.kick(),
                    }
                }
                Err(_) => self.kick(),
            }
            if Instant::now() >= deadline {
                tracing::debug!(shard, "no owner took the events in time");
                return all(Refused::Unroutable);
            }
            let _ = tokio::time::timeout(OWNER_WAIT_STEP, changed.changed()).await;
        }
    }

    /// Accepts one event: queued here if this node owns its shard, else forwarded to the
    /// owner and answered once the owner has queued it.
    pub async fn submit(self: &Arc<Self>, device: &str, event: Event) -> Result<(), SubmitError> {
        let shard = self.ownership.shard(device);
        let refused = self
            .submit_shard(shard, vec![(0, Arc::from(device), event)], None)
            .await;
        match refused.first() {
            None => Ok(()),
            Some((_, Refused::Overloaded)) => Err(SubmitError::Overloaded),
            Some((_, Refused::NotDurable)) => Err(SubmitError::NotDurable),
            Some((_, Refused::Unknown)) => Err(SubmitError::OutcomeUnknown),
            Some(_) => Err(SubmitError::Unroutable),
        }
    }

    /// Accepts a batch: split by shard, each shard's part queued here or forwarded to its
    /// owner (the forwarders merge the parts bound for one peer into one request), in the
    /// batch's order per device. Each part is all or nothing at its owner's
    /// MAX_PENDING_EVENTS: the answer lists the positions of the events that were not
    /// accepted (every other event is), and is `Err(Overloaded)` only when nothing was
    /// accepted, so that a 503 never hides an accepted event.
    pub async fn submit_batch(
        self: &Arc<Self>,
        events: Vec<(Arc<str>, Event)>,
    ) -> Result<Vec<usize>, SubmitError> {
        let total = events.len();
        let refused = self
            .take_positioned(events.into_iter().enumerate(), None)
            .await;
        if total > 0 && refused.len() == total {
            let all = |why: Refused| refused.iter().all(|r| r.1 == why);
            return Err(if all(Refused::NotDurable) {
                SubmitError::NotDurable
            } else if all(Refused::Unknown) {
                SubmitError::OutcomeUnknown
            } else {
                SubmitError::Overloaded
            });
        }
        Ok(refused.into_iter().map(|(i, _)| i).collect())
    }

    async fn take_positioned(
        self: &Arc<Self>,
        events: impl Iterator<Item = (usize, (Arc<str>, Event))>,
        received: Option<u64>,
    ) -> Vec<(usize, Refused)> {
        let mut by_shard: BTreeMap<u32, Positioned> = BTreeMap::new();
        for (i, (device, event)) in events {
            by_shard
                .entry(self.ownership.shard(&device))
                .or_default()
                .push((i, device, event));
        }
        let parts = futures_util::future::join_all(
            by_shard
                .into_iter()
                .map(|(shard, part)| self.submit_shard(shard, part, received)),
        )
        .await;
        let mut refused: Vec<(usize, Refused)> = parts.into_iter().flatten().collect();
        refused.sort_unstable_by_key(|r| r.0);
        refused
    }
}

/// Why a shard's part was refused here.
fn refusal(e: SubmitError) -> Refused {
    match e {
        SubmitError::Overloaded => Refused::Overloaded,
        SubmitError::NotDurable => Refused::NotDurable,
        _ => Refused::Unroutable,
    }
}

#[cfg(test)]
mod tests {
    use super::BatchId;

    #[test]
    fn batch_ids_round_trip_as_text() {
        for id in [
            BatchId(0, 0),
            BatchId(0xdead_beef, 42),
            BatchId(u64::MAX, u64::MAX),
        ] {
            assert_eq!(id.to_string().parse::<BatchId>(), Ok(id));
        }
        assert!("nope".parse::<BatchId>().is_err());
        assert!("1-zz".parse::<BatchId>().is_err());
    }
}
