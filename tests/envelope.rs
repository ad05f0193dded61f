//! The envelope against real qx-db rows: no services, so plain `cargo test` runs it.

use qx_relay::Envelope;
use qx_relay_testkit::outbox::fixture_rows;
use serde_json::Value;

#[test]
fn every_fixture_envelope_serializes_back_to_the_json_qx_db_wrote() {
    let rows = fixture_rows();
    assert!(!rows.is_empty(), "no fixture rows");
    for row in rows {
        let envelope =
            Envelope::from_json(row.payload.as_bytes()).unwrap_or_else(|err| panic!("row {}: {err}", row.id));
        let original: Value = serde_json::from_str(&row.payload).unwrap();
        let again: Value = serde_json::from_slice(&envelope.to_json()).unwrap();
        assert_eq!(again, original, "row {}", row.id);
    }
}
