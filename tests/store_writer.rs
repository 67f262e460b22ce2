//! The store writer as an operator sees it, against a real `redis-server` started per
//! test: the store metrics (keys written, flushes, results waiting) and the log lines
//! about the store's reachability.

mod common;

use common::{eventually, post_event, InProcess, Redis, Service};
use serde_json::Value;
use std::time::{Duration, Instant};

const SOON: Duration = Duration::from_secs(5);

async fn stored_samples(redis: &Redis, device: &str, samples: u64) {
    eventually(SOON, "stored analysis", || async {
        let text = redis.cli(&["GET", &format!("analysis:{device}")])?;
        let v: Value = serde_json::from_str(&text).ok()?;
        (v["samples"] == samples).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_metrics_count_keys_written_and_results_waiting_while_redis_hangs() {
    // Accepting events during an outage is the trade-off of INGEST_LOG=off (with the
    // log on they get 503: tests/ingest_log.rs).
    let redis = Redis::start();
    let svc = InProcess::start(&[("INGEST_LOG", "off"), ("REDIS_URL", &redis.url())]).await;
    for device in ["m-1", "m-2"] {
        assert_eq!(post_event(svc.addr, device, 0.5, 1.0).await.status, 200);
    }
    for device in ["m-1", "m-2"] {
        stored_samples(&redis, device, 1).await;
    }
    // A device's first result carries its window: two keys for each device.
    eventually(SOON, "4 keys written", || async {
        svc.metric("store_keys_written_total")
            .await
            .filter(|v| *v == 4.0)
    })
    .await;
    assert!(svc.metric("store_flushes_total").await >= Some(1.0));
    eventually(SOON, "nothing waiting", || async {
        svc.metric("store_pending_results")
            .await
            .filter(|v| *v == 0.0)
    })
    .await;

    // A hanging Redis: flushes are in flight until their deadline, then retried. The
    // gauge counts every result not yet stored, waiting or in flight: 3, never less.
    redis.signal("-STOP");
    for device in ["m-3", "m-4", "m-5"] {
        assert_eq!(post_event(svc.addr, device, 0.5, 1.0).await.status, 200);
    }
    // Sampled over a while: most of it with a flush in flight.
    let deadline = Instant::now() + SOON;
    let mut seen = Vec::new();
    while seen.iter().filter(|&&v| v == 3.0).count() < 20 {
        assert!(
            Instant::now() < deadline,
            "never 3 results waiting: {seen:?}"
        );
        if let Some(v) = svc.metric("store_pending_results").await {
            seen.push(v);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        seen.iter().all(|v| (0.0..=3.0).contains(v)),
        "store_pending_results went outside 0..=3: {seen:?}"
    );

    redis.signal("-CONT");
    for device in ["m-3", "m-4", "m-5"] {
        stored_samples(&redis, device, 1).await;
    }
    eventually(SOON, "nothing waiting after the recovery", || async {
        svc.metric("store_pending_results")
            .await
            .filter(|v| *v == 0.0)
    })
    .await;
    assert_eq!(
        svc.metric("store_keys_written_total").await,
        Some(10.0),
        "each device's first result, analysis and window, written once"
    );
}

#[tokio::test]
async fn reachability_is_logged_once_per_change() {
    let mut redis = Redis::start();
    let port = redis.port;
    let mut svc = Service::start(&[("REDIS_URL", &redis.url())]);
    for rps in [1.0, 2.0, 3.0] {
        assert_eq!(post_event(svc.addr, "r-1", 0.5, rps).await.status, 200);
        stored_samples(&redis, "r-1", rps as u64).await;
    }
    redis.kill();
    let message = |v: &Value| v["message"].as_str().map(str::to_string);
    svc.wait_log(SOON, |v| {
        message(v).as_deref() == Some("store unreachable; results are kept and retried")
    })
    .expect("the outage is logged");
    let redis = Redis::start_on(port);
    // The ingest log takes events again once its probe sees Redis (a client retries).
    eventually(SOON, "an event taken after the outage", || async {
        (post_event(svc.addr, "r-1", 0.5, 4.0).await.status == 200).then_some(())
    })
    .await;
    stored_samples(&redis, "r-1", 4).await;
    svc.wait_log(SOON, |v| {
        message(v).as_deref() == Some("store reachable again")
    })
    .expect("the recovery is logged");

    let (code, logs) = svc.terminate();
    assert_eq!(code, 0);
    let store_lines: Vec<String> = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| message(&v))
        .filter(|m| m.starts_with("store "))
        .collect();
    assert_eq!(
        store_lines,
        [
            "store reachable",
            "store unreachable; results are kept and retried",
            "store reachable again"
        ],
        "one line per change of reachability, the first one as such"
    );
}
