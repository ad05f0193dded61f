//! Prints the orders and sign-ups a relay publishes (qx-relay or the Python one): a durable consumer of
//! `<prefix>.>` that decodes `order.placed` (v1 and v2) and `identity.user.registered` into Rust types.
//!
//! ```text
//! NATS_URL=nats://127.0.0.1:4222 cargo run --example consumer -- <stream> <subject_prefix> [durable]
//! ```
//! `QX_STREAM`, `QX_SUBJECT_PREFIX` and `QX_DURABLE` stand in for missing arguments; `NATS_URL` defaults to
//! `nats://127.0.0.1:4222`. Events of other types are terminated for this consumer. Ctrl-C stops it once the
//! events in hand are handled.

use qx_relay::consumer::RunConfig;
use qx_relay::{ConsumerConfig, EventConsumer, EventMessage, EventRegistry, HandlerError, QxEvent};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: Uuid,
    amount_cents: i64,
    currency: String,
    customer_email: String,
}
impl QxEvent for OrderPlaced {
    const NAME: &'static str = "order.placed";
    const VERSION: i32 = 1;
}

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlacedV2 {
    order_id: Uuid,
    lines: Vec<serde_json::Value>,
    note: Option<String>,
}
impl QxEvent for OrderPlacedV2 {
    const NAME: &'static str = "order.placed";
    const VERSION: i32 = 2;
}

#[derive(Debug, Serialize, Deserialize)]
struct UserRegistered {
    email: String,
    display_name: String,
}
impl QxEvent for UserRegistered {
    const NAME: &'static str = "identity.user.registered";
    const VERSION: i32 = 1;
}

/// The argument at `position`, else the environment variable `name`.
fn setting(position: usize, name: &str) -> Result<String, String> {
    std::env::args()
        .nth(position)
        .or_else(|| std::env::var(name).ok())
        .ok_or_else(|| format!("usage: consumer <stream> <subject_prefix> [durable] (or set {name})"))
}

async fn print_event(message: EventMessage) -> Result<(), HandlerError> {
    let event = message.event();
    // From the headers, where Python workers read them; every Qx producer sets them, the Python relay too.
    let (tenant, correlation) =
        message.headers().map_or((None, None), |headers| (headers.tenant_id, headers.correlation_id));
    let delivered = message.delivery().delivered();
    if let Some(order) = event.downcast_ref::<OrderPlaced>() {
        println!(
            "order {} placed: {} {} by {} (tenant {tenant:?}, correlation {correlation:?}, delivery {delivered})",
            order.order_id, order.amount_cents, order.currency, order.customer_email
        );
    } else if let Some(order) = event.downcast_ref::<OrderPlacedV2>() {
        println!(
            "order {} placed with {} lines (v2, tenant {tenant:?}, delivery {delivered})",
            order.order_id,
            order.lines.len()
        );
    } else if let Some(user) = event.downcast_ref::<UserRegistered>() {
        println!("{} signed up as {:?}", user.email, user.display_name);
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let stream = setting(1, "QX_STREAM")?;
    let prefix = setting(2, "QX_SUBJECT_PREFIX")?;
    let durable = setting(3, "QX_DURABLE").unwrap_or_else(|_| "qx-example-consumer".to_owned());
    let url = std::env::var("NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());

    let mut registry = EventRegistry::new();
    registry.register::<OrderPlaced>()?.register::<OrderPlacedV2>()?.register::<UserRegistered>()?;
    let jetstream = async_nats::jetstream::new(async_nats::connect(url).await?);
    let config = ConsumerConfig::new(stream, durable, format!("{prefix}.>"));
    let consumer = EventConsumer::bind(&jetstream, config, registry).await?;

    let cancel = CancellationToken::new();
    tokio::spawn({
        let cancel = cancel.clone();
        async move {
            let _ = tokio::signal::ctrl_c().await;
            cancel.cancel();
        }
    });
    consumer.run(RunConfig::default(), cancel, print_event).await?;
    Ok(())
}
