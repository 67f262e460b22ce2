//! The multi-host tier's network: replicas in their own network namespaces on one
//! machine, as pods on separate hosts.
//!
//! [`Net::new`] builds, for one test:
//! - a bridge in the root namespace with `10.77.S.1/24` (S picked per test among the
//!   /24s of 10.77.0.0/16 that no interface uses; the test's only traffic targets are
//!   these addresses and loopback);
//! - a `redis-server` bound to the bridge address, on a free port;
//! - one namespace per replica, its `eth0` a veth to the bridge with `10.77.S.(11+i)`.
//!
//! The replicas find each other through their heartbeats in that Redis, as pods do.
//!
//! Replicas are the real binary, started with `ip netns exec <ns>`; their JSON logs are
//! kept (files under `CARGO_TARGET_TMPDIR/multihost/`, kept when the test fails) for the
//! failure report. Everything is removed on drop, also when the test panics; leftovers of
//! a test process that was killed are removed by the next one (names carry the pid).

// Included by tests/multihost.rs (`#[path]`) next to `mod common`, whose client it uses.
#![allow(dead_code)]

use crate::common::cluster::WINDOW;
use crate::common::get;

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The shared secret of the test clusters.
pub const TOKEN: &str = "multihost-token";
/// Public and internal ports of every replica (each has its own address).
pub const PUBLIC_PORT: u16 = 8080;
pub const INTERNAL_PORT: u16 = 8081;
/// Where leftovers of earlier test processes are recorded (child pids per network).
const STATE_DIR: &str = "/tmp/iot-multihost";
/// Prefix of every interface and namespace name (then the test pid, `x`, a counter).
const PREFIX: &str = "mh";

/// Runs a command to completion; `Err` with its stderr when it fails.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Runs a command that must succeed (setup after the preflight passed).
fn must(program: &str, args: &[&str]) -> String {
    run(program, args).unwrap_or_else(|e| panic!("{e}"))
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Why this machine cannot run the tier (`Err`), checked before anything is created:
/// root, `ip` with namespaces and bridges, `redis-server`.
pub fn preflight() -> Result<(), String> {
    if !is_root() {
        return Err(
            "not running as root (network namespaces, veths and a bridge need CAP_NET_ADMIN)"
                .into(),
        );
    }
    run("ip", &["-V"]).map_err(|e| format!("no usable `ip` (iproute2): {e}"))?;
    run("redis-server", &["--version"]).map_err(|e| format!("no redis-server: {e}"))?;
    cleanup_leftovers();
    let probe = format!("{PREFIX}{}p", std::process::id());
    run("ip", &["netns", "add", &probe])
        .map_err(|e| format!("cannot create a network namespace: {e}"))?;
    let _ = run("ip", &["netns", "del", &probe]);
    run("ip", &["link", "add", &probe, "type", "bridge"])
        .map_err(|e| format!("cannot create a bridge: {e}"))?;
    let _ = run("ip", &["link", "del", &probe]);
    Ok(())
}

/// The test pid in one of our names (`mh<pid>x…` or `mh<pid>p`), if it is one.
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let after = rest[digits.len()..].chars().next()?;
    (after == 'x' || after == 'p')
        .then(|| digits.parse().ok())
        .flatten()
}

/// Removes what test processes that no longer run left behind (they were killed before
/// their drop ran): their processes (by recorded pid, checked by name), namespaces,
/// interfaces and resolv.conf folders. Nothing of a live process is touched.
fn cleanup_leftovers() {
    if let Ok(entries) = fs::read_dir(STATE_DIR) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(owner) = owner_pid(&name) else {
                continue;
            };
            if alive(owner) {
                continue;
            }
            for line in fs::read_to_string(entry.path()).unwrap_or_default().lines() {
                let Some((pid, comm)) = line.split_once(' ') else {
                    continue;
                };
                let current = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if !current.is_empty() && current.trim() == comm {
                    let _ = run("kill", &["-KILL", pid]);
                }
            }
            let _ = fs::remove_file(entry.path());
        }
    }
    for ns in run("ip", &["netns", "list"]).unwrap_or_default().lines() {
        let ns = ns.split_whitespace().next().unwrap_or_default();
        if owner_pid(ns).is_some_and(|p| !alive(p)) {
            let _ = run("ip", &["netns", "del", ns]);
            let _ = fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
    }
    for line in run("ip", &["-o", "link", "show"])
        .unwrap_or_default()
        .lines()
    {
        // "7: mh123x0br: <…" or "8: mh123x0v1@if2: <…"
        let Some(name) = line.split(':').nth(1) else {
            continue;
        };
        let name = name.trim().split('@').next().unwrap_or_default();
        if owner_pid(name).is_some_and(|p| !alive(p)) {
            let _ = run("ip", &["link", "del", name]);
        }
    }
    if let Ok(entries) = fs::read_dir("/etc/netns") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owner_pid(&name).is_some_and(|p| !alive(p)) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// A third octet S such that no route of this machine covers 10.77.S.0/24.
fn free_subnet() -> u8 {
    let routes = must("ip", &["-4", "route", "show", "table", "all"]);
    let addrs = must("ip", &["-4", "-o", "addr", "show"]);
    // A wider route (10.0.0.0/8 via some gateway) does not matter: the bridge's /24 is
    // more specific, so the test's traffic stays on the bridge.
    let used = |s: u8| {
        let net = format!("10.77.{s}.");
        routes.contains(&net) || addrs.contains(&net)
    };
    let start = (std::process::id() % 200) as u8 + 20;
    (0..=255u8)
        .map(|k| start.wrapping_add(k))
        .find(|s| (1..=254).contains(s) && !used(*s))
        .expect("a free /24 in 10.77.0.0/16")
}

/// One replica process (the service binary in its namespace).
struct Replica {
    child: Child,
}

/// A stored log line stream (kept after the replica stopped).
type Logs = Arc<Mutex<Vec<String>>>;

/// Collects a child's stderr into `logs` and `file`; the first line matching `ready`
/// is also sent on the returned channel.
fn collect(
    stderr: impl std::io::Read + Send + 'static,
    logs: Logs,
    file: PathBuf,
) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)
            .ok();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(out) = out.as_mut() {
                let _ = writeln!(out, "{line}");
            }
            logs.lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(line.clone());
            let _ = tx.send(line);
        }
    });
    rx
}

/// The network, the store, the DNS and the replicas of one test.
pub struct Net {
    tag: String,
    subnet: u8,
    size: usize,
    bridge: String,
    log_dir: PathBuf,
    state_file: PathBuf,
    redis: Option<Child>,
    redis_port: u16,
    replicas: Vec<Option<Replica>>,
    /// Every replica process's logs, in start order: (name, lines).
    logs: Vec<(String, Logs)>,
    started: Instant,
    created_ns: Vec<String>,
    bridge_created: bool,
    /// With MULTIHOST_PCAP set: tcpdump of the internal port in each namespace.
    captures: Vec<Child>,
}

static NETS: AtomicUsize = AtomicUsize::new(0);

impl Net {
    /// Builds the network for `size` replicas (none running, nobody in DNS). Call
    /// [`preflight`] first: from here on every failure panics.
    pub fn new(test: &str, size: usize) -> Net {
        assert!((1..=20).contains(&size));
        let tag = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            NETS.fetch_add(1, Ordering::Relaxed)
        );
        let log_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join("multihost")
            .join(format!("{test}-{tag}"));
        fs::create_dir_all(&log_dir).expect("log dir");
        fs::create_dir_all(STATE_DIR).expect("state dir");
        let subnet = free_subnet();
        let mut net = Net {
            bridge: format!("{tag}br"),
            state_file: Path::new(STATE_DIR).join(&tag),
            tag,
            subnet,
            size,
            log_dir,
            redis: None,
            redis_port: 0,
            replicas: (0..size).map(|_| None).collect(),
            logs: Vec::new(),
            started: Instant::now(),
            created_ns: Vec::new(),
            bridge_created: false,
            captures: Vec::new(),
        };
        net.build();
        if std::env::var_os("MULTIHOST_PCAP").is_some() {
            net.capture();
        }
        net
    }

    fn build(&mut self) {
        let gw = self.gateway().to_string();
        let br = self.bridge.clone();
        must("ip", &["link", "add", &br, "type", "bridge"]);
        self.bridge_created = true;
        must("ip", &["addr", "add", &format!("{gw}/24"), "dev", &br]);
        must("ip", &["link", "set", &br, "up"]);
        for i in 0..self.size {
            let ns = self.ns(i);
            must("ip", &["netns", "add", &ns]);
            self.created_ns.push(ns.clone());
            let veth = self.veth(i);
            must(
                "ip",
                &[
                    "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            );
            must("ip", &["link", "set", &veth, "master", &br, "up"]);
            let ip = format!("{}/24", self.ip(i));
            must("ip", &["-n", &ns, "addr", "add", &ip, "dev", "eth0"]);
            must("ip", &["-n", &ns, "link", "set", "eth0", "up"]);
            must("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        }
        self.start_redis();
    }

    /// Captures every replica's internal traffic (port 8081) into `<log dir>/<ns>.pcap`,
    /// for a failure that needs the wire (MULTIHOST_PCAP=1; needs tcpdump).
    fn capture(&mut self) {
        for i in 0..self.size {
            let ns = self.ns(i);
            let file = self.log_dir.join(format!("r{i}.pcap"));
            let port = INTERNAL_PORT.to_string();
            match Command::new("ip")
                .args([
                    "netns", "exec", &ns, "tcpdump", "-Z", "root", "-i", "eth0", "-U", "-s", "0",
                    "-w",
                ])
                .arg(&file)
                .args(["tcp", "port", &port])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(child) => {
                    self.record_child(child.id(), "tcpdump");
                    self.captures.push(child);
                }
                Err(e) => eprintln!("MULTIHOST_PCAP: cannot start tcpdump: {e}"),
            }
        }
        // tcpdump needs a moment before it sees packets.
        std::thread::sleep(Duration::from_millis(500));
    }

    fn record_child(&self, pid: u32, comm: &str) {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.state_file)
            .expect("state file");
        let _ = writeln!(f, "{pid} {comm}");
    }

    fn start_redis(&mut self) {
        let gw = self.gateway();
        // A free port on the bridge address (bound, then released).
        let port = std::net::TcpListener::bind((gw, 0))
            .and_then(|l| l.local_addr())
            .expect("free port on the bridge")
            .port();
        let log = fs::File::create(self.log_dir.join("redis.log")).expect("redis log");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                &gw.to_string(),
                "--protected-mode",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.record_child(child.id(), "redis-server");
        self.redis = Some(child);
        self.redis_port = port;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.redis_cli(&["PING"]).as_deref() != Some("PONG") {
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING on {gw}:{port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One redis-cli command against the test's Redis; `None` when it does not answer.
    pub fn redis_cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new("redis-cli")
            .args([
                "-h",
                &self.gateway().to_string(),
                "-p",
                &self.redis_port.to_string(),
            ])
            .args(args)
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).trim_end().to_string();
        (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
    }

    /// The bridge's address: Redis and DNS.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 1)
    }

    /// Replica `i`'s address.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, 11 + i as u8)
    }

    /// Replica `i`'s public address (the API), as the client reaches it over the bridge.
    pub fn public(&self, i: usize) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip(i), PUBLIC_PORT))
    }

    /// Replica `i`'s internal address (CLUSTER_ADVERTISE_ADDR).
    pub fn internal(&self, i: usize) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(self.ip(i), INTERNAL_PORT))
    }

    fn ns(&self, i: usize) -> String {
        format!("{}n{i}", self.tag)
    }

    /// The root-namespace end of replica `i`'s veth (the partition switch).
    fn veth(&self, i: usize) -> String {
        format!("{}v{i}", self.tag)
    }

    /// Seconds since the network was built (for the timeline the tests print).
    pub fn t(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Where the logs are.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// Starts replica `i` in its namespace and waits until it logs "listening".
    pub fn start(&mut self, i: usize) {
        assert!(self.replicas[i].is_none(), "replica {i} already runs");
        let generation = self
            .logs
            .iter()
            .filter(|(n, _)| n.starts_with(&format!("r{i}.")))
            .count();
        let name = format!("r{i}.{generation}");
        let ip = self.ip(i);
        let env: Vec<(&str, String)> = vec![
            ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin".into()),
            ("LISTEN_ADDR", self.public(i).to_string()),
            ("CLUSTER_LISTEN_ADDR", self.internal(i).to_string()),
            ("CLUSTER_ADVERTISE_ADDR", self.internal(i).to_string()),
            (
                "REDIS_URL",
                format!("redis://{}:{}/", self.gateway(), self.redis_port),
            ),
            ("CLUSTER_TOKEN", TOKEN.into()),
            ("WINDOW_SIZE", WINDOW.to_string()),
            // Every result carries its window: these tests check that partitions, DNS
            // changes and restarts lose nothing at all. What a crash loses between
            // checkpoints is bounded by the loopback crash test.
            ("WINDOW_CHECKPOINT_INTERVAL", "0".into()),
            ("LOG_FORMAT", "json".into()),
            ("RUST_LOG", "info,actors::cluster=debug".into()),
            ("SHUTDOWN_TIMEOUT", "10s".into()),
            ("MAX_DEVICE_LABELS", "100000".into()),
        ];
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(i),
                env!("CARGO_BIN_EXE_iot-processor"),
            ])
            .env_clear()
            .envs(env)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ip netns exec iot-processor");
        // `ip netns exec` execs the command in place: the child is the service itself.
        self.record_child(child.id(), "iot-processor");
        let logs: Logs = Arc::default();
        let file = self.log_dir.join(format!("{name}.log"));
        let rx = collect(
            child.stderr.take().expect("stderr"),
            logs.clone(),
            file.clone(),
        );
        self.logs.push((name.clone(), logs));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    if v["message"] == "listening" {
                        break;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().ok();
                    panic!(
                        "replica {name} ({ip}) exited before listening ({status:?}); log {}",
                        file.display()
                    );
                }
            }
            assert!(
                Instant::now() < deadline,
                "replica {name} not listening within 20s; log {}",
                file.display()
            );
        }
        eprintln!(
            "[{:6.2}s] started {name} at {ip} (pid {})",
            self.t(),
            child.id()
        );
        self.replicas[i] = Some(Replica { child });
    }

    /// Whether replica `i` runs.
    pub fn running(&self, i: usize) -> bool {
        self.replicas[i].is_some()
    }

    /// The replicas that run.
    pub fn running_ids(&self) -> Vec<usize> {
        (0..self.size).filter(|&i| self.running(i)).collect()
    }

    /// SIGTERM to replica `i`; waits (at most 40 s) and answers its exit code.
    pub async fn terminate(&mut self, i: usize) -> i32 {
        let mut replica = self.replicas[i].take().expect("replica runs");
        let pid = replica.child.id().to_string();
        must("kill", &["-TERM", &pid]);
        eprintln!("[{:6.2}s] SIGTERM to replica {i} (pid {pid})", self.t());
        let deadline = Instant::now() + Duration::from_secs(40);
        let status = loop {
            if let Some(status) = replica.child.try_wait().expect("wait") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "replica {i} did not exit within 40s of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        eprintln!("[{:6.2}s] replica {i} exited: {status}", self.t());
        status.code().unwrap_or(-1)
    }

    /// Takes replica `i`'s link down (cut off from everything) or up again.
    pub fn link(&self, i: usize, up: bool) {
        let state = if up { "up" } else { "down" };
        must("ip", &["link", "set", &self.veth(i), state]);
        eprintln!("[{:6.2}s] link of replica {i} {state}", self.t());
    }

    /// Waits (at most `within`) until each of `nodes` answers its own `/ready` with 200
    /// (what a Kubernetes Service waits for before it sends a pod traffic; nothing waits
    /// for the other nodes' views); answers how long it took.
    pub async fn ready(&self, nodes: &[usize], within: Duration) -> Duration {
        let began = Instant::now();
        for &i in nodes {
            let addr = self.public(i);
            loop {
                let ready = tokio::time::timeout(Duration::from_secs(2), get(addr, "/ready"))
                    .await
                    .map(|r| r.status == 200)
                    .unwrap_or(false);
                if ready {
                    break;
                }
                if began.elapsed() > within {
                    self.dump(&["WARN", "ERROR"], 60);
                    panic!("replica {i} not ready within {within:?}");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let took = began.elapsed();
        eprintln!("[{:6.2}s] replicas {nodes:?} ready ({took:.2?})", self.t());
        took
    }

    /// Prints, per replica process, the log lines containing any of `needles` (at most
    /// `max` per process) and where the full logs are.
    pub fn dump(&self, needles: &[&str], max: usize) {
        eprintln!(
            "---- replica logs matching {needles:?} (full logs in {})",
            self.log_dir.display()
        );
        for (name, logs) in &self.logs {
            let logs = logs.lock().unwrap_or_else(|e| e.into_inner());
            let hits: Vec<&String> = logs
                .iter()
                .filter(|l| needles.iter().any(|n| l.contains(n)))
                .collect();
            eprintln!("-- {name}: {} of {} lines match", hits.len(), logs.len());
            for line in hits.iter().rev().take(max).rev() {
                eprintln!("{line}");
            }
        }
    }

    /// Metrics of every running replica that say what the cluster went through.
    pub async fn report(&self) {
        for i in self.running_ids() {
            let addr = self.public(i);
            let mut parts = Vec::new();
            for series in [
                "cluster_members",
                "events_accepted_total",
                "events_processed_total",
                "events_forwarded_total",
                "forwarded_events_received_total",
                "events_duplicate_total",
                "forward_failures_total{reason=\"timeout\"}",
                "forward_failures_total{reason=\"unreachable\"}",
                "forward_failures_total{reason=\"rejected\"}",
                "shard_handoffs_total{direction=\"in\"}",
                "shard_handoffs_total{direction=\"out\"}",
                "cluster_shards_owned",
                "window_restore_failures_total",
            ] {
                if let Some(v) = metric(addr, series).await {
                    parts.push(format!("{series}={v}"));
                }
            }
            eprintln!("replica {i}: {}", parts.join(" "));
        }
    }
}

/// A metric's value in a replica's exposition, by exact series text (name{labels}).
pub async fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let text = tokio::time::timeout(Duration::from_secs(2), get(addr, "/metrics"))
        .await
        .ok()?
        .body;
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|v| v.trim().parse().ok())
}

impl Drop for Net {
    fn drop(&mut self) {
        for replica in self.replicas.iter_mut().filter_map(Option::take) {
            let mut child = replica.child;
            let _ = child.kill();
            let _ = child.wait();
        }
        for mut child in self.captures.drain(..) {
            // SIGINT: tcpdump flushes its file and exits.
            let _ = run("kill", &["-INT", &child.id().to_string()]);
            let _ = child.wait();
        }
        for child in [self.redis.take()].into_iter().flatten() {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deleting a namespace deletes its end of the veth, and with it the other end.
        for ns in &self.created_ns {
            let _ = run("ip", &["netns", "del", ns]);
            let _ = fs::remove_dir_all(format!("/etc/netns/{ns}"));
        }
        for i in 0..self.size {
            let _ = run("ip", &["link", "del", &self.veth(i)]);
        }
        if self.bridge_created {
            let _ = run("ip", &["link", "del", &self.bridge]);
        }
        let _ = fs::remove_file(&self.state_file);
        // Only when empty: other users' namespaces or runs may have entries there.
        let _ = fs::remove_dir("/etc/netns");
        let _ = fs::remove_dir(STATE_DIR);
        if std::thread::panicking() || std::env::var_os("MULTIHOST_KEEP_LOGS").is_some() {
            eprintln!("multi-host logs kept in {}", self.log_dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.log_dir);
        }
    }
}
