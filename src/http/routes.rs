//! The one route table: every path the service answers, its method, and the `endpoint`
//! label its requests are counted under. The router (its `match` names each [`Endpoint`],
//! so the compiler checks that every one has a handler), the `Allow` header and the
//! request metrics all derive from [`ROUTES`].

use hyper::Method;
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use std::fmt::Write;

/// One entry of the table.
pub struct Route {
    /// Which endpoint it is (its position in [`ROUTES`]).
    pub endpoint: Endpoint,
    /// The exact path (queries are the handler's business); also the metric label.
    pub path: &'static str,
    /// The one method served; any other gets 405 with this in `Allow`.
    pub method: Method,
}

/// Every route of the public listener, in the order of [`Endpoint`]'s variants.
pub static ROUTES: [Route; 8] = [
    Route {
        endpoint: Endpoint::Metric,
        path: "/metric",
        method: Method::POST,
    },
    Route {
        endpoint: Endpoint::MetricBatch,
        path: "/metric/batch",
        method: Method::POST,
    },
    Route {
        endpoint: Endpoint::Analyze,
        path: "/analyze",
        method: Method::GET,
    },
    Route {
        endpoint: Endpoint::AnomalyStream,
        path: "/anomalies/stream",
        method: Method::GET,
    },
    Route {
        endpoint: Endpoint::Health,
        path: "/health",
        method: Method::GET,
    },
    Route {
        endpoint: Endpoint::Ready,
        path: "/ready",
        method: Method::GET,
    },
    Route {
        endpoint: Endpoint::Metrics,
        path: "/metrics",
        method: Method::GET,
    },
    Route {
        endpoint: Endpoint::OpenApi,
        path: "/openapi.json",
        method: Method::GET,
    },
];

/// The OpenAPI 3.1 document of this API (`openapi.json` at the repository's root).
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The `endpoint` label: a route of [`ROUTES`], or `unmatched` for any other path (so
/// random paths cannot create series).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /metric`.
    Metric,
    /// `POST /metric/batch`.
    MetricBatch,
    /// `GET /analyze`.
    Analyze,
    /// `GET /anomalies/stream`.
    AnomalyStream,
    /// `GET /health`.
    Health,
    /// `GET /ready`.
    Ready,
    /// `GET /metrics`.
    Metrics,
    /// `GET /openapi.json`.
    OpenApi,
    /// Every other path.
    Unmatched,
}

impl Endpoint {
    /// Every other path.
    pub const UNMATCHED: Endpoint = Endpoint::Unmatched;
    /// How many distinct labels exist.
    pub const COUNT: usize = ROUTES.len() + 1;

    /// The endpoint a path belongs to.
    pub fn of_path(path: &str) -> Self {
        ROUTES
            .iter()
            .find(|r| r.path == path)
            .map_or(Self::UNMATCHED, |r| r.endpoint)
    }

    /// Its route, unless unmatched.
    pub fn route(self) -> Option<&'static Route> {
        ROUTES.get(self.index())
    }

    /// A dense index in `0..COUNT`, for tables of cached series.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        self.route().map_or("unmatched", |r| r.path)
    }
}

impl EncodeLabelValue for Endpoint {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_its_own_endpoint_and_anything_else_is_unmatched() {
        for (i, route) in ROUTES.iter().enumerate() {
            let endpoint = Endpoint::of_path(route.path);
            assert_eq!(endpoint.index(), i);
            assert_eq!(endpoint.as_str(), route.path);
        }
        for path in [
            "/",
            "/metric/",
            "/metric/batch/",
            "/METRIC",
            "/analyze/x",
            "",
        ] {
            assert_eq!(Endpoint::of_path(path), Endpoint::UNMATCHED, "{path}");
        }
        assert_eq!(Endpoint::UNMATCHED.as_str(), "unmatched");
        assert_eq!(Endpoint::UNMATCHED.index(), Endpoint::COUNT - 1);
    }

    #[test]
    fn the_openapi_document_describes_exactly_these_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("valid JSON");
        assert_eq!(doc["openapi"], "3.1.0");
        let paths = doc["paths"].as_object().expect("paths");
        assert_eq!(paths.len(), ROUTES.len(), "one entry per route");
        for route in &ROUTES {
            let ops = paths[route.path]
                .as_object()
                .unwrap_or_else(|| panic!("{} missing", route.path));
            let method = route.method.as_str().to_ascii_lowercase();
            assert_eq!(
                ops.keys().collect::<Vec<_>>(),
                vec![&method],
                "{}",
                route.path
            );
        }
    }

    #[test]
    fn paths_are_unique() {
        let mut paths: Vec<_> = ROUTES.iter().map(|r| r.path).collect();
        paths.sort_unstable();
        paths.dedup();
        assert_eq!(paths.len(), ROUTES.len());
    }
}
