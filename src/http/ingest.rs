//! `POST /metric`: read the body within MAX_BODY_BYTES (gzip accepted), validate, hand
//! the event to its device, answer 200 once it is queued.

use super::body;
use super::errors::{json, ApiError, Body};
use super::refusal::{count_rejected, shutting_down, NOT_DURABLE, OUTCOME_UNKNOWN, UNROUTABLE};
use super::request_log::DeviceNote;
use super::state::AppState;
use super::validate;
use crate::auth::Mode;
use actors::device::SubmitError;
use actors::metrics::RejectReason;
use chrono::Utc;
use hyper::body::Incoming;
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

async fn accept(
    state: &AppState,
    req: Request<Incoming>,
) -> Result<Response<Body>, (RejectReason, ApiError)> {
    if state.is_shutting_down() {
        return Err((RejectReason::ShuttingDown, shutting_down()));
    }
    let client = state
        .authorize(&req, Mode::Write)
        .map_err(|e| (RejectReason::Unauthorized, e))?;
    let received = Utc::now();
    let limit = state.body_limits().event();
    let body = body::read(req, limit, state.http_metrics()).await?;
    let (device_id, event) =
        validate::event(&body, received).map_err(|e| (RejectReason::Invalid, e))?;
    state
        .authorize_device(client.as_ref(), &device_id, Mode::Write)
        .map_err(|e| (RejectReason::Unauthorized, e))?;
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
        Err(SubmitError::Unroutable) => refused(
            RejectReason::Unroutable,
            ApiError::status(StatusCode::SERVICE_UNAVAILABLE, UNROUTABLE),
        ),
        Err(SubmitError::NotDurable) => refused(
            RejectReason::NotDurable,
            ApiError::status(StatusCode::SERVICE_UNAVAILABLE, NOT_DURABLE),
        ),
        Err(SubmitError::OutcomeUnknown) => refused(
            RejectReason::OutcomeUnknown,
            ApiError::status(StatusCode::SERVICE_UNAVAILABLE, OUTCOME_UNKNOWN),
        ),
    }
}
