//! Request metrics without a lock on the request path.
//!
//! `Family::get_or_create` takes a read lock and hashes the label set on every call; on
//! two cores that shared lock word bounces between them on every request. The label space
//! here is closed (method × route × a handful of statuses), so each series handle is
//! resolved once, on first use, and cached in a fixed table of `OnceLock`s; after that a
//! request costs two atomic adds. Series still appear only once used.

use super::{Endpoint, HttpLabels, Method, RouteLabels};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use std::sync::OnceLock;

const METHODS: usize = 8;
const ENDPOINTS: usize = 6;
/// Statuses the service answers with; any other status goes through the family.
const STATUSES: [u16; 8] = [200, 400, 404, 405, 413, 500, 503, 408];

/// Cached handles of `http_requests_total` and `request_duration_seconds`.
#[derive(Debug)]
pub struct HttpMetrics {
    requests: Family<HttpLabels, Counter>,
    durations: super::HistogramFamily<RouteLabels>,
    request_handles: Box<[OnceLock<Counter>]>,
    duration_handles: Box<[OnceLock<Histogram>]>,
}

fn method_index(m: Method) -> usize {
    m as usize
}

fn endpoint_index(e: Endpoint) -> usize {
    e as usize
}

impl HttpMetrics {
    pub(super) fn new(
        requests: Family<HttpLabels, Counter>,
        durations: super::HistogramFamily<RouteLabels>,
    ) -> Self {
        Self {
            requests,
            durations,
            request_handles: (0..METHODS * ENDPOINTS * STATUSES.len())
                .map(|_| OnceLock::new())
                .collect(),
            duration_handles: (0..METHODS * ENDPOINTS).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Counts one request and its latency.
    pub fn record(&self, method: Method, endpoint: Endpoint, status: u16, seconds: f64) {
        let route = method_index(method) * ENDPOINTS + endpoint_index(endpoint);
        match STATUSES.iter().position(|s| *s == status) {
            Some(i) => {
                self.request_handles[route * STATUSES.len() + i]
                    .get_or_init(|| {
                        self.requests.get_or_create_owned(&HttpLabels {
                            method,
                            endpoint,
                            status,
                        })
                    })
                    .inc();
            }
            None => {
                self.requests
                    .get_or_create(&HttpLabels {
                        method,
                        endpoint,
                        status,
                    })
                    .inc();
            }
        }
        self.duration_handles[route]
            .get_or_init(|| {
                self.durations
                    .get_or_create_owned(&RouteLabels { method, endpoint })
            })
            .observe(seconds);
    }
}
