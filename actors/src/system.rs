//! Starting the actor tree, and draining it on shutdown.
//!
//! Start order follows the dependencies: the metrics actor (owns the registry), the store
//! writer, then the device supervisor, which hands both to every device actor. Shutdown
//! runs the other way: wait for device actors to process every accepted event, have the
//! writer flush everything, then stop the actors.

use crate::analytics::{AnomalyRule, Signal};
use crate::device::SlotMap;
use crate::device::{
    Admission, DeviceContext, DeviceSupervisor, Directory, SupervisorArgs, SupervisorMsg,
};
use crate::metrics::{Metrics, MetricsActor, MetricsArgs, MetricsMsg, ScrapeError};
use crate::store::{Inbox, Store, StoreHealth, WriterActor, WriterArgs, WriterMsg};
use crate::tuning::{ACTOR_CALL_TIMEOUT, WINDOW_RESTORE_TIMEOUT};
use prometheus_client::registry::Registry;
use ractor::rpc::CallResult;
use ractor::{Actor, ActorRef, ActorStatus, RpcReplyPort};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Everything the actor tree needs to know, already validated.
#[derive(Debug, Clone, PartialEq)]
pub struct SystemConfig {
    /// WINDOW_SIZE.
    pub window_size: usize,
    /// ANOMALY_THRESHOLD.
    pub anomaly_threshold: f64,
    /// FLUSH_INTERVAL.
    pub flush_interval: Duration,
    /// RESULT_TTL.
    pub result_ttl: Duration,
    /// DEVICE_IDLE_TIMEOUT.
    pub device_idle_timeout: Duration,
    /// MAX_PENDING_EVENTS.
    pub max_pending_events: usize,
    /// MAX_DEVICE_LABELS.
    pub max_device_labels: usize,
    /// WINDOW_CHECKPOINT_INTERVAL.
    pub window_checkpoint_interval: Duration,
    /// ANOMALY_SIGNALS: the signals whose anomalies are counted and streamed.
    pub anomaly_signals: Vec<Signal>,
    /// ANOMALY_STREAM_MAXLEN (0: no stream).
    pub anomaly_stream_maxlen: usize,
}

impl Default for SystemConfig {
    /// The documented defaults (docs/configuration.md), those of the original service.
    fn default() -> Self {
        Self {
            window_size: 50,
            anomaly_threshold: 2.0,
            flush_interval: Duration::from_millis(5),
            result_ttl: Duration::from_secs(300),
            device_idle_timeout: Duration::from_secs(600),
            max_pending_events: 100_000,
            max_device_labels: 10_000,
            window_checkpoint_interval: Duration::from_secs(1),
            anomaly_signals: vec![Signal::Rps],
            anomaly_stream_maxlen: 100_000,
        }
    }
}

/// A failure talking to the actor tree.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    /// An actor could not be started.
    #[error("starting actor: {0}")]
    Spawn(#[from] ractor::SpawnErr),
    /// An actor did not answer.
    #[error("{0} did not answer")]
    NoAnswer(&'static str),
    /// The metrics could not be encoded.
    #[error(transparent)]
    Scrape(#[from] ScrapeError),
}

/// A request to an actor that answers within [`ACTOR_CALL_TIMEOUT`].
async fn ask<M: ractor::Message, R: Send + 'static>(
    actor: &ActorRef<M>,
    who: &'static str,
    request: impl FnOnce(RpcReplyPort<R>) -> M,
) -> Result<R, SystemError> {
    match actor.call(request, Some(ACTOR_CALL_TIMEOUT)).await {
        Ok(CallResult::Success(reply)) => Ok(reply),
        _ => Err(SystemError::NoAnswer(who)),
    }
}

/// What shutdown achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// Accepted events still unprocessed at the deadline (0 on a clean drain).
    pub unprocessed: usize,
    /// Whether the store holds every result.
    pub store_flushed: bool,
    /// Devices whose newest result is not in the store (0 when flushed).
    pub unstored: usize,
}

/// The running actor tree.
pub struct System {
    directory: Directory,
    metrics: Metrics,
    store: Store,
    health: StoreHealth,
    metrics_actor: ActorRef<MetricsMsg>,
    writer: ActorRef<WriterMsg>,
    supervisor: ActorRef<SupervisorMsg>,
    ctx: Arc<DeviceContext>,
}

impl System {
    /// Starts the metrics actor, the store writer and the device supervisor over
    /// `store`. The actor side's families are added to `registry`, which may already
    /// hold the front end's; the metrics actor then owns it and serves scrapes.
    pub async fn start(
        config: SystemConfig,
        store: Store,
        mut registry: Registry,
    ) -> Result<Self, SystemError> {
        let metrics = Metrics::register(&mut registry);
        let (metrics_actor, _) = Actor::spawn(
            None,
            MetricsActor,
            MetricsArgs {
                registry,
                metrics: metrics.clone(),
                max_device_labels: config.max_device_labels,
            },
        )
        .await?;
        let health = StoreHealth::new(false);
        let inbox = Arc::new(Inbox::with_stream(
            config.anomaly_stream_maxlen,
            metrics.anomaly_stream_dropped.clone(),
        ));
        let (writer, _) = Actor::spawn(
            None,
            WriterActor,
            WriterArgs {
                store: store.clone(),
                ttl: config.result_ttl,
                flush_interval: config.flush_interval,
                metrics: metrics.clone(),
                health: health.clone(),
                inbox: inbox.clone(),
                stream_maxlen: config.anomaly_stream_maxlen,
            },
        )
        .await?;
        let slots = SlotMap::default();
        let admission = Admission::new(metrics.pending_events.clone(), config.max_pending_events);
        let ctx = Arc::new(DeviceContext {
            window_size: config.window_size,
            rule: AnomalyRule {
                threshold: config.anomaly_threshold,
            },
            inbox,
            writer: writer.clone(),
            metrics_actor: metrics_actor.clone(),
            metrics: metrics.clone(),
            admission: admission.clone(),
            restore_timeout: WINDOW_RESTORE_TIMEOUT,
            checkpoint_interval: config.window_checkpoint_interval,
            signals: config.anomaly_signals.clone(),
            slots: slots.clone(),
        });
        let (supervisor, _) = Actor::spawn(
            None,
            DeviceSupervisor,
            SupervisorArgs {
                ctx: ctx.clone(),
                slots: slots.clone(),
                idle_timeout: config.device_idle_timeout,
            },
        )
        .await?;
        Ok(Self {
            directory: Directory::new(slots, supervisor.clone(), admission),
            metrics,
            store,
            health,
            metrics_actor,
            writer,
            supervisor,
            ctx,
        })
    }

    /// Where events are submitted.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// The metric handles (for the HTTP front end).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The store (for `/analyze` reads).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The store writer (handoffs release a device's result through it).
    pub fn writer(&self) -> &ActorRef<WriterMsg> {
        &self.writer
    }

    /// Whether the store answered its last contact.
    pub fn store_health(&self) -> &StoreHealth {
        &self.health
    }

    /// Whether every long-lived actor is running.
    pub fn is_running(&self) -> bool {
        [
            self.metrics_actor.get_status(),
            self.writer.get_status(),
            self.supervisor.get_status(),
        ]
        .iter()
        // Right after spawn an actor may still be finishing post_start.
        .all(|s| matches!(s, ActorStatus::Starting | ActorStatus::Running))
    }

    /// The Prometheus exposition of every family.
    pub async fn scrape(&self) -> Result<String, SystemError> {
        ask(&self.metrics_actor, "metrics actor", MetricsMsg::Scrape)
            .await?
            .map_err(SystemError::Scrape)
    }

    /// Live device actors, as the supervisor counts them.
    #[cfg(test)]
    pub async fn device_actors(&self) -> Result<usize, SystemError> {
        ask(&self.supervisor, "device supervisor", SupervisorMsg::Count).await
    }

    /// Processes every accepted event, flushes every result, and stops the actors, giving
    /// up at `deadline`. Call after the front end has stopped accepting events.
    pub async fn shutdown(&self, deadline: Instant) -> ShutdownReport {
        let _ = tokio::time::timeout_at(deadline, self.directory.emptied()).await;
        let unprocessed = self.directory.pending();
        // Stopping the device actors first: each writes its window as it stops, and the
        // drain below then flushes those too.
        let remaining = deadline.saturating_duration_since(Instant::now());
        self.supervisor
            .stop_children_and_wait(Some("shutdown".into()), Some(remaining))
            .await;
        let remaining = deadline.saturating_duration_since(Instant::now());
        let store_flushed = matches!(
            self.writer.call(WriterMsg::Drain, Some(remaining)).await,
            Ok(CallResult::Success(()))
        );
        // Counted now, while the writer still holds the batch in flight too.
        let unstored = if store_flushed {
            0
        } else {
            let pending = usize::try_from(self.metrics.store_pending_results.get()).unwrap_or(0);
            pending.max(self.ctx.inbox.len())
        };
        for actor in [
            self.supervisor.get_cell(),
            self.writer.get_cell(),
            self.metrics_actor.get_cell(),
        ] {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let _ = actor
                .stop_and_wait(Some("shutdown".into()), Some(remaining))
                .await;
        }
        ShutdownReport {
            unprocessed,
            store_flushed: store_flushed && unprocessed == 0,
            unstored,
        }
    }
}
