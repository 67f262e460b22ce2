//! `POST /metric`: read the body within MAX_BODY_BYTES (gzip accepted), validate, hand the event to its
//! device, answer 200 once it is queued.

use super::errors::{json, ApiError, Body};
use super::request_log::DeviceNote;
use super::{body, validate, AppState};
use crate::auth::Mode;
use actors::device::SubmitError;
use actors::metrics::{ReasonLabel, RejectReason};
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

/// Counts a refused event under its reason.
pub(super) fn count_rejected(
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
    let client = state
        .authorize(&req, Mode::Write)
        .map_err(|e| (RejectReason::Unauthorized, e))?;
    let received = Utc::now();
    let body = body::read(state, req, state.inner.max_body_bytes, "MAX_BODY_BYTES").await?;
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
    }
}

/// The message of a refusal when the ingest log cannot be written.
pub(super) const NOT_DURABLE: &str =
    "the ingest log (Redis) cannot be written, so the event would not survive a crash; nothing was accepted; retry shortly";

/// The message of a refusal when no node could take the event in time (a cluster).
pub(super) const UNROUTABLE: &str =
    "the node that owns this device cannot take events right now; retry shortly";

/// The message of every refusal during shutdown.
pub(super) const SHUTTING_DOWN: &str = "the service is shutting down";

pub(super) fn shutting_down() -> ApiError {
    ApiError::status(StatusCode::SERVICE_UNAVAILABLE, SHUTTING_DOWN)
}
