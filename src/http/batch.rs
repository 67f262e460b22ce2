//! `POST /metric/batch`: many events in one request, as NDJSON or a JSON array, gzip or
//! not. Each event is checked on its own; the valid ones are admitted together (all of
//! them or, at MAX_PENDING_EVENTS, none), the invalid ones are listed by position.

use super::body::{self, Limit};
use super::errors::{json, ApiError, Body};
use super::refusal::{count_rejected, shutting_down, NOT_DURABLE, SHUTTING_DOWN, UNROUTABLE};
use super::request_log::Failure;
use super::state::AppState;
use super::validate::{self, BatchError};
use crate::auth::Mode;
use actors::device::SubmitError;
use actors::metrics::{ReasonLabel, RejectReason};
use chrono::Utc;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

/// Item errors listed in one answer at most (the count is always complete).
pub const MAX_LISTED_ERRORS: usize = 100;

/// One event of the batch that was not accepted.
#[derive(Serialize)]
struct ItemError {
    index: usize,
    /// The status the event would have got on its own (400; 403 for a device outside
    /// the token's prefix; 503 when its owner in a cluster was overloaded).
    status: u16,
    error: String,
    field: Option<&'static str>,
}

#[derive(Serialize)]
struct Answer {
    /// `accepted`, `partial` or `rejected`.
    status: &'static str,
    /// Only when nothing was accepted: why, as in every error body.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'static str>,
    accepted: usize,
    rejected: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    errors: Vec<ItemError>,
}

/// Handles `POST /metric/batch`.
pub async fn post(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    if state.is_shutting_down() {
        return count_rejected(
            state,
            RejectReason::ShuttingDown,
            shutting_down().into_response(),
        );
    }
    let client = match state.authorize(&req, Mode::Write) {
        Ok(client) => client,
        Err(e) => return count_rejected(state, RejectReason::Unauthorized, e.into_response()),
    };
    let received = Utc::now();
    let inner = state.body_limits();
    let limit = Limit {
        bytes: inner.max_batch_bytes,
        setting: "MAX_BATCH_BYTES",
        timeout: inner.body_read_timeout,
    };
    let body = match body::read(req, limit, state.http_metrics()).await {
        Ok(body) => body,
        Err((reason, error)) => return count_rejected(state, reason, error.into_response()),
    };
    let items = match validate::batch(&body, received, inner.max_batch_events) {
        Ok(items) => items,
        Err(BatchError::TooMany) => {
            let error = ApiError::status(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the batch holds more than MAX_BATCH_EVENTS ({}) events",
                    inner.max_batch_events
                ),
            );
            return count_rejected(state, RejectReason::TooLarge, error.into_response());
        }
        Err(BatchError::Malformed(error)) => {
            return count_rejected(state, RejectReason::Invalid, error.into_response());
        }
    };
    if items.is_empty() {
        let error = ApiError::bad_body("the batch holds no events");
        return count_rejected(state, RejectReason::Invalid, error.into_response());
    }
    state.http_metrics().batch_size(items.len());

    let mut errors = Vec::new();
    let mut positions = Vec::with_capacity(items.len());
    let mut events = Vec::with_capacity(items.len());
    let mut forbidden = 0;
    for (index, item) in items {
        let item = item.and_then(|(device, event)| {
            state
                .authorize_device(client.as_ref(), &device, Mode::Write)
                .inspect_err(|_| forbidden += 1)
                .map(|()| (device, event))
        });
        match item {
            Ok(event) => {
                positions.push(index);
                events.push(event);
            }
            Err(e) => errors.push(ItemError {
                index,
                status: e.status.as_u16(),
                error: e.message,
                field: e.field,
            }),
        }
    }
    let metrics = state.system().metrics();
    let count = |reason, n: usize| {
        metrics
            .events_rejected
            .get_or_create(&ReasonLabel { reason })
            .inc_by(n as u64);
    };
    count(RejectReason::Invalid, errors.len() - forbidden);
    count(RejectReason::Unauthorized, forbidden);
    let valid = events.len();
    if valid == 0 {
        let rejected = errors.len();
        let (status, message) = if forbidden == rejected {
            (
                StatusCode::FORBIDDEN,
                "the token may not write any device of the batch",
            )
        } else {
            (StatusCode::BAD_REQUEST, "no event in the batch is valid")
        };
        return refused(status, message, errors, rejected);
    }
    match state.submit_batch(events).await {
        Ok(refused_positions) => {
            count(RejectReason::Overloaded, refused_positions.len());
            for p in &refused_positions {
                errors.push(ItemError {
                    index: positions[*p],
                    status: 503,
                    error: "not queued: the node owning this device is overloaded (MAX_PENDING_EVENTS) or unreachable; retry this event".into(),
                    field: None,
                });
            }
            let accepted = valid - refused_positions.len();
            metrics.events_accepted.inc_by(accepted as u64);
            errors.sort_unstable_by_key(|e| e.index);
            let rejected = errors.len();
            errors.truncate(MAX_LISTED_ERRORS);
            json(
                StatusCode::OK,
                &Answer {
                    status: if rejected == 0 { "accepted" } else { "partial" },
                    error: None,
                    field: None,
                    accepted,
                    rejected,
                    errors,
                },
            )
        }
        Err(e) => {
            let (reason, message) = match e {
                SubmitError::Overloaded => (
                    RejectReason::Overloaded,
                    "too many events pending (MAX_PENDING_EVENTS); nothing in this batch was accepted; retry shortly",
                ),
                SubmitError::Unavailable | SubmitError::HandedOff => {
                    (RejectReason::ShuttingDown, SHUTTING_DOWN)
                }
                SubmitError::Unroutable => (RejectReason::Unroutable, UNROUTABLE),
                SubmitError::NotDurable => (RejectReason::NotDurable, NOT_DURABLE),
            };
            count(reason, valid);
            let rejected = valid + errors.len();
            refused(StatusCode::SERVICE_UNAVAILABLE, message, errors, rejected)
        }
    }
}

/// Nothing accepted (`rejected` events): the error body plus the per-event errors found.
fn refused(
    status: StatusCode,
    message: &'static str,
    mut errors: Vec<ItemError>,
    rejected: usize,
) -> Response<Body> {
    let field = match errors.as_slice() {
        [only] => only.field,
        _ => None,
    };
    errors.truncate(MAX_LISTED_ERRORS);
    let mut response = json(
        status,
        &Answer {
            status: "rejected",
            error: Some(message),
            field,
            accepted: 0,
            rejected,
            errors,
        },
    );
    response.extensions_mut().insert(Failure {
        reason: message.to_string(),
        field,
    });
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    response
}
