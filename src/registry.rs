//! Typed integration events: the [`QxEvent`] trait, and the [`EventRegistry`] that turns a received message
//! into the Rust type registered for its `(event_name, event_version)`.
//!
//! Owns the mapping from names and versions to types; knows nothing about consumers, acks or SQL.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::fmt;

use async_nats::HeaderMap;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::envelope::Envelope;
use crate::wire::{self, EventHeaders, SubjectError};

/// A Rust type for one version of one Qx integration event.
///
/// The envelope's `payload` object is the type's serde form, so deriving `Serialize` and `Deserialize` and
/// naming the event is all it takes:
///
/// ```
/// use qx_relay::registry::QxEvent;
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct OrderPlaced {
///     order_id: uuid::Uuid,
///     amount_cents: i64,
/// }
///
/// impl QxEvent for OrderPlaced {
///     const NAME: &'static str = "order.placed";
///     const VERSION: i32 = 1;
/// }
/// ```
pub trait QxEvent: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The dotted `event_name`, e.g. `order.placed`; the last part of the subject.
    const NAME: &'static str;
    /// The `event_version` this type reads.
    const VERSION: i32;
}

/// Why a type could not be registered. A programming error: fix the code rather than retry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// Another type already reads this `(name, version)`.
    #[error("{name} v{version} is already registered to {registered}, cannot register {attempted}")]
    Conflict {
        /// The event name.
        name: &'static str,
        /// The event version.
        version: i32,
        /// The type registered first.
        registered: &'static str,
        /// The type refused.
        attempted: &'static str,
    },
    /// `QxEvent::NAME` cannot be the last part of a subject, so no such event can be published.
    #[error("event type {type_name} has an invalid name")]
    InvalidName {
        /// The type refused.
        type_name: &'static str,
        /// What is wrong with the name.
        #[source]
        source: SubjectError,
    },
}

/// Why a message did not decode into a registered event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The body is not JSON, or not a Qx envelope.
    #[error("message body is not a qx envelope")]
    NotEnvelope(#[source] serde_json::Error),
    /// No type is registered for this `(name, version)`.
    #[error("no type registered for {name} v{version}")]
    Unknown {
        /// The event name, from `qx.event_name` or the envelope.
        name: String,
        /// The event version, from `qx.event_version` or the envelope.
        version: i32,
    },
    /// The envelope's `payload` does not deserialize into the registered type.
    #[error("payload of {name} v{version} does not fit {type_name}")]
    Payload {
        /// The event name.
        name: String,
        /// The event version.
        version: i32,
        /// The registered type.
        type_name: &'static str,
        /// What serde objected to.
        #[source]
        source: serde_json::Error,
    },
}

type DecodeFn = fn(&Envelope) -> Result<Box<dyn Any + Send + Sync>, serde_json::Error>;

#[derive(Clone, Copy)]
struct Entry {
    type_id: TypeId,
    type_name: &'static str,
    decode: DecodeFn,
}

/// Which Rust type reads which `(event_name, event_version)`.
///
/// Build it once at start, then share it (it is `Clone` and read-only while decoding).
///
/// ```
/// # use qx_relay::registry::{EventRegistry, QxEvent};
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlaced { order_id: uuid::Uuid }
/// # impl QxEvent for OrderPlaced { const NAME: &'static str = "order.placed"; const VERSION: i32 = 1; }
/// # #[derive(serde::Serialize, serde::Deserialize)] struct OrderPlacedV2 { order_id: uuid::Uuid }
/// # impl QxEvent for OrderPlacedV2 { const NAME: &'static str = "order.placed"; const VERSION: i32 = 2; }
/// let mut registry = EventRegistry::new();
/// registry.register::<OrderPlaced>()?.register::<OrderPlacedV2>()?;
/// # Ok::<(), qx_relay::registry::RegistryError>(())
/// ```
#[derive(Clone, Default)]
pub struct EventRegistry {
    entries: HashMap<(&'static str, i32), Entry>,
}

impl EventRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `T` for `(T::NAME, T::VERSION)`. Registering the same type again does nothing.
    ///
    /// # Errors
    /// [`RegistryError::Conflict`] when another type holds that name and version;
    /// [`RegistryError::InvalidName`] when `T::NAME` is not a valid subject token sequence.
    pub fn register<T: QxEvent>(&mut self) -> Result<&mut Self, RegistryError> {
        let type_name = std::any::type_name::<T>();
        wire::validate_event_name(T::NAME)
            .map_err(|source| RegistryError::InvalidName { type_name, source })?;
        let entry = Entry { type_id: TypeId::of::<T>(), type_name, decode: decode_payload::<T> };
        match self.entries.get(&(T::NAME, T::VERSION)) {
            Some(existing) if existing.type_id == entry.type_id => {}
            Some(existing) => {
                return Err(RegistryError::Conflict {
                    name: T::NAME,
                    version: T::VERSION,
                    registered: existing.type_name,
                    attempted: type_name,
                })
            }
            None => {
                self.entries.insert((T::NAME, T::VERSION), entry);
            }
        }
        Ok(self)
    }

    /// Decodes a message body into its registered type.
    ///
    /// The name and version come from the Qx headers when the message has them (see
    /// [`EventHeaders::from_header_map`]), else from the envelope, so messages without Qx headers still decode.
    ///
    /// # Errors
    /// See [`DecodeError`]: each variant is a distinct reason, and none goes away by decoding again.
    pub fn decode(&self, headers: Option<&HeaderMap>, body: &[u8]) -> Result<DecodedEvent, DecodeError> {
        let envelope = Envelope::from_json(body).map_err(DecodeError::NotEnvelope)?;
        let headers = headers.and_then(|headers| EventHeaders::from_header_map(headers, &envelope));
        let (name, version) = match &headers {
            Some(headers) => (headers.event_name.as_str(), headers.event_version),
            None => (envelope.event_name.as_str(), envelope.event_version),
        };
        let entry = self.lookup(name, version)?;
        let event = (entry.decode)(&envelope).map_err(|source| DecodeError::Payload {
            name: name.to_owned(),
            version,
            type_name: entry.type_name,
            source,
        })?;
        Ok(DecodedEvent { envelope: Box::new(envelope), headers, event, type_name: entry.type_name })
    }

    /// Decodes a received NATS message (core, or JetStream's, which derefs to it): Qx headers, then body.
    ///
    /// # Errors
    /// As [`EventRegistry::decode`].
    pub fn decode_message(&self, message: &async_nats::Message) -> Result<DecodedEvent, DecodeError> {
        self.decode(message.headers.as_ref(), &message.payload)
    }

    fn lookup(&self, name: &str, version: i32) -> Result<Entry, DecodeError> {
        // `HashMap` is covariant in its key: the `'static` names can be looked up with a borrowed one.
        let entries: &HashMap<(&str, i32), Entry> = &self.entries;
        entries
            .get(&(name, version))
            .copied()
            .ok_or_else(|| DecodeError::Unknown { name: name.to_owned(), version })
    }
}

impl fmt::Debug for EventRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(
                self.entries
                    .iter()
                    .map(|((name, version), entry)| (format!("{name} v{version}"), entry.type_name)),
            )
            .finish()
    }
}

fn decode_payload<T: QxEvent>(envelope: &Envelope) -> Result<Box<dyn Any + Send + Sync>, serde_json::Error> {
    Ok(Box::new(T::deserialize(&envelope.payload)?))
}

/// A message decoded into its registered type, with the envelope and the Qx headers it came with.
pub struct DecodedEvent {
    // Boxed: the envelope is most of the size, and a `DecodedEvent` moves through results and channels.
    envelope: Box<Envelope>,
    headers: Option<EventHeaders>,
    event: Box<dyn Any + Send + Sync>,
    type_name: &'static str,
}

impl DecodedEvent {
    /// The envelope: ids, timestamps, tenant, and the raw `payload`.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The `qx.*` headers, with version and event id from the envelope where the producer left them out;
    /// `None` when the message has no `qx.event_name` (see [`EventHeaders::from_header_map`]).
    pub fn headers(&self) -> Option<&EventHeaders> {
        self.headers.as_ref()
    }

    /// The event as `T`, or `None` when it decoded into another type.
    pub fn downcast_ref<T: QxEvent>(&self) -> Option<&T> {
        self.event.downcast_ref()
    }

    /// Takes the event out as `T` with its envelope, or gives `self` back when it is another type.
    ///
    /// # Errors
    /// `self`, unchanged, when the event is not a `T`.
    pub fn downcast<T: QxEvent>(self) -> Result<(T, Envelope), Self> {
        match self.event.downcast::<T>() {
            Ok(event) => Ok((*event, *self.envelope)),
            Err(event) => Err(Self { event, ..self }),
        }
    }

    /// The Rust type the event decoded into, for logs.
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }
}

impl fmt::Debug for DecodedEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DecodedEvent")
            .field("type_name", &self.type_name)
            .field("envelope", &self.envelope)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use uuid::Uuid;

    use super::*;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Placed {
        order_id: Uuid,
        amount_cents: i64,
    }
    impl QxEvent for Placed {
        const NAME: &'static str = "order.placed";
        const VERSION: i32 = 1;
    }

    #[derive(Debug, Serialize, Deserialize)]
    struct PlacedV2 {
        lines: Vec<serde_json::Value>,
    }
    impl QxEvent for PlacedV2 {
        const NAME: &'static str = "order.placed";
        const VERSION: i32 = 2;
    }

    #[derive(Serialize, Deserialize)]
    struct Impostor {}
    impl QxEvent for Impostor {
        const NAME: &'static str = "order.placed";
        const VERSION: i32 = 1;
    }

    #[derive(Serialize, Deserialize)]
    struct Wildcard {}
    impl QxEvent for Wildcard {
        const NAME: &'static str = "order.*";
        const VERSION: i32 = 1;
    }

    fn body(name: &str, version: i32, payload: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "payload": payload, "actor_id": null, "event_id": Uuid::new_v4(), "tenant_id": null,
            "event_name": name, "occurred_at": "2026-11-27T04:43:29.753088+00:00", "causation_id": null,
            "event_version": version, "correlation_id": null,
        }))
        .unwrap()
    }

    fn headers(name: &str, version: i32) -> HeaderMap {
        let headers = EventHeaders {
            event_name: name.into(),
            event_version: version,
            event_id: None,
            correlation_id: None,
            tenant_id: None,
        };
        headers.to_header_map(Uuid::new_v4())
    }

    fn registry() -> EventRegistry {
        let mut registry = EventRegistry::new();
        registry.register::<Placed>().unwrap().register::<PlacedV2>().unwrap();
        registry
    }

    #[test]
    fn registering_twice_is_a_no_op_but_a_second_type_conflicts() {
        let mut registry = registry();
        registry.register::<Placed>().unwrap();
        assert_eq!(registry.entries.len(), 2);
        let err = registry.register::<Impostor>().err().unwrap();
        assert!(matches!(err, RegistryError::Conflict { name: "order.placed", version: 1, .. }), "{err:?}");
        assert!(matches!(registry.register::<Wildcard>(), Err(RegistryError::InvalidName { .. })));
    }

    #[test]
    fn decodes_by_version_into_the_registered_type() {
        let order_id = Uuid::new_v4();
        let v1 = body("order.placed", 1, serde_json::json!({"order_id": order_id, "amount_cents": 5}));
        let decoded = registry().decode(Some(&headers("order.placed", 1)), &v1).unwrap();
        assert_eq!(decoded.downcast_ref::<Placed>(), Some(&Placed { order_id, amount_cents: 5 }));
        assert!(decoded.downcast_ref::<PlacedV2>().is_none());
        let decoded = decoded.downcast::<PlacedV2>().unwrap_err();
        let (event, envelope) = decoded.downcast::<Placed>().unwrap();
        assert_eq!(event.amount_cents, 5);
        assert_eq!(envelope.event_version, 1);

        let v2 = body("order.placed", 2, serde_json::json!({"lines": [1]}));
        let decoded = registry().decode(None, &v2).unwrap();
        assert_eq!(decoded.downcast_ref::<PlacedV2>().unwrap().lines.len(), 1);
    }

    #[test]
    fn messages_decode_by_their_qx_headers_else_by_the_envelope() {
        let v2 = body("order.placed", 2, serde_json::json!({"lines": []}));
        let mut message = async_nats::Message {
            subject: "billing.order.placed".into(),
            reply: None,
            payload: v2.into(),
            headers: Some(headers("order.placed", 1)),
            status: None,
            description: None,
            length: 0,
        };
        let err = registry().decode_message(&message).unwrap_err();
        assert!(matches!(err, DecodeError::Payload { version: 1, .. }), "{err:?}");
        message.headers = None;
        let decoded = registry().decode_message(&message).unwrap();
        assert!(decoded.downcast_ref::<PlacedV2>().is_some());
        assert_eq!(decoded.headers(), None);

        // The Python relay sends the name alone: the version comes from the envelope.
        let mut name_only = HeaderMap::new();
        name_only.insert(wire::HEADER_EVENT_NAME, "order.placed");
        message.headers = Some(name_only);
        let decoded = registry().decode_message(&message).unwrap();
        assert!(decoded.downcast_ref::<PlacedV2>().is_some());
        assert_eq!(decoded.headers().map(|headers| headers.event_version), Some(2));
    }

    #[test]
    fn each_failure_has_its_own_error() {
        let registry = registry();
        let unknown = body("order.shipped", 1, serde_json::json!({}));
        assert!(matches!(
            registry.decode(None, &unknown),
            Err(DecodeError::Unknown { ref name, version: 1 }) if name == "order.shipped"
        ));
        let v1 = body("order.placed", 1, serde_json::json!({}));
        assert!(matches!(
            registry.decode(Some(&headers("order.placed", 3)), &v1),
            Err(DecodeError::Unknown { version: 3, .. })
        ));
        assert!(matches!(
            registry.decode(Some(&headers("order.placed", 1)), b"not json"),
            Err(DecodeError::NotEnvelope(_))
        ));
        assert!(matches!(registry.decode(None, br#"{"payload": {}}"#), Err(DecodeError::NotEnvelope(_))));
        let wrong = body("order.placed", 1, serde_json::json!({"order_id": "nope", "amount_cents": 1}));
        assert!(matches!(registry.decode(None, &wrong), Err(DecodeError::Payload { .. })));
    }
}
