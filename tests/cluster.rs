//! Scale-out on loopback: real nodes (the release binary's code, started as processes)
//! sharing a real redis-server, with static peer lists. Each test checks what an operator
//! would: every device's analysis, read from every node, equals what one node computes
//! from the same events.

mod common;

use actors::analytics::{AnomalyRule, Window};
use common::{eventually, free_port, get, raw, Redis, Service};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

const SOON: Duration = Duration::from_secs(20);

/// One cluster at a time: three nodes per test already share the machine's two cores,
/// and overlapping clusters would measure the scheduler rather than the service.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const WINDOW: usize = 100;

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

fn start_node(redis: &Redis, me: SocketAddr, peers: &[SocketAddr], token: &str) -> Node {
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
        ("CLUSTER_FORWARD_TIMEOUT", "1s"),
        ("WINDOW_SIZE", &WINDOW.to_string()),
        ("MAX_DEVICE_LABELS", "100000"),
    ]);
    Node {
        svc: Some(svc),
        internal: me,
    }
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

/// The events of device `d`: a steady baseline with some noise and a spike at the end.
fn events_of(d: usize, n: usize) -> Vec<(f64, f64)> {
    (0..n)
        .map(|i| {
            let rps = if i == n - 1 && d % 3 == 0 {
                500.0 + d as f64
            } else {
                100.0 + ((d * 31 + i * 17) % 23) as f64
            };
            let cpu = 0.2 + ((d + i * 7) % 50) as f64 / 100.0;
            (rps, cpu)
        })
        .collect()
}

/// What one node computes from the same events: the single-node reference.
fn reference(events: &[(f64, f64)]) -> (usize, f64, f64, f64, f64, bool) {
    let mut w = Window::new(WINDOW);
    for &(rps, cpu) in events {
        w.push(rps, cpu);
    }
    let last = events.last().expect("events").0;
    let e = AnomalyRule { threshold: 2.0 }.evaluate(&w, last);
    (
        e.samples,
        e.rolling_average_rps,
        e.stddev_rps,
        e.z_score,
        e.rolling_average_cpu,
        e.is_anomaly,
    )
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

/// Checks one device's analysis as read from `addr` against the reference.
async fn matches(addr: SocketAddr, device: &str, events: &[(f64, f64)]) -> Result<(), String> {
    let reply = get(addr, &format!("/analyze?device_id={device}")).await;
    if reply.status != 200 {
        return Err(format!("{device}: /analyze {}", reply.status));
    }
    let v: Value = reply.json();
    let (samples, mean, sd, z, cpu, anomaly) = reference(events);
    let ok = v["samples"] == samples as u64
        && close(v["rolling_average_rps"].as_f64().unwrap_or(f64::NAN), mean)
        && close(v["stddev_rps"].as_f64().unwrap_or(f64::NAN), sd)
        && close(v["z_score"].as_f64().unwrap_or(f64::NAN), z)
        && close(v["rolling_average_cpu"].as_f64().unwrap_or(f64::NAN), cpu)
        && v["is_anomaly"] == anomaly;
    ok.then_some(()).ok_or_else(|| {
        format!("{device}: got {v}, expected samples {samples} mean {mean} sd {sd} z {z} cpu {cpu} anomaly {anomaly}")
    })
}

fn event_body(device: &str, rps: f64, cpu: f64) -> String {
    serde_json::json!({"device_id": device, "cpu": cpu, "rps": rps}).to_string()
}

/// Sends device `d`'s events one after the other, each to the next node in turn (as a
/// Service spreads requests), retrying an event on the next node when a node does not
/// answer 200 (as a client with a retry policy does). Returns how many were retried.
async fn send_device(
    d: usize,
    events: Vec<(f64, f64)>,
    targets: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    pause: Duration,
) -> usize {
    let device = format!("dev-{d}");
    let mut retries = 0;
    for (i, (rps, cpu)) in events.into_iter().enumerate() {
        let body = event_body(&device, rps, cpu);
        let mut attempt = 0;
        loop {
            let addr = {
                let t = targets.lock().expect("targets");
                t[(d + i + attempt) % t.len()]
            };
            let ok = tokio::time::timeout(Duration::from_secs(5), try_post(addr, &body))
                .await
                .unwrap_or(false);
            if ok {
                break;
            }
            attempt += 1;
            retries += 1;
            assert!(attempt < 50, "{device} event {i} never accepted");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    retries
}

/// A POST that reports failure instead of panicking when the node is gone.
async fn try_post(addr: SocketAddr, body: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!(
        "POST /metric HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut out = Vec::new();
    if stream.read_to_end(&mut out).await.is_err() {
        return false;
    }
    out.starts_with(b"HTTP/1.1 200")
}

/// Runs the load: `devices` devices × `per_device` events, `concurrency` devices at a
/// time, spread over `targets`.
async fn load(
    devices: usize,
    per_device: usize,
    targets: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    pause: Duration,
) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    for d in 0..devices {
        tasks.spawn(send_device(
            d,
            events_of(d, per_device),
            targets.clone(),
            pause,
        ));
    }
    let mut retries = 0;
    while let Some(r) = tasks.join_next().await {
        retries += r.expect("sender");
    }
    retries
}

/// Every device, read from every node, equals the reference (within the flush lag).
async fn all_match(nodes: &[SocketAddr], devices: usize, per_device: usize) {
    let deadline = std::time::Instant::now() + SOON;
    for d in 0..devices {
        let events = events_of(d, per_device);
        let device = format!("dev-{d}");
        for &addr in nodes {
            loop {
                match matches(addr, &device, &events).await {
                    Ok(()) => break,
                    Err(e) if std::time::Instant::now() > deadline => panic!("{addr}: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_compute_exactly_what_one_node_computes() {
    let _one = ONE_CLUSTER.lock().await;
    let redis = Redis::start();
    let addrs = internal_addrs(3);
    let nodes: Vec<Node> = addrs
        .iter()
        .map(|me| start_node(&redis, *me, &addrs, "s3cret"))
        .collect();
    converged(&nodes, 3.0).await;
    let public: Vec<SocketAddr> = nodes.iter().map(|n| n.svc().addr).collect();
    let (devices, per_device) = (300, 60);
    load(
        devices,
        per_device,
        Arc::new(std::sync::Mutex::new(public.clone())),
        Duration::ZERO,
    )
    .await;
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
    let nodes: Vec<Node> = addrs[..2]
        .iter()
        .map(|me| start_node(&redis, *me, &addrs, "t"))
        .collect();
    converged(&nodes, 2.0).await;
    let public: Vec<SocketAddr> = nodes.iter().map(|n| n.svc().addr).collect();
    let retries = load(
        60,
        30,
        Arc::new(std::sync::Mutex::new(public.clone())),
        Duration::ZERO,
    )
    .await;
    assert_eq!(retries, 0, "every event was answered 200 the first time");
    all_match(&public, 60, 30).await;
}

/// Watches `devices` on `addr` while load runs: a device's `samples` never goes back.
async fn samples_never_go_back(
    addrs: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    devices: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last = vec![0u64; devices];
    while !*stop.borrow() {
        let addr = addrs.lock().expect("addrs")[0];
        for (d, seen) in last.iter_mut().enumerate() {
            let reply = get(addr, &format!("/analyze?device_id=dev-{d}")).await;
            if reply.status == 200 {
                let samples = reply.json()["samples"].as_u64().expect("samples");
                assert!(
                    samples >= *seen,
                    "dev-{d} went back from {seen} to {samples} samples"
                );
                *seen = samples;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scaling_out_and_in_under_load_keeps_every_window_exact() {
    let _one = ONE_CLUSTER.lock().await;
    let redis = Redis::start();
    let addrs = internal_addrs(3);
    let mut nodes: Vec<Node> = addrs[..2]
        .iter()
        .map(|me| start_node(&redis, *me, &addrs, "t"))
        .collect();
    converged(&nodes, 2.0).await;
    let targets = Arc::new(std::sync::Mutex::new(
        nodes.iter().map(|n| n.svc().addr).collect::<Vec<_>>(),
    ));
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
    let mut handed_in = 0.0;
    for n in nodes.iter().filter(|n| n.svc.is_some()) {
        handed_in += n
            .svc()
            .metric("device_handoffs_total{direction=\"in\"}")
            .await
            .unwrap_or(0.0);
    }
    assert!(handed_in > 0.0, "devices moved by handoff");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_node_s_devices_continue_from_their_stored_windows() {
    let _one = ONE_CLUSTER.lock().await;
    let redis = Redis::start();
    let addrs = internal_addrs(3);
    let mut nodes: Vec<Node> = addrs
        .iter()
        .map(|me| start_node(&redis, *me, &addrs, "t"))
        .collect();
    converged(&nodes, 3.0).await;
    let targets = Arc::new(std::sync::Mutex::new(
        nodes.iter().map(|n| n.svc().addr).collect::<Vec<_>>(),
    ));
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
    // What a crash may lose, per device: the events its owner had accepted but not yet
    // flushed. Events of one device are sent one after the other, each after the answer
    // to the previous one, every 40 ms, and results are flushed every 5 ms: at most the
    // one event being processed or waiting for the flush, plus one retried duplicate
    // when the crash cut a connection after the event was accepted.
    const LOSS: u64 = 1;
    const DUPLICATES: u64 = 1;
    let survivors: Vec<SocketAddr> = nodes
        .iter()
        .filter_map(|n| n.svc.as_ref())
        .map(|s| s.addr)
        .collect();
    for d in 0..devices {
        for addr in &survivors {
            let v = eventually(SOON, "analysis", || async {
                let r = get(*addr, &format!("/analyze?device_id=dev-{d}")).await;
                (r.status == 200).then(|| r.json())
            })
            .await;
            let samples = v["samples"].as_u64().expect("samples");
            let n = per_device as u64;
            assert!(
                samples + LOSS >= n && samples <= n + DUPLICATES,
                "dev-{d}: {samples} samples after {n} events (a window restarted?)"
            );
        }
    }
}
