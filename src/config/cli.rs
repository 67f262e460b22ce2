//! The clap [`Config`]: every setting as a flag and an environment variable, its default
//! and its documentation (`--help`), the `token add` command, and the parsers that check
//! single values.

use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A feature that is on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    /// On.
    On,
    /// Off.
    Off,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// iot-stream-processor: per-device rolling-window anomaly detection over HTTP.
///
/// Without a command: runs the service with the settings below. `token add` creates a
/// client token for AUTH_TOKENS_FILE.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "iot-processor",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Config {
    /// Address the HTTP server listens on.
    #[arg(long, env = "LISTEN_ADDR", default_value = "0.0.0.0:8080")]
    pub listen_addr: SocketAddr,

    /// Redis URL (redis://[:password@]host:port/db, or rediss:// for TLS). Unset: the
    /// embedded in-process store.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// PEM file of the CA(s) that signed the Redis server's certificate (rediss:// only);
    /// replaces the built-in public roots. Read at start-up.
    #[arg(long, env = "REDIS_CA_FILE")]
    pub redis_ca_file: Option<PathBuf>,

    /// PEM file of the client certificate (chain) for mutual TLS (rediss:// only; with
    /// REDIS_CLIENT_KEY_FILE). Read at start-up.
    #[arg(long, env = "REDIS_CLIENT_CERT_FILE")]
    pub redis_client_cert_file: Option<PathBuf>,

    /// PEM file of the client certificate's private key (with REDIS_CLIENT_CERT_FILE).
    /// Read at start-up.
    #[arg(long, env = "REDIS_CLIENT_KEY_FILE")]
    pub redis_client_key_file: Option<PathBuf>,

    /// Pooled Redis connections (each is multiplexed).
    #[arg(long, env = "REDIS_POOL_SIZE", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub redis_pool_size: u32,

    /// Expiry of every stored analysis and window (at least 1s).
    #[arg(long, env = "RESULT_TTL", default_value = "5m", value_parser = parse_ttl)]
    pub result_ttl: Duration,

    /// Events per device in the rolling window.
    #[arg(long, env = "WINDOW_SIZE", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub window_size: u32,

    /// An event is anomalous when its z-score is strictly above this.
    #[arg(long, env = "ANOMALY_THRESHOLD", default_value = "2.0", value_parser = parse_threshold)]
    pub anomaly_threshold: f64,

    /// How often the newest results are written to the store.
    #[arg(long, env = "FLUSH_INTERVAL", default_value = "5ms", value_parser = parse_positive_duration)]
    pub flush_interval: Duration,

    /// A device actor without events for this long stops and frees its memory.
    #[arg(long, env = "DEVICE_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_positive_duration)]
    pub device_idle_timeout: Duration,

    /// Accepted but unprocessed events; beyond it POST /metric answers 503.
    #[arg(long, env = "MAX_PENDING_EVENTS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    pub max_pending_events: u64,

    /// Largest accepted request body, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(64..=16_777_216))]
    pub max_body_bytes: u64,

    /// Most events in one POST /metric/batch; more get 413.
    #[arg(long, env = "MAX_BATCH_EVENTS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_batch_events: u64,

    /// Largest POST /metric/batch body in bytes, after gzip decompression; more get 413.
    #[arg(long, env = "MAX_BATCH_BYTES", default_value_t = 8_388_608, value_parser = clap::value_parser!(u64).range(64..=268_435_456))]
    pub max_batch_bytes: u64,

    /// How often, at most, a device's window is written to the store (also on idle
    /// eviction, handoff and shutdown); 0 writes it with every result.
    #[arg(long, env = "WINDOW_CHECKPOINT_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub window_checkpoint_interval: Duration,

    /// Signals whose anomalies are counted in anomalies_detected_total and appended to
    /// the anomalies stream: rps, cpu, or both (comma-separated). /analyze reports both.
    #[arg(long, env = "ANOMALY_SIGNALS", default_value = "rps", value_delimiter = ',', value_parser = parse_signal)]
    pub anomaly_signals: Vec<actors::analytics::Signal>,

    /// Approximate length of the anomalies stream (XADD MAXLEN ~), and the bound on
    /// anomalies waiting for it during a store outage; 0 turns the stream off.
    #[arg(long, env = "ANOMALY_STREAM_MAXLEN", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(0..=100_000_000))]
    pub anomaly_stream_maxlen: u64,

    /// The ingest log (with REDIS_URL, on a single node): every accepted event is
    /// appended to a Redis stream before it is answered, so a crash loses nothing
    /// answered 200; while Redis is unreachable, events are refused (503). `off`: events
    /// are accepted during an outage, and a crash loses up to WINDOW_CHECKPOINT_INTERVAL
    /// of them.
    #[arg(long, env = "INGEST_LOG", value_enum, default_value_t = Switch::On)]
    pub ingest_log: Switch,

    /// The ingest log's Redis stream.
    #[arg(long, env = "INGEST_LOG_KEY", default_value = "ingest-log", value_parser = parse_key)]
    pub ingest_log_key: String,

    /// Entries the ingest log keeps at most (XADD MAXLEN ~): a bound for when checkpoints
    /// stall; dropping entries that checkpoints do not cover yet is counted
    /// (ingest_log_overruns_total) and alerted on.
    #[arg(long, env = "INGEST_LOG_MAXLEN", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1_000..=100_000_000))]
    pub ingest_log_maxlen: u64,

    /// Open GET /anomalies/stream connections at most; beyond it 503.
    #[arg(long, env = "MAX_STREAM_CLIENTS", default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub max_stream_clients: u32,

    /// How often an idle GET /anomalies/stream connection gets a comment line (keeps
    /// proxies from closing it).
    #[arg(long, env = "STREAM_HEARTBEAT_INTERVAL", default_value = "15s", value_parser = parse_positive_duration)]
    pub stream_heartbeat_interval: Duration,

    /// Distinct device_id label values of anomalies_detected_total; more count as __other__.
    #[arg(long, env = "MAX_DEVICE_LABELS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub max_device_labels: u64,

    /// Longest time from the first byte of a request (or from accepting a connection)
    /// to its complete headers; slower clients are disconnected.
    #[arg(long, env = "HEADER_READ_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub header_read_timeout: Duration,

    /// Longest time to receive a request body once the headers are in; then 408.
    #[arg(long, env = "BODY_READ_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub body_read_timeout: Duration,

    /// An idle keep-alive connection is closed after this long without a request.
    #[arg(long, env = "KEEP_ALIVE_TIMEOUT", default_value = "60s", value_parser = parse_positive_duration)]
    pub keep_alive_timeout: Duration,

    /// Open client connections at most; beyond it new ones get 503 and are closed.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_connections: u32,

    /// Longest graceful shutdown after SIGTERM or SIGINT.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "25s", value_parser = parse_positive_duration)]
    pub shutdown_timeout: Duration,

    /// Client tokens: one line per client, `<name> <sha256 hex> <prefix or *> <rw|w|r>`
    /// (`iot-processor token add` prints one). Unset: the API is open.
    #[arg(long, env = "AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<std::path::PathBuf>,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Deprecated and ignored: members find each other through the table in Redis.
    /// Accepted (with a warning at start-up) so that existing deployments keep starting.
    #[arg(long, env = "CLUSTER_PEERS", value_delimiter = ',')]
    pub cluster_peers: Vec<String>,

    /// This node's internal address as its peers reach it (in Kubernetes the pod IP and
    /// the internal port). Setting it makes the node a cluster member (with REDIS_URL and
    /// CLUSTER_TOKEN); at start-up the node checks that the address reaches itself.
    #[arg(long, env = "CLUSTER_ADVERTISE_ADDR")]
    pub cluster_advertise_addr: Option<SocketAddr>,

    /// Address of the internal listener (forwarded events); never behind the public
    /// Service or Ingress.
    #[arg(long, env = "CLUSTER_LISTEN_ADDR", default_value = "0.0.0.0:8081")]
    pub cluster_listen_addr: SocketAddr,

    /// Shared secret every internal request carries (a Kubernetes Secret).
    #[arg(long, env = "CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,

    /// Shards the devices are spread over; the same on every node of a cluster for its
    /// whole life (recorded in Redis; a node with another count refuses to start).
    #[arg(long, env = "CLUSTER_SHARDS", default_value = "256", value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub cluster_shards: u32,

    /// How often a node renews its heartbeat in Redis, reads the table and moves shards.
    #[arg(long, env = "CLUSTER_HEARTBEAT_INTERVAL", default_value = "500ms", value_parser = parse_positive_duration)]
    pub cluster_heartbeat_interval: Duration,

    /// How long a heartbeat lasts: a node that has not renewed it for this long is dead
    /// and its shards are taken over (from their stored windows); it stops admitting
    /// events itself one heartbeat interval earlier. At least 3 heartbeat intervals.
    #[arg(long, env = "CLUSTER_LEASE", default_value = "2s", value_parser = parse_positive_duration)]
    pub cluster_lease: Duration,

    /// Deprecated and ignored (membership comes from the heartbeats in Redis).
    #[arg(long, env = "CLUSTER_DISCOVERY_INTERVAL", value_parser = parse_positive_duration)]
    pub cluster_discovery_interval: Option<Duration>,

    /// Longest wait for a peer's answer to a forwarded batch before it is sent again (to
    /// the same owner while the table names it).
    #[arg(long, env = "CLUSTER_FORWARD_TIMEOUT", default_value = "1s", value_parser = parse_positive_duration)]
    pub cluster_forward_timeout: Duration,

    /// A command to run instead of the service (none: run the service).
    #[command(subcommand)]
    pub subcommand: Option<Command>,
}

/// What `iot-processor` can do besides running the service.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Client tokens for AUTH_TOKENS_FILE.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `iot-processor token …`.
#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum TokenCommand {
    /// Creates a client token and prints it with its line for AUTH_TOKENS_FILE.
    ///
    /// Prints four lines: a heading, the token (shown once; the client sends it as
    /// 'Authorization: Bearer <token>'), a heading, and the line to append to
    /// AUTH_TOKENS_FILE, which holds only the token's digest. Exits 2 on an invalid
    /// argument.
    Add {
        /// The client's name, in the file and in the logs (no spaces or '#').
        name: String,
        /// Device-id prefix the client may touch, or '*' for any device.
        prefix: String,
        /// rw, w (post events) or r (read analyses and the anomaly stream).
        mode: String,
    },
}

pub(super) fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 250ms, 5s, 10m)"))
}

fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(d)
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_positive_duration(s)?;
    if d < Duration::from_secs(1) {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

fn parse_key(s: &str) -> Result<String, String> {
    if s.is_empty() || s.len() > 256 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("a Redis key of 1 to 256 characters without spaces".into());
    }
    Ok(s.to_string())
}

fn parse_signal(s: &str) -> Result<actors::analytics::Signal, String> {
    actors::analytics::Signal::parse(s.trim())
        .ok_or_else(|| format!("unknown signal '{s}' (expected rps, cpu or rps,cpu)"))
}

fn parse_threshold(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if !v.is_finite() || v < 0.0 {
        return Err("must be a finite number ≥ 0".into());
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::super::parse;
    use super::*;

    #[test]
    fn defaults_match_the_spec() {
        let c = parse(&[]).expect("defaults parse");
        assert_eq!(c.listen_addr, "0.0.0.0:8080".parse().expect("addr"));
        assert_eq!(c.result_ttl, Duration::from_secs(300));
        assert_eq!(c.window_size, 50);
        assert_eq!(c.anomaly_threshold, 2.0);
        assert_eq!(c.flush_interval, Duration::from_millis(5));
        assert_eq!(c.device_idle_timeout, Duration::from_secs(600));
        assert_eq!(c.max_pending_events, 100_000);
        assert_eq!(c.max_body_bytes, 65_536);
        assert_eq!(c.max_device_labels, 10_000);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(25));
        assert_eq!(c.log_format, LogFormat::Text);
        assert_eq!(c.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.body_read_timeout, Duration::from_secs(10));
        assert_eq!(c.keep_alive_timeout, Duration::from_secs(60));
        assert_eq!(c.max_connections, 10_000);
        assert_eq!(c.max_batch_events, 10_000);
        assert_eq!(c.max_batch_bytes, 8 << 20);
        assert_eq!(c.window_checkpoint_interval, Duration::from_secs(1));
        assert!(c.redis_url.is_none());
        assert!(c.check().expect("single node").is_none());
        assert_eq!(c.cluster_listen_addr, "0.0.0.0:8081".parse().expect("addr"));
        assert_eq!(c.cluster_discovery_interval, None);
        assert_eq!(c.cluster_forward_timeout, Duration::from_secs(1));
        assert_eq!(c.cluster_shards, 256);
        assert_eq!(c.cluster_heartbeat_interval, Duration::from_millis(500));
        assert_eq!(c.cluster_lease, Duration::from_secs(2));
        assert!(c.deprecated().is_empty());
        assert_eq!(c.subcommand, None);
    }

    #[test]
    fn token_add_is_a_subcommand_that_takes_no_setting() {
        let c = parse(&["token", "add", "gw", "*", "rw"]).expect("parses");
        assert_eq!(
            c.subcommand,
            Some(Command::Token(TokenCommand::Add {
                name: "gw".into(),
                prefix: "*".into(),
                mode: "rw".into(),
            }))
        );
        let err = parse(&["--window-size", "3", "token", "add", "gw", "*", "rw"])
            .expect_err("settings do not apply to a command");
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
    }

    /// Every setting (its environment variable) with its flag and clap default.
    fn settings() -> Vec<(String, String, Option<String>)> {
        use clap::CommandFactory;
        Config::command()
            .get_arguments()
            .filter_map(|a| {
                let env = a.get_env()?.to_str()?.to_string();
                let flag = format!("--{}", a.get_long()?);
                let default = a
                    .get_default_values()
                    .first()
                    .and_then(|d| d.to_str())
                    .map(String::from);
                Some((env, flag, default))
            })
            .collect()
    }

    #[test]
    fn every_setting_is_in_the_documented_table_and_the_deployment() {
        let root = env!("CARGO_MANIFEST_DIR");
        let read = |p: &str| std::fs::read_to_string(format!("{root}/{p}")).expect(p);
        let table = read("docs/configuration.md");
        let configmap = read("manifests/configmap.yaml");
        let deployment = read("manifests/app.yaml");
        let settings = settings();
        assert!(settings.len() >= 17, "clap lost the settings: {settings:?}");
        for (env, flag, default) in settings {
            let row = table
                .lines()
                .find(|l| l.starts_with(&format!("| `{env}` | `{flag}` |")))
                .unwrap_or_else(|| {
                    panic!("the table of docs/configuration.md lacks {env} ({flag})")
                });
            if let Some(default) = default {
                assert!(
                    row.contains(&format!("| `{default}` |")),
                    "docs/configuration.md gives another default for {env} than {default}: {row}"
                );
            }
            // Set in the ConfigMap or the Deployment, or, for an optional setting that only
            // some deployments use (the Redis TLS files: they need a mounted Secret), a
            // commented entry in the ConfigMap that shows how.
            assert!(
                configmap.contains(&format!("\n  {env}: "))
                    || configmap.contains(&format!("\n  # {env}: "))
                    || deployment.contains(&format!("- name: {env}\n")),
                "{env} is neither in manifests/configmap.yaml (set or commented) nor set in manifests/app.yaml"
            );
        }
    }

    #[test]
    fn invalid_values_name_the_setting() {
        for (args, name) in [
            (&["--result-ttl", "500ms"][..], "--result-ttl"),
            (&["--window-size", "0"][..], "--window-size"),
            (&["--anomaly-threshold=-1"][..], "--anomaly-threshold"),
            (&["--flush-interval", "soon"][..], "--flush-interval"),
            (&["--log-format", "xml"][..], "--log-format"),
        ] {
            let err = parse(args).expect_err("must be rejected").to_string();
            assert!(err.contains(name), "{err}");
        }
        // The bounds themselves are valid.
        let edge = parse(&["--result-ttl", "1s", "--anomaly-threshold", "0"]).expect("valid");
        assert_eq!(edge.result_ttl, Duration::from_secs(1));
        assert_eq!(edge.anomaly_threshold, 0.0);
        for url in ["http://user:secret@host/", "secret@host:6379"] {
            let err = parse(&["--redis-url", url])
                .expect("clap takes any string")
                .check()
                .expect_err("must be rejected")
                .to_string();
            assert!(
                err.contains("REDIS_URL") && err.contains("redis://"),
                "{err}"
            );
            assert!(
                !err.contains("secret"),
                "a password in REDIS_URL is never echoed: {err}"
            );
        }
        for url in [
            "redis://:secret@host:6379/0",
            "rediss://:secret@host:6380/0",
        ] {
            let ok = parse(&["--redis-url", url]).expect("parses");
            assert!(ok.check().expect("valid").is_none());
        }
    }
}
