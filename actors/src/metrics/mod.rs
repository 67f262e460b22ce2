//! The Prometheus families of the actor side, as typed, lock-free handles.
//!
//! [`Metrics::register`] creates every family once at start-up and registers it; the
//! handles are cheap clones of shared atomics, handed to the actors and the front end,
//! so recording never sends a message. The [`Registry`] itself moves into the
//! [`MetricsActor`], which owns encoding and the device-label cap. The HTTP families
//! (requests, latency, connections) belong to the front end, which registers them in the
//! same registry with the same [`register`] helper before the system starts.

mod actor;
mod labels;
mod process;

pub use actor::{MetricsActor, MetricsArgs, MetricsMsg, ScrapeError};
pub use labels::{
    DeviceLabel, Direction, DirectionLabel, ForwardFailure, ForwardFailureLabel, ReasonLabel,
    RejectReason,
};
pub use process::ProcessMetrics;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Metric, Registry};

/// Content type of the exposition that [`MetricsMsg::Scrape`] returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Store flush (and forwarded batch) latency buckets: 100 µs to 5 s.
const STORE_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Registers `metric` under `name` (counters get their `_total` suffix from the encoder)
/// and returns the handle: one line per metric at every call site.
pub fn register<M: Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

/// Every metric handle of the actor side. Field names are the registered names.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Anomalous events per device; written only by the metrics actor (label cap).
    pub(crate) anomalies_detected: Family<DeviceLabel, Counter>,
    /// Events accepted for processing.
    pub events_accepted: Counter,
    /// Events refused, by reason.
    pub events_rejected: Family<ReasonLabel, Counter>,
    /// Events processed by device actors.
    pub events_processed: Counter,
    /// Events whose processing panicked their device actor.
    pub events_failed: Counter,
    /// Events of forwarded batches that arrived again under a key already taken (a
    /// retry after a lost answer), answered without being queued twice.
    pub events_duplicate: Counter,
    /// Accepted, not yet processed. Also the admission counter.
    pub pending_events: Gauge,
    /// Live device actors.
    pub device_actors: Gauge,
    /// Device actors restarted after a failure.
    pub actor_restarts: Counter,
    /// Device actors stopped after DEVICE_IDLE_TIMEOUT.
    pub device_evictions: Counter,
    /// Device actors that started with an empty window because the store was unreadable.
    pub window_restore_failures: Counter,
    /// Keys written to the store.
    pub store_keys_written: Counter,
    /// Pipelined flushes that succeeded.
    pub store_flushes: Counter,
    /// Flushes that failed (retried with backoff); each failed attempt counts.
    pub store_write_errors: Counter,
    /// Latency of one pipelined flush.
    pub store_write_duration_seconds: Histogram,
    /// Device results waiting in the writer.
    pub store_pending_results: Gauge,
    /// 1 when the last store contact succeeded.
    pub store_up: Gauge,
    /// Members in this node's view of the cluster (1 on a single node).
    pub cluster_members: Gauge,
    /// Events sent on to their owner on another node (and acknowledged by it).
    pub events_forwarded: Counter,
    /// Events received from other nodes and queued here.
    pub forwarded_events_received: Counter,
    /// Forwarded batches that failed, by reason (their events were re-routed).
    pub forward_failures: Family<ForwardFailureLabel, Counter>,
    /// Latency of one forwarded batch, until the owner's acknowledgement.
    pub forward_batch_duration_seconds: Histogram,
    /// Shards moved between nodes, by direction.
    pub shard_handoffs: Family<DirectionLabel, Counter>,
    /// Shards this node owns.
    pub cluster_shards_owned: Gauge,
    /// Requests to the internal listener with a missing or wrong CLUSTER_TOKEN.
    pub cluster_unauthorized: Counter,
    /// Forwarded batches that arrived after their sender had given up on them (late
    /// retransmissions after a partition): refused, their events were re-routed.
    pub forwarded_batches_expired: Counter,
    /// Entries appended to the `anomalies` stream.
    pub anomaly_stream_entries: Counter,
    /// Anomalies dropped before reaching the stream (the oldest, when the queue during
    /// an outage passed ANOMALY_STREAM_MAXLEN).
    pub anomaly_stream_dropped: Counter,
    /// Entries appended to the ingest log (each holds the events of one group commit).
    pub ingest_log_appends: Counter,
    /// Appends to the ingest log that failed (their requests were answered 503).
    pub ingest_log_append_failures: Counter,
    /// Latency of one ingest-log append.
    pub ingest_log_append_duration_seconds: Histogram,
    /// Events replayed from the ingest log into windows that had not seen them.
    pub ingest_log_replayed: Counter,
    /// Ingest-log entries skipped at replay because they did not decode.
    pub ingest_log_undecodable: Counter,
    /// Ingest-log entries not yet covered by stored checkpoints (never trimmed).
    pub ingest_log_uncovered_entries: Gauge,
    /// Entries in the ingest log's stream, as of the last trim.
    pub ingest_log_length: Gauge,
    /// Trims that found entries still needed gone (INGEST_LOG_MAXLEN reached, or Redis
    /// lost them).
    pub ingest_log_overruns: Counter,
    /// `process_*`, refreshed at each scrape.
    pub process: ProcessMetrics,
}

impl Metrics {
    /// Creates every family and registers it in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let r = registry;
        let m = Self {
            anomalies_detected: register(r, "anomalies_detected", "Anomalous events by device and signal (devices capped by MAX_DEVICE_LABELS, overflow under __other__)", Family::default()),
            events_accepted: register(r, "events_accepted", "Events accepted for processing", Counter::default()),
            events_rejected: register(r, "events_rejected", "Events refused, by reason", Family::default()),
            events_processed: register(r, "events_processed", "Events processed by device actors", Counter::default()),
            events_failed: register(r, "events_failed", "Events whose processing crashed their device actor", Counter::default()),
            events_duplicate: register(r, "events_duplicate", "Events of forwarded batches received again under a key already taken (a retry), not queued twice", Counter::default()),
            pending_events: register(r, "pending_events", "Events accepted and not yet processed", Gauge::default()),
            device_actors: register(r, "device_actors", "Live device actors", Gauge::default()),
            actor_restarts: register(r, "actor_restarts", "Device actors restarted by the supervisor after a failure", Counter::default()),
            device_evictions: register(r, "device_evictions", "Device actors stopped after DEVICE_IDLE_TIMEOUT", Counter::default()),
            window_restore_failures: register(r, "window_restore_failures", "Device actors that started with an empty window because the store was unreadable", Counter::default()),
            store_keys_written: register(r, "store_keys_written", "Keys written to the store", Counter::default()),
            store_flushes: register(r, "store_flushes", "Pipelined store flushes that succeeded", Counter::default()),
            store_write_errors: register(r, "store_write_errors", "Store flush attempts that failed (each is retried with backoff)", Counter::default()),
            store_write_duration_seconds: register(r, "store_write_duration_seconds", "Latency of one pipelined store flush", Histogram::new(STORE_BUCKETS)),
            store_pending_results: register(r, "store_pending_results", "Device results waiting in the writer for the next flush", Gauge::default()),
            store_up: register(r, "store_up", "1 when the last contact with the store succeeded", Gauge::default()),
            cluster_members: register(r, "cluster_members", "Members in this node's view of the cluster (1 on a single node)", Gauge::default()),
            events_forwarded: register(r, "events_forwarded", "Events sent on to their owner on another node and acknowledged", Counter::default()),
            forwarded_events_received: register(r, "forwarded_events_received", "Events received from other nodes and queued here", Counter::default()),
            forward_failures: register(r, "forward_failures", "Forwarded batches that failed, by reason (their events were re-routed)", Family::default()),
            forward_batch_duration_seconds: register(r, "forward_batch_duration_seconds", "Latency of one forwarded batch until the owner's acknowledgement", Histogram::new(STORE_BUCKETS)),
            shard_handoffs: register(r, "shard_handoffs", "Shards moved between nodes, by direction", Family::default()),
            cluster_shards_owned: register(r, "cluster_shards_owned", "Shards this node owns (0 on a single node)", Gauge::default()),
            cluster_unauthorized: register(r, "cluster_unauthorized", "Internal requests with a missing or wrong CLUSTER_TOKEN", Counter::default()),
            forwarded_batches_expired: register(r, "forwarded_batches_expired", "Forwarded batches that arrived after their sender had given up on them (refused; re-routed)", Counter::default()),
            anomaly_stream_entries: register(r, "anomaly_stream_entries", "Entries appended to the anomalies stream", Counter::default()),
            anomaly_stream_dropped: register(r, "anomaly_stream_dropped", "Anomalies dropped before reaching the stream (oldest first, past ANOMALY_STREAM_MAXLEN during an outage)", Counter::default()),
            ingest_log_appends: register(r, "ingest_log_appends", "Entries appended to the ingest log (one per group commit)", Counter::default()),
            ingest_log_append_failures: register(r, "ingest_log_append_failures", "Ingest-log appends that failed (their requests were answered 503)", Counter::default()),
            ingest_log_append_duration_seconds: register(r, "ingest_log_append_duration_seconds", "Latency of one ingest-log append", Histogram::new(STORE_BUCKETS)),
            ingest_log_replayed: register(r, "ingest_log_replayed", "Events replayed from the ingest log into windows that had not seen them", Counter::default()),
            ingest_log_undecodable: register(r, "ingest_log_undecodable", "Ingest-log entries skipped at replay because they did not decode", Counter::default()),
            ingest_log_uncovered_entries: register(r, "ingest_log_uncovered_entries", "Ingest-log entries not yet covered by stored checkpoints", Gauge::default()),
            ingest_log_length: register(r, "ingest_log_length", "Entries in the ingest log's stream as of the last trim", Gauge::default()),
            ingest_log_overruns: register(r, "ingest_log_overruns", "Trims that found ingest-log entries gone before a checkpoint covered them", Counter::default()),
            process: ProcessMetrics::register(r),
        };
        m.cluster_members.set(1);
        for reason in ForwardFailure::ALL {
            m.forward_failures
                .get_or_create(&ForwardFailureLabel { reason })
                .inc_by(0);
        }
        for direction in [Direction::In, Direction::Out] {
            m.shard_handoffs
                .get_or_create(&DirectionLabel { direction })
                .inc_by(0);
        }
        r.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        // Every reason exists from the start, so rate() and alerts see 0, not no data.
        for reason in RejectReason::ALL {
            m.events_rejected
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        m
    }
}
