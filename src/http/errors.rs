//! The response body type, the JSON error body every failure answers with,
//! `{"error": …, "field": …}`, and the small response helpers the endpoints share.

use super::request_log::Failure;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use hyper::{Response, StatusCode};
use serde::Serialize;
use std::convert::Infallible;

/// The response body type of every endpoint, boxed (as in hyper's `web_api.rs`) so that a
/// whole body and one fed frame by frame (`/anomalies/stream`) are the same type and
/// nothing here needs to know the kinds.
pub type Body = BoxBody<Bytes, Infallible>;

/// A whole body.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes).boxed()
}

const JSON: HeaderValue = HeaderValue::from_static("application/json");

/// A request that cannot be served, with the status it maps to.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub field: Option<&'static str>,
    /// Close the connection after answering (the rest of the request cannot be trusted).
    pub close: bool,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    field: Option<&'a str>,
}

impl ApiError {
    /// 400 naming the field at fault.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            field: Some(field),
            close: false,
        }
    }

    /// 400 about the body as a whole.
    pub fn bad_body(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            field: None,
            close: false,
        }
    }

    /// Any status without a field.
    pub fn status(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            field: None,
            close: false,
        }
    }

    /// The response; 503s carry `Retry-After: 1`, 401s the `WWW-Authenticate` challenge.
    /// The reason rides along for the log.
    pub fn into_response(self) -> Response<Body> {
        let mut response = json(
            self.status,
            &ErrorBody {
                error: &self.message,
                field: self.field,
            },
        );
        response.extensions_mut().insert(Failure {
            reason: self.message,
            field: self.field,
        });
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static(r#"Bearer realm="iot-processor""#),
            );
        }
        if self.close {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, body: &T) -> Response<Body> {
    // Serialising our own plain structs cannot fail; fall back to an empty object anyway.
    let bytes = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    json_bytes(status, Bytes::from(bytes))
}

/// A response whose body is already JSON.
pub fn json_bytes(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut response = Response::new(full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, JSON);
    response
}
