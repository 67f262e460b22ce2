//! The wiring of one service instance: config → auth → store → actor system → cluster →
//! listeners; then, once asked to stop, the drain in order (HTTP, the cluster's handoff
//! of its shards, device actors, store writer). Owns no behaviour of its own.

use crate::auth::Auth;
use crate::cluster::client::HttpTransport;
use crate::config::{Config, Switch};
use crate::http;
use actors::cluster::{Cluster, ClusterConfig, Ownership, Table, TableError, Transport};
use actors::ingest::{Ingest, IngestLog, LogSettings, RedisLog};
use actors::store::{EmbeddedStore, RedisStore, Store};
use actors::tuning::{LOG_POOL_SIZE, STORE_OP_TIMEOUT};
use actors::{ShutdownReport, System};
use anyhow::Context;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often AUTH_TOKENS_FILE is checked for changes (SIGHUP reloads at once).
const TOKENS_CHECK_EVERY: Duration = Duration::from_secs(2);

/// Why an instance did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is invalid or names an unusable file: the process exits 2, as clap does
    /// for every other invalid setting.
    #[error("{0}")]
    Setting(String),
    /// Something the settings point at failed (a listener address in use, …).
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// A started instance: both listeners bound and the actor system running; requests are
/// answered once [`App::run`] is awaited (until then connections wait in the backlog).
pub struct App {
    config: Config,
    addr: SocketAddr,
    system: Arc<System>,
    cluster: Option<Arc<Cluster>>,
    log: Option<Arc<IngestLog>>,
    state: http::AppState,
    listener: TcpListener,
    stop_internal: watch::Sender<bool>,
    stop_feed: watch::Sender<bool>,
}

impl App {
    /// Starts an instance with `config`: logs what it uses (never a secret), binds
    /// LISTEN_ADDR (and CLUSTER_LISTEN_ADDR in a cluster) and starts the actors. Requests
    /// are answered once [`App::run`] is awaited.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let setting = |e: &dyn std::fmt::Display| StartError::Setting(e.to_string());
        let cluster_config = config.check().map_err(|e| setting(&e))?;
        for name in config.deprecated() {
            tracing::warn!("{name} is deprecated and ignored: cluster members find each other through their heartbeats in Redis");
        }
        // In a cluster: this node's id and its view of the shard table, which also
        // fences the store's writes.
        let incarnation = incarnation();
        let ownership = cluster_config.as_ref().map(|c| {
            Arc::new(Ownership::new(
                Cluster::node_id(c.advertise, incarnation),
                c.shards,
            ))
        });
        let redis_tls = config.redis_tls().map_err(|e| setting(&e))?;
        let auth = match &config.auth_tokens_file {
            None => {
                tracing::info!("AUTH_TOKENS_FILE is unset: the API is open to every client");
                None
            }
            Some(path) => {
                let auth = Auth::load(path).map_err(|e| setting(&e))?;
                tracing::info!(path = %path.display(), clients = auth.tokens().len(), "client tokens loaded: /metric, /metric/batch and /analyze require a bearer token");
                if auth.tokens().is_empty() {
                    tracing::warn!(path = %path.display(), "AUTH_TOKENS_FILE lists no client: every request to /metric, /metric/batch and /analyze is refused until it does");
                }
                let auth = Arc::new(auth);
                auth.clone().watch(TOKENS_CHECK_EVERY);
                Some(auth)
            }
        };

        let store = match &config.redis_url {
            None => {
                tracing::info!("REDIS_URL is unset: using the embedded in-process store (results are not shared between replicas and do not survive a restart)");
                Store::Embedded(Arc::new(EmbeddedStore::new()))
            }
            Some(url) => {
                // Log where, never the password (the TLS files are in the starting line).
                let host = url.rsplit('@').next().unwrap_or(url);
                tracing::info!(redis = %host, pool_size = config.redis_pool_size, tls = url.starts_with("rediss://"), "using Redis");
                let store =
                    RedisStore::with_tls(url, &redis_tls, config.redis_pool_size, STORE_OP_TIMEOUT)
                        .context("REDIS_URL")?;
                // In a cluster, a node that lost a shard (paused, cut off) must never
                // overwrite what the shard's new owner wrote.
                Store::Redis(match &ownership {
                    Some(ownership) => store.fenced(ownership.clone()),
                    None => store,
                })
            }
        };
        let mut registry = Registry::default();
        let http_metrics = Arc::new(http::HttpMetrics::register(&mut registry));
        let system = Arc::new(
            System::start((&config).into(), store, registry)
                .await
                .context("starting the actor system")?,
        );

        // Bound before the log starts: the log's writer is this address.
        let listener = TcpListener::bind(config.listen_addr)
            .await
            .with_context(|| format!("LISTEN_ADDR: cannot listen on {}", config.listen_addr))?;
        let addr = listener.local_addr().context("LISTEN_ADDR")?;
        tracing::info!(%addr, "listening");

        let log = start_log(&config, &system, ownership.as_deref(), addr)?;
        let (stop_internal, internal_stopped) = watch::channel(false);
        let cluster = match (cluster_config, ownership) {
            (Some(cluster_config), Some(ownership)) => Some(
                start_cluster(
                    &config,
                    cluster_config,
                    ownership,
                    incarnation,
                    &system,
                    log.clone(),
                    internal_stopped,
                )
                .await?,
            ),
            _ => None,
        };

        let ingest = Ingest::new(system.directory().clone(), cluster.clone(), log.clone());

        // The anomalies stream as SSE, read from the store (so every replica serves what
        // any replica detected).
        let (stop_feed, feed_stopped) = watch::channel(false);
        let feed = (config.anomaly_stream_maxlen > 0).then(|| {
            http::AnomalyFeed::start(
                system.store().clone(),
                config.max_stream_clients as usize,
                config.stream_heartbeat_interval,
                feed_stopped,
            )
        });
        let state = http::AppState::new(
            system.clone(),
            ingest,
            cluster.clone(),
            auth,
            feed,
            http_metrics,
            http::BodyLimits {
                max_body_bytes: config.max_body_bytes as usize,
                max_batch_bytes: config.max_batch_bytes as usize,
                // A batch is admitted whole: one larger than the pending bound never
                // would be.
                max_batch_events: config.max_batch_events.min(config.max_pending_events) as usize,
                body_read_timeout: config.body_read_timeout,
            },
        );
        Ok(Self {
            config,
            addr,
            system,
            cluster,
            log,
            state,
            listener,
            stop_internal,
            stop_feed,
        })
    }

    /// The address the API listens on (LISTEN_ADDR with its port resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stop` resolves, then shuts down gracefully within SHUTDOWN_TIMEOUT of
    /// that moment and reports what could not be processed or stored (also logged).
    pub async fn run(self, stop: impl Future<Output = ()>) -> ShutdownReport {
        let Self {
            config,
            system,
            cluster,
            log,
            state,
            listener,
            stop_internal,
            stop_feed,
            ..
        } = self;
        let limits = http::Limits {
            max_connections: config.max_connections,
            timeouts: http::Timeouts {
                header: config.header_read_timeout,
                keep_alive: config.keep_alive_timeout,
            },
        };
        let signalled = {
            let state = state.clone();
            async move {
                stop.await;
                state.begin_shutdown();
            }
        };
        let http_drained = http::serve(
            listener,
            state.clone(),
            limits,
            signalled,
            config.shutdown_timeout,
        )
        .await;
        // SHUTDOWN_TIMEOUT counts from the signal: the actors get what the HTTP drain left.
        let began = state.shutdown_began().unwrap_or_else(Instant::now);
        let deadline = began + config.shutdown_timeout;
        if !http_drained {
            tracing::warn!("some connections were still open at the shutdown deadline");
        }
        if let Some(cluster) = &cluster {
            // The leave began with the shutdown: wait until every shard is with another
            // node, then keep taking forwarded events for a heartbeat more (peers that
            // had not read the table yet), which this node passes on to the new owners.
            let _ = tokio::time::timeout_at(deadline, cluster.left()).await;
            let grace = Instant::now() + cluster_grace(&config);
            tokio::time::sleep_until(grace.min(deadline)).await;
            let _ = stop_internal.send(true);
            cluster.stop();
        }
        let _ = stop_feed.send(true);
        let report = system.shutdown(deadline).await;
        if let Some(log) = &log {
            // Every window is stored now: trim what a restart would only skip.
            if report.store_flushed {
                log.close().await;
            }
        }
        if let Some(cluster) = &cluster {
            // Whatever this node still owns (it was the last member) is taken at once
            // by the next node that starts, instead of after the lease.
            cluster.forget_me().await;
        }
        if report.unprocessed == 0 && report.store_flushed {
            tracing::info!("shutdown complete: every accepted event is processed and stored");
        } else {
            tracing::error!(
                unprocessed = report.unprocessed,
                unstored_results = report.unstored,
                "shutdown deadline reached: {} accepted events were not processed and the newest results of {} devices could not be stored",
                report.unprocessed,
                report.unstored
            );
        }
        report
    }
}

/// Starts the ingest log when it is on and can be (on Redis): on a single node its
/// stream is INGEST_LOG_KEY; in a cluster each node appends to a stream of its own.
fn start_log(
    config: &Config,
    system: &System,
    ownership: Option<&Ownership>,
    addr: SocketAddr,
) -> anyhow::Result<Option<Arc<IngestLog>>> {
    let Store::Redis(redis) = system.store() else {
        tracing::info!("the embedded store has no ingest log: a crash loses the events accepted since their windows' last checkpoint");
        return Ok(None);
    };
    if config.ingest_log == Switch::Off {
        tracing::info!("INGEST_LOG=off: events are accepted while Redis is unreachable; a crash loses up to WINDOW_CHECKPOINT_INTERVAL of them");
        return Ok(None);
    }
    let stream = match ownership {
        Some(o) => Cluster::stream_key(&config.ingest_log_key, o.me(), 0),
        None => config.ingest_log_key.clone(),
    };
    tracing::info!(%stream, maxlen = config.ingest_log_maxlen, "ingest log on: events are answered once they are in Redis, and replayed after a crash");
    let log = IngestLog::start(
        // The appender's own connections: its round trips are the requests' latency.
        RedisLog::new(redis.with_own_pool(LOG_POOL_SIZE), stream),
        LogSettings {
            maxlen: config.ingest_log_maxlen as usize,
            shards: ownership.map_or(0, Ownership::shards),
            // A restart of this process (the same host and listening address) takes
            // its stream back at once; any other node waits for it.
            writer: ownership
                .is_none()
                .then(|| format!("{} {addr}", host_name())),
        },
        system.directory().clone(),
        system.metrics().clone(),
    )
    .context("starting the ingest log's thread")?;
    Ok(Some(log))
}

/// This machine's (or pod's) host name; empty if it cannot be read.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default()
}

/// A random incarnation: tells this process apart from earlier ones at the same address.
fn incarnation() -> u64 {
    let mut bytes = [0u8; 8];
    if getrandom::fill(&mut bytes).is_err() {
        // No entropy source: the clock and the pid still differ between incarnations.
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(bytes)
}

/// How long a leaving node keeps its internal listener after its last shard moved.
fn cluster_grace(config: &Config) -> Duration {
    config.cluster_heartbeat_interval + config.cluster_forward_timeout
}

/// Starts this node's part of the cluster: the internal listener, the check that
/// CLUSTER_ADVERTISE_ADDR reaches it, the first heartbeat (which checks the table's
/// shard count), then the heartbeat loop.
async fn start_cluster(
    config: &Config,
    cluster_config: ClusterConfig,
    ownership: Arc<Ownership>,
    incarnation: u64,
    system: &Arc<System>,
    log: Option<Arc<IngestLog>>,
    internal_stopped: watch::Receiver<bool>,
) -> Result<Arc<Cluster>, StartError> {
    let Store::Redis(redis) = system.store() else {
        return Err(StartError::Setting("a cluster needs REDIS_URL".into()));
    };
    let token = config.cluster_token.clone().unwrap_or_default();
    let transport: Arc<dyn Transport> = Arc::new(
        HttpTransport::new(&token, cluster_config.forward_timeout).context("CLUSTER_TOKEN")?,
    );
    let internal = TcpListener::bind(config.cluster_listen_addr)
        .await
        .with_context(|| {
            format!(
                "CLUSTER_LISTEN_ADDR: cannot listen on {}",
                config.cluster_listen_addr
            )
        })?;
    let table = Table::new(
        redis.clone(),
        ownership.me().clone(),
        cluster_config.shards,
        cluster_config.lease,
    );
    tracing::info!(
        addr = %internal.local_addr().context("CLUSTER_LISTEN_ADDR")?,
        advertise = %cluster_config.advertise,
        node = %ownership.me(),
        shards = cluster_config.shards,
        "cluster listener"
    );
    let advertise = cluster_config.advertise;
    let cluster = Cluster::new(
        cluster_config,
        ownership,
        table,
        transport.clone(),
        incarnation,
        system,
    );
    if let Some(log) = log {
        // Before the first heartbeat, which may take shards.
        cluster.use_log(log, config.ingest_log_key.clone(), redis.clone());
    }
    tokio::spawn({
        let (cluster, metrics) = (cluster.clone(), system.metrics().clone());
        async move {
            crate::cluster::server::serve(internal, cluster, metrics, &token, internal_stopped)
                .await;
        }
    });
    check_advertised(
        &*transport,
        advertise,
        config.cluster_listen_addr,
        cluster.me(),
    )
    .await?;
    match cluster.join().await {
        Ok(()) => {}
        Err(e @ TableError::Mismatch { .. }) => return Err(StartError::Setting(e.to_string())),
        Err(e) => {
            tracing::warn!(error = %e, "cannot register in the cluster table yet; not ready until Redis answers")
        }
    }
    tokio::spawn(cluster.clone().run());
    Ok(cluster)
}

/// CLUSTER_ADVERTISE_ADDR must reach this very process (two nodes on one host with the
/// same internal port would otherwise advertise each other's listener).
async fn check_advertised(
    transport: &dyn Transport,
    advertise: SocketAddr,
    listen: SocketAddr,
    me: &str,
) -> Result<(), StartError> {
    let mut last = String::new();
    for _ in 0..3 {
        match transport.ping(advertise).await {
            Ok(id) if id == me => return Ok(()),
            Ok(id) => {
                last = format!("another node answers there ({id})");
                break;
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(StartError::Setting(format!(
        "CLUSTER_ADVERTISE_ADDR {advertise} does not reach this node, whose internal listener is CLUSTER_LISTEN_ADDR {listen}: {last}; set CLUSTER_ADVERTISE_ADDR to an address of this node's internal listener"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// One request on its own connection; the whole answer.
    async fn exchange(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        String::from_utf8_lossy(&answer).into_owned()
    }

    /// A request that reaches a handler once shutdown has begun (in service, one already
    /// on an open connection while the listener closes: e.g. in the kernel's buffer, or
    /// behind another on a keep-alive connection) is refused, not accepted into a drain.
    /// Here the listener is left open after shutdown begins, to reach every handler.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn once_shutdown_has_begun_every_handler_refuses_new_work() {
        let matches = Config::command()
            .mut_args(|arg| arg.env(None::<&str>))
            .try_get_matches_from(["iot-processor", "--listen-addr=127.0.0.1:0"])
            .expect("settings");
        let config = Config::from_arg_matches(&matches).expect("config");
        let app = App::start(config).await.expect("start");
        let (addr, state) = (app.addr(), app.state.clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let running = tokio::spawn(app.run(async {
            let _ = stopped.await;
        }));
        let event = r#"{"device_id":"s-1","cpu":0.5,"rps":10}"#;
        let ready = exchange(addr, "GET", "/ready", "").await;
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        let accepted = exchange(addr, "POST", "/metric", event).await;
        assert!(accepted.starts_with("HTTP/1.1 200"), "{accepted}");

        state.begin_shutdown();
        for (method, path, body) in [
            ("POST", "/metric", event),
            ("POST", "/metric/batch", event),
            ("GET", "/anomalies/stream", ""),
        ] {
            let refused = exchange(addr, method, path, body).await;
            assert!(refused.starts_with("HTTP/1.1 503"), "{path}: {refused}");
            assert!(
                refused.contains("the service is shutting down"),
                "{path} does not say why: {refused}"
            );
        }
        let ready = exchange(addr, "GET", "/ready", "").await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(ready.contains(r#""shutdown":"in progress""#), "{ready}");
        // Reads still work while the drain goes on.
        let health = exchange(addr, "GET", "/health", "").await;
        assert!(health.starts_with("HTTP/1.1 200"), "{health}");

        let _ = stop.send(());
        let report = running.await.expect("run");
        assert_eq!(report.unprocessed, 0);
    }
}
