//! Off the hot path, every few seconds: retention (old published rows deleted in small batches) and the
//! outbox sample (the gauges, and the pending count of the progress line).

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::RelayConfig;
use super::engine::PROGRESS_EVERY;
use super::metrics;
use super::nats::RelayPublisher;
use super::shard::Shard;
use super::store::{Backlog, OutboxStore};

/// Published rows deleted per retention statement, and statements per pass.
const RETENTION_BATCH: (i64, u32) = (1000, 20);
/// How often retention and the outbox gauges run.
const EVERY: Duration = Duration::from_secs(5);

/// Where the outbox sample goes, and what it starts from.
pub struct Sampling {
    /// The latest sample, for the relay loop's progress line.
    pub sample: watch::Sender<Option<Backlog>>,
    /// Where the relay loop's rescans start: its scope's oldest pending row is no older (but for a few).
    pub floor: watch::Receiver<Option<DateTime<Utc>>>,
}

/// Retention (delete old published rows in small batches), the NATS gauge and the outbox sample, off the hot
/// path. Only the relay publishing the shard samples the outbox (standbys report zero), so a shard is read
/// once per period however many replicas stand by. The sample goes to the gauges and to the relay loop's
/// progress line; without metrics it is taken only as often as that line is written.
pub async fn run(
    store: OutboxStore,
    publisher: RelayPublisher,
    relay: RelayConfig,
    owned: watch::Receiver<Vec<Shard>>,
    sampling: Sampling,
    shutdown: CancellationToken,
) {
    let Sampling { sample, floor } = sampling;
    let gauges = relay.metrics_addr.is_some();
    let sample_every = if gauges { EVERY } else { PROGRESS_EVERY };
    let mut sampled_at: Option<Instant> = None;
    loop {
        if let Some(retention) = relay.retention {
            delete_expired(&store, retention, &shutdown).await;
        }
        if gauges {
            metrics::set_nats_up(publisher.is_up());
        }
        let shards = owned.borrow().clone();
        if shards.is_empty() {
            sampled_at = None;
            sample.send_replace(None);
            if gauges {
                metrics::set_outbox(&Backlog::default());
            }
        } else if sampled_at.is_none_or(|at| at.elapsed() >= sample_every) {
            let from = *floor.borrow();
            if let Ok(backlog) = store.backlog(&shards, from).await {
                sampled_at = Some(Instant::now());
                if gauges {
                    metrics::set_outbox(&backlog);
                }
                sample.send_replace(Some(backlog));
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}

/// One retention pass: a bounded number of small deletes, so it never holds long locks.
async fn delete_expired(store: &OutboxStore, retention: Duration, shutdown: &CancellationToken) {
    let (batch, passes) = RETENTION_BATCH;
    let mut deleted = 0;
    for _ in 0..passes {
        match store.delete_published(retention, batch).await {
            Ok(n) => {
                deleted += n;
                if n < batch.unsigned_abs() || shutdown.is_cancelled() {
                    break;
                }
            }
            Err(err) => {
                warn!(error = %err, "retention delete failed");
                break;
            }
        }
    }
    if deleted > 0 {
        info!(deleted, retention = %humantime::format_duration(retention), "old published rows deleted");
    }
}
