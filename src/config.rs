//! Every setting of the service: its flag, environment variable, default and meaning.
//!
//! Parsed once at start-up; an invalid value stops start-up (exit 2) with a message naming
//! the setting as it was given: its environment variable, or its flag. Library code never
//! reads the environment.

use actors::store::{ClientIdentity, RedisTls, TlsError};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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

/// A setting, or a combination of settings, that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not a Redis URL this build can use (checked here rather than by clap, whose
    /// message would echo the value and with it the password).
    #[error(
        "invalid value for REDIS_URL (--redis-url): expected redis://[:password@]host:port/db or rediss://…{0}"
    )]
    RedisUrl(&'static str),
    /// TLS files without TLS.
    #[error("{0} is set but REDIS_URL is not a rediss:// URL: the TLS files apply only to TLS connections to Redis; use rediss://… or unset {0}")]
    TlsWithoutRediss(&'static str),
    /// Mutual TLS needs both halves.
    #[error("{0} is set but {1} is not: mutual TLS to Redis needs both REDIS_CLIENT_CERT_FILE and REDIS_CLIENT_KEY_FILE")]
    HalfClientIdentity(&'static str, &'static str),
    /// A TLS file that cannot be read.
    #[error("{setting}: cannot read {}: {source}", path.display())]
    TlsFileUnreadable {
        /// The setting's environment variable.
        setting: &'static str,
        /// The path it gives.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A TLS file that does not hold what it should.
    #[error("{setting} ({}): {problem}", path.display())]
    TlsFileInvalid {
        /// The setting at fault.
        setting: &'static str,
        /// The path of the file at fault.
        path: PathBuf,
        /// What is wrong (never the file's content).
        problem: TlsError,
    },
    /// Clustering needs a shared store.
    #[error("CLUSTER_ADVERTISE_ADDR is set but REDIS_URL is not: a cluster needs Redis, which holds its ownership table and lets any replica answer /analyze; set REDIS_URL or unset CLUSTER_ADVERTISE_ADDR")]
    ClusterWithoutRedis,
    /// A clustered node must know itself.
    #[error("CLUSTER_PEERS is set but CLUSTER_ADVERTISE_ADDR is not: a cluster member is configured by CLUSTER_ADVERTISE_ADDR (in Kubernetes, $(POD_IP):8081), REDIS_URL and CLUSTER_TOKEN; CLUSTER_PEERS is no longer needed")]
    NoAdvertiseAddr,
    /// A lease must outlast several heartbeats.
    #[error("CLUSTER_LEASE ({lease:?}) must be at least 3 × CLUSTER_HEARTBEAT_INTERVAL ({heartbeat:?}): a node stops admitting one interval before its lease ends, and one late heartbeat must not cost it its shards")]
    LeaseTooShort {
        /// CLUSTER_LEASE.
        lease: Duration,
        /// CLUSTER_HEARTBEAT_INTERVAL.
        heartbeat: Duration,
    },
    /// A window must be checkpointed before its key expires and before its actor is
    /// evicted. Names first the setting that was changed (WINDOW_CHECKPOINT_INTERVAL
    /// unless it is at its default), then the one it conflicts with.
    #[error("{setting} ({}) must be {} {other} ({}): {why}", humantime::format_duration(*value), if *shorter { "shorter than" } else { "longer than" }, humantime::format_duration(*other_value))]
    CheckpointInterval {
        /// The setting at fault.
        setting: &'static str,
        /// Its value.
        value: Duration,
        /// Whether it must be shorter than the other (else longer).
        shorter: bool,
        /// The setting it conflicts with.
        other: &'static str,
        /// That one's value.
        other_value: Duration,
        /// What would go wrong.
        why: &'static str,
    },
    /// Internal requests must be authenticated.
    #[error("CLUSTER_ADVERTISE_ADDR is set but CLUSTER_TOKEN is not (or is empty): internal requests must carry a shared secret")]
    NoToken,
}

impl Config {
    /// Parses the command line and the environment (exiting 2 with a message naming the
    /// setting on an invalid value), and describes the effective settings for the
    /// start-up line.
    pub fn load() -> (Self, String) {
        let mut command = Self::command();
        // A command (`token add`) does not read the service's settings: an invalid one in
        // the environment must not stop it.
        if std::env::args_os()
            .nth(1)
            .is_some_and(|first| command.find_subcommand(&first).is_some())
        {
            command = command.mut_args(|a| a.env(None));
        }
        let matches = command
            .clone()
            .try_get_matches()
            .unwrap_or_else(|e| exit(&command, std::env::args_os(), e));
        let config = Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        (config, effective(&command, &matches))
    }

    /// Checks what clap cannot, and returns the cluster settings (`None` on a single
    /// node).
    pub fn check(&self) -> Result<Option<actors::cluster::ClusterConfig>, ConfigError> {
        if let Some(url) = &self.redis_url {
            match url.split_once("://").map(|(scheme, _)| scheme) {
                Some("redis" | "rediss" | "redis+unix" | "unix") => {}
                _ => return Err(ConfigError::RedisUrl("")),
            }
        }
        self.check_checkpoint_interval()?;
        let tls = self
            .redis_url
            .as_deref()
            .is_some_and(|u| u.starts_with("rediss://"));
        for (set, setting) in [
            (self.redis_ca_file.is_some(), REDIS_CA_FILE),
            (
                self.redis_client_cert_file.is_some(),
                REDIS_CLIENT_CERT_FILE,
            ),
            (self.redis_client_key_file.is_some(), REDIS_CLIENT_KEY_FILE),
        ] {
            if set && !tls {
                return Err(ConfigError::TlsWithoutRediss(setting));
            }
        }
        match (&self.redis_client_cert_file, &self.redis_client_key_file) {
            (Some(_), None) => {
                return Err(ConfigError::HalfClientIdentity(
                    REDIS_CLIENT_CERT_FILE,
                    REDIS_CLIENT_KEY_FILE,
                ))
            }
            (None, Some(_)) => {
                return Err(ConfigError::HalfClientIdentity(
                    REDIS_CLIENT_KEY_FILE,
                    REDIS_CLIENT_CERT_FILE,
                ))
            }
            _ => {}
        }
        let peers_set = self.cluster_peers.iter().any(|p| !p.trim().is_empty());
        let Some(advertise) = self.cluster_advertise_addr else {
            return if peers_set {
                Err(ConfigError::NoAdvertiseAddr)
            } else {
                Ok(None)
            };
        };
        if self.redis_url.is_none() {
            return Err(ConfigError::ClusterWithoutRedis);
        }
        if self.cluster_token.as_deref().is_none_or(str::is_empty) {
            return Err(ConfigError::NoToken);
        }
        let (lease, heartbeat) = (self.cluster_lease, self.cluster_heartbeat_interval);
        if lease < heartbeat * 3 {
            return Err(ConfigError::LeaseTooShort { lease, heartbeat });
        }
        Ok(Some(actors::cluster::ClusterConfig {
            advertise,
            shards: self.cluster_shards,
            heartbeat,
            lease,
            forward_timeout: self.cluster_forward_timeout,
        }))
    }

    /// WINDOW_CHECKPOINT_INTERVAL must be shorter than RESULT_TTL and DEVICE_IDLE_TIMEOUT.
    fn check_checkpoint_interval(&self) -> Result<(), ConfigError> {
        let interval = self.window_checkpoint_interval;
        let default_interval = Self::command()
            .get_arguments()
            .find(|a| a.get_id() == "window_checkpoint_interval")
            .and_then(|a| a.get_default_values().first()?.to_str().map(parse_duration))
            .and_then(Result::ok);
        // Blame the interval only when it was changed: otherwise the other setting was.
        let interval_changed = default_interval != Some(interval);
        for (other, other_value, why) in [
            (
                "RESULT_TTL",
                self.result_ttl,
                "a stored window would expire between checkpoints",
            ),
            (
                "DEVICE_IDLE_TIMEOUT",
                self.device_idle_timeout,
                "an idle actor would be evicted before its trailing checkpoint",
            ),
        ] {
            if interval < other_value {
                continue;
            }
            return Err(if interval_changed {
                ConfigError::CheckpointInterval {
                    setting: "WINDOW_CHECKPOINT_INTERVAL",
                    value: interval,
                    shorter: true,
                    other,
                    other_value,
                    why,
                }
            } else {
                ConfigError::CheckpointInterval {
                    setting: other,
                    value: other_value,
                    shorter: false,
                    other: "WINDOW_CHECKPOINT_INTERVAL",
                    other_value: interval,
                    why,
                }
            });
        }
        Ok(())
    }

    /// Settings that work but not as set, one warning line each for the start-up log:
    /// MAX_BATCH_EVENTS above MAX_PENDING_EVENTS is capped at it (a batch is admitted
    /// whole, so a larger one never would be).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.max_batch_events > self.max_pending_events {
            out.push(format!(
                "MAX_BATCH_EVENTS ({}) is above MAX_PENDING_EVENTS ({pending}): a batch is admitted whole, so batches hold at most {pending} events (more get 413)",
                self.max_batch_events,
                pending = self.max_pending_events,
            ));
        }
        out
    }

    /// Settings that are accepted but no longer do anything, for a warning at start-up.
    pub fn deprecated(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.cluster_peers.iter().any(|p| !p.trim().is_empty()) {
            out.push("CLUSTER_PEERS");
        }
        if self.cluster_discovery_interval.is_some() {
            out.push("CLUSTER_DISCOVERY_INTERVAL");
        }
        out
    }

    /// Reads and checks the TLS files of a `rediss://` connection (after [`Config::check`]);
    /// an error names the setting and the path, never the content.
    pub fn redis_tls(&self) -> Result<RedisTls, ConfigError> {
        let ca = read_tls_file(REDIS_CA_FILE, self.redis_ca_file.as_deref())?;
        let cert = read_tls_file(
            REDIS_CLIENT_CERT_FILE,
            self.redis_client_cert_file.as_deref(),
        )?;
        let key = read_tls_file(REDIS_CLIENT_KEY_FILE, self.redis_client_key_file.as_deref())?;
        let client = cert
            .zip(key)
            .map(|(cert_pem, key_pem)| ClientIdentity { cert_pem, key_pem });
        RedisTls::new(ca, client).map_err(|problem| {
            let (setting, path) = match problem {
                TlsError::Ca(_) => (REDIS_CA_FILE, &self.redis_ca_file),
                TlsError::ClientCert(_) => (REDIS_CLIENT_CERT_FILE, &self.redis_client_cert_file),
                TlsError::ClientKey(_) | TlsError::ClientPair(_) => {
                    (REDIS_CLIENT_KEY_FILE, &self.redis_client_key_file)
                }
            };
            ConfigError::TlsFileInvalid {
                setting,
                path: path.clone().unwrap_or_default(),
                problem,
            }
        })
    }
}

// The TLS settings as their messages name them (the `env` of their fields above).
const REDIS_CA_FILE: &str = "REDIS_CA_FILE";
const REDIS_CLIENT_CERT_FILE: &str = "REDIS_CLIENT_CERT_FILE";
const REDIS_CLIENT_KEY_FILE: &str = "REDIS_CLIENT_KEY_FILE";

/// A TLS file's content, when its setting is given.
fn read_tls_file(
    setting: &'static str,
    path: Option<&Path>,
) -> Result<Option<Vec<u8>>, ConfigError> {
    path.map(|path| {
        std::fs::read(path).map_err(|source| ConfigError::TlsFileUnreadable {
            setting,
            path: path.to_path_buf(),
            source,
        })
    })
    .transpose()
}

impl From<&Config> for actors::SystemConfig {
    fn from(c: &Config) -> Self {
        Self {
            window_size: c.window_size as usize,
            anomaly_threshold: c.anomaly_threshold,
            flush_interval: c.flush_interval,
            result_ttl: c.result_ttl,
            device_idle_timeout: c.device_idle_timeout,
            max_pending_events: c.max_pending_events as usize,
            max_device_labels: c.max_device_labels as usize,
            window_checkpoint_interval: c.window_checkpoint_interval,
            // In a fixed order, each once, however the setting listed them.
            anomaly_signals: actors::analytics::Signal::ALL
                .into_iter()
                .filter(|s| c.anomaly_signals.contains(s))
                .collect(),
            anomaly_stream_maxlen: c.anomaly_stream_maxlen as usize,
        }
    }
}

/// Exits with clap's error `e`, or, for an invalid value that came from an environment
/// variable, with one line naming the variable (clap names only the flag, which the user
/// never typed): `error: invalid value '0' for WINDOW_SIZE (--window-size): …`. Exit code 2
/// either way (0 for `--help` and `--version`).
fn exit<I, T>(command: &clap::Command, args: I, e: clap::Error) -> !
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    match from_environment(command, args, &e) {
        Some(message) => {
            eprintln!("error: {message}");
            std::process::exit(2)
        }
        None => e.exit(),
    }
}

/// The message for `e` naming the environment variable its value came from; `None` when
/// the value was given as a flag (or `e` is not about a value).
fn from_environment<I, T>(command: &clap::Command, args: I, e: &clap::Error) -> Option<String>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    use clap::parser::ValueSource;
    if !matches!(
        e.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return None;
    }
    let Some(ContextValue::String(shown)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    // Built, as clap's message shows it (an unbuilt argument cannot be displayed).
    let mut built = command.clone();
    built.build();
    let arg = built.get_arguments().find(|a| a.to_string() == *shown)?;
    let env = arg.get_env()?.to_string_lossy();
    // Where the value came from, by clap's own precedence (flag over variable): the same
    // command with every value taken as it is, so that nothing can fail to parse.
    let raw = built
        .clone()
        .mut_args(|a| a.value_parser(clap::builder::ValueParser::os_string()))
        .try_get_matches_from(args)
        .ok()?;
    if raw.value_source(arg.get_id().as_str()) != Some(ValueSource::EnvVariable) {
        return None;
    }
    let flag = arg
        .get_long()
        .map(|l| format!(" (--{l})"))
        .unwrap_or_default();
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) if !arg.is_hide_env_values_set() => format!(" '{v}'"),
        _ => String::new(),
    };
    let why = match (std::error::Error::source(e), e.get(ContextKind::ValidValue)) {
        (Some(source), _) => format!(": {source}"),
        (None, Some(ContextValue::Strings(valid))) => {
            format!(": expected one of {}", valid.join(", "))
        }
        _ => String::new(),
    };
    Some(format!("invalid value{value} for {env}{flag}{why}"))
}

/// Every setting as `ENV=value`, defaults included; secrets (the settings clap hides in
/// `--help`) show only that they are set, and a URL only its scheme and host.
fn effective(command: &clap::Command, matches: &clap::ArgMatches) -> String {
    command
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_string_lossy();
            let value = matches
                .get_raw(arg.get_id().as_str())?
                .map(|v| v.to_string_lossy())
                .collect::<Vec<_>>()
                .join(",");
            let shown = if !arg.is_hide_env_values_set() {
                value
            } else if let Some((scheme, rest)) = value.split_once("://") {
                let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                format!("{scheme}://***@{host}")
            } else {
                "<set>".to_string()
            };
            Some(format!("{env}={shown}"))
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn parse_duration(s: &str) -> Result<Duration, String> {
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
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("iot-processor").chain(args.iter().copied()))
    }

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

    #[test]
    fn a_cluster_needs_redis_an_address_and_a_token() {
        let member = ["--cluster-advertise-addr", "10.0.0.1:8081"];
        let err = |extra: &[&str]| {
            let args: Vec<&str> = member.iter().chain(extra).copied().collect();
            parse(&args)
                .expect("parses")
                .check()
                .expect_err("refused")
                .to_string()
        };
        assert!(err(&[]).contains("REDIS_URL"));
        assert!(err(&["--redis-url", "redis://r/"]).contains("CLUSTER_TOKEN"));
        let short = err(&[
            "--redis-url",
            "redis://r/",
            "--cluster-token",
            "t",
            "--cluster-lease",
            "1s",
        ]);
        assert!(
            short.contains("CLUSTER_LEASE") && short.contains("CLUSTER_HEARTBEAT_INTERVAL"),
            "{short}"
        );
        // The old way alone (peers without an address) names what a member needs now.
        let old = parse(&["--cluster-peers", "a:8081"])
            .expect("parses")
            .check()
            .expect_err("refused")
            .to_string();
        assert!(old.contains("CLUSTER_ADVERTISE_ADDR"), "{old}");
        let c = parse(&[
            "--cluster-peers",
            "a:8081, b:8081",
            "--cluster-discovery-interval",
            "2s",
            "--redis-url",
            "redis://r/",
            "--cluster-advertise-addr",
            "10.0.0.1:8081",
            "--cluster-token",
            "t",
        ])
        .expect("parses");
        let ok = c.check().expect("valid").expect("clustered");
        assert_eq!(ok.advertise, "10.0.0.1:8081".parse().expect("addr"));
        assert_eq!(ok.shards, 256);
        assert_eq!(
            c.deprecated(),
            vec!["CLUSTER_PEERS", "CLUSTER_DISCOVERY_INTERVAL"]
        );
    }

    #[test]
    fn the_start_up_line_shows_every_setting_but_no_secret() {
        let command = Config::command();
        let matches = command
            .clone()
            .try_get_matches_from([
                "iot-processor",
                "--redis-url",
                "redis://:hunter2@redis:6379/0",
                "--cluster-token",
                "tok3n",
                "--redis-ca-file",
                "/etc/redis-tls/ca.crt",
                "--redis-client-key-file",
                "/etc/redis-tls/tls.key",
            ])
            .expect("parses");
        let line = effective(&command, &matches);
        for shown in [
            "LISTEN_ADDR=0.0.0.0:8080",
            "WINDOW_SIZE=50",
            "REDIS_URL=redis://***@redis:6379/0",
            "CLUSTER_TOKEN=<set>",
            // Paths, not contents: where the TLS files are is what an operator checks.
            "REDIS_CA_FILE=/etc/redis-tls/ca.crt",
            "REDIS_CLIENT_KEY_FILE=/etc/redis-tls/tls.key",
        ] {
            assert!(line.contains(shown), "{shown} missing from {line}");
        }
        assert!(
            !line.contains("hunter2") && !line.contains("tok3n"),
            "{line}"
        );
    }

    #[test]
    fn the_defaults_reach_the_actor_system_unchanged() {
        let c = parse(&[]).expect("defaults parse");
        assert_eq!(
            actors::SystemConfig::from(&c),
            actors::SystemConfig::default()
        );
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
    fn a_batch_limit_above_the_pending_bound_is_warned_about_with_the_effective_value() {
        assert!(parse(&[]).expect("defaults").warnings().is_empty());
        let equal = ["--max-batch-events", "100", "--max-pending-events", "100"];
        assert!(parse(&equal).expect("valid").warnings().is_empty());
        let above = ["--max-batch-events", "200", "--max-pending-events", "100"];
        assert_eq!(
            parse(&above).expect("valid").warnings(),
            ["MAX_BATCH_EVENTS (200) is above MAX_PENDING_EVENTS (100): a batch is admitted whole, so batches hold at most 100 events (more get 413)"]
        );
    }

    #[test]
    fn a_checkpoint_interval_must_be_shorter_than_the_ttl_and_the_idle_timeout() {
        let check = |args: &[&str]| parse(args).expect("parses").check().map(|_| ());
        assert!(check(&["--window-checkpoint-interval", "0"]).is_ok());
        assert!(check(&["--window-checkpoint-interval", "4m"]).is_ok());
        for args in [
            &["--window-checkpoint-interval", "5m"][..],
            &[
                "--window-checkpoint-interval",
                "2s",
                "--device-idle-timeout",
                "2s",
            ][..],
        ] {
            let err = check(args).expect_err("refused").to_string();
            assert!(err.contains("WINDOW_CHECKPOINT_INTERVAL"), "{err}");
        }
        // The setting that was changed comes first, then the one it conflicts with.
        for (args, expected) in [
            (
                &["--window-checkpoint-interval", "5m"][..],
                "WINDOW_CHECKPOINT_INTERVAL (5m) must be shorter than RESULT_TTL (5m): ",
            ),
            (
                &["--device-idle-timeout", "1s"][..],
                "DEVICE_IDLE_TIMEOUT (1s) must be longer than WINDOW_CHECKPOINT_INTERVAL (1s): ",
            ),
            (
                &["--result-ttl", "1s"][..],
                "RESULT_TTL (1s) must be longer than WINDOW_CHECKPOINT_INTERVAL (1s): ",
            ),
            (
                &[
                    "--window-checkpoint-interval",
                    "3s",
                    "--device-idle-timeout",
                    "2s",
                ][..],
                "WINDOW_CHECKPOINT_INTERVAL (3s) must be shorter than DEVICE_IDLE_TIMEOUT (2s): ",
            ),
        ] {
            let err = check(args).expect_err("refused").to_string();
            assert!(err.starts_with(expected), "{err}");
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

    #[test]
    fn tls_files_need_rediss_and_a_client_identity_needs_both_halves() {
        let err = |args: &[&str]| {
            parse(args)
                .expect("parses")
                .check()
                .expect_err("refused")
                .to_string()
        };
        let ca = ["--redis-ca-file", "/ca.pem"];
        for url in [None, Some("redis://r:6379/")] {
            let mut args = ca.to_vec();
            args.extend(url.iter().flat_map(|u| ["--redis-url", u]));
            let e = err(&args);
            assert!(
                e.contains("REDIS_CA_FILE") && e.contains("rediss://"),
                "{e}"
            );
        }
        let e = err(&[
            "--redis-url",
            "rediss://r/",
            "--redis-client-cert-file",
            "/c.pem",
        ]);
        assert!(
            e.contains("REDIS_CLIENT_CERT_FILE is set but REDIS_CLIENT_KEY_FILE is not"),
            "{e}"
        );
        let e = err(&[
            "--redis-url",
            "rediss://r/",
            "--redis-client-key-file",
            "/k.pem",
        ]);
        assert!(
            e.contains("REDIS_CLIENT_KEY_FILE is set but REDIS_CLIENT_CERT_FILE is not"),
            "{e}"
        );
        let ok = parse(&[
            "--redis-url",
            "rediss://r/",
            "--redis-client-cert-file",
            "/c.pem",
            "--redis-client-key-file",
            "/k.pem",
        ])
        .expect("parses");
        assert!(ok.check().is_ok());
    }

    #[test]
    fn an_unreadable_or_wrong_tls_file_names_the_setting_and_the_path() {
        let missing = parse(&[
            "--redis-url",
            "rediss://r/",
            "--redis-ca-file",
            "/nonexistent/ca.pem",
        ])
        .expect("parses")
        .redis_tls()
        .expect_err("refused")
        .to_string();
        assert!(
            missing.starts_with("REDIS_CA_FILE: cannot read /nonexistent/ca.pem"),
            "{missing}"
        );
        // A key where the CA belongs: named, and the key is not echoed.
        let key = std::env::temp_dir().join(format!("iot-config-test-{}.pem", std::process::id()));
        let secret = "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n";
        std::fs::write(&key, secret).expect("write");
        let path = key.to_str().expect("utf-8 path");
        let wrong = parse(&["--redis-url", "rediss://r/", "--redis-ca-file", path])
            .expect("parses")
            .redis_tls()
            .expect_err("refused")
            .to_string();
        let _ = std::fs::remove_file(&key);
        assert!(
            wrong.contains(&format!(
                "REDIS_CA_FILE ({path}): CA certificate: no PEM CERTIFICATE"
            )),
            "{wrong}"
        );
        assert!(!wrong.contains("c2VjcmV0"), "{wrong}");
    }
}
