//! TLS to Redis (`rediss://`) against a real `redis-server` that speaks only TLS, with a CA
//! and certificates generated per test: a private CA, an untrusted server certificate,
//! mutual TLS, and the settings that stop start-up.

mod common;

use common::tls::{Pki, TlsRedis};
use common::{eventually, get, post_event, Service};
use serde_json::Value;
use std::time::Duration;

const SOON: Duration = Duration::from_secs(5);

async fn stored(redis: &TlsRedis, device: &str, samples: u64) -> Value {
    eventually(SOON, "analysis stored over TLS", || async {
        redis
            .cli(&["GET", &format!("analysis:{device}")])
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .filter(|v| v["samples"] == samples)
    })
    .await
}

/// /ready answers 503 (store unreachable), and keeps doing so.
async fn not_ready(svc: &Service) {
    let ready = eventually(SOON, "/ready to answer 503", || async {
        let r = get(svc.addr, "/ready").await;
        (r.status == 503).then(|| r.json())
    })
    .await;
    assert_eq!(ready["checks"]["store"], "unreachable");
}

/// The WARN line of the first store contact, with the error that explains it.
fn unreachable_warning(svc: &mut Service) -> String {
    let line = svc
        .wait_log(SOON, |v| {
            v["level"] == "WARN"
                && v["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("store unreachable"))
        })
        .expect("a warning that the store is unreachable");
    line["error"].as_str().expect("the error named").to_string()
}

#[tokio::test]
async fn a_private_ca_makes_a_working_store() {
    let pki = Pki::generate();
    let redis = TlsRedis::start(&pki, false);
    let ca = pki.file("ca.crt");
    let mut svc = Service::start(&[("REDIS_URL", &redis.url()), ("REDIS_CA_FILE", &ca)]);
    for rps in [10.0, 20.0] {
        assert_eq!(post_event(svc.addr, "tls-1", 0.25, rps).await.status, 200);
    }
    let v = stored(&redis, "tls-1", 2).await;
    assert_eq!(v["rolling_average_rps"], 15.0);
    let api = get(svc.addr, "/analyze?device_id=tls-1").await;
    assert_eq!(api.status, 200);
    assert_eq!(api.json(), v);
    let ready = get(svc.addr, "/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    // The start-up line shows where the CA is; the using-Redis line that TLS is on.
    let start = svc
        .wait_log(SOON, |v| v["message"] == "starting")
        .expect("start-up line");
    let settings = start["settings"].as_str().expect("settings");
    assert!(
        settings.contains(&format!("REDIS_CA_FILE={ca}")),
        "{settings}"
    );
    let using = svc
        .wait_log(SOON, |v| v["message"] == "using Redis")
        .expect("using Redis line");
    assert_eq!(using["tls"], true);
}

#[tokio::test]
async fn an_untrusted_server_certificate_is_refused_and_named_and_ingest_goes_on() {
    // Accepting events during an outage is the trade-off of INGEST_LOG=off (with the
    // log on they get 503: tests/ingest_log.rs).
    let pki = Pki::generate();
    let redis = TlsRedis::start(&pki, false);
    // No REDIS_CA_FILE: only the public roots are trusted, and the test CA is not one.
    // The result that cannot be stored holds SIGTERM until the deadline: 1 s, not 10.
    let mut svc = Service::start(&[
        ("INGEST_LOG", "off"),
        ("REDIS_URL", &redis.url()),
        ("SHUTDOWN_TIMEOUT", "1s"),
    ]);
    assert_eq!(post_event(svc.addr, "tls-2", 0.5, 1.0).await.status, 200);
    not_ready(&svc).await;
    let error = unreachable_warning(&mut svc);
    assert!(
        error.contains("invalid peer certificate") && error.contains("UnknownIssuer"),
        "{error}"
    );
    // Degraded as in an outage: events accepted, liveness fine, nothing written.
    assert_eq!(post_event(svc.addr, "tls-2", 0.5, 2.0).await.status, 200);
    assert_eq!(get(svc.addr, "/health").await.status, 200);
    assert_eq!(get(svc.addr, "/analyze?device_id=tls-2").await.status, 503);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(svc.addr, "/ready").await.status, 503);
    assert_eq!(redis.cli(&["DBSIZE"]).as_deref(), Some("0"));
    let (code, _) = svc.terminate();
    assert_eq!(code, 0, "alive until SIGTERM, and exits cleanly");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_too() {
    let (pki, other) = (Pki::generate(), Pki::generate());
    let redis = TlsRedis::start(&pki, false);
    let mut svc = Service::start(&[
        ("REDIS_URL", &redis.url()),
        ("REDIS_CA_FILE", &other.file("ca.crt")),
    ]);
    not_ready(&svc).await;
    let error = unreachable_warning(&mut svc);
    assert!(error.contains("invalid peer certificate"), "{error}");
}

#[tokio::test]
async fn mutual_tls_works_with_the_client_certificate_and_fails_without() {
    let pki = Pki::generate();
    let redis = TlsRedis::start(&pki, true);
    let ca = pki.file("ca.crt");
    let svc = Service::start(&[
        ("REDIS_URL", &redis.url()),
        ("REDIS_CA_FILE", &ca),
        ("REDIS_CLIENT_CERT_FILE", &pki.file("client.crt")),
        ("REDIS_CLIENT_KEY_FILE", &pki.file("client.key")),
    ]);
    assert_eq!(post_event(svc.addr, "mtls-1", 0.5, 7.0).await.status, 200);
    stored(&redis, "mtls-1", 1).await;
    assert_eq!(get(svc.addr, "/ready").await.status, 200);

    // Without the ingest log, so that events are accepted while the store is unreachable.
    let mut without = Service::start(&[
        ("INGEST_LOG", "off"),
        ("REDIS_URL", &redis.url()),
        ("REDIS_CA_FILE", &ca),
    ]);
    assert_eq!(
        post_event(without.addr, "mtls-2", 0.5, 7.0).await.status,
        200
    );
    not_ready(&without).await;
    // The server refuses the handshake (TLS 1.3: alert CertificateRequired).
    let error = unreachable_warning(&mut without);
    assert!(error.contains("received fatal alert"), "{error}");
    assert_eq!(get(without.addr, "/health").await.status, 200);
    assert!(redis.cli(&["GET", "analysis:mtls-2"]).is_none());
}

/// Runs the binary with `env`; it must exit 2 naming every `expected` word, and never
/// print a line of the key file.
fn refused(env: &[(&str, &str)], expected: &[&str], key_file: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_iot-processor"))
        .env_clear()
        .envs(env.iter().copied())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{env:?}: {err}");
    for word in expected {
        assert!(err.contains(word), "{env:?}: {word} missing from {err}");
    }
    let key = std::fs::read_to_string(key_file).expect("key");
    for line in key.lines().filter(|l| !l.starts_with("-----")) {
        assert!(!err.contains(line), "key material printed: {err}");
    }
}

#[test]
fn tls_settings_that_cannot_work_stop_start_up_with_exit_2() {
    let pki = Pki::generate();
    let missing = pki.dir().join("nowhere.pem");
    let missing = missing.to_str().expect("utf-8");
    let (ca, cert, key) = (
        pki.file("ca.crt"),
        pki.file("client.crt"),
        pki.file("client.key"),
    );
    let url = ("REDIS_URL", "rediss://127.0.0.1:1/");
    let plain = ("REDIS_URL", "redis://127.0.0.1:1/");
    refused(
        &[plain, ("REDIS_CA_FILE", &ca)],
        &["REDIS_CA_FILE", "rediss://"],
        &key,
    );
    refused(
        &[("REDIS_CA_FILE", &ca)],
        &["REDIS_CA_FILE", "rediss://"],
        &key,
    );
    refused(
        &[url, ("REDIS_CA_FILE", missing)],
        &["REDIS_CA_FILE", missing, "cannot read"],
        &key,
    );
    refused(
        &[url, ("REDIS_CLIENT_CERT_FILE", &cert)],
        &["REDIS_CLIENT_CERT_FILE is set but REDIS_CLIENT_KEY_FILE is not"],
        &key,
    );
    refused(
        &[url, ("REDIS_CLIENT_KEY_FILE", &key)],
        &["REDIS_CLIENT_KEY_FILE is set but REDIS_CLIENT_CERT_FILE is not"],
        &key,
    );
    // The key where the CA belongs: named, never printed.
    refused(
        &[url, ("REDIS_CA_FILE", &key)],
        &["REDIS_CA_FILE", &key, "no PEM CERTIFICATE"],
        &key,
    );
    // A certificate that is not the key's.
    refused(
        &[
            url,
            ("REDIS_CLIENT_CERT_FILE", &ca),
            ("REDIS_CLIENT_KEY_FILE", &key),
        ],
        &["REDIS_CLIENT_KEY_FILE", "do not belong together"],
        &key,
    );
}
