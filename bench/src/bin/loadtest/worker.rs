//! One keep-alive connection of the load: its plan (deadline, rate, devices), its
//! requests and bodies, and what it measured; and the shared HTTP pieces the probes use
//! (a target, a connection, one request).

use anyhow::Context;
use bench::failure::{Failure, Failures, RequestError};
use bench::{event_body, Baseline, Rng};
use bytes::Bytes;
use flate2::write::GzEncoder;
use flate2::Compression;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Distinct pre-made bodies per connection in batch or gzip mode.
const BODY_POOL: usize = 16;

/// Which of `targets` connection (or probe) `i` uses: round-robin.
pub fn target_of(i: usize, targets: usize) -> usize {
    i % targets
}

pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
}

#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    pub failed: AtomicU64,
}

/// What one connection measured; merged into the report at the end.
pub struct Worker {
    pub hist: Histogram<u64>,
    pub ok: u64,
    pub failures: Failures,
}

pub async fn connect(target: &Target) -> Result<SendRequest<Full<Bytes>>, RequestError> {
    let stream = TcpStream::connect(target.addr)
        .await
        .map_err(RequestError::Connect)?;
    stream.set_nodelay(true).map_err(RequestError::Connect)?;
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A request body and how it is encoded.
#[derive(Clone)]
pub struct Payload {
    bytes: Bytes,
    ndjson: bool,
    gzip: bool,
}

impl Payload {
    pub fn json(body: String) -> Self {
        Self {
            bytes: Bytes::from(body),
            ndjson: false,
            gzip: false,
        }
    }
}

/// Sends one request; Ok(status) when an answer came back.
pub async fn send(
    sender: &mut SendRequest<Full<Bytes>>,
    target: &Target,
    method: Method,
    path: &str,
    body: Option<Payload>,
) -> Result<(u16, Bytes), RequestError> {
    sender.ready().await?;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, &target.host);
    if let Some(p) = &body {
        let kind = if p.ndjson {
            "application/x-ndjson"
        } else {
            "application/json"
        };
        req = req.header(hyper::header::CONTENT_TYPE, kind);
        if p.gzip {
            req = req.header(hyper::header::CONTENT_ENCODING, "gzip");
        }
    }
    let req = req
        .body(Full::new(body.map(|p| p.bytes).unwrap_or_default()))
        .map_err(RequestError::Build)?;
    let response = sender.send_request(req).await?;
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}

/// A pool of NDJSON bodies of `batch` events each (random devices), gzipped if asked.
fn body_pool(rng: &mut Rng, plan: &Plan) -> Vec<Payload> {
    (0..BODY_POOL)
        .map(|_| {
            let mut text = String::with_capacity(plan.batch * 64);
            for _ in 0..plan.batch {
                let device = rng.below(plan.devices);
                let (rps, cpu) = Baseline::of_device(device).reading(rng, plan.spike_share);
                text.push_str(&event_body(device, rps, cpu));
                text.push('\n');
            }
            let bytes = if plan.gzip {
                let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
                // Writing into a Vec cannot fail.
                let _ = encoder.write_all(text.as_bytes());
                Bytes::from(encoder.finish().unwrap_or_default())
            } else {
                Bytes::from(text)
            };
            Payload {
                bytes,
                ndjson: true,
                gzip: plan.gzip,
            }
        })
        .collect()
}

pub struct Plan {
    pub deadline: Instant,
    pub start: Instant,
    /// Per connection, the gap between intended sends (open loop).
    pub interval: Option<Duration>,
    /// Longest wait for one answer, connecting included.
    pub timeout: Duration,
    pub requests: Option<u64>,
    pub next_request: AtomicU64,
    pub devices: u64,
    pub sequential: bool,
    pub spike_share: f64,
    /// Events per request.
    pub batch: usize,
    pub gzip: bool,
    pub stop: AtomicBool,
}

/// The body of request `n`: one event of a device (in turn or at random), or a body of
/// the pre-made pool.
fn next_body(plan: &Plan, pool: &[Payload], rng: &mut Rng, n: u64) -> Payload {
    if pool.is_empty() {
        let device = if plan.sequential {
            n % plan.devices
        } else {
            rng.below(plan.devices)
        };
        let (rps, cpu) = Baseline::of_device(device).reading(rng, plan.spike_share);
        Payload::json(event_body(device, rps, cpu))
    } else {
        pool[n as usize % pool.len()].clone()
    }
}

impl Worker {
    /// Counts one request's outcome (an answer's status, or why none came) and its
    /// latency; false when no answer came.
    fn record(
        &mut self,
        counters: &Counters,
        outcome: Result<u16, RequestError>,
        micros: u64,
    ) -> bool {
        match outcome {
            Ok(status) if (200..300).contains(&status) => {
                self.ok += 1;
                counters.ok.fetch_add(1, Ordering::Relaxed);
                let _ = self.hist.record(micros);
            }
            Ok(status) => {
                self.failures.record(Failure::Status(status));
                counters.failed.fetch_add(1, Ordering::Relaxed);
                let _ = self.hist.record(micros);
            }
            Err(e) => {
                self.failures.record(e.failure());
                counters.failed.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        true
    }
}

/// One connection's share of the load, until the deadline, `--requests` or the stop; what
/// it measured.
pub async fn run_connection(
    id: usize,
    target: Arc<Target>,
    plan: Arc<Plan>,
    counters: Arc<Counters>,
) -> Worker {
    let mut worker = Worker {
        // Constant bounds that hdrhistogram accepts (low ≥ 1, high ≥ 2 × low).
        hist: Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"),
        ok: 0,
        failures: Failures::default(),
    };
    let mut rng = Rng::new(0x5EED ^ (id as u64 + 1).wrapping_mul(0x9E37_79B9));
    let pool = if plan.batch > 1 || plan.gzip {
        body_pool(&mut rng, &plan)
    } else {
        Vec::new()
    };
    let mut sender = None;
    // Stagger connections across one interval so a fixed rate is smooth.
    let mut intended = plan.start
        + plan
            .interval
            .map_or(Duration::ZERO, |i| i.mul_f64(rng.unit()));
    loop {
        if plan.stop.load(Ordering::Relaxed) || Instant::now() >= plan.deadline {
            break;
        }
        let n = plan.next_request.fetch_add(1, Ordering::Relaxed);
        if plan.requests.is_some_and(|max| n >= max) {
            break;
        }
        // Latency counts from when the request should have gone out. When the connection
        // was still waiting for the server at that moment, that is the intended time (no
        // coordinated omission). When it was idle and sleeping, it is the actual wake-up:
        // tokio's timer fires up to a millisecond late, and that slack is the
        // generator's, not the server's.
        let mut measured_from = intended;
        if plan.interval.is_some() {
            if Instant::now() < intended {
                tokio::time::sleep_until(intended).await;
                measured_from = Instant::now();
            }
        } else {
            intended = Instant::now();
            measured_from = intended;
        }
        let body = next_body(&plan, &pool, &mut rng, n);
        counters.sent.fetch_add(1, Ordering::Relaxed);
        let exchange = async {
            let s = match sender.as_mut() {
                Some(s) => s,
                None => sender.insert(connect(&target).await?),
            };
            send(s, &target, Method::POST, &target.path, Some(body)).await
        };
        let result = tokio::time::timeout(plan.timeout, exchange)
            .await
            .unwrap_or(Err(RequestError::Timeout));
        let micros = measured_from.elapsed().as_micros().max(1) as u64;
        if !worker.record(&counters, result.map(|(status, _)| status), micros) {
            // The connection is in an unknown state (or was never made): start anew.
            sender = None;
            // Do not spin on a refused connection.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if let Some(interval) = plan.interval {
            intended += interval;
        }
    }
    worker
}

pub async fn resolve(url: &str) -> anyhow::Result<Target> {
    let uri: Uri = url.parse().with_context(|| format!("bad URL {url}"))?;
    let authority = uri.authority().context("URL needs host:port")?.clone();
    let port = authority.port_u16().unwrap_or(80);
    let addr = tokio::net::lookup_host((authority.host(), port))
        .await
        .with_context(|| format!("cannot resolve {}", authority.host()))?
        .next()
        .with_context(|| format!("{} does not resolve", authority.host()))?;
    let path = match uri.path() {
        "" | "/" => "/metric".to_string(),
        p => p.to_string(),
    };
    Ok(Target {
        addr,
        host: authority.to_string(),
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_spread_round_robin_over_the_targets() {
        // One target: every connection (and probe) uses it, as before.
        assert!((0..64).all(|i| target_of(i, 1) == 0));
        // Connection i → target i mod n: 64 connections over 2 targets, 32 each, alternating;
        // over 3 targets, 22/21/21.
        let spread = |connections: usize, n: usize| {
            let mut per_target = vec![0; n];
            for i in 0..connections {
                per_target[target_of(i, n)] += 1;
            }
            per_target
        };
        assert_eq!(
            (0..4).map(|i| target_of(i, 2)).collect::<Vec<_>>(),
            [0, 1, 0, 1]
        );
        assert_eq!(spread(64, 2), [32, 32]);
        assert_eq!(spread(64, 3), [22, 21, 21]);
        // A visibility probe reads /analyze from the next target: another node when there
        // are several.
        assert!((0..10).all(|k| target_of(k + 1, 2) != target_of(k, 2)));
    }
}
