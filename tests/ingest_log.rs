//! The ingest log on a single node, against the real binary and a real redis-server: an
//! event answered 200 survives a SIGKILL (replayed after the restart, never counted
//! twice), a Redis outage refuses new events with 503 instead of accepting what it could
//! not make durable, and an entry that does not decode is skipped and counted.

mod common;

use actors::cluster::wire;
use actors::event::Event;
use common::durable::{load, resp, try_post_event, wait_ready, Unanswered};
use common::{eventually, get, post, Redis, Service};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sigkilled_node_loses_no_event_it_answered_and_counts_none_twice() {
    let redis = Redis::start();
    let url = redis.url();
    // Checkpoints far apart: after the kill, the windows depend on the replay. The
    // restart listens where the killed process did (a container restarted in its pod),
    // so it takes its ingest log back at once.
    let listen = format!("127.0.0.1:{}", common::free_port());
    let env = [
        ("REDIS_URL", url.as_str()),
        ("LISTEN_ADDR", listen.as_str()),
        ("WINDOW_SIZE", "100000"),
        ("WINDOW_CHECKPOINT_INTERVAL", "30s"),
    ];
    let svc = Service::start(&env);
    wait_ready(svc.addr).await;
    let stop = Arc::new(AtomicBool::new(false));
    let targets = Arc::new(std::sync::Mutex::new(vec![svc.addr]));
    let clients = tokio::spawn(load(targets, 8, 5, stop.clone(), Unanswered::Stop));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    drop(svc); // SIGKILL, mid-load
    stop.store(true, Ordering::Relaxed);
    let mut outcomes = clients.await.expect("clients");
    let acked = outcomes.acked_count();
    assert!(
        acked > 200,
        "the load ran before the kill: {acked} events answered"
    );

    let mut svc = Service::start(&env);
    wait_ready(svc.addr).await;
    assert!(
        svc.wait_log(Duration::from_secs(5), |v| v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("ingest log replayed")))
            .is_some(),
        "the restart replays the log"
    );
    // A few more events per device after the restart.
    for c in 0..8 {
        for d in 0..5 {
            let device = format!("dev-{}", c * 5 + d);
            let body = format!(r#"{{"device_id":"{device}","rps":0.25,"cpu":0.5}}"#);
            assert_eq!(try_post_event(svc.addr, body).await, Some(200));
            outcomes.acked.entry(device).or_default().push(0.25);
        }
    }
    // Windows checkpointed 30 s apart need the replay.
    eventually(Duration::from_secs(10), "replayed events", || async {
        (svc.metric("ingest_log_replayed_total").await? > 0.0).then_some(())
    })
    .await;
    let (code, _) = svc.terminate();
    assert_eq!(code, 0);

    // After a graceful stop the stored windows are exact: each holds every answered
    // event once, and of the events in flight at the kill at most once.
    outcomes.check_stored(redis.port).await;
    // A clean stop leaves nothing a restart would need.
    assert_eq!(redis.cli(&["XLEN", "ingest-log"]).as_deref(), Some("0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_with_the_same_log_waits_until_the_first_stops_and_replays_nothing_of_its() {
    let redis = Redis::start();
    let env = [("REDIS_URL", redis.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let first = Service::start(&env);
    wait_ready(first.addr).await;
    let body = r#"{"device_id":"w-1","rps":5.0,"cpu":0.5}"#;
    assert_eq!(post(first.addr, "/metric", body).await.status, 200);
    // A second replica on the same Redis and INGEST_LOG_KEY (a misconfiguration, or a
    // rolling update's new pod): it must not replay the first one's events as its own.
    let mut second = Service::start(&env);
    let waiting = second.wait_log(Duration::from_secs(5), |v| {
        v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("another node appends to this ingest log"))
    });
    assert!(waiting.is_some(), "the second node says why it waits");
    assert_eq!(get(second.addr, "/ready").await.status, 503);
    let r = post(second.addr, "/metric", body).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.header("retry-after").is_some());
    // Once the first stops (cleanly: its events are stored, its log trimmed, its hold
    // released), the second takes the log over.
    let (code, _) = first.terminate();
    assert_eq!(code, 0);
    wait_ready(second.addr).await;
    assert_eq!(post(second.addr, "/metric", body).await.status, 200);
    eventually(Duration::from_secs(10), "two samples", || async {
        let r = get(second.addr, "/analyze?device_id=w-1").await;
        (r.status == 200 && r.json()["samples"] == 2).then_some(())
    })
    .await;
    assert_eq!(
        second.metric("ingest_log_replayed_total").await,
        Some(0.0),
        "nothing of the first node's was replayed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_redis_is_down_events_are_refused_with_503_and_taken_again_once_it_is_back() {
    let mut redis = Redis::start();
    let port = redis.port;
    let url = redis.url();
    let svc = Service::start(&[("REDIS_URL", url.as_str())]);
    wait_ready(svc.addr).await;
    let event = r#"{"device_id":"outage","rps":5,"cpu":0.5}"#;
    assert_eq!(post(svc.addr, "/metric", event).await.status, 200);

    redis.kill();
    let refused = eventually(Duration::from_secs(10), "a 503", || async {
        let reply = post(svc.addr, "/metric", event).await;
        (reply.status != 200).then_some(reply)
    })
    .await;
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(
        refused.json()["error"]
            .as_str()
            .is_some_and(|e| e.contains("ingest log")),
        "{}",
        refused.body
    );
    let ready = get(svc.addr, "/ready").await;
    assert_eq!(ready.status, 503);
    assert_eq!(
        svc.metric("events_rejected_total{reason=\"not_durable\"}")
            .await,
        Some(1.0),
        "a refusal during the outage is counted once per event"
    );
    // Refused at once, not after a timeout per request.
    let started = std::time::Instant::now();
    assert_eq!(post(svc.addr, "/metric", event).await.status, 503);
    assert!(started.elapsed() < Duration::from_millis(400));

    let _redis = Redis::start_on(port);
    // A client retrying as Retry-After says gets its event in once Redis answers.
    eventually(
        Duration::from_secs(10),
        "a 200 after the outage",
        || async { (post(svc.addr, "/metric", event).await.status == 200).then_some(()) },
    )
    .await;
    // The new Redis started empty; the device's actor still holds its window.
    eventually(
        Duration::from_secs(5),
        "both events in the analysis",
        || async {
            let analysis = get(svc.addr, "/analyze?device_id=outage").await;
            (analysis.status == 200 && analysis.json()["samples"] == 2).then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_log_off_events_are_accepted_during_an_outage() {
    let mut redis = Redis::start();
    let url = redis.url();
    let svc = Service::start(&[("REDIS_URL", url.as_str()), ("INGEST_LOG", "off")]);
    wait_ready(svc.addr).await;
    redis.kill();
    let event = r#"{"device_id":"off","rps":5,"cpu":0.5}"#;
    for _ in 0..3 {
        assert_eq!(post(svc.addr, "/metric", event).await.status, 200);
    }
    let ready = get(svc.addr, "/ready").await.json();
    assert!(ready["checks"]["ingest_log"].is_null(), "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_that_do_not_decode_are_skipped_and_counted_and_the_rest_replayed() {
    let redis = Redis::start();
    let port = redis.port;
    let timestamp = chrono::DateTime::from_timestamp(1_700_000_000, 0).expect("time");
    let event = Event::new(42.0, 0.5, timestamp).expect("a valid event");
    let good = wire::encode(std::iter::once(("kept", &event)));
    // A foreign writer's entry, a truncated one, then one of ours.
    for fields in [
        vec![&b"foo"[..], b"bar"],
        vec![b"n", b"x", b"e1", &good[..good.len() - 3]],
        vec![b"n", b"y", b"e1", &good[..]],
    ] {
        let mut args: Vec<&[u8]> = vec![b"XADD", b"ingest-log", b"*"];
        args.extend(fields);
        let reply = resp(port, &args).await;
        assert_eq!(
            reply.first(),
            Some(&b'$'),
            "{}",
            String::from_utf8_lossy(&reply)
        );
    }
    let url = redis.url();
    let svc = Service::start(&[("REDIS_URL", url.as_str())]);
    wait_ready(svc.addr).await;
    assert_eq!(svc.metric("ingest_log_undecodable_total").await, Some(2.0));
    let analysis = eventually(Duration::from_secs(5), "the replayed event", || async {
        let reply = get(svc.addr, "/analyze?device_id=kept").await;
        (reply.status == 200).then(|| reply.json())
    })
    .await;
    assert_eq!(analysis["samples"], 1, "{analysis}");
    assert_eq!(analysis["last_rps"], 42.0, "{analysis}");
    assert_eq!(svc.metric("ingest_log_replayed_total").await, Some(1.0));
}
