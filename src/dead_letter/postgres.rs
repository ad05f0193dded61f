//! [`PgDeadLetters`]: dead letters in qx-worker's `qx_dead_letters` table, in the consuming service's database.
//!
//! Owns the one SQL statement of the library; knows nothing about NATS.

use futures::future::BoxFuture;
use sqlx::PgPool;

use super::{DeadLetter, DeadLetters, StoreError};

/// qx-worker's insert, every column given: the writer relies on no database default.
const INSERT: &str = "INSERT INTO qx_dead_letters (id, event_name, event_version, payload, headers, subject, \
                                                   correlation_id, tenant_id, delivered_count, last_error, failed_at) \
                      VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6, $7, $8, $9, $10, $11)";

/// Stores dead letters as rows of `qx_dead_letters`, the table qx-worker registers next to the outbox (its
/// migrations create it; this store never does), so `qx dlq list` and `qx dlq replay` read them like a Python
/// worker's.
///
/// ```no_run
/// # async fn demo(consumer: qx_relay::EventConsumer) -> Result<(), sqlx::Error> {
/// use qx_relay::dead_letter::PgDeadLetters;
///
/// let pool = sqlx::PgPool::connect("postgres://billing@db/billing").await?;
/// let consumer = consumer.with_dead_letters(PgDeadLetters::new(pool));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct PgDeadLetters {
    pool: PgPool,
}

impl PgDeadLetters {
    /// Writes into the `qx_dead_letters` table of `pool`'s database.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

impl DeadLetters for PgDeadLetters {
    fn store<'a>(&'a self, letter: &'a DeadLetter) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let headers = serde_json::to_string(&letter.headers)?;
            sqlx::query(INSERT)
                .bind(letter.id)
                .bind(&letter.event_name)
                .bind(letter.event_version)
                .bind(letter.payload.get())
                .bind(headers)
                .bind(&letter.subject)
                .bind(letter.correlation_id)
                .bind(letter.tenant_id)
                .bind(letter.delivered_count)
                .bind(&letter.last_error)
                .bind(letter.failed_at)
                .execute(&self.pool)
                .await?;
            Ok(())
        })
    }
}
