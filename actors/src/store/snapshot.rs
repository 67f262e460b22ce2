//! The persisted form of a device's window under `window:{device_id}`.
//!
//! Binary rather than JSON: it is written with every checkpoint, so at full load it is
//! the largest value the service produces, and formatting 100 floats as text cost more
//! CPU than all the analytics together. The format is `IW4`; the window's version (u64
//! big-endian, see [`Version`]); the ingest-log position of the newest event the window
//! holds (u64 LE epoch, u64 LE milliseconds, u64 LE sequence, u32 LE index; all zero
//! without a log);
//! the newest event's timestamp (i64 LE seconds and u32 LE nanoseconds since the Unix
//! epoch); then each reading, oldest first, as two little-endian f64 (rps, cpu): exact,
//! and 16 bytes a reading (a default window is 843 bytes).
//!
//! - The version orders two windows of one device: a restore takes the newer of this
//!   node's unflushed window and the store's.
//! - The position says which logged events the window has seen: a replay of the log
//!   skips them (see [`crate::position`]).
//!
//! `IW3` (a position without an epoch), `IW2` (no position) and `IW1` (readings only),
//! written by earlier versions, are still read.

use crate::analytics::Window;
use crate::position::Position;
use crate::store::stream_id::StreamId;
use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, Utc};

const MAGIC: &[u8; 3] = b"IW4";
const MAGIC_V3: &[u8; 3] = b"IW3";
const MAGIC_V2: &[u8; 3] = b"IW2";

/// How a window's version is made: the incarnation of the device's actor in the high 24
/// bits (every actor that starts for the device, on any node, counts one more than the
/// window it restored), the events processed by that incarnation in the low 40. So an
/// actor that took a device over always outranks one that kept running on a node that
/// was cut off, whatever either processed, and within one incarnation later is newer.
pub struct Version;

impl Version {
    const EVENT_BITS: u32 = 40;

    /// (incarnation, events) of a version, for logs.
    pub fn parts(version: u64) -> (u64, u64) {
        (
            version >> Self::EVENT_BITS,
            version & ((1 << Self::EVENT_BITS) - 1),
        )
    }

    /// The version of a fresh incarnation restored from a window of `restored`.
    pub fn next_incarnation(restored: Option<u64>) -> u64 {
        let incarnation = restored.map_or(0, |v| v >> Self::EVENT_BITS);
        (incarnation + 1) << Self::EVENT_BITS
    }
}
const MAGIC_V1: &[u8; 3] = b"IW1";

/// A stored window could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "not a window (expected IW4, a position, a timestamp and 16-byte readings, got {len} bytes)"
)]
pub struct SnapshotError {
    len: usize,
}

/// A device's window as persisted: (rps, cpu) readings, oldest first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowSnapshot {
    readings: Vec<(f64, f64)>,
    last_event: Option<DateTime<Utc>>,
    version: u64,
    position: Position,
}

impl WindowSnapshot {
    /// A snapshot of these readings, the newest of which came with an event of
    /// `last_event`'s timestamp.
    pub fn new(readings: Vec<(f64, f64)>, last_event: Option<DateTime<Utc>>, version: u64) -> Self {
        Self {
            readings,
            last_event,
            version,
            position: Position::default(),
        }
    }

    /// The same, having seen the ingest log up to `position`.
    pub fn at(mut self, position: Position) -> Self {
        self.position = position;
        self
    }

    /// A copy of a live window's readings.
    pub fn of(
        window: &Window,
        last_event: DateTime<Utc>,
        version: u64,
        position: Position,
    ) -> Self {
        Self::new(window.readings().collect(), Some(last_event), version).at(position)
    }

    /// The newest logged event the window holds (none without a log).
    pub fn position(&self) -> Position {
        self.position
    }

    /// The window's version (see [`Version`]).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The readings, oldest first.
    pub fn readings(&self) -> &[(f64, f64)] {
        &self.readings
    }

    /// The stored bytes of these readings (oldest first).
    pub fn encode(
        readings: impl ExactSizeIterator<Item = (f64, f64)>,
        last_event: Option<DateTime<Utc>>,
        version: u64,
        position: Position,
    ) -> Bytes {
        let mut out = BytesMut::with_capacity(MAGIC.len() + 48 + 16 * readings.len());
        out.put_slice(MAGIC);
        out.put_u64(version);
        out.put_u64_le(position.epoch);
        out.put_u64_le(position.entry.0);
        out.put_u64_le(position.entry.1);
        out.put_u32_le(position.index);
        // No timestamp is stored as i64::MIN seconds (never a real event's).
        out.put_i64_le(last_event.map_or(i64::MIN, |t| t.timestamp()));
        out.put_u32_le(last_event.map_or(0, |t| t.timestamp_subsec_nanos()));
        for (rps, cpu) in readings {
            out.put_f64_le(rps);
            out.put_f64_le(cpu);
        }
        out.freeze()
    }

    /// Test only: these bytes again.
    #[cfg(test)]
    pub fn to_bytes(&self) -> Bytes {
        Self::encode(
            self.readings.iter().copied(),
            self.last_event,
            self.version,
            self.position,
        )
    }

    /// Parses stored bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let bad = || SnapshotError { len: bytes.len() };
        let current = bytes.strip_prefix(MAGIC);
        let (body, last_event, version, position) =
            if let Some(rest) = current.or_else(|| bytes.strip_prefix(MAGIC_V3)) {
                let (version, rest) = split_u64(rest, u64::from_be_bytes).ok_or_else(bad)?;
                let (epoch, rest) = match current {
                    Some(_) => split_u64(rest, u64::from_le_bytes).ok_or_else(bad)?,
                    None => (0, rest),
                };
                let (ms, rest) = split_u64(rest, u64::from_le_bytes).ok_or_else(bad)?;
                let (seq, rest) = split_u64(rest, u64::from_le_bytes).ok_or_else(bad)?;
                let (index, rest) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
                let position = Position {
                    epoch,
                    entry: StreamId(ms, seq),
                    index: u32::from_le_bytes(*index),
                };
                let (last, body) = timestamp(rest).ok_or_else(bad)?;
                (body, last, version, position)
            } else if let Some(rest) = bytes.strip_prefix(MAGIC_V2) {
                let (version, rest) = split_u64(rest, u64::from_be_bytes).ok_or_else(bad)?;
                let (last, body) = timestamp(rest).ok_or_else(bad)?;
                (body, last, version, Position::default())
            } else {
                let body = bytes.strip_prefix(MAGIC_V1).ok_or_else(bad)?;
                // Without a count, the readings held are the best lower bound.
                (body, None, (body.len() / 16) as u64, Position::default())
            };
        if body.len() % 16 != 0 {
            return Err(bad());
        }
        let readings = body
            .chunks_exact(16)
            .map(|c| {
                let (rps, cpu) = c.split_at(8);
                (f64_le(rps), f64_le(cpu))
            })
            .collect();
        Ok(Self {
            readings,
            last_event,
            version,
            position,
        })
    }
}

/// A u64 off the front of `bytes`, read with `read`.
fn split_u64(bytes: &[u8], read: fn([u8; 8]) -> u64) -> Option<(u64, &[u8])> {
    let (head, rest) = bytes.split_first_chunk::<8>()?;
    Some((read(*head), rest))
}

/// The newest event's timestamp (`None` when none was stored) off the front of `bytes`.
#[allow(clippy::type_complexity)]
fn timestamp(bytes: &[u8]) -> Option<(Option<DateTime<Utc>>, &[u8])> {
    let (secs, rest) = split_u64(bytes, u64::from_le_bytes)?;
    let (nanos, rest) = rest.split_first_chunk::<4>()?;
    let secs = secs as i64;
    // No timestamp is stored as i64::MIN seconds (never a real event's).
    if secs == i64::MIN {
        return Some((None, rest));
    }
    let last = DateTime::from_timestamp(secs, u32::from_le_bytes(*nanos))?;
    Some((Some(last), rest))
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
        let t = DateTime::from_timestamp(1_700_000_000, 123_456_789);
        for last in [t, None] {
            let s = WindowSnapshot::new(
                vec![(0.1, 0.2), (1e9 + 0.5, 1.0), (f64::MAX, 0.0)],
                last,
                u64::MAX - 7,
            )
            .at(Position {
                epoch: 9,
                entry: StreamId(1_700_000_000_123, 4),
                index: 77,
            });
            let bytes = s.to_bytes();
            assert_eq!(bytes.len(), 3 + 8 + 28 + 12 + 48);
            assert_eq!(&bytes[3..11], &(u64::MAX - 7).to_be_bytes());
            assert_eq!(WindowSnapshot::decode(&bytes), Ok(s));
        }
        // The shortest window: the header alone.
        let empty = WindowSnapshot::new(Vec::new(), None, 7);
        assert_eq!(WindowSnapshot::decode(&empty.to_bytes()), Ok(empty));
    }

    #[test]
    fn every_new_incarnation_outranks_whatever_its_predecessor_processed() {
        let first = Version::next_incarnation(None);
        assert_eq!(Version::parts(first), (1, 0));
        // An incarnation that processed a million events...
        let busy = first + 1_000_000;
        // ...is outranked by the next one before it processed anything.
        let next = Version::next_incarnation(Some(busy));
        assert_eq!(Version::parts(next), (2, 0));
        assert!(next > busy);
        assert!(next + 1 > next);
    }

    #[test]
    fn windows_of_earlier_versions_still_read() {
        // IW3: the version, a position without an epoch, the timestamp, the readings.
        let mut v3 = b"IW3".to_vec();
        v3.extend(9u64.to_be_bytes());
        v3.extend(1_700_000_000_123u64.to_le_bytes());
        v3.extend(4u64.to_le_bytes());
        v3.extend(77u32.to_le_bytes());
        v3.extend(1_700_000_000i64.to_le_bytes());
        v3.extend(5u32.to_le_bytes());
        v3.extend(2.5f64.to_le_bytes());
        v3.extend(0.25f64.to_le_bytes());
        let s = WindowSnapshot::decode(&v3).expect("v3");
        assert_eq!(s.readings(), &[(2.5, 0.25)]);
        assert_eq!(
            s.position(),
            Position {
                epoch: 0,
                entry: StreamId(1_700_000_000_123, 4),
                index: 77
            }
        );
        // IW2: the version, the timestamp, the readings; no position.
        let mut v2 = b"IW2".to_vec();
        v2.extend(9u64.to_be_bytes());
        v2.extend(1_700_000_000i64.to_le_bytes());
        v2.extend(5u32.to_le_bytes());
        v2.extend(2.5f64.to_le_bytes());
        v2.extend(0.25f64.to_le_bytes());
        let s = WindowSnapshot::decode(&v2).expect("v2");
        assert_eq!(s.readings(), &[(2.5, 0.25)]);
        assert_eq!(s.version(), 9);
        assert_eq!(s.position(), Position::default());
        assert_eq!(
            s,
            WindowSnapshot::new(
                vec![(2.5, 0.25)],
                DateTime::from_timestamp(1_700_000_000, 5),
                9
            ),
            "with the newest event's time"
        );
        assert_eq!(
            WindowSnapshot::decode(b"IW1"),
            Ok(WindowSnapshot::default())
        );
        let mut v1 = b"IW1".to_vec();
        v1.extend(2.5f64.to_le_bytes());
        v1.extend(0.25f64.to_le_bytes());
        let s = WindowSnapshot::decode(&v1).expect("v1");
        assert_eq!(s.readings(), &[(2.5, 0.25)]);
        assert_eq!(s.version(), 1);
        assert_eq!(
            s,
            WindowSnapshot::new(vec![(2.5, 0.25)], None, 1),
            "without a time"
        );
    }

    #[test]
    fn rejects_foreign_values() {
        assert!(WindowSnapshot::decode(br#"{"rps":[1]}"#).is_err());
        assert!(WindowSnapshot::decode(b"IW1\x00\x01").is_err());
        assert!(WindowSnapshot::decode(b"IW2\x00\x01").is_err());
        assert!(WindowSnapshot::decode(b"IW3\x00\x01").is_err());
        assert!(WindowSnapshot::decode(b"IW4\x00\x01").is_err());
        assert!(WindowSnapshot::decode(&[&b"IW4"[..], &[0; 8 + 27]].concat()).is_err());
        // A position cut short.
        assert!(WindowSnapshot::decode(&[&b"IW3"[..], &[0; 8 + 19]].concat()).is_err());
    }
}
