//! Client tokens (AUTH_TOKENS_FILE) over real sockets: 401 / 403 / 200 per mode and
//! prefix, batches mixing allowed and forbidden devices, reloading while serving, the
//! `token add` helper end to end, and that tokens never reach the logs.

mod common;

use common::sse::Sse;
use common::{eventually, get, request_with, Reply, Service};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SOON: Duration = Duration::from_secs(10);

/// A fresh token and its file line, from the binary's own helper.
fn token_add(name: &str, prefix: &str, mode: &str) -> (String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_iot-processor"))
        .args(["token", "add", name, prefix, mode])
        .output()
        .expect("run token add");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    (lines[1].to_string(), lines[3].to_string())
}

#[test]
fn token_add_is_a_subcommand_listed_in_the_help() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_iot-processor"))
            .env_clear()
            .args(args)
            .output()
            .expect("run");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        (out.status.code(), text)
    };
    let (code, help) = run(&["--help"]);
    assert_eq!(code, Some(0));
    assert!(help.contains("iot-processor <COMMAND>"), "{help}");
    assert!(
        help.lines().any(|l| l.trim_start().starts_with("token ")),
        "{help}"
    );
    let (code, help) = run(&["token", "--help"]);
    assert_eq!(code, Some(0), "{help}");
    assert!(
        help.lines().any(|l| l.trim_start().starts_with("add ")),
        "{help}"
    );
    let (code, help) = run(&["token", "add", "--help"]);
    assert_eq!(code, Some(0), "{help}");
    assert!(
        help.contains("Usage: iot-processor token add <NAME> <PREFIX> <MODE>"),
        "{help}"
    );
    // The service's settings are not read: an invalid one does not stop the command.
    let out = Command::new(env!("CARGO_BIN_EXE_iot-processor"))
        .env_clear()
        .env("WINDOW_SIZE", "0")
        .args(["token", "add", "gw", "*", "r"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0));
    // A missing argument: the usage, exit 2.
    let out = Command::new(env!("CARGO_BIN_EXE_iot-processor"))
        .args(["token", "add", "gw"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Usage: iot-processor token add"), "{err}");
}

struct TokenFile {
    dir: PathBuf,
}

impl TokenFile {
    fn new(lines: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "iot-auth-{}-{}",
            std::process::id(),
            common::free_port()
        ));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = Self { dir };
        file.write(lines);
        file
    }

    fn path(&self) -> PathBuf {
        self.dir.join("tokens")
    }

    /// Replaces the file as a Secret update does: a new file renamed over the old one.
    fn write(&self, lines: &[&str]) {
        let tmp = self.dir.join("tokens.new");
        std::fs::write(&tmp, format!("# clients\n{}\n", lines.join("\n"))).expect("write");
        std::fs::rename(&tmp, self.path()).expect("rename");
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start(file: &Path) -> Service {
    Service::start(&[("AUTH_TOKENS_FILE", file.to_str().expect("utf-8 path"))])
}

async fn post_metric(addr: SocketAddr, token: Option<&str>, device: &str) -> Reply {
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let headers: Vec<&str> = auth.iter().map(String::as_str).collect();
    let body = json!({"device_id": device, "cpu": 0.5, "rps": 10}).to_string();
    request_with(addr, "POST", "/metric", &headers, body.as_bytes()).await
}

async fn analyze(addr: SocketAddr, token: Option<&str>, device: &str) -> Reply {
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let headers: Vec<&str> = auth.iter().map(String::as_str).collect();
    request_with(
        addr,
        "GET",
        &format!("/analyze?device_id={device}"),
        &headers,
        b"",
    )
    .await
}

#[tokio::test]
async fn every_mode_and_prefix_gets_its_answer() {
    let (writer, writer_line) = token_add("gw-a", "site-a/", "w");
    let (reader, reader_line) = token_add("dash", "*", "r");
    let (admin, admin_line) = token_add("admin", "*", "rw");
    let file = TokenFile::new(&[&writer_line, &reader_line, &admin_line]);
    let svc = start(&file.path());

    // No token, a wrong token: 401 with the challenge, nothing accepted.
    for token in [None, Some("iot_not-a-token")] {
        let r = post_metric(svc.addr, token, "site-a/1").await;
        assert_eq!(r.status, 401, "{token:?}: {}", r.body);
        assert_eq!(
            r.header("www-authenticate"),
            Some(r#"Bearer realm="iot-processor""#)
        );
        assert_eq!(r.json()["field"], Value::Null);
        assert_eq!(analyze(svc.addr, token, "site-a/1").await.status, 401);
    }
    // The writer: its prefix only, and no reading.
    assert_eq!(
        post_metric(svc.addr, Some(&writer), "site-a/1")
            .await
            .status,
        200
    );
    let r = post_metric(svc.addr, Some(&writer), "site-b/1").await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(
        r.json(),
        json!({"error": "token 'gw-a' may not write device_id 'site-b/1' (allowed prefix 'site-a/')", "field": "device_id"})
    );
    let r = analyze(svc.addr, Some(&writer), "site-a/1").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "token 'gw-a' may not read (mode w)");
    // The reader reads anything and writes nothing; the admin does both.
    let r = post_metric(svc.addr, Some(&reader), "site-a/1").await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "token 'dash' may not write (mode r)");
    eventually(SOON, "the analysis", || async {
        (analyze(svc.addr, Some(&reader), "site-a/1").await.status == 200).then_some(())
    })
    .await;
    assert_eq!(
        post_metric(svc.addr, Some(&admin), "any/1").await.status,
        200
    );
    // Probes and scraping stay open.
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(get(svc.addr, path).await.status, 200, "{path}");
    }
    for (reason, n) in [
        ("missing", 2.0),
        ("unknown", 2.0),
        ("mode", 2.0),
        ("device", 1.0),
    ] {
        assert_eq!(
            svc.metric(&format!("auth_failures_total{{reason=\"{reason}\"}}"))
                .await,
            Some(n),
            "{reason}"
        );
    }
    assert_eq!(
        svc.metric(r#"events_rejected_total{reason="unauthorized"}"#)
            .await,
        Some(4.0),
        "the four refused POSTs"
    );
    let (_, logs) = svc.terminate();
    let logs = logs.join("\n");
    assert!(logs.contains("client tokens loaded"), "{logs}");
    for secret in [&writer, &reader, &admin] {
        assert!(!logs.contains(secret.as_str()), "a token reached the log");
    }
}

#[tokio::test]
async fn a_batch_accepts_the_devices_the_token_covers_and_lists_the_others() {
    let (writer, line) = token_add("gw-a", "site-a/", "w");
    let file = TokenFile::new(&[&line]);
    let svc = start(&file.path());
    let body: String = ["site-a/1", "site-b/1", "site-a/2", "site-c/9"]
        .iter()
        .map(|d| format!("{}\n", json!({"device_id": d, "cpu": 0.5, "rps": 1})))
        .collect();
    let auth = format!("Authorization: Bearer {writer}");
    let r = request_with(svc.addr, "POST", "/metric/batch", &[&auth], body.as_bytes()).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let a = r.json();
    assert_eq!(
        (a["status"].clone(), a["accepted"].clone()),
        (json!("partial"), json!(2))
    );
    let errors: Vec<(u64, u64, Value)> = a["errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().expect("i"),
                e["status"].as_u64().expect("s"),
                e["field"].clone(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        vec![(1, 403, json!("device_id")), (3, 403, json!("device_id"))]
    );
    // Nothing the token may write: 403 as a whole.
    let only_b = format!(
        "{}\n",
        json!({"device_id": "site-b/1", "cpu": 0.5, "rps": 1})
    );
    let r = request_with(
        svc.addr,
        "POST",
        "/metric/batch",
        &[&auth],
        only_b.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["accepted"], 0);
    // And no token at all: 401 before the body is read.
    let r = request_with(svc.addr, "POST", "/metric/batch", &[], body.as_bytes()).await;
    assert_eq!(r.status, 401);

    // A batch with an allowed, a forbidden and an invalid event: each refused event is
    // counted once, under its own reason.
    let rejected = |reason: &'static str| {
        let svc = &svc;
        async move {
            svc.metric(&format!("events_rejected_total{{reason=\"{reason}\"}}"))
                .await
                .unwrap_or(0.0)
        }
    };
    let (invalid, unauthorized) = (rejected("invalid").await, rejected("unauthorized").await);
    let mixed: String = [("site-a/3", 0.5), ("site-b/3", 0.5), ("site-a/4", 2.0)]
        .iter()
        .map(|(d, cpu)| format!("{}\n", json!({"device_id": d, "cpu": cpu, "rps": 1})))
        .collect();
    let r = request_with(
        svc.addr,
        "POST",
        "/metric/batch",
        &[&auth],
        mixed.as_bytes(),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.json()["accepted"].clone(), r.json()["rejected"].clone()),
        (json!(1), json!(2))
    );
    assert_eq!(rejected("invalid").await, invalid + 1.0);
    assert_eq!(rejected("unauthorized").await, unauthorized + 1.0);
}

#[tokio::test]
async fn the_file_is_reloaded_while_serving_and_a_broken_one_keeps_the_tokens() {
    let (old, old_line) = token_add("old", "*", "rw");
    let (new, new_line) = token_add("new", "*", "rw");
    let file = TokenFile::new(&[&old_line]);
    let mut svc = start(&file.path());
    assert_eq!(post_metric(svc.addr, Some(&old), "d").await.status, 200);

    // A broken file: logged, and the old token still works.
    file.write(&["garbage line"]);
    let line = svc
        .wait_log(SOON, |v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("tokens file not reloaded"))
        })
        .expect("the broken file is reported");
    assert!(
        line["error"].as_str().is_some_and(|e| e.contains("line 2")),
        "{line}"
    );
    assert_eq!(post_metric(svc.addr, Some(&old), "d").await.status, 200);

    // A good file replaces the tokens without a restart.
    file.write(&[&new_line]);
    eventually(SOON, "the new token", || async {
        (post_metric(svc.addr, Some(&new), "d").await.status == 200).then_some(())
    })
    .await;
    assert_eq!(post_metric(svc.addr, Some(&old), "d").await.status, 401);

    // SIGHUP reloads at once (the file is rewritten with the same size and second, which
    // the change check could miss).
    let (third, third_line) = token_add("new", "*", "rw");
    std::fs::write(file.path(), format!("# clients\n{third_line}\n")).expect("write");
    Command::new("kill")
        .args(["-HUP", &svc.pid().to_string()])
        .status()
        .expect("kill");
    eventually(SOON, "the token after SIGHUP", || async {
        (post_metric(svc.addr, Some(&third), "d").await.status == 200).then_some(())
    })
    .await;
    let (code, _) = svc.terminate();
    assert_eq!(code, 0, "SIGHUP does not stop the service");
}

#[tokio::test]
async fn a_bad_tokens_file_stops_start_up() {
    let file = TokenFile::new(&["gw-a iot_pasted_token_by_mistake site-a/ w"]);
    for path in [file.path(), file.dir.join("missing")] {
        let out = Command::new(env!("CARGO_BIN_EXE_iot-processor"))
            .env_clear()
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("AUTH_TOKENS_FILE", &path)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{path:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("AUTH_TOKENS_FILE"), "{err}");
        assert!(!err.contains("iot_pasted_token"), "never echoed: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_iot-processor"))
        .args(["token", "add", "x", "*", "admin"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MODE must be rw, w or r"));
}

#[tokio::test]
async fn a_tokens_file_without_clients_is_warned_about_and_refuses_every_request() {
    let no_client = |v: &Value| {
        v["level"] == "WARN"
            && v["message"]
                .as_str()
                .is_some_and(|m| m.contains("lists no client"))
    };
    let empty = TokenFile::new(&[]);
    let mut svc = start(&empty.path());
    svc.wait_log(SOON, no_client)
        .expect("a warning that no client is listed");
    assert_eq!(
        post_metric(svc.addr, Some("anything"), "d-1").await.status,
        401
    );

    let (token, line) = token_add("gw", "*", "rw");
    let listed = TokenFile::new(&[&line]);
    let svc = start(&listed.path());
    assert_eq!(post_metric(svc.addr, Some(&token), "d-1").await.status, 200);
    let (code, logs) = svc.terminate();
    assert_eq!(code, 0);
    assert!(
        !logs
            .iter()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .any(|v| no_client(&v)),
        "a file with a client is not warned about"
    );
}

/// A stream opened with `token`'s authorization.
async fn open_stream(addr: SocketAddr, query: &str, token: &str) -> Sse {
    Sse::open(addr, query, &[&format!("Authorization: Bearer {token}")]).await
}

#[tokio::test]
async fn a_revoked_token_ends_its_open_streams_and_no_other() {
    let (revoked, revoked_line) = token_add("dash", "*", "r");
    let (kept, kept_line) = token_add("ops", "*", "r");
    let file = TokenFile::new(&[&revoked_line, &kept_line]);
    let svc = Service::start(&[
        (
            "AUTH_TOKENS_FILE",
            file.path().to_str().expect("utf-8 path"),
        ),
        ("STREAM_HEARTBEAT_INTERVAL", "200ms"),
    ]);
    let mut gone = open_stream(svc.addr, "", &revoked).await;
    let mut stays = open_stream(svc.addr, "", &kept).await;
    // Both stay open while their tokens are valid (heartbeats keep coming).
    assert!(!gone.ends_within(Duration::from_millis(600)).await);
    file.write(&[&kept_line]);
    assert!(
        gone.ends_within(SOON).await,
        "the revoked token's stream is still open"
    );
    assert!(
        !stays.ends_within(Duration::from_secs(1)).await,
        "a valid token's stream was ended"
    );
}

#[tokio::test]
async fn a_stream_prefix_must_lie_within_the_tokens_prefix() {
    let (site_a, site_a_line) = token_add("dash-a", "site-a/", "r");
    let file = TokenFile::new(&[&site_a_line]);
    let svc = start(&file.path());
    // Inside the token's prefix: the stream opens.
    drop(open_stream(svc.addr, "?prefix=site-a/pumps/", &site_a).await);
    let auth = format!("Authorization: Bearer {site_a}");
    for outside in ["site-b/", "site-"] {
        let r = request_with(
            svc.addr,
            "GET",
            &format!("/anomalies/stream?prefix={outside}"),
            &[&auth],
            b"",
        )
        .await;
        assert_eq!(r.status, 403, "{outside}: {}", r.body);
    }
}
