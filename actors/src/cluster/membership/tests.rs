//! Membership on a scripted transport: who a discovery round probes and how, when a
//! peer joins, stays or is left out of the ring, what a failed forward, a failed
//! resolution and leaving change, and what this node answers to a probe.

use super::*;
use crate::cluster::ForwardError;
use crate::device::BoxFuture;
use crate::store::WindowSnapshot;
use bytes::Bytes;
use std::cell::Cell;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;
use tokio::sync::watch;

const fn peer(last: u8) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 8081))
}

const ME: SocketAddr = peer(1);
const B: SocketAddr = peer(2);
const C: SocketAddr = peer(3);

/// Discovery rounds are this far apart.
const INTERVAL: Duration = Duration::from_secs(5);

/// Peers as probes see them: each answers what the test last set for it (nothing set:
/// unreachable), once the test lets answers through (at once unless held). Every probe
/// is recorded as `(peer, rejoin)`. Events and releases are not needed here.
struct Peers {
    answers: Mutex<HashMap<SocketAddr, Result<PeerState, ForwardError>>>,
    asked: Mutex<Vec<(SocketAddr, bool)>>,
    open: watch::Sender<bool>,
}

impl Peers {
    fn new() -> Self {
        Self {
            answers: Mutex::default(),
            asked: Mutex::default(),
            open: watch::Sender::new(true),
        }
    }

    /// From now on `peer` answers its probes with `state`.
    fn answer(&self, peer: SocketAddr, state: PeerState) {
        self.set(peer, Ok(state));
    }

    /// From now on `peer` does not answer its probes.
    fn fail(&self, peer: SocketAddr) {
        self.set(peer, Err(ForwardError::Timeout));
    }

    fn set(&self, peer: SocketAddr, answer: Result<PeerState, ForwardError>) {
        self.answers.lock().expect("answers").insert(peer, answer);
    }

    /// The probes sent since the last call, in the order they were sent.
    fn asked(&self) -> Vec<(SocketAddr, bool)> {
        std::mem::take(&mut *self.asked.lock().expect("asked"))
    }

    /// Probes wait for [`Peers::release`] before they answer.
    fn hold(&self) {
        self.open.send_replace(false);
    }

    fn release(&self) {
        self.open.send_replace(true);
    }
}

impl Transport for Peers {
    fn send_events(&self, _: SocketAddr, _: Bytes) -> BoxFuture<Result<(), ForwardError>> {
        crate::cluster::tests::unreachable("test peer")
    }

    fn ping(&self, peer: SocketAddr, rejoin: bool) -> BoxFuture<Result<PeerState, ForwardError>> {
        self.asked.lock().expect("asked").push((peer, rejoin));
        let answer = self
            .answers
            .lock()
            .expect("answers")
            .get(&peer)
            .cloned()
            .unwrap_or(Err(ForwardError::Unreachable("test peer".into())));
        let mut open = self.open.subscribe();
        Box::pin(async move {
            open.wait_for(|open| *open)
                .await
                .expect("the peers outlive the probe");
            answer
        })
    }

    fn release(
        &self,
        _: SocketAddr,
        _: Arc<str>,
    ) -> BoxFuture<Result<Option<WindowSnapshot>, ForwardError>> {
        crate::cluster::tests::unreachable("test peer")
    }
}

/// This node (`ME`), its peers, and what the peer spec last resolved to.
struct Node {
    membership: Membership,
    peers: Peers,
    last_resolved: Cell<BTreeSet<SocketAddr>>,
}

impl Node {
    fn new() -> Self {
        Self {
            membership: Membership::new(ME),
            peers: Peers::new(),
            last_resolved: Cell::default(),
        }
    }

    /// The next discovery round, in which the peer spec resolved to `resolved`.
    async fn round(&self, resolved: &[SocketAddr]) -> Option<Arc<View>> {
        self.round_resolving(Some(resolved.iter().copied().collect()))
            .await
    }

    /// The next discovery round (one interval after the last), in which resolution
    /// answered `resolved` (`None`: it failed).
    async fn round_resolving(&self, resolved: Option<BTreeSet<SocketAddr>>) -> Option<Arc<View>> {
        tokio::time::advance(INTERVAL).await;
        let mut last = self.last_resolved.take();
        let changed = self
            .membership
            .refresh(resolved, &mut last, &self.peers)
            .await;
        self.last_resolved.set(last);
        changed
    }

    /// A node whose ring is `ME` and `members`, each answering as a member.
    async fn with_members(members: &[SocketAddr]) -> Self {
        let node = Self::new();
        for m in members {
            node.peers.answer(*m, PeerState::Member);
        }
        let mut resolved = vec![ME];
        resolved.extend_from_slice(members);
        node.round(&resolved).await;
        assert_eq!(node.ring(), ring(&resolved));
        node.peers.asked();
        node
    }

    fn ring(&self) -> Ring {
        self.membership.view().ring.clone()
    }

    fn reachable(&self) -> BTreeSet<SocketAddr> {
        self.membership.view().reachable.clone()
    }
}

fn ring(members: &[SocketAddr]) -> Ring {
    Ring::new(members.iter().copied())
}

fn set(peers: &[SocketAddr]) -> BTreeSet<SocketAddr> {
    peers.iter().copied().collect()
}

#[tokio::test(start_paused = true)]
async fn a_node_is_starting_until_its_first_round_then_a_member_of_its_own_ring() {
    let node = Node::new();
    assert_eq!(node.membership.me(), ME);
    assert_eq!(node.membership.state(), PeerState::Starting);
    assert!(!node.membership.is_discovered());
    assert!(!node.membership.is_leaving());
    assert_eq!(*node.membership.view(), View::default());
    let view = node.round(&[ME]).await.expect("the view changed");
    assert_eq!(view.ring, ring(&[ME]));
    assert!(view.reachable.is_empty());
    assert_eq!(view, node.membership.view(), "the answer is the view now");
    assert!(node.membership.is_discovered());
    assert_eq!(node.membership.state(), PeerState::Member);
    assert!(node.peers.asked().is_empty(), "a node never probes itself");
    assert!(node.membership.known().is_empty());
    assert_eq!(node.round(&[ME]).await, None, "nothing changed");
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_resolves_and_answers_as_a_member_joins_the_ring() {
    let node = Node::new();
    node.peers.answer(B, PeerState::Member);
    let view = node.round(&[ME, B]).await.expect("the view changed");
    assert_eq!(view.ring, ring(&[ME, B]));
    assert_eq!(view.reachable, set(&[B]));
    assert_eq!(view.previous, Ring::default());
    assert_eq!(*node.membership.known(), set(&[B]));
    assert_eq!(node.round(&[ME, B]).await, None, "nothing changed");
}

#[tokio::test(start_paused = true)]
async fn this_node_is_in_its_ring_only_while_its_own_address_resolves() {
    let node = Node::new();
    node.peers.answer(B, PeerState::Member);
    node.round(&[B]).await.expect("the view changed");
    assert_eq!(node.ring(), ring(&[B]));
    assert_eq!(
        node.membership.state(),
        PeerState::Member,
        "discovered all the same"
    );
    node.round(&[ME, B]).await.expect("the view changed");
    assert_eq!(node.ring(), ring(&[ME, B]));
    node.round(&[B]).await.expect("the view changed");
    assert_eq!(node.ring(), ring(&[B]));
}

#[tokio::test(start_paused = true)]
async fn a_starting_or_leaving_peer_is_reachable_but_owns_nothing() {
    let node = Node::with_members(&[]).await;
    node.peers.answer(B, PeerState::Starting);
    node.peers.answer(C, PeerState::Leaving);
    let view = node.round(&[ME, B, C]).await.expect("the view changed");
    assert_eq!(view.ring, ring(&[ME]));
    assert_eq!(view.reachable, set(&[B, C]));
    node.peers.answer(B, PeerState::Member);
    let view = node.round(&[ME, B, C]).await.expect("the view changed");
    assert_eq!(view.ring, ring(&[ME, B]));
}

#[tokio::test(start_paused = true)]
async fn previous_is_the_ring_before_the_last_change_of_members() {
    let node = Node::with_members(&[]).await;
    node.peers.answer(B, PeerState::Member);
    let view = node.round(&[ME, B]).await.expect("the view changed");
    assert_eq!(view.previous, ring(&[ME]));
    node.peers.answer(C, PeerState::Starting);
    let view = node.round(&[ME, B, C]).await.expect("C is reachable now");
    assert_eq!(view.ring, ring(&[ME, B]));
    assert_eq!(
        view.previous,
        ring(&[ME]),
        "the members did not change: neither did previous"
    );
}

#[tokio::test(start_paused = true)]
async fn a_probe_asks_a_peer_to_rejoin_while_it_is_not_in_this_node_s_ring() {
    let node = Node::new();
    node.peers.answer(B, PeerState::Member);
    node.peers.answer(C, PeerState::Starting);
    node.round(&[ME, B, C]).await;
    assert_eq!(node.peers.asked(), [(B, true), (C, true)]);
    node.round(&[ME, B, C]).await;
    assert_eq!(
        node.peers.asked(),
        [(B, false), (C, true)],
        "B is a member now, C is still starting"
    );
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_resolves_but_never_answered_is_not_a_member() {
    let node = Node::with_members(&[]).await;
    assert_eq!(node.round(&[ME, B]).await, None, "the view did not change");
    assert_eq!(node.peers.asked(), [(B, true)], "B was probed");
    assert_eq!(node.ring(), ring(&[ME]));
    assert!(node.reachable().is_empty());
    assert!(
        node.membership.known().is_empty(),
        "an address that never answered holds no device"
    );
    node.peers.answer(B, PeerState::Starting);
    node.round(&[ME, B]).await;
    assert_eq!(*node.membership.known(), set(&[B]), "once it has answered");
}

#[tokio::test(start_paused = true)]
async fn a_member_is_left_out_only_after_several_failed_probes_in_a_row() {
    let node = Node::with_members(&[B, C]).await;
    node.peers.fail(B);
    for failed in 1..PROBE_FAILURES_TO_LEAVE {
        assert_eq!(
            node.round(&[ME, B, C]).await,
            None,
            "{failed} failed probe(s): the view did not change"
        );
    }
    let view = node.round(&[ME, B, C]).await.expect("B is left out");
    assert_eq!(view.ring, ring(&[ME, C]));
    assert_eq!(view.reachable, set(&[C]));
    assert_eq!(view.previous, ring(&[ME, B, C]));
    assert_eq!(
        *node.membership.known(),
        set(&[B, C]),
        "B, cut off, is still where devices may be"
    );
    node.peers.answer(B, PeerState::Member);
    let view = node.round(&[ME, B, C]).await.expect("B is back");
    assert_eq!(view.ring, ring(&[ME, B, C]));
    assert_eq!(view.previous, ring(&[ME, C]));
    assert!(
        node.peers.asked().contains(&(B, true)),
        "B was asked to rejoin"
    );
}

#[tokio::test(start_paused = true)]
async fn a_member_that_answers_between_failed_probes_stays() {
    let node = Node::with_members(&[B]).await;
    for _ in 0..3 {
        for _ in 1..PROBE_FAILURES_TO_LEAVE {
            node.peers.fail(B);
            node.round(&[ME, B]).await;
        }
        node.peers.answer(B, PeerState::Member);
        node.round(&[ME, B]).await;
    }
    assert_eq!(node.ring(), ring(&[ME, B]));
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_resolving_owns_nothing_and_is_probed_until_it_stops_answering() {
    let node = Node::with_members(&[B]).await;
    // B is shutting down: out of the DNS answer, still answering.
    let view = node.round(&[ME]).await.expect("B is out of the ring");
    assert_eq!(view.ring, ring(&[ME]));
    assert_eq!(view.reachable, set(&[B]));
    assert_eq!(view.previous, ring(&[ME, B]));
    assert_eq!(node.peers.asked(), [(B, false)]);
    assert_eq!(*node.membership.known(), set(&[B]));
    assert_eq!(node.round(&[ME]).await, None, "B is still reachable");
    assert_eq!(node.peers.asked(), [(B, true)]);
    // B exits.
    node.peers.fail(B);
    for _ in 1..PROBE_FAILURES_TO_LEAVE {
        node.round(&[ME]).await;
        assert_eq!(
            node.reachable(),
            set(&[B]),
            "one late answer is not an exit"
        );
    }
    let view = node.round(&[ME]).await.expect("B is unreachable");
    assert!(view.reachable.is_empty());
    assert_eq!(view.ring, ring(&[ME]));
    node.peers.asked();
    node.round(&[ME]).await;
    assert!(node.peers.asked().is_empty(), "B is no longer probed");
    assert!(node.membership.known().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_stops_resolving_and_answering_is_out_of_the_ring_at_once() {
    let node = Node::with_members(&[B]).await;
    node.peers.fail(B);
    let view = node.round(&[ME]).await.expect("B is out of the ring");
    assert_eq!(view.ring, ring(&[ME]));
    assert_eq!(view.reachable, set(&[B]), "until it fails again");
}

#[tokio::test(start_paused = true)]
async fn known_is_every_peer_resolved_or_in_the_view_that_has_answered_but_this_node() {
    let node = Node::with_members(&[B]).await;
    node.peers.answer(C, PeerState::Starting);
    node.round(&[ME, B, C]).await;
    node.peers.asked();
    // B and C left the DNS answer; B is a member, C reachable, and a new D resolves
    // (and has not answered yet).
    let d = peer(4);
    node.round(&[ME, d]).await;
    assert_eq!(*node.membership.known(), set(&[B, C]));
    assert_eq!(
        node.peers
            .asked()
            .into_iter()
            .map(|(peer, _)| peer)
            .collect::<Vec<_>>(),
        [B, C, d],
        "each probed once"
    );
}

#[tokio::test(start_paused = true)]
async fn a_failed_resolution_keeps_the_last_answer() {
    let node = Node::with_members(&[B]).await;
    // Resolution keeps failing: B and this node still count as resolved, round after round.
    for _ in 0..PROBE_FAILURES_TO_LEAVE + 1 {
        assert_eq!(node.round_resolving(None).await, None, "nothing changed");
        assert_eq!(node.peers.asked(), [(B, false)]);
    }
    assert_eq!(node.ring(), ring(&[ME, B]), "B still resolves");
    assert_eq!(*node.membership.known(), set(&[B]));
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_fails_a_forward_is_left_out_at_once_until_a_later_probe_answers() {
    let node = Node::with_members(&[B, C]).await;
    node.membership.mark_down(B);
    let view = node.membership.view();
    assert_eq!(view.ring, ring(&[ME, C]));
    assert_eq!(view.reachable, set(&[C]));
    assert_eq!(view.previous, ring(&[ME, B, C]));
    // Its probes fail too: it stays out, also for the round after.
    node.peers.fail(B);
    assert_eq!(node.round(&[ME, B, C]).await, None);
    assert_eq!(node.round(&[ME, B, C]).await, None);
    assert_eq!(
        node.peers.asked(),
        [(B, true), (C, false), (B, true), (C, false)]
    );
    node.peers.answer(B, PeerState::Member);
    let view = node.round(&[ME, B, C]).await.expect("B is back");
    assert_eq!(view.ring, ring(&[ME, B, C]));
    assert_eq!(view.reachable, set(&[B, C]));
}

#[tokio::test(start_paused = true)]
async fn a_peer_that_fails_a_forward_comes_back_at_the_next_answered_probe() {
    let node = Node::with_members(&[B]).await;
    node.membership.mark_down(B);
    assert_eq!(node.ring(), ring(&[ME]));
    let view = node.round(&[ME, B]).await.expect("B is back");
    assert_eq!(view.ring, ring(&[ME, B]));
    assert_eq!(view.previous, ring(&[ME]));
}

#[tokio::test(start_paused = true)]
async fn a_probe_answered_before_a_failed_forward_does_not_bring_the_peer_back_that_round() {
    let node = Node::with_members(&[B]).await;
    node.peers.hold();
    let (changed, ()) = tokio::join!(node.round(&[ME, B]), async {
        // B's probe is out (and answers Member) when a forward to B fails.
        while node.peers.asked().is_empty() {
            tokio::task::yield_now().await;
        }
        node.membership.mark_down(B);
        node.peers.release();
    });
    assert_eq!(changed, None, "the round changed nothing");
    assert_eq!(node.ring(), ring(&[ME]), "B is still out");
    assert!(node.reachable().is_empty());
    let view = node.round(&[ME, B]).await.expect("B is back");
    assert_eq!(view.ring, ring(&[ME, B]));
}

#[tokio::test(start_paused = true)]
async fn a_reachable_peer_that_fails_a_forward_is_no_longer_reachable() {
    let node = Node::with_members(&[B]).await;
    node.peers.answer(C, PeerState::Leaving);
    node.round(&[ME, B, C]).await.expect("C is reachable");
    let before = node.membership.view();
    node.membership.mark_down(C);
    let view = node.membership.view();
    assert_eq!(view.reachable, set(&[B]));
    assert_eq!(view.ring, before.ring);
    assert_eq!(view.previous, before.previous, "the members did not change");
}

#[tokio::test(start_paused = true)]
async fn a_failed_forward_to_a_peer_out_of_the_view_changes_nothing() {
    let node = Node::with_members(&[B]).await;
    let before = node.membership.view();
    node.membership.mark_down(C);
    assert_eq!(node.membership.view(), before);
}

#[tokio::test(start_paused = true)]
async fn a_leaving_node_leaves_its_ring_at_once_and_stays_out() {
    let node = Node::with_members(&[B]).await;
    node.membership.leave();
    assert!(node.membership.is_leaving());
    assert_eq!(node.membership.state(), PeerState::Leaving);
    let view = node.membership.view();
    assert_eq!(view.ring, ring(&[B]));
    assert_eq!(view.previous, ring(&[ME, B]));
    assert_eq!(view.reachable, set(&[B]));
    assert_eq!(node.round(&[ME, B]).await, None, "still out");
    assert_eq!(node.ring(), ring(&[B]));
}

#[tokio::test(start_paused = true)]
async fn a_node_that_leaves_before_its_first_round_never_joins() {
    let node = Node::new();
    node.membership.leave();
    assert_eq!(*node.membership.view(), View::default());
    assert_eq!(node.membership.state(), PeerState::Leaving);
    node.peers.answer(B, PeerState::Member);
    node.round(&[ME, B]).await;
    assert_eq!(node.ring(), ring(&[B]));
    assert_eq!(node.membership.state(), PeerState::Leaving);
}
