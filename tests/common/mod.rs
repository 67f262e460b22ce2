//! Test harness: the real `iot-processor` binary and a real `redis-server`, each started
//! on a free loopback port; requests through hyper's client (`http`), or as raw bytes
//! where the bytes are the point (`raw`).
#![allow(dead_code)]

pub mod cluster;
pub mod durable;
pub mod http;
pub mod inprocess;
pub mod sse;
pub mod tls;

// Not every test binary starts an in-process instance.
#[allow(unused_imports)]
pub use inprocess::InProcess;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A response as a test sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends raw request bytes on a new connection and reads the whole response.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut bytes))
        .await
        .expect("response within 20s")
        .expect("read");
    parse(&bytes)
}

fn parse(bytes: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end: {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().expect("status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_string(),
    }
}

/// A request with a JSON body, or none.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> Reply {
    match body {
        Some(body) => {
            let json = ["Content-Type: application/json"];
            request_with(addr, method, path, &json, body.as_bytes()).await
        }
        None => request_with(addr, method, path, &[], b"").await,
    }
}

/// A request with extra header lines (`Name: value`) and a raw body.
pub async fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> Reply {
    let body = bytes::Bytes::copy_from_slice(body);
    let sent = http::try_send(addr, method, path, headers, body);
    tokio::time::timeout(Duration::from_secs(20), sent)
        .await
        .expect("response within 20s")
        .unwrap_or_else(|e| panic!("{method} {path}: no answer: {e:?}"))
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, "GET", path, None).await
}

pub async fn post(addr: SocketAddr, path: &str, body: &str) -> Reply {
    request(addr, "POST", path, Some(body)).await
}

pub async fn post_event(addr: SocketAddr, device: &str, cpu: f64, rps: f64) -> Reply {
    let body = serde_json::json!({"device_id": device, "cpu": cpu, "rps": rps}).to_string();
    post(addr, "/metric", &body).await
}

/// POSTs `body` to `path` of `svc` across a SIGTERM: the head and the first `split` bytes
/// of the body, a round trip (the server has most likely read the head by then), SIGTERM,
/// a wait until shutdown is visible (`/ready` 503 or no new connections), then the rest.
/// Answers the response as text: 200 if the request was taken before shutdown, else 503
/// (the server may answer that without waiting for the rest of the body, and close: then
/// the last write fails and the answer is already there).
pub async fn post_across_sigterm(svc: &Service, path: &str, body: &str, split: usize) -> String {
    let mut stream = TcpStream::connect(svc.addr).await.expect("connect");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    stream
        .write_all(&body.as_bytes()[..split])
        .await
        .expect("part of the body");
    assert_eq!(get(svc.addr, "/health").await.status, 200);
    Command::new("kill")
        .args(["-TERM", &svc.pid().to_string()])
        .status()
        .expect("kill");
    eventually(
        Duration::from_secs(10),
        "shutdown to be visible",
        || async {
            let probe = async {
                let mut s = TcpStream::connect(svc.addr).await.ok()?;
                s.write_all(b"GET /ready HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    .await
                    .ok()?;
                let mut out = Vec::new();
                s.read_to_end(&mut out).await.ok()?;
                Some(out)
            };
            match tokio::time::timeout(Duration::from_secs(2), probe).await {
                Ok(Some(out)) if out.starts_with(b"HTTP/1.1 503") => Some(()),
                Ok(Some(out)) if out.is_empty() => Some(()),
                Ok(None) => Some(()),
                _ => None,
            }
        },
    )
    .await;
    let _ = stream.write_all(&body.as_bytes()[split..]).await;
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Polls `probe` until it returns `Some`, or panics after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A metric's value in the exposition of the service at `addr`, by exact series text
/// (name{labels}).
pub async fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let text = get(addr, "/metrics").await.body;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

/// The resident memory of process `pid` in KiB (0 when it cannot be read).
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A free loopback port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The service binary, started with extra environment.
pub struct Service {
    child: Child,
    pub addr: SocketAddr,
    logs: mpsc::Receiver<String>,
    /// Every log line read so far (start-up included).
    seen: Vec<String>,
}

impl Service {
    pub fn start(env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_iot-processor"));
        cmd.env_clear()
            .env("LISTEN_ADDR", "127.0.0.1:0")
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env("SHUTDOWN_TIMEOUT", "10s")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start iot-processor");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        // SERVICE_LOG_DIR=dir: every line also goes to dir/<pid>.log, to read after a failure.
        let mut copy = std::env::var_os("SERVICE_LOG_DIR").and_then(|dir| {
            std::fs::create_dir_all(&dir).ok()?;
            let path = std::path::Path::new(&dir).join(format!("{}.log", child.id()));
            eprintln!("service {} logs to {}", child.id(), path.display());
            std::fs::File::create(path).ok()
        });
        std::thread::spawn(move || {
            use std::io::Write;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(f) = copy.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if tx.send(line).is_err() && copy.is_none() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        let addr = loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("service logs 'listening' within 20s");
            let parsed = serde_json::from_str::<Value>(&line).ok();
            seen.push(line);
            if let Some(v) = parsed {
                if v["message"] == "listening" {
                    break v["addr"]
                        .as_str()
                        .expect("addr")
                        .parse()
                        .expect("socket addr");
                }
            }
        };
        Self {
            child,
            addr,
            logs: rx,
            seen,
        }
    }

    /// Waits up to `within` for a log line (JSON) that `matches`; returns it.
    pub fn wait_log(
        &mut self,
        within: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Option<Value> {
        let find = |lines: &[String]| {
            lines
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .find(|v| matches(v))
        };
        if let Some(v) = find(&self.seen) {
            return Some(v);
        }
        let deadline = Instant::now() + within;
        while let Ok(line) = self
            .logs
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
            if let Some(v) = find(&self.seen[self.seen.len() - 1..]) {
                return Some(v);
            }
        }
        None
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit code.
    pub fn terminate(mut self) -> (i32, Vec<String>) {
        let pid = self.child.id().to_string();
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "service did not exit within 30s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        // Every line the process wrote: read until its stderr closes (the reader thread
        // then drops the sender), not just what happened to be read already.
        let mut logs = std::mem::take(&mut self.seen);
        while let Ok(line) = self.logs.recv_timeout(Duration::from_secs(10)) {
            logs.push(line);
        }
        (status.code().unwrap_or(-1), logs)
    }

    /// A metric's value in the exposition, by exact series text (name{labels}).
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric(self.addr, series).await
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real redis-server on a free port, without persistence.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    pub fn start_on(port: u16) -> Self {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        let redis = Self {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis.cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs one command with redis-cli; `None` when the server does not answer.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: a Redis that accepts connections
    /// but never answers.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("kill");
        }
    }

    /// Stops the server (SIGKILL: an outage, not a graceful stop).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Calls of one command since start, from INFO commandstats.
    pub fn command_calls(&self, command: &str) -> u64 {
        let info = self.cli(&["INFO", "commandstats"]).unwrap_or_default();
        let prefix = format!("cmdstat_{command}:calls=");
        info.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|rest| rest.split(',').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Connections accepted since start (INFO stats), this query's own included.
    pub fn connections_received(&self) -> u64 {
        let info = self.cli(&["INFO", "stats"]).unwrap_or_default();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
