//! The Redis store path against a real `redis-server` that each test starts on a free
//! port: keys and TTL, coalescing, outage and recovery, shutdown flush, window restore.

mod common;

use common::{eventually, get, post_event, InProcess, Redis, Service};
use serde_json::Value;
use std::time::{Duration, Instant};

const SOON: Duration = Duration::from_secs(5);

fn redis_json(redis: &Redis, key: &str) -> Option<Value> {
    let text = redis.cli(&["GET", key])?;
    serde_json::from_str(&text).ok()
}

async fn stored_samples(redis: &Redis, device: &str, samples: u64) -> Value {
    eventually(SOON, "stored analysis", || async {
        redis_json(redis, &format!("analysis:{device}")).filter(|v| v["samples"] == samples)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_stored_under_the_original_keys_with_ttl() {
    let redis = Redis::start();
    let svc = InProcess::start(&[("REDIS_URL", &redis.url()), ("RESULT_TTL", "90s")]).await;
    for rps in [10.0, 20.0] {
        assert_eq!(post_event(svc.addr, "r-1", 0.25, rps).await.status, 200);
    }
    let v = stored_samples(&redis, "r-1", 2).await;
    assert_eq!(v["rolling_average_rps"], 15.0);
    assert_eq!(v["last_rps"], 20.0);
    // /analyze returns exactly what Redis holds.
    let api = get(svc.addr, "/analyze?device_id=r-1").await;
    assert_eq!(api.status, 200);
    assert_eq!(api.json(), v);
    for key in ["analysis:r-1", "window:r-1"] {
        let ttl: i64 = redis
            .cli(&["PTTL", key])
            .and_then(|t| t.parse().ok())
            .expect("pttl");
        assert!(ttl > 80_000 && ttl <= 90_000, "{key} PTTL {ttl}");
    }
    // IW4 + the version (8 bytes) + the log position (28) + the newest event's timestamp
    // (12) + two readings of 16:
    // at once when both results went out in one flush, else by the trailing checkpoint
    // (WINDOW_CHECKPOINT_INTERVAL, 1 s) when the first flush carried the first one alone.
    eventually(SOON, "the window with both readings", || async {
        (redis.cli(&["STRLEN", "window:r-1"]).as_deref() == Some("83")).then_some(())
    })
    .await;
    assert_eq!(
        get(svc.addr, "/ready").await.json()["checks"]["store"],
        "ok"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_events_of_one_device_within_a_flush_coalesce_into_few_writes() {
    let redis = Redis::start();
    let svc = InProcess::start(&[("REDIS_URL", &redis.url()), ("FLUSH_INTERVAL", "250ms")]).await;
    let events = 200u64;
    let started = Instant::now();
    for i in 0..events {
        assert_eq!(
            post_event(svc.addr, "chatty", 0.5, i as f64).await.status,
            200
        );
    }
    let sending = started.elapsed();
    let v = stored_samples(&redis, "chatty", 50).await;
    eventually(SOON, "newest result", || async {
        redis_json(&redis, "analysis:chatty").filter(|v| v["last_rps"] == (events - 1) as f64)
    })
    .await;
    assert_eq!(v["samples"], 50);
    let sets = redis.command_calls("set");
    // Two keys per device per flush; the flushes that could have happened while sending.
    let flushes = sending.as_millis() as u64 / 250 + 2;
    assert!(
        sets <= 2 * flushes,
        "{sets} SETs for {events} events in {sending:?}"
    );
    assert!(sets < events / 4, "{sets} SETs for {events} events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_degrades_and_recovers_without_losing_the_newest_results() {
    // Accepting events during an outage is the trade-off of INGEST_LOG=off (with the
    // log on they get 503: tests/ingest_log.rs).
    let mut redis = Redis::start();
    let port = redis.port;
    let svc = InProcess::start(&[("INGEST_LOG", "off"), ("REDIS_URL", &redis.url())]).await;
    assert_eq!(post_event(svc.addr, "o-1", 0.5, 1.0).await.status, 200);
    stored_samples(&redis, "o-1", 1).await;
    assert_eq!(get(svc.addr, "/ready").await.status, 200);

    redis.kill();
    let down = Instant::now();
    let ready = eventually(Duration::from_secs(3), "/ready to fail", || async {
        let r = get(svc.addr, "/ready").await;
        (r.status == 503).then(|| r.json())
    })
    .await;
    assert!(
        down.elapsed() < Duration::from_millis(1500),
        "noticed after {:?}",
        down.elapsed()
    );
    assert_eq!(ready["status"], "not_ready");
    assert_eq!(ready["checks"]["store"], "unreachable");
    let analyze = get(svc.addr, "/analyze?device_id=o-1").await;
    assert_eq!(analyze.status, 503);
    assert_eq!(analyze.header("retry-after"), Some("1"));
    assert_eq!(get(svc.addr, "/health").await.status, 200);
    for rps in [2.0, 3.0, 4.0] {
        assert_eq!(
            post_event(svc.addr, "o-1", 0.5, rps).await.status,
            200,
            "ingest goes on"
        );
    }
    assert_eq!(post_event(svc.addr, "o-2", 0.5, 9.0).await.status, 200);
    let errors = eventually(SOON, "store errors counted", || async {
        svc.metric("store_write_errors_total")
            .await
            .filter(|v| *v > 0.0)
    })
    .await;
    assert!(errors > 0.0);
    assert_eq!(common::metric(svc.addr, "store_up").await, Some(0.0));

    let redis = Redis::start_on(port);
    let v = stored_samples(&redis, "o-1", 4).await;
    assert_eq!(v["last_rps"], 4.0);
    stored_samples(&redis, "o-2", 1).await;
    eventually(SOON, "/ready to recover", || async {
        (get(svc.addr, "/ready").await.status == 200).then_some(())
    })
    .await;
    assert_eq!(
        get(svc.addr, "/analyze?device_id=o-1").await.json()["samples"],
        4
    );
}

#[tokio::test]
async fn every_event_accepted_before_sigterm_is_in_redis_after_exit() {
    let redis = Redis::start();
    // A long flush interval: only the shutdown flush can have written the results.
    let svc = Service::start(&[("REDIS_URL", &redis.url()), ("FLUSH_INTERVAL", "1h")]);
    let devices = 20;
    let per_device = 25;
    let addr = svc.addr;
    let mut tasks = Vec::new();
    for d in 0..devices {
        tasks.push(tokio::spawn(async move {
            for i in 0..per_device {
                let r = post_event(addr, &format!("s-{d}"), 0.5, (d * 1000 + i) as f64).await;
                assert_eq!(r.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.expect("poster");
    }
    let (code, _) = svc.terminate();
    assert_eq!(code, 0);
    for d in 0..devices {
        let v = redis_json(&redis, &format!("analysis:s-{d}"))
            .unwrap_or_else(|| panic!("s-{d} missing"));
        assert_eq!(v["samples"], per_device, "s-{d}");
        assert_eq!(v["last_rps"], (d * 1000 + per_device - 1) as f64, "s-{d}");
    }
}

#[tokio::test]
async fn a_window_survives_a_service_restart() {
    let redis = Redis::start();
    let env = [("REDIS_URL", redis.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let svc = Service::start(&env);
    for i in 0..30 {
        assert_eq!(
            post_event(svc.addr, "phoenix", 0.5, i as f64).await.status,
            200
        );
    }
    let (code, _) = svc.terminate();
    assert_eq!(code, 0);

    let svc = Service::start(&env);
    assert_eq!(post_event(svc.addr, "phoenix", 0.5, 30.0).await.status, 200);
    let v = stored_samples(&redis, "phoenix", 31).await;
    // Statistics over 0..=30.
    assert_eq!(v["rolling_average_rps"], 15.0);
    let sd = v["stddev_rps"].as_f64().expect("sd");
    assert!((sd - (80.0f64).sqrt()).abs() < 1e-9, "{sd}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_at_start_up_is_not_fatal() {
    // Accepting events during an outage is the trade-off of INGEST_LOG=off (with the
    // log on they get 503: tests/ingest_log.rs).
    let port = common::free_port();
    let svc = InProcess::start(&[
        ("INGEST_LOG", "off"),
        ("REDIS_URL", &format!("redis://127.0.0.1:{port}/")),
    ])
    .await;
    assert_eq!(get(svc.addr, "/health").await.status, 200);
    let r = get(svc.addr, "/ready").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["checks"]["store"], "unreachable");
    assert_eq!(post_event(svc.addr, "early", 0.5, 1.0).await.status, 200);
    // The device actor cannot read the device's window: after its last attempt it counts
    // one failure and processes the event on an empty window.
    eventually(SOON, "the event processed without a window", || async {
        (common::metric(svc.addr, "events_processed_total").await == Some(1.0)).then_some(())
    })
    .await;
    assert_eq!(
        common::metric(svc.addr, "window_restore_failures_total").await,
        Some(1.0)
    );
    // The client is told the store is down, not the pool's internals.
    let analyze = get(svc.addr, "/analyze?device_id=early").await;
    assert_eq!(analyze.status, 503);
    assert_eq!(analyze.header("retry-after"), Some("1"));
    assert_eq!(
        analyze.json()["error"],
        "the store is unavailable; retry shortly"
    );

    let redis = Redis::start_on(port);
    eventually(SOON, "/ready once Redis appears", || async {
        (get(svc.addr, "/ready").await.status == 200).then_some(())
    })
    .await;
    stored_samples(&redis, "early", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_redis_is_detected_by_deadlines_and_recovered_from() {
    // Accepting events during an outage is the trade-off of INGEST_LOG=off (with the
    // log on they get 503: tests/ingest_log.rs).
    let redis = Redis::start();
    let svc = InProcess::start(&[("INGEST_LOG", "off"), ("REDIS_URL", &redis.url())]).await;
    assert_eq!(post_event(svc.addr, "h-1", 0.5, 1.0).await.status, 200);
    stored_samples(&redis, "h-1", 1).await;

    redis.signal("-STOP");
    let frozen = Instant::now();
    eventually(Duration::from_secs(3), "/ready to fail", || async {
        (get(svc.addr, "/ready").await.status == 503).then_some(())
    })
    .await;
    assert!(
        frozen.elapsed() < Duration::from_millis(2_000),
        "noticed after {:?}",
        frozen.elapsed()
    );
    // Ingest is not held up by the hung store, and /analyze fails fast-ish (deadline).
    let t = Instant::now();
    for rps in [2.0, 3.0] {
        assert_eq!(post_event(svc.addr, "h-1", 0.5, rps).await.status, 200);
    }
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "ingest took {:?}",
        t.elapsed()
    );
    let analyze = get(svc.addr, "/analyze?device_id=h-1").await;
    assert_eq!(analyze.status, 503);

    redis.signal("-CONT");
    let v = stored_samples(&redis, "h-1", 3).await;
    assert_eq!(v["last_rps"], 3.0);
    eventually(SOON, "/ready to recover", || async {
        (get(svc.addr, "/ready").await.status == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn sigterm_with_redis_down_says_how_many_results_were_not_stored() {
    // Accepting events during an outage is the trade-off of INGEST_LOG=off (with the
    // log on they get 503: tests/ingest_log.rs).
    let port = common::free_port();
    let svc = Service::start(&[
        ("INGEST_LOG", "off"),
        ("REDIS_URL", &format!("redis://127.0.0.1:{port}/")),
        ("SHUTDOWN_TIMEOUT", "2s"),
    ]);
    for device in ["u-1", "u-2", "u-3"] {
        assert_eq!(post_event(svc.addr, device, 0.5, 1.0).await.status, 200);
    }
    let (code, logs) = svc.terminate();
    assert_eq!(code, 0, "a store outage is no reason to fail the exit");
    let line = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["level"] == "ERROR" && v["unstored_results"].is_number())
        .unwrap_or_else(|| panic!("no shutdown report in {logs:#?}"));
    assert_eq!(line["unstored_results"], 3);
    assert_eq!(line["unprocessed"], 0);
    assert!(
        line["message"]
            .as_str()
            .is_some_and(|m| m.contains("3 devices could not be stored")),
        "{line}"
    );
}

#[tokio::test]
async fn sigterm_while_redis_hangs_says_how_many_events_were_not_processed() {
    // Accepting events during an outage is the trade-off of INGEST_LOG=off (with the
    // log on they get 503: tests/ingest_log.rs).
    let redis = Redis::start();
    let svc = Service::start(&[
        ("INGEST_LOG", "off"),
        ("REDIS_URL", &redis.url()),
        ("SHUTDOWN_TIMEOUT", "100ms"),
    ]);
    // A hanging Redis: the new device's actor waits for its window (up to three attempts
    // of WINDOW_RESTORE_TIMEOUT) far past the shutdown deadline, its events still queued.
    redis.signal("-STOP");
    for rps in [1.0, 2.0, 3.0] {
        assert_eq!(post_event(svc.addr, "stuck-1", 0.5, rps).await.status, 200);
    }
    let (code, logs) = svc.terminate();
    redis.signal("-CONT");
    assert_eq!(code, 0);
    let line = logs
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["level"] == "ERROR" && v["unprocessed"].is_number())
        .unwrap_or_else(|| panic!("no shutdown report in {logs:#?}"));
    assert_eq!(line["unprocessed"], 3, "{line}");
    assert!(
        line["message"]
            .as_str()
            .is_some_and(|m| m.contains("3 accepted events were not processed")),
        "{line}"
    );
}

#[tokio::test]
async fn a_request_in_flight_at_sigterm_gets_an_honest_answer() {
    let redis = Redis::start();
    // A long flush interval: only the shutdown flush can write the result.
    let svc = Service::start(&[("REDIS_URL", &redis.url()), ("FLUSH_INTERVAL", "1h")]);
    let body = r#"{"device_id":"late-1","cpu":0.5,"rps":42}"#;
    let answer = common::post_across_sigterm(&svc, "/metric", body, 10).await;
    let (code, _) = svc.terminate();
    assert_eq!(code, 0);
    let stored = redis_json(&redis, "analysis:late-1");
    eprintln!(
        "in-flight request answered: {}",
        answer.lines().next().unwrap_or("")
    );
    if answer.starts_with("HTTP/1.1 200") {
        // Accepted: processed and stored before exit.
        assert_eq!(stored.expect("late-1 stored")["last_rps"], 42.0);
    } else {
        // Refused because shutdown had begun: then nothing of it may be stored.
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(stored.is_none());
    }
}

/// Asks the store writer for `device`'s window, as a starting device actor does; answers
/// its version.
async fn window_answered(system: &actors::System, device: &str) -> Option<u64> {
    let answer = system
        .writer()
        .call(
            |port| actors::store::WriterMsg::LoadWindow(device.into(), port),
            Some(Duration::from_secs(5)),
        )
        .await
        .expect("writer answers");
    match answer {
        ractor::rpc::CallResult::Success(window) => {
            window.expect("window readable").map(|w| w.version())
        }
        other => panic!("no answer from the writer: {other:?}"),
    }
}

/// An actor system over `store` that flushes only at shutdown; every result is a
/// checkpoint, so the newest window waits with it.
async fn system_that_keeps_results(store: actors::store::RedisStore) -> actors::System {
    let config = actors::SystemConfig {
        flush_interval: Duration::from_secs(3600),
        window_checkpoint_interval: Duration::ZERO,
        ..actors::SystemConfig::default()
    };
    actors::System::start(
        config,
        actors::store::Store::Redis(store),
        prometheus_client::registry::Registry::default(),
    )
    .await
    .expect("system")
}

/// Three events of `device`, processed (the `devices`-th device given them) and waiting
/// in the writer: its window is then version (1, 3).
async fn three_unflushed_events(system: &actors::System, device: &str, devices: u64) {
    for rps in [1.0, 2.0, 3.0] {
        let event = actors::event::Event::new(rps, 0.5, chrono::Utc::now()).expect("a valid event");
        system.directory().submit(device, event).expect("submit");
    }
    eventually(SOON, "the three events processed", || async {
        (system.metrics().events_processed.get() == 3 * devices).then_some(())
    })
    .await;
}

/// Writes `device`'s window at `version` the way another node's flush would.
async fn another_node_writes(redis: &Redis, device: &str, version: u64) {
    use actors::position::Position;
    use actors::store::{
        analysis_key, window_key, DeviceWrite, RedisStore, RedisTls, WindowSnapshot,
    };
    let other = RedisStore::with_tls(
        &redis.url(),
        &RedisTls::default(),
        1,
        Duration::from_secs(2),
    )
    .expect("pool");
    let write = DeviceWrite {
        analysis: (analysis_key(device), bytes::Bytes::from_static(b"{}")),
        window: (
            window_key(device),
            Some(WindowSnapshot::encode(
                [(9.0, 0.5)].into_iter(),
                None,
                version,
                Position::default(),
            )),
        ),
        device: device.into(),
    };
    other
        .write(vec![write], Duration::from_secs(60))
        .await
        .expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restoring_device_gets_the_newer_of_its_unflushed_and_the_stored_window() {
    use actors::store::{RedisStore, RedisTls, Version};
    let redis = Redis::start();
    let pool = || {
        RedisStore::with_tls(
            &redis.url(),
            &RedisTls::default(),
            2,
            Duration::from_secs(2),
        )
        .expect("pool")
    };
    let mine = (1 << 40) + 3;
    assert_eq!(Version::parts(mine), (1, 3));
    let newer = (2 << 40) + 1;
    let older = 5;

    // In a cluster (fenced writes) the store is read as well and the newer window
    // wins: another node may have written the device while this one was cut off.
    let nothing_owned = actors::cluster::Ownership::new("127.0.0.1:1#1".into(), 4);
    let cluster =
        system_that_keeps_results(pool().fenced(std::sync::Arc::new(nothing_owned))).await;
    three_unflushed_events(&cluster, "g-new", 1).await;
    assert_eq!(window_answered(&cluster, "g-new").await, Some(mine));
    another_node_writes(&redis, "g-new", newer).await;
    assert_eq!(window_answered(&cluster, "g-new").await, Some(newer));
    another_node_writes(&redis, "g-old", older).await;
    three_unflushed_events(&cluster, "g-old", 2).await;
    assert_eq!(window_answered(&cluster, "g-old").await, Some(mine));

    // One node (unconditional writes): its unflushed window is the newest there is, and
    // the store is not consulted, whatever it holds.
    let single = system_that_keeps_results(pool()).await;
    three_unflushed_events(&single, "u", 1).await;
    another_node_writes(&redis, "u", newer).await;
    assert_eq!(window_answered(&single, "u").await, Some(mine));
}

#[tokio::test]
async fn the_pool_reuses_a_healthy_connection_and_replaces_a_broken_one_at_once() {
    use actors::store::{RedisStore, RedisTls};
    let mut redis = Redis::start();
    let port = redis.port;
    let store = RedisStore::with_tls(
        &redis.url(),
        &RedisTls::default(),
        1,
        Duration::from_secs(2),
    )
    .expect("pool");
    let before = redis.connections_received();
    for _ in 0..10 {
        store.ping().await.expect("ping");
    }
    // One connection for the ten commands, plus the second INFO's own.
    assert_eq!(redis.connections_received() - before, 2);

    // Redis restarts: the pooled connection is dead. The first command on it fails and
    // marks it; the next one, once Redis is back, gets a new connection, not the dead one.
    redis.kill();
    assert!(store.ping().await.is_err(), "a command on a dead server");
    let _redis = Redis::start_on(port);
    store
        .ping()
        .await
        .expect("the broken connection was replaced");
}
