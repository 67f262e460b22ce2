//! Decoding and validating input: the event body of `POST /metric` and the `device_id`
//! rules shared with `GET /analyze`. Every failure names the field at fault.
//!
//! The body is first split into raw, borrowed field values and each is then parsed on its
//! own: serde's derived errors say what went wrong but not in which field, and naming the
//! field is the point of a 400 here.

use super::errors::ApiError;
use actors::event::{DeviceId, Event, EventError};
use chrono::{DateTime, Utc};
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use std::borrow::Cow;
use std::fmt;

/// Deepest nesting of arrays and objects in an event, where the event's own object is
/// level one. Deeper JSON is refused (400), also in a field the service ignores: skipping
/// it would cost nothing on the stack (serde_json skips iteratively), but a client
/// sending it has a bug worth hearing about, and the rule is then the same everywhere.
pub const MAX_NESTING: usize = 64;

/// The start of the message for JSON nested deeper than [`MAX_NESTING`].
const TOO_DEEP: &str = "JSON nested deeper than";

/// An event's known fields as raw JSON text; every other field is skipped, its nesting
/// checked (the one place depth is bounded: the known fields must be scalars, so a
/// nested value there is refused by their type rules).
struct WireEvent<'a> {
    device_id: Option<&'a RawValue>,
    cpu: Option<&'a RawValue>,
    rps: Option<&'a RawValue>,
    timestamp: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Field {
    DeviceId,
    Cpu,
    Rps,
    Timestamp,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for WireEvent<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(WireEventVisitor)
    }
}

struct WireEventVisitor;

impl<'de> Visitor<'de> for WireEventVisitor {
    type Value = WireEvent<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        // Each slot: `Some` once the field was seen (`Some(None)`: given as null).
        let (mut device_id, mut cpu, mut rps, mut timestamp) = (None, None, None, None);
        while let Some(key) = map.next_key::<Field>()? {
            let (slot, name) = match key {
                Field::DeviceId => (&mut device_id, "device_id"),
                Field::Cpu => (&mut cpu, "cpu"),
                Field::Rps => (&mut rps, "rps"),
                Field::Timestamp => (&mut timestamp, "timestamp"),
                Field::Other => {
                    map.next_value_seed(Nested { depth: 2 })?;
                    continue;
                }
            };
            if slot.is_some() {
                return Err(de::Error::duplicate_field(name));
            }
            *slot = Some(map.next_value::<Option<&'de RawValue>>()?);
        }
        Ok(WireEvent {
            device_id: device_id.flatten(),
            cpu: cpu.flatten(),
            rps: rps.flatten(),
            timestamp: timestamp.flatten(),
        })
    }
}

/// Skips a value whose arrays and objects would be at `depth`, refusing it when that is
/// beyond [`MAX_NESTING`].
#[derive(Clone, Copy)]
struct Nested {
    depth: usize,
}

impl Nested {
    /// The elements of a container at this depth, or the error when it is one too deep.
    fn inside<E: de::Error>(self) -> Result<Self, E> {
        if self.depth > MAX_NESTING {
            return Err(E::custom(format_args!("{TOO_DEEP} {MAX_NESTING} levels")));
        }
        Ok(Self {
            depth: self.depth + 1,
        })
    }
}

impl<'de> DeserializeSeed<'de> for Nested {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Nested {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inside = self.inside()?;
        while seq.next_element_seed(inside)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inside = self.inside()?;
        while map.next_key::<IgnoredAny>()?.is_some() {
            map.next_value_seed(inside)?;
        }
        Ok(())
    }
}

impl From<EventError> for ApiError {
    /// 400 naming the field whose rule the event breaks.
    fn from(e: EventError) -> Self {
        ApiError::invalid(e.field(), e.to_string())
    }
}

/// Checks a device id against the documented rules (docs/api.md, [`DeviceId`]): 1-128
/// bytes, no control characters.
pub fn device_id(id: &str) -> Result<DeviceId<&str>, ApiError> {
    Ok(DeviceId::new(id)?)
}

/// Decodes and validates an event body; `received` stands in for a missing timestamp.
pub fn event(body: &[u8], received: DateTime<Utc>) -> Result<Decoded<'_>, ApiError> {
    decode(body, received, "body")
}

/// `subject` is what the messages call the JSON text: the body, or one event of a batch.
fn decode<'a>(
    body: &'a [u8],
    received: DateTime<Utc>,
    subject: &'static str,
) -> Result<Decoded<'a>, ApiError> {
    let not_object = || ApiError::bad_body(format!("{subject} must be a JSON object"));
    // serde would also accept a JSON array as a struct, by position.
    if body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b != b'{')
    {
        return Err(not_object());
    }
    let wire: WireEvent<'_> = serde_json::from_slice(body).map_err(|e| match body_error(e) {
        Some(error) => error,
        None => not_object(),
    })?;

    let raw_id = wire
        .device_id
        .ok_or_else(|| ApiError::invalid("device_id", "device_id is required"))?;
    let id: Cow<'_, str> = serde_json::from_str(raw_id.get())
        .map_err(|_| ApiError::invalid("device_id", "device_id must be a string"))?;
    let id = DeviceId::new(id)?;

    // Each field's rule right after it is read, so that the first field at fault (in
    // this order) is the one named.
    let cpu = Event::check_cpu(number("cpu", wire.cpu)?)?;
    let rps = Event::check_rps(number("rps", wire.rps)?)?;
    let timestamp = match wire.timestamp {
        None => received,
        Some(raw) => timestamp(raw)?,
    };
    Ok((id, Event::new(rps, cpu, timestamp)?))
}

/// A number field; its range is [`Event`]'s rule.
fn number(field: &'static str, raw: Option<&RawValue>) -> Result<f64, ApiError> {
    let raw = raw.ok_or_else(|| ApiError::invalid(field, format!("{field} is required")))?;
    let text = raw.get();
    if !text.starts_with(|c: char| c == '-' || c.is_ascii_digit()) {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be a number"),
        ));
    }
    // A JSON number that overflows f64 (1e400) is the only one that does not parse.
    serde_json::from_str::<f64>(text).map_err(|_| EventError::NotFinite(field).into())
}

fn timestamp(raw: &RawValue) -> Result<DateTime<Utc>, ApiError> {
    let text: Cow<'_, str> = serde_json::from_str(raw.get())
        .map_err(|_| ApiError::invalid("timestamp", "timestamp must be an RFC 3339 string"))?;
    DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            // A local time is valid RFC 3339 but for its offset: say that, rather than
            // chrono's "premature end of input".
            let message = if text.parse::<chrono::NaiveDateTime>().is_ok() {
                "timestamp needs an offset such as Z or +02:00 (e.g. 2024-01-15T10:30:00Z)"
                    .to_string()
            } else {
                format!("timestamp must be RFC 3339 (e.g. 2024-01-15T10:30:00Z): {e}")
            };
            ApiError::invalid("timestamp", message)
        })
}

/// The error for a JSON text that did not decode; `None` when it is not an object.
fn body_error(e: serde_json::Error) -> Option<ApiError> {
    use serde_json::error::Category;
    let text = e.to_string();
    if text.starts_with(TOO_DEEP) {
        return Some(ApiError::bad_body(text));
    }
    for field in ["device_id", "cpu", "rps", "timestamp"] {
        if text.starts_with(&format!("duplicate field `{field}`")) {
            return Some(ApiError::invalid(
                field,
                format!("{field} appears more than once"),
            ));
        }
    }
    match e.classify() {
        Category::Data => None,
        Category::Io | Category::Syntax | Category::Eof => {
            Some(ApiError::bad_body(format!("malformed JSON: {text}")))
        }
    }
}

/// A decoded event and its device, borrowed from the body where the JSON text allows.
pub type Decoded<'a> = (DeviceId<Cow<'a, str>>, Event);

/// One event of a batch: its position and what it decoded to.
pub type BatchItem<'a> = (usize, Result<Decoded<'a>, ApiError>);

/// Why a batch body was refused as a whole.
#[derive(Debug, PartialEq)]
pub enum BatchError {
    /// Not NDJSON or a JSON array at all (400).
    Malformed(ApiError),
    /// More than `max_events` events (413).
    TooMany,
}

/// Decodes a batch: a JSON array of events (the body starts with `[`), or else NDJSON,
/// one event per line with blank lines skipped. Each event is checked on its own (index =
/// position among the events, 0-based); a batch with more than `max_events` is refused
/// whole. Events without a timestamp get `received` plus their index in nanoseconds, so
/// that their timestamps follow their order in the batch.
pub fn batch(
    body: &[u8],
    received: DateTime<Utc>,
    max_events: usize,
) -> Result<Vec<BatchItem<'_>>, BatchError> {
    let stamp = |i: usize| received + chrono::Duration::nanoseconds(i as i64);
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let raw: Vec<&RawValue> = serde_json::from_slice(body).map_err(|e| {
            BatchError::Malformed(ApiError::bad_body(format!(
                "body must be a JSON array of events or NDJSON: {e}"
            )))
        })?;
        if raw.len() > max_events {
            return Err(BatchError::TooMany);
        }
        return Ok(raw
            .into_iter()
            .enumerate()
            .map(|(i, r)| (i, decode(r.get().as_bytes(), stamp(i), "event")))
            .collect());
    }
    let mut items = Vec::new();
    let mut lines = body
        .split(|&b| b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .peekable();
    while let Some(line) = lines.next() {
        let i = items.len();
        if i == max_events {
            return Err(BatchError::TooMany);
        }
        let item = decode(line, stamp(i), "event");
        if item.is_err() && several_values(line) {
            let error = ApiError::bad_body(SEVERAL_ON_ONE_LINE);
            // The whole body on one line: its newlines were stripped on the way.
            if i == 0 && lines.peek().is_none() {
                return Err(BatchError::Malformed(error));
            }
            items.push((i, Err(error)));
            continue;
        }
        items.push((i, item));
    }
    Ok(items)
}

/// The refusal of an NDJSON line holding more than one JSON value; `curl -d @file` sends
/// a file so, as it strips newlines.
const SEVERAL_ON_ONE_LINE: &str = "several JSON values on one line: NDJSON needs one event per line (curl -d strips newlines; send files with --data-binary)";

/// Whether `line` starts with two JSON values one after the other (`{…}{…}`).
fn several_values(line: &[u8]) -> bool {
    serde_json::Deserializer::from_slice(line)
        .into_iter::<serde::de::IgnoredAny>()
        .take(2)
        .filter(Result::is_ok)
        .count()
        == 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 0)
            .single()
            .expect("valid")
    }

    fn field_of(body: &str) -> Option<&'static str> {
        event(body.as_bytes(), now()).expect_err(body).field
    }

    #[test]
    fn accepts_a_full_event() {
        let (id, e) = event(
            br#"{"timestamp":"2024-01-15T10:30:00Z","device_id":"sensor-1","cpu":0.75,"rps":150,"extra":[1]}"#,
            now(),
        )
        .expect("valid");
        assert_eq!(id, "sensor-1");
        assert_eq!((e.cpu(), e.rps()), (0.75, 150.0));
        assert_eq!(e.timestamp().to_rfc3339(), "2024-01-15T10:30:00+00:00");
    }

    #[test]
    fn timestamps_with_offsets_and_fractions_normalise_to_utc() {
        let (_, e) = event(
            br#"{"timestamp":"2024-01-15T12:30:00.250+02:00","device_id":"a","cpu":0,"rps":0}"#,
            now(),
        )
        .expect("valid");
        assert_eq!(e.timestamp().to_rfc3339(), "2024-01-15T10:30:00.250+00:00");
    }

    #[test]
    fn missing_or_null_timestamp_means_received_time() {
        for body in [
            r#"{"device_id":"a","cpu":0,"rps":0}"#,
            r#"{"device_id":"a","cpu":0,"rps":0,"timestamp":null}"#,
        ] {
            assert_eq!(
                event(body.as_bytes(), now()).expect("valid").1.timestamp(),
                now()
            );
        }
    }

    #[test]
    fn escaped_device_ids_are_decoded() {
        let (id, _) =
            event(br#"{"device_id":"caf\u00e9 1","cpu":0,"rps":0}"#, now()).expect("valid");
        assert_eq!(id, "café 1");
    }

    #[test]
    fn each_rule_names_its_field() {
        // One table of invalid bodies, shared with the API test that posts them.
        let table: Vec<serde_json::Value> =
            serde_json::from_str(include_str!("../../tests/fixtures/invalid_events.json"))
                .expect("table");
        assert!(table.len() >= 25);
        for case in &table {
            let body = case["body"].as_str().expect("body");
            assert_eq!(
                field_of(body),
                case["field"].as_str(),
                "{}: {body}",
                case["why"]
            );
        }
    }

    #[test]
    fn negative_zero_is_stored_as_zero() {
        let (_, e) = event(br#"{"device_id":"a","cpu":-0.0,"rps":-0}"#, now()).expect("valid");
        assert!(
            e.cpu().is_sign_positive() && e.rps().is_sign_positive(),
            "{e:?}"
        );
    }

    #[test]
    fn number_messages_say_what_is_wrong() {
        let message = |body: &str| event(body.as_bytes(), now()).expect_err(body).message;
        assert_eq!(
            message(r#"{"device_id":"a","cpu":"0.5","rps":1}"#),
            "cpu must be a number"
        );
        assert_eq!(
            message(r#"{"device_id":"a","cpu":0.5,"rps":-1}"#),
            "rps must be at least 0, got -1"
        );
        // Beyond f64: infinite once parsed, never accepted.
        assert_eq!(
            message(r#"{"device_id":"a","cpu":0.5,"rps":1e400}"#),
            "rps must be a finite number"
        );
        assert_eq!(
            message(r#"{"device_id":"a","cpu":-1e400,"rps":1}"#),
            "cpu must be a finite number"
        );
    }

    #[test]
    fn events_of_a_batch_without_a_timestamp_follow_the_receive_time_in_order() {
        let line = "{\"device_id\":\"a\",\"cpu\":0.5,\"rps\":1}\n";
        let body = line.repeat(3);
        let stamps: Vec<_> = batch(body.as_bytes(), now(), 10)
            .expect("a batch")
            .into_iter()
            .map(|(_, item)| item.expect("valid").1.timestamp())
            .collect();
        let ns = chrono::Duration::nanoseconds;
        assert_eq!(stamps, [now(), now() + ns(1), now() + ns(2)]);
    }

    #[test]
    fn a_batch_may_hold_exactly_max_events_in_either_form() {
        let event = r#"{"device_id":"a","cpu":0.5,"rps":1}"#;
        let array = |n: usize| format!("[{}]", vec![event; n].join(","));
        let lines = |n: usize| format!("{event}\n").repeat(n);
        for body in [array(3), lines(3)] {
            assert_eq!(batch(body.as_bytes(), now(), 3).expect("fits").len(), 3);
        }
        for body in [array(4), lines(4)] {
            assert_eq!(batch(body.as_bytes(), now(), 3), Err(BatchError::TooMany));
        }
    }

    #[test]
    fn a_timestamp_without_an_offset_is_told_so() {
        for local in ["2024-01-15T10:30:00", "2024-01-15T10:30:00.250"] {
            let body = format!(r#"{{"device_id":"a","cpu":0,"rps":0,"timestamp":"{local}"}}"#);
            let err = event(body.as_bytes(), now()).expect_err(local);
            assert_eq!(err.field, Some("timestamp"));
            assert_eq!(
                err.message,
                "timestamp needs an offset such as Z or +02:00 (e.g. 2024-01-15T10:30:00Z)"
            );
        }
        let err = event(
            br#"{"device_id":"a","cpu":0,"rps":0,"timestamp":"yesterday"}"#,
            now(),
        )
        .expect_err("not a time");
        assert!(
            err.message.starts_with("timestamp must be RFC 3339"),
            "{err:?}"
        );
    }

    #[test]
    fn ndjson_on_one_line_hints_at_data_binary() {
        let event = r#"{"device_id":"a","cpu":0.5,"rps":1}"#;
        // The whole body on one line (curl -d @file): refused whole.
        let stripped = format!("{event}{event} {event}");
        let Err(BatchError::Malformed(err)) = batch(stripped.as_bytes(), now(), 10) else {
            panic!("refused as a whole");
        };
        assert!(err.message.contains("--data-binary"), "{err:?}");
        assert_eq!(err.field, None);
        // One such line among others: that line's error.
        let mixed = format!("{event}\n{event}{event}\n{{\"device_id\":\n");
        let items = batch(mixed.as_bytes(), now(), 10).expect("a batch");
        assert!(items[0].1.is_ok());
        let second = items[1].1.as_ref().expect_err("two on one line");
        assert!(second.message.contains("--data-binary"), "{second:?}");
        // A line that is merely malformed gets no such hint.
        let third = items[2].1.as_ref().expect_err("truncated");
        assert!(!third.message.contains("--data-binary"), "{third:?}");
    }

    #[test]
    fn exactly_128_bytes_is_allowed() {
        assert!(device_id(&"é".repeat(64)).is_ok());
        assert!(device_id(&"é".repeat(65)).is_err());
    }

    mod fuzz {
        //! Hostile input: arbitrary bytes and arbitrary JSON never panic, and every
        //! refusal is a 400 naming a known field (or none).
        use super::*;
        use proptest::prelude::*;
        use serde_json::{json, Map, Value};

        fn any_json() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
                ".{0,40}".prop_map(Value::from),
                "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
                    prop::collection::btree_map(".{0,8}", inner, 0..6)
                        .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
                ]
            })
        }

        fn check(body: &[u8]) -> Result<(), TestCaseError> {
            match event(body, now()) {
                Ok((id, e)) => {
                    prop_assert!(device_id(&id).is_ok());
                    prop_assert!(e.cpu().is_finite() && (0.0..=1.0).contains(&e.cpu()));
                    prop_assert!(e.rps().is_finite() && e.rps() >= 0.0);
                }
                Err(err) => {
                    prop_assert_eq!(err.status.as_u16(), 400);
                    prop_assert!(matches!(
                        err.field,
                        None | Some("device_id" | "cpu" | "rps" | "timestamp")
                    ));
                    prop_assert!(!err.message.is_empty());
                }
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn arbitrary_bytes(body in prop::collection::vec(any::<u8>(), 0..512)) {
                check(&body)?;
            }

            #[test]
            fn arbitrary_json_documents(doc in any_json()) {
                check(doc.to_string().as_bytes())?;
            }

            #[test]
            fn events_with_arbitrary_field_values(
                id in any_json(), cpu in any_json(), rps in any_json(), ts in any_json(),
                keep in prop::collection::vec(any::<bool>(), 4),
            ) {
                let mut m = Map::new();
                for (k, (v, keep)) in ["device_id", "cpu", "rps", "timestamp"].iter().zip([id, cpu, rps, ts].into_iter().zip(keep)) {
                    if keep {
                        m.insert((*k).to_string(), v);
                    }
                }
                check(Value::Object(m).to_string().as_bytes())?;
            }

            #[test]
            fn valid_events_are_accepted(id in "[a-zA-Z0-9._:-]{1,128}", cpu in 0.0..=1.0f64, rps in 0.0..1e12f64) {
                let body = json!({"device_id": id, "cpu": cpu, "rps": rps}).to_string();
                let (got, e) = event(body.as_bytes(), now()).map_err(|e| TestCaseError::fail(e.message))?;
                prop_assert_eq!(got, id);
                prop_assert_eq!((e.cpu(), e.rps()), (cpu, rps));
            }
        }

        #[test]
        fn deeply_nested_json_is_refused_without_overflowing_the_stack() {
            let deep = format!(
                "{{\"device_id\":{}1{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            );
            assert_eq!(
                event(deep.as_bytes(), now())
                    .expect_err("too deep")
                    .status
                    .as_u16(),
                400
            );
        }

        #[test]
        fn deep_nesting_in_an_ignored_field_is_refused_naming_the_limit() {
            let nested = |levels: usize| {
                format!(
                    r#"{{"device_id":"a","cpu":0,"rps":0,"extra":{}1{}}}"#,
                    "[".repeat(levels),
                    "]".repeat(levels)
                )
            };
            let object = |levels: usize| {
                format!(
                    r#"{{"device_id":"a","cpu":0,"rps":0,"extra":{}1{}}}"#,
                    r#"{"k":"#.repeat(levels),
                    "}".repeat(levels)
                )
            };
            // The event's own object is level 1.
            for body in [nested(MAX_NESTING - 1), object(MAX_NESTING - 1)] {
                assert!(event(body.as_bytes(), now()).is_ok(), "{body}");
            }
            for body in [
                nested(MAX_NESTING),
                object(MAX_NESTING),
                nested(32_000),
                object(100_000),
            ] {
                let err = event(body.as_bytes(), now()).expect_err("too deep");
                assert_eq!((err.status.as_u16(), err.field), (400, None));
                assert!(
                    err.message.starts_with("JSON nested deeper than 64 levels"),
                    "{}",
                    err.message
                );
            }
            // In a batch too, in either form.
            let deep = nested(32_000);
            for body in [format!("[{deep}]"), format!("{deep}\n")] {
                let items = batch(body.as_bytes(), now(), 10).expect("a batch");
                let err = items[0].1.as_ref().expect_err("too deep");
                assert!(
                    err.message.starts_with("JSON nested deeper than"),
                    "{err:?}"
                );
            }
        }

        #[test]
        fn invalid_utf8_is_refused() {
            let err = event(b"{\"device_id\":\"\xff\xfe\",\"cpu\":0,\"rps\":0}", now())
                .expect_err("bad utf-8");
            assert_eq!(err.status.as_u16(), 400);
        }
    }
}
