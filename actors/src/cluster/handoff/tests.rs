//! The holder's side of a handoff on a real actor system with the embedded store: the
//! queue drains into the final window, later events are refused, and a release that
//! cannot drain leaves the device where it was.

use super::*;
use crate::cluster::ForwardError;
use crate::device::Closed;
use crate::event::Event;
use crate::store::{EmbeddedStore, Store, Version};
use crate::{System, SystemConfig};
use bytes::Bytes;
use chrono::Utc;
use prometheus_client::registry::Registry;

/// Nodes in this process, by address.
type Nodes = Arc<DashMap<SocketAddr, Arc<Handoff>>>;

/// Node `me`'s way to the others in this process, called directly instead of over HTTP.
/// A release goes to the peer's [`Handoff::release`]; a peer not registered never
/// answers (the real transport would time out much later). Events and probes are not
/// needed here: unreachable.
struct Peers {
    me: SocketAddr,
    nodes: Nodes,
}

impl Transport for Peers {
    fn send_events(&self, _: SocketAddr, _: Bytes) -> BoxFuture<Result<(), ForwardError>> {
        crate::cluster::tests::unreachable("test peer")
    }

    fn ping(
        &self,
        _: SocketAddr,
        _: bool,
    ) -> BoxFuture<Result<super::super::PeerState, ForwardError>> {
        crate::cluster::tests::unreachable("test peer")
    }

    fn release(
        &self,
        peer: SocketAddr,
        device: Arc<str>,
    ) -> BoxFuture<Result<Option<WindowSnapshot>, ForwardError>> {
        let Some(holder) = self.nodes.get(&peer).map(|h| h.value().clone()) else {
            return Box::pin(std::future::pending());
        };
        let to = self.me;
        Box::pin(async move {
            holder
                .release(device, to)
                .await
                .map_err(|e| ForwardError::Unreachable(e.to_string()))
        })
    }
}

const ME: &str = "10.0.0.1:8081";
const NEW_OWNER: &str = "10.0.0.2:8081";

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

fn event(rps: f64) -> Event {
    Event {
        rps,
        cpu: 0.5,
        timestamp: Utc::now(),
    }
}

fn own_store() -> Store {
    Store::Embedded(Arc::new(EmbeddedStore::new()))
}

/// A one-node system and its handoff, whose releases wait `drain_timeout` for a queue;
/// no peer answers it.
async fn node(drain_timeout: Duration) -> (System, Arc<Handoff>) {
    node_among(addr(ME), drain_timeout, &Nodes::default(), own_store()).await
}

/// A node at `me` on `store`, registered among `nodes` and reaching them. Its writer
/// flushes only when a test asks.
async fn node_among(
    me: SocketAddr,
    drain_timeout: Duration,
    nodes: &Nodes,
    store: Store,
) -> (System, Arc<Handoff>) {
    let config = SystemConfig {
        window_size: 10_000,
        flush_interval: Duration::from_secs(3600),
        ..SystemConfig::default()
    };
    let system = System::start(config, store, Registry::default())
        .await
        .expect("start");
    let handoff = Arc::new(Handoff {
        membership: Arc::new(Membership::new(me)),
        transport: Arc::new(Peers {
            me,
            nodes: nodes.clone(),
        }),
        directory: system.directory().clone(),
        writer: system.writer().clone(),
        fences: Arc::new(Fences::default()),
        metrics: system.metrics().clone(),
        drain_timeout,
        asking: DashMap::new(),
    });
    system.link_predecessor(Arc::new(PredecessorLink(handoff.clone())));
    nodes.insert(me, handoff.clone());
    (system, handoff)
}

/// Sleeps a little, adding to `waited`; fails the test once it has waited 10 s in
/// all (a guard against hanging, counted in requested sleeps, not wall time).
async fn pause(waited: &mut Duration) {
    assert!(
        *waited < Duration::from_secs(10),
        "still waiting after 10 s"
    );
    let step = Duration::from_millis(2);
    tokio::time::sleep(step).await;
    *waited += step;
}

fn handoffs(system: &System, direction: Direction) -> u64 {
    system
        .metrics()
        .device_handoffs
        .get_or_create(&DirectionLabel { direction })
        .get()
}

#[tokio::test]
async fn a_release_answers_every_queued_event_in_the_window_and_refuses_later_ones() {
    let (system, handoff) = node(Duration::from_secs(30)).await;
    let dir = system.directory();
    dir.submit("d", event(0.0)).expect("accepted");
    let mut waited = Duration::ZERO;
    while system.metrics().events_processed.get() < 1 {
        pause(&mut waited).await;
    }
    // This test's runtime has one thread: the 999 are all still queued when the release
    // starts, as its first wait is the first chance the device's actor gets to run.
    for i in 1..1000 {
        dir.submit("d", event(f64::from(i))).expect("accepted");
    }
    let slot = dir.slot("d").expect("the device's slot");
    let answered = handoff
        .release(Arc::from("d"), addr(NEW_OWNER))
        .await
        .expect("released");
    // The new owner's window: the one the release answers (the writer's unflushed one),
    // else the one already flushed to the store, which the new owner reads itself.
    let window = match answered {
        Some(window) => window,
        None => system
            .store()
            .load_window("d")
            .await
            .expect("store")
            .expect("a stored window"),
    };
    assert_eq!(
        window.readings().len(),
        1000,
        "every event queued before the release is in the final window"
    );
    assert_eq!(system.metrics().events_processed.get(), 1000);
    assert!(
        matches!(slot.push(event(1.0)), Err((_, Closed::HandedOff))),
        "the released slot takes no more events"
    );
    assert!(dir.slot("d").is_none(), "the slot is unlisted");
    assert_eq!(handoff.fences.holder("d"), Some(addr(NEW_OWNER)));
    assert_eq!(handoffs(&system, Direction::Out), 1);
    // The device's next local event (once this node owns it again) starts a new actor.
    dir.submit("d", event(2.0)).expect("a new slot");
    assert!(dir.slot("d").is_some_and(|s| !Arc::ptr_eq(&s, &slot)));
}

#[tokio::test]
async fn a_release_of_a_device_never_held_here_answers_nothing_and_fences_it() {
    let (system, handoff) = node(Duration::from_secs(30)).await;
    let window = handoff
        .release(Arc::from("elsewhere"), addr(NEW_OWNER))
        .await
        .expect("answered");
    assert!(window.is_none());
    assert_eq!(
        handoffs(&system, Direction::Out),
        0,
        "nothing was handed off"
    );
    assert_eq!(handoff.fences.holder("elsewhere"), Some(addr(NEW_OWNER)));
}

#[tokio::test]
async fn a_release_whose_queue_does_not_drain_gives_up_and_the_device_stays() {
    let drain = Duration::from_millis(200);
    let (system, handoff) = node(drain).await;
    // The device was handed to a peer earlier, so its new actor here first asks that
    // peer for the window, and the peer never answers: its queue cannot drain.
    handoff.fences.insert(Arc::from("stuck"), addr(NEW_OWNER));
    let dir = system.directory();
    dir.submit("stuck", event(1.0)).expect("accepted");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let slot = dir.slot("stuck").expect("slot");
    let refused = handoff
        .release(Arc::from("stuck"), addr(NEW_OWNER))
        .await
        .expect_err("the queue never drained");
    assert!(
        matches!(refused, ReleaseError::Busy(d) if d == drain),
        "{refused}"
    );
    dir.submit("stuck", event(2.0))
        .expect("the slot takes events again");
    assert!(Arc::ptr_eq(&dir.slot("stuck").expect("listed"), &slot));
    assert_eq!(handoff.fences.holder("stuck"), None, "no fence is left");
    assert_eq!(handoffs(&system, Direction::Out), 0);
    assert_eq!(system.metrics().events_processed.get(), 0);
    assert_eq!(dir.pending(), 2, "both events wait for the window");
}

#[tokio::test]
async fn a_release_waits_for_an_evicted_actor_of_the_device_to_finish_stopping() {
    let (system, handoff) = node(Duration::from_secs(30)).await;
    // Evicted a moment ago (a view change stops idle actors): unlisted, and still
    // stopping, so its newest events are in no result the writer holds yet.
    let let_go = crate::cluster::tests::evicted_and_lingering(&system, "d").await;
    let release = tokio::spawn({
        let handoff = handoff.clone();
        async move { handoff.release(Arc::from("d"), addr(NEW_OWNER)).await }
    });
    let mut waited = Duration::ZERO;
    while handoff.fences.holder("d").is_none() {
        pause(&mut waited).await;
    }
    for _ in 0..50 {
        pause(&mut waited).await;
    }
    assert!(!release.is_finished(), "no answer while the actor stops");
    let_go.now.notify_one();
    release.await.expect("release task").expect("released");
    assert!(
        let_go.done.load(Ordering::Acquire),
        "answered only once the evicted actor had stopped (and deposited its window)"
    );
    assert_eq!(handoff.fences.holder("d"), Some(addr(NEW_OWNER)));
    assert_eq!(handoffs(&system, Direction::Out), 1, "it held the device");
}

/// Nodes A and B each take a device (their new actors ask each other for it) that the
/// keeper (A or B) — its owner among the pair — processed before, in a window still only
/// in its writer. Checks that they settle at once on one window: the keeper's earlier
/// readings, then the other's event and the keeper's own (in either order).
async fn contested(keeper_is_a: bool) {
    let nodes = Nodes::default();
    // Longer than the test may take: neither may wait for the other's timeout.
    let wait = Duration::from_secs(600);
    let (a, a_handoff) = node_among(addr(ME), wait, &nodes, own_store()).await;
    let (b, b_handoff) = node_among(addr(NEW_OWNER), wait, &nodes, own_store()).await;
    let keeper_addr = addr(if keeper_is_a { ME } else { NEW_OWNER });
    let device = (0..)
        .map(|i| format!("d-{i}"))
        .find(|d| Ring::new([addr(ME), addr(NEW_OWNER)]).owner(d) == Some(keeper_addr))
        .expect("a device");
    let d = device.as_str();
    let ((keeper, keeper_handoff), (other, other_handoff)) = if keeper_is_a {
        ((&a, &a_handoff), (&b, &b_handoff))
    } else {
        ((&b, &b_handoff), (&a, &a_handoff))
    };
    // The keeper's earlier incarnation: three readings, never flushed, its actor stopped
    // since (a view change).
    for rps in [10.0, 11.0, 12.0] {
        keeper.directory().submit(d, event(rps)).expect("accepted");
    }
    let mut waited = Duration::ZERO;
    while keeper.metrics().events_processed.get() < 3 {
        pause(&mut waited).await;
    }
    assert_eq!(keeper.directory().evict_drained(), 1);
    // Each took the device while thinking the other held it: each new actor asks the
    // other, whose own actor is waiting to be answered. A's actor starts first.
    a_handoff.fences.insert(Arc::from(d), addr(NEW_OWNER));
    b_handoff.fences.insert(Arc::from(d), addr(ME));
    a.directory().submit(d, event(1.0)).expect("accepted");
    b.directory().submit(d, event(2.0)).expect("accepted");
    while keeper.metrics().events_processed.get() < 4 || other.directory().slot(d).is_some() {
        pause(&mut waited).await;
    }
    let window = flushed_window(keeper, d, |w| w.readings().len() == 5).await;
    let rps: Vec<f64> = window.readings().iter().map(|r| r.0).collect();
    assert_eq!(
        rps[..3],
        [10.0, 11.0, 12.0],
        "the keeper's earlier readings first"
    );
    let mut last_two = rps[3..].to_vec();
    last_two.sort_by(f64::total_cmp);
    assert_eq!(last_two, [1.0, 2.0], "then both nodes' events");
    assert_eq!(other.metrics().events_processed.get(), 1);
    assert_eq!(handoffs(other, Direction::Out), 1);
    assert!(
        other.directory().slot(d).is_none(),
        "the other node let it go"
    );
    assert_eq!(
        other_handoff.fences.holder(d),
        Some(keeper_addr),
        "the other node's later events follow the device"
    );
    assert_eq!(keeper_handoff.fences.holder(d), None);
    // Settled: when the other node asks for the device later, its queue is handed over
    // as in any handoff (the contest is over, nothing of it is left).
    for i in 3..100 {
        keeper
            .directory()
            .submit(d, event(f64::from(i)))
            .expect("accepted");
    }
    let released = keeper_handoff
        .release(Arc::from(d), other_handoff.membership.me())
        .await
        .expect("released")
        .expect("the keeper's window");
    assert_eq!(released.readings().len(), 102);
}

#[tokio::test]
async fn two_nodes_that_each_took_the_device_settle_at_once_on_one_window() {
    contested(true).await;
    contested(false).await;
}

/// A holds device `d` with 499 events queued; B starts an actor for `d` after `route`
/// has told B where to find it. Checks that B continues A's window.
async fn the_new_owner_continues_the_released_window<F>(route: impl FnOnce(Arc<Handoff>) -> F)
where
    F: std::future::Future<Output = ()>,
{
    the_new_owner_continues_the_window_released_for("d", &Nodes::default(), route).await;
}

/// [`the_new_owner_continues_the_released_window`] for `device`, among `nodes` (where
/// other nodes may be registered already).
async fn the_new_owner_continues_the_window_released_for<F>(
    device: &str,
    nodes: &Nodes,
    route: impl FnOnce(Arc<Handoff>) -> F,
) where
    F: std::future::Future<Output = ()>,
{
    let wait = Duration::from_secs(30);
    let (a, a_handoff) = node_among(addr(ME), wait, nodes, own_store()).await;
    let (b, b_handoff) = node_among(addr(NEW_OWNER), wait, nodes, own_store()).await;
    a.directory().submit(device, event(0.0)).expect("accepted");
    let mut waited = Duration::ZERO;
    while a.metrics().events_processed.get() < 1 {
        pause(&mut waited).await;
    }
    for i in 1..500 {
        a.directory()
            .submit(device, event(f64::from(i)))
            .expect("accepted");
    }
    route(b_handoff.clone()).await;
    b.directory()
        .submit(device, event(500.0))
        .expect("accepted");
    let mut waited = Duration::ZERO;
    while b.metrics().events_processed.get() < 1 {
        pause(&mut waited).await;
    }
    assert_eq!(
        a.metrics().events_processed.get(),
        500,
        "A drained its queue first"
    );
    assert_eq!(handoffs(&a, Direction::Out), 1);
    assert_eq!(handoffs(&b, Direction::In), 1);
    assert_eq!(a_handoff.fences.holder(device), Some(addr(NEW_OWNER)));
    assert_eq!(b_handoff.fences.holder(device), None, "B has no fence left");
    let window = flushed_window(&b, device, |w| w.readings().len() == 501).await;
    let rps: Vec<f64> = window.readings().iter().map(|r| r.0).collect();
    let expected: Vec<f64> = (0..=500).map(f64::from).collect();
    assert_eq!(rps, expected, "A's 500 readings, then B's, in order");
}

#[tokio::test]
async fn a_node_asks_the_node_it_handed_the_device_to_before() {
    // Each node has its own store here, so the window can only come from A.
    the_new_owner_continues_the_released_window(|b| async move {
        b.fences.insert(Arc::from("d"), addr(ME));
    })
    .await;
}

#[tokio::test]
async fn a_node_that_just_joined_asks_the_owner_it_would_have_without_itself() {
    the_new_owner_continues_the_released_window(|b| async move {
        // B is not in its own ring yet: A owns every device in the view.
        b.membership.set_view(crate::cluster::View {
            ring: Ring::new([addr(ME)]),
            ..Default::default()
        });
    })
    .await;
}

/// Probes as a node's discovery sees them: every peer answers as a member, or none does.
struct Probes(bool);

impl Transport for Probes {
    fn send_events(&self, _: SocketAddr, _: Bytes) -> BoxFuture<Result<(), ForwardError>> {
        crate::cluster::tests::unreachable("probes only")
    }

    fn ping(
        &self,
        _: SocketAddr,
        _: bool,
    ) -> BoxFuture<Result<super::super::PeerState, ForwardError>> {
        let answer = if self.0 {
            Ok(super::super::PeerState::Member)
        } else {
            Err(ForwardError::Unreachable("cut off".into()))
        };
        Box::pin(async move { answer })
    }

    fn release(
        &self,
        _: SocketAddr,
        _: Arc<str>,
    ) -> BoxFuture<Result<Option<WindowSnapshot>, ForwardError>> {
        crate::cluster::tests::unreachable("probes only")
    }
}

/// Discovery rounds of `node` in which `resolved` resolved: first every peer answers
/// (they are members), then none does, until the node's ring is itself alone and it
/// still knows the others.
async fn cut_off_rounds(node: &Handoff, resolved: &[&str]) {
    let resolved: std::collections::BTreeSet<SocketAddr> =
        resolved.iter().map(|a| addr(a)).collect();
    let mut last = Default::default();
    node.membership
        .refresh(Some(resolved.clone()), &mut last, &Probes(true))
        .await;
    assert_eq!(
        node.membership.view().ring,
        Ring::new(resolved.iter().copied())
    );
    for _ in 0..crate::cluster::membership::PROBE_FAILURES_TO_LEAVE {
        node.membership
            .refresh(Some(resolved.clone()), &mut last, &Probes(false))
            .await;
    }
    assert_eq!(
        node.membership.view().ring,
        Ring::new([node.membership.me()])
    );
}

#[tokio::test]
async fn a_node_taken_back_after_being_cut_off_asks_the_peers_its_ring_still_lacks() {
    // B was cut off: its probes reach no peer, so its ring is B alone, and before that
    // B itself owned the device, while A processed it meanwhile. A peer that took B back
    // routes the device to B before B's own view catches up.
    let device = (0..)
        .map(|i| format!("d-{i}"))
        .find(|d| Ring::new([addr(ME), addr(NEW_OWNER)]).owner(d) == Some(addr(NEW_OWNER)))
        .expect("a device");
    let nodes = Nodes::default();
    the_new_owner_continues_the_window_released_for(&device, &nodes, |b| async move {
        cut_off_rounds(&b, &[ME, NEW_OWNER]).await;
        assert_eq!(*b.membership.known(), [addr(ME)].into());
    })
    .await;
}

#[tokio::test]
async fn a_node_asks_both_its_view_s_candidate_and_the_wider_one_and_keeps_the_newest() {
    const OTHER: &str = "10.0.0.3:8081";
    // A device that A owns among {A, OTHER}: B's ring {B, OTHER} names OTHER as the
    // holder, every peer discovery knows names A.
    let device = (0..)
        .map(|i| format!("d-{i}"))
        .find(|d| Ring::new([addr(ME), addr(OTHER)]).owner(d) == Some(addr(ME)))
        .expect("a device");
    let nodes = Nodes::default();
    // OTHER processed a few events of the device too (its own, older incarnation).
    let (other, _) = node_among(addr(OTHER), Duration::from_secs(30), &nodes, own_store()).await;
    other
        .directory()
        .submit(&device, event(1000.0))
        .expect("accepted");
    let mut waited = Duration::ZERO;
    while other.metrics().events_processed.get() < 1 {
        pause(&mut waited).await;
    }
    the_new_owner_continues_the_window_released_for(&device, &nodes, |b| async move {
        cut_off_rounds(&b, &[ME, NEW_OWNER, OTHER]).await;
        b.membership.set_view(crate::cluster::View {
            ring: Ring::new([addr(NEW_OWNER), addr(OTHER)]),
            ..Default::default()
        });
    })
    .await;
    assert_eq!(
        other
            .metrics()
            .device_handoffs
            .get_or_create(&DirectionLabel {
                direction: Direction::Out
            })
            .get(),
        1,
        "OTHER was asked too, and released its window"
    );
}

/// Submits `n` events of device `d` to `node` and waits until they are processed.
async fn process(node: &System, n: u32) {
    let before = node.metrics().events_processed.get();
    for i in 0..n {
        node.directory()
            .submit("d", event(f64::from(i)))
            .expect("accepted");
    }
    let mut waited = Duration::ZERO;
    while node.metrics().events_processed.get() < before + u64::from(n) {
        pause(&mut waited).await;
    }
}

/// `device`'s window once `node` has flushed one that is `done`.
async fn flushed_window(
    node: &System,
    device: &str,
    done: impl Fn(&WindowSnapshot) -> bool,
) -> WindowSnapshot {
    node.writer()
        .cast(crate::store::WriterMsg::Flush)
        .expect("flush");
    let mut waited = Duration::ZERO;
    loop {
        match node.store().load_window(device).await.expect("store") {
            Some(w) if done(&w) => return w,
            _ => pause(&mut waited).await,
        }
    }
}

/// Nodes A and C share one store (as replicas share Redis). A holds device `d` with
/// `held` events it never flushed (cut off, say); C processed `stored` events of it and
/// flushed them. B, asked to take `d` over, gets A's window released and finds C's in
/// the store: answers how many readings B's window has after B's own event.
async fn adopted(held: u32, stored: u32) -> usize {
    let nodes = Nodes::default();
    let shared = own_store();
    let wait = Duration::from_secs(30);
    let (a, _) = node_among(addr(ME), wait, &nodes, shared.clone()).await;
    let (c, _) = node_among(addr("10.0.0.3:8081"), wait, &nodes, shared.clone()).await;
    let (b, b_handoff) = node_among(addr(NEW_OWNER), wait, &nodes, shared).await;
    process(&a, held).await;
    process(&c, stored).await;
    flushed_window(&c, "d", |w| w.readings().len() == stored as usize).await;
    b_handoff.fences.insert(Arc::from("d"), addr(ME));
    process(&b, 1).await;
    assert_eq!(
        handoffs(&b, Direction::In),
        1,
        "A's window was released to B"
    );
    // B's incarnation is the second: it restored a first incarnation's window.
    flushed_window(&b, "d", |w| Version::parts(w.version()).0 == 2)
        .await
        .readings()
        .len()
}

#[tokio::test]
async fn a_new_owner_adopts_the_newer_of_the_released_and_the_stored_window() {
    // Same incarnation (each started from nothing): the one with more events is newer.
    assert_eq!(
        adopted(5, 3).await,
        6,
        "A's released window (5 events) is newer"
    );
    assert_eq!(
        adopted(3, 5).await,
        6,
        "the stored window (5 events) is newer"
    );
}

#[tokio::test(start_paused = true)]
async fn fences_expire_by_age() {
    let fences = Fences::default();
    fences.insert(Arc::from("a"), addr(NEW_OWNER));
    tokio::time::advance(Duration::from_secs(5)).await;
    fences.insert(Arc::from("b"), addr(ME));
    fences.expire(Duration::from_secs(5));
    assert_eq!(fences.holder("a"), None, "5 s old: expired");
    assert_eq!(fences.holder("b"), Some(addr(ME)), "new: kept");
    assert_eq!(fences.take("b"), Some(addr(ME)));
    assert_eq!(fences.holder("b"), None);
    fences.insert(Arc::from("c"), addr(ME));
    assert_eq!(
        fences.holder("c"),
        Some(addr(ME)),
        "counted again after emptying"
    );
    fences.expire(Duration::from_secs(60));
    assert_eq!(
        fences.holder("c"),
        Some(addr(ME)),
        "a fence that is kept stays counted"
    );
}
