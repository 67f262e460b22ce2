//! The Prometheus families the service exports, as typed, lock-free handles.
//!
//! [`Metrics::register`] creates every family once at start-up and registers it; the
//! handles are cheap clones of shared atomics, handed to the HTTP front end and the
//! actors, so recording a request never sends a message. The [`Registry`] itself moves
//! into the [`MetricsActor`], which owns encoding and the device-label cap.

mod actor;
mod http;
mod labels;
mod process;

pub use actor::{MetricsActor, MetricsArgs, MetricsMsg};
pub use http::HttpMetrics;
pub use labels::{
    CloseLabel, CloseReason, DeviceLabel, Endpoint, HttpLabels, Method, ReasonLabel, RejectReason,
    RouteLabels,
};
pub use process::ProcessMetrics;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// Content type of the exposition that [`MetricsMsg::Scrape`] returns.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Request latency buckets: 100 µs to 2.5 s, as SPEC asks.
const REQUEST_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Store flush latency buckets: 100 µs to 5 s.
const STORE_BUCKETS: [f64; 15] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn request_histogram() -> Histogram {
    Histogram::new(REQUEST_BUCKETS)
}

/// Every metric handle of the service.
#[derive(Clone, Debug)]
pub struct Metrics {
    /// `http_requests_total` and `request_duration_seconds`, through cached handles.
    pub http: Arc<HttpMetrics>,
    /// `anomalies_detected_total{device_id}`; written only by the metrics actor.
    pub(crate) anomalies: Family<DeviceLabel, Counter>,
    /// `events_accepted_total`
    pub events_accepted: Counter,
    /// `events_rejected_total{reason}`
    pub events_rejected: Family<ReasonLabel, Counter>,
    /// `events_processed_total`
    pub events_processed: Counter,
    /// `events_failed_total`: events whose processing panicked the device actor.
    pub events_failed: Counter,
    /// `pending_events`: accepted, not yet processed. Also the admission counter.
    pub pending_events: Gauge,
    /// `device_actors`: live device actors.
    pub device_actors: Gauge,
    /// `actor_restarts_total`
    pub actor_restarts: Counter,
    /// `device_evictions_total`: device actors stopped after DEVICE_IDLE_TIMEOUT.
    pub device_evictions: Counter,
    /// `window_restore_failures_total`: device actors that started with an empty window
    /// because the store could not be read.
    pub window_restore_failures: Counter,
    /// `store_writes_total`: keys written.
    pub store_writes: Counter,
    /// `store_write_errors_total`: failed flushes.
    pub store_write_errors: Counter,
    /// `store_write_duration_seconds`: one flush (one pipelined batch).
    pub store_write_duration: Histogram,
    /// `store_pending_results`: device results waiting in the writer.
    pub store_pending_results: Gauge,
    /// `store_up`: 1 when the last store contact succeeded.
    pub store_up: Gauge,
    /// `http_connections`: open client connections.
    pub connections_open: Gauge,
    /// `http_connections_rejected_total`: connections refused at MAX_CONNECTIONS.
    pub connections_rejected: Counter,
    /// `http_connections_closed_total{reason}`: connections the server closed on a timeout.
    pub connections_closed: Family<CloseLabel, Counter>,
    /// `process_*`: refreshed at each scrape.
    pub process: ProcessMetrics,
}

impl Metrics {
    /// Creates every family and registers it in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let http_requests = Family::<HttpLabels, Counter>::default();
        let request_duration: HistogramFamily<RouteLabels> =
            Family::new_with_constructor(request_histogram);
        let m = Self {
            http: Arc::new(HttpMetrics::new(
                http_requests.clone(),
                request_duration.clone(),
            )),
            anomalies: Family::default(),
            events_accepted: Counter::default(),
            events_rejected: Family::default(),
            events_processed: Counter::default(),
            events_failed: Counter::default(),
            pending_events: Gauge::default(),
            device_actors: Gauge::default(),
            actor_restarts: Counter::default(),
            device_evictions: Counter::default(),
            window_restore_failures: Counter::default(),
            store_writes: Counter::default(),
            store_write_errors: Counter::default(),
            store_write_duration: Histogram::new(STORE_BUCKETS),
            store_pending_results: Gauge::default(),
            store_up: Gauge::default(),
            connections_open: Gauge::default(),
            connections_rejected: Counter::default(),
            connections_closed: Family::default(),
            process: ProcessMetrics::register(registry),
        };
        // Every reason exists from the start, so rate() and alerts see 0, not no data.
        for reason in [
            RejectReason::Invalid,
            RejectReason::TooLarge,
            RejectReason::Overloaded,
            RejectReason::ShuttingDown,
        ] {
            m.events_rejected
                .get_or_create(&ReasonLabel { reason })
                .inc_by(0);
        }
        for reason in [
            CloseReason::HeaderTimeout,
            CloseReason::IdleTimeout,
            CloseReason::BodyTimeout,
        ] {
            m.connections_closed
                .get_or_create(&CloseLabel { reason })
                .inc_by(0);
        }
        // Counters get their `_total` suffix from the encoder.
        let r = registry;
        r.register(
            "http_requests",
            "HTTP requests by method, route and status",
            http_requests,
        );
        r.register(
            "request_duration_seconds",
            "HTTP request latency by method and route",
            request_duration,
        );
        r.register(
            "anomalies_detected",
            "Anomalous events by device (capped by MAX_DEVICE_LABELS, overflow under __other__)",
            m.anomalies.clone(),
        );
        r.register(
            "events_accepted",
            "Events accepted for processing",
            m.events_accepted.clone(),
        );
        r.register(
            "events_rejected",
            "Events refused, by reason",
            m.events_rejected.clone(),
        );
        r.register(
            "events_processed",
            "Events processed by device actors",
            m.events_processed.clone(),
        );
        r.register(
            "events_failed",
            "Events whose processing crashed their device actor",
            m.events_failed.clone(),
        );
        r.register(
            "pending_events",
            "Events accepted and not yet processed",
            m.pending_events.clone(),
        );
        r.register(
            "device_actors",
            "Live device actors",
            m.device_actors.clone(),
        );
        r.register(
            "actor_restarts",
            "Device actors restarted by the supervisor after a failure",
            m.actor_restarts.clone(),
        );
        r.register(
            "device_evictions",
            "Device actors stopped after DEVICE_IDLE_TIMEOUT",
            m.device_evictions.clone(),
        );
        r.register(
            "window_restore_failures",
            "Device actors that started with an empty window because the store was unreadable",
            m.window_restore_failures.clone(),
        );
        r.register(
            "store_writes",
            "Keys written to the store",
            m.store_writes.clone(),
        );
        r.register(
            "store_write_errors",
            "Store flushes that failed (retried with backoff)",
            m.store_write_errors.clone(),
        );
        r.register(
            "store_write_duration_seconds",
            "Latency of one pipelined store flush",
            m.store_write_duration.clone(),
        );
        r.register(
            "store_pending_results",
            "Device results waiting in the writer for the next flush",
            m.store_pending_results.clone(),
        );
        r.register(
            "store_up",
            "1 when the last contact with the store succeeded",
            m.store_up.clone(),
        );
        r.register(
            "http_connections",
            "Open client connections",
            m.connections_open.clone(),
        );
        r.register(
            "http_connections_rejected",
            "Connections refused with 503 at MAX_CONNECTIONS",
            m.connections_rejected.clone(),
        );
        r.register(
            "http_connections_closed",
            "Connections the server closed on a timeout, by reason",
            m.connections_closed.clone(),
        );
        r.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        m
    }
}
