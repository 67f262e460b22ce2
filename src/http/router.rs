//! The router: one `match` on (method, route), and the request metrics every response
//! is counted in.

use super::errors::{ApiError, Body};
use super::{analyze, ingest, probes, scrape, AppState};
use actors::metrics::{Endpoint, Method as MethodLabel};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW};
use hyper::{Method, Request, Response, StatusCode};
use std::convert::Infallible;
use std::time::Instant;

/// Serves one request.
pub async fn handle(state: AppState, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let method = method_label(req.method());
    let endpoint = Endpoint::from_path(req.uri().path());
    let response = match (req.method(), endpoint) {
        (&Method::POST, Endpoint::Metric) => ingest::post(&state, req).await,
        (&Method::GET, Endpoint::Analyze) => analyze::get(&state, req.uri()).await,
        (&Method::GET, Endpoint::Health) => probes::health(),
        (&Method::GET, Endpoint::Ready) => probes::ready(&state),
        (&Method::GET, Endpoint::Metrics) => scrape::get(&state).await,
        (_, Endpoint::Unmatched) => ApiError::status(
            StatusCode::NOT_FOUND,
            format!("no route for {}", req.uri().path()),
        )
        .into_response(),
        (_, known) => method_not_allowed(req.method(), known),
    };
    state.system().metrics().http.record(
        method,
        endpoint,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    Ok(response)
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
