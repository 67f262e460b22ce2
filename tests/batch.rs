//! `POST /metric/batch` over real sockets: both body formats, gzip, per-event errors,
//! the limits, admission at the pending bound, and the equivalence with single events.

mod common;

use common::cluster::{matches, reference, WINDOW};
use common::{eventually, get, post, request_with, InProcess, Redis, Reply, Service};
use flate2::write::GzEncoder;
use flate2::Compression;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::{json, Value};
use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const SOON: Duration = Duration::from_secs(10);

fn window_env() -> (&'static str, String) {
    ("WINDOW_SIZE", WINDOW.to_string())
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::fast());
    encoder.write_all(data).expect("write");
    encoder.finish().expect("finish")
}

/// POSTs `body` to `path` with extra header lines.
async fn post_with(addr: SocketAddr, path: &str, headers: &[&str], body: &[u8]) -> Reply {
    request_with(addr, "POST", path, headers, body).await
}

fn ndjson(events: &[Value]) -> String {
    events.iter().map(|e| format!("{e}\n")).collect()
}

fn event(device: &str, cpu: f64, rps: f64) -> Value {
    json!({"device_id": device, "cpu": cpu, "rps": rps})
}

async fn samples(addr: SocketAddr, device: &str) -> Option<u64> {
    let r = get(addr, &format!("/analyze?device_id={device}")).await;
    (r.status == 200).then(|| r.json()["samples"].as_u64().unwrap_or(0))
}

/// One case of the property below: events of up to 12 devices interleaved at random, as
/// (device, rps, cpu); rps mostly ordinary with about one spike in twenty.
fn interleavings() -> impl Strategy<Value = (Vec<(usize, f64, f64)>, bool)> {
    let rps = prop_oneof![
        19 => (0u64..100_000).prop_map(|v| v as f64 / 100.0),
        1 => (500u64..5_500).prop_map(|v| v as f64),
    ];
    let cpu = (0u64..=1000).prop_map(|v| v as f64 / 1000.0);
    (
        prop::collection::vec((0usize..12, rps, cpu), 1..220),
        any::<bool>(),
    )
}

/// The batch and the one-by-one copy of `order` go to different device ids (`case` keeps
/// every case's ids apart) of the same service; every device's analysis must equal the
/// reference and be the same both ways.
async fn batch_equals_singles(
    svc: &InProcess,
    case: u64,
    order: &[(usize, f64, f64)],
    as_ndjson: bool,
) -> Result<(), String> {
    let name = |kind: &str, d: usize| format!("{kind}-{case}-{d}");
    let lines: Vec<Value> = order
        .iter()
        .map(|&(d, rps, cpu)| event(&name("batch", d), cpu, rps))
        .collect();
    let body = if as_ndjson {
        ndjson(&lines)
    } else {
        Value::Array(lines).to_string()
    };
    let r = post(svc.addr, "/metric/batch", &body).await;
    if r.status != 200
        || r.json() != json!({"status": "accepted", "accepted": order.len(), "rejected": 0})
    {
        return Err(format!("batch answered {}: {}", r.status, r.body));
    }
    for &(d, rps, cpu) in order {
        let r = post(
            svc.addr,
            "/metric",
            &event(&name("single", d), cpu, rps).to_string(),
        )
        .await;
        if r.status != 200 {
            return Err(format!("single event answered {}: {}", r.status, r.body));
        }
    }
    for d in 0..12 {
        let events: Vec<(f64, f64)> = order
            .iter()
            .filter(|e| e.0 == d)
            .map(|&(_, rps, cpu)| (rps, cpu))
            .collect();
        if events.is_empty() {
            continue;
        }
        let expected = reference(&events).0 as u64;
        let mut analyses = Vec::new();
        for kind in ["batch", "single"] {
            let device = name(kind, d);
            eventually(SOON, "every event processed", || async {
                (samples(svc.addr, &device).await == Some(expected)).then_some(())
            })
            .await;
            matches(svc.addr, &device, &events).await?;
            let mut a = get(svc.addr, &format!("/analyze?device_id={device}"))
                .await
                .json();
            let obj = a.as_object_mut().expect("object");
            obj.remove("device_id");
            obj.remove("processed_at");
            obj.remove("event_timestamp");
            analyses.push(a);
        }
        if analyses[0] != analyses[1] {
            return Err(format!(
                "device {d}: batch {} ≠ single {}",
                analyses[0], analyses[1]
            ));
        }
    }
    Ok(())
}

/// Property: for any interleaving of devices' events, in either body format, a batch
/// gives every device the analysis the same events give sent one by one (and the
/// reference's). proptest shrinks a failure to a smallest interleaving.
#[test]
fn a_batch_gives_every_device_the_same_analysis_as_single_events() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (k, v) = window_env();
    let svc = rt.block_on(InProcess::start(&[(k, &v)]));
    let case = AtomicU64::new(0);
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 24,
        failure_persistence: None,
        // A failing case can take seconds (waits for events that never come): shrink for
        // at most a minute, then report the smallest case found by then.
        max_shrink_time: 60_000,
        ..ProptestConfig::default()
    });
    let result = runner.run(&interleavings(), |(order, as_ndjson)| {
        let case = case.fetch_add(1, Ordering::Relaxed);
        rt.block_on(batch_equals_singles(&svc, case, &order, as_ndjson))
            .map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_events_of_one_device_in_one_batch_are_processed_in_batch_order() {
    let (k, v) = window_env();
    let svc = InProcess::start(&[(k, &v)]).await;
    let events: Vec<(f64, f64)> = (0..60)
        .map(|i| ((i * i % 97) as f64, (i % 10) as f64 / 10.0))
        .chain([(1000.0, 0.9)])
        .collect();
    let lines: Vec<Value> = events
        .iter()
        .enumerate()
        .map(|(i, &(rps, cpu))| {
            // Timestamps out of order on purpose: batch order decides, not timestamps.
            let mut e = event("ordered", cpu, rps);
            e["timestamp"] = json!(format!("2024-01-15T10:{:02}:00Z", 59 - i % 60));
            e
        })
        .collect();
    let r = post(svc.addr, "/metric/batch", &ndjson(&lines)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(SOON, "61 samples", || async {
        (samples(svc.addr, "ordered").await == Some(61)).then_some(())
    })
    .await;
    matches(svc.addr, "ordered", &events)
        .await
        .expect("reference");
    let a = get(svc.addr, "/analyze?device_id=ordered").await.json();
    assert_eq!(a["last_rps"], 1000.0);
    assert_eq!(a["is_anomaly"], true);
    assert_eq!(
        svc.metric("events_accepted_total").await,
        Some(61.0),
        "events count, not requests"
    );
    assert_eq!(svc.metric("batch_size_events_count").await, Some(1.0));
    assert_eq!(svc.metric("batch_size_events_sum").await, Some(61.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_events_are_listed_by_position_and_the_others_accepted() {
    let svc = InProcess::start(&[]).await;
    let body = r#"[
        {"device_id":"mix-a","cpu":0.5,"rps":10},
        {"device_id":"mix-a","cpu":1.5,"rps":10},
        {"device_id":"","cpu":0.5,"rps":10},
        [1,2],
        {"device_id":"mix-b","cpu":0.5,"rps":-1},
        {"device_id":"mix-b","cpu":0.5,"rps":20,"timestamp":"yesterday"},
        {"device_id":"mix-b","cpu":0.5,"rps":30}
    ]"#;
    let r = post(svc.addr, "/metric/batch", body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let a = r.json();
    assert_eq!(a["status"], "partial");
    assert_eq!(a["accepted"], 2);
    assert_eq!(a["rejected"], 5);
    let errors: Vec<(u64, u64, Value)> = a["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| {
            assert!(e["error"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
            (
                e["index"].as_u64().expect("index"),
                e["status"].as_u64().expect("status"),
                e["field"].clone(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        vec![
            (1, 400, json!("cpu")),
            (2, 400, json!("device_id")),
            (3, 400, Value::Null),
            (4, 400, json!("rps")),
            (5, 400, json!("timestamp")),
        ]
    );
    assert_eq!(
        a["errors"][2]["error"], "event must be a JSON object",
        "an item is an event, not the body"
    );
    for (device, rps) in [("mix-a", 10.0), ("mix-b", 30.0)] {
        let a = eventually(SOON, "analysis", || async {
            let r = get(svc.addr, &format!("/analyze?device_id={device}")).await;
            (r.status == 200).then(|| r.json())
        })
        .await;
        assert_eq!(
            (a["samples"].clone(), a["last_rps"].clone()),
            (json!(1), json!(rps))
        );
    }
    assert_eq!(
        svc.metric(r#"events_rejected_total{reason="invalid"}"#)
            .await,
        Some(5.0)
    );
    assert_eq!(svc.metric("events_accepted_total").await, Some(2.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_are_not_batches_get_400() {
    let svc = InProcess::start(&[]).await;
    // Nothing valid at all: 400 with every event's error, exactly as in a partial answer.
    let r = post(
        svc.addr,
        "/metric/batch",
        "{\"device_id\":\"x\",\"cpu\":2,\"rps\":1}\n\nnot json\n",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    let a = r.json();
    assert_eq!(a["status"], "rejected");
    assert_eq!(a["error"], "no event in the batch is valid");
    assert_eq!(
        (a["accepted"].clone(), a["rejected"].clone()),
        (json!(0), json!(2))
    );
    assert_eq!(a["errors"][0]["index"], 0);
    assert_eq!(a["errors"][0]["field"], "cpu");
    assert_eq!(a["errors"][1]["index"], 1, "blank lines are not events");
    assert_eq!(a["errors"][1]["error"], "event must be a JSON object");
    // A single invalid event: the answer names its field, as POST /metric does.
    let r = post(
        svc.addr,
        "/metric/batch",
        "{\"device_id\":\"x\",\"cpu\":2,\"rps\":1}\n",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        (r.json()["field"].clone(), r.json()["rejected"].clone()),
        (json!("cpu"), json!(1))
    );
    for (body, error) in [
        ("", "the batch holds no events"),
        ("\n \n", "the batch holds no events"),
        ("[]", "the batch holds no events"),
    ] {
        let r = post(svc.addr, "/metric/batch", body).await;
        assert_eq!(r.status, 400, "{body:?}");
        assert_eq!(r.json(), json!({"error": error, "field": null}), "{body:?}");
    }
    let r = post(
        svc.addr,
        "/metric/batch",
        r#"[{"device_id":"a","cpu":0,"rps":1},"#,
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.json()["error"]
        .as_str()
        .is_some_and(|m| m.starts_with("body must be a JSON array of events or NDJSON")));
    // Only POST.
    let r = get(svc.addr, "/metric/batch").await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_bodies_are_accepted_on_both_endpoints_and_other_encodings_get_415() {
    let svc = InProcess::start(&[]).await;
    let lines: Vec<Value> = (0..40).map(|i| event("gz", 0.5, i as f64)).collect();
    let r = post_with(
        svc.addr,
        "/metric/batch",
        &[
            "Content-Type: application/x-ndjson",
            "Content-Encoding: gzip",
        ],
        &gzip(ndjson(&lines).as_bytes()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["accepted"], 40);
    let r = post_with(
        svc.addr,
        "/metric",
        &["Content-Encoding: gzip"],
        &gzip(event("gz", 0.5, 1000.0).to_string().as_bytes()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(SOON, "41 samples", || async {
        (samples(svc.addr, "gz").await == Some(41)).then_some(())
    })
    .await;
    for path in ["/metric", "/metric/batch"] {
        let r = post_with(
            svc.addr,
            path,
            &["Content-Encoding: br"],
            event("gz", 0.5, 1.0).to_string().as_bytes(),
        )
        .await;
        assert_eq!(r.status, 415, "{path}");
        assert_eq!(
            r.json(),
            json!({"error": "Content-Encoding must be gzip or identity", "field": null})
        );
        let r = post_with(svc.addr, path, &["Content-Encoding: gzip"], b"not gzip").await;
        assert_eq!(r.status, 400, "{path}");
        assert!(r.json()["error"]
            .as_str()
            .is_some_and(|m| m.starts_with("body is not valid gzip")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_limits_answer_413_by_count_by_bytes_and_by_decompressed_bytes() {
    let svc = InProcess::start(&[
        ("MAX_BATCH_EVENTS", "5"),
        ("MAX_BATCH_BYTES", "4096"),
        ("MAX_BODY_BYTES", "1024"),
    ])
    .await;
    let six: Vec<Value> = (0..6).map(|i| event("lim", 0.5, i as f64)).collect();
    for body in [ndjson(&six), Value::Array(six.clone()).to_string()] {
        let r = post(svc.addr, "/metric/batch", &body).await;
        assert_eq!(r.status, 413, "{}", r.body);
        assert_eq!(
            r.json()["error"],
            "the batch holds more than MAX_BATCH_EVENTS (5) events"
        );
    }
    let r = post(svc.addr, "/metric/batch", &ndjson(&six[..5])).await;
    assert_eq!(r.status, 200, "exactly the limit is fine: {}", r.body);

    let padded = format!(
        "{{\"device_id\":\"lim\",\"cpu\":0.5,\"rps\":1,\"pad\":\"{}\"}}\n",
        "x".repeat(5000)
    );
    let r = post(svc.addr, "/metric/batch", &padded).await;
    assert_eq!(r.status, 413);
    assert_eq!(
        r.json()["error"],
        "request body exceeds MAX_BATCH_BYTES (4096 bytes)"
    );
    // A small gzip body that expands past the limit.
    let bomb = gzip(padded.as_bytes());
    assert!(bomb.len() < 200);
    for (path, setting) in [
        ("/metric/batch", "MAX_BATCH_BYTES (4096 bytes)"),
        ("/metric", "MAX_BODY_BYTES (1024 bytes)"),
    ] {
        let r = post_with(svc.addr, path, &["Content-Encoding: gzip"], &bomb).await;
        assert_eq!(r.status, 413, "{path}");
        assert_eq!(
            r.json()["error"],
            format!("request body exceeds {setting}"),
            "{path}"
        );
    }
    assert_eq!(
        svc.metric(r#"events_rejected_total{reason="too_large"}"#)
            .await,
        Some(5.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_does_not_fit_under_the_pending_bound_is_refused_whole() {
    // Accepting events during an outage is the trade-off of INGEST_LOG=off (with the
    // log on they get 503: tests/ingest_log.rs).
    // A "Redis" that accepts connections and never answers keeps the device actors busy
    // restoring their windows, so accepted events stay pending.
    let blackhole = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("redis://{}/", blackhole.local_addr().expect("addr"));
    let svc = InProcess::start(&[
        ("INGEST_LOG", "off"),
        ("REDIS_URL", &url),
        ("MAX_PENDING_EVENTS", "5"),
    ])
    .await;
    let batch = |from: usize| {
        ndjson(
            &(from..from + 3)
                .map(|i| event(&format!("held-{i}"), 0.5, 1.0))
                .collect::<Vec<_>>(),
        )
    };
    let r = post(svc.addr, "/metric/batch", &batch(0)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // 3 pending + 3 > 5: none of the three is taken. The batch's invalid event is
    // refused too, and listed.
    let with_invalid = format!("{}{}", batch(3), ndjson(&[event("held-x", 2.0, 1.0)]));
    let r = post(svc.addr, "/metric/batch", &with_invalid).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    let a = r.json();
    assert_eq!(a["status"], "rejected");
    assert_eq!(
        (a["accepted"].clone(), a["rejected"].clone()),
        (json!(0), json!(4))
    );
    assert_eq!(
        (
            a["errors"][0]["index"].clone(),
            a["errors"][0]["field"].clone()
        ),
        (json!(3), json!("cpu"))
    );
    assert!(a["error"]
        .as_str()
        .is_some_and(|m| m.contains("nothing in this batch was accepted")));
    assert_eq!(
        svc.metric(r#"events_rejected_total{reason="overloaded"}"#)
            .await,
        Some(3.0)
    );
    // Once the backlog is processed (the restores time out), exactly the accepted three
    // were processed, and a retry is accepted whole.
    eventually(Duration::from_secs(20), "the backlog to drain", || async {
        (svc.metric("pending_events").await == Some(0.0)).then_some(())
    })
    .await;
    assert_eq!(svc.metric("events_processed_total").await, Some(3.0));
    let r = post(svc.addr, "/metric/batch", &batch(3)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(svc.metric("events_accepted_total").await, Some(6.0));
}

#[tokio::test]
async fn a_batch_in_flight_at_sigterm_is_stored_whole_or_refused_whole() {
    let redis = Redis::start();
    // A long flush interval: only the shutdown flush can write the results.
    let svc = Service::start(&[("REDIS_URL", &redis.url()), ("FLUSH_INTERVAL", "1h")]);
    let body = ndjson(
        &(0..50)
            .map(|i| event(&format!("late-{}", i % 5), 0.5, i as f64))
            .collect::<Vec<_>>(),
    );
    let answer = common::post_across_sigterm(&svc, "/metric/batch", &body, 100).await;
    let (code, _) = svc.terminate();
    assert_eq!(code, 0);
    let stored: Vec<Option<u64>> = (0..5)
        .map(|d| {
            redis
                .cli(&["GET", &format!("analysis:late-{d}")])
                .filter(|s| !s.is_empty())
                .map(|s| {
                    serde_json::from_str::<Value>(&s).expect("json")["samples"]
                        .as_u64()
                        .expect("samples")
                })
        })
        .collect();
    eprintln!(
        "batch in flight at SIGTERM: {}",
        answer.lines().next().unwrap_or("")
    );
    if answer.starts_with("HTTP/1.1 200") {
        assert_eq!(
            stored,
            vec![Some(10); 5],
            "accepted: all processed and stored"
        );
    } else {
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("shutting down"), "{answer}");
        assert_eq!(stored, vec![None; 5], "refused: nothing stored");
    }
}

#[test]
fn a_batch_limit_above_the_pending_bound_is_warned_about_at_start_up() {
    let mut svc = Service::start(&[("MAX_BATCH_EVENTS", "200"), ("MAX_PENDING_EVENTS", "100")]);
    let warning = svc
        .wait_log(SOON, |v| {
            v["level"] == "WARN"
                && v["message"].as_str().is_some_and(|m| {
                    m.starts_with("MAX_BATCH_EVENTS (200) is above MAX_PENDING_EVENTS (100)")
                })
        })
        .expect("a warning naming both settings");
    assert!(
        warning["message"]
            .as_str()
            .is_some_and(|m| m.contains("at most 100 events")),
        "{warning}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_whose_newlines_were_stripped_is_refused_with_a_hint_at_data_binary() {
    let svc = InProcess::start(&[]).await;
    // What `curl -d @events.ndjson` sends: the lines run together.
    let event = r#"{"device_id":"d","cpu":0.5,"rps":1}"#;
    let r = post(svc.addr, "/metric/batch", &event.repeat(3)).await;
    assert_eq!(r.status, 400, "{}", r.body);
    let error = r.json()["error"].as_str().expect("error").to_string();
    assert!(
        error.contains("one event per line") && error.contains("--data-binary"),
        "{error}"
    );
    assert_eq!(r.json()["field"], Value::Null);
}
