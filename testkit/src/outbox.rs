//! The outbox as qx-db writes it: the table's DDL, real rows, the envelope, and every INSERT into the table.

use chrono::{SecondsFormat, Utc};
use serde::Deserialize;
use serde_json::{json, Value};
use sqlx::PgExecutor;
use uuid::Uuid;

/// The qx-db DDL of the outbox table.
pub const OUTBOX_DDL: &str = include_str!("../../tests/fixtures/qx_outbox_events.sql");
/// The qx-worker DDL of the dead-letter table.
pub const DEAD_LETTERS_DDL: &str = include_str!("../../tests/fixtures/qx_dead_letters.sql");
/// Real rows written by qx-db 1.1.0 (a copy of shared/fixtures/qx-outbox-rows.jsonl), every column.
pub(crate) const FIXTURE_ROWS: &str = include_str!("../../tests/fixtures/qx-outbox-rows.jsonl");

/// qx-db's columns, in the order every INSERT here lists them.
const COLUMNS: &str = "id, event_name, event_version, payload, occurred_at, correlation_id, causation_id, \
                       tenant_id, published_at, attempts, last_error";

/// What a run reads of a fixture row.
#[derive(Debug, Clone, Deserialize)]
pub struct FixtureRow {
    pub id: Uuid,
    /// The column's text exactly as Postgres returned it to qx-db.
    pub payload: String,
    /// The columns the relay's headers come from.
    pub correlation_id: Option<Uuid>,
    pub event_name: String,
    pub event_version: i32,
    pub tenant_id: Option<Uuid>,
}

/// The rows of [`FIXTURE_ROWS`].
pub fn fixture_rows() -> Vec<FixtureRow> {
    FIXTURE_ROWS.lines().map(|line| serde_json::from_str(line).expect("fixture row")).collect()
}

/// An INSERT of the rows `select` yields, every column in [`COLUMNS`] order, as qx-db lists them.
pub fn insert_from(select: &str) -> String {
    format!("INSERT INTO qx_outbox_events ({COLUMNS}) {select}")
}

/// Inserts `rows` in one statement, in order: JSON objects keyed by column, as in [`FIXTURE_ROWS`]. `id`,
/// `event_name` and `payload` (the envelope's text) are required; `event_version` defaults to 1, `occurred_at`
/// to the moment of the insert, `attempts` to 0, the rest to NULL.
///
/// # Errors
/// The statement's, e.g. when Postgres is down.
pub async fn insert_rows<'c>(executor: impl PgExecutor<'c>, rows: &[Value]) -> sqlx::Result<()> {
    let insert = insert_from(
        "SELECT (r->>'id')::uuid, r->>'event_name', coalesce((r->>'event_version')::int, 1), \
                (r->>'payload')::jsonb, coalesce((r->>'occurred_at')::timestamptz, clock_timestamp()), \
                (r->>'correlation_id')::uuid, (r->>'causation_id')::uuid, (r->>'tenant_id')::uuid, NULL, \
                coalesce((r->>'attempts')::int, 0), r->>'last_error' \
         FROM jsonb_array_elements($1::jsonb) AS r",
    );
    let rows = serde_json::to_string(rows).expect("rows as JSON");
    sqlx::query(&insert).bind(rows).execute(executor).await?;
    Ok(())
}

/// qx-db's envelope of one event, as the `payload` column holds it: `payload` under the envelope's keys.
pub fn envelope(event_id: Uuid, event_name: &str, payload: Value) -> String {
    json!({
        "payload": payload,
        "actor_id": null,
        "event_id": event_id,
        "tenant_id": null,
        "event_name": event_name,
        "occurred_at": Utc::now().to_rfc3339_opts(SecondsFormat::Micros, false),
        "causation_id": null,
        "event_version": 1,
        "correlation_id": null,
    })
    .to_string()
}

/// An envelope of `event_name` whose payload holds `size` bytes of filler.
pub fn envelope_of_size(event_name: &str, size: usize) -> String {
    envelope(Uuid::new_v4(), event_name, json!({ "blob": "x".repeat(size) }))
}
