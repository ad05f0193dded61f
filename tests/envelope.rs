//! The envelope against real qx-db rows: no services, so plain `cargo test` runs it.

use qx_relay::Envelope;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

/// Real rows written by qx-db 1.1.0, every column; `payload` is the column's text as Postgres returns it.
const FIXTURE_ROWS: &str = include_str!("fixtures/qx-outbox-rows.jsonl");

#[derive(Deserialize)]
struct Row {
    id: Uuid,
    payload: String,
}

#[test]
fn every_fixture_envelope_serializes_back_to_the_json_qx_db_wrote() {
    let rows: Vec<Row> =
        FIXTURE_ROWS.lines().map(|line| serde_json::from_str(line).expect("fixture row")).collect();
    assert!(!rows.is_empty(), "no fixture rows");
    for row in rows {
        let envelope =
            Envelope::from_json(row.payload.as_bytes()).unwrap_or_else(|err| panic!("row {}: {err}", row.id));
        let original: Value = serde_json::from_str(&row.payload).unwrap();
        let again: Value = serde_json::from_slice(&envelope.to_json()).unwrap();
        assert_eq!(again, original, "row {}", row.id);
    }
}
