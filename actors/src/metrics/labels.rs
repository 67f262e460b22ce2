//! Typed label sets. Every label value comes from a closed set (or, for devices, a
//! capped one), so no request can create unbounded series.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use std::fmt::Write;

/// Labels of `anomalies_detected_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabel {
    /// The device id, or `__other__` past MAX_DEVICE_LABELS.
    pub device_id: String,
    /// `rps` or `cpu`.
    pub signal: &'static str,
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
    /// No valid token, or one that may not write this device (401, 403).
    Unauthorized,
    /// In a cluster: the shard's owner could not take the event in time (503).
    Unroutable,
    /// The ingest log could not be written (503).
    NotDurable,
    /// In a cluster with the ingest log: the owner the event was sent to failed before it
    /// answered, so the event may have been taken (503).
    OutcomeUnknown,
}

impl RejectReason {
    /// Every reason, for pre-creating the series.
    pub const ALL: [RejectReason; 8] = [
        RejectReason::Invalid,
        RejectReason::TooLarge,
        RejectReason::Overloaded,
        RejectReason::ShuttingDown,
        RejectReason::Unauthorized,
        RejectReason::Unroutable,
        RejectReason::NotDurable,
        RejectReason::OutcomeUnknown,
    ];
}

impl EncodeLabelValue for RejectReason {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            RejectReason::Invalid => "invalid",
            RejectReason::TooLarge => "too_large",
            RejectReason::Overloaded => "overloaded",
            RejectReason::ShuttingDown => "shutting_down",
            RejectReason::Unauthorized => "unauthorized",
            RejectReason::Unroutable => "unroutable",
            RejectReason::NotDurable => "not_durable",
            RejectReason::OutcomeUnknown => "outcome_unknown",
        })
    }
}

/// Labels of `events_rejected_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: RejectReason,
}

/// Why forwarding a batch to its owner failed.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ForwardFailure {
    /// No answer within CLUSTER_FORWARD_TIMEOUT.
    Timeout,
    /// The connection could not be made or broke.
    Unreachable,
    /// The owner answered with an error other than overload (e.g. 401).
    Rejected,
}

impl ForwardFailure {
    /// Every reason, for pre-creating the series.
    pub const ALL: [ForwardFailure; 3] = [
        ForwardFailure::Timeout,
        ForwardFailure::Unreachable,
        ForwardFailure::Rejected,
    ];
}

impl EncodeLabelValue for ForwardFailure {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            ForwardFailure::Timeout => "timeout",
            ForwardFailure::Unreachable => "unreachable",
            ForwardFailure::Rejected => "rejected",
        })
    }
}

/// Labels of `forward_failures_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ForwardFailureLabel {
    /// Why.
    pub reason: ForwardFailure,
}

/// Which way a device's window moved.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    /// Taken over from another node.
    In,
    /// Handed to another node.
    Out,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            Direction::In => "in",
            Direction::Out => "out",
        })
    }
}

/// Labels of `shard_handoffs_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// Which way.
    pub direction: Direction,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    #[test]
    fn the_cluster_families_carry_their_label_values() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        for reason in ForwardFailure::ALL {
            m.forward_failures
                .get_or_create(&ForwardFailureLabel { reason })
                .inc();
        }
        for direction in [Direction::In, Direction::Out] {
            m.shard_handoffs
                .get_or_create(&DirectionLabel { direction })
                .inc();
        }
        let mut text = String::new();
        encode(&mut text, &registry).expect("encode");
        for series in [
            r#"forward_failures_total{reason="timeout"} 1"#,
            r#"forward_failures_total{reason="unreachable"} 1"#,
            r#"forward_failures_total{reason="rejected"} 1"#,
            r#"shard_handoffs_total{direction="in"} 1"#,
            r#"shard_handoffs_total{direction="out"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == series), "{series} in:\n{text}");
        }
    }
}
