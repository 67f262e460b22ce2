//! Who is in the cluster: the member list from discovery (DNS or a static list),
//! filtered by liveness, as the [`View`] every routing decision reads.
//!
//! Every `CLUSTER_DISCOVERY_INTERVAL` the peer spec is resolved (a headless Service's
//! name resolves to the addresses of its ready pods) and every peer is probed. A member
//! is an address that resolved and answered its probe as a member; this node is one when
//! its own address resolved and it is not leaving. A peer that fails a forward is taken
//! out at once ([`Membership::mark_down`]) and comes back when a probe answers again. A
//! peer that stops resolving is still probed for a while: a pod that is shutting down
//! leaves the DNS answer at once but keeps answering handoff requests until it exits.

use super::ownership::Ring;
use super::{PeerState, Transport};
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use tokio::time::Instant;

/// One node's view of the cluster at a moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// The members that own devices now.
    pub ring: Ring,
    /// The members before the last change (where a device may have been owned).
    pub previous: Ring,
    /// Peers that answered their last contact (members, leaving or starting nodes).
    pub reachable: BTreeSet<SocketAddr>,
}

/// The live membership of this node; cheap to share.
#[derive(Debug)]
pub struct Membership {
    me: SocketAddr,
    view: RwLock<Arc<View>>,
    leaving: AtomicBool,
    discovered: AtomicBool,
    /// Per peer: consecutive failed probes (one late answer on a busy node is not a
    /// departure; a member is left out after [`PROBE_FAILURES_TO_LEAVE`] in a row), and
    /// when a forward to it last failed.
    health: Mutex<HashMap<SocketAddr, PeerHealth>>,
    /// The peers the last discovery round probed (resolved, member or reachable) that
    /// have answered a probe since they were first probed.
    known: RwLock<Arc<BTreeSet<SocketAddr>>>,
}

#[derive(Debug, Default)]
struct PeerHealth {
    failures: u32,
    /// Left out after a failed forward: only a probe sent after this brings it back.
    down_at: Option<Instant>,
    /// Has answered a probe since it was first probed: a node that has been part of the
    /// cluster (an address that never answered, say a dead entry of a static peer list,
    /// is not [`Membership::known`]: asking it for a window would only wait).
    answered: bool,
}

/// Probe rounds a member must fail in a row before it is left out (a failed forward
/// leaves it out at once).
pub const PROBE_FAILURES_TO_LEAVE: u32 = 2;

impl Membership {
    /// A membership that knows itself as `me` and no one else yet.
    pub fn new(me: SocketAddr) -> Self {
        Self {
            me,
            view: RwLock::new(Arc::new(View::default())),
            leaving: AtomicBool::new(false),
            discovered: AtomicBool::new(false),
            health: Mutex::new(HashMap::new()),
            known: RwLock::new(Arc::default()),
        }
    }

    /// This node's advertised address.
    pub fn me(&self) -> SocketAddr {
        self.me
    }

    /// The current view.
    pub fn view(&self) -> Arc<View> {
        // A poisoned lock still holds a whole Arc: nothing panics while it is held.
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Every peer the last discovery round knew of (resolved, member or reachable) that
    /// has answered a probe since it was first probed, members or not, this node
    /// excluded. After this node was cut off, its own ring may still leave out the
    /// peers that took its devices over meanwhile; these are where a device may be now.
    pub fn known(&self) -> Arc<BTreeSet<SocketAddr>> {
        self.known
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Test only: a view as if discovery had produced it.
    #[cfg(test)]
    pub(crate) fn set_view(&self, view: View) {
        self.update(|_| Some(view));
    }

    fn update(&self, change: impl FnOnce(&View) -> Option<View>) -> Option<Arc<View>> {
        let mut view = self.view.write().unwrap_or_else(PoisonError::into_inner);
        let next = Arc::new(change(&view)?);
        *view = next.clone();
        Some(next)
    }

    /// Whether the first discovery round has completed (readiness).
    pub fn is_discovered(&self) -> bool {
        self.discovered.load(Ordering::Acquire)
    }

    /// Whether this node has announced that it is leaving.
    pub fn is_leaving(&self) -> bool {
        self.leaving.load(Ordering::Acquire)
    }

    /// What this node answers to a probe.
    pub fn state(&self) -> PeerState {
        if self.is_leaving() {
            PeerState::Leaving
        } else if self.is_discovered() {
            PeerState::Member
        } else {
            PeerState::Starting
        }
    }

    /// Leaves the ring: peers see `leaving` at their next probe and stop routing here.
    pub fn leave(&self) {
        self.leaving.store(true, Ordering::Release);
        let me = self.me;
        self.update(|v| {
            v.ring.contains(me).then(|| View {
                ring: Ring::new(v.ring.members().filter(|m| *m != me)),
                previous: v.ring.clone(),
                reachable: v.reachable.clone(),
            })
        });
    }

    /// A forward to `peer` failed: it owns nothing until a probe answers again.
    pub fn mark_down(&self, peer: SocketAddr) {
        self.health
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(peer)
            .or_default()
            .down_at = Some(Instant::now());
        let changed = self.update(|v| {
            (v.ring.contains(peer) || v.reachable.contains(&peer)).then(|| View {
                ring: Ring::new(v.ring.members().filter(|m| *m != peer)),
                previous: if v.ring.contains(peer) {
                    v.ring.clone()
                } else {
                    v.previous.clone()
                },
                reachable: v.reachable.iter().copied().filter(|m| *m != peer).collect(),
            })
        });
        if changed.is_some() {
            tracing::warn!(%peer, "peer left out of ownership after a failed forward");
        }
    }

    /// One discovery round: `resolved` is what the peer spec resolved to (`None` when
    /// resolution failed: the last answer is kept), probed through `transport`.
    /// Returns the new view when it changed.
    pub async fn refresh(
        &self,
        resolved: Option<BTreeSet<SocketAddr>>,
        last_resolved: &mut BTreeSet<SocketAddr>,
        transport: &dyn Transport,
    ) -> Option<Arc<View>> {
        if let Some(resolved) = resolved {
            *last_resolved = resolved;
        }
        let current = self.view();
        let round = Instant::now();
        // Probe what resolves, plus whoever was a member or reachable: a pod that is
        // shutting down leaves the DNS answer before it stops answering.
        let to_probe: BTreeSet<SocketAddr> = last_resolved
            .iter()
            .copied()
            .chain(current.ring.members())
            .chain(current.reachable.iter().copied())
            .filter(|a| *a != self.me)
            .collect();
        let probes = futures_util::future::join_all(
            to_probe
                .iter()
                .map(|peer| transport.ping(*peer, !current.ring.contains(*peer))),
        )
        .await;
        // Decided under the view's lock, against the view as it is now: a forward that
        // failed while the probes ran has left its peer out, and a probe answered before
        // that failure must not bring it back (see `mark_down`); and a node that began
        // leaving meanwhile (`leave` sets the flag before it takes the lock) stays out.
        let changed = self.update(|v| {
            let mut health = self.health.lock().unwrap_or_else(PoisonError::into_inner);
            health.retain(|peer, _| to_probe.contains(peer));
            let me = (last_resolved.contains(&self.me) && !self.is_leaving()).then_some(self.me);
            let mut members: Vec<SocketAddr> = me.into_iter().collect();
            let mut reachable = BTreeSet::new();
            for (peer, state) in to_probe.iter().zip(&probes) {
                let h = health.entry(*peer).or_default();
                let downed_since_round = h.down_at.is_some_and(|t| t >= round);
                match state {
                    Ok(state) if !downed_since_round => {
                        *h = PeerHealth {
                            answered: true,
                            ..PeerHealth::default()
                        };
                        reachable.insert(*peer);
                        if *state == PeerState::Member && last_resolved.contains(peer) {
                            members.push(*peer);
                        }
                    }
                    _ => {
                        h.failures += 1;
                        if h.failures < PROBE_FAILURES_TO_LEAVE && h.down_at.is_none() {
                            if v.reachable.contains(peer) {
                                reachable.insert(*peer);
                            }
                            if last_resolved.contains(peer) && v.ring.contains(*peer) {
                                members.push(*peer);
                            }
                        }
                    }
                }
            }
            *self.known.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(
                health
                    .iter()
                    .filter(|(_, h)| h.answered)
                    .map(|(peer, _)| *peer)
                    .collect(),
            );
            let ring = Ring::new(members);
            (v.ring != ring || v.reachable != reachable).then(|| View {
                previous: if v.ring != ring {
                    v.ring.clone()
                } else {
                    v.previous.clone()
                },
                ring,
                reachable,
            })
        });
        self.discovered.store(true, Ordering::Release);
        changed
    }
}

#[cfg(test)]
mod tests;
