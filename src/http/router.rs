//! The router: looks a request up in the route table ([`super::routes::ROUTES`]), hands
//! it to its endpoint's handler in one `match`, and counts every response in the request
//! metrics.

use super::errors::{json_bytes, ApiError, Body};
use super::metrics::MethodLabel;
use super::query::query_param;
use super::request_log::{DeviceNote, Failure, Verdict};
use super::routes::{Endpoint, OPENAPI};
use super::state::AppState;
use super::{analyze, batch, ingest, probes, scrape, stream};
use bytes::Bytes;
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::{Request, Response, StatusCode};
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

/// Serves one request.
pub async fn handle(state: AppState, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let method = MethodLabel::of(req.method());
    let endpoint = Endpoint::of_path(req.uri().path());
    let metrics = state.http_metrics().clone();
    let log = state.request_log().clone();
    let id = log.id(req.headers().get(REQUEST_ID).map(HeaderValue::as_bytes));
    let (verb, uri) = (req.method().clone(), req.uri().clone());
    let mut response = guarded(route(state, req, endpoint)).await;
    let status = response.status();
    metrics.record(
        method,
        endpoint,
        status.as_u16(),
        started.elapsed().as_secs_f64(),
    );
    if status.as_u16() >= 400 {
        if let Verdict::Write { suppressed } = log.admit(started) {
            let failure = response.extensions().get::<Failure>();
            let device = response
                .extensions()
                .get::<DeviceNote>()
                .map(|d| d.0.clone())
                .or_else(|| query_param(&uri, "device_id"));
            tracing::warn!(
                request_id = %id,
                method = %verb,
                path = uri.path(),
                status = status.as_u16(),
                reason = failure.map_or("", |f| f.reason.as_str()),
                field = failure.and_then(|f| f.field),
                device_id = device.as_deref(),
                suppressed_since_last = suppressed,
                "request failed"
            );
        }
    }
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, value);
    }
    Ok(response)
}

/// `X-Request-Id`.
const REQUEST_ID: &str = "x-request-id";

/// 404 for an unknown path, 405 with `Allow` for a known path and another method.
async fn route(state: AppState, req: Request<Incoming>, endpoint: Endpoint) -> Response<Body> {
    match endpoint.route() {
        Some(route) if req.method() == route.method => dispatch(state, req, endpoint).await,
        Some(route) => {
            let mut response = ApiError::status(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{} is not allowed on {}; use {}",
                    req.method(),
                    route.path,
                    route.method
                ),
            )
            .into_response();
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(route.method.as_str()));
            response
        }
        None => not_found(&req),
    }
}

/// Serves a request that matched `endpoint`'s route.
async fn dispatch(state: AppState, req: Request<Incoming>, endpoint: Endpoint) -> Response<Body> {
    match endpoint {
        Endpoint::Metric => ingest::post(&state, req).await,
        Endpoint::MetricBatch => batch::post(&state, req).await,
        Endpoint::Analyze => analyze::get(&state, &req).await,
        Endpoint::AnomalyStream => stream::get(&state, req).await,
        Endpoint::Health => probes::health(),
        Endpoint::Ready => probes::ready(&state),
        Endpoint::Metrics => scrape::get(&state).await,
        Endpoint::OpenApi => json_bytes(StatusCode::OK, Bytes::from_static(OPENAPI.as_bytes())),
        Endpoint::Unmatched => not_found(&req),
    }
}

/// 404 for a path outside the route table.
fn not_found<B>(req: &Request<B>) -> Response<Body> {
    ApiError::status(
        StatusCode::NOT_FOUND,
        format!("no route for {}", req.uri().path()),
    )
    .into_response()
}

/// Runs a handler; a panic in it becomes a 500 for this request alone. The few locks a
/// handler takes recover from poisoning, and the actors sit behind messages, so nothing
/// is left half-updated for the next request.
async fn guarded(handler: impl Future<Output = Response<Body>>) -> Response<Body> {
    match AssertUnwindSafe(handler).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %what, "request handler panicked");
            ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "internal error").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_500_and_the_next_request_is_served() {
        let crashed = guarded(async { panic!("boom") }).await;
        assert_eq!(crashed.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let fine = guarded(async { probes::health() }).await;
        assert_eq!(fine.status(), StatusCode::OK);
    }
}
