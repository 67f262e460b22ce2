//! Load generator for `POST /metric`: the original `loadtest URL threads connections
//! duration`, with real keep-alive connections, a fixed-rate mode free of coordinated
//! omission, realistic events, and HDR-histogram latencies. A run whose success rate is
//! below `--min-success` (95 % by default) exits 1 after printing its failure breakdown.
//! The URL may be a comma-separated list (the replicas of a cluster): connection i then
//! talks to target i mod n. `--batch N` sends NDJSON batches of N events to
//! `/metric/batch`, `--gzip` compresses them.
#![forbid(unsafe_code)]

use anyhow::{bail, Context};
use bench::failure::{Failure, Failures, RequestError};
use bench::report::{self, FailureBreakdown, Latency, Report, DEFAULT_MIN_SUCCESS_PERCENT};
use bench::{event_body, Baseline, Rng};
use bytes::Bytes;
use clap::Parser;
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

/// Posts realistic device events and reports throughput and latency.
#[derive(Debug, Parser)]
#[command(name = "loadtest")]
struct Args {
    /// Target, e.g. http://127.0.0.1:8080/metric (a bare host gets /metric); several as a
    /// comma-separated list, e.g. http://127.0.0.1:8080/metric,http://127.0.0.1:8090/metric:
    /// connection i talks to target i mod n. Visibility probe k posts to target k mod n and
    /// reads /analyze from target (k + 1) mod n (the same one when there is only one).
    #[arg(value_parser = url_list)]
    url: String,
    /// Worker threads of the generator.
    #[arg(default_value_t = 1)]
    threads: usize,
    /// Keep-alive connections, each with one request in flight.
    #[arg(default_value_t = 64, value_parser = at_least_one)]
    connections: usize,
    /// How long to run (humantime: 10s, 1m).
    #[arg(default_value = "10s", value_parser = humantime_duration)]
    duration: Duration,
    /// Fixed total request rate (open loop). Latency counts from each request's intended
    /// send time, so a stalled server is not hidden by the generator waiting for it.
    #[arg(long)]
    rate: Option<f64>,
    /// Distinct device ids.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    devices: u64,
    /// Share of events that are spikes (5–10× the device's baseline rps).
    #[arg(long, default_value_t = 0.01)]
    spike_share: f64,
    /// Stop after this many requests in total (each device in turn, in order, when
    /// --requests equals --devices: one event per device).
    #[arg(long)]
    requests: Option<u64>,
    /// Visit devices in order instead of at random.
    #[arg(long)]
    sequential: bool,
    /// Also measure event-to-visible latency with this many probes: post a marked event,
    /// poll /analyze until it shows.
    #[arg(long, default_value_t = 0)]
    visibility_probes: u64,
    /// Also measure anomaly-to-SSE latency with this many probes: a listener on
    /// /anomalies/stream of the last target, a spike posted to the first, timed from its
    /// 200 until the listener sees it.
    #[arg(long, default_value_t = 0)]
    sse_probes: u64,
    /// Exit 1 when the share of 2xx answers (percent) is below this; 0 accepts any.
    #[arg(long, default_value_t = DEFAULT_MIN_SUCCESS_PERCENT, value_parser = percent)]
    min_success: f64,
    /// Longest wait for one answer (connecting included); then it counts as "timed out".
    /// Bounds the run even when the server hangs.
    #[arg(long, default_value = "10s", value_parser = humantime_duration)]
    timeout: Duration,
    /// Events per request: above 1, NDJSON bodies of this many events go to
    /// /metric/batch (a target path of /metric becomes /metric/batch).
    #[arg(long, default_value_t = 1, value_parser = at_least_one)]
    batch: usize,
    /// Compress bodies with gzip (Content-Encoding: gzip). Bodies come from a pool made
    /// before the run, so that compressing does not take the generator's CPU from the
    /// service it measures.
    #[arg(long)]
    gzip: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Distinct pre-made bodies per connection in batch or gzip mode.
const BODY_POOL: usize = 16;

fn humantime_duration(s: &str) -> Result<Duration, String> {
    // Accept the original's plain seconds ("30") as well as "30s".
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(s).map_err(|e| e.to_string())
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        Ok(_) => Err("must be at least 1".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// The targets of a comma-separated URL list, in order; empty entries are refused.
fn split_urls(s: &str) -> Result<Vec<&str>, String> {
    s.split(',')
        .map(str::trim)
        .map(|u| {
            if u.is_empty() {
                Err("empty URL in the list".to_string())
            } else {
                Ok(u)
            }
        })
        .collect()
}

/// A URL list whose every entry is a plain-HTTP target with a host: checked by the parser
/// so that a mistyped URL is an invalid argument (exit 2), not a failed run.
fn url_list(s: &str) -> Result<String, String> {
    for url in split_urls(s)? {
        check_url(url)?;
    }
    Ok(s.to_string())
}

/// `url` is `http://host[:port][/path]` or `host[:port][/path]`; the generator speaks
/// plain HTTP/1.1 only.
fn check_url(url: &str) -> Result<(), String> {
    let uri: Uri = url.parse().map_err(|e| format!("bad URL {url}: {e}"))?;
    if let Some(scheme) = uri.scheme_str() {
        if scheme != "http" {
            return Err(format!(
                "bad URL {url}: only http:// is supported, not {scheme}://"
            ));
        }
    }
    if uri.authority().is_none() {
        return Err(format!(
            "bad URL {url}: it needs a host, e.g. http://127.0.0.1:8080/metric"
        ));
    }
    Ok(())
}

/// Which of `targets` connection (or probe) `i` uses: round-robin.
fn target_of(i: usize, targets: usize) -> usize {
    i % targets
}

fn percent(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        Ok(_) => Err("must be between 0 and 100".into()),
        Err(e) => Err(e.to_string()),
    }
}

struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
}

/// What one connection measured; merged into the report at the end.
struct Worker {
    hist: Histogram<u64>,
    ok: u64,
    failures: Failures,
}

async fn connect(target: &Target) -> Result<SendRequest<Full<Bytes>>, RequestError> {
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
struct Payload {
    bytes: Bytes,
    ndjson: bool,
    gzip: bool,
}

impl Payload {
    fn json(body: String) -> Self {
        Self {
            bytes: Bytes::from(body),
            ndjson: false,
            gzip: false,
        }
    }
}

/// Sends one request; Ok(status) when an answer came back.
async fn send(
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

struct Plan {
    deadline: Instant,
    start: Instant,
    /// Per connection, the gap between intended sends (open loop).
    interval: Option<Duration>,
    /// Longest wait for one answer, connecting included.
    timeout: Duration,
    requests: Option<u64>,
    next_request: AtomicU64,
    devices: u64,
    sequential: bool,
    spike_share: f64,
    /// Events per request.
    batch: usize,
    gzip: bool,
    stop: AtomicBool,
}

async fn run_connection(
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
        let body = if pool.is_empty() {
            let device = if plan.sequential {
                n % plan.devices
            } else {
                rng.below(plan.devices)
            };
            let (rps, cpu) = Baseline::of_device(device).reading(&mut rng, plan.spike_share);
            Payload::json(event_body(device, rps, cpu))
        } else {
            pool[n as usize % pool.len()].clone()
        };
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
        match result {
            Ok((status, _)) if (200..300).contains(&status) => {
                worker.ok += 1;
                counters.ok.fetch_add(1, Ordering::Relaxed);
                let _ = worker.hist.record(micros);
            }
            Ok((status, _)) => {
                worker.failures.record(Failure::Status(status));
                counters.failed.fetch_add(1, Ordering::Relaxed);
                let _ = worker.hist.record(micros);
            }
            Err(e) => {
                worker.failures.record(e.failure());
                counters.failed.fetch_add(1, Ordering::Relaxed);
                // The connection is in an unknown state (or was never made): start anew.
                sender = None;
                // Do not spin on a refused connection.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if let Some(interval) = plan.interval {
            intended += interval;
        }
    }
    worker
}

/// Event-to-visible latency: from the 200 of a marked event until /analyze shows it.
/// Probe k posts to target k mod n and reads /analyze from target (k + 1) mod n, so with
/// several replicas the event is read from another node than the one that took it.
async fn probe_visibility(
    targets: Vec<Arc<Target>>,
    probes: u64,
    plan: Arc<Plan>,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut senders = Vec::with_capacity(targets.len());
    for target in &targets {
        senders.push(connect(target).await?);
    }
    let gap = plan.deadline.saturating_duration_since(Instant::now()) / (probes as u32 + 1);
    for k in 0..probes {
        if plan.stop.load(Ordering::Relaxed) {
            break;
        }
        let post = target_of(k as usize, targets.len());
        let read = target_of(k as usize + 1, targets.len());
        let (post_target, read_target) = (&*targets[post], &*targets[read]);
        let marker = 1_000_000.0 + k as f64;
        let device = format!("visibility-{}", k % 16);
        let body = format!(r#"{{"device_id":"{device}","cpu":0.5,"rps":{marker}}}"#);
        let (status, _) = send(
            &mut senders[post],
            post_target,
            Method::POST,
            &post_target.path,
            Some(Payload::json(body)),
        )
        .await?;
        if status != 200 {
            continue;
        }
        let accepted = Instant::now();
        let analyze_base = read_target
            .path
            .trim_end_matches("/batch")
            .trim_end_matches("/metric");
        let path = format!("{analyze_base}/analyze?device_id={device}");
        loop {
            let (status, bytes) =
                send(&mut senders[read], read_target, Method::GET, &path, None).await?;
            if status == 200 {
                let v: serde_json::Value = serde_json::from_slice(&bytes)?;
                if v["last_rps"].as_f64() == Some(marker) {
                    break;
                }
            }
            if accepted.elapsed() > Duration::from_secs(10) {
                bail!("event never became visible within 10s");
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let _ = hist.record(accepted.elapsed().as_micros().max(1) as u64);
        tokio::time::sleep(gap.min(Duration::from_millis(50))).await;
    }
    Ok(hist)
}

/// Anomaly-to-SSE latency: from the 200 of a spike (after steady readings of its own
/// probe device) until the frame with that device arrives on `/anomalies/stream`.
async fn probe_sse(
    targets: Vec<Arc<Target>>,
    probes: u64,
    plan: Arc<Plan>,
) -> anyhow::Result<Histogram<u64>> {
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (post_target, read_target) = (&*targets[0], &*targets[targets.len() - 1]);
    let base = read_target
        .path
        .trim_end_matches("/batch")
        .trim_end_matches("/metric");
    let mut listener = connect(read_target).await?;
    listener.ready().await?;
    let req = Request::builder()
        .uri(format!("{base}/anomalies/stream"))
        .header(hyper::header::HOST, &read_target.host)
        .body(Full::new(Bytes::new()))?;
    let response = listener.send_request(req).await?;
    if response.status() != 200 {
        bail!("/anomalies/stream answered {}", response.status());
    }
    let mut body = response.into_body();
    let mut poster = connect(post_target).await?;
    let post_path = post_target.path.trim_end_matches("/batch").to_string();
    let gap = plan.deadline.saturating_duration_since(Instant::now()) / (probes as u32 + 1);
    let mut seen = String::new();
    for k in 0..probes {
        if plan.stop.load(Ordering::Relaxed) {
            break;
        }
        let device = format!("sse-probe-{k}");
        for rps in [
            100.0, 101.0, 99.0, 100.0, 102.0, 98.0, 100.0, 101.0, 99.0, 100.0, 5000.0,
        ] {
            let body = format!(r#"{{"device_id":"{device}","cpu":0.5,"rps":{rps}}}"#);
            let (status, _) = send(
                &mut poster,
                post_target,
                Method::POST,
                &post_path,
                Some(Payload::json(body)),
            )
            .await?;
            if status != 200 {
                bail!("probe event answered {status}");
            }
        }
        let accepted = Instant::now();
        let marker = format!(r#""device_id":"{device}""#);
        loop {
            if let Some(at) = seen.find(&marker) {
                seen.drain(..at + marker.len());
                break;
            }
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .context("no anomaly on the stream within 10s")?
                .context("the stream ended")??;
            if let Ok(data) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&data));
            }
        }
        let _ = hist.record(accepted.elapsed().as_micros().max(1) as u64);
        tokio::time::sleep(gap.min(Duration::from_millis(50))).await;
    }
    Ok(hist)
}

async fn resolve(url: &str) -> anyhow::Result<Target> {
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

/// Exit codes as the service's: 2 for an invalid argument (clap's), 1 for a run that
/// failed or fell short of `--min-success`, with one `error: …` line and no backtrace
/// (these are expected outcomes, not bugs).
fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let outcome = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(run(args)));
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{}", error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// `error: ` and the cause chain on one line.
fn error_line(e: &anyhow::Error) -> String {
    format!("error: {e:#}").replace('\n', " ")
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut targets = Vec::new();
    for url in split_urls(&args.url).map_err(anyhow::Error::msg)? {
        let mut target = resolve(url).await?;
        if args.batch > 1 && target.path.ends_with("/metric") {
            target.path.push_str("/batch");
        }
        targets.push(Arc::new(target));
    }
    let start = Instant::now();
    let plan = Arc::new(Plan {
        deadline: start + args.duration,
        start,
        interval: args
            .rate
            .filter(|r| *r > 0.0)
            .map(|r| Duration::from_secs_f64(args.connections as f64 / r)),
        timeout: args.timeout,
        requests: args.requests,
        next_request: AtomicU64::new(0),
        devices: args.devices,
        sequential: args.sequential,
        spike_share: args.spike_share,
        batch: args.batch,
        gzip: args.gzip,
        stop: AtomicBool::new(false),
    });
    let counters = Arc::new(Counters::default());
    let workers: Vec<_> = (0..args.connections)
        .map(|id| {
            tokio::spawn(run_connection(
                id,
                targets[target_of(id, targets.len())].clone(),
                plan.clone(),
                counters.clone(),
            ))
        })
        .collect();
    let sse = (args.sse_probes > 0)
        .then(|| tokio::spawn(probe_sse(targets.clone(), args.sse_probes, plan.clone())));
    let visibility = (args.visibility_probes > 0).then(|| {
        tokio::spawn(probe_visibility(
            targets.clone(),
            args.visibility_probes,
            plan.clone(),
        ))
    });

    let progress = {
        let counters = counters.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval_at(
                Instant::now() + Duration::from_secs(1),
                Duration::from_secs(1),
            );
            loop {
                tick.tick().await;
                let ok = counters.ok.load(Ordering::Relaxed);
                eprintln!(
                    "[{:>4.0}s] sent {:>9}  ok {:>9}  failed {:>6}  {:>8} req/s",
                    start.elapsed().as_secs_f64(),
                    counters.sent.load(Ordering::Relaxed),
                    ok,
                    counters.failed.load(Ordering::Relaxed),
                    ok - last
                );
                last = ok;
            }
        })
    };

    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut ok = 0;
    let mut failures = Failures::default();
    for w in workers {
        let w = w.await?;
        hist.add(&w.hist)?;
        ok += w.ok;
        failures.merge(&w.failures);
    }
    let elapsed = start.elapsed().as_secs_f64();
    plan.stop.store(true, Ordering::Relaxed);
    let visibility = match visibility {
        Some(handle) => Latency::of(&handle.await??),
        None => None,
    };
    let sse = match sse {
        Some(handle) => Latency::of(&handle.await??),
        None => None,
    };
    progress.abort();

    let failed = failures.total();
    let total = ok + failed;
    let report = Report {
        url: args.url.clone(),
        connections: args.connections,
        threads: args.threads,
        rate: args.rate,
        devices: args.devices,
        duration_s: elapsed,
        total,
        successful: ok,
        failed,
        success_rate: report::success_rate(ok, total),
        requests_per_sec: ok as f64 / elapsed,
        batch: args.batch,
        gzip: args.gzip,
        events_per_sec: (ok * args.batch as u64) as f64 / elapsed,
        latency_ms: Latency::of(&hist),
        failures: FailureBreakdown::from(&failures),
        visibility_ms: visibility,
        sse_ms: sse,
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    report.check(args.min_success)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_run_is_one_error_line_with_its_causes() {
        let shortfall = report::Shortfall::BelowMinimum {
            success_rate: 0.0,
            min_success: 95.0,
            failed: 40,
            total: 40,
        };
        assert_eq!(
            error_line(&shortfall.into()),
            "error: success rate 0.000% is below --min-success 95% (40 of 40 requests failed)"
        );
        let refused =
            anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
                .context("resolving http://x/metric");
        assert_eq!(
            error_line(&refused),
            "error: resolving http://x/metric: connection refused"
        );
    }

    #[test]
    fn durations_accept_the_originals_plain_seconds() {
        assert_eq!(humantime_duration("30").ok(), Some(Duration::from_secs(30)));
        assert_eq!(
            humantime_duration("250ms").ok(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            humantime_duration("2m").ok(),
            Some(Duration::from_secs(120))
        );
        assert!(humantime_duration("soon").is_err());
    }

    #[test]
    fn the_originals_positional_arguments_and_the_defaults() {
        let a = Args::try_parse_from(["loadtest", "http://127.0.0.1:8080/metric", "2", "32", "30"])
            .expect("valid");
        assert_eq!((a.threads, a.connections), (2, 32));
        assert_eq!(a.duration, Duration::from_secs(30));
        // Failures beyond 5 % fail the run unless the caller says otherwise.
        assert_eq!(a.min_success, 95.0);
        assert_eq!(a.timeout, Duration::from_secs(10));
        assert!(!a.json);
    }

    #[test]
    fn a_comma_separated_url_is_a_list_of_targets_and_one_url_stays_one() {
        let one = "http://127.0.0.1:8080/metric";
        assert_eq!(split_urls(one), Ok(vec![one]));
        assert_eq!(
            split_urls("http://127.0.0.1:8080/metric, http://127.0.0.1:8090/metric"),
            Ok(vec![
                "http://127.0.0.1:8080/metric",
                "http://127.0.0.1:8090/metric"
            ])
        );
        for bad in [
            "",
            "http://a:1/metric,",
            ",http://a:1",
            "http://a:1,,http://b:2",
        ] {
            assert!(split_urls(bad).is_err(), "{bad:?}");
        }
        // The parser keeps the argument as given (it is the report's `url`) and refuses
        // an empty entry.
        let a = Args::try_parse_from(["loadtest", "http://a:1/metric,http://b:2/metric"])
            .expect("valid");
        assert_eq!(a.url, "http://a:1/metric,http://b:2/metric");
        let err = Args::try_parse_from(["loadtest", "http://a:1/metric,"]).expect_err("empty");
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
    }

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

    #[test]
    fn bad_arguments_are_refused_by_the_parser() {
        let parse = |extra: &[&str]| {
            Args::try_parse_from(["loadtest", "http://127.0.0.1:1"].iter().chain(extra))
        };
        assert_eq!(
            parse(&["--min-success", "0"]).expect("valid").min_success,
            0.0
        );
        for bad in [
            &["--min-success", "101"][..],
            &["--min-success=-1"],
            &["--devices", "0"],
            &["1", "0"],
            &["--timeout", "soon"],
        ] {
            let err = parse(bad).expect_err("invalid");
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{bad:?}"
            );
        }
        let help = Args::try_parse_from(["loadtest", "--help"]).expect_err("help exits");
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
    }

    #[test]
    fn a_url_that_is_not_a_plain_http_target_is_an_invalid_argument() {
        for good in [
            "http://127.0.0.1:8080/metric",
            "127.0.0.1:8080",
            "http://localhost/metric,127.0.0.1:1",
        ] {
            assert!(Args::try_parse_from(["loadtest", good]).is_ok(), "{good}");
        }
        for (bad, why) in [
            ("ht!tp://x", "bad URL ht!tp://x: "),
            (
                "https://127.0.0.1:1/metric",
                "only http:// is supported, not https://",
            ),
            ("/metric", "it needs a host"),
            ("http://127.0.0.1:1/metric,https://b/", "not https://"),
        ] {
            let err = Args::try_parse_from(["loadtest", bad]).expect_err(bad);
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad}");
            assert!(err.to_string().contains(why), "{bad}: {err}");
        }
    }
}
