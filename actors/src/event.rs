//! A validated event as the front end hands it over, and the analysis a device actor
//! derives from it (the JSON that `/analyze` returns and the store keeps).
//!
//! The rules an event keeps (docs/api.md) live here and nowhere else: a [`DeviceId`] and
//! an [`Event`] can only be built through them, by the HTTP decoder and by the cluster's
//! wire format alike, and a broken rule is an [`EventError`] naming its field.

use crate::analytics::Evaluation;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// Longest device id, in bytes.
pub const MAX_DEVICE_ID_BYTES: usize = 128;

/// A rule of an event that a device id or a reading breaks. The message is the one the
/// HTTP API answers with; [`EventError::field`] names the field.
#[derive(Debug, Clone, Copy, PartialEq, thiserror::Error)]
pub enum EventError {
    /// An empty device id.
    #[error("device_id must not be empty")]
    EmptyDeviceId,
    /// A device id longer than [`MAX_DEVICE_ID_BYTES`] (its length).
    #[error("device_id must be at most {MAX_DEVICE_ID_BYTES} bytes, got {0}")]
    LongDeviceId(usize),
    /// A device id with a control character.
    #[error("device_id must not contain control characters")]
    ControlInDeviceId,
    /// An rps or cpu that is NaN or infinite (the field).
    #[error("{0} must be a finite number")]
    NotFinite(&'static str),
    /// A cpu outside 0..=1.
    #[error("cpu must be between 0 and 1, got {0}")]
    CpuOutOfRange(f64),
    /// A negative rps.
    #[error("rps must be at least 0, got {0}")]
    NegativeRps(f64),
}

impl EventError {
    /// The field at fault: `device_id`, `rps` or `cpu`.
    pub fn field(&self) -> &'static str {
        match self {
            Self::EmptyDeviceId | Self::LongDeviceId(_) | Self::ControlInDeviceId => "device_id",
            Self::NotFinite(field) => field,
            Self::CpuOutOfRange(_) => "cpu",
            Self::NegativeRps(_) => "rps",
        }
    }
}

/// A device id that keeps the rules: 1 to [`MAX_DEVICE_ID_BYTES`] bytes, no control
/// characters. Only [`DeviceId::new`] makes one. `S` holds the text and is kept as it is
/// (no copy): `Arc<str>` (the default) where ids are kept, a `Cow<str>` borrowed from a
/// request body, a `&str`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId<S = Arc<str>>(S);

impl<S: AsRef<str>> DeviceId<S> {
    /// `id` if it keeps the rules.
    pub fn new(id: S) -> Result<Self, EventError> {
        let text = id.as_ref();
        if text.is_empty() {
            return Err(EventError::EmptyDeviceId);
        }
        if text.len() > MAX_DEVICE_ID_BYTES {
            return Err(EventError::LongDeviceId(text.len()));
        }
        if text.chars().any(char::is_control) {
            return Err(EventError::ControlInDeviceId);
        }
        Ok(Self(id))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        self.0.as_ref()
    }

    /// The id in a shared allocation, as ids are kept.
    pub fn to_shared(&self) -> DeviceId {
        DeviceId(Arc::from(self.as_str()))
    }

    /// What holds the text.
    pub fn into_inner(self) -> S {
        self.0
    }
}

impl<S: AsRef<str>> Deref for DeviceId<S> {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl<S: AsRef<str>> AsRef<str> for DeviceId<S> {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl<S: AsRef<str>> PartialEq<str> for DeviceId<S> {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl<S: AsRef<str>> PartialEq<&str> for DeviceId<S> {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl<S: AsRef<str>> PartialEq<String> for DeviceId<S> {
    fn eq(&self, other: &String) -> bool {
        self.as_str() == other
    }
}

impl<S: AsRef<str>> fmt::Display for DeviceId<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reading of one device, already validated: only [`Event::new`] makes one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Event {
    rps: f64,
    cpu: f64,
    timestamp: DateTime<Utc>,
}

impl Event {
    /// An event if `rps` and `cpu` keep the rules (cpu is checked first); a -0 of either
    /// is kept as 0, so it never shows as "-0.0".
    pub fn new(rps: f64, cpu: f64, timestamp: DateTime<Utc>) -> Result<Self, EventError> {
        let cpu = Self::check_cpu(cpu)?;
        let rps = Self::check_rps(rps)?;
        Ok(Self {
            rps,
            cpu,
            timestamp,
        })
    }

    /// The rule for rps: finite and at least 0. Answers the value as an event keeps it.
    pub fn check_rps(rps: f64) -> Result<f64, EventError> {
        if !rps.is_finite() {
            return Err(EventError::NotFinite("rps"));
        }
        if rps < 0.0 {
            return Err(EventError::NegativeRps(rps));
        }
        Ok(rps + 0.0)
    }

    /// The rule for cpu: finite and within 0..=1. Answers the value as an event keeps it.
    pub fn check_cpu(cpu: f64) -> Result<f64, EventError> {
        if !cpu.is_finite() {
            return Err(EventError::NotFinite("cpu"));
        }
        if !(0.0..=1.0).contains(&cpu) {
            return Err(EventError::CpuOutOfRange(cpu));
        }
        Ok(cpu + 0.0)
    }

    /// Requests per second reported by the device (finite, ≥ 0).
    pub fn rps(&self) -> f64 {
        self.rps
    }

    /// CPU load reported by the device (finite, 0..=1).
    pub fn cpu(&self) -> f64 {
        self.cpu
    }

    /// The event's own time (or the receive time when the device sent none).
    pub fn timestamp(&self) -> DateTime<Utc> {
        self.timestamp
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    fn t() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).expect("time")
    }

    #[test]
    fn device_ids_keep_the_rules_whatever_holds_them() {
        assert_eq!(DeviceId::new("sensor-1").expect("valid"), "sensor-1");
        let shared: Arc<str> = Arc::from("café 1");
        assert_eq!(
            DeviceId::new(shared.clone()).expect("valid").into_inner(),
            shared
        );
        let borrowed = DeviceId::new(Cow::Borrowed("a")).expect("valid");
        assert_eq!(
            borrowed.to_shared(),
            DeviceId::new(Arc::from("a")).expect("valid")
        );
        // 128 bytes at most, counted in bytes.
        assert!(DeviceId::new("é".repeat(64)).is_ok());
        assert_eq!(
            DeviceId::new("é".repeat(65)),
            Err(EventError::LongDeviceId(130))
        );
        assert_eq!(DeviceId::new(""), Err(EventError::EmptyDeviceId));
        for id in ["a\nb", "a\u{7}b", "\u{85}"] {
            assert_eq!(
                DeviceId::new(id),
                Err(EventError::ControlInDeviceId),
                "{id:?}"
            );
        }
    }

    #[test]
    fn events_keep_the_rules_and_each_error_names_its_field() {
        let e = Event::new(1.5, 0.25, t()).expect("valid");
        assert_eq!((e.rps(), e.cpu(), e.timestamp()), (1.5, 0.25, t()));
        for (rps, cpu) in [(0.0, 0.0), (0.0, 1.0), (1e300, 0.5)] {
            assert!(Event::new(rps, cpu, t()).is_ok(), "{rps} {cpu}");
        }
        for (rps, cpu, error, field, message) in [
            (
                1.0,
                1.01,
                EventError::CpuOutOfRange(1.01),
                "cpu",
                "cpu must be between 0 and 1, got 1.01",
            ),
            (
                1.0,
                -0.1,
                EventError::CpuOutOfRange(-0.1),
                "cpu",
                "cpu must be between 0 and 1, got -0.1",
            ),
            (
                1.0,
                f64::NAN,
                EventError::NotFinite("cpu"),
                "cpu",
                "cpu must be a finite number",
            ),
            (
                -1.0,
                0.5,
                EventError::NegativeRps(-1.0),
                "rps",
                "rps must be at least 0, got -1",
            ),
            (
                f64::INFINITY,
                0.5,
                EventError::NotFinite("rps"),
                "rps",
                "rps must be a finite number",
            ),
            (
                f64::NAN,
                0.5,
                EventError::NotFinite("rps"),
                "rps",
                "rps must be a finite number",
            ),
            // Both wrong: cpu is named, as the HTTP decoder reads it first.
            (
                -1.0,
                2.0,
                EventError::CpuOutOfRange(2.0),
                "cpu",
                "cpu must be between 0 and 1, got 2",
            ),
        ] {
            let err = Event::new(rps, cpu, t()).expect_err("invalid");
            assert_eq!(err, error);
            assert_eq!((err.field(), err.to_string().as_str()), (field, message));
        }
        let long = DeviceId::new("d".repeat(129)).expect_err("too long");
        assert_eq!(
            (long.field(), long.to_string().as_str()),
            ("device_id", "device_id must be at most 128 bytes, got 129")
        );
    }

    #[test]
    fn negative_zero_is_kept_as_zero() {
        let e = Event::new(-0.0, -0.0, t()).expect("valid");
        assert!(e.rps().is_sign_positive() && e.cpu().is_sign_positive());
    }
}
