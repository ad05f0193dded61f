//! The Qx event envelope: the JSON object a qx-db producer stores in `qx_outbox_events.payload` and the relay
//! publishes as the message body, byte for byte.
//!
//! Owns the envelope's shape and its timestamp format; knows nothing about NATS or SQL.

use chrono::{DateTime, FixedOffset};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The business fields of an event, as the envelope's `payload` object carries them.
pub type Payload = serde_json::Map<String, serde_json::Value>;

/// One integration event as Qx writes it.
///
/// Unlike the Python consumer, which leaves `occurred_at` a string, this parses it, so a decoded event can be
/// enveloped again. Serializing gives JSON equal (as a JSON value) to what qx-db wrote.
///
/// ```
/// use qx_relay::Envelope;
/// let body = r#"{"payload": {"seq": 0}, "actor_id": null, "event_id": "5812d9a5-8e3f-4c3d-bda4-3a4899b4ad60",
///   "tenant_id": null, "event_name": "order.placed", "occurred_at": "2026-11-27T04:43:29.753088+00:00",
///   "causation_id": null, "event_version": 1, "correlation_id": null}"#;
/// let envelope = Envelope::from_json(body.as_bytes())?;
/// assert_eq!(envelope.event_name, "order.placed");
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique per event; the relay uses it as `Nats-Msg-Id` so JetStream drops repeats.
    pub event_id: Uuid,
    /// Dotted name, e.g. `order.placed`; the last part of the subject.
    pub event_name: String,
    /// Schema version of `payload` for this `event_name`.
    pub event_version: i32,
    /// When the producer raised the event.
    #[serde(with = "python_isoformat")]
    pub occurred_at: DateTime<FixedOffset>,
    /// Ties together the events of one request or saga.
    pub correlation_id: Option<Uuid>,
    /// The event that caused this one, if any.
    pub causation_id: Option<Uuid>,
    /// The tenant the event belongs to, if the service is multi-tenant.
    pub tenant_id: Option<Uuid>,
    /// Who acted, if known.
    pub actor_id: Option<Uuid>,
    /// The business fields.
    pub payload: Payload,
}

impl Envelope {
    /// Parses an envelope from a message body or an outbox `payload` column.
    ///
    /// # Errors
    /// When the bytes are not JSON or lack a field of the envelope.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// Serializes the envelope the way the relay publishes it.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes: string keys, no foreign types")
    }
}

/// The `event_id` of an envelope's JSON text, found by scanning it instead of parsing it (parsing was a tenth
/// of the relay's CPU per row): the string value of the top-level key `"event_id"`. An id written with
/// escapes, which Qx never writes, or a body that is not an object counts as none.
///
/// ```
/// let body = r#"{"payload": {"event_id": "not this one"}, "event_id": "5812d9a5-8e3f-4c3d-bda4-3a4899b4ad60"}"#;
/// assert_eq!(qx_relay::envelope::event_id_of(body).unwrap().to_string(), "5812d9a5-8e3f-4c3d-bda4-3a4899b4ad60");
/// ```
pub fn event_id_of(body: &str) -> Option<Uuid> {
    let bytes = body.as_bytes();
    let mut depth = 0usize;
    let mut at = 0;
    while at < bytes.len() {
        match bytes[at] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let end = closing_quote(bytes, at + 1)?;
                if depth == 1 && &bytes[at + 1..end] == b"event_id" {
                    let after = skip_whitespace(bytes, end + 1);
                    if bytes.get(after) == Some(&b':') {
                        let value = skip_whitespace(bytes, after + 1);
                        if bytes.get(value) != Some(&b'"') {
                            return None;
                        }
                        let id = &bytes[value + 1..closing_quote(bytes, value + 1)?];
                        return Uuid::try_parse_ascii(id).ok();
                    }
                }
                at = end;
            }
            _ => {}
        }
        at += 1;
    }
    None
}

/// Where the string whose text starts at `from` ends. Most of an envelope is string text, which memchr skips
/// many bytes at a time: byte by byte, this scan was 7 % of the relay's CPU per row.
fn closing_quote(bytes: &[u8], from: usize) -> Option<usize> {
    let mut at = from;
    loop {
        at += memchr::memchr2(b'"', b'\\', bytes.get(at..)?)?;
        if bytes[at] == b'"' {
            return Some(at);
        }
        at += 2;
    }
}

fn skip_whitespace(bytes: &[u8], from: usize) -> usize {
    from + bytes.get(from..).map_or(0, |rest| rest.iter().take_while(|b| b.is_ascii_whitespace()).count())
}

/// Python's `datetime.isoformat()`: microseconds only when non-zero, offset as `+HH:MM`.
pub(crate) mod python_isoformat {
    use chrono::{DateTime, FixedOffset, Timelike};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(at: &DateTime<FixedOffset>, serializer: S) -> Result<S::Ok, S::Error> {
        let format = if at.nanosecond() == 0 { "%Y-%m-%dT%H:%M:%S%:z" } else { "%Y-%m-%dT%H:%M:%S%.6f%:z" };
        serializer.collect_str(&at.format(format))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<DateTime<FixedOffset>, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        DateTime::parse_from_rfc3339(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(occurred_at: &str) -> serde_json::Value {
        let body = serde_json::json!({
            "payload": {"seq": 1}, "actor_id": null, "event_id": Uuid::nil(), "tenant_id": null,
            "event_name": "a.b", "occurred_at": occurred_at, "causation_id": null, "event_version": 1,
            "correlation_id": null,
        });
        let envelope: Envelope = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(serde_json::to_value(&envelope).unwrap(), body);
        body
    }

    #[test]
    fn timestamps_keep_python_isoformat() {
        roundtrip("2026-11-27T04:43:29.753088+00:00");
        roundtrip("2026-11-27T04:43:29.800000+02:00");
        roundtrip("2026-11-27T04:43:29-05:30");
    }

    #[test]
    fn event_id_comes_from_the_top_level_key_only() {
        let (id, nested) = (Uuid::new_v4(), Uuid::new_v4());
        assert_eq!(event_id_of(&format!(r#"{{"payload": {{}}, "event_id": "{id}"}}"#)), Some(id));
        assert_eq!(event_id_of(r#"{"event_id": null}"#), None);
        assert_eq!(event_id_of(r#"{"event_id": "not-a-uuid"}"#), None);
        assert_eq!(event_id_of(r#""just a string""#), None);
        assert_eq!(event_id_of(r#"{"event_id""#), None, "cut short");
        let body = format!(
            r#"{{"payload": {{"event_id": "{nested}", "note": "a \"quoted\" }}{{ [brace", "list": ["event_id"], "path": "C:\\"}}, "kind": "event_id", "event_id": "{id}"}}"#
        );
        let parsed: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
        assert_eq!(parsed["event_id"], id.to_string());
        assert_eq!(event_id_of(&body), Some(id));
        assert_eq!(event_id_of(&format!(r#"{{"payload": {{"event_id": "{nested}"}}}}"#)), None);
        assert_eq!(event_id_of(&format!(r#"[{{"event_id": "{id}"}}]"#)), None);
        assert_eq!(event_id_of(&format!("{{ \"event_id\"\n :\t\"{id}\" }}")), Some(id));
    }

    #[test]
    fn every_fixture_row_yields_its_envelopes_event_id() {
        let rows = include_str!("../tests/fixtures/qx-outbox-rows.jsonl");
        assert!(rows.lines().count() >= 5);
        for row in rows.lines() {
            let row: serde_json::Value = serde_json::from_str(row).expect("a fixture row");
            let body = row["payload"].as_str().expect("payload");
            let envelope = Envelope::from_json(body.as_bytes()).expect("an envelope");
            assert_eq!(event_id_of(body), Some(envelope.event_id), "{body}");
        }
    }

    #[test]
    fn missing_fields_are_rejected() {
        assert!(Envelope::from_json(br#"{"event_name": "a"}"#).is_err());
    }
}
