//! The NATS side of the Qx wire format: subjects and header names, written once for the relay, the publisher
//! and the consumer.
//!
//! Python workers read correlation and tenant only from these headers, never from the body, so every producer
//! must set them exactly as Qx does.

use async_nats::header::{HeaderMap, HeaderName, HeaderValue, NATS_MESSAGE_ID};
use serde::de::value::StrDeserializer;
use serde::de::{Deserialize, IntoDeserializer};
use uuid::Uuid;

use crate::envelope::Envelope;

/// The event's dotted name, e.g. `order.placed`.
pub const HEADER_EVENT_NAME: &str = "qx.event_name";
/// The payload schema version, as decimal text.
pub const HEADER_EVENT_VERSION: &str = "qx.event_version";
/// The envelope's `event_id`.
pub const HEADER_EVENT_ID: &str = "qx.event_id";
/// Set only when the event has a correlation id.
pub const HEADER_CORRELATION_ID: &str = "qx.correlation_id";
/// Set only when the event has a tenant; a Python worker takes the tenant from here alone.
pub const HEADER_TENANT_ID: &str = "qx.tenant_id";

/// Why an event name cannot become a subject. Retrying never helps.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    /// The name is empty, or one of its dot-separated tokens is.
    #[error("event name {0:?} has an empty subject token")]
    EmptyToken(String),
    /// The name holds whitespace nats-server splits on, or NUL.
    #[error("event name {0:?} holds whitespace or NUL, which nats-server refuses in a subject")]
    InvalidCharacter(String),
    /// A token is exactly `*` or `>`: a wildcard, which a published subject cannot hold.
    #[error("event name {0:?} has a wildcard token")]
    Wildcard(String),
}

/// What nats-server refuses anywhere in a subject: the whitespace it splits tokens on (`IsValidSubject`), and
/// NUL, which it takes for corruption when it reads a stream's subjects back.
const NOT_IN_SUBJECTS: [char; 6] = [' ', '\t', '\n', '\u{c}', '\r', '\0'];

/// The subject an event is published on: `<subject_prefix>.<event_name>`.
///
/// # Errors
/// When `event_name` would make an invalid or wildcard subject.
pub fn subject(subject_prefix: &str, event_name: &str) -> Result<String, SubjectError> {
    validate_event_name(event_name)?;
    Ok(format!("{subject_prefix}.{event_name}"))
}

/// Checks that `event_name` (or a subject prefix) is one or more literal subject tokens, as nats-server's
/// `IsValidPublishSubject` defines them: no empty token, no whitespace it splits on, no token that is exactly
/// `*` or `>`; and no NUL. Anything else is literal, `*` and `>` inside a token included (`order.bad*name`).
///
/// # Errors
/// See [`SubjectError`].
pub fn validate_event_name(event_name: &str) -> Result<(), SubjectError> {
    for token in event_name.split('.') {
        let error = match token {
            "" => SubjectError::EmptyToken,
            "*" | ">" => SubjectError::Wildcard,
            _ if token.contains(NOT_IN_SUBJECTS) => SubjectError::InvalidCharacter,
            _ => continue,
        };
        return Err(error(event_name.to_owned()));
    }
    Ok(())
}

/// What a Qx message says about its event outside the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventHeaders {
    /// `qx.event_name`.
    pub event_name: String,
    /// `qx.event_version`; on a received message without it, the envelope's.
    pub event_version: i32,
    /// `qx.event_id`; absent only when publishing a row whose envelope has no valid `event_id`.
    pub event_id: Option<Uuid>,
    /// `qx.correlation_id`.
    pub correlation_id: Option<Uuid>,
    /// `qx.tenant_id`.
    pub tenant_id: Option<Uuid>,
}

impl EventHeaders {
    /// The NATS headers Qx consumers expect, plus `Nats-Msg-Id` = `msg_id` for JetStream dedupe.
    pub fn to_header_map(&self, msg_id: Uuid) -> HeaderMap {
        let event_name = HeaderValue::from(self.event_name.as_str());
        header_map(event_name, self.event_version, self.event_id, self.correlation_id, self.tenant_id, msg_id)
    }

    /// Reads the Qx headers of a received message whose body is `envelope`; `None` when it has no
    /// `qx.event_name`, which every Qx producer sets.
    ///
    /// Not every producer sets the rest: the Python relay sends only `qx.event_name`, plus `qx.correlation_id`
    /// and `qx.tenant_id` when the event has them. A missing or unparsable `qx.event_version` or `qx.event_id`
    /// is taken from the envelope. Correlation and tenant come from the headers alone, as Python workers read
    /// them; an unparsable one is read as absent.
    pub fn from_header_map(headers: &HeaderMap, envelope: &Envelope) -> Option<Self> {
        let text = |name: &str| headers.get(name).map(HeaderValue::as_str);
        let id = |name: &str| text(name).and_then(|value| Uuid::parse_str(value).ok());
        Some(Self {
            event_name: text(HEADER_EVENT_NAME)?.to_owned(),
            event_version: text(HEADER_EVENT_VERSION)
                .and_then(|value| value.parse().ok())
                .unwrap_or(envelope.event_version),
            event_id: id(HEADER_EVENT_ID).or(Some(envelope.event_id)),
            correlation_id: id(HEADER_CORRELATION_ID),
            tenant_id: id(HEADER_TENANT_ID),
        })
    }
}

/// [`EventHeaders::to_header_map`] from the fields themselves, with the `qx.event_name` value made already:
/// the relay makes it once per event name and batch, and has no [`EventHeaders`] to build per row.
pub(crate) fn header_map(
    event_name: HeaderValue,
    event_version: i32,
    event_id: Option<Uuid>,
    correlation_id: Option<Uuid>,
    tenant_id: Option<Uuid>,
    msg_id: Uuid,
) -> HeaderMap {
    // Built once per published row: static names skip the per-insert name check and copy.
    const EVENT_NAME: HeaderName = HeaderName::from_static(HEADER_EVENT_NAME);
    const EVENT_VERSION: HeaderName = HeaderName::from_static(HEADER_EVENT_VERSION);
    const EVENT_ID: HeaderName = HeaderName::from_static(HEADER_EVENT_ID);
    const CORRELATION_ID: HeaderName = HeaderName::from_static(HEADER_CORRELATION_ID);
    const TENANT_ID: HeaderName = HeaderName::from_static(HEADER_TENANT_ID);
    let mut headers = HeaderMap::new();
    headers.insert(EVENT_NAME, event_name);
    headers.insert(EVENT_VERSION, HeaderValue::from(event_version));
    let event_id_text = event_id.map(uuid_text);
    // The msg id is nearly always the event_id: its text is copied, not made and checked again.
    let msg_id_text = match &event_id_text {
        Some(text) if event_id == Some(msg_id) => text.clone(),
        _ => uuid_text(msg_id),
    };
    if let Some(text) = event_id_text {
        headers.insert(EVENT_ID, text);
    }
    for (name, id) in [(CORRELATION_ID, correlation_id), (TENANT_ID, tenant_id)] {
        if let Some(id) = id {
            headers.insert(name, uuid_text(id));
        }
    }
    headers.insert(NATS_MESSAGE_ID, msg_id_text);
    headers
}

/// Lower-case hyphenated, as Postgres prints a `uuid` and Python's `str(uuid)` does.
///
/// Made through the value's serde form, which takes the text as it is: `From<&str>` looks for CR and LF
/// char by char, which a uuid's text cannot hold, and that cost more than the rest of making the value.
fn uuid_text(id: Uuid) -> HeaderValue {
    let mut buffer = Uuid::encode_buffer();
    let text: StrDeserializer<'_, serde::de::value::Error> =
        id.hyphenated().encode_lower(&mut buffer).into_deserializer();
    HeaderValue::deserialize(text).expect("a header value deserializes from any string")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_join_prefix_and_name() {
        assert_eq!(subject("billing", "order.placed").unwrap(), "billing.order.placed");
    }

    #[test]
    fn event_names_follow_nats_publish_subject_rules() {
        use SubjectError::{EmptyToken as Empty, InvalidCharacter as Char, Wildcard};
        // None: a valid name; else the error it gets.
        type Verdict = Option<fn(String) -> SubjectError>;
        let cases: &[(&str, Verdict)] = &[
            ("order.placed", None),
            ("identity.user.registered", None),
            ("ünïcødé.🎉", None),
            ("order-placed_v2:x$y", None),
            // `*` and `>` are wildcards only as whole tokens; inside one they are literal, and the Python relay
            // publishes such names.
            ("order.bad*name", None),
            ("order.*name", None),
            ("order.name>", None),
            ("order.>>", None),
            ("order.**", None),
            ("*a.b>", None),
            // Control characters other than NUL and the whitespace below, and Unicode spaces: nats-server
            // takes them in a publish subject.
            ("a\u{1}b", None),
            ("a\u{b}b", None),
            ("a\u{7f}b", None),
            ("a\u{a0}b", None),
            ("a\u{2028}b", None),
            ("", Some(Empty)),
            (".", Some(Empty)),
            (".x", Some(Empty)),
            ("x.", Some(Empty)),
            ("order..placed", Some(Empty)),
            ("*", Some(Wildcard)),
            (">", Some(Wildcard)),
            ("orders.*", Some(Wildcard)),
            ("orders.>", Some(Wildcard)),
            ("*.placed", Some(Wildcard)),
            ("order.*.v2", Some(Wildcard)),
            ("order.>.v2", Some(Wildcard)),
            ("order placed", Some(Char)),
            ("order.placed ", Some(Char)),
            (" ", Some(Char)),
            ("a\tb", Some(Char)),
            ("a\nb", Some(Char)),
            ("a\rb", Some(Char)),
            ("a\u{c}b", Some(Char)),
            ("a\u{0}b", Some(Char)),
            ("a b.*", Some(Char)),
        ];
        for &(name, expected) in cases {
            let expected = expected.map_or(Ok(()), |error| Err(error(name.to_owned())));
            assert_eq!(validate_event_name(name), expected, "{name:?}");
            assert_eq!(subject("billing", name).map(drop), expected, "{name:?}");
        }
    }

    /// A message as the Python relay publishes it: the event name, plus correlation and tenant when set.
    fn python_relay_headers(name: &str, correlation_id: Option<Uuid>, tenant_id: Option<Uuid>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_EVENT_NAME, name);
        for (header, id) in [(HEADER_CORRELATION_ID, correlation_id), (HEADER_TENANT_ID, tenant_id)] {
            if let Some(id) = id {
                headers.insert(header, id.to_string().as_str());
            }
        }
        headers
    }

    fn envelope(version: i32, tenant_id: Option<Uuid>) -> Envelope {
        let body = serde_json::json!({
            "payload": {}, "actor_id": null, "event_id": Uuid::new_v4(), "tenant_id": tenant_id,
            "event_name": "order.placed", "occurred_at": "2026-11-27T04:43:29.753088+00:00",
            "causation_id": null, "event_version": version, "correlation_id": null,
        });
        serde_json::from_value(body).unwrap()
    }

    #[test]
    fn headers_without_version_or_id_take_them_from_the_envelope() {
        let (correlation, tenant) = (Uuid::new_v4(), Uuid::new_v4());
        let envelope = envelope(2, Some(Uuid::new_v4()));
        let headers = python_relay_headers("order.placed", Some(correlation), Some(tenant));
        let expected = EventHeaders {
            event_name: "order.placed".into(),
            event_version: 2,
            event_id: Some(envelope.event_id),
            correlation_id: Some(correlation),
            // The header's tenant, not the envelope's: Python workers read it there alone.
            tenant_id: Some(tenant),
        };
        assert_eq!(EventHeaders::from_header_map(&headers, &envelope), Some(expected));

        let mut headers = python_relay_headers("order.placed", None, None);
        headers.insert(HEADER_EVENT_VERSION, "two");
        headers.insert(HEADER_TENANT_ID, "not-a-uuid");
        let read = EventHeaders::from_header_map(&headers, &envelope).unwrap();
        assert_eq!((read.event_version, read.tenant_id, read.correlation_id), (2, None, None));

        let mut headers = HeaderMap::new();
        headers.insert(HEADER_TENANT_ID, tenant.to_string().as_str());
        assert_eq!(EventHeaders::from_header_map(&headers, &envelope), None, "no qx.event_name");
    }

    #[test]
    fn uuid_values_are_what_the_checked_constructor_makes() {
        let id = Uuid::new_v4();
        assert_eq!(uuid_text(id), HeaderValue::from(id.to_string().as_str()));
        assert_eq!(uuid_text(Uuid::nil()).as_str(), "00000000-0000-0000-0000-000000000000");
    }

    #[test]
    fn the_msg_id_is_the_row_id_when_the_envelope_has_no_event_id() {
        let (row_id, event_id) = (Uuid::new_v4(), Uuid::new_v4());
        let map = header_map("a.b".into(), 1, None, None, None, row_id);
        assert_eq!(map.get(NATS_MESSAGE_ID).unwrap().as_str(), row_id.to_string());
        assert!(map.get(HEADER_EVENT_ID).is_none());
        let map = header_map("a.b".into(), 1, Some(event_id), None, None, row_id);
        assert_eq!(map.get(NATS_MESSAGE_ID).unwrap().as_str(), row_id.to_string());
        assert_eq!(map.get(HEADER_EVENT_ID).unwrap().as_str(), event_id.to_string());
        assert_eq!(map.len(), 4);
    }

    #[test]
    fn headers_round_trip() {
        let event = EventHeaders {
            event_name: "order.placed".into(),
            event_version: 2,
            event_id: Some(Uuid::new_v4()),
            correlation_id: Some(Uuid::new_v4()),
            tenant_id: None,
        };
        let msg_id = Uuid::new_v4();
        let map = event.to_header_map(msg_id);
        assert_eq!(map.get(NATS_MESSAGE_ID).unwrap().as_str(), msg_id.to_string());
        assert!(map.get(HEADER_TENANT_ID).is_none());
        // Headers set by every Qx producer but the Python relay win over a differing envelope.
        assert_eq!(EventHeaders::from_header_map(&map, &envelope(1, None)), Some(event));
    }
}
