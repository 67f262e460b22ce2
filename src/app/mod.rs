//! The wiring of one service instance: config → auth → store → actor system → cluster →
//! listeners; then, once asked to stop, the drain in order (HTTP, the cluster's handoff
//! of its shards, device actors, store writer). Owns no behaviour of its own.

mod parts;

use crate::config::Config;
use crate::http;
use actors::cluster::{Cluster, Ownership};
use actors::ingest::{Ingest, IngestLog};
use actors::{ShutdownReport, System};
use anyhow::Context;
use prometheus_client::registry::Registry;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

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

/// The instance's stop signals, as one tree. [`App::run`] cancels the branches in the
/// order of the drain: the API at the signal (through [`http::AppState::begin_shutdown`]),
/// the cluster's internal listener and heartbeat once its shards are with other nodes,
/// then the anomaly feed; the ingest log's trimmer stops at its close. The root ends
/// whatever is left when the instance is dropped, run or not.
struct Stops {
    root: CancellationToken,
    api: CancellationToken,
    cluster: CancellationToken,
    feed: CancellationToken,
    _all: DropGuard,
}

impl Stops {
    fn new() -> Self {
        let root = CancellationToken::new();
        Self {
            api: root.child_token(),
            cluster: root.child_token(),
            feed: root.child_token(),
            _all: root.clone().drop_guard(),
            root,
        }
    }
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
    stops: Stops,
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
        let stops = Stops::new();
        // In a cluster: this node's id and its view of the shard table, which also
        // fences the store's writes.
        let incarnation = parts::incarnation();
        let ownership = cluster_config.as_ref().map(|c| {
            Arc::new(Ownership::new(
                Cluster::node_id(c.advertise, incarnation),
                c.shards,
            ))
        });
        let auth = parts::load_auth(&config)?;
        let store = parts::open_store(&config, ownership.as_ref())?;
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

        let log = parts::start_log(&config, &system, ownership.as_deref(), addr, &stops.root)?;
        let cluster = match (cluster_config, ownership) {
            (Some(cluster_config), Some(ownership)) => Some(
                parts::start_cluster(
                    &config,
                    parts::Node {
                        config: cluster_config,
                        ownership,
                        incarnation,
                    },
                    &system,
                    log.clone(),
                    stops.cluster.clone(),
                )
                .await?,
            ),
            _ => None,
        };
        let ingest = Ingest::new(system.directory().clone(), cluster.clone(), log.clone());
        let feed = parts::anomaly_feed(&config, &system, stops.feed.clone());
        let state = http::AppState::new(http::Parts {
            system: system.clone(),
            ingest,
            cluster: cluster.clone(),
            auth,
            feed,
            http_metrics,
            limits: parts::body_limits(&config),
            shutdown: stops.api.clone(),
        });
        Ok(Self {
            config,
            addr,
            system,
            cluster,
            log,
            state,
            listener,
            stops,
        })
    }

    /// The address the API listens on (LISTEN_ADDR with its port resolved).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves until `stop` resolves, then shuts down gracefully within SHUTDOWN_TIMEOUT of
    /// that moment and reports what could not be processed or stored (also logged).
    pub async fn run(self, stop: impl Future<Output = ()>) -> ShutdownReport {
        let limits = http::Limits {
            max_connections: self.config.max_connections,
            timeouts: http::Timeouts {
                header: self.config.header_read_timeout,
                keep_alive: self.config.keep_alive_timeout,
            },
        };
        let signalled = {
            let state = self.state.clone();
            async move {
                stop.await;
                state.begin_shutdown();
            }
        };
        let http_drained = http::serve(
            self.listener,
            self.state.clone(),
            limits,
            signalled,
            self.config.shutdown_timeout,
        )
        .await;
        // SHUTDOWN_TIMEOUT counts from the signal: the actors get what the HTTP drain left.
        let began = self.state.shutdown_began().unwrap_or_else(Instant::now);
        let deadline = began + self.config.shutdown_timeout;
        if !http_drained {
            tracing::warn!("some connections were still open at the shutdown deadline");
        }
        Drain {
            config: &self.config,
            system: &self.system,
            cluster: self.cluster.as_deref(),
            log: self.log.as_deref(),
            stops: &self.stops,
            deadline,
        }
        .run()
        .await
    }
}

/// The drain after the API has stopped: the cluster's shards, then the actors and the
/// store writer, then the log.
struct Drain<'a> {
    config: &'a Config,
    system: &'a System,
    cluster: Option<&'a Cluster>,
    log: Option<&'a IngestLog>,
    stops: &'a Stops,
    deadline: Instant,
}

impl Drain<'_> {
    async fn run(self) -> ShutdownReport {
        if let Some(cluster) = self.cluster {
            // The leave began with the shutdown: wait until every shard is with another
            // node, then keep taking forwarded events for a heartbeat more (peers that
            // had not read the table yet), which this node passes on to the new owners.
            let _ = tokio::time::timeout_at(self.deadline, cluster.left()).await;
            let grace = Instant::now() + parts::cluster_grace(self.config);
            tokio::time::sleep_until(grace.min(self.deadline)).await;
            self.stops.cluster.cancel();
        }
        self.stops.feed.cancel();
        let report = self.system.shutdown(self.deadline).await;
        if let Some(log) = self.log {
            // Every window is stored now: trim what a restart would only skip.
            if report.store_flushed {
                log.close().await;
            }
        }
        if let Some(cluster) = self.cluster {
            // Whatever this node still owns (it was the last member) is taken at once
            // by the next node that starts, instead of after the lease.
            cluster.forget_me().await;
        }
        log_report(&report);
        report
    }
}

fn log_report(report: &ShutdownReport) {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};
    use std::time::Duration;
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
