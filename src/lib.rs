//! qx-relay: the Rust side of Qx integration events.
//!
//! The companion library, always built and free of the daemon's dependencies:
//! - [`envelope`]: the Qx event envelope, the body of every message;
//! - [`wire`]: subjects and `qx.*` header names, written once;
//! - [`publisher`]: publish events to JetStream with the Qx headers and `Nats-Msg-Id`;
//!
//! With the `relay` feature (default), [`relay`] is the daemon that drains `qx_outbox_events` to JetStream.
//! Services that only need the library depend with `default-features = false`.

pub mod envelope;
pub mod publisher;
pub mod wire;

#[cfg(feature = "relay")]
pub mod relay;

pub use envelope::Envelope;
pub use publisher::{PublishError, Publisher};
pub use wire::EventHeaders;
