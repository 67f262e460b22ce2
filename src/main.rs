//! iot-processor: accepts IoT metric events over HTTP, analyses each device's rolling
//! window in a supervised actor, publishes results to Redis (or the embedded store), and
//! exports Prometheus metrics.
//!
//! # Layout
//! - `auth`: client tokens (AUTH_TOKENS_FILE) and `iot-processor token add`.
//! - `cluster`: the internal listener and the client of scale-out (forwarding, handoff).
//! - `config`: every setting, its flag, environment variable and default.
//! - `http`: the router, one file per endpoint, errors, and the server.
//! - `logging`: text or JSON logs.
//! - `shutdown`: the signal that starts a graceful shutdown.
//!
//! `main` is wiring only: config → store → actors → HTTP server → wait for a signal →
//! drain in order (HTTP, device actors, store writer).
#![forbid(unsafe_code)]

mod auth;
mod cluster;
mod config;
mod http;
mod logging;
mod shutdown;

use actors::cluster::Cluster;
use actors::store::{EmbeddedStore, RedisStore, Store};
use actors::tuning::STORE_OP_TIMEOUT;
use actors::System;
use anyhow::Context;
use cluster::client::HttpTransport;
use config::Config;
use prometheus_client::registry::Registry;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::time::Instant;

/// How often AUTH_TOKENS_FILE is checked for changes (SIGHUP reloads at once).
const TOKENS_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// glibc malloc showed up in profiles as lock contention between worker threads (and
/// musl's allocator, used by the container build, is slower still).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `iot-processor token add NAME PREFIX MODE`: prints a new token and its line for
/// AUTH_TOKENS_FILE, then exits; `None` when the arguments are not that command.
fn token_command() -> Option<i32> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("token") {
        return None;
    }
    let usage = "usage: iot-processor token add NAME PREFIX MODE   (PREFIX: device-id prefix or '*'; MODE: rw, w or r)";
    let [_, add, name, prefix, mode] = &args[..] else {
        eprintln!("{usage}");
        return Some(2);
    };
    if add != "add" {
        eprintln!("{usage}");
        return Some(2);
    }
    match auth::new_token_line(name, prefix, mode) {
        Ok((token, line)) => {
            println!(
                "token (shown once; give it to the client as 'Authorization: Bearer <token>'):"
            );
            println!("{token}");
            println!("line for AUTH_TOKENS_FILE:");
            println!("{line}");
            Some(0)
        }
        Err(e) => {
            eprintln!("error: {e}\n{usage}");
            Some(2)
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    if let Some(code) = token_command() {
        std::process::exit(code);
    }
    let (config, settings) = Config::load();
    if let Err(e) = logging::init(config.log_format) {
        // Like clap's own errors for every other setting: a message naming it, exit 2.
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), %settings, "starting");
    // From here on SIGTERM means a graceful shutdown (not the default action), even before
    // the server first looks at it.
    let terminated = shutdown::signal();
    // Exit 2, as clap does for every other invalid setting.
    let (cluster_config, redis_tls) =
        match config.check().and_then(|c| Ok((c, config.redis_tls()?))) {
            Ok(checked) => checked,
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        };

    let auth = match &config.auth_tokens_file {
        None => {
            tracing::info!("AUTH_TOKENS_FILE is unset: the API is open to every client");
            None
        }
        Some(path) => match auth::Auth::load(path) {
            Ok(auth) => {
                tracing::info!(path = %path.display(), clients = auth.tokens().len(), "client tokens loaded: /metric, /metric/batch and /analyze require a bearer token");
                if auth.tokens().is_empty() {
                    tracing::warn!(path = %path.display(), "AUTH_TOKENS_FILE lists no client: every request to /metric, /metric/batch and /analyze is refused until it does");
                }
                let auth = Arc::new(auth);
                auth.clone().watch(TOKENS_CHECK_EVERY);
                Some(auth)
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        },
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
            // In a cluster, a node cut off with an older window must never overwrite the
            // newer one of the device's owner.
            Store::Redis(if cluster_config.is_some() {
                store.guarded()
            } else {
                store
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

    // In a cluster: the internal listener first, so peers can probe this node while its
    // first discovery round runs.
    let (stop_internal, internal_stopped) = tokio::sync::watch::channel(false);
    let cluster = match cluster_config {
        None => None,
        Some(cluster_config) => {
            let token = config.cluster_token.clone().unwrap_or_default();
            let transport = HttpTransport::new(
                cluster_config.advertise,
                &token,
                cluster_config.forward_timeout,
            )
            .context("CLUSTER_TOKEN")?;
            let internal = TcpListener::bind(config.cluster_listen_addr)
                .await
                .with_context(|| {
                    format!(
                        "CLUSTER_LISTEN_ADDR: cannot listen on {}",
                        config.cluster_listen_addr
                    )
                })?;
            tracing::info!(
                addr = %internal.local_addr()?,
                advertise = %cluster_config.advertise,
                peers = ?cluster_config.peers,
                "cluster listener"
            );
            let cluster = Cluster::start(cluster_config, Arc::new(transport), &system);
            tokio::spawn({
                let (cluster, metrics) = (cluster.clone(), system.metrics().clone());
                async move {
                    cluster::server::serve(internal, cluster, metrics, &token, internal_stopped)
                        .await;
                }
            });
            Some(cluster)
        }
    };

    let listener = TcpListener::bind(config.listen_addr)
        .await
        .with_context(|| format!("LISTEN_ADDR: cannot listen on {}", config.listen_addr))?;
    tracing::info!(addr = %listener.local_addr()?, "listening");

    // The anomalies stream as SSE, read from the store (so every replica serves what any
    // replica detected).
    let (stop_feed, feed_stopped) = tokio::sync::watch::channel(false);
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
        cluster.clone(),
        auth,
        feed,
        http_metrics,
        http::BodyLimits {
            max_body_bytes: config.max_body_bytes as usize,
            max_batch_bytes: config.max_batch_bytes as usize,
            // A batch is admitted whole: one larger than the pending bound never would be.
            max_batch_events: config.max_batch_events.min(config.max_pending_events) as usize,
            body_read_timeout: config.body_read_timeout,
        },
    );
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
            terminated.await;
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
    let deadline = state.shutdown_began().unwrap_or_else(Instant::now) + config.shutdown_timeout;
    if !http_drained {
        tracing::warn!("some connections were still open at the shutdown deadline");
    }
    if let Some(cluster) = &cluster {
        // Keep answering forwarded events and handoffs until every peer has seen this
        // node leave; then nothing more arrives and the drain below is final.
        let began = state.shutdown_began().unwrap_or_else(Instant::now);
        tokio::time::sleep_until((began + cluster.leave_grace()).min(deadline)).await;
        let _ = stop_internal.send(true);
        cluster.stop();
    }
    let _ = stop_feed.send(true);
    let report = system.shutdown(deadline).await;
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
    Ok(())
}
