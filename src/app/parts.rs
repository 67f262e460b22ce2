//! The parts [`super::App::start`] puts together, one function per part: the client
//! tokens, the store, the ingest log, the cluster membership, the anomaly feed.

use super::StartError;
use crate::auth::Auth;
use crate::cluster::client::HttpTransport;
use crate::config::{Config, Switch};
use crate::http;
use crate::tuning::TOKENS_CHECK_EVERY;
use actors::cluster::{Cluster, ClusterConfig, Ownership, Table, TableError, Transport};
use actors::ingest::{IngestLog, LogSettings, RedisLog};
use actors::store::{EmbeddedStore, RedisStore, Store};
use actors::tuning::{LOG_POOL_SIZE, STORE_OP_TIMEOUT};
use actors::System;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The client tokens of AUTH_TOKENS_FILE, watched for changes; `None`: the API is open.
pub(super) fn load_auth(config: &Config) -> Result<Option<Arc<Auth>>, StartError> {
    let Some(path) = &config.auth_tokens_file else {
        tracing::info!("AUTH_TOKENS_FILE is unset: the API is open to every client");
        return Ok(None);
    };
    let auth = Auth::load(path).map_err(|e| StartError::Setting(e.to_string()))?;
    tracing::info!(path = %path.display(), clients = auth.tokens().len(), "client tokens loaded: /metric, /metric/batch and /analyze require a bearer token");
    if auth.tokens().is_empty() {
        tracing::warn!(path = %path.display(), "AUTH_TOKENS_FILE lists no client: every request to /metric, /metric/batch and /analyze is refused until it does");
    }
    let auth = Arc::new(auth);
    auth.clone().watch(TOKENS_CHECK_EVERY);
    Ok(Some(auth))
}

/// The embedded store, or Redis at REDIS_URL (fenced by `ownership` in a cluster).
pub(super) fn open_store(
    config: &Config,
    ownership: Option<&Arc<Ownership>>,
) -> Result<Store, StartError> {
    let Some(url) = &config.redis_url else {
        tracing::info!("REDIS_URL is unset: using the embedded in-process store (results are not shared between replicas and do not survive a restart)");
        return Ok(Store::Embedded(Arc::new(EmbeddedStore::new())));
    };
    let redis_tls = config
        .redis_tls()
        .map_err(|e| StartError::Setting(e.to_string()))?;
    // Log where, never the password (the TLS files are in the starting line).
    let host = url.rsplit('@').next().unwrap_or(url);
    tracing::info!(redis = %host, pool_size = config.redis_pool_size, tls = url.starts_with("rediss://"), "using Redis");
    let store = RedisStore::with_tls(url, &redis_tls, config.redis_pool_size, STORE_OP_TIMEOUT)
        .context("REDIS_URL")?;
    // In a cluster, a node that lost a shard (paused, cut off) must never overwrite what
    // the shard's new owner wrote.
    Ok(Store::Redis(match ownership {
        Some(ownership) => store.fenced(ownership.clone()),
        None => store,
    }))
}

/// Starts the ingest log when it is on and can be (on Redis): on a single node its
/// stream is INGEST_LOG_KEY; in a cluster each node appends to a stream of its own.
pub(super) fn start_log(
    config: &Config,
    system: &System,
    ownership: Option<&Ownership>,
    addr: SocketAddr,
    stops: &CancellationToken,
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
        stops.child_token(),
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
pub(super) fn incarnation() -> u64 {
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
pub(super) fn cluster_grace(config: &Config) -> Duration {
    config.cluster_heartbeat_interval + config.cluster_forward_timeout
}

/// Who this node is in the cluster.
pub(super) struct Node {
    pub config: ClusterConfig,
    /// This node's view of the shard table (the store's fence).
    pub ownership: Arc<Ownership>,
    pub incarnation: u64,
}

/// Starts this node's part of the cluster: the internal listener, the check that
/// CLUSTER_ADVERTISE_ADDR reaches it, the first heartbeat (which checks the table's
/// shard count), then the heartbeat loop. The listener and the loop end on `stop`.
pub(super) async fn start_cluster(
    config: &Config,
    node: Node,
    system: &Arc<System>,
    log: Option<Arc<IngestLog>>,
    stop: CancellationToken,
) -> Result<Arc<Cluster>, StartError> {
    let Node {
        config: cluster_config,
        ownership,
        incarnation,
    } = node;
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
        let (cluster, metrics, stop) = (cluster.clone(), system.metrics().clone(), stop.clone());
        async move {
            crate::cluster::server::serve(internal, cluster, metrics, &token, stop).await;
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
    tokio::spawn(cluster.clone().run(stop));
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

/// The anomaly stream as SSE, read from the store (so every replica serves what any
/// replica detected); `None` when ANOMALY_STREAM_MAXLEN=0.
pub(super) fn anomaly_feed(
    config: &Config,
    system: &System,
    stop: CancellationToken,
) -> Option<Arc<http::AnomalyFeed>> {
    (config.anomaly_stream_maxlen > 0).then(|| {
        http::AnomalyFeed::start(
            system.store().clone(),
            config.max_stream_clients as usize,
            config.stream_heartbeat_interval,
            stop,
        )
    })
}

/// The request body limits.
pub(super) fn body_limits(config: &Config) -> http::BodyLimits {
    http::BodyLimits {
        max_body_bytes: config.max_body_bytes as usize,
        max_batch_bytes: config.max_batch_bytes as usize,
        // A batch is admitted whole: one larger than the pending bound never would be.
        max_batch_events: config.max_batch_events.min(config.max_pending_events) as usize,
        body_read_timeout: config.body_read_timeout,
    }
}
