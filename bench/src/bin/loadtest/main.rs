//! Load generator for `POST /metric`: the original `loadtest URL threads connections
//! duration`, with real keep-alive connections, a fixed-rate mode free of coordinated
//! omission, realistic events, and HDR-histogram latencies. A run whose success rate is
//! below `--min-success` (95 % by default) exits 1 after printing its failure breakdown.
//! The URL may be a comma-separated list (the replicas of a cluster): connection i then
//! talks to target i mod n. `--batch N` sends NDJSON batches of N events to
//! `/metric/batch`, `--gzip` compresses them.
//!
//! # Layout
//! - `args`: the command line, every argument checked by the parser.
//! - `worker`: one connection's share of the load and what it measured, and the HTTP
//!   pieces the probes share.
//! - `probes`: the visibility and SSE latency probes beside the load.
//! - here: the run (targets, plan, connections, probes, progress) and its report.
#![forbid(unsafe_code)]

mod args;
mod probes;
mod worker;

use args::{split_urls, Args};
use bench::failure::Failures;
use bench::report::{self, FailureBreakdown, Latency, Report};
use clap::Parser;
use hdrhistogram::Histogram;
use probes::{probe_sse, probe_visibility};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use worker::{resolve, run_connection, target_of, Counters, Plan, Target, Worker};

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
    let targets = targets(&args).await?;
    let start = Instant::now();
    let plan = Arc::new(plan(&args, start));
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
    let progress = tokio::spawn(progress(counters, start));

    let measured = merge(workers).await?;
    let elapsed = start.elapsed().as_secs_f64();
    plan.stop.store(true, Ordering::Relaxed);
    let visibility = latency(visibility).await?;
    let sse = latency(sse).await?;
    progress.abort();

    let report = report(&args, elapsed, &measured, visibility, sse);
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    report.check(args.min_success)?;
    Ok(())
}

/// The targets of the URL list, resolved; with `--batch`, `/metric` becomes
/// `/metric/batch`.
async fn targets(args: &Args) -> anyhow::Result<Vec<Arc<Target>>> {
    let mut targets = Vec::new();
    for url in split_urls(&args.url).map_err(anyhow::Error::msg)? {
        let mut target = resolve(url).await?;
        if args.batch > 1 && target.path.ends_with("/metric") {
            target.path.push_str("/batch");
        }
        targets.push(Arc::new(target));
    }
    Ok(targets)
}

/// What every connection follows, from `start`.
fn plan(args: &Args, start: Instant) -> Plan {
    Plan {
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
    }
}

/// One progress line a second on stderr, until aborted.
async fn progress(counters: Arc<Counters>, start: Instant) {
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
}

/// What every connection measured, together.
async fn merge(workers: Vec<JoinHandle<Worker>>) -> anyhow::Result<Worker> {
    let mut all = Worker {
        hist: Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?,
        ok: 0,
        failures: Failures::default(),
    };
    for w in workers {
        let w = w.await?;
        all.hist.add(&w.hist)?;
        all.ok += w.ok;
        all.failures.merge(&w.failures);
    }
    Ok(all)
}

/// The latencies a probe measured, if it ran.
async fn latency(
    probe: Option<JoinHandle<anyhow::Result<Histogram<u64>>>>,
) -> anyhow::Result<Option<Latency>> {
    Ok(match probe {
        Some(handle) => Latency::of(&handle.await??),
        None => None,
    })
}

/// The run's report.
fn report(
    args: &Args,
    elapsed: f64,
    measured: &Worker,
    visibility: Option<Latency>,
    sse: Option<Latency>,
) -> Report {
    let ok = measured.ok;
    let failed = measured.failures.total();
    let total = ok + failed;
    Report {
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
        latency_ms: Latency::of(&measured.hist),
        failures: FailureBreakdown::from(&measured.failures),
        visibility_ms: visibility,
        sse_ms: sse,
    }
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
}
