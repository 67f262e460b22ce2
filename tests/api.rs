//! The HTTP API over real sockets, on the embedded store: in-process (`InProcess`) where
//! a test needs no signal, exit code or log line, else the real binary (`Service`).

mod common;

use common::{eventually, get, post, post_event, raw, request, request_with, InProcess, Service};
use serde_json::Value;
use std::net::TcpListener;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SOON: Duration = Duration::from_secs(5);

async fn analysis_with(svc: &InProcess, device: &str, samples: u64) -> (Value, String) {
    eventually(SOON, "analysis", || async {
        let r = get(svc.addr, &format!("/analyze?device_id={device}")).await;
        (r.status == 200 && r.json()["samples"] == samples).then(|| (r.json(), r.body))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posted_events_are_analysed_and_readable() {
    let svc = InProcess::start(&[]).await;
    let bodies = [
        r#"{"timestamp":"2024-01-15T10:30:00Z","device_id":"sensor-1","cpu":0.5,"rps":100}"#,
        r#"{"timestamp":"2024-01-15T12:30:01.5+02:00","device_id":"sensor-1","cpu":0.7,"rps":200}"#,
        r#"{"timestamp":"2024-01-15T10:30:02-00:30","device_id":"sensor-1","cpu":0.9,"rps":300,"firmware":"1.2"}"#,
    ];
    for body in bodies {
        let r = post(svc.addr, "/metric", body).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(
            r.json(),
            serde_json::json!({"status": "accepted", "device_id": "sensor-1"})
        );
    }
    let (a, raw_body) = analysis_with(&svc, "sensor-1", 3).await;
    assert_eq!(a["device_id"], "sensor-1");
    assert_eq!(a["rolling_average_rps"], 200.0);
    assert_eq!(a["last_rps"], 300.0);
    let sd = a["stddev_rps"].as_f64().expect("stddev");
    assert!((sd - (20000.0f64 / 3.0).sqrt()).abs() < 1e-9, "{sd}");
    let z = a["z_score"].as_f64().expect("z");
    assert!((z - 100.0 / sd).abs() < 1e-9);
    assert_eq!(a["is_anomaly"], false);
    assert!((a["rolling_average_cpu"].as_f64().expect("cpu") - 0.7).abs() < 1e-12);
    assert_eq!(a["event_timestamp"], "2024-01-15T11:00:02Z");
    let processed = a["processed_at"].as_str().expect("processed_at");
    assert!(
        processed.ends_with('Z') && processed.len() == 24,
        "{processed}"
    );
    // The original service's five fields first, in its order, then the additions.
    let order = [
        "device_id",
        "rolling_average_rps",
        "is_anomaly",
        "z_score",
        "processed_at",
        "samples",
        "last_rps",
        "stddev_rps",
        "rolling_average_cpu",
        "event_timestamp",
        "stddev_cpu",
        "cpu_z_score",
        "is_cpu_anomaly",
    ];
    let positions: Vec<usize> = order
        .iter()
        .map(|k| {
            raw_body
                .find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("{k} missing"))
        })
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{raw_body}");
    assert_eq!(a.as_object().expect("object").len(), order.len());
}

#[tokio::test]
async fn the_same_reading_with_the_same_timestamp_fifty_times_is_fifty_samples() {
    let svc = InProcess::start(&[]).await;
    // A steady device with a second-resolution clock sends exactly this, again and again.
    let body = r#"{"device_id":"steady-1","cpu":0.5,"rps":100,"timestamp":"2024-01-15T10:30:00Z"}"#;
    for _ in 0..50 {
        assert_eq!(post(svc.addr, "/metric", body).await.status, 200);
    }
    let (v, _) = analysis_with(&svc, "steady-1", 50).await;
    assert_eq!(v["rolling_average_rps"], 100.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spike_is_an_anomaly_and_is_counted_per_device() {
    let svc = InProcess::start(&[]).await;
    for rps in [
        100.0, 102.0, 98.0, 101.0, 99.0, 100.0, 103.0, 97.0, 100.0, 100.0,
    ] {
        assert_eq!(post_event(svc.addr, "pump-7", 0.4, rps).await.status, 200);
    }
    assert_eq!(
        post_event(svc.addr, "pump-7", 0.9, 1000.0).await.status,
        200
    );
    let (a, _) = analysis_with(&svc, "pump-7", 11).await;
    assert_eq!(a["is_anomaly"], true);
    assert!(a["z_score"].as_f64().expect("z") > 2.0);
    let count = eventually(SOON, "anomaly counter", || async {
        svc.metric(r#"anomalies_detected_total{device_id="pump-7",signal="rps"}"#)
            .await
    })
    .await;
    assert_eq!(count, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_validation_rule_answers_400_naming_the_field() {
    let svc = InProcess::start(&[]).await;
    // The same table the decoder's unit test reads.
    let table: Vec<Value> =
        serde_json::from_str(include_str!("fixtures/invalid_events.json")).expect("table");
    let cases: Vec<(String, Value)> = table
        .iter()
        .map(|c| {
            (
                c["body"].as_str().expect("body").to_string(),
                c["field"].clone(),
            )
        })
        .collect();
    for (body, field) in &cases {
        let r = post(svc.addr, "/metric", body).await;
        assert_eq!(r.status, 400, "{body} → {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"));
        let j = r.json();
        assert_eq!(&j["field"], field, "{body} → {}", r.body);
        assert!(j["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let rejected = svc
        .metric(r#"events_rejected_total{reason="invalid"}"#)
        .await;
    assert_eq!(rejected, Some(cases.len() as f64));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_limit_get_413() {
    let svc = InProcess::start(&[("MAX_BODY_BYTES", "1024")]).await;
    let big = format!(
        r#"{{"device_id":"a","cpu":0.5,"rps":1,"pad":"{}"}}"#,
        "x".repeat(2000)
    );
    let r = post(svc.addr, "/metric", &big).await;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["field"], Value::Null);
    // Without a Content-Length the limit applies while reading.
    let chunk = format!("{:x}\r\n{big}\r\n0\r\n\r\n", big.len());
    let req = format!("POST /metric HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}");
    assert_eq!(raw(svc.addr, req.as_bytes()).await.status, 413);
    // Just under the limit is fine.
    let ok = format!(
        r#"{{"device_id":"a","cpu":0.5,"rps":1,"pad":"{}"}}"#,
        "x".repeat(900)
    );
    assert_eq!(post(svc.addr, "/metric", &ok).await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_404_and_wrong_methods_405_with_allow() {
    let svc = InProcess::start(&[]).await;
    let r = get(svc.addr, "/nope/42").await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["field"], Value::Null);
    for (method, path, allow) in [
        ("GET", "/metric", "POST"),
        ("POST", "/analyze", "GET"),
        ("DELETE", "/health", "GET"),
        ("PUT", "/metrics", "GET"),
    ] {
        let r = request(svc.addr, method, path, None).await;
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.header("allow"), Some(allow), "{method} {path}");
    }
    let unmatched = svc
        .metric(r#"http_requests_total{method="GET",endpoint="unmatched",status="404"}"#)
        .await;
    assert_eq!(unmatched, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_errors() {
    let svc = InProcess::start(&[]).await;
    let r = get(svc.addr, "/analyze").await;
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (400, "device_id".into())
    );
    let r = get(svc.addr, &format!("/analyze?device_id={}", "x".repeat(129))).await;
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (400, "device_id".into())
    );
    let r = get(svc.addr, "/analyze?device_id=never-seen").await;
    assert_eq!(
        (r.status, r.json()["field"].clone()),
        (404, "device_id".into())
    );
    // Percent-encoded ids are decoded.
    assert_eq!(post_event(svc.addr, "hall A/1", 0.1, 5.0).await.status, 200);
    eventually(SOON, "encoded id", || async {
        (get(svc.addr, "/analyze?device_id=hall%20A%2F1")
            .await
            .status
            == 200)
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_ready() {
    let svc = InProcess::start(&[]).await;
    let h = get(svc.addr, "/health").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.json()["status"], "healthy");
    assert!(h.json()["timestamp"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    let r = get(svc.addr, "/ready").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["status"], "ready");
    assert_eq!(r.json()["checks"]["store"], "ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_expose_the_spec_families_with_their_labels() {
    let svc = InProcess::start(&[]).await;
    assert_eq!(post_event(svc.addr, "m-1", 0.5, 10.0).await.status, 200);
    // A spike, so that anomalies_detected_total has a series too.
    for rps in [10.0, 11.0, 10.0, 9.0, 10.0, 11.0, 10.0, 9.0, 10.0, 500.0] {
        assert_eq!(post_event(svc.addr, "m-2", 0.5, rps).await.status, 200);
    }
    eventually(Duration::from_secs(5), "the anomaly counted", || async {
        svc.metric(r#"anomalies_detected_total{device_id="m-2",signal="rps"}"#)
            .await
            .filter(|n| *n == 1.0)
    })
    .await;
    assert_eq!(get(svc.addr, "/health").await.status, 200);
    let r = get(svc.addr, "/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("application/openmetrics-text")));
    let text = r.body;
    for needle in [
        "# TYPE http_requests counter",
        r#"http_requests_total{method="POST",endpoint="/metric",status="200"} 1"#,
        r#"http_requests_total{method="GET",endpoint="/health",status="200"} 1"#,
        "# TYPE request_duration_seconds histogram",
        r#"request_duration_seconds_bucket{le="0.0001",method="POST",endpoint="/metric"}"#,
        r#"request_duration_seconds_bucket{le="2.5",method="POST",endpoint="/metric"}"#,
        "events_accepted_total 11",
        r#"events_rejected_total{reason="overloaded"} 0"#,
        "# TYPE pending_events gauge",
        "# TYPE device_actors gauge",
        "# TYPE actor_restarts counter",
        "# TYPE store_keys_written counter",
        "# TYPE store_flushes counter",
        "# TYPE store_write_errors counter",
        "# TYPE store_write_duration_seconds histogram",
        "# TYPE store_pending_results gauge",
        "store_up 1",
        "build_info{version=",
        "# TYPE process_cpu_seconds counter",
        "# TYPE process_resident_memory_bytes gauge",
        "# EOF",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    // Every family docs/api.md documents is exported, with a value, from the start.
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/api.md"))
        .expect("docs/api.md");
    let documented: Vec<&str> = doc
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter(|l| {
            ["counter", "gauge", "histogram", "info"]
                .iter()
                .any(|t| l.split('|').nth(2).is_some_and(|c| c.trim().starts_with(t)))
        })
        .flat_map(|l| l.split('|').nth(1).unwrap_or("").split(','))
        .filter_map(|name| name.trim().strip_prefix('`')?.strip_suffix('`'))
        .collect();
    assert!(
        documented.len() >= 30,
        "the metrics table of docs/api.md was not found: {documented:?}"
    );
    for family in documented {
        let exported = text.lines().any(|l| {
            !l.starts_with('#')
                && (l.starts_with(&format!("{family} ")) || l.starts_with(&format!("{family}{{")))
        }) || text.contains(&format!("\n{family}_bucket"))
            || text.contains(&format!("\n{family}_count"));
        assert!(
            exported,
            "docs/api.md documents {family}, the service exports no value of it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_labels_are_capped() {
    let svc = InProcess::start(&[("MAX_DEVICE_LABELS", "1")]).await;
    for device in ["cap-a", "cap-b", "cap-c"] {
        for rps in [
            10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 500.0,
        ] {
            assert_eq!(post_event(svc.addr, device, 0.5, rps).await.status, 200);
        }
    }
    let other = eventually(SOON, "__other__ anomalies", || async {
        svc.metric(r#"anomalies_detected_total{device_id="__other__",signal="rps"}"#)
            .await
            .filter(|v| *v == 2.0)
    })
    .await;
    assert_eq!(other, 2.0);
    assert_eq!(
        svc.metric(r#"anomalies_detected_total{device_id="cap-a",signal="rps"}"#)
            .await,
        Some(1.0)
    );
    assert_eq!(
        svc.metric(r#"anomalies_detected_total{device_id="cap-b",signal="rps"}"#)
            .await,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_pending_bound_ingest_answers_503_with_retry_after() {
    // Accepting events during an outage is the trade-off of INGEST_LOG=off (with the
    // log on they get 503: tests/ingest_log.rs).
    // A "Redis" that accepts connections and never answers keeps the first device actor
    // busy restoring its window for the store deadline, so events queue up behind it.
    let blackhole = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("redis://{}/", blackhole.local_addr().expect("addr"));
    let svc = InProcess::start(&[
        ("INGEST_LOG", "off"),
        ("REDIS_URL", &url),
        ("MAX_PENDING_EVENTS", "3"),
    ])
    .await;
    for _ in 0..3 {
        assert_eq!(post_event(svc.addr, "busy", 0.5, 1.0).await.status, 200);
    }
    let r = post_event(svc.addr, "busy", 0.5, 1.0).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["field"], Value::Null);
    assert_eq!(
        svc.metric(r#"events_rejected_total{reason="overloaded"}"#)
            .await,
        Some(1.0)
    );
    // Once the backlog is processed, events are accepted again.
    eventually(Duration::from_secs(10), "ingest to recover", || async {
        (post_event(svc.addr, "busy", 0.5, 1.0).await.status == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn sigterm_exits_zero_after_a_clean_drain() {
    let svc = Service::start(&[]);
    for i in 0..20 {
        assert_eq!(
            post_event(svc.addr, &format!("t-{}", i % 4), 0.5, i as f64)
                .await
                .status,
            200
        );
    }
    let (code, logs) = svc.terminate();
    assert_eq!(code, 0);
    assert!(
        logs.iter()
            .any(|l| l.contains("every accepted event is processed and stored")),
        "{logs:#?}"
    );
    assert!(
        !logs
            .iter()
            .any(|l| l.contains("connections were still open")),
        "{logs:#?}"
    );
}

#[tokio::test]
async fn sigterm_with_a_request_still_open_at_the_deadline_says_so() {
    // SHUTDOWN_TIMEOUT 1 s; the body of a request in flight would be waited for 60 s.
    let svc = Service::start(&[("SHUTDOWN_TIMEOUT", "1s"), ("BODY_READ_TIMEOUT", "60s")]);
    let mut stream = TcpStream::connect(svc.addr).await.expect("connect");
    // `Expect: 100-continue`: the server says `100 Continue` once the handler reads the
    // body, so the request is known to be in flight (past the shutdown check) before
    // SIGTERM; the body then never comes.
    stream
        .write_all(
            b"POST /metric HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
              Content-Length: 100\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .expect("head");
    let mut interim = [0u8; 25];
    stream.read_exact(&mut interim).await.expect("100 Continue");
    assert!(
        interim.starts_with(b"HTTP/1.1 100 Continue\r\n"),
        "{:?}",
        String::from_utf8_lossy(&interim)
    );
    let (code, logs) = svc.terminate();
    assert_eq!(code, 0);
    let warned = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["message"] == "some connections were still open at the shutdown deadline")
        .unwrap_or_else(|| panic!("no warning about the open connection in {logs:#?}"));
    assert_eq!(warned["level"], "WARN");
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_without_an_offset_is_refused_saying_so() {
    let svc = InProcess::start(&[]).await;
    let r = post(
        svc.addr,
        "/metric",
        r#"{"device_id":"d","cpu":0.5,"rps":1,"timestamp":"2024-01-15T10:30:00"}"#,
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["field"], "timestamp");
    let error = r.json()["error"].as_str().expect("error").to_string();
    assert!(
        error.starts_with("timestamp needs an offset such as Z or +02:00"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_nesting_in_an_ignored_field_is_refused_naming_the_limit() {
    let svc = InProcess::start(&[]).await;
    let deep = |levels: usize| {
        format!(
            r#"{{"device_id":"d","cpu":0.5,"rps":1,"extra":{}0{}}}"#,
            "[".repeat(levels),
            "]".repeat(levels)
        )
    };
    let r = post(svc.addr, "/metric", &deep(32_000)).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["field"], Value::Null);
    let error = r.json()["error"].as_str().expect("error").to_string();
    assert!(
        error.starts_with("JSON nested deeper than 64 levels"),
        "{error}"
    );
    // Within the limit, the field is ignored as any other.
    let r = post(svc.addr, "/metric", &deep(10)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // In a batch, the deep event is refused and the other accepted.
    let body = format!("{}\n{}\n", deep(1_000), deep(1));
    let r = post(svc.addr, "/metric/batch", &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let answer = r.json();
    assert_eq!(
        (answer["accepted"].as_u64(), answer["rejected"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(answer["errors"][0]["index"], 0);
    assert!(
        answer["errors"][0]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("JSON nested deeper than 64 levels")),
        "{answer}"
    );
}

#[tokio::test]
async fn invalid_configuration_stops_start_up_naming_the_setting() {
    for (env, expected) in [
        (("RESULT_TTL", "10ms"), &["--result-ttl", "at least 1s"][..]),
        (("RUST_LOG", "info,[="), &["RUST_LOG"][..]),
        (
            ("REDIS_URL", "http://user:hunter2@host/"),
            &["REDIS_URL", "redis://"][..],
        ),
        (
            ("CLUSTER_PEERS", "a:8081"),
            &["CLUSTER_PEERS", "CLUSTER_ADVERTISE_ADDR"][..],
        ),
        (
            ("CLUSTER_ADVERTISE_ADDR", "127.0.0.1:9"),
            &["CLUSTER_ADVERTISE_ADDR", "REDIS_URL"][..],
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_iot-processor"))
            .env_clear()
            .env(env.0, env.1)
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{env:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for word in expected {
            assert!(err.contains(word), "{env:?}: {err}");
        }
        assert!(
            !err.contains("hunter2"),
            "a password is never echoed: {err}"
        );
    }
}

/// The binary with only `env` (and a free listen port) set: its exit code and stderr.
fn run_with(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iot-processor"))
        .env_clear()
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .envs(env.iter().copied())
        .output()
        .expect("run");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_setting_from_the_environment_is_named_by_its_variable() {
    for (env, expected) in [
        (
            ("WINDOW_SIZE", "0"),
            "error: invalid value '0' for WINDOW_SIZE (--window-size): 0 is not in 1..=100000\n",
        ),
        (
            ("RESULT_TTL", "10ms"),
            "error: invalid value '10ms' for RESULT_TTL (--result-ttl): must be at least 1s\n",
        ),
        (
            ("LOG_FORMAT", "xml"),
            "error: invalid value 'xml' for LOG_FORMAT (--log-format): expected one of text, json\n",
        ),
    ] {
        let (code, err) = run_with(&[env]);
        assert_eq!(code, Some(2), "{env:?}: {err}");
        assert_eq!(err, expected, "{env:?}");
    }
    // A flag is named as the flag, by clap.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iot-processor"))
        .env_clear()
        .args(["--window-size", "0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid value '0' for '--window-size <WINDOW_SIZE>'"),
        "{err}"
    );
}

#[test]
fn an_invalid_redis_url_is_named_by_its_variable_first_and_never_echoed() {
    let (code, err) = run_with(&[("REDIS_URL", "http://user:hunter2@host/")]);
    assert_eq!(code, Some(2), "{err}");
    // After the start-up line: the URL is checked once logging is up.
    assert!(
        err.lines().any(|l| l
            == "error: invalid value for REDIS_URL (--redis-url): expected redis://[:password@]host:port/db or rediss://…"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn conflicting_settings_name_the_one_set_and_the_one_it_conflicts_with() {
    let (code, err) = run_with(&[("DEVICE_IDLE_TIMEOUT", "1s")]);
    assert_eq!(code, Some(2), "{err}");
    // After the start-up line: the settings are checked once logging is up.
    assert!(
        err.lines().any(|l| l.starts_with(
            "error: DEVICE_IDLE_TIMEOUT (1s) must be longer than WINDOW_CHECKPOINT_INTERVAL (1s): "
        )),
        "{err}"
    );
}

#[test]
fn an_address_in_use_stops_start_up_with_one_line_and_exit_1_without_a_backtrace() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let embedded = [("LISTEN_ADDR", addr.as_str())];
    // A cluster member binds its internal listener before it needs Redis to answer.
    let member = [
        ("CLUSTER_LISTEN_ADDR", addr.as_str()),
        ("CLUSTER_ADVERTISE_ADDR", addr.as_str()),
        ("REDIS_URL", "redis://127.0.0.1:1/"),
        ("CLUSTER_TOKEN", "t"),
    ];
    for (env, setting) in [
        (&embedded[..], "LISTEN_ADDR"),
        (&member[..], "CLUSTER_LISTEN_ADDR"),
    ] {
        let (code, err) =
            run_with(&[env, &[("RUST_BACKTRACE", "1"), ("LOG_FORMAT", "json")]].concat());
        assert_eq!(code, Some(1), "{err}");
        // Every other line is a JSON log line.
        let plain: Vec<&str> = err
            .lines()
            .filter(|l| serde_json::from_str::<Value>(l).is_err())
            .collect();
        assert_eq!(plain.len(), 1, "{err}");
        assert!(
            plain[0].starts_with(&format!("error: {setting}: cannot listen on {addr}: ")),
            "{err}"
        );
        assert!(!err.to_lowercase().contains("backtrace"), "{err}");
    }
}

#[tokio::test]
async fn start_up_logs_the_version_and_every_setting_without_secrets() {
    let port = common::free_port();
    let mut svc = Service::start(&[
        ("REDIS_URL", &format!("redis://:hunter2@127.0.0.1:{port}/")),
        ("WINDOW_SIZE", "77"),
    ]);
    let start = svc
        .wait_log(Duration::from_secs(1), |v| v["message"] == "starting")
        .expect("a start-up line");
    assert_eq!(start["version"], env!("CARGO_PKG_VERSION"));
    let settings = start["settings"].as_str().expect("settings");
    for shown in [
        "WINDOW_SIZE=77",
        "FLUSH_INTERVAL=5ms",
        &format!("REDIS_URL=redis://***@127.0.0.1:{port}/"),
    ] {
        assert!(settings.contains(shown), "{shown} missing: {settings}");
    }
    assert!(!start.to_string().contains("hunter2"));
    // Nothing listens on that port: the first contact says so, as a warning.
    let warn = svc
        .wait_log(Duration::from_secs(5), |v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("unreachable at start-up"))
        })
        .expect("a warning that the store is unreachable");
    assert_eq!(warn["store"], "redis");
}

#[tokio::test]
async fn failed_requests_are_logged_with_their_request_id() {
    let mut svc = Service::start(&[]);
    let bad = r#"{"device_id":"dev-9","cpu":7,"rps":1}"#;
    let headers = ["X-Request-Id: req-42", "Content-Type: application/json"];
    let reply = request_with(svc.addr, "POST", "/metric", &headers, bad.as_bytes()).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.header("x-request-id"), Some("req-42"));
    let line = svc
        .wait_log(Duration::from_secs(5), |v| v["request_id"] == "req-42")
        .expect("a line for the failed request");
    assert_eq!(line["message"], "request failed");
    assert_eq!(line["level"], "WARN");
    assert_eq!(line["status"], 400);
    assert_eq!(line["path"], "/metric");
    assert_eq!(line["field"], "cpu");
    assert!(
        line["reason"].as_str().is_some_and(|r| r.contains("cpu")),
        "{line}"
    );
    // Without an id of its own, a request gets one, also on success.
    let ok = post_event(svc.addr, "dev-9", 0.5, 1.0).await;
    let id = ok.header("x-request-id").expect("generated id");
    assert!(
        id.len() == 16 && id.chars().all(|c| c.is_ascii_hexdigit()),
        "{id}"
    );
    // /analyze failures name the device from the query.
    let missing = get(svc.addr, "/analyze?device_id=nobody").await;
    assert_eq!(missing.status, 404);
    let rid = missing.header("x-request-id").expect("id").to_string();
    let line = svc
        .wait_log(Duration::from_secs(5), |v| v["request_id"] == rid.as_str())
        .expect("a line for the 404");
    assert_eq!(line["device_id"], "nobody");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_limit_is_exact_and_a_declared_excess_is_refused_before_the_body() {
    let svc = InProcess::start(&[("MAX_BODY_BYTES", "1024")]).await;
    // Exactly the limit is accepted.
    let head = r#"{"device_id":"exact","cpu":0.5,"rps":1,"pad":""#;
    let exact = format!("{head}{}\"}}", "x".repeat(1024 - head.len() - 2));
    assert_eq!(exact.len(), 1024);
    assert_eq!(post(svc.addr, "/metric", &exact).await.status, 200);
    // A Content-Length over the limit is refused at once: the body is never sent.
    let r = raw(
        svc.addr,
        b"POST /metric HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 1025\r\n\r\n",
    )
    .await;
    assert_eq!(r.status, 413, "{}", r.body);
    // A body that breaks off in bad chunking is a 400 saying so, not a 413.
    let r = raw(
        svc.addr,
        b"POST /metric HTTP/1.1\r\nHost: t\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\nzz\r\n",
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        r.json()["error"]
            .as_str()
            .is_some_and(|m| m.starts_with("could not read the request body")),
        "{}",
        r.body
    );
}
