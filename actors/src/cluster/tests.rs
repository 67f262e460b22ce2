//! Nodes of one cluster in one process, each a real actor system over one shared embedded
//! store (as replicas share Redis), talking through a transport that calls the peer's
//! [`Cluster`] directly instead of over HTTP: discovery, routing, forwarding, batches
//! split by owner, a peer that fails or is overloaded, fences, leaving.

use super::*;
use crate::event::Event;
use crate::metrics::ForwardFailureLabel;
use crate::store::{EmbeddedStore, Store};
use crate::{System, SystemConfig};
use chrono::Utc;
use prometheus_client::registry::Registry;
use std::sync::Mutex;

const A: &str = "127.0.0.1:7101";
const B: &str = "127.0.0.1:7102";
const DISCOVERY: Duration = Duration::from_millis(20);
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("address")
}

/// How a peer behaves towards the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Up,
    /// Connections refused: every call fails at once.
    Down,
    /// Probes are answered, forwarded events time out after this long (as the HTTP
    /// transport's do after CLUSTER_FORWARD_TIMEOUT).
    Slow(Duration),
    /// A release asked of it is answered (unreachable) only once the test lets go.
    Held,
}

/// The nodes by address, and how each can be reached.
#[derive(Default)]
struct Net {
    nodes: DashMap<SocketAddr, Arc<Cluster>>,
    links: Mutex<HashMap<SocketAddr, Link>>,
    /// Held releases are answered from now on.
    let_go: AtomicBool,
}

impl Net {
    fn set(&self, node: &str, link: Link) {
        self.links.lock().expect("links").insert(addr(node), link);
    }

    fn link(&self, peer: SocketAddr) -> Link {
        *self
            .links
            .lock()
            .expect("links")
            .get(&peer)
            .unwrap_or(&Link::Up)
    }

    /// The peer, unless its connections are refused.
    fn reach(&self, peer: SocketAddr) -> Result<Arc<Cluster>, ForwardError> {
        match (self.link(peer), self.nodes.get(&peer)) {
            (Link::Down, _) | (_, None) => {
                Err(ForwardError::Unreachable("connection refused".into()))
            }
            (_, Some(node)) => Ok(node.value().clone()),
        }
    }
}

/// Node `me`'s way to the others, as the HTTP transport and internal listener do it.
struct Wire {
    me: SocketAddr,
    net: Arc<Net>,
}

impl Transport for Wire {
    fn send_events(&self, peer: SocketAddr, body: Bytes) -> BoxFuture<Result<(), ForwardError>> {
        let node = self.net.reach(peer);
        let link = self.net.link(peer);
        Box::pin(async move {
            let node = node?;
            if let Link::Slow(after) = link {
                tokio::time::sleep(after).await;
                return Err(ForwardError::Timeout);
            }
            let events = wire::decode(body).map_err(|_| ForwardError::Rejected(400))?;
            match node.receive(events).await {
                Ok(()) => Ok(()),
                Err(SubmitError::Overloaded) => Err(ForwardError::Overloaded),
                Err(_) => Err(ForwardError::Rejected(503)),
            }
        })
    }

    fn ping(&self, peer: SocketAddr, rejoin: bool) -> BoxFuture<Result<PeerState, ForwardError>> {
        let node = self.net.reach(peer);
        Box::pin(async move {
            let node = node?;
            if rejoin {
                node.request_resync();
            }
            Ok(node.membership().state())
        })
    }

    fn release(
        &self,
        peer: SocketAddr,
        device: Arc<str>,
    ) -> BoxFuture<Result<Option<WindowSnapshot>, ForwardError>> {
        let node = self.net.reach(peer);
        let me = self.me;
        let held = (self.net.link(peer) == Link::Held).then(|| self.net.clone());
        Box::pin(async move {
            if let Some(net) = held {
                while !net.let_go.load(Ordering::Acquire) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                return Err(ForwardError::Unreachable("held, then let go".into()));
            }
            node?.handoff().release(device, me).await.map_err(|e| {
                ForwardError::Rejected(match e {
                    ReleaseError::Busy(_) => 409,
                    ReleaseError::Writer => 503,
                })
            })
        })
    }
}

/// A node at `me` among `peers`, on `store`, registered in `net`.
async fn node(
    net: &Arc<Net>,
    me: &str,
    peers: &[&str],
    store: &Store,
    max_pending_events: usize,
    forward_timeout: Duration,
) -> (System, Arc<Cluster>) {
    let config = SystemConfig {
        flush_interval: Duration::from_millis(5),
        max_pending_events,
        ..SystemConfig::default()
    };
    let system = System::start(config, store.clone(), Registry::default())
        .await
        .expect("start");
    let cluster = Cluster::start(
        ClusterConfig {
            peers: peers.iter().map(|p| p.to_string()).collect(),
            advertise: addr(me),
            discovery_interval: DISCOVERY,
            forward_timeout,
            fence_ttl: Duration::from_secs(60),
        },
        Arc::new(Wire {
            me: addr(me),
            net: net.clone(),
        }),
        &system,
    );
    net.nodes.insert(addr(me), cluster.clone());
    (system, cluster)
}

/// What a fake transport answers for a call a test does not expect.
pub(crate) fn unreachable<T: Send + 'static>(
    why: &'static str,
) -> BoxFuture<Result<T, ForwardError>> {
    Box::pin(async move { Err(ForwardError::Unreachable(why.into())) })
}

/// An actor that, once told to stop, lingers until let go: a device actor evicted a
/// moment ago on a busy node, which has not yet deposited its window.
pub(crate) struct Lingering;

/// Lets a [`Lingering`] actor finish stopping; says when it has.
#[derive(Default)]
pub(crate) struct LetGo {
    pub(crate) now: tokio::sync::Notify,
    pub(crate) done: AtomicBool,
}

impl Actor for Lingering {
    type Msg = ();
    type State = Arc<LetGo>;
    type Arguments = Arc<LetGo>;

    async fn pre_start(
        &self,
        _: ActorRef<()>,
        let_go: Arc<LetGo>,
    ) -> Result<Arc<LetGo>, ractor::ActorProcessingErr> {
        Ok(let_go)
    }

    async fn post_stop(
        &self,
        _: ActorRef<()>,
        let_go: &mut Arc<LetGo>,
    ) -> Result<(), ractor::ActorProcessingErr> {
        let_go.now.notified().await;
        let_go.done.store(true, Ordering::Release);
        Ok(())
    }
}

/// Device `device` of `system` has an evicted actor still stopping, until the answer
/// is let go.
pub(crate) async fn evicted_and_lingering(system: &System, device: &str) -> Arc<LetGo> {
    let let_go = Arc::new(LetGo::default());
    let (actor, _) = Actor::spawn(None, Lingering, let_go.clone())
        .await
        .expect("spawn");
    system.directory().retiring(device, actor.get_cell());
    actor.stop(None);
    let_go
}

/// Waits (at most 10 s) until `done`.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "still waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Two nodes on one shared store (as replicas share Redis) that have found each other,
/// and their network; B admits `b_max_pending` events.
async fn two_nodes(b_max_pending: usize) -> (Arc<Net>, [(System, Arc<Cluster>); 2]) {
    two_nodes_with(b_max_pending, FORWARD_TIMEOUT).await
}

/// [`two_nodes`] with this forward timeout.
async fn two_nodes_with(
    b_max_pending: usize,
    forward_timeout: Duration,
) -> (Arc<Net>, [(System, Arc<Cluster>); 2]) {
    let net = Arc::new(Net::default());
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    let a = node(&net, A, &[A, B], &store, 100_000, forward_timeout).await;
    let b = node(&net, B, &[A, B], &store, b_max_pending, forward_timeout).await;
    // The members gauge is set just after the view changes: both are waited for.
    until("both rings to hold both nodes", || {
        [&a, &b].iter().all(|(system, cluster)| {
            cluster.membership().view().ring.len() == 2
                && system.metrics().cluster_members.get() == 2
        })
    })
    .await;
    (net, [a, b])
}

/// `node` releases `device` (which it never held) to `to`: a fence, as during a view
/// change.
async fn fence(node: &Cluster, device: &str, to: &str) {
    let released = node.handoff().release(Arc::from(device), addr(to));
    assert_eq!(released.await.expect("released"), None, "never held here");
}

/// `node` takes two events of `device`: rps 1 forwarded by a peer, then rps 2 from a
/// client; both accepted.
async fn forwarded_then_submitted(node: &Cluster, device: &str) {
    node.receive(vec![(Arc::from(device), event(1.0))])
        .await
        .expect("accepted");
    node.submit(device, event(2.0)).await.expect("accepted");
}

fn event(rps: f64) -> Event {
    Event {
        rps,
        cpu: 0.5,
        timestamp: Utc::now(),
    }
}

/// Devices `d-0`… of which `owner` owns `n`.
fn devices_of(owner: &str, n: usize) -> Vec<String> {
    let ring = Ring::new([addr(A), addr(B)]);
    (0..)
        .map(|i| format!("d-{i}"))
        .filter(|d| ring.owner(d) == Some(addr(owner)))
        .take(n)
        .collect()
}

/// The rps readings of `device`'s stored window, once it holds `n`.
async fn stored_rps(system: &System, device: &str, n: usize) -> Vec<f64> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(w) = system.store().load_window(device).await.expect("store") {
            if w.readings().len() == n {
                return w.readings().iter().map(|r| r.0).collect();
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{device}: no window of {n}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn failures(system: &System, reason: ForwardFailure) -> u64 {
    system
        .metrics()
        .forward_failures
        .get_or_create(&ForwardFailureLabel { reason })
        .get()
}

#[test]
fn peer_states_read_back_from_their_wire_names() {
    for state in [PeerState::Member, PeerState::Starting, PeerState::Leaving] {
        assert_eq!(PeerState::parse(state.as_str()), Some(state));
    }
    assert_eq!(PeerState::Member.as_str(), "member");
    assert_eq!(PeerState::parse("ready"), None);
}

#[test]
fn an_overload_is_not_a_failure_of_the_peer() {
    assert_eq!(
        ForwardError::Timeout.failure(),
        Some(ForwardFailure::Timeout)
    );
    assert_eq!(
        ForwardError::Unreachable("x".into()).failure(),
        Some(ForwardFailure::Unreachable)
    );
    assert_eq!(
        ForwardError::Rejected(401).failure(),
        Some(ForwardFailure::Rejected)
    );
    assert_eq!(ForwardError::Overloaded.failure(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_event_is_processed_by_its_device_s_owner_whichever_node_took_it() {
    let (_net, [(a, a_cluster), (b, b_cluster)]) = two_nodes(100_000).await;
    assert_eq!(a.metrics().cluster_members.get(), 2);
    assert_eq!(b.metrics().cluster_members.get(), 2);
    let mine = devices_of(A, 5);
    let theirs = devices_of(B, 5);
    for i in 0..3 {
        for d in mine.iter().chain(&theirs) {
            a_cluster
                .submit(d, event(f64::from(i)))
                .await
                .expect("accepted");
        }
    }
    until("all 30 events processed", || {
        a.metrics().events_processed.get() + b.metrics().events_processed.get() == 30
    })
    .await;
    assert_eq!(a.metrics().events_processed.get(), 15, "A's own devices");
    assert_eq!(b.metrics().events_processed.get(), 15, "B's, forwarded");
    assert_eq!(a.metrics().events_forwarded.get(), 15);
    assert_eq!(b.metrics().forwarded_events_received.get(), 15);
    for d in &theirs {
        assert_eq!(stored_rps(&b, d, 3).await, [0.0, 1.0, 2.0], "{d} in order");
    }
    assert_eq!(b_cluster.membership().view().ring.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_split_by_owner_and_each_device_keeps_its_order() {
    let (_net, [(a, a_cluster), (b, _)]) = two_nodes(100_000).await;
    let devices: Vec<String> = devices_of(A, 3)
        .into_iter()
        .chain(devices_of(B, 3))
        .collect();
    let batch: Vec<(Arc<str>, Event)> = (0..4)
        .flat_map(|i| {
            devices
                .iter()
                .map(move |d| (Arc::from(d.as_str()), event(f64::from(i))))
        })
        .collect();
    assert_eq!(
        a_cluster.submit_batch(batch).await,
        Ok(vec![]),
        "nothing refused"
    );
    until("all 24 events processed", || {
        a.metrics().events_processed.get() + b.metrics().events_processed.get() == 24
    })
    .await;
    assert_eq!(a.metrics().events_processed.get(), 12);
    assert_eq!(b.metrics().events_processed.get(), 12);
    for d in &devices {
        assert_eq!(stored_rps(&a, d, 4).await, [0.0, 1.0, 2.0, 3.0], "{d}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overloaded_owner_refuses_its_part_and_nothing_else() {
    // B accepts no event at all.
    let (_net, [(a, a_cluster), (b, _)]) = two_nodes(0).await;
    let (mine, theirs) = (devices_of(A, 1).remove(0), devices_of(B, 1).remove(0));
    assert_eq!(
        a_cluster.submit(&theirs, event(1.0)).await,
        Err(SubmitError::Overloaded)
    );
    let only_theirs = vec![(Arc::from(theirs.as_str()), event(1.0))];
    assert_eq!(
        a_cluster.submit_batch(only_theirs).await,
        Err(SubmitError::Overloaded),
        "nothing accepted: the whole batch is refused"
    );
    let mixed = vec![
        (Arc::from(theirs.as_str()), event(2.0)),
        (Arc::from(mine.as_str()), event(2.0)),
        (Arc::from(theirs.as_str()), event(3.0)),
    ];
    assert_eq!(a_cluster.submit_batch(mixed).await, Ok(vec![0, 2]));
    until("A's event processed", || {
        a.metrics().events_processed.get() == 1
    })
    .await;
    assert_eq!(b.metrics().events_processed.get(), 0);
    assert_eq!(
        failures(&a, ForwardFailure::Unreachable) + failures(&a, ForwardFailure::Rejected),
        0,
        "an overload is not a failure of the peer"
    );
    assert_eq!(
        a_cluster.membership().view().ring.len(),
        2,
        "B stays a member"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_refuses_connections_is_left_out_and_its_events_are_processed_here() {
    let (net, [(a, a_cluster), (b, _)]) = two_nodes(100_000).await;
    let theirs = devices_of(B, 2);
    // No probe round may find B down first: only the refused forward can.
    a_cluster.stop();
    net.set(B, Link::Down);
    a_cluster
        .submit(&theirs[0], event(1.0))
        .await
        .expect("accepted");
    assert!(
        !a_cluster.membership().view().ring.contains(addr(B)),
        "left out at the first refused forward"
    );
    assert_eq!(a.metrics().cluster_members.get(), 1);
    let batch = vec![(Arc::from(theirs[1].as_str()), event(1.0))];
    assert_eq!(a_cluster.submit_batch(batch).await, Ok(vec![]));
    until("both events processed here", || {
        a.metrics().events_processed.get() == 2
    })
    .await;
    assert_eq!(b.metrics().events_processed.get(), 0);
    assert_eq!(failures(&a, ForwardFailure::Unreachable), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_part_whose_owner_fails_goes_event_by_event_to_the_new_owner() {
    let (net, [(a, a_cluster), (b, _)]) = two_nodes(100_000).await;
    let theirs = devices_of(B, 2);
    a_cluster.stop();
    net.set(B, Link::Down);
    let batch: Vec<(Arc<str>, Event)> = (0..3)
        .flat_map(|i| {
            theirs
                .iter()
                .map(move |d| (Arc::from(d.as_str()), event(f64::from(i))))
        })
        .collect();
    assert_eq!(a_cluster.submit_batch(batch).await, Ok(vec![]));
    assert!(!a_cluster.membership().view().ring.contains(addr(B)));
    for d in &theirs {
        assert_eq!(stored_rps(&a, d, 3).await, [0.0, 1.0, 2.0], "{d} in order");
    }
    assert_eq!(b.metrics().events_processed.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_event_of_a_device_handed_off_goes_on_to_its_new_holder() {
    let (_net, [(a, a_cluster), (b, _)]) = two_nodes(100_000).await;
    // A owns the device but released it to B (a fence), as during a view change.
    let device = devices_of(A, 1).remove(0);
    fence(&a_cluster, &device, B).await;
    // A forwarded event, and one A takes from a client: both follow the fence.
    forwarded_then_submitted(&a_cluster, &device).await;
    assert_eq!(stored_rps(&b, &device, 2).await, [1.0, 2.0]);
    assert_eq!(b.metrics().events_processed.get(), 2);
    assert_eq!(a.metrics().events_processed.get(), 0);
    assert_eq!(a.metrics().forwarded_events_received.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fence_towards_a_node_that_is_gone_is_ignored() {
    let (net, [(a, a_cluster), (b, _)]) = two_nodes(100_000).await;
    let device = devices_of(A, 1).remove(0);
    fence(&a_cluster, &device, B).await;
    net.set(B, Link::Down);
    until("B out of A's view", || {
        !a_cluster.membership().view().reachable.contains(&addr(B))
    })
    .await;
    forwarded_then_submitted(&a_cluster, &device).await;
    assert_eq!(stored_rps(&a, &device, 2).await, [1.0, 2.0]);
    assert_eq!(b.metrics().events_processed.get(), 0);
    assert_eq!(
        failures(&a, ForwardFailure::Unreachable),
        0,
        "nothing was sent to the node that is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_node_owns_nothing_and_its_peers_see_it_leave() {
    let (_net, [(a, a_cluster), (b, b_cluster)]) = two_nodes(100_000).await;
    assert_eq!(a_cluster.leave_grace(), 2 * DISCOVERY + FORWARD_TIMEOUT);
    a_cluster.leave();
    assert_eq!(a_cluster.membership().state(), PeerState::Leaving);
    assert_eq!(a.metrics().cluster_members.get(), 1, "A's own view lost A");
    // The members gauge follows the view just after it changes.
    until("B's view and gauge to lose A", || {
        b_cluster.membership().view().ring.len() == 1 && b.metrics().cluster_members.get() == 1
    })
    .await;
    // A forwards even its own devices now.
    let device = devices_of(A, 1).remove(0);
    a_cluster
        .submit(&device, event(1.0))
        .await
        .expect("accepted");
    until("B processed it", || b.metrics().events_processed.get() == 1).await;
    assert_eq!(a.metrics().events_processed.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_actors_stop_after_a_view_change_and_live_on_while_the_view_holds() {
    let (net, [(a, a_cluster), _b]) = two_nodes(100_000).await;
    // Well past the rounds that follow the first view change.
    tokio::time::sleep(DISCOVERY * 20).await;
    let device = devices_of(A, 1).remove(0);
    a_cluster
        .submit(&device, event(1.0))
        .await
        .expect("accepted");
    until("processed", || a.metrics().events_processed.get() == 1).await;
    tokio::time::sleep(DISCOVERY * 20).await;
    assert_eq!(a.metrics().device_actors.get(), 1, "no change, no eviction");
    net.set(B, Link::Down);
    until("the idle actor stopped after B left", || {
        a.metrics().device_actors.get() == 0
    })
    .await;
    assert_eq!(a_cluster.membership().view().ring.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_stops_when_asked() {
    let (_net, [(_a, a_cluster), (_b, b_cluster)]) = two_nodes(100_000).await;
    a_cluster.stop();
    // A round already under way when the stop came still finishes (its probes take
    // microseconds here): B leaves only after it.
    tokio::time::sleep(DISCOVERY * 5).await;
    // B leaves; A, no longer probing, keeps B in its ring.
    b_cluster.leave();
    tokio::time::sleep(DISCOVERY * 20).await;
    assert_eq!(a_cluster.membership().view().ring.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_request_stops_idle_actors_without_waiting_for_discovery() {
    let (_net, [(a, a_cluster), _b]) = two_nodes(100_000).await;
    // No discovery round any more: only the request can stop an actor.
    a_cluster.stop();
    let device = devices_of(A, 1).remove(0);
    a_cluster
        .submit(&device, event(1.0))
        .await
        .expect("accepted");
    until("processed", || a.metrics().events_processed.get() == 1).await;
    // Asked again until the actor is idle (it may still be finishing its event).
    until("the idle actor stopped", || {
        a_cluster.request_resync();
        a.metrics().device_actors.get() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_owner_is_retried_until_the_reroute_deadline_then_left_out() {
    let forward_timeout = Duration::from_millis(300);
    let (net, [(a, a_cluster), (b, _)]) = two_nodes_with(100_000, forward_timeout).await;
    // Only forwards may change A's view from here on.
    a_cluster.stop();
    let theirs = devices_of(B, 1).remove(0);
    net.set(B, Link::Slow(forward_timeout));
    a_cluster
        .submit(&theirs, event(1.0))
        .await
        .expect("accepted");
    assert!(
        failures(&a, ForwardFailure::Timeout) >= 2,
        "a timed-out forward is retried to the same owner while the deadline allows"
    );
    assert!(
        !a_cluster.membership().view().ring.contains(addr(B)),
        "past the deadline the owner is left out"
    );
    until("processed here", || a.metrics().events_processed.get() == 1).await;
    assert_eq!(b.metrics().events_processed.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_part_whose_owner_is_slow_goes_event_by_event_to_the_same_owner_first() {
    let forward_timeout = Duration::from_millis(300);
    let (net, [(a, a_cluster), (b, _)]) = two_nodes_with(100_000, forward_timeout).await;
    a_cluster.stop();
    let theirs = devices_of(B, 1).remove(0);
    net.set(B, Link::Slow(forward_timeout));
    let batch = vec![(Arc::from(theirs.as_str()), event(1.0))];
    assert_eq!(a_cluster.submit_batch(batch).await, Ok(vec![]));
    // The part's timeout does not leave B out: its event is retried to B until the
    // deadline, and only then processed here.
    assert!(failures(&a, ForwardFailure::Timeout) >= 2);
    assert!(!a_cluster.membership().view().ring.contains(addr(B)));
    until("processed here", || a.metrics().events_processed.get() == 1).await;
    assert_eq!(b.metrics().events_processed.get(), 0);
}

/// A handoff of `device` on `node` that lasts until the test lets go (`net.let_go`):
/// the device has an event (rps 1) queued behind its new actor, which waits for the
/// window from the node it was handed to earlier (held: no answer until let go); and a
/// node that is not a member asks for it, so the device's slot is closed until that
/// queue drains. Returns the release, which then answers.
async fn a_handoff_under_way(
    net: &Net,
    node: &(System, Arc<Cluster>),
    device: &str,
) -> tokio::task::JoinHandle<Result<Option<WindowSnapshot>, ReleaseError>> {
    const HELD: &str = "127.0.0.1:7104";
    const ASKS: &str = "127.0.0.1:7103";
    let (system, cluster) = node;
    net.set(HELD, Link::Held);
    fence(cluster, device, HELD).await;
    system
        .directory()
        .submit(device, event(1.0))
        .expect("accepted");
    until("the new actor to ask the held node", || {
        cluster.handoff.asking.contains_key(device)
    })
    .await;
    let release = tokio::spawn({
        let cluster = cluster.clone();
        let device = Arc::from(device);
        async move { cluster.handoff().release(device, addr(ASKS)).await }
    });
    until("the handoff to start", || {
        cluster.handoff.fences.holder(device).is_some()
    })
    .await;
    release
}

/// Ends a handoff begun by [`a_handoff_under_way`]: the held node answers, the device's
/// queue drains, and the release answers.
async fn end_the_handoff(
    net: &Net,
    release: tokio::task::JoinHandle<Result<Option<WindowSnapshot>, ReleaseError>>,
) {
    net.let_go.store(true, Ordering::Release);
    release
        .await
        .expect("release task")
        .expect("released once the queue drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_batch_is_taken_whole_while_one_of_its_devices_is_being_handed_off() {
    // A long forward timeout: the release must not give up on its own while a test waits.
    let (net, [a, _]) = two_nodes_with(100_000, Duration::from_secs(30)).await;
    let [calm, moving]: [String; 2] = devices_of(A, 2).try_into().expect("two devices");
    let release = a_handoff_under_way(&net, &a, &moving).await;
    let batch = tokio::spawn({
        let a_cluster = a.1.clone();
        let events = vec![
            (Arc::from(calm.as_str()), event(10.0)),
            (Arc::from(moving.as_str()), event(2.0)),
        ];
        async move { a_cluster.receive(events).await }
    });
    until("the calm device's event", || {
        a.0.metrics().events_processed.get() == 1
    })
    .await;
    assert!(
        !batch.is_finished(),
        "the batch waits for the handoff rather than being refused after part of it was queued"
    );
    end_the_handoff(&net, release).await;
    batch
        .await
        .expect("batch task")
        .expect("the whole batch is taken");
    // The node that asked cannot be reached: the device's new actor here continues the
    // released window.
    assert_eq!(stored_rps(&a.0, &moving, 2).await, [1.0, 2.0]);
    assert_eq!(stored_rps(&a.0, &calm, 1).await, [10.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_taken_while_its_device_is_being_handed_off_waits_for_the_handoff() {
    // A long forward timeout: the release must not give up on its own while a test waits.
    let (net, [a, _]) = two_nodes_with(100_000, Duration::from_secs(30)).await;
    let device = devices_of(A, 1).remove(0);
    let release = a_handoff_under_way(&net, &a, &device).await;
    let submitted = tokio::spawn({
        let a_cluster = a.1.clone();
        let device = device.clone();
        async move { a_cluster.submit(&device, event(2.0)).await }
    });
    // The node asking is no member here, so the route stays local: the event must wait
    // for the handoff to end, not be refused while it lasts.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!submitted.is_finished(), "waits while the handoff lasts");
    end_the_handoff(&net, release).await;
    submitted
        .await
        .expect("submit task")
        .expect("accepted once the handoff ended");
    assert_eq!(stored_rps(&a.0, &device, 2).await, [1.0, 2.0]);
}
