//! Typed label sets. Every label value comes from a closed set (or, for devices, a
//! capped one), so no request can create unbounded series.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use std::fmt::Write;

/// HTTP method label; anything unusual counts as `OTHER`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
#[repr(u8)]
pub enum Method {
    /// GET
    Get,
    /// POST
    Post,
    /// HEAD
    Head,
    /// PUT
    Put,
    /// DELETE
    Delete,
    /// PATCH
    Patch,
    /// OPTIONS
    Options,
    /// Any other method.
    Other,
}

impl Method {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Head => "HEAD",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Patch => "PATCH",
            Method::Options => "OPTIONS",
            Method::Other => "OTHER",
        }
    }
}

impl EncodeLabelValue for Method {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// The route a request matched; `unmatched` for every unknown path.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
#[repr(u8)]
pub enum Endpoint {
    /// POST /metric
    Metric,
    /// GET /analyze
    Analyze,
    /// GET /health
    Health,
    /// GET /ready
    Ready,
    /// GET /metrics
    Metrics,
    /// Any other path.
    Unmatched,
}

impl Endpoint {
    /// The route for a path.
    pub fn from_path(path: &str) -> Self {
        match path {
            "/metric" => Endpoint::Metric,
            "/analyze" => Endpoint::Analyze,
            "/health" => Endpoint::Health,
            "/ready" => Endpoint::Ready,
            "/metrics" => Endpoint::Metrics,
            _ => Endpoint::Unmatched,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Metric => "/metric",
            Endpoint::Analyze => "/analyze",
            Endpoint::Health => "/health",
            Endpoint::Ready => "/ready",
            Endpoint::Metrics => "/metrics",
            Endpoint::Unmatched => "unmatched",
        }
    }
}

impl EncodeLabelValue for Endpoint {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

/// Labels of `http_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// Request method.
    pub method: Method,
    /// Matched route.
    pub endpoint: Endpoint,
    /// Numeric response status.
    pub status: u16,
}

/// Labels of `request_duration_seconds`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// Request method.
    pub method: Method,
    /// Matched route.
    pub endpoint: Endpoint,
}

/// Labels of `anomalies_detected_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabel {
    /// The device id, or `__other__` past MAX_DEVICE_LABELS.
    pub device_id: String,
}

/// Why an event was refused.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum RejectReason {
    /// A validation rule failed (400).
    Invalid,
    /// The body exceeded MAX_BODY_BYTES (413).
    TooLarge,
    /// MAX_PENDING_EVENTS reached (503).
    Overloaded,
    /// Shutdown has begun (503).
    ShuttingDown,
}

impl EncodeLabelValue for RejectReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            RejectReason::Invalid => "invalid",
            RejectReason::TooLarge => "too_large",
            RejectReason::Overloaded => "overloaded",
            RejectReason::ShuttingDown => "shutting_down",
        })
    }
}

/// Labels of `events_rejected_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: RejectReason,
}

/// Why the server closed a connection on its own.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum CloseReason {
    /// Request headers not complete within HEADER_READ_TIMEOUT.
    HeaderTimeout,
    /// No request within KEEP_ALIVE_TIMEOUT (or HEADER_READ_TIMEOUT on a new connection).
    IdleTimeout,
    /// A request body not complete within BODY_READ_TIMEOUT (answered 408).
    BodyTimeout,
}

impl EncodeLabelValue for CloseReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::BodyTimeout => "body_timeout",
        })
    }
}

/// Labels of `http_connections_closed_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabel {
    /// Why.
    pub reason: CloseReason,
}
