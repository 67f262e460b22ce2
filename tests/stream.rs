//! The `anomalies` stream and `GET /anomalies/stream` over real sockets: entries in a real
//! redis-server, the SSE feed across replicas, filters, resume, heartbeat, the client
//! cap, a client that stops reading, an outage, and cpu as a second signal.

mod common;

use actors::analytics::{AnomalyRule, Window};
use common::sse::{Frame, Sse};
use common::{eventually, get, post, request_with, rss_kb, InProcess, Redis, Service};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const SOON: Duration = Duration::from_secs(10);

fn event(device: &str, cpu: f64, rps: f64) -> String {
    json!({"device_id": device, "cpu": cpu, "rps": rps}).to_string()
}

/// Ten steady readings, then one rps spike: exactly one rps anomaly (the tenth value is
/// never anomalous: with a constant window z is 0).
async fn spike(addr: SocketAddr, device: &str) {
    let mut body = String::new();
    for _ in 0..10 {
        body.push_str(&event(device, 0.2, 100.0));
        body.push('\n');
    }
    body.push_str(&event(device, 0.2, 1000.0));
    let r = post(addr, "/metric/batch", &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

fn xrange(redis: &Redis) -> Vec<Vec<String>> {
    let out = redis
        .cli(&["--no-raw", "XRANGE", "anomalies", "-", "+"])
        .unwrap_or_default();
    // redis-cli prints nested arrays; collect each entry's quoted strings.
    let mut entries: Vec<Vec<String>> = Vec::new();
    for line in out.lines() {
        let trimmed = line.trim_start();
        let starts_entry = trimmed.contains(") 1) \"") && !line.starts_with("   ");
        let Some(start) = line.find('"') else {
            continue;
        };
        let value = line[start + 1..line.len() - 1].replace("\\\"", "\"");
        if starts_entry || entries.is_empty() {
            entries.push(vec![value]);
        } else if let Some(last) = entries.last_mut() {
            last.push(value);
        }
    }
    entries
}

/// A stream client with a tiny receive buffer that never reads.
async fn stalled_client(addr: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut stalled = socket.connect(addr).await.expect("connect");
    stalled
        .write_all(b"GET /anomalies/stream HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .expect("write");
    stalled
}

fn xlen(redis: &Redis) -> u64 {
    redis
        .cli(&["XLEN", "anomalies"])
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Settings as `InProcess::start` takes them.
fn env<'a>(pairs: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    pairs.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spike_is_one_stream_entry_and_reaches_another_replicas_feed() {
    let redis = Redis::start();
    // Standalone replicas on one Redis: each with an ingest log of its own.
    let replica = |log: &'static str| [("REDIS_URL", redis.url()), ("INGEST_LOG_KEY", log.into())];
    let a = InProcess::start(&env(&replica("log-a"))).await;
    let b = InProcess::start(&env(&replica("log-b"))).await;
    let mut feed = Sse::open(b.addr, "", &[]).await;
    spike(a.addr, "pump-1").await;
    let (id, data) = feed.event().await;
    assert_eq!(data["id"], id.as_str());
    assert_eq!(data["device_id"], "pump-1");
    assert_eq!(data["signal"], "rps");
    assert_eq!(data["analysis"]["is_anomaly"], true);
    assert_eq!(data["analysis"]["last_rps"], 1000.0);
    assert_eq!(data["analysis"]["samples"], 11);
    // Exactly one entry, with the fields consumers read.
    let entries = xrange(&redis);
    assert_eq!(entries.len(), 1, "{entries:?}");
    let fields = &entries[0];
    assert_eq!(fields[0], id);
    assert_eq!(&fields[1..5], ["device_id", "pump-1", "signal", "rps"]);
    assert_eq!(fields[5], "analysis");
    let analysis: Value = serde_json::from_str(&fields[6]).expect("analysis JSON");
    assert_eq!(analysis, data["analysis"]);
    assert_eq!(a.metric("anomaly_stream_entries_total").await, Some(1.0));
    assert_eq!(
        a.metric(r#"anomalies_detected_total{device_id="pump-1",signal="rps"}"#)
            .await,
        Some(1.0)
    );
    // A client of a replica started later, without Last-Event-ID, starts at the end of
    // the stream in Redis: pump-1's entry is not replayed to it.
    let c = InProcess::start(&env(&replica("log-c"))).await;
    let mut late = Sse::open(c.addr, "", &[]).await;
    spike(a.addr, "pump-2").await;
    let (_, first_seen) = late.event().await;
    assert_eq!(first_seen["device_id"], "pump-2", "only what came after it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_anomalous_event_gets_its_entry_even_within_one_flush() {
    let redis = Redis::start();
    // A long flush interval: each device's results coalesce into one key write, yet every
    // anomaly must be appended.
    let svc = InProcess::start(&[
        ("REDIS_URL", &redis.url()),
        ("FLUSH_INTERVAL", "2s"),
        ("ANOMALY_THRESHOLD", "1.0"),
    ])
    .await;
    let mut expected = 0;
    let mut body = String::new();
    for d in 0..100u32 {
        let mut window = Window::new(50);
        for i in 0..30u32 {
            let rps = 100.0 + f64::from((d * 31 + i * 17) % 23);
            window.push(rps, 0.5);
            if (AnomalyRule { threshold: 1.0 })
                .evaluate(&window)
                .is_anomaly
            {
                expected += 1;
            }
            body.push_str(&event(&format!("d-{d}"), 0.5, rps));
            body.push('\n');
        }
    }
    assert!(
        expected >= 1000,
        "the load must make many anomalies: {expected}"
    );
    let r = post(svc.addr, "/metric/batch", &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(SOON, "every anomaly in the stream", || async {
        (xlen(&redis) == expected).then_some(())
    })
    .await;
    // Counted once the flush's answer is back, a moment after Redis applied it.
    eventually(SOON, "every entry counted", || async {
        (svc.metric("anomaly_stream_entries_total").await == Some(expected as f64)).then_some(())
    })
    .await;
    assert!(
        svc.metric("store_keys_written_total").await.unwrap_or(0.0) < 1000.0,
        "the analysis keys did coalesce"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_resume_and_heartbeat() {
    let svc = InProcess::start(&[("STREAM_HEARTBEAT_INTERVAL", "200ms")]).await;
    let mut by_prefix = Sse::open(svc.addr, "?prefix=site-a/", &[]).await;
    let mut by_device = Sse::open(svc.addr, "?device_id=site-b/2", &[]).await;
    let mut all = Sse::open(svc.addr, "", &[]).await;
    for device in ["site-b/1", "site-a/1", "site-b/2", "site-a/2"] {
        spike(svc.addr, device).await;
        // One at a time: the order across devices is then known.
        let (_, data) = all.event().await;
        assert_eq!(data["device_id"], device);
    }
    let (_, first) = by_prefix.event().await;
    let (_, second) = by_prefix.event().await;
    assert_eq!(
        (first["device_id"].clone(), second["device_id"].clone()),
        (json!("site-a/1"), json!("site-a/2"))
    );
    let (b2_id, b2) = by_device.event().await;
    assert_eq!(b2["device_id"], "site-b/2");
    // Idle now: a heartbeat comment comes within the interval.
    loop {
        match by_device.next().await {
            Frame::Comment(c) if c == "heartbeat" => break,
            Frame::Comment(_) => continue,
            Frame::Event { data, .. } => panic!("unexpected event {data}"),
        }
    }
    // Resume after site-b/2's entry: exactly site-a/2 follows, then the live feed.
    let mut resumed = Sse::open(svc.addr, "", &[&format!("Last-Event-ID: {b2_id}")]).await;
    let (_, replayed) = resumed.event().await;
    assert_eq!(replayed["device_id"], "site-a/2");
    spike(svc.addr, "site-c/1").await;
    let (_, live) = resumed.event().await;
    assert_eq!(live["device_id"], "site-c/1", "no duplicate, no gap");
    // A client without Last-Event-ID starts at the stream's end: none of the five before.
    let mut late = Sse::open(svc.addr, "", &[]).await;
    spike(svc.addr, "site-d/1").await;
    let (_, first_seen) = late.event().await;
    assert_eq!(
        first_seen["device_id"], "site-d/1",
        "only what came after it"
    );
    // Bad ids and devices are refused like everywhere else.
    let r = get(svc.addr, "/anomalies/stream?last_event_id=yesterday").await;
    assert_eq!(r.status, 400);
    let r = get(svc.addr, "/anomalies/stream?device_id=").await;
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (400, json!("device_id"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_outlives_the_keep_alive_timeout() {
    // The client sends nothing after its request: the connection must not count as idle
    // while its response streams.
    let svc = InProcess::start(&[
        ("KEEP_ALIVE_TIMEOUT", "1s"),
        ("STREAM_HEARTBEAT_INTERVAL", "300ms"),
    ])
    .await;
    let mut feed = Sse::open(svc.addr, "", &[]).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    spike(svc.addr, "late-1").await;
    let (_, data) = feed.event().await;
    assert_eq!(data["device_id"], "late-1");
    assert_eq!(
        svc.metric(r#"http_connections_closed_total{reason="idle_timeout"}"#)
            .await,
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_cap_and_a_client_that_stops_reading() {
    let svc = InProcess::start(&[("MAX_STREAM_CLIENTS", "2"), ("ANOMALY_THRESHOLD", "0")]).await;
    let _one = Sse::open(svc.addr, "", &[]).await;
    let stalled = stalled_client(svc.addr).await;
    eventually(SOON, "two clients", || async {
        (svc.metric("stream_clients").await == Some(2.0)).then_some(())
    })
    .await;
    let r = get(svc.addr, "/anomalies/stream").await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.json()["error"]
        .as_str()
        .is_some_and(|m| m.contains("MAX_STREAM_CLIENTS")));
    // Threshold 0: nearly every event is an anomaly; thousands of frames for a client
    // that reads none.
    for round in 0..4 {
        let body: String = (0..10_000)
            .map(|i| {
                event(
                    &format!("flood-{}", i % 500),
                    0.5,
                    f64::from(i * (round + 1) % 977),
                ) + "\n"
            })
            .collect();
        let r = post(svc.addr, "/metric/batch", &body).await;
        assert_eq!(r.status, 200);
    }
    // Neither client reads (the first one is never read from either): both are dropped,
    // and their slots freed.
    eventually(SOON, "both stalled clients dropped", || async {
        (svc.metric("stream_clients_dropped_total").await == Some(2.0)).then_some(())
    })
    .await;
    eventually(SOON, "their slots freed", || async {
        (svc.metric("stream_clients").await == Some(0.0)).then_some(())
    })
    .await;
    // The slot is usable again.
    let _two = Sse::open(svc.addr, "", &[]).await;
    drop(stalled);
}

/// A client that stops reading costs a bounded buffer and is then dropped: the service's
/// memory does not grow with the anomalies it was not sent (the real binary, for its RSS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slow_client_leaves_memory_flat() {
    // Threshold 0: nearly every event is an anomaly; the stream itself is capped small, so
    // only a client's backlog could grow.
    let svc = Service::start(&[
        ("ANOMALY_THRESHOLD", "0"),
        ("ANOMALY_STREAM_MAXLEN", "1000"),
    ]);
    // Batches of 1 000 events: each request's own buffers stay small beside what a
    // backlog would be.
    let flood = |round: u32| async move {
        let body: String = (0..1_000u32)
            .map(|i| {
                event(
                    &format!("flood-{}", i % 500),
                    0.5,
                    f64::from(i * round % 977),
                ) + "\n"
            })
            .collect();
        let r = post(svc.addr, "/metric/batch", &body).await;
        assert_eq!(r.status, 200, "{}", r.body);
    };
    let anomalies = || async {
        let text = get(svc.addr, "/metrics").await.body;
        text.lines()
            .filter(|l| l.starts_with("anomalies_detected_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let processed = || async {
        eventually(SOON, "the flood processed", || async {
            (svc.metric("pending_events").await == Some(0.0)).then_some(())
        })
        .await;
    };
    // Warm up with nobody listening: 500 device actors, the capped stream full.
    for round in 1..=30 {
        flood(round).await;
    }
    processed().await;
    let (rss_before, seen_before) = (rss_kb(svc.pid()), anomalies().await);
    // Through the whole flood.
    let stalled = stalled_client(svc.addr).await;
    eventually(SOON, "the client subscribed", || async {
        (svc.metric("stream_clients").await == Some(1.0)).then_some(())
    })
    .await;
    for round in 31..=90 {
        flood(round).await;
    }
    processed().await;
    eventually(SOON, "the stalled client dropped", || async {
        (svc.metric("stream_clients_dropped_total").await == Some(1.0)).then_some(())
    })
    .await;
    let (rss_after, seen_after) = (rss_kb(svc.pid()), anomalies().await);
    let frames = seen_after - seen_before;
    eprintln!("RSS {rss_before} KiB → {rss_after} KiB over {frames} anomalies");
    // Each frame is about 400 bytes: some 24 MB had they been kept for the client; the
    // allocator's own swings stay within a few MB.
    assert!(
        frames > 50_000.0,
        "only {frames} anomalies: the flood did not flood"
    );
    assert!(
        rss_after < rss_before + 12 * 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB over {frames} anomalies sent to a client that read none"
    );
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_during_an_outage_are_appended_when_redis_returns() {
    // Accepting events during an outage is the trade-off of INGEST_LOG=off (with the
    // log on they get 503: tests/ingest_log.rs).
    let redis = Redis::start();
    let svc = InProcess::start(&[("INGEST_LOG", "off"), ("REDIS_URL", &redis.url())]).await;
    eventually(SOON, "ready", || async {
        (get(svc.addr, "/ready").await.status == 200).then_some(())
    })
    .await;
    redis.signal("-STOP");
    for d in 0..3 {
        spike(svc.addr, &format!("out-{d}")).await;
    }
    eventually(SOON, "the outage noticed", || async {
        (get(svc.addr, "/ready").await.status == 503).then_some(())
    })
    .await;
    assert_eq!(svc.metric("anomaly_stream_entries_total").await, Some(0.0));
    redis.signal("-CONT");
    eventually(Duration::from_secs(20), "the entries appended", || async {
        (xlen(&redis) == 3).then_some(())
    })
    .await;
    // A flush that timed out may still have reached the frozen Redis and run when it
    // thawed; its retry must not append the same entries again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut devices: Vec<String> = xrange(&redis).iter().map(|e| e[2].clone()).collect();
    devices.sort();
    assert_eq!(devices, ["out-0", "out-1", "out-2"], "none lost or doubled");
    assert_eq!(svc.metric("anomaly_stream_dropped_total").await, Some(0.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_is_a_second_signal() {
    let steady_then_cpu_spike = |device: &str| {
        let mut body = String::new();
        for i in 0..10 {
            body.push_str(&event(device, 0.20 + f64::from(i % 2) * 0.01, 100.0));
            body.push('\n');
        }
        body.push_str(&event(device, 0.99, 100.0));
        body
    };
    // Default signals (rps): the cpu anomaly shows in /analyze, but is not streamed.
    let rps_only = InProcess::start(&[]).await;
    let r = post(
        rps_only.addr,
        "/metric/batch",
        &steady_then_cpu_spike("c-1"),
    )
    .await;
    assert_eq!(r.status, 200);
    let a = eventually(SOON, "analysis", || async {
        let r = get(rps_only.addr, "/analyze?device_id=c-1").await;
        (r.status == 200 && r.json()["samples"] == 11).then(|| r.json())
    })
    .await;
    assert_eq!(
        (a["is_anomaly"].clone(), a["is_cpu_anomaly"].clone()),
        (json!(false), json!(true))
    );
    let mut window = Window::new(50);
    for i in 0..10 {
        window.push(100.0, 0.20 + f64::from(i % 2) * 0.01);
    }
    window.push(100.0, 0.99);
    let e = AnomalyRule { threshold: 2.0 }.evaluate(&window);
    assert_eq!(a["cpu_z_score"], e.cpu_z_score);
    assert_eq!(a["stddev_cpu"], e.stddev_cpu);
    assert_eq!(
        rps_only.metric("anomaly_stream_entries_total").await,
        Some(0.0)
    );

    // ANOMALY_SIGNALS=rps,cpu: streamed and counted with its signal.
    let both = InProcess::start(&[("ANOMALY_SIGNALS", "rps,cpu")]).await;
    let mut feed = Sse::open(both.addr, "", &[]).await;
    let r = request_with(
        both.addr,
        "POST",
        "/metric/batch",
        &[],
        steady_then_cpu_spike("c-2").as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200);
    let (_, data) = feed.event().await;
    assert_eq!(
        (data["device_id"].clone(), data["signal"].clone()),
        (json!("c-2"), json!("cpu"))
    );
    assert_eq!(
        both.metric(r#"anomalies_detected_total{device_id="c-2",signal="cpu"}"#)
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_maxlen_of_zero_there_is_no_stream() {
    let svc = InProcess::start(&[("ANOMALY_STREAM_MAXLEN", "0")]).await;
    let r = get(svc.addr, "/anomalies/stream").await;
    assert_eq!(r.status, 404);
    assert_eq!(
        r.json()["error"],
        "the anomalies stream is off (ANOMALY_STREAM_MAXLEN=0)"
    );
}
