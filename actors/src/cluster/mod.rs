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
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

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
    /// Asks a peer how it is. `rejoin`: the peer is not in this node's ring, so while
    /// it was out its devices may have been processed elsewhere (it resyncs: see
    /// [`Cluster::request_resync`]).
    fn ping(&self, peer: SocketAddr, rejoin: bool) -> BoxFuture<Result<PeerState, ForwardError>>;
    /// Asks a peer to release `device` to this node and answer its final window.
    fn release(
        &self,
        peer: SocketAddr,
        device: Arc<str>,
    ) -> BoxFuture<Result<Option<WindowSnapshot>, ForwardError>>;
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

/// Events with their devices, as forwarded.
type Events = Vec<(Arc<str>, Event)>;

/// A device id with the position of its event in a batch.
struct Positioned(usize, Arc<str>);

impl AsRef<str> for Positioned {
    fn as_ref(&self) -> &str {
        &self.1
    }
}

/// Where an event goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Local,
    Remote(SocketAddr),
}

/// Discovery rounds after a view change during which idle device actors are stopped.
/// After a change, any device may have been processed elsewhere (a node left out for a
/// while, a new owner): an actor that stops here restarts on the device's next event by
/// asking the device's possible holders for the window (see [`handoff`]), so no actor
/// keeps a window that another node has since moved on. Busy actors are tried again in
/// the next rounds.
const RESYNC_ROUNDS: u32 = 3;

/// How often an event whose slot is closed for a handoff under way is tried again.
const HANDOFF_POLL: Duration = Duration::from_millis(1);

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
    resync_requested: AtomicBool,
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
            metrics: system.metrics().clone(),
            // The caller of a release waits four forward timeouts (see the transport) and
            // the holder may take three (drain, stop, writer), so a release that drains
            // within one answers in time.
            drain_timeout: config.forward_timeout,
            asking: DashMap::new(),
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
            resync_requested: AtomicBool::new(false),
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
        self.publish_members();
    }

    /// `cluster_members` follows the view, whichever way it changed.
    fn publish_members(&self) {
        self.metrics
            .cluster_members
            .set(self.membership.view().ring.len() as i64);
    }

    /// How long a leaving node waits for every peer to have seen it leave.
    pub fn leave_grace(&self) -> Duration {
        2 * self.config.discovery_interval + self.config.forward_timeout
    }

    /// A peer probed this node while it was out of the peer's ring: this node may have
    /// been cut off (a partition, a pause) while others took its devices over, and its
    /// own view may never have changed. Its idle actors stop now, before the probe is
    /// answered (the peer may route devices here the moment it is), and busy ones over
    /// the next rounds; each restarts from the newest window among the device's
    /// possible holders.
    pub fn request_resync(&self) {
        self.directory.evict_drained();
        self.resync_requested.store(true, Ordering::Release);
    }

    /// Stops discovery.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    async fn discover(self: Arc<Self>, mut stopped: watch::Receiver<bool>) {
        let mut last_resolved = BTreeSet::new();
        let mut resync = 0;
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
                self.publish_members();
                tracing::info!(
                    members = ?view.ring.members().collect::<Vec<_>>(),
                    reachable = view.reachable.len(),
                    "cluster view changed"
                );
                resync = RESYNC_ROUNDS;
            }
            if self.resync_requested.swap(false, Ordering::AcqRel) {
                resync = RESYNC_ROUNDS;
            }
            if resync > 0 {
                resync -= 1;
                self.directory.evict_drained();
            }
            self.handoff.fences.expire(self.config.fence_ttl);
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
        let limit = self.config.forward_timeout * 2;
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
    /// owner and answered once the owner has queued it.
    ///
    /// A peer that refuses the connection (or the token) is left out at once and the
    /// event re-routed. A peer that is only slow is not: a timed-out forward is retried
    /// to the owner of the refreshed view, and the owner changes only when its probes
    /// fail too (a node-wide decision, so that one node's impatience does not give a
    /// device two owners). Past [`Cluster::reroute_deadline`] the owner is left out
    /// anyway, and at last the event is processed here: an event answered `Ok` is never
    /// dropped. A retried event that the slow owner had queued after all is recognised
    /// by its device actor and counted once.
    pub async fn submit(&self, device: &str, event: Event) -> Result<(), SubmitError> {
        let deadline = Instant::now() + self.reroute_deadline();
        let device_arc: Arc<str> = Arc::from(device);
        loop {
            let peer = match self.route(device) {
                Route::Local => match self.directory.submit(device, event) {
                    // The slot closed for a handoff under us: route again (fenced now).
                    Err(SubmitError::HandedOff) if Instant::now() < deadline => {
                        // The route follows the fence once the holder is a member here;
                        // until then the handoff has to end first.
                        tokio::time::sleep(HANDOFF_POLL).await;
                        continue;
                    }
                    other => return other,
                },
                Route::Remote(peer) => peer,
            };
            match self.forward(peer, vec![(device_arc.clone(), event)]).await {
                Ok(()) => return Ok(()),
                Err(ForwardError::Overloaded) => return Err(SubmitError::Overloaded),
                Err(ForwardError::Timeout) if Instant::now() < deadline => {}
                Err(_) => self.leave_out(peer),
            }
            if Instant::now() >= deadline + self.config.forward_timeout * 2 {
                return self.directory.submit(device, event);
            }
        }
    }

    /// Accepts a batch: split by owner, this node's part queued here and each peer's
    /// part forwarded in one message, in the batch's order per device (one route per
    /// device for the whole batch, so a view change midway cannot split a device's
    /// events). Each part is all or nothing at its owner's MAX_PENDING_EVENTS: the answer
    /// lists the positions of the events that were not accepted (every other event is),
    /// and is `Err(Overloaded)` only when nothing was accepted, so that a 503 never hides
    /// an accepted event. A part whose owner failed otherwise goes through
    /// [`Cluster::submit`] event by event (re-routed); once one event of a device is
    /// refused there, its later events are refused too, so a client that retries the
    /// refused ones keeps the device's order.
    pub async fn submit_batch(
        &self,
        events: Vec<(Arc<str>, Event)>,
    ) -> Result<Vec<usize>, SubmitError> {
        let mut routes: HashMap<Arc<str>, Route> = HashMap::new();
        let mut local = Vec::new();
        // Per peer: the events' positions in the batch, and the events.
        let mut remote: HashMap<SocketAddr, (Vec<usize>, Events)> = HashMap::new();
        for (i, (device, event)) in events.into_iter().enumerate() {
            let route = *routes
                .entry(device.clone())
                .or_insert_with(|| self.route(&device));
            match route {
                Route::Local => local.push((Positioned(i, device), event)),
                Route::Remote(peer) => {
                    let part = remote.entry(peer).or_default();
                    part.0.push(i);
                    part.1.push((device, event));
                }
            }
        }
        let mut accepted_any = false;
        let mut again = Vec::new();
        if !local.is_empty() {
            let queued = local.len();
            // Refused here: nothing is sent anywhere, the whole batch is refused.
            let moved = self.directory.submit_many(local.into_iter())?;
            accepted_any = moved.len() < queued;
            // Handed off meanwhile (not queued here): through the single-event path,
            // which follows the fence.
            again.extend(moved.into_iter().map(|(p, event)| (p.0, p.1, event)));
        }
        let sent = futures_util::future::join_all(remote.into_iter().map(
            |(peer, (positions, part))| async move {
                let result = self.forward(peer, part.clone()).await;
                (peer, positions, part, result)
            },
        ))
        .await;
        let mut refused = Vec::new();
        for (peer, positions, part, result) in sent {
            match result {
                Ok(()) => accepted_any = true,
                Err(ForwardError::Overloaded) => refused.extend(positions),
                Err(e) => {
                    if e != ForwardError::Timeout {
                        self.leave_out(peer);
                    }
                    again.extend(positions.into_iter().zip(part).map(|(i, (d, e))| (i, d, e)));
                }
            }
        }
        // One task per device keeps each device's events in order.
        let mut per_device: HashMap<Arc<str>, Vec<(usize, Event)>> = HashMap::new();
        for (i, device, event) in again {
            per_device.entry(device).or_default().push((i, event));
        }
        let retried = futures_util::future::join_all(per_device.into_iter().map(
            |(device, events)| async move {
                let mut refused = Vec::new();
                let mut accepted = false;
                for (i, event) in events {
                    if !refused.is_empty() || self.submit(&device, event).await.is_err() {
                        refused.push(i);
                    } else {
                        accepted = true;
                    }
                }
                (accepted, refused)
            },
        ))
        .await;
        for (accepted, positions) in retried {
            accepted_any |= accepted;
            refused.extend(positions);
        }
        if !accepted_any {
            return Err(SubmitError::Overloaded);
        }
        refused.sort_unstable();
        Ok(refused)
    }

    /// How long a device's events keep going to an owner that times out, before it is
    /// left out regardless: long enough for the probes (which decide for every node
    /// alike) to fail it first.
    fn reroute_deadline(&self) -> Duration {
        (self.config.discovery_interval + self.config.forward_timeout)
            * (membership::PROBE_FAILURES_TO_LEAVE + 1)
    }

    fn leave_out(&self, peer: SocketAddr) {
        self.membership.mark_down(peer);
        self.publish_members();
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
        // Part of the batch is queued already: from here on every event is taken, so
        // that the answer stays all or nothing (a refused batch is resent whole).
        for (device, event) in onward {
            self.take_regardless(&device, event).await?;
        }
        self.metrics.forwarded_events_received.inc_by(count);
        Ok(())
    }

    /// Takes one event of a batch that is partly queued already: at the device's new
    /// holder, else here past MAX_PENDING_EVENTS. A slot closed for a handoff under way
    /// refuses it until the handoff ends (the slot is then unlisted, or reopened when
    /// the handoff gave up): wait for that. Refusing would answer the whole batch as not
    /// taken while part of it is queued, and its sender's client would send that part
    /// again (an event counted twice, seen at a scale-in).
    async fn take_regardless(&self, device: &Arc<str>, event: Event) -> Result<(), SubmitError> {
        // A release runs to its end (drain, stop, writer: three forward timeouts at
        // most); this bound only guards against a slot that never reopens.
        let deadline = Instant::now() + self.reroute_deadline();
        loop {
            if let Some(holder) = self.fenced(device) {
                if self
                    .forward(holder, vec![(device.clone(), event)])
                    .await
                    .is_ok()
                {
                    return Ok(());
                }
            }
            // The holder cannot take it: it is processed here; its actor starts from the
            // newest window it can find.
            match self.directory.submit_regardless(device, event) {
                Err(SubmitError::HandedOff) if Instant::now() < deadline => {
                    tokio::time::sleep(HANDOFF_POLL).await;
                }
                other => return other,
            }
        }
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

#[cfg(test)]
mod tests;
