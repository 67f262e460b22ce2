//! The cluster's HTTP side in one process: the real client ([`HttpTransport`]) against
//! the real internal listener ([`server::serve`]) of a one-node cluster (a real actor
//! system on the embedded store), over 127.0.0.1 sockets; raw requests where a peer
//! could send what the client never does; and stand-in peers for what the listener never
//! answers (a peer that never answers, a refused connection, odd statuses).

use super::client::HttpTransport;
use super::{paths, server, unix_millis};
use actors::cluster::wire;
use actors::cluster::{Cluster, ClusterConfig, ForwardError, PeerState, Transport};
use actors::event::Event;
use actors::store::{EmbeddedStore, Store};
use actors::{System, SystemConfig};
use bytes::Bytes;
use chrono::Utc;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

const TOKEN: &str = "secret-ab";
/// Bounds every wait of these tests.
const PATIENCE: Duration = Duration::from_secs(10);

/// The calling node's advertised address (nothing listens there).
fn caller() -> SocketAddr {
    "127.0.0.1:9".parse().expect("address")
}

/// A node of a one-node cluster, its internal listener serving on `addr`.
struct Node {
    addr: SocketAddr,
    system: System,
    cluster: Arc<Cluster>,
    _stop: watch::Sender<bool>,
}

/// How a test's node is set up.
struct Setup {
    /// Peers besides the node itself (CLUSTER_PEERS).
    others: Vec<SocketAddr>,
    forward_timeout: Duration,
    max_pending_events: usize,
    flush_interval: Duration,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            others: Vec::new(),
            forward_timeout: Duration::from_secs(2),
            max_pending_events: 100_000,
            flush_interval: Duration::from_millis(5),
        }
    }
}

/// Starts a node as the binary does (src/app.rs): the actor system, the cluster with
/// the HTTP transport, and the internal listener. Discovery runs once at start, then
/// not again within a test.
async fn node(setup: Setup) -> Node {
    let config = SystemConfig {
        max_pending_events: setup.max_pending_events,
        flush_interval: setup.flush_interval,
        ..SystemConfig::default()
    };
    let store = Store::Embedded(Arc::new(EmbeddedStore::new()));
    let system = System::start(config, store, Registry::default())
        .await
        .expect("actor system");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let transport = HttpTransport::new(addr, TOKEN, setup.forward_timeout).expect("transport");
    let peers = std::iter::once(addr)
        .chain(setup.others)
        .map(|p| p.to_string())
        .collect();
    let cluster = Cluster::start(
        ClusterConfig {
            peers,
            advertise: addr,
            discovery_interval: Duration::from_secs(600),
            forward_timeout: setup.forward_timeout,
            fence_ttl: Duration::from_secs(600),
        },
        Arc::new(transport),
        &system,
    );
    let (stop, stopped) = watch::channel(false);
    tokio::spawn(server::serve(
        listener,
        cluster.clone(),
        system.metrics().clone(),
        TOKEN,
        stopped,
    ));
    Node {
        addr,
        system,
        cluster,
        _stop: stop,
    }
}

/// A node that has finished its first discovery round (a member).
async fn member(setup: Setup) -> Node {
    let node = node(setup).await;
    until("the first discovery round", || {
        node.cluster.membership().is_discovered()
    })
    .await;
    node
}

/// The client of a peer, with this forward timeout.
fn client(timeout: Duration) -> HttpTransport {
    HttpTransport::new(caller(), TOKEN, timeout).expect("transport")
}

/// Waits (at most [`PATIENCE`]) until `done`.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "still waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// `call`, failing the test if it does not return within [`PATIENCE`].
async fn bounded<T>(call: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, call)
        .await
        .expect("an answer within 10 s")
}

fn event(rps: f64, cpu: f64) -> Event {
    Event {
        rps,
        cpu,
        timestamp: Utc::now(),
    }
}

fn batch(events: &[(&str, Event)]) -> Bytes {
    wire::encode(events.iter().map(|(d, e)| (*d, e)))
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_millis() as u64
}

/// One request on its own connection: the status and the body.
async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> (u16, Vec<u8>) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for h in headers {
        head.push_str(h);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(body).await.expect("write");
    let mut answer = Vec::new();
    bounded(stream.read_to_end(&mut answer))
        .await
        .expect("read");
    let end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a whole head");
    let status = String::from_utf8_lossy(&answer[..end])
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status");
    (status, answer[end + 4..].to_vec())
}

const AUTHORIZED: &str = "Authorization: Bearer secret-ab";

/// The `deadline` query of a batch sent now.
fn live_deadline() -> String {
    format!("{}?deadline={}", paths::EVENTS, now_millis() + 60_000)
}

/// A listener that accepts connections (the kernel does) and never answers.
async fn silent_peer() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    (listener, addr)
}

/// Reads a request's head (up to the blank line) byte by byte.
async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1 {
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A peer that answers its first request (a probe) as a member, then accepts
/// connections and never answers again: a member that has hung. Hands over the request
/// line of each request it holds.
async fn member_then_silent_peer() -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (held_tx, held_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut answered = false;
        while let Ok((mut stream, _)) = listener.accept().await {
            if !answered {
                answered = true;
                read_head(&mut stream).await;
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nmember",
                    )
                    .await;
            } else {
                let held_tx = held_tx.clone();
                tokio::spawn(async move {
                    let head = read_head(&mut stream).await;
                    let line = head.lines().next().unwrap_or_default().to_string();
                    let _ = held_tx.send(line);
                    // Held open, never answered, until the test ends.
                    let _ = stream.read(&mut [0u8; 1]).await;
                });
            }
        }
    });
    (addr, held_rx)
}

/// An address whose connections are refused.
fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// A stand-in peer answering every request with `status` and `body`; hands over each
/// request's head.
async fn canned_peer(
    status: u16,
    body: &'static [u8],
) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (heads, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let heads = heads.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let Some(head) = head.strip_suffix("\r\n\r\n") else {
                    return;
                };
                let length: usize = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse().ok())
                    .unwrap_or(0);
                if stream.read_exact(&mut vec![0u8; length]).await.is_err() {
                    return;
                }
                let head = head.to_string();
                let _ = heads.send(head);
                let answer = format!(
                    "HTTP/1.1 {status} Canned\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
                let _ = stream.write_all(body).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (addr, received)
}

#[test]
fn unix_millis_is_the_current_time() {
    let before = now_millis();
    let millis = unix_millis();
    let after = now_millis();
    assert!(
        (before..=after).contains(&millis),
        "{before} {millis} {after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_the_right_token_is_refused_counted_and_queues_nothing() {
    let node = member(Setup::default()).await;
    let body = batch(&[("d-1", event(1.0, 0.5))]);
    let path = live_deadline();
    for headers in [
        &[][..],
        // Two characters swapped: the same bytes, in another order.
        &["Authorization: Bearer secret-ba"],
        &["Authorization: Bearer secret-abc"],
        &["Authorization: Bearer secret-a"],
        &["Authorization: secret-ab"],
    ] {
        let (status, _) = request(node.addr, "POST", &path, headers, &body).await;
        assert_eq!(status, 401, "{headers:?}");
    }
    let (status, _) = request(node.addr, "GET", paths::PING_REJOIN, &[], b"").await;
    assert_eq!(status, 401);

    let wrong =
        HttpTransport::new(caller(), "secret-ba", Duration::from_secs(2)).expect("transport");
    assert_eq!(
        bounded(wrong.send_events(node.addr, body.clone())).await,
        Err(ForwardError::Rejected(401))
    );
    assert_eq!(
        bounded(wrong.ping(node.addr, false)).await,
        Err(ForwardError::Rejected(401))
    );
    assert_eq!(
        bounded(wrong.release(node.addr, Arc::from("d-1"))).await,
        Err(ForwardError::Rejected(401))
    );

    let metrics = node.system.metrics();
    assert_eq!(metrics.cluster_unauthorized.get(), 9);
    assert_eq!(metrics.forwarded_events_received.get(), 0);
    assert_eq!(node.system.directory().pending(), 0);
    assert_eq!(node.system.directory().devices(), 0);
    // The right token still gets in.
    assert_eq!(
        bounded(client(Duration::from_secs(2)).send_events(node.addr, body)).await,
        Ok(())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_answers_member_and_leaving_once_the_node_leaves() {
    let node = member(Setup::default()).await;
    let client = client(Duration::from_secs(2));
    assert_eq!(
        bounded(client.ping(node.addr, false)).await,
        Ok(PeerState::Member)
    );
    let (status, body) = request(node.addr, "GET", paths::PING, &[AUTHORIZED], b"").await;
    assert_eq!((status, body.as_slice()), (200, &b"member"[..]));
    node.cluster.leave();
    assert_eq!(
        bounded(client.ping(node.addr, false)).await,
        Ok(PeerState::Leaving)
    );
    assert_eq!(
        bounded(client.ping(node.addr, true)).await,
        Ok(PeerState::Leaving)
    );
    assert_eq!(node.system.metrics().cluster_unauthorized.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_answers_starting_until_the_first_discovery_round_is_done() {
    // The first round waits for a peer that never answers (for its forward timeout).
    let (_silent, silent) = silent_peer().await;
    let node = node(Setup {
        others: vec![silent],
        forward_timeout: Duration::from_secs(60),
        ..Setup::default()
    })
    .await;
    let answer = bounded(client(Duration::from_secs(2)).ping(node.addr, false)).await;
    assert_eq!(answer, Ok(PeerState::Starting));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejoin_ping_stops_the_idle_device_actors_and_a_plain_ping_does_not() {
    let node = member(Setup::default()).await;
    let client = client(Duration::from_secs(2));
    let body = batch(&[("d-1", event(1.0, 0.5))]);
    assert_eq!(bounded(client.send_events(node.addr, body)).await, Ok(()));
    let metrics = node.system.metrics().clone();
    until("the event processed by a live actor", || {
        metrics.events_processed.get() == 1 && metrics.device_actors.get() == 1
    })
    .await;

    assert_eq!(
        bounded(client.ping(node.addr, false)).await,
        Ok(PeerState::Member)
    );
    // Any resync stops idle actors before the probe is answered.
    assert_eq!(node.system.directory().devices(), 1);

    assert_eq!(
        bounded(client.ping(node.addr, true)).await,
        Ok(PeerState::Member)
    );
    assert_eq!(node.system.directory().devices(), 0);
    until("the idle actor stopped", || {
        metrics.device_actors.get() == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_sent_with_the_client_are_queued_and_processed_at_the_peer() {
    let node = member(Setup::default()).await;
    let body = batch(&[
        ("d-1", event(1.0, 0.5)),
        ("d-2", event(2.0, 0.5)),
        ("d-1", event(3.0, 0.5)),
    ]);
    let sent = bounded(client(Duration::from_secs(2)).send_events(node.addr, body)).await;
    assert_eq!(sent, Ok(()));
    let metrics = node.system.metrics().clone();
    // Counted before the acknowledgement.
    assert_eq!(metrics.forwarded_events_received.get(), 3);
    until("every event processed", || {
        metrics.events_processed.get() == 3
    })
    .await;
    assert_eq!(node.system.directory().devices(), 2);
    assert_eq!(metrics.forwarded_batches_expired.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_more_than_a_megabyte_is_accepted() {
    let node = member(Setup::default()).await;
    let device = "d".repeat(128);
    let events: Vec<(&str, Event)> = (0..8_000)
        .map(|i| (device.as_str(), event(f64::from(i), 0.5)))
        .collect();
    let body = batch(&events);
    assert!(body.len() > 1 << 20, "{} bytes", body.len());
    let sent = bounded(client(Duration::from_secs(5)).send_events(node.addr, body)).await;
    assert_eq!(sent, Ok(()));
    assert_eq!(node.system.metrics().forwarded_events_received.get(), 8_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_does_not_fit_under_max_pending_events_is_overloaded_and_queues_nothing() {
    let node = member(Setup {
        max_pending_events: 1,
        ..Setup::default()
    })
    .await;
    let body = batch(&[("d-1", event(1.0, 0.5)), ("d-2", event(2.0, 0.5))]);
    let sent = bounded(client(Duration::from_secs(2)).send_events(node.addr, body)).await;
    assert_eq!(sent, Err(ForwardError::Overloaded));
    assert_eq!(node.system.metrics().forwarded_events_received.get(), 0);
    assert_eq!(node.system.directory().pending(), 0);
    assert_eq!(node.system.directory().devices(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_arrives_after_its_deadline_is_gone_counted_and_not_queued() {
    let node = member(Setup::default()).await;
    let body = batch(&[("d-1", event(1.0, 0.5))]);
    let path = format!("{}?deadline={}", paths::EVENTS, now_millis() - 60_000);
    let (status, _) = request(node.addr, "POST", &path, &[AUTHORIZED], &body).await;
    assert_eq!(status, 410);
    let metrics = node.system.metrics();
    assert_eq!(metrics.forwarded_batches_expired.get(), 1);
    assert_eq!(metrics.forwarded_events_received.get(), 0);
    assert_eq!(node.system.directory().pending(), 0);
    assert_eq!(node.system.directory().devices(), 0);
    // The same batch within its deadline is taken.
    let (status, _) = request(node.addr, "POST", &live_deadline(), &[AUTHORIZED], &body).await;
    assert_eq!(status, 200);
    assert_eq!(metrics.forwarded_events_received.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_batch_is_rejected_with_400_and_queues_nothing() {
    let node = member(Setup::default()).await;
    let client = client(Duration::from_secs(2));
    let mut truncated = batch(&[("d-1", event(1.0, 0.5))]).to_vec();
    truncated.pop();
    for body in [Bytes::from_static(b"not a batch"), Bytes::from(truncated)] {
        let sent = bounded(client.send_events(node.addr, body)).await;
        assert_eq!(sent, Err(ForwardError::Rejected(400)));
    }
    assert_eq!(node.system.metrics().forwarded_events_received.get(), 0);
    assert_eq!(node.system.directory().pending(), 0);
    assert_eq!(node.system.directory().devices(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_answers_the_devices_final_window() {
    // Results stay in the writer (not yet in the store): the release hands them over.
    let node = member(Setup {
        flush_interval: Duration::from_secs(600),
        ..Setup::default()
    })
    .await;
    let client = client(Duration::from_secs(2));
    let body = batch(&[("d-1", event(1.0, 0.25)), ("d-1", event(3.0, 0.75))]);
    assert_eq!(bounded(client.send_events(node.addr, body)).await, Ok(()));
    let metrics = node.system.metrics().clone();
    until("both events processed", || {
        metrics.events_processed.get() == 2
    })
    .await;

    let window = bounded(client.release(node.addr, Arc::from("d-1")))
        .await
        .expect("released")
        .expect("a window");
    assert_eq!(window.readings(), &[(1.0, 0.25), (3.0, 0.75)]);
    // The device is this node's no more.
    assert_eq!(node.system.directory().devices(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_of_a_device_without_a_window_answers_none() {
    let node = member(Setup::default()).await;
    let released =
        bounded(client(Duration::from_secs(2)).release(node.addr, Arc::from("never-seen"))).await;
    assert_eq!(released, Ok(None));
    let path = format!("{}?device_id=also-never-seen", paths::RELEASE);
    let (status, body) = request(
        node.addr,
        "POST",
        &path,
        &[AUTHORIZED, "X-Cluster-From: 127.0.0.1:9"],
        b"",
    )
    .await;
    assert_eq!((status, body.len()), (204, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_without_a_device_id_or_a_caller_address_is_a_bad_request() {
    let node = member(Setup::default()).await;
    let with_device = format!("{}?device_id=d-1", paths::RELEASE);
    for (path, from) in [
        (paths::RELEASE, Some("X-Cluster-From: 127.0.0.1:9")),
        (with_device.as_str(), None),
        (with_device.as_str(), Some("X-Cluster-From: not-an-address")),
    ] {
        let headers: Vec<&str> = std::iter::once(AUTHORIZED).chain(from).collect();
        let (status, _) = request(node.addr, "POST", path, &headers, b"").await;
        assert_eq!(status, 400, "{path} {from:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_of_a_busy_device_answers_409_even_after_more_than_one_forward_timeout() {
    // The node's device actors first ask the other member for their windows, and it
    // has hung since it answered its probe, so the device stays busy.
    let (hung, mut held) = member_then_silent_peer().await;
    let node = node(Setup {
        others: vec![hung],
        forward_timeout: Duration::from_secs(2),
        ..Setup::default()
    })
    .await;
    until("the hung peer a member", || {
        node.cluster.membership().view().ring.contains(hung)
    })
    .await;
    // The caller's forward timeout is shorter than the holder's drain: a release still
    // waits for the holder's answer (several forward timeouts).
    let client = client(Duration::from_millis(1_500));
    let body = batch(&[("d-1", event(1.0, 0.5))]);
    assert_eq!(bounded(client.send_events(node.addr, body)).await, Ok(()));
    // Released only once the device's actor is asking the hung member: a release that
    // came first would fence the device towards the caller, and the actor would ask the
    // caller instead (a contest, see the handoff tests).
    let asking = bounded(held.recv()).await.expect("a held request");
    assert!(
        asking.starts_with("POST /cluster/release?device_id=d-1 "),
        "{asking}"
    );
    let released = bounded(client.release(node.addr, Arc::from("d-1"))).await;
    assert_eq!(released, Err(ForwardError::Rejected(409)));
    // The device stays here.
    assert_eq!(node.system.directory().devices(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_internal_route_is_not_found() {
    let node = member(Setup::default()).await;
    for (method, path) in [
        ("GET", "/cluster/nothing"),
        ("GET", "/"),
        ("POST", paths::PING),
        ("GET", paths::EVENTS),
        ("GET", paths::RELEASE),
    ] {
        let (status, _) = request(node.addr, method, path, &[AUTHORIZED], b"").await;
        assert_eq!(status, 404, "{method} {path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reports_a_refused_connection_as_unreachable() {
    let peer = closed_port();
    let client = client(Duration::from_secs(2));
    let body = batch(&[("d-1", event(1.0, 0.5))]);
    assert!(matches!(
        bounded(client.send_events(peer, body)).await,
        Err(ForwardError::Unreachable(_))
    ));
    assert!(matches!(
        bounded(client.ping(peer, false)).await,
        Err(ForwardError::Unreachable(_))
    ));
    assert!(matches!(
        bounded(client.release(peer, Arc::from("d-1"))).await,
        Err(ForwardError::Unreachable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_gives_up_on_a_peer_that_never_answers_with_a_timeout() {
    let (_silent, peer) = silent_peer().await;
    let client = client(Duration::from_millis(200));
    let body = batch(&[("d-1", event(1.0, 0.5))]);
    assert_eq!(
        bounded(client.send_events(peer, body)).await,
        Err(ForwardError::Timeout)
    );
    assert_eq!(
        bounded(client.ping(peer, true)).await,
        Err(ForwardError::Timeout)
    );
    assert_eq!(
        bounded(client.release(peer, Arc::from("d-1"))).await,
        Err(ForwardError::Timeout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_reports_any_other_status_as_rejected() {
    let client = client(Duration::from_secs(2));
    let body = batch(&[("d-1", event(1.0, 0.5))]);
    let (failing, _) = canned_peer(500, b"").await;
    assert_eq!(
        bounded(client.send_events(failing, body.clone())).await,
        Err(ForwardError::Rejected(500))
    );
    assert_eq!(
        bounded(client.ping(failing, false)).await,
        Err(ForwardError::Rejected(500))
    );
    assert_eq!(
        bounded(client.release(failing, Arc::from("d-1"))).await,
        Err(ForwardError::Rejected(500))
    );
    // Only a forwarded batch reads 503 as the peer's MAX_PENDING_EVENTS.
    let (busy, _) = canned_peer(503, b"").await;
    assert_eq!(
        bounded(client.send_events(busy, body)).await,
        Err(ForwardError::Overloaded)
    );
    assert_eq!(
        bounded(client.ping(busy, false)).await,
        Err(ForwardError::Rejected(503))
    );
    assert_eq!(
        bounded(client.release(busy, Arc::from("d-1"))).await,
        Err(ForwardError::Rejected(503))
    );
    // A 200 whose body makes no sense.
    let (odd, _) = canned_peer(200, b"bogus").await;
    assert_eq!(
        bounded(client.ping(odd, false)).await,
        Err(ForwardError::Rejected(200))
    );
    assert_eq!(
        bounded(client.release(odd, Arc::from("d-1"))).await,
        Err(ForwardError::Rejected(200))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_sends_the_token_its_address_and_a_deadline_one_forward_timeout_ahead() {
    let (peer, mut heads) = canned_peer(200, b"member").await;
    let timeout = Duration::from_secs(3);
    let client = client(timeout);
    let body = batch(&[("d-1", event(1.0, 0.5))]);
    let before = now_millis();
    assert_eq!(bounded(client.send_events(peer, body)).await, Ok(()));
    let after = now_millis();
    let head = bounded(heads.recv())
        .await
        .expect("the request")
        .to_ascii_lowercase();
    assert!(
        head.contains("\r\nauthorization: bearer secret-ab\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\nx-cluster-from: 127.0.0.1:9\r\n"),
        "{head}"
    );
    let deadline: u64 = head
        .strip_prefix("post /cluster/events?deadline=")
        .and_then(|rest| rest.split(' ').next())
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("no deadline: {head}"));
    let ahead = timeout.as_millis() as u64;
    assert!(
        (before + ahead..=after + ahead).contains(&deadline),
        "{before} {deadline} {after}"
    );

    assert_eq!(
        bounded(client.ping(peer, true)).await,
        Ok(PeerState::Member)
    );
    let head = bounded(heads.recv()).await.expect("the request");
    assert!(head.starts_with("GET /cluster/ping?rejoin=1 "), "{head}");
    assert_eq!(
        bounded(client.ping(peer, false)).await,
        Ok(PeerState::Member)
    );
    let head = bounded(heads.recv()).await.expect("the request");
    assert!(head.starts_with("GET /cluster/ping "), "{head}");

    let _ = bounded(client.release(peer, Arc::from("a b&c"))).await;
    let head = bounded(heads.recv()).await.expect("the request");
    assert!(
        head.starts_with("POST /cluster/release?device_id=a+b%26c "),
        "{head}"
    );
}
