//! The cluster tests' load and reference: every device's events, what one node computes
//! from them, a client that spreads them over nodes, and the check that every node
//! answers the single-node result. Shared by the loopback and the multi-host tiers.

use super::get;
use actors::analytics::{AnomalyRule, Window};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Readings per device window in these tests (above the events per device, so that
/// `samples` counts every event and a lost or duplicated one shows).
pub const WINDOW: usize = 100;

/// Where the load goes; tests change it as nodes come and go (as a Service's endpoints do).
pub type Targets = Arc<Mutex<Vec<SocketAddr>>>;

/// The events of device `d`: a steady baseline with some noise and a spike at the end.
pub fn events_of(d: usize, n: usize) -> Vec<(f64, f64)> {
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
pub fn reference(events: &[(f64, f64)]) -> (usize, f64, f64, f64, f64, bool) {
    let mut w = Window::new(WINDOW);
    for &(rps, cpu) in events {
        w.push(rps, cpu);
    }
    let e = AnomalyRule { threshold: 2.0 }.evaluate(&w);
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
pub async fn matches(addr: SocketAddr, device: &str, events: &[(f64, f64)]) -> Result<(), String> {
    let reply = get(addr, &format!("/analyze?device_id={device}")).await;
    if reply.status != 200 {
        return Err(format!("{device}: /analyze {}", reply.status));
    }
    agrees(&reply.json(), device, events)
}

/// Whether `v`, one device's `/analyze` answer, is the reference of `events`.
pub fn agrees(v: &Value, device: &str, events: &[(f64, f64)]) -> Result<(), String> {
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
pub async fn send_device(
    d: usize,
    events: Vec<(f64, f64)>,
    targets: Targets,
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
            let ok = tokio::time::timeout(Duration::from_secs(10), try_post(addr, &body))
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
/// Why it failed goes to stderr (shown when the test fails).
pub async fn try_post(addr: SocketAddr, body: &str) -> bool {
    let json = ["Content-Type: application/json"];
    match super::http::try_send(addr, "POST", "/metric", &json, body.to_string()).await {
        Ok(reply) if reply.status == 200 => true,
        Ok(reply) => {
            eprintln!("{addr}: {} {}", reply.status, reply.body);
            false
        }
        Err(e) => {
            eprintln!("{addr}: {e:?}");
            false
        }
    }
}

/// Runs the load: `devices` devices × `per_device` events, `concurrency` devices at a
/// time, spread over `targets`.
pub async fn load(devices: usize, per_device: usize, targets: Targets, pause: Duration) -> usize {
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

/// Every device, read from every node, equals the reference (within the flush lag: a
/// node's answer is read again for up to 20 s while it differs).
pub async fn all_match(nodes: &[SocketAddr], devices: usize, per_device: usize) {
    all_match_but_repeats(nodes, devices, per_device, |_| Vec::new()).await;
}

/// [`all_match`], except that device `d` may hold one of the events `may_repeat(d)` names
/// twice: an event its client sent again after an answer that left open whether it was
/// accepted (a lost answer, or 503 `the node that owns this device failed before it
/// answered`); only the client could have avoided that duplicate.
pub async fn all_match_but_repeats(
    nodes: &[SocketAddr],
    devices: usize,
    per_device: usize,
    may_repeat: impl Fn(usize) -> Vec<usize>,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for d in 0..devices {
        let events = events_of(d, per_device);
        let device = format!("dev-{d}");
        let repeated: Vec<Vec<(f64, f64)>> = may_repeat(d)
            .into_iter()
            .filter(|&i| i < events.len())
            .map(|i| {
                let mut twice = events.clone();
                twice.insert(i, events[i]);
                twice
            })
            .collect();
        for &addr in nodes {
            loop {
                let reply = get(addr, &format!("/analyze?device_id={device}")).await;
                let verdict = if reply.status != 200 {
                    Err(format!("{device}: /analyze {}", reply.status))
                } else {
                    let v = reply.json();
                    agrees(&v, &device, &events).or_else(|e| {
                        repeated
                            .iter()
                            .any(|twice| agrees(&v, &device, twice).is_ok())
                            .then_some(())
                            .ok_or(e)
                    })
                };
                match verdict {
                    Ok(()) => break,
                    Err(e) if std::time::Instant::now() > deadline => panic!("{addr}: {e}"),
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }
    }
}

/// Watches `devices` on `addr` while load runs: a device's `samples` never goes back.
pub async fn samples_never_go_back(
    addrs: Targets,
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
