//! `POST /metric`: read the body within MAX_BODY_BYTES, validate, hand the event to its
//! device, answer 200 once it is queued.

use super::errors::{json, ApiError, Body};
use super::metrics::CloseReason;
use super::request_log::DeviceNote;
use super::{validate, AppState};
use actors::device::SubmitError;
use actors::metrics::{ReasonLabel, RejectReason};
use chrono::Utc;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_LENGTH;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

#[derive(Serialize)]
struct Accepted<'a> {
    status: &'static str,
    device_id: &'a str,
}

/// Handles `POST /metric`.
pub async fn post(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    match accept(state, req).await {
        Ok(response) => response,
        Err((reason, error)) => count_rejected(state, reason, error.into_response()),
    }
}

/// Counts a refused event under its reason.
fn count_rejected(
    state: &AppState,
    reason: RejectReason,
    response: Response<Body>,
) -> Response<Body> {
    state
        .system()
        .metrics()
        .events_rejected
        .get_or_create(&ReasonLabel { reason })
        .inc();
    response
}

async fn accept(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<Body>, (RejectReason, ApiError)> {
    if state.is_shutting_down() {
        return Err((RejectReason::ShuttingDown, shutting_down()));
    }
    let limit = state.inner.max_body_bytes;
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err((RejectReason::TooLarge, too_large(limit)));
    }
    let received = Utc::now();
    let timeout = state.inner.body_read_timeout;
    let reading = tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect());
    let body = match reading.await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err((RejectReason::TooLarge, too_large(limit)));
        }
        Ok(Err(e)) => {
            return Err((
                RejectReason::Invalid,
                ApiError::bad_body(format!("could not read the request body: {e}")),
            ));
        }
        Err(_) => {
            state.http_metrics().closed(CloseReason::BodyTimeout);
            let mut error = ApiError::status(
                StatusCode::REQUEST_TIMEOUT,
                format!("request body not received within BODY_READ_TIMEOUT ({timeout:?})"),
            );
            error.close = true;
            return Err((RejectReason::Invalid, error));
        }
    };
    let (device_id, event) =
        validate::event(&body, received).map_err(|e| (RejectReason::Invalid, e))?;
    let metrics = state.system().metrics();
    let refused = |reason, error: ApiError| {
        let mut response = error.into_response();
        response
            .extensions_mut()
            .insert(DeviceNote(device_id.to_string()));
        Ok::<_, (RejectReason, ApiError)>(count_rejected(state, reason, response))
    };
    match state.submit(&device_id, event).await {
        Ok(()) => {
            metrics.events_accepted.inc();
            Ok(json(
                StatusCode::OK,
                &Accepted {
                    status: "accepted",
                    device_id: &device_id,
                },
            ))
        }
        Err(SubmitError::Overloaded) => refused(
            RejectReason::Overloaded,
            ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many events pending (MAX_PENDING_EVENTS); retry shortly",
            ),
        ),
        Err(SubmitError::Unavailable | SubmitError::HandedOff) => {
            refused(RejectReason::ShuttingDown, shutting_down())
        }
    }
}

fn too_large(limit: usize) -> ApiError {
    ApiError::status(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body exceeds MAX_BODY_BYTES ({limit} bytes)"),
    )
}

fn shutting_down() -> ApiError {
    ApiError::status(
        StatusCode::SERVICE_UNAVAILABLE,
        "the service is shutting down",
    )
}
