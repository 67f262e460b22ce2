//! `GET /analyze?device_id=ID`: the device's latest analysis, read from the store.

use super::errors::{json_bytes, ApiError, Body};
use super::query::query_param;
use super::state::AppState;
use super::validate;
use crate::auth::Mode;
use actors::store::analysis_key;
use hyper::{Request, Response, StatusCode};

/// Handles `GET /analyze`.
pub async fn get<B>(state: &AppState, req: &Request<B>) -> Response<Body> {
    match analyze(state, req).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn analyze<B>(state: &AppState, req: &Request<B>) -> Result<Response<Body>, ApiError> {
    let client = state.authorize(req, Mode::Read)?;
    let id = query_param(req.uri(), "device_id")
        .ok_or_else(|| ApiError::invalid("device_id", "query parameter device_id is required"))?;
    validate::device_id(&id)?;
    state.authorize_device(client.as_ref(), &id, Mode::Read)?;
    match state.system().store().get(&analysis_key(&id)).await {
        Ok(Some(body)) => Ok(json_bytes(StatusCode::OK, body)),
        Ok(None) => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            ..ApiError::invalid(
                "device_id",
                format!("no analysis for device {id} within RESULT_TTL"),
            )
        }),
        Err(e) => {
            // The client learns that the store is down; the operator, why (in the log).
            tracing::warn!(error = %e, device_id = %id, "analyze: store read failed");
            Err(ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                "the store is unavailable; retry shortly",
            ))
        }
    }
}
