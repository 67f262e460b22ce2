//! The front end's Prometheus families: requests, latency and connections.
//!
//! `Family::get_or_create` takes a read lock and hashes the label set on every call; on
//! two cores that shared lock word bounces between them on every request. The label space
//! here is closed (method × route × a handful of statuses), so each series handle is
//! resolved once, on first use, and cached in a fixed table of `OnceLock`s sized from the
//! route table; after that a request costs two atomic adds. Series still appear only once
//! used.

use super::routes::Endpoint;
use actors::metrics::register;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::fmt::Write;
use std::sync::OnceLock;

/// Request latency buckets: 100 µs to 2.5 s (docs/api.md, the metrics table).
const REQUEST_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Batch size buckets: 1 to MAX_BATCH_EVENTS's default and beyond.
const BATCH_BUCKETS: [f64; 8] = [1.0, 10.0, 50.0, 100.0, 500.0, 1000.0, 5000.0, 10000.0];

/// Statuses whose series are cached; any other status goes through the family.
const CACHED_STATUSES: [u16; 11] = [200, 400, 401, 403, 404, 405, 413, 415, 500, 503, 408];

/// HTTP method label; anything unusual counts as `OTHER`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct MethodLabel(usize);

impl MethodLabel {
    const NAMES: [&'static str; 8] = [
        "GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
    ];
    const COUNT: usize = Self::NAMES.len();

    /// The label of a request's method.
    pub fn of(method: &hyper::Method) -> Self {
        let name = method.as_str();
        Self(
            Self::NAMES[..Self::COUNT - 1]
                .iter()
                .position(|n| *n == name)
                .unwrap_or(Self::COUNT - 1),
        )
    }
}

impl EncodeLabelValue for MethodLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(Self::NAMES[self.0])
    }
}

/// Labels of `http_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Request method.
    pub method: MethodLabel,
    /// Matched route.
    pub endpoint: Endpoint,
    /// Numeric response status.
    pub status: u16,
}

/// Labels of `request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Request method.
    pub method: MethodLabel,
    /// Matched route.
    pub endpoint: Endpoint,
}

/// Why the server closed a connection on its own.
// The variants mirror the exported label values, which all end in `_timeout`.
#[allow(clippy::enum_variant_names)]
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CloseReason {
    /// Request headers not complete within HEADER_READ_TIMEOUT.
    HeaderTimeout,
    /// No request within KEEP_ALIVE_TIMEOUT (or HEADER_READ_TIMEOUT on a new connection).
    IdleTimeout,
    /// A request body not complete within BODY_READ_TIMEOUT (answered 408).
    BodyTimeout,
}

impl CloseReason {
    const ALL: [CloseReason; 3] = [
        CloseReason::HeaderTimeout,
        CloseReason::IdleTimeout,
        CloseReason::BodyTimeout,
    ];
}

impl EncodeLabelValue for CloseReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::BodyTimeout => "body_timeout",
        })
    }
}

/// Labels of `http_connections_closed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabel {
    /// Why.
    pub reason: CloseReason,
}

/// Labels of `auth_failures_total`: one of [`crate::auth::Denied::REASONS`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabel {
    /// Why.
    pub reason: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The front end's metric handles; one per process, shared by every connection.
#[derive(Debug)]
pub struct HttpMetrics {
    http_requests: Family<RequestLabels, Counter>,
    request_duration_seconds: HistogramFamily<RouteLabels>,
    /// Open client connections.
    pub http_connections: Gauge,
    /// Connections refused with 503 at MAX_CONNECTIONS.
    pub http_connections_rejected: Counter,
    /// Connections the server closed on a timeout, by reason.
    pub http_connections_closed: Family<CloseLabel, Counter>,
    /// Events per POST /metric/batch request.
    batch_size_events: Histogram,
    /// Requests refused by AUTH_TOKENS_FILE, by reason.
    auth_failures: Family<AuthLabel, Counter>,
    /// Open GET /anomalies/stream connections.
    pub stream_clients: Gauge,
    /// Stream clients disconnected because they did not keep up.
    pub stream_clients_dropped: Counter,
    request_handles: Box<[OnceLock<Counter>]>,
    duration_handles: Box<[OnceLock<Histogram>]>,
}

impl HttpMetrics {
    /// Creates the families and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let r = registry;
        let routes = MethodLabel::COUNT * Endpoint::COUNT;
        let m = Self {
            http_requests: register(
                r,
                "http_requests",
                "HTTP requests by method, route and status",
                Family::default(),
            ),
            request_duration_seconds: register(
                r,
                "request_duration_seconds",
                "HTTP request latency by method and route",
                Family::new_with_constructor(|| Histogram::new(REQUEST_BUCKETS)),
            ),
            http_connections: register(
                r,
                "http_connections",
                "Open client connections",
                Gauge::default(),
            ),
            http_connections_rejected: register(
                r,
                "http_connections_rejected",
                "Connections refused with 503 at MAX_CONNECTIONS",
                Counter::default(),
            ),
            http_connections_closed: register(
                r,
                "http_connections_closed",
                "Connections the server closed on a timeout, by reason",
                Family::default(),
            ),
            batch_size_events: register(
                r,
                "batch_size_events",
                "Events per POST /metric/batch request (valid or not)",
                Histogram::new(BATCH_BUCKETS),
            ),
            auth_failures: register(
                r,
                "auth_failures",
                "Requests refused for their token: missing, unknown, mode (may not read or write), device (outside its prefix)",
                Family::default(),
            ),
            stream_clients: register(
                r,
                "stream_clients",
                "Open GET /anomalies/stream connections",
                Gauge::default(),
            ),
            stream_clients_dropped: register(
                r,
                "stream_clients_dropped",
                "Stream clients disconnected because they did not read fast enough",
                Counter::default(),
            ),
            request_handles: (0..routes * CACHED_STATUSES.len())
                .map(|_| OnceLock::new())
                .collect(),
            duration_handles: (0..routes).map(|_| OnceLock::new()).collect(),
        };
        // Every reason exists from the start, so rate() and alerts see 0, not no data.
        for reason in CloseReason::ALL {
            m.http_connections_closed
                .get_or_create(&CloseLabel { reason })
                .inc_by(0);
        }
        for reason in crate::auth::Denied::REASONS {
            m.auth_failures
                .get_or_create(&AuthLabel { reason })
                .inc_by(0);
        }
        m
    }

    /// Counts one request and its latency.
    pub fn record(&self, method: MethodLabel, endpoint: Endpoint, status: u16, seconds: f64) {
        let route = method.0 * Endpoint::COUNT + endpoint.index();
        let labels = || RequestLabels {
            method,
            endpoint,
            status,
        };
        match CACHED_STATUSES.iter().position(|s| *s == status) {
            Some(i) => self.request_handles[route * CACHED_STATUSES.len() + i]
                .get_or_init(|| self.http_requests.get_or_create_owned(&labels()))
                .inc(),
            None => self.http_requests.get_or_create(&labels()).inc(),
        };
        self.duration_handles[route]
            .get_or_init(|| {
                self.request_duration_seconds
                    .get_or_create_owned(&RouteLabels { method, endpoint })
            })
            .observe(seconds);
    }

    /// Records the size of one batch.
    pub fn batch_size(&self, events: usize) {
        self.batch_size_events.observe(events as f64);
    }

    /// Counts a request refused for its token.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&AuthLabel { reason })
            .inc();
    }

    /// Counts a connection closed by the server.
    pub fn closed(&self, reason: CloseReason) {
        self.http_connections_closed
            .get_or_create(&CloseLabel { reason })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::routes::ROUTES;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn every_method_and_route_records_into_its_own_series() {
        let mut registry = Registry::default();
        let m = HttpMetrics::register(&mut registry);
        let methods = [
            hyper::Method::GET,
            hyper::Method::POST,
            hyper::Method::HEAD,
            hyper::Method::PUT,
            hyper::Method::DELETE,
            hyper::Method::PATCH,
            hyper::Method::OPTIONS,
            hyper::Method::TRACE,
        ];
        let endpoints: Vec<_> = ROUTES
            .iter()
            .map(|r| Endpoint::of_path(r.path))
            .chain([Endpoint::UNMATCHED])
            .collect();
        // Every status with a cached handle, and one without.
        let statuses: Vec<u16> = CACHED_STATUSES.iter().copied().chain([299]).collect();
        for method in &methods {
            for &endpoint in &endpoints {
                for &status in &statuses {
                    m.record(MethodLabel::of(method), endpoint, status, 0.001);
                }
            }
        }
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        for method in [
            "GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS", "OTHER",
        ] {
            for endpoint in endpoints.iter().map(|e| e.as_str()) {
                for status in &statuses {
                    let series = format!(
                        "http_requests_total{{method=\"{method}\",endpoint=\"{endpoint}\",status=\"{status}\"}} 1\n"
                    );
                    assert!(text.contains(&series), "missing {series}");
                }
                let count = format!(
                    "request_duration_seconds_count{{method=\"{method}\",endpoint=\"{endpoint}\"}} {}\n",
                    statuses.len()
                );
                assert!(text.contains(&count), "missing {count}");
            }
        }
    }
}
