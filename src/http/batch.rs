//! `POST /metric/batch`: many events in one request, as NDJSON or a JSON array, gzip or
//! not. Each event is checked on its own; the valid ones are admitted together (all of
//! them or, at MAX_PENDING_EVENTS, none), the invalid ones are listed by position.

use super::body;
use super::errors::{json, ApiError, Body};
use super::refusal::{
    count_rejected, shutting_down, NOT_DURABLE, OUTCOME_UNKNOWN, SHUTTING_DOWN, UNROUTABLE,
};
use super::request_log::Failure;
use super::state::AppState;
use super::validate::{self, BatchError};
use crate::auth::{Client, Mode};
use actors::device::SubmitError;
use actors::metrics::{ReasonLabel, RejectReason};
use chrono::Utc;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, RETRY_AFTER};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use std::sync::Arc;

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

/// Handles `POST /metric/batch`: read the body, decode it into events, keep those the
/// token may write, submit them together, answer with the per-event errors.
pub async fn post(state: &AppState, req: Request<Incoming>) -> Response<Body> {
    match post_steps(state, req).await {
        Ok(response) => response,
        Err((reason, error)) => count_rejected(state, reason, error.into_response()),
    }
}

/// A refusal of the whole request, counted as one event under its reason.
type Refusal = (RejectReason, ApiError);

async fn post_steps(state: &AppState, req: Request<Incoming>) -> Result<Response<Body>, Refusal> {
    if state.is_shutting_down() {
        return Err((RejectReason::ShuttingDown, shutting_down()));
    }
    let client = state
        .authorize(&req, Mode::Write)
        .map_err(|e| (RejectReason::Unauthorized, e))?;
    let received = Utc::now();
    let limits = state.body_limits();
    let body = body::read(req, limits.batch(), state.http_metrics()).await?;
    let items = decode(&body, received, limits.max_batch_events)?;
    state.http_metrics().batch_size(items.len());
    let sorted = sort(state, client.as_ref(), items);
    Ok(submit(state, sorted).await)
}

/// The batch's items, each an event or why it is not one; a batch that is not one at
/// all, too large or empty is refused whole.
fn decode(
    body: &[u8],
    received: chrono::DateTime<Utc>,
    max_events: usize,
) -> Result<Vec<validate::BatchItem<'_>>, Refusal> {
    let items = validate::batch(body, received, max_events).map_err(|e| match e {
        BatchError::TooMany => (
            RejectReason::TooLarge,
            ApiError::status(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the batch holds more than MAX_BATCH_EVENTS ({max_events}) events"),
            ),
        ),
        BatchError::Malformed(error) => (RejectReason::Invalid, error),
    })?;
    if items.is_empty() {
        return Err((
            RejectReason::Invalid,
            ApiError::bad_body("the batch holds no events"),
        ));
    }
    Ok(items)
}

/// A batch's events split into those to submit and those refused.
struct Sorted<'a> {
    /// The events to submit, in request order.
    events: Vec<validate::Decoded<'a>>,
    /// Each submitted event's position in the request.
    positions: Vec<usize>,
    /// The refused ones, invalid or outside the token's prefix.
    errors: Vec<ItemError>,
    /// How many of `errors` are outside the token's prefix.
    forbidden: usize,
}

/// Splits `items` into valid events the token may write and per-event errors, and counts
/// the refused ones.
fn sort<'a>(
    state: &AppState,
    client: Option<&Arc<Client>>,
    items: Vec<validate::BatchItem<'a>>,
) -> Sorted<'a> {
    let mut sorted = Sorted {
        events: Vec::with_capacity(items.len()),
        positions: Vec::with_capacity(items.len()),
        errors: Vec::new(),
        forbidden: 0,
    };
    for (index, item) in items {
        let item = item.and_then(|(device, event)| {
            state
                .authorize_device(client, &device, Mode::Write)
                .inspect_err(|_| sorted.forbidden += 1)
                .map(|()| (device, event))
        });
        match item {
            Ok(event) => {
                sorted.positions.push(index);
                sorted.events.push(event);
            }
            Err(e) => sorted.errors.push(ItemError {
                index,
                status: e.status.as_u16(),
                error: e.message,
                field: e.field,
            }),
        }
    }
    count(
        state,
        RejectReason::Invalid,
        sorted.errors.len() - sorted.forbidden,
    );
    count(state, RejectReason::Unauthorized, sorted.forbidden);
    sorted
}

/// Counts `n` refused events under `reason`.
fn count(state: &AppState, reason: RejectReason, n: usize) {
    state
        .system()
        .metrics()
        .events_rejected
        .get_or_create(&ReasonLabel { reason })
        .inc_by(n as u64);
}

/// Submits the valid events together and answers: 200 with the per-event errors, or a
/// refusal of the whole batch when nothing could be accepted.
async fn submit(state: &AppState, sorted: Sorted<'_>) -> Response<Body> {
    let Sorted {
        events,
        positions,
        mut errors,
        forbidden,
    } = sorted;
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
            count(state, RejectReason::Overloaded, refused_positions.len());
            for p in &refused_positions {
                errors.push(ItemError {
                    index: positions[*p],
                    status: 503,
                    error: "not queued: the node owning this device is overloaded (MAX_PENDING_EVENTS) or unreachable; retry this event".into(),
                    field: None,
                });
            }
            let accepted = valid - refused_positions.len();
            state
                .system()
                .metrics()
                .events_accepted
                .inc_by(accepted as u64);
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
                SubmitError::OutcomeUnknown => (RejectReason::OutcomeUnknown, OUTCOME_UNKNOWN),
            };
            count(state, reason, valid);
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
