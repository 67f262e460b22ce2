//! Refusing events: counting a refusal under its reason, and the refusals that
//! `POST /metric`, `POST /metric/batch` and the anomaly stream share.

use super::errors::{ApiError, Body};
use super::state::AppState;
use actors::metrics::{ReasonLabel, RejectReason};
use hyper::{Response, StatusCode};

/// Counts a refused event under its reason.
pub fn count_rejected(
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

/// The message of a refusal when the ingest log cannot be written.
pub const NOT_DURABLE: &str =
    "the ingest log (Redis) cannot be written, so the event would not survive a crash; nothing was accepted; retry shortly";

/// The message of a refusal when no node could take the event in time (a cluster).
pub const UNROUTABLE: &str =
    "the node that owns this device cannot take events right now; retry shortly";

/// The message of a refusal when the event's owner failed after the event was sent to
/// it (a cluster with the ingest log): it may have been logged there and be replayed.
pub const OUTCOME_UNKNOWN: &str =
    "the node that owns this device failed before it answered: the event may have been accepted (a retry may count it twice); retry shortly";

/// The message of every refusal during shutdown.
pub const SHUTTING_DOWN: &str = "the service is shutting down";

/// 503: the service is shutting down.
pub fn shutting_down() -> ApiError {
    ApiError::status(StatusCode::SERVICE_UNAVAILABLE, SHUTTING_DOWN)
}
