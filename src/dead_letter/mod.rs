//! Dead letters: what a consumer keeps of a message it gives up on, in the shape qx-worker's `DeadLetterStore`
//! writes, so `qx dlq list` and `qx dlq replay` treat rows written from Rust like a Python worker's.
//!
//! Owns the row ([`DeadLetter`]), its notification on `qx_dlq.<event_name>` and the [`DeadLetters`] trait
//! that stores rows; with the `dead-letters-postgres` feature, `PgDeadLetters` writes qx-worker's
//! `qx_dead_letters` table. When to give up on a message is the consumer's call, not this module's.

use std::collections::BTreeMap;
use std::error::Error as StdError;

use async_nats::header::NATS_MESSAGE_ID;
use chrono::{DateTime, FixedOffset, SubsecRound, Utc};
use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::wire::{
    self, SubjectError, HEADER_CORRELATION_ID, HEADER_EVENT_NAME, HEADER_EVENT_VERSION, HEADER_TENANT_ID,
};

#[cfg(feature = "dead-letters-postgres")]
mod postgres;
#[cfg(feature = "dead-letters-postgres")]
pub use postgres::PgDeadLetters;

/// qx-worker notifies each dead letter on `<DLQ_SUBJECT_PREFIX>.<event_name>`.
pub const DLQ_SUBJECT_PREFIX: &str = "qx_dlq";
/// qx-worker's event name for a message without `qx.event_name`.
const UNKNOWN_EVENT_NAME: &str = "<unknown>";
/// `last_error` is a `varchar(2048)`: qx-worker cuts the error to fit.
const LAST_ERROR_CHARS: usize = 2048;

/// Whatever kept a [`DeadLetters`] store from storing.
pub type StoreError = Box<dyn StdError + Send + Sync>;

/// Keeps the messages a consumer gives up on; see
/// [`EventConsumer::with_dead_letters`](crate::consumer::EventConsumer::with_dead_letters).
///
/// Object safe, so a consumer holds any store behind one pointer. Implement it with `Box::pin(async move { … })`:
///
/// ```
/// use futures::future::BoxFuture;
/// use qx_relay::dead_letter::{DeadLetter, DeadLetters, StoreError};
///
/// struct Stderr;
///
/// impl DeadLetters for Stderr {
///     fn store<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, Result<(), StoreError>> {
///         Box::pin(async move {
///             eprintln!("gave up on {} after {} deliveries", letter.subject, letter.delivered_count);
///             Ok(())
///         })
///     }
/// }
/// ```
pub trait DeadLetters: Send + Sync + 'static {
    /// Stores `letter` for good. The consumer acks the message only once this returns `Ok`.
    ///
    /// # Errors
    /// Whatever kept the letter from being stored. The consumer then naks the message, which JetStream, past
    /// `max_deliver`, does not deliver again: it stays in the stream only.
    fn store<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, Result<(), StoreError>>;
}

/// A message given up on: one row of qx-worker's `qx_dead_letters`, with the same values qx-worker 1.1.0
/// writes for the same message, except `Nats-Msg-Id` (see [`DeadLetter::headers`]).
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// Random; the id `qx dlq replay` takes.
    pub id: Uuid,
    /// `qx.event_name`, else `<unknown>`.
    pub event_name: String,
    /// `qx.event_version`, else 1 (not the envelope's: qx-worker reads the header alone).
    pub event_version: i32,
    /// The body when it is JSON, as received; else `{"raw": "<the body in hex>"}`.
    pub payload: Box<RawValue>,
    /// Every header of the message (the last value of each), which `qx dlq replay` sends again, except
    /// `Nats-Msg-Id`: a replay carrying it inside the stream's duplicate window would be dropped as a
    /// duplicate while the CLI reports success.
    pub headers: BTreeMap<String, String>,
    /// The subject it was delivered on, where `qx dlq replay` publishes it again.
    pub subject: String,
    /// `qx.correlation_id`, when it holds a UUID.
    pub correlation_id: Option<Uuid>,
    /// `qx.tenant_id`, when it holds a UUID.
    pub tenant_id: Option<Uuid>,
    /// JetStream's delivery count on the delivery that gave up.
    pub delivered_count: i32,
    /// Why, cut to 2048 characters.
    pub last_error: String,
    /// When the consumer gave up, to the microsecond Postgres and Python keep.
    pub failed_at: DateTime<Utc>,
}

impl DeadLetter {
    /// The dead letter of `message`, delivered `delivered` times, failing with `error`.
    pub(crate) fn new(message: &async_nats::Message, delivered: i64, error: &str) -> Self {
        let mut headers = BTreeMap::new();
        for (name, values) in message.headers.iter().flat_map(|headers| headers.iter()) {
            // A JSON object holds one value per name; the last one, as nats-py's header dict keeps it.
            if let Some(value) = values.last() {
                headers.insert(name.to_string(), value.as_str().to_owned());
            }
        }
        headers.remove(AsRef::<str>::as_ref(&NATS_MESSAGE_ID));
        let uuid = |name: &str| headers.get(name).and_then(|value| Uuid::parse_str(value).ok());
        let payload =
            serde_json::from_slice(&message.payload).unwrap_or_else(|_| raw_payload(&message.payload));
        Self {
            id: Uuid::new_v4(),
            event_name: headers.get(HEADER_EVENT_NAME).map_or(UNKNOWN_EVENT_NAME, String::as_str).to_owned(),
            event_version: headers
                .get(HEADER_EVENT_VERSION)
                .and_then(|value| value.parse().ok())
                .unwrap_or(1),
            payload,
            correlation_id: uuid(HEADER_CORRELATION_ID),
            tenant_id: uuid(HEADER_TENANT_ID),
            headers,
            subject: message.subject.to_string(),
            delivered_count: i32::try_from(delivered).unwrap_or(i32::MAX),
            last_error: error.chars().take(LAST_ERROR_CHARS).collect(),
            failed_at: Utc::now().trunc_subsecs(6),
        }
    }

    /// The notification qx-worker publishes for this letter: its subject and JSON body, which carries `error`
    /// whole (the row's copy is cut).
    ///
    /// # Errors
    /// When the event name cannot end a subject.
    pub(crate) fn notification(&self, error: &str) -> Result<(String, Vec<u8>), SubjectError> {
        let subject = wire::subject(DLQ_SUBJECT_PREFIX, &self.event_name)?;
        let body = Notification {
            id: self.id,
            event_name: &self.event_name,
            subject: &self.subject,
            failed_at: self.failed_at.fixed_offset(),
            last_error: error,
        };
        let body = serde_json::to_vec(&body).expect("a notification always serializes: strings and a uuid");
        Ok((subject, body))
    }
}

/// qx-worker's notification body, its keys in qx-worker's order.
#[derive(Serialize)]
struct Notification<'a> {
    id: Uuid,
    event_name: &'a str,
    subject: &'a str,
    #[serde(serialize_with = "crate::envelope::python_isoformat::serialize")]
    failed_at: DateTime<FixedOffset>,
    last_error: &'a str,
}

/// qx-worker's payload for a body that is not JSON.
fn raw_payload(body: &[u8]) -> Box<RawValue> {
    let hex: String = body.iter().map(|byte| format!("{byte:02x}")).collect();
    serde_json::value::to_raw_value(&serde_json::json!({ "raw": hex }))
        .expect("a JSON object of one string always serializes")
}

#[cfg(test)]
mod tests {
    use async_nats::HeaderMap;
    use serde_json::{json, Value};

    use super::*;

    fn message(headers: Option<HeaderMap>, body: &'static [u8]) -> async_nats::Message {
        async_nats::Message {
            subject: "billing.order.placed".into(),
            reply: None,
            payload: body.into(),
            headers,
            status: None,
            description: None,
            length: 0,
        }
    }

    fn payload(letter: &DeadLetter) -> Value {
        serde_json::from_str(letter.payload.get()).unwrap()
    }

    #[test]
    fn rows_follow_qx_worker() {
        let (correlation, tenant) = (Uuid::new_v4(), Uuid::new_v4());
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_EVENT_NAME, "order.placed");
        headers.insert(HEADER_CORRELATION_ID, correlation.to_string().as_str());
        headers.append(HEADER_TENANT_ID, "not-a-uuid");
        headers.append(HEADER_TENANT_ID, tenant.to_string().as_str());
        headers.insert(NATS_MESSAGE_ID, "5812d9a5-8e3f-4c3d-bda4-3a4899b4ad60");
        let body = br#" {"event_version": 2, "payload": {"price": 1e-07, "big": 123456789012345678901}} "#;
        let letter = DeadLetter::new(&message(Some(headers), body), 5, "downstream unavailable");

        assert_eq!(letter.event_name, "order.placed");
        assert_eq!(letter.event_version, 1, "no qx.event_version header: 1, whatever the envelope says");
        assert_eq!(
            letter.payload.get().trim(),
            std::str::from_utf8(body).unwrap().trim(),
            "digits as received"
        );
        let expected_headers = [
            (HEADER_CORRELATION_ID, correlation.to_string()),
            (HEADER_EVENT_NAME, "order.placed".to_owned()),
            (HEADER_TENANT_ID, tenant.to_string()),
        ];
        let expected_headers = expected_headers.map(|(name, value)| (name.to_owned(), value)).into();
        assert_eq!(letter.headers, expected_headers, "every header but Nats-Msg-Id, last value of each");
        assert_eq!((letter.correlation_id, letter.tenant_id), (Some(correlation), Some(tenant)));
        assert_eq!((letter.subject.as_str(), letter.delivered_count), ("billing.order.placed", 5));
        assert_eq!(letter.last_error, "downstream unavailable");
        assert_eq!(letter.failed_at.timestamp_subsec_nanos() % 1000, 0, "microseconds");
    }

    #[test]
    fn messages_without_headers_or_json_keep_what_they_have() {
        let letter = DeadLetter::new(&message(None, b"\x00not json\xff"), 1, &"é".repeat(3000));
        assert_eq!((letter.event_name.as_str(), letter.event_version), ("<unknown>", 1));
        assert_eq!(payload(&letter), json!({"raw": "006e6f74206a736f6eff"}));
        assert!(letter.headers.is_empty());
        assert_eq!((letter.correlation_id, letter.tenant_id), (None, None));
        assert_eq!(letter.last_error.chars().count(), 2048, "characters, not bytes");

        let mut headers = HeaderMap::new();
        headers.insert(HEADER_EVENT_VERSION, "2");
        let letter = DeadLetter::new(&message(Some(headers), b""), 1, "");
        assert_eq!(payload(&letter), json!({"raw": ""}));
        assert_eq!(letter.event_version, 2);
    }

    #[test]
    fn notifications_follow_qx_worker() {
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_EVENT_NAME, "order.placed");
        let mut letter = DeadLetter::new(&message(Some(headers), b"{}"), 3, "short");
        letter.failed_at = "2026-11-27T04:43:29.753088Z".parse().unwrap();
        let (subject, body) = letter.notification("the whole error").unwrap();
        assert_eq!(subject, "qx_dlq.order.placed");
        let expected = format!(
            r#"{{"id":"{}","event_name":"order.placed","subject":"billing.order.placed","failed_at":"2026-11-27T04:43:29.753088+00:00","last_error":"the whole error"}}"#,
            letter.id
        );
        assert_eq!(String::from_utf8(body).unwrap(), expected);

        letter.event_name = "order placed".into();
        assert!(letter.notification("").is_err(), "no subject to notify on");
    }
}
