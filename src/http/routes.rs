//! The one route table: every path the service answers, its methods, its handler and
//! the `endpoint` label its requests are counted under. The router, the `Allow` header
//! and the request metrics all derive from [`ROUTES`], so adding an endpoint is one entry.

use super::errors::{json_bytes, Body};
use super::{analyze, batch, ingest, probes, scrape, stream, AppState};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{EncodeLabelValue, LabelValueEncoder};
use std::fmt::Write;
use std::future::Future;
use std::pin::Pin;

/// A handler's answer, boxed so that handlers of different shapes fit in one table.
pub type Answer = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// One entry of the table.
pub struct Route {
    /// The exact path (queries are the handler's business); also the metric label.
    pub path: &'static str,
    /// The one method served; any other gets 405 with this in `Allow`.
    pub method: Method,
    /// Serves a request that matched.
    pub handler: fn(AppState, Request<Incoming>) -> Answer,
}

/// Every route of the public listener.
pub static ROUTES: [Route; 8] = [
    Route {
        path: "/metric",
        method: Method::POST,
        handler: |state, req| Box::pin(async move { ingest::post(&state, req).await }),
    },
    Route {
        path: "/metric/batch",
        method: Method::POST,
        handler: |state, req| Box::pin(async move { batch::post(&state, req).await }),
    },
    Route {
        path: "/analyze",
        method: Method::GET,
        handler: |state, req| Box::pin(async move { analyze::get(&state, &req).await }),
    },
    Route {
        path: "/anomalies/stream",
        method: Method::GET,
        handler: |state, req| Box::pin(async move { stream::get(&state, req).await }),
    },
    Route {
        path: "/health",
        method: Method::GET,
        handler: |_, _| Box::pin(async { probes::health() }),
    },
    Route {
        path: "/ready",
        method: Method::GET,
        handler: |state, _| Box::pin(async move { probes::ready(&state) }),
    },
    Route {
        path: "/metrics",
        method: Method::GET,
        handler: |state, _| Box::pin(async move { scrape::get(&state).await }),
    },
    Route {
        path: "/openapi.json",
        method: Method::GET,
        handler: |_, _| {
            Box::pin(async { json_bytes(StatusCode::OK, Bytes::from_static(OPENAPI.as_bytes())) })
        },
    },
];

/// The OpenAPI 3.1 document of this API (`openapi.json` at the repository's root).
pub const OPENAPI: &str = include_str!("../../openapi.json");

/// The `endpoint` label: a route of [`ROUTES`], or `unmatched` for any other path (so
/// random paths cannot create series).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct Endpoint(usize);

impl Endpoint {
    /// Every other path.
    pub const UNMATCHED: Endpoint = Endpoint(ROUTES.len());
    /// How many distinct labels exist.
    pub const COUNT: usize = ROUTES.len() + 1;

    /// The endpoint a path belongs to.
    pub fn of_path(path: &str) -> Self {
        ROUTES
            .iter()
            .position(|r| r.path == path)
            .map_or(Self::UNMATCHED, Endpoint)
    }

    /// Its route, unless unmatched.
    pub fn route(self) -> Option<&'static Route> {
        ROUTES.get(self.0)
    }

    /// A dense index in `0..COUNT`, for tables of cached series.
    pub fn index(self) -> usize {
        self.0
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
