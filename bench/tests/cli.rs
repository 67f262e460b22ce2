//! The bench binaries as a script uses them: the load generator's exit code and failure
//! breakdown against a closed port and against the limit server, and the limit server's
//! command line. Runs are bounded by `--requests`, not by time.

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, TcpListener};
use std::process::{Child, Command, Output, Stdio};

const LOADTEST: &str = env!("CARGO_BIN_EXE_loadtest");
const LIMIT_SERVER: &str = env!("CARGO_BIN_EXE_limit-server");

/// A port where nothing listens: bound, read, and closed again.
fn closed_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

fn loadtest(url: &str, extra: &[&str]) -> Output {
    Command::new(LOADTEST)
        .args([url, "1", "4", "60s", "--devices", "10"])
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run loadtest")
}

/// The limit server on a free port; killed on drop.
struct LimitServer {
    child: Child,
    addr: String,
}

impl LimitServer {
    fn start() -> Self {
        let mut child = Command::new(LIMIT_SERVER)
            .arg("127.0.0.1:0")
            .stderr(Stdio::piped())
            .spawn()
            .expect("start limit-server");
        let stderr = child.stderr.take().expect("piped stderr");
        let mut line = String::new();
        BufReader::new(stderr)
            .read_line(&mut line)
            .expect("read the listening line");
        let addr = line
            .trim()
            .strip_prefix("limit-server listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_string();
        Self { child, addr }
    }
}

impl Drop for LimitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_run_against_a_closed_port_fails_and_says_why() {
    let url = format!("http://127.0.0.1:{}/metric", closed_port());
    let out = loadtest(&url, &["--requests", "40"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("Failed:          40\n"), "{stdout}");
    assert!(stdout.contains("  connection refused: 40\n"), "{stdout}");
    assert!(
        stderr.contains("below --min-success 95%") && stderr.contains("40 of 40"),
        "{stderr}"
    );

    let out = loadtest(&url, &["--requests", "40", "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["failures"]["by_error"]["connection refused"], 40);
    assert!(report["latency_ms"].is_null(), "{report}");

    // Tolerating failures explicitly turns the same run into a success.
    let out = loadtest(&url, &["--requests", "40", "--min-success", "0"]);
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn a_run_against_the_limit_server_succeeds_with_p99_9() {
    let server = LimitServer::start();
    let out = loadtest(
        &format!("http://{}/metric", server.addr),
        &["--requests", "200", "--json"],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["successful"], 200);
    assert_eq!(report["failed"], 0);
    assert!(report["latency_ms"]["p99_9"].as_f64().is_some(), "{report}");
    assert_eq!(report["failures"]["by_status"], serde_json::json!({}));
}

#[test]
fn a_url_list_spreads_the_connections_over_every_target() {
    // Connections 0 and 2 go to the limit server, 1 and 3 to a closed port: both show up.
    let server = LimitServer::start();
    let urls = format!(
        "http://{}/metric,http://127.0.0.1:{}/metric",
        server.addr,
        closed_port()
    );
    let out = loadtest(
        &urls,
        &["--requests", "200", "--json", "--min-success", "0"],
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["url"], urls.as_str());
    assert!(report["successful"].as_u64() > Some(0), "{report}");
    assert!(
        report["failures"]["by_error"]["connection refused"].as_u64() > Some(0),
        "{report}"
    );
    assert_eq!(report["total"], 200);
}

#[test]
fn limit_server_help_and_bad_address() {
    let help = Command::new(LIMIT_SERVER)
        .arg("--help")
        .output()
        .expect("run");
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage: limit-server [ADDR]"));

    let bad = Command::new(LIMIT_SERVER)
        .arg("nonsense")
        .output()
        .expect("run");
    // clap's exit code for a usage error, and a message naming the argument.
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid value 'nonsense' for '[ADDR]'"));
}

#[test]
fn a_url_that_is_not_a_plain_http_target_exits_2_before_any_request() {
    for url in ["ht!tp://x", "https://127.0.0.1:1/metric"] {
        let out = loadtest(url, &["--requests", "1"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{url}: {stderr}");
        assert!(
            stderr.starts_with(&format!(
                "error: invalid value '{url}' for '<URL>': bad URL {url}"
            )),
            "{stderr}"
        );
        assert!(out.stdout.is_empty(), "no run, no report");
    }
}

#[test]
fn a_failed_run_is_one_error_line_even_with_rust_backtrace_set() {
    let url = format!("http://127.0.0.1:{}/metric", closed_port());
    let out = Command::new(LOADTEST)
        .args([url.as_str(), "1", "2", "60s", "--requests", "10"])
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("run loadtest");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.starts_with('[')).collect();
    assert_eq!(
        errors,
        ["error: success rate 0.000% is below --min-success 95% (10 of 10 requests failed)"],
        "{stderr}"
    );
}
