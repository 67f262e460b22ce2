//! `GET /metrics`: the Prometheus exposition, encoded by the metrics actor.

use super::errors::{full, ApiError, Body};
use super::state::AppState;
use actors::metrics::CONTENT_TYPE;
use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE as CONTENT_TYPE_HEADER};
use hyper::{Response, StatusCode};

/// Handles `GET /metrics`.
pub async fn get(state: &AppState) -> Response<Body> {
    match state.system().scrape().await {
        Ok(text) => {
            let mut response = Response::new(full(Bytes::from(text)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE_HEADER, HeaderValue::from_static(CONTENT_TYPE));
            response
        }
        Err(e) => ApiError::status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}
