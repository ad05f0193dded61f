//! What the stream holds after relays handed shards over, and the keyed events that show it: the relays' JSON
//! log lines, the stored messages (each relay publishing under a sub-prefix of its own), each row exactly
//! once, and per-key order inversions.

use std::collections::{HashMap, HashSet};

use async_nats::header::NATS_MESSAGE_ID;
use chrono::{DateTime, SecondsFormat, TimeDelta, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::outbox::envelope;
use crate::{Relay, TestDb, TestStream};

/// One line of a relay's JSON log.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub at: DateTime<Utc>,
    pub message: String,
    pub fields: Value,
}

/// The JSON lines of `relay`'s log (`QX_RELAY_LOG_FORMAT=json`).
pub fn log_lines(relay: &Relay) -> Vec<LogLine> {
    relay
        .log()
        .lines()
        .filter_map(|line| {
            let fields: Value = serde_json::from_str(line).ok()?;
            let at = DateTime::parse_from_rfc3339(fields["timestamp"].as_str()?).ok()?.with_timezone(&Utc);
            let message = fields["message"].as_str()?.to_owned();
            Some(LogLine { at, message, fields })
        })
        .collect()
}

/// A message in the stream: which relay sent it (its sub-prefix), its `Nats-Msg-Id`, and when the server
/// stored it.
#[derive(Debug, Clone)]
pub struct Stored {
    pub relay: String,
    pub msg_id: String,
    pub at: DateTime<Utc>,
    pub body: Value,
    pub event_name: String,
}

/// Every message of `stream`, published under `<prefix>.<relay>.<event_name>`.
pub async fn stored(stream: &TestStream) -> Vec<Stored> {
    let prefix = format!("{}.", stream.prefix);
    stream
        .messages()
        .await
        .iter()
        .map(|message| {
            let rest = message.subject.strip_prefix(prefix.as_str()).expect("subject under the test prefix");
            let (relay, event_name) = rest.split_once('.').expect("<relay>.<event_name>");
            let headers = message.headers.as_ref().expect("headers");
            let nanos = message.info().expect("message info").published.unix_timestamp_nanos();
            Stored {
                relay: relay.to_owned(),
                msg_id: headers.get(NATS_MESSAGE_ID).expect("Nats-Msg-Id").as_str().to_owned(),
                at: DateTime::from_timestamp_nanos(i64::try_from(nanos).expect("timestamp in range")),
                body: serde_json::from_slice(&message.payload).expect("JSON body"),
                event_name: event_name.to_owned(),
            }
        })
        .collect()
}

/// Every row is published and in the stream exactly once, and the stream holds nothing else.
pub async fn assert_each_row_once(db: &TestDb, stored: &[Stored]) {
    let rows: Vec<String> = sqlx::query_scalar("SELECT payload->>'event_id' FROM qx_outbox_events")
        .fetch_all(&db.pool)
        .await
        .expect("read event ids");
    assert_eq!(db.unpublished().await, 0, "every row marked");
    let mut seen = HashSet::new();
    for message in stored {
        assert!(seen.insert(message.msg_id.as_str()), "{} stored twice", message.msg_id);
    }
    let expected: HashSet<&str> = rows.iter().map(String::as_str).collect();
    assert_eq!(seen.len(), stored.len());
    assert_eq!(expected.len(), rows.len(), "event ids are unique");
    assert!(seen == expected, "{} rows, {} messages; the sets differ", rows.len(), stored.len());
}

/// Inserts `events`, `(order_id, step, event_name)`, in this `occurred_at` order: the envelope's payload holds
/// the order's id and the step.
pub async fn insert_order_events<'a>(db: &TestDb, events: impl Iterator<Item = (Uuid, usize, &'a str)>) {
    let start = Utc::now();
    let rows: Vec<Value> = events
        .enumerate()
        .map(|(n, (order_id, step, name))| {
            let occurred_at = start + TimeDelta::microseconds(n as i64);
            json!({
                "id": Uuid::new_v4(),
                "event_name": name,
                "payload": envelope(Uuid::new_v4(), name, json!({ "order_id": order_id, "step": step })),
                "occurred_at": occurred_at.to_rfc3339_opts(SecondsFormat::Micros, true),
            })
        })
        .collect();
    db.insert_rows(&rows).await;
}

/// Inserts `rows` events spread round-robin over `keys` orders; each order's events carry `step` 0, 1, 2, …
/// in `occurred_at` order.
pub async fn insert_keyed(db: &TestDb, keys: usize, rows: usize) {
    let ids: Vec<Uuid> = (0..keys).map(|_| Uuid::new_v4()).collect();
    insert_order_events(db, (0..rows).map(|n| (ids[n % keys], n / keys, "order.placed"))).await;
}

/// Events stored before an older event of the same order: 0 when every order's events are in order.
pub fn inversions(stored: &[Stored]) -> usize {
    let mut last_step: HashMap<&str, i64> = HashMap::new();
    let mut inversions = 0;
    for message in stored {
        let order_id = message.body["payload"]["order_id"].as_str().expect("order_id");
        let step = message.body["payload"]["step"].as_i64().expect("step");
        match last_step.get(order_id) {
            Some(&last) if last > step => inversions += 1,
            _ => {
                last_step.insert(order_id, step);
            }
        }
    }
    inversions
}
