//! The router: one `match` on (method, route), and the request metrics every response
//! is counted in.

use super::errors::{ApiError, Body};
use super::{analyze, ingest, probes, scrape, AppState};
use actors::metrics::{Endpoint, Method as MethodLabel};
use futures_util::FutureExt;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

/// Serves one request.
pub async fn handle(state: AppState, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let method = method_label(req.method());
    let endpoint = Endpoint::from_path(req.uri().path());
    let response = guarded(route(&state, req, endpoint)).await;
    state.system().metrics().http.record(
        method,
        endpoint,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    Ok(response)
}

/// The one match: (method, route) to endpoint.
async fn route(state: &AppState, req: Request<Incoming>, endpoint: Endpoint) -> Response<Body> {
    match (req.method(), endpoint) {
        (&Method::POST, Endpoint::Metric) => ingest::post(state, req).await,
        (&Method::GET, Endpoint::Analyze) => analyze::get(state, req.uri()).await,
        (&Method::GET, Endpoint::Health) => probes::health(),
        (&Method::GET, Endpoint::Ready) => probes::ready(state),
        (&Method::GET, Endpoint::Metrics) => scrape::get(state).await,
        (_, Endpoint::Unmatched) => ApiError::status(
            StatusCode::NOT_FOUND,
            format!("no route for {}", req.uri().path()),
        )
        .into_response(),
        (_, known) => method_not_allowed(req.method(), known),
    }
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

fn method_not_allowed(method: &Method, endpoint: Endpoint) -> Response<Body> {
    let allow = if endpoint == Endpoint::Metric {
        "POST"
    } else {
        "GET"
    };
    let mut response = ApiError::status(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{method} is not allowed on {}; use {allow}",
            endpoint.as_str()
        ),
    )
    .into_response();
    response
        .headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    response
}

fn method_label(method: &Method) -> MethodLabel {
    match *method {
        Method::GET => MethodLabel::Get,
        Method::POST => MethodLabel::Post,
        Method::HEAD => MethodLabel::Head,
        Method::PUT => MethodLabel::Put,
        Method::DELETE => MethodLabel::Delete,
        Method::PATCH => MethodLabel::Patch,
        Method::OPTIONS => MethodLabel::Options,
        _ => MethodLabel::Other,
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
