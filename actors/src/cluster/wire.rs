//! The body of a forwarded batch: events of many devices, in order, as compact binary.
//!
//! Binary rather than JSON because every forwarded event is encoded and decoded once
//! more than a local one, and the forwarding budget is a couple of microseconds. The
//! format is `IE1`, then per event: the device id's length (u16 LE) and bytes, rps and
//! cpu (f64 LE), and the event time as seconds (i64 LE) and nanoseconds (u32 LE) since
//! the Unix epoch. Both ends are the same binary; decoding still checks every rule, so
//! a malformed body is refused whole, never half-queued.

use crate::event::{DeviceId, Event, EventError, MAX_DEVICE_ID_BYTES};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use chrono::DateTime;

const MAGIC: &[u8; 3] = b"IE1";
/// Bytes per event besides the device id.
const FIXED: usize = 2 + 8 + 8 + 8 + 4;
// A device id's length fits the u16 it is sent as.
const _: () = assert!(MAX_DEVICE_ID_BYTES <= u16::MAX as usize);

/// A forwarded body that does not decode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WireError {
    /// Not in the format.
    #[error("malformed event batch: {0}")]
    Malformed(&'static str),
    /// An event that breaks a rule of events.
    #[error("malformed event batch: {0}")]
    Event(#[from] EventError),
}

/// Encodes events in order.
pub fn encode<'a>(events: impl ExactSizeIterator<Item = (&'a str, &'a Event)>) -> Bytes {
    let mut out = BytesMut::with_capacity(MAGIC.len() + events.len() * (FIXED + 24));
    out.put_slice(MAGIC);
    for (device, event) in events {
        // Device ids are at most MAX_DEVICE_ID_BYTES (validated at ingest).
        out.put_u16_le(device.len() as u16);
        out.put_slice(device.as_bytes());
        out.put_f64_le(event.rps());
        out.put_f64_le(event.cpu());
        out.put_i64_le(event.timestamp().timestamp());
        out.put_u32_le(event.timestamp().timestamp_subsec_nanos());
    }
    out.freeze()
}

/// Decodes a batch; every device id and event is built through the rules of
/// [`DeviceId`] and [`Event`], as at ingest.
pub fn decode(mut body: Bytes) -> Result<Vec<(DeviceId, Event)>, WireError> {
    let malformed = |why| Err(WireError::Malformed(why));
    if body.len() < MAGIC.len() || &body[..MAGIC.len()] != MAGIC {
        return malformed("no IE1 header");
    }
    body.advance(MAGIC.len());
    let mut events = Vec::with_capacity(body.len() / (FIXED + 8));
    while body.has_remaining() {
        if body.remaining() < 2 {
            return malformed("truncated");
        }
        let len = usize::from(body.get_u16_le());
        if body.remaining() < len + FIXED - 2 {
            return malformed("truncated");
        }
        let Ok(id) = std::str::from_utf8(&body[..len]) else {
            return malformed("device id not UTF-8");
        };
        let device = DeviceId::new(id)?.to_shared();
        body.advance(len);
        let rps = body.get_f64_le();
        let cpu = body.get_f64_le();
        let secs = body.get_i64_le();
        let nanos = body.get_u32_le();
        let Some(timestamp) = DateTime::from_timestamp(secs, nanos) else {
            return malformed("bad timestamp");
        };
        events.push((device, Event::new(rps, cpu, timestamp)?));
    }
    Ok(events)
}

/// Set in a position of the answer: the event was not taken because the receiving node
/// does not own its shard (the sender routes it again), rather than refused.
pub const MOVED: u32 = 1 << 31;

/// The answer to a forwarded batch: the positions of the events that were not taken
/// (u32 LE each, [`MOVED`] set when they belong elsewhere); empty when every event was.
pub fn encode_refused(positions: &[u32]) -> Bytes {
    let mut out = BytesMut::with_capacity(positions.len() * 4);
    for p in positions {
        out.put_u32_le(*p);
    }
    out.freeze()
}

/// Decodes [`encode_refused`].
pub fn decode_refused(mut body: Bytes) -> Result<Vec<u32>, WireError> {
    if body.len() % 4 != 0 {
        return Err(WireError::Malformed("refusals truncated"));
    }
    let mut out = Vec::with_capacity(body.len() / 4);
    while body.has_remaining() {
        out.push(body.get_u32_le());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn refusals_round_trip() {
        for positions in [vec![], vec![0], vec![3, 7, u32::MAX]] {
            assert_eq!(
                super::decode_refused(super::encode_refused(&positions)),
                Ok(positions)
            );
        }
        assert!(super::decode_refused(bytes::Bytes::from_static(b"abc")).is_err());
    }

    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn batches_round_trip_exactly(
            items in proptest::collection::vec(
                ("[a-zA-Z0-9:_.-]{1,128}", 0.0f64..1e12, 0.0f64..=1.0, -10_000_000_000i64..10_000_000_000, 0u32..1_000_000_000),
                0..50,
            )
        ) {
            let events: Vec<(String, Event)> = items
                .into_iter()
                .map(|(d, rps, cpu, s, n)| {
                    (d, Event::new(rps, cpu, DateTime::from_timestamp(s, n).expect("time")).expect("valid"))
                })
                .collect();
            let body = encode(events.iter().map(|(d, e)| (d.as_str(), e)));
            let back = decode(body).expect("decodes");
            prop_assert_eq!(back.len(), events.len());
            for ((d, e), (bd, be)) in events.iter().zip(&back) {
                prop_assert_eq!(d.as_str(), &**bd);
                prop_assert_eq!(e, be);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut body = b"IE1".to_vec();
            body.extend(bytes);
            let _ = decode(Bytes::from(body));
        }
    }

    /// One event's bytes, written by hand: encode takes only valid events.
    fn raw(id: &[u8], rps: f64, cpu: f64) -> Vec<u8> {
        let mut out = Vec::new();
        out.put_u16_le(id.len() as u16);
        out.put_slice(id);
        out.put_f64_le(rps);
        out.put_f64_le(cpu);
        out.put_i64_le(0);
        out.put_u32_le(0);
        out
    }

    #[test]
    fn broken_rules_refuse_the_whole_batch() {
        let ok = Event::new(1.0, 0.5, DateTime::from_timestamp(0, 0).expect("t")).expect("valid");
        let with = |second: Vec<u8>| {
            let mut body = encode([("a", &ok)].into_iter()).to_vec();
            body.extend(second);
            decode(Bytes::from(body))
        };
        assert_eq!(with(raw(b"b", 1.0, 0.5)).expect("valid").len(), 2);
        // Each rule of events, in the second event: the whole batch is refused, with the
        // error ingest gives.
        for (second, error) in [
            (raw(b"b", 1.0, 1.5), EventError::CpuOutOfRange(1.5)),
            (raw(b"b", -1.0, 0.5), EventError::NegativeRps(-1.0)),
            (raw(b"b", f64::INFINITY, 0.5), EventError::NotFinite("rps")),
            (raw(b"b", 1.0, f64::NAN), EventError::NotFinite("cpu")),
            (raw(b"a\x07", 1.0, 0.5), EventError::ControlInDeviceId),
        ] {
            assert_eq!(with(second), Err(WireError::Event(error)));
        }
        assert_eq!(
            with(raw(b"\xff", 1.0, 0.5)),
            Err(WireError::Malformed("device id not UTF-8"))
        );
        assert!(decode(Bytes::from_static(b"XX1")).is_err());
        let mut truncated = encode([("a", &ok)].into_iter()).to_vec();
        truncated.pop();
        assert!(decode(Bytes::from(truncated)).is_err());
        assert_eq!(decode(encode(std::iter::empty())).expect("empty"), vec![]);
        // A device id of 0 or more than 128 bytes, even with every byte of its event
        // there: refused like at ingest.
        for (id, error) in [
            (String::new(), EventError::EmptyDeviceId),
            ("d".repeat(129), EventError::LongDeviceId(129)),
        ] {
            let err = with(raw(id.as_bytes(), 1.0, 0.5)).expect_err("bad id length");
            assert_eq!(err, WireError::Event(error), "{}", id.len());
        }
        assert_eq!(
            decode(encode([(&*"d".repeat(128), &ok)].into_iter()))
                .expect("128")
                .len(),
            1
        );
        // Cut after the header: one byte is not even a length, two are a length without
        // its id (never a panic).
        let whole = encode([("abc", &ok)].into_iter());
        let err = decode(whole.slice(..MAGIC.len() + 1)).expect_err("one byte");
        assert_eq!(err, WireError::Malformed("truncated"));
        let err = decode(whole.slice(..MAGIC.len() + 2)).expect_err("two bytes");
        assert_eq!(err, WireError::Malformed("truncated"));
    }
}
