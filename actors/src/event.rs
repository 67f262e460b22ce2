//! A validated event as the front end hands it over, and the analysis a device actor
//! derives from it (the JSON that `/analyze` returns and the store keeps).

use crate::analytics::Evaluation;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};
use std::sync::Arc;

/// One reading of one device, already validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    /// Requests per second reported by the device (finite, ≥ 0).
    pub rps: f64,
    /// CPU load reported by the device (finite, 0..=1).
    pub cpu: f64,
    /// The event's own time (or the receive time when the device sent none).
    pub timestamp: DateTime<Utc>,
}

/// The latest analysis of one device. Field order is the wire order: the original
/// service's five fields first, then the additions.
#[derive(Debug, Clone, Serialize)]
pub struct Analysis {
    /// The device.
    pub device_id: Arc<str>,
    /// Mean rps over the window.
    pub rolling_average_rps: f64,
    /// Whether the newest rps is anomalous.
    pub is_anomaly: bool,
    /// |x − mean| / stddev of the newest rps.
    pub z_score: f64,
    /// When the device actor computed this, server time.
    #[serde(serialize_with = "rfc3339_millis")]
    pub processed_at: DateTime<Utc>,
    /// Readings in the window.
    pub samples: usize,
    /// The newest rps.
    pub last_rps: f64,
    /// Population standard deviation of rps over the window.
    pub stddev_rps: f64,
    /// Mean cpu over the window.
    pub rolling_average_cpu: f64,
    /// The event's own timestamp, in UTC.
    #[serde(serialize_with = "rfc3339_auto")]
    pub event_timestamp: DateTime<Utc>,
    /// Population standard deviation of cpu over the window.
    pub stddev_cpu: f64,
    /// |x − mean| / stddev of the newest cpu.
    pub cpu_z_score: f64,
    /// Whether the newest cpu is anomalous (`is_anomaly` stays about rps).
    pub is_cpu_anomaly: bool,
}

impl Analysis {
    /// The analysis of `event`, the newest reading of `device_id`, from the evaluation of
    /// its window, computed at `processed_at`.
    pub fn new(
        device_id: Arc<str>,
        event: &Event,
        evaluation: Evaluation,
        processed_at: DateTime<Utc>,
    ) -> Self {
        Self {
            device_id,
            rolling_average_rps: evaluation.rolling_average_rps,
            is_anomaly: evaluation.is_anomaly,
            z_score: evaluation.z_score,
            processed_at,
            samples: evaluation.samples,
            last_rps: event.rps,
            stddev_rps: evaluation.stddev_rps,
            rolling_average_cpu: evaluation.rolling_average_cpu,
            event_timestamp: event.timestamp,
            stddev_cpu: evaluation.stddev_cpu,
            cpu_z_score: evaluation.cpu_z_score,
            is_cpu_anomaly: evaluation.is_cpu_anomaly,
        }
    }
}

fn rfc3339_millis<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn rfc3339_auto<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}
