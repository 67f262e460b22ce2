//! The persisted form of a device's window under `window:{device_id}`.
//!
//! Binary rather than JSON: it is written with every flushed result, so at full load it
//! is the largest value the service produces, and formatting 100 floats as text cost
//! more CPU than all the analytics together. The format is `IW1` followed by each
//! reading, oldest first, as two little-endian f64 (rps, cpu): exact, and 16 bytes a
//! reading (a default window is 803 bytes).

use crate::analytics::Window;
use bytes::{BufMut, Bytes, BytesMut};

const MAGIC: &[u8; 3] = b"IW1";

/// A stored window could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a window (expected IW1 and 16-byte readings, got {len} bytes)")]
pub struct SnapshotError {
    len: usize,
}

/// A device's window as persisted: (rps, cpu) readings, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowSnapshot {
    readings: Vec<(f64, f64)>,
}

impl WindowSnapshot {
    /// A snapshot of these readings.
    pub fn new(readings: Vec<(f64, f64)>) -> Self {
        Self { readings }
    }

    /// A copy of a live window's readings.
    pub fn of(window: &Window) -> Self {
        Self::new(window.readings().collect())
    }

    /// The readings, oldest first.
    pub fn readings(&self) -> &[(f64, f64)] {
        &self.readings
    }

    /// The stored bytes of these readings (oldest first).
    pub fn encode(readings: impl ExactSizeIterator<Item = (f64, f64)>) -> Bytes {
        let mut out = BytesMut::with_capacity(MAGIC.len() + 16 * readings.len());
        out.put_slice(MAGIC);
        for (rps, cpu) in readings {
            out.put_f64_le(rps);
            out.put_f64_le(cpu);
        }
        out.freeze()
    }

    /// Parses stored bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let body = bytes
            .strip_prefix(MAGIC)
            .filter(|b| b.len() % 16 == 0)
            .ok_or(SnapshotError { len: bytes.len() })?;
        let readings = body
            .chunks_exact(16)
            .map(|c| {
                let (rps, cpu) = c.split_at(8);
                (f64_le(rps), f64_le(cpu))
            })
            .collect();
        Ok(Self { readings })
    }
}

fn f64_le(bytes: &[u8]) -> f64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(bytes);
    f64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_exactly() {
        let s = WindowSnapshot::new(vec![(0.1, 0.2), (1e9 + 0.5, 1.0), (f64::MAX, 0.0)]);
        let bytes = WindowSnapshot::encode(s.readings().iter().copied());
        assert_eq!(bytes.len(), 3 + 48);
        assert_eq!(WindowSnapshot::decode(&bytes), Ok(s));
        assert_eq!(
            WindowSnapshot::decode(b"IW1"),
            Ok(WindowSnapshot::default())
        );
    }

    #[test]
    fn rejects_foreign_values() {
        assert!(WindowSnapshot::decode(br#"{"rps":[1]}"#).is_err());
        assert!(WindowSnapshot::decode(b"IW1\x00\x01").is_err());
    }
}
