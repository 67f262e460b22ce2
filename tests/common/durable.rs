//! What the durability tests share: the stored windows read over RESP (they are binary),
//! a POST that reports a lost answer instead of failing, a load that records what each
//! client learned, and the check that every stored window holds each event answered 200
//! exactly once and each event whose answer was lost at most once.

use actors::store::WindowSnapshot;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One Redis command over RESP; the raw reply.
pub async fn resp(port: u16, args: &[&[u8]]) -> Vec<u8> {
    let mut req = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        req.extend(format!("${}\r\n", a.len()).bytes());
        req.extend_from_slice(a);
        req.extend_from_slice(b"\r\n");
    }
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to redis");
    stream.write_all(&req).await.expect("write");
    let mut reply = Vec::new();
    let mut buf = [0u8; 65536];
    // One reply: read until the bulk string (or the line) is complete.
    loop {
        let n = stream.read(&mut buf).await.expect("read");
        reply.extend_from_slice(&buf[..n]);
        if n == 0 || complete(&reply) {
            return reply;
        }
    }
}

fn complete(reply: &[u8]) -> bool {
    let Some(end) = reply.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    match reply.first() {
        Some(b'$') => {
            let len: i64 = std::str::from_utf8(&reply[1..end])
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(-1);
            len < 0 || reply.len() >= end + 2 + len as usize + 2
        }
        _ => true,
    }
}

/// `GET key` as bytes (`None`: no such key).
pub async fn redis_get(port: u16, key: &str) -> Option<Vec<u8>> {
    let reply = resp(port, &[b"GET", key.as_bytes()]).await;
    let end = reply.windows(2).position(|w| w == b"\r\n")?;
    let len: usize = std::str::from_utf8(&reply[1..end]).ok()?.parse().ok()?;
    Some(reply[end + 2..end + 2 + len].to_vec())
}

/// POSTs one event on a new connection; the status, or `None` when the connection
/// failed or broke (the service was killed).
pub async fn try_post_event(addr: SocketAddr, body: String) -> Option<u16> {
    let json = ["Content-Type: application/json"];
    let attempt = super::http::try_send(addr, "POST", "/metric", &json, body);
    tokio::time::timeout(Duration::from_secs(10), attempt)
        .await
        .ok()?
        .ok()
        .map(|reply| reply.status)
}

/// What the clients learned about each event they sent (by device, its rps): answered
/// 200, or not answered 200 although it may have been taken (no answer, or refused after
/// the node it was forwarded to failed).
#[derive(Default, Debug)]
pub struct Outcomes {
    pub acked: HashMap<String, Vec<f64>>,
    pub unknown: HashMap<String, Vec<f64>>,
}

impl Outcomes {
    /// Adds what another client learned.
    pub fn extend(&mut self, other: Outcomes) {
        for (d, v) in other.acked {
            self.acked.entry(d).or_default().extend(v);
        }
        for (d, v) in other.unknown {
            self.unknown.entry(d).or_default().extend(v);
        }
    }

    /// Events answered 200.
    pub fn acked_count(&self) -> usize {
        self.acked.values().map(Vec::len).sum()
    }

    /// Checks every device's stored window (Redis on `port`): each answered event once,
    /// each unknown one at most once, nothing that was never sent.
    pub async fn check_stored(&self, port: u16) {
        for (device, acked) in &self.acked {
            let stored = redis_get(port, &format!("window:{device}"))
                .await
                .unwrap_or_else(|| panic!("{device}: no stored window"));
            let window = WindowSnapshot::decode(&stored).expect("window decodes");
            let mut seen: HashMap<u64, usize> = HashMap::new();
            for (rps, _) in window.readings() {
                *seen.entry(rps.to_bits()).or_default() += 1;
            }
            let mut expected: HashMap<u64, usize> = HashMap::new();
            for rps in acked {
                *expected.entry(rps.to_bits()).or_default() += 1;
            }
            let unknown = self.unknown.get(device).cloned().unwrap_or_default();
            for (bits, want) in &expected {
                let got = seen.get(bits).copied().unwrap_or(0);
                let maybe = unknown.iter().filter(|u| u.to_bits() == *bits).count();
                assert!(
                    got >= *want && got <= want + maybe,
                    "{device}: rps {} counted {got} times, answered {want} times ({maybe} more not answered)",
                    f64::from_bits(*bits)
                );
            }
            for (bits, got) in &seen {
                assert!(
                    expected.contains_key(bits) || unknown.iter().any(|u| u.to_bits() == *bits),
                    "{device}: rps {} ({got} times) was never sent",
                    f64::from_bits(*bits)
                );
            }
        }
    }
}

/// Waits until `addr` answers its own `/ready` with 200.
pub async fn wait_ready(addr: SocketAddr) {
    super::eventually(Duration::from_secs(20), "/ready 200", || async move {
        (super::get(addr, "/ready").await.status == 200).then_some(())
    })
    .await;
}

/// Where the clients send: a Service's endpoints, which lose a pod once it is gone.
pub type Targets = Arc<Mutex<Vec<SocketAddr>>>;

/// What a client does with an answer other than 200.
#[derive(Clone, Copy, Debug)]
pub enum Unanswered {
    /// A lost answer (the node died): the event is unknown and the client stops; any
    /// status but 200 fails the test.
    Stop,
    /// A lost answer or a 503 (which, after the member the event was forwarded to failed,
    /// does not say whether that member took it): the event is unknown and the client
    /// goes on with the next one; any other status fails the test.
    GoOn,
}

/// `clients` concurrent clients, each sending events of its own `per_client` devices in
/// turn (one at a time per device, as a device does) to the targets in turn until
/// `stop`, never sending an event twice. Devices whose index is a multiple of 4 send the
/// same reading with the same timestamp every time.
pub async fn load(
    targets: Targets,
    clients: usize,
    per_client: usize,
    stop: Arc<AtomicBool>,
    unanswered: Unanswered,
) -> Outcomes {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (targets, stop) = (targets.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Outcomes::default();
            for seq in 0u32.. {
                for d in 0..per_client {
                    let index = c * per_client + d;
                    let device = format!("dev-{index}");
                    let (rps, timestamp) = if index % 4 == 0 {
                        (7.0, "2024-01-15T10:30:00Z".to_string())
                    } else {
                        (f64::from(seq) * 1000.0 + index as f64, now())
                    };
                    let body = format!(
                        r#"{{"device_id":"{device}","rps":{rps},"cpu":0.5,"timestamp":"{timestamp}"}}"#
                    );
                    let addr = {
                        let t = targets.lock().expect("targets");
                        t[(c + d + seq as usize) % t.len()]
                    };
                    match (try_post_event(addr, body).await, unanswered) {
                        (Some(200), _) => out.acked.entry(device).or_default().push(rps),
                        (None, Unanswered::Stop) => {
                            out.unknown.entry(device).or_default().push(rps);
                            return out;
                        }
                        (None | Some(503), Unanswered::GoOn) => {
                            out.unknown.entry(device).or_default().push(rps)
                        }
                        (Some(status), _) => panic!("{device}: status {status}"),
                    }
                }
                if stop.load(Ordering::Relaxed) {
                    return out;
                }
            }
            out
        }));
    }
    let mut all = Outcomes::default();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}
