//! Scale-out: one owner per device across replicas, so the analytics stay exact.
//!
//! - [`ownership`]: which member owns a device (rendezvous hashing; pure).
//! - [`membership`]: the member list from discovery plus liveness, as a [`View`].
//! - [`forwarder`]: one actor per peer, batching events to the devices it owns.
//! - [`handoff`]: the fenced move of a device's window to its new owner.
//! - [`wire`]: the binary body of a forwarded batch.
//!
//! [`Cluster`] ties them together: [`Cluster::submit`] routes an event to its owner (this
//! node's directory, or a forwarder) and answers once the owner has queued it; the
//! internal listener calls [`Cluster::receive`] with the batches other nodes forward.
//! HTTP itself is the binary's business: it implements [`Transport`].

pub mod forwarder;
pub mod handoff;
pub mod membership;
pub mod ownership;
pub mod wire;

pub use handoff::{Fences, Handoff, ReleaseError};
pub use membership::{Membership, View};
pub use ownership::Ring;

use crate::device::{BoxFuture, Directory, SubmitError};
use crate::event::Event;
use crate::metrics::{ForwardFailure, Metrics};
use crate::store::WindowSnapshot;
use bytes::Bytes;
use dashmap::DashMap;
use forwarder::{Forwarder, ForwarderArgs, ForwarderMsg};
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How a node answers a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// Ready and owning devices.
    Member,
    /// Running, first discovery not done yet: owns nothing.
    Starting,
    /// Shutting down: owns nothing, still answers handoffs and forwarded events.
    Leaving,
}

impl PeerState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Member => "member",
            PeerState::Starting => "starting",
            PeerState::Leaving => "leaving",
        }
    }

    /// From the wire name.
    pub fn parse(s: &str) -> Option<Self> {
        [PeerState::Member, PeerState::Starting, PeerState::Leaving]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// Why a call to a peer did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// No answer within CLUSTER_FORWARD_TIMEOUT.
    #[error("no answer within the forward timeout")]
    Timeout,
    /// Could not connect, or the connection broke.
    #[error("unreachable: {0}")]
    Unreachable(String),
    /// The peer refused the request (status code).
    #[error("refused with status {0}")]
    Rejected(u16),
    /// The peer is at MAX_PENDING_EVENTS: the events were not accepted (a client gets
    /// 503 and retries).
    #[error("the owner is overloaded")]
    Overloaded,
}

impl ForwardError {
    /// The failure reason for metrics; `None` for an overload (not a failure of the peer).
    pub fn failure(&self) -> Option<ForwardFailure> {
        match self {
            ForwardError::Timeout => Some(ForwardFailure::Timeout),
            ForwardError::Unreachable(_) => Some(ForwardFailure::Unreachable),
            ForwardError::Rejected(_) => Some(ForwardFailure::Rejected),
            ForwardError::Overloaded => None,
        }
    }
}

/// How nodes talk to each other (HTTP in the binary). Each call is bounded by the
/// forward timeout.
pub trait Transport: Send + Sync + 'static {
    /// Sends an encoded batch ([`wire`]); `Ok` once the peer has queued all of it.
    fn send_events(&self, peer: SocketAddr, body: Bytes) -> BoxFuture<Result<(), ForwardError>>;
    /// Asks a peer how it is.
    fn ping(&self, peer: SocketAddr) -> BoxFuture<Result<PeerState, ForwardError>>;
    /// Asks a peer to release `device` to this node and answer its final window.
    fn release(
        &self,
        peer: SocketAddr,
        device: Arc<str>,
    ) -> BoxFuture<Result<Option<WindowSnapshot>, ForwardError>>;
    /// Hands `device`'s final window to its new owner `peer`.
    fn adopt(
        &self,
        peer: SocketAddr,
        device: Arc<str>,
        window: WindowSnapshot,
    ) -> BoxFuture<Result<(), ForwardError>>;
}

/// The cluster settings, validated.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// CLUSTER_PEERS: `host:port` entries (a DNS name may stand for many members).
    pub peers: Vec<String>,
    /// CLUSTER_ADVERTISE_ADDR: this node as its peers reach it.
    pub advertise: SocketAddr,
    /// CLUSTER_DISCOVERY_INTERVAL.
    pub discovery_interval: Duration,
    /// CLUSTER_FORWARD_TIMEOUT.
    pub forward_timeout: Duration,
    /// How long handoff fences are kept (the window is in the store by then).
    pub fence_ttl: Duration,
}

/// Where an event goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Local,
    Remote(SocketAddr),
}

/// Forwarding attempts to owners before an event is processed here regardless.
const FORWARD_ATTEMPTS: usize = 3;

/// This node's part of the cluster.
pub struct Cluster {
    config: ClusterConfig,
    membership: Arc<Membership>,
    transport: Arc<dyn Transport>,
    directory: Directory,
    handoff: Arc<Handoff>,
    forwarders: DashMap<SocketAddr, ActorRef<ForwarderMsg>>,
    metrics: Metrics,
    stop: watch::Sender<bool>,
}

impl Cluster {
    /// Joins the cluster: links the device actors to their predecessors and starts
    /// discovery (the first round runs at once; until it completes the node is not ready).
    pub fn start(
        config: ClusterConfig,
        transport: Arc<dyn Transport>,
        system: &crate::System,
    ) -> Arc<Self> {
        let membership = Arc::new(Membership::new(config.advertise));
        let handoff = Arc::new(Handoff {
            membership: membership.clone(),
            transport: transport.clone(),
            directory: system.directory().clone(),
            writer: system.writer().clone(),
            fences: Arc::new(Fences::default()),
            adopted: DashMap::new(),
            inbox: system.inbox().clone(),
            metrics: system.metrics().clone(),
            drain_timeout: config.forward_timeout / 2,
        });
        system.link_predecessor(Arc::new(handoff::PredecessorLink(handoff.clone())));
        let (stop, stopped) = watch::channel(false);
        let cluster = Arc::new(Self {
            config,
            membership,
            transport,
            directory: system.directory().clone(),
            handoff,
            forwarders: DashMap::new(),
            metrics: system.metrics().clone(),
            stop,
        });
        tokio::spawn(cluster.clone().discover(stopped));
        cluster
    }

    /// The membership (readiness, probes).
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The handoff (the internal listener's release endpoint).
    pub fn handoff(&self) -> &Handoff {
        &self.handoff
    }

    /// Leaves the cluster: peers stop routing here at their next probe. The node keeps
    /// answering forwarded events and handoffs until it exits.
    pub fn leave(&self) {
        self.membership.leave();
        let view = self.membership.view();
        self.metrics.cluster_members.set(view.ring.len() as i64);
        self.hand_off_moved(&view);
    }

    /// How long a leaving node waits for every peer to have seen it leave.
    pub fn leave_grace(&self) -> Duration {
        2 * self.config.discovery_interval + self.config.forward_timeout
    }

    /// Stops discovery.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    async fn discover(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut last_resolved = BTreeSet::new();
        let mut ticker = tokio::time::interval(self.config.discovery_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stopped.changed() => return,
            }
            let resolved = resolve(&self.config.peers).await;
            if let Some(view) = self
                .membership
                .refresh(resolved, &mut last_resolved, &*self.transport)
                .await
            {
                self.metrics.cluster_members.set(view.ring.len() as i64);
                tracing::info!(
                    members = ?view.ring.members().collect::<Vec<_>>(),
                    reachable = view.reachable.len(),
                    "cluster view changed"
                );
                self.hand_off_moved(&view);
            }
            self.handoff.fences.expire(self.config.fence_ttl);
            self.handoff
                .adopted
                .retain(|_, (_, since)| since.elapsed() < self.config.fence_ttl);
        }
    }

    /// After a view change: every live device this node no longer owns goes to its new
    /// owner now, rather than when the owner next asks (a device whose owner changes back
    /// later must not find a stale actor here).
    fn hand_off_moved(&self, view: &View) {
        let me = self.membership.me();
        if !view.ring.contains(me) && !self.membership.is_leaving() {
            // Not a member (yet): nothing here is owned by anyone else in particular.
            return;
        }
        for device in self.directory.device_ids() {
            match view.ring.owner(&device) {
                Some(owner) if owner != me => {
                    let handoff = self.handoff.clone();
                    tokio::spawn(async move { handoff.push(device, owner).await });
                }
                _ => {}
            }
        }
    }

    fn route(&self, device: &str) -> Route {
        let me = self.membership.me();
        let view = self.membership.view();
        // A device this node handed off goes to its new owner while that is a member,
        // whatever this node's view says: its window is there now.
        if let Some(holder) = self.handoff.fences.holder(device) {
            if holder != me && view.ring.contains(holder) {
                return Route::Remote(holder);
            }
        }
        match view.ring.owner(device) {
            Some(owner) if owner != me => Route::Remote(owner),
            _ => Route::Local,
        }
    }

    async fn forwarder(&self, peer: SocketAddr) -> Option<ActorRef<ForwarderMsg>> {
        if let Some(f) = self.forwarders.get(&peer) {
            return Some(f.clone());
        }
        let args = ForwarderArgs {
            peer,
            transport: self.transport.clone(),
            metrics: self.metrics.clone(),
        };
        let (actor, _) = Actor::spawn(None, Forwarder, args).await.ok()?;
        let winner = self.forwarders.entry(peer).or_insert(actor.clone()).clone();
        if winner.get_id() != actor.get_id() {
            actor.stop(None);
        }
        Some(winner)
    }

    /// Sends events to `peer` through its forwarder; answers when acknowledged.
    async fn forward(
        &self,
        peer: SocketAddr,
        events: Vec<(Arc<str>, Event)>,
    ) -> Result<(), ForwardError> {
        let Some(forwarder) = self.forwarder(peer).await else {
            return Err(ForwardError::Unreachable("no forwarder".into()));
        };
        // The transport bounds the wire time; this bounds the queue in front of it.
        let limit = self.config.forward_timeout * 4;
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

    /// Accepts one event: queued here if this node owns the device, else forwarded to the
    /// owner and answered once the owner has queued it. A failed forward is retried
    /// under the refreshed view, and at last the event is processed here: an event
    /// answered `Ok` is never dropped.
    pub async fn submit(&self, device: &str, event: Event) -> Result<(), SubmitError> {
        for _ in 0..FORWARD_ATTEMPTS {
            match self.route(device) {
                Route::Local => match self.directory.submit(device, event) {
                    Err(SubmitError::HandedOff) => continue,
                    other => return other,
                },
                Route::Remote(peer) => {
                    match self.forward(peer, vec![(Arc::from(device), event)]).await {
                        Ok(()) => return Ok(()),
                        Err(ForwardError::Overloaded) => return Err(SubmitError::Overloaded),
                        Err(_) => {
                            self.membership.mark_down(peer);
                            self.metrics
                                .cluster_members
                                .set(self.membership.view().ring.len() as i64);
                        }
                    }
                }
            }
        }
        self.directory.submit(device, event)
    }

    /// Accepts a batch forwarded by another node: one hop only, so it is queued here —
    /// except the events of devices this node has handed off, which go on to their new
    /// owner. Admission of the local part is all or nothing.
    pub async fn receive(&self, events: Vec<(Arc<str>, Event)>) -> Result<(), SubmitError> {
        let count = events.len() as u64;
        let (onward, local): (Vec<_>, Vec<_>) = events
            .into_iter()
            .partition(|(d, _)| self.fenced(d).is_some());
        let moved = self.directory.submit_many(local.into_iter())?;
        let mut onward = onward;
        onward.extend(moved);
        for (device, event) in onward {
            match self.fenced(&device) {
                Some(holder) => {
                    if self
                        .forward(holder, vec![(device.clone(), event)])
                        .await
                        .is_err()
                    {
                        self.membership.mark_down(holder);
                        self.directory.submit(&device, event)?;
                    }
                }
                None => self.directory.submit(&device, event)?,
            }
        }
        self.metrics.forwarded_events_received.inc_by(count);
        Ok(())
    }

    fn fenced(&self, device: &str) -> Option<SocketAddr> {
        let holder = self.handoff.fences.holder(device)?;
        (holder != self.membership.me() && self.membership.view().reachable.contains(&holder))
            .then_some(holder)
    }
}

/// Resolves every `host:port` entry; `None` when nothing resolved at all (a DNS outage:
/// the caller keeps the previous answer rather than dropping every member).
async fn resolve(peers: &[String]) -> Option<BTreeSet<SocketAddr>> {
    let mut out = BTreeSet::new();
    let mut any = false;
    for entry in peers {
        match tokio::net::lookup_host(entry.as_str()).await {
            Ok(addrs) => {
                any = true;
                out.extend(addrs);
            }
            Err(e) => tracing::warn!(peer = %entry, error = %e, "cannot resolve cluster peer"),
        }
    }
    any.then_some(out)
}
