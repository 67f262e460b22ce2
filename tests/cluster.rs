//! Scale-out on loopback: real nodes (the release binary's code, started as processes)
//! sharing a real redis-server, with static peer lists. Each test checks what an operator
//! would: every device's analysis, read from every node, equals what one node computes
//! from the same events.

mod common;

use common::cluster::{all_match, load, samples_never_go_back, WINDOW};
use common::{eventually, free_port, get, raw, Redis, Service};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const SOON: Duration = Duration::from_secs(20);

/// One cluster at a time: three nodes per test already share the machine's two cores,
/// and overlapping clusters would measure the scheduler rather than the service.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One node of a test cluster.
struct Node {
    svc: Option<Service>,
    internal: SocketAddr,
}

impl Node {
    fn svc(&self) -> &Service {
        self.svc.as_ref().expect("node running")
    }
}

/// The internal addresses of `n` nodes-to-be.
fn internal_addrs(n: usize) -> Vec<SocketAddr> {
    (0..n)
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect()
}

/// Forward timeout of the test nodes: generous, because debug builds of three nodes, Redis
/// and the load share two cores here, and a slow answer is not what these tests are about
/// (the hanging-peer test sets its own).
const FORWARD_TIMEOUT: &str = "3s";

/// Window checkpoints of the test nodes: what a crash may lose (see the crash test).
const CHECKPOINT_INTERVAL: &str = "200ms";

fn start_node(redis: &Redis, me: SocketAddr, peers: &[SocketAddr], token: &str) -> Node {
    start_node_with(redis, me, peers, token, FORWARD_TIMEOUT)
}

fn start_node_with(
    redis: &Redis,
    me: SocketAddr,
    peers: &[SocketAddr],
    token: &str,
    forward_timeout: &str,
) -> Node {
    let peers = peers
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let svc = Service::start(&[
        ("REDIS_URL", &redis.url()),
        ("CLUSTER_PEERS", &peers),
        ("CLUSTER_ADVERTISE_ADDR", &me.to_string()),
        ("CLUSTER_LISTEN_ADDR", &me.to_string()),
        ("CLUSTER_TOKEN", token),
        ("CLUSTER_DISCOVERY_INTERVAL", "100ms"),
        ("CLUSTER_FORWARD_TIMEOUT", forward_timeout),
        ("WINDOW_SIZE", &WINDOW.to_string()),
        ("MAX_DEVICE_LABELS", "100000"),
        ("WINDOW_CHECKPOINT_INTERVAL", CHECKPOINT_INTERVAL),
        ("RUST_LOG", "info,actors=debug"),
    ]);
    Node {
        svc: Some(svc),
        internal: me,
    }
}

/// Starts the first `running` of `addrs` (each listing all of them as peers), waits until
/// they agree, and returns them with the load's targets (their public addresses).
async fn cluster(
    redis: &Redis,
    addrs: &[SocketAddr],
    running: usize,
    forward_timeout: &str,
) -> (Vec<Node>, common::cluster::Targets) {
    let nodes: Vec<Node> = addrs[..running]
        .iter()
        .map(|me| start_node_with(redis, *me, addrs, "t", forward_timeout))
        .collect();
    converged(&nodes, running as f64).await;
    let targets = Arc::new(std::sync::Mutex::new(
        nodes.iter().map(|n| n.svc().addr).collect::<Vec<_>>(),
    ));
    (nodes, targets)
}

/// Waits until every running node is ready and sees `members` members.
async fn converged(nodes: &[Node], members: f64) {
    for node in nodes.iter().filter(|n| n.svc.is_some()) {
        let svc = node.svc();
        eventually(SOON, "cluster view", || async {
            let ready = get(svc.addr, "/ready").await.status == 200;
            let seen = svc.metric("cluster_members").await;
            (ready && seen == Some(members)).then_some(())
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_are_split_by_owner_and_every_device_matches_one_node() {
    let _one = ONE_CLUSTER.lock().await;
    let redis = Redis::start();
    let addrs = internal_addrs(3);
    let (nodes, _) = cluster(&redis, &addrs, 3, FORWARD_TIMEOUT).await;
    let public: Vec<SocketAddr> = nodes.iter().map(|n| n.svc().addr).collect();
    let (devices, per_device) = (200, 30);
    let events: Vec<Vec<(f64, f64)>> = (0..devices)
        .map(|d| common::cluster::events_of(d, per_device))
        .collect();
    // Batch i holds every device's i-th event; batches go to the nodes in turn, one
    // after the other (a device's events in order, as one gateway sends them).
    for i in 0..per_device {
        let body: String = (0..devices)
            .map(|d| {
                let (rps, cpu) = events[d][i];
                format!(
                    "{}\n",
                    serde_json::json!({"device_id": format!("dev-{d}"), "cpu": cpu, "rps": rps})
                )
            })
            .collect();
        let r = common::post(public[i % public.len()], "/metric/batch", &body).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["accepted"], devices);
    }
    all_match(&public, devices, per_device).await;
    let mut forwarded = 0.0;
    for n in &nodes {
        forwarded += n
            .svc()
            .metric("events_forwarded_total")
            .await
            .unwrap_or(0.0);
    }
    let total = (devices * per_device) as f64;
    assert!(
        forwarded > total * 0.5 && forwarded < total * 0.8,
        "forwarded {forwarded} of {total}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_compute_exactly_what_one_node_computes() {
    let _one = ONE_CLUSTER.lock().await;
    let redis = Redis::start();
    let addrs = internal_addrs(3);
    let (nodes, targets) = cluster(&redis, &addrs, 3, FORWARD_TIMEOUT).await;
    let public: Vec<SocketAddr> = nodes.iter().map(|n| n.svc().addr).collect();
    let (devices, per_device) = (300, 60);
    load(devices, per_device, targets, Duration::ZERO).await;
    all_match(&public, devices, per_device).await;
    // Two thirds of the events arrived at a node that does not own their device.
    let mut forwarded = 0.0;
    for n in &nodes {
        forwarded += n
            .svc()
            .metric("events_forwarded_total")
            .await
            .unwrap_or(0.0);
    }
    let total = (devices * per_device) as f64;
    assert!(
        forwarded > total * 0.5 && forwarded < total * 0.8,
        "forwarded {forwarded} of {total}"
    );
    // Exact in steady state: no forward failed, so nothing was re-routed.
    for n in &nodes {
        for reason in ["timeout", "unreachable", "rejected"] {
            let series = format!("forward_failures_total{{reason=\"{reason}\"}}");
            assert_eq!(n.svc().metric(&series).await, Some(0.0), "{series}");
        }
    }
}

#[tokio::test]
async fn internal_requests_without_the_token_get_401_are_counted_and_queue_nothing() {
    let _one = ONE_CLUSTER.lock().await;
    let redis = Redis::start();
    let addrs = internal_addrs(1);
    let node = start_node(&redis, addrs[0], &addrs, "right-token");
    converged(std::slice::from_ref(&node), 1.0).await;
    let body = "IE1";
    for auth in ["Authorization: Bearer wrong-token\r\n", ""] {
        let request = format!(
            "POST /cluster/events HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{auth}Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        assert_eq!(raw(node.internal, request.as_bytes()).await.status, 401);
    }
    let right = "GET /cluster/ping HTTP/1.1\r\nHost: t\r\nConnection: close\r\nAuthorization: Bearer right-token\r\n\r\n";
    let ping = raw(node.internal, right.as_bytes()).await;
    assert_eq!((ping.status, ping.body.as_str()), (200, "member"));
    let svc = node.svc();
    assert_eq!(svc.metric("cluster_unauthorized_total").await, Some(2.0));
    assert_eq!(
        svc.metric("forwarded_events_received_total").await,
        Some(0.0)
    );
    // The public port serves none of the internal routes.
    assert_eq!(get(svc.addr, "/cluster/ping").await.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_peer_that_is_down_owns_nothing_and_loses_nothing() {
    let _one = ONE_CLUSTER.lock().await;
    let redis = Redis::start();
    let addrs = internal_addrs(3);
    // The third node never starts: its address is in every peer list.
    let (nodes, targets) = cluster(&redis, &addrs, 2, FORWARD_TIMEOUT).await;
    let public: Vec<SocketAddr> = nodes.iter().map(|n| n.svc().addr).collect();
    let retries = load(60, 30, targets, Duration::ZERO).await;
    assert_eq!(retries, 0, "every event was answered 200 the first time");
    all_match(&public, 60, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scaling_out_and_in_under_load_keeps_every_window_exact() {
    let _one = ONE_CLUSTER.lock().await;
    let redis = Redis::start();
    let addrs = internal_addrs(3);
    let (mut nodes, targets) = cluster(&redis, &addrs, 2, FORWARD_TIMEOUT).await;
    let (devices, per_device) = (100, 60);
    let load = tokio::spawn(load(
        devices,
        per_device,
        targets.clone(),
        Duration::from_millis(60),
    ));
    let (stop_watch, watching) = tokio::sync::watch::channel(false);
    let readers = Arc::new(std::sync::Mutex::new(vec![nodes[1].svc().addr]));
    let watcher = tokio::spawn(samples_never_go_back(readers, 30, watching));

    // Scale out: a third node joins while events flow.
    tokio::time::sleep(Duration::from_millis(800)).await;
    nodes.push(start_node(&redis, addrs[2], &addrs, "t"));
    converged(&nodes, 3.0).await;
    targets.lock().expect("targets").push(nodes[2].svc().addr);

    // Scale in: the first node is taken out of the Service, then stopped with SIGTERM.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let leaving = nodes[0].svc.take().expect("running");
    targets
        .lock()
        .expect("targets")
        .retain(|a| *a != leaving.addr);
    let (code, _) = tokio::task::spawn_blocking(move || leaving.terminate())
        .await
        .expect("terminate");
    assert_eq!(code, 0, "a leaving node exits cleanly");
    converged(&nodes, 2.0).await;

    let retries = load.await.expect("load");
    eprintln!("client retries: {retries}");
    for n in nodes.iter().filter(|n| n.svc.is_some()) {
        for reason in ["timeout", "unreachable", "rejected"] {
            let series = format!("forward_failures_total{{reason=\"{reason}\"}}");
            eprintln!("{series} {:?}", n.svc().metric(&series).await);
        }
    }
    let _ = stop_watch.send(true);
    watcher.await.expect("samples never went back");
    let remaining: Vec<SocketAddr> = nodes
        .iter()
        .filter_map(|n| n.svc.as_ref())
        .map(|s| s.addr)
        .collect();
    all_match(&remaining, devices, per_device).await;
    // The node that joined took devices over (their windows came from their holders or,
    // when the holder had already stopped an idle actor and flushed, from the store).
    let processed_by_new = nodes[2]
        .svc()
        .metric("events_processed_total")
        .await
        .unwrap_or(0.0);
    assert!(processed_by_new > 0.0, "the joined node owns devices");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_node_s_devices_continue_from_their_stored_windows() {
    let _one = ONE_CLUSTER.lock().await;
    let redis = Redis::start();
    let addrs = internal_addrs(3);
    let (mut nodes, targets) = cluster(&redis, &addrs, addrs.len(), FORWARD_TIMEOUT).await;
    let (devices, per_device) = (90, 40);
    let load = tokio::spawn(load(
        devices,
        per_device,
        targets.clone(),
        Duration::from_millis(40),
    ));
    tokio::time::sleep(Duration::from_millis(800)).await;
    // SIGKILL: no drain, no handoff.
    let crashed = nodes[2].svc.take().expect("running");
    targets
        .lock()
        .expect("targets")
        .retain(|a| *a != crashed.addr);
    drop(crashed);
    load.await.expect("load");
    // What a crash may lose, per device: the events since its window's last checkpoint
    // (CHECKPOINT_INTERVAL, 200 ms), plus the one event being processed or waiting for
    // the flush. Events of one device are sent one after the other, each after the
    // answer to the previous one, every 40 ms (or more): at most 200 / 40 + 1 events; plus
    // one retried duplicate when the crash cut a connection after the event was accepted.
    const LOSS: u64 = 200 / 40 + 1;
    const DUPLICATES: u64 = 1;
    let survivors: Vec<SocketAddr> = nodes
        .iter()
        .filter_map(|n| n.svc.as_ref())
        .map(|s| s.addr)
        .collect();
    if let Some((d, addr, samples)) =
        outside_bounds(&survivors, devices, per_device, LOSS, DUPLICATES).await
    {
        panic!(
            "dev-{d} on {addr}: {samples} samples after {per_device} events (a window restarted?)"
        );
    }
}

/// The first device whose window, read from any of `addrs`, holds fewer than
/// `per_device − loss` or more than `per_device + duplicates` samples.
async fn outside_bounds(
    addrs: &[SocketAddr],
    devices: usize,
    per_device: usize,
    loss: u64,
    duplicates: u64,
) -> Option<(usize, SocketAddr, u64)> {
    let n = per_device as u64;
    for d in 0..devices {
        for addr in addrs {
            let v = eventually(SOON, "analysis", || async {
                let r = get(*addr, &format!("/analyze?device_id=dev-{d}")).await;
                (r.status == 200).then(|| r.json())
            })
            .await;
            let samples = v["samples"].as_u64().expect("samples");
            if samples + loss < n || samples > n + duplicates {
                return Some((d, *addr, samples));
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_peer_is_routed_around_and_nothing_is_lost() {
    let _one = ONE_CLUSTER.lock().await;
    let redis = Redis::start();
    let addrs = internal_addrs(3);
    let (nodes, targets) = cluster(&redis, &addrs, addrs.len(), "1s").await;
    let (devices, per_device) = (60, 40);
    let load = tokio::spawn(load(
        devices,
        per_device,
        targets.clone(),
        Duration::from_millis(40),
    ));
    tokio::time::sleep(Duration::from_millis(600)).await;
    // SIGSTOP: the process accepts connections (the kernel does) but never answers, as a
    // node in a long GC pause or on a frozen VM.
    let hung = nodes[2].svc();
    targets.lock().expect("targets").retain(|a| *a != hung.addr);
    signal(hung.pid(), "-STOP");
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(hung.pid(), "-CONT");
    load.await.expect("load");
    let mut timeouts = 0.0;
    for n in &nodes[..2] {
        timeouts += n
            .svc()
            .metric("forward_failures_total{reason=\"timeout\"}")
            .await
            .unwrap_or(0.0);
    }
    assert!(timeouts > 0.0, "forwards to the hung node timed out");
    // The hung node's own accepted-but-unprocessed events (at most one per device: each
    // device sends its next event only after the answer to the previous one) are what a
    // pause may cost; everything re-routed is counted once.
    const LOSS: u64 = 1;
    let all: Vec<SocketAddr> = nodes.iter().map(|n| n.svc().addr).collect();
    if let Some((d, addr, samples)) = outside_bounds(&all, devices, per_device, LOSS, 0).await {
        // What each node did with the device, for whoever has to find out why.
        let mut nodes = nodes;
        for (i, node) in nodes.iter_mut().enumerate() {
            if let Some(svc) = node.svc.take() {
                let (_, logs) = svc.terminate();
                for l in logs
                    .iter()
                    .filter(|l| l.contains(&format!("\"dev-{d}\"")) || l.contains("view"))
                {
                    eprintln!("node{i}: {l}");
                }
            }
        }
        panic!("dev-{d} on {addr}: {samples} samples after {per_device} events");
    }
}

fn signal(pid: u32, which: &str) {
    std::process::Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("kill");
}
