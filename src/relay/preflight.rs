//! The start-up checks: the outbox table and the stream. `run` waits on them before relaying and `check`
//! prints them, through the same functions, so the two never disagree.

use std::time::Duration;

use async_nats::jetstream::stream;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::causes::error_chain;
use super::config::RelayConfig;
use super::nats::{self, RelayPublisher};
use super::store::{OutboxStore, StoreError, TableProblem};

/// How long to wait between looks for the outbox table (the service may create it at its own start).
const TABLE_POLL: Duration = Duration::from_secs(2);
/// The duplicate window of a stream the relay creates, at least.
const CREATED_WINDOW_MIN: Duration = Duration::from_secs(120);

/// A start-up check that failed.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    /// Postgres failed or did not answer while checking the table.
    #[error("checking the outbox table")]
    Postgres(#[source] StoreError),
    /// The outbox table cannot be used: missing, lacking columns, or nullable where qx-db is not.
    #[error("outbox table {table} {problem}")]
    Table {
        /// The table.
        table: String,
        /// What is wrong with it.
        problem: TableProblem,
    },
    /// JetStream did not answer the stream lookup.
    #[error("looking up the stream for {0}.>")]
    StreamLookup(String, #[source] async_nats::Error),
    /// JetStream refused to create the stream (`ensure_stream`).
    #[error("creating a stream for {0}.>")]
    EnsureStream(String, #[source] async_nats::Error),
    /// No stream captures the prefix.
    #[error("no JetStream stream captures {0}.>")]
    NoStream(String),
}

/// The outbox table is fit to relay. With `wait_until`, a missing table is looked for again until
/// `give_up_after` has passed or the token is cancelled.
///
/// # Errors
/// A table problem, or Postgres failing.
pub async fn table(
    store: &OutboxStore,
    relay: &RelayConfig,
    wait_until: Option<&CancellationToken>,
) -> Result<(), PreflightError> {
    let started = tokio::time::Instant::now();
    loop {
        let problem = match store.table_problem().await {
            Ok(None) => return Ok(()),
            Ok(Some(problem)) => problem,
            Err(err) => return Err(PreflightError::Postgres(err)),
        };
        let Some(cancelled) = wait_until.filter(|_| problem == TableProblem::Missing) else {
            return Err(PreflightError::Table { table: relay.table.clone(), problem });
        };
        if started.elapsed() >= relay.give_up_after {
            return Err(PreflightError::Table { table: relay.table.clone(), problem });
        }
        warn!(table = %relay.table, "outbox table not found yet; waiting");
        tokio::select! {
            () = cancelled.cancelled() => return Ok(()),
            () = tokio::time::sleep(TABLE_POLL) => {}
        }
    }
}

/// What the stream check found.
#[derive(Debug)]
pub enum Stream {
    /// A stream captures `<subject_prefix>.>`.
    Found(stream::Info),
    /// The relay created it (`ensure_stream`).
    Created(stream::Info),
}

/// The stream capturing the prefix; created when `create` and none does.
///
/// # Errors
/// No stream (and `create` off), a lookup JetStream did not answer, or a creation it refused.
pub async fn stream(
    publisher: &RelayPublisher,
    relay: &RelayConfig,
    create: bool,
) -> Result<Stream, PreflightError> {
    let prefix = relay.subject_prefix().to_owned();
    if create {
        let window = republish_horizon(relay).max(CREATED_WINDOW_MIN);
        return match publisher.ensure_stream(window).await {
            Ok((info, true)) => Ok(Stream::Created(info)),
            Ok((info, false)) => Ok(Stream::Found(info)),
            Err(err) => Err(PreflightError::EnsureStream(prefix, err)),
        };
    }
    match publisher.stream_for_prefix().await {
        Ok(Some(info)) => Ok(Stream::Found(info)),
        Ok(None) => Err(PreflightError::NoStream(prefix)),
        Err(err) => Err(PreflightError::StreamLookup(prefix, err)),
    }
}

/// Longest time between publishing a row and publishing it again after a failed mark: an ack wait, a drain
/// or lease, and a Postgres outage up to `give_up_after`. The stream's duplicate window should cover it.
pub fn republish_horizon(relay: &RelayConfig) -> Duration {
    relay.ack_timeout + relay.drain_timeout.max(relay.leader_ttl) + relay.give_up_after
}

/// The stream check of `run`: a missing stream only delays rows (they wait, and go once it exists), so it is
/// logged, not fatal; a duplicate window shorter than the relay's republish horizon is warned about.
pub async fn stream_at_start(publisher: &RelayPublisher, relay: &RelayConfig) -> Result<(), PreflightError> {
    let prefix = relay.subject_prefix();
    let (info, verb) = match stream(publisher, relay, relay.ensure_stream).await {
        Ok(Stream::Found(info)) => (info, "stream found"),
        Ok(Stream::Created(info)) => (info, "stream created"),
        Err(PreflightError::NoStream(_)) => {
            error!(
                "no stream captures {prefix}.>: rows stay pending until one does; {}",
                nats::no_stream_hint(prefix)
            );
            return Ok(());
        }
        Err(err @ PreflightError::StreamLookup(..)) => {
            warn!(error = %error_chain(&err), "could not look up the stream; relaying anyway");
            return Ok(());
        }
        Err(err) => return Err(err),
    };
    let horizon = republish_horizon(relay);
    if info.config.duplicate_window < horizon {
        warn!(
            stream = %info.config.name,
            duplicate_window = ?info.config.duplicate_window,
            republish_horizon = ?horizon,
            "the stream's duplicate window is shorter than the relay's worst-case republish delay: \
             a republished event could be stored twice"
        );
    } else {
        info!(stream = %info.config.name, duplicate_window = ?info.config.duplicate_window, "{verb}");
    }
    Ok(())
}
