//! One leader lock, whichever its backend: acquire, keep (renewing, and stepping down the moment the lease can
//! no longer be proven), release; and the fence that says by when work started under a lost lease must have
//! stopped, so a new owner never claims around rows an old one still holds.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::outcome::{Acquired, LockError, STANDBY_POLL_MAX};
use super::postgres::AdvisoryLock;
use super::redis::RedisLock;
use crate::backoff::Backoff;
use crate::relay::causes::error_chain;
use crate::relay::metrics;
use crate::relay::outage::OutageClock;

/// Retries while the backend fails: quickly at first, never slower than a standby polls.
const BACKEND_RETRY: Backoff = Backoff::new(Duration::from_millis(100), STANDBY_POLL_MAX).with_jitter(0.5);

/// A leader lock on one key.
pub enum LeaderLock {
    /// Redis lease.
    Redis(Box<RedisLock>),
    /// Postgres advisory lock.
    Postgres(AdvisoryLock),
}

impl LeaderLock {
    /// Waits until the lock is ours; `Ok(false)` when `stop` fired first.
    ///
    /// # Errors
    /// [`LockError::GaveUp`] when the backend stayed unreachable for `give_up_after`.
    pub async fn acquire(
        &mut self,
        stop: &CancellationToken,
        give_up_after: Duration,
    ) -> Result<bool, LockError> {
        let mut outage = OutageClock::new(give_up_after);
        loop {
            let started = Instant::now();
            let wait = match self.attempt().await {
                Ok(Acquired::Yes) => {
                    match self {
                        Self::Redis(lock) => {
                            info!(key = %lock.key, token = %lock.token, "leader lock acquired")
                        }
                        Self::Postgres(lock) => {
                            info!(key = lock.key, "leader lock acquired (postgres advisory lock)")
                        }
                    }
                    return Ok(true);
                }
                Ok(Acquired::No { retry_in }) => {
                    if let Some(down_for) = outage.recovered() {
                        info!(?down_for, "leader lock backend available again");
                    }
                    retry_in
                }
                Err(err) if err.is_config_error() => return Err(err),
                Err(err) => {
                    let first = !outage.is_down();
                    let down_for = outage.failed(started).map_err(|_| LockError::GaveUp(give_up_after))?;
                    // WARN once per outage: standbys retry twice a second.
                    if first {
                        warn!(error = %error_chain(&err), "leader lock backend unavailable; standing by");
                    } else {
                        debug!(error = %error_chain(&err), ?down_for, "leader lock backend still unavailable");
                    }
                    outage.pause(&BACKEND_RETRY)
                }
            };
            tokio::select! {
                _ = stop.cancelled() => return Ok(false),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One attempt: `Ok(true)` when the lock is ours now.
    ///
    /// # Errors
    /// When the backend fails or does not answer in time.
    pub async fn try_acquire(&mut self) -> Result<bool, LockError> {
        Ok(matches!(self.attempt().await?, Acquired::Yes))
    }

    async fn attempt(&mut self) -> Result<Acquired, LockError> {
        match self {
            Self::Redis(lock) => lock.try_acquire().await,
            Self::Postgres(lock) => lock.try_acquire().await,
        }
    }

    /// The lock's key (Redis) or its advisory key.
    pub fn key(&self) -> String {
        match self {
            Self::Redis(lock) => lock.key.clone(),
            Self::Postgres(lock) => lock.key.to_string(),
        }
    }

    /// Keeps the lock until `term` is cancelled, renewing it; cancels `term` itself the moment the lease can
    /// no longer be proven (renewal failed, timed out, or found another token).
    ///
    /// # Cancel safety
    /// Cancel safe: dropping it only stops the renewals.
    pub async fn keep(&mut self, term: &CancellationToken) -> Kept {
        let interval = self.renew_interval();
        let mut next = Instant::now() + interval;
        loop {
            tokio::select! {
                _ = term.cancelled() => return Kept::Ours,
                _ = tokio::time::sleep_until(next) => {}
            }
            // Counted from when a renewal starts, so a slow reply does not push the next one back.
            next = Instant::now() + interval;
            let renewed = match self {
                Self::Redis(lock) => lock.renew().await,
                Self::Postgres(lock) => lock.check(interval).await,
            };
            match renewed {
                Ok(true) => continue,
                Ok(false) => warn!("leader lock taken by another holder; stepping down"),
                Err(err) => {
                    metrics::lock_renewal_failed();
                    warn!(error = %error_chain(&err), "leader lock renewal failed; stepping down")
                }
            }
            term.cancel();
            return Kept::Lost { fence: self.fence() };
        }
    }

    /// After a lost lease: when work started under it must have stopped. A Redis lease we could not renew
    /// runs on for at least a third of the TTL after we stepped down; stopping half way there leaves the
    /// rollback of the batch in flight time to land before anyone else can claim. Otherwise at once: another
    /// holder may already lead (the key holds another token, or our advisory lock's session is gone).
    fn fence(&self) -> Fence {
        let now = Instant::now();
        Fence(match self {
            Self::Redis(lock) => {
                lock.lease_until.and_then(|until| until.checked_sub(lock.ttl / 6)).map_or(now, |f| f.max(now))
            }
            Self::Postgres(_) => now,
        })
    }

    /// Gives the lock up so a standby takes over at once; `false` (and a warning) when it could not, and
    /// expires by itself.
    pub async fn release(&mut self) -> bool {
        let released = match self {
            Self::Redis(lock) => lock.release().await,
            Self::Postgres(lock) => lock.release().await,
        };
        if let Err(err) = &released {
            warn!(key = %self.key(), error = %error_chain(err), "leader lock not released; it expires by itself");
        }
        released.is_ok()
    }

    fn renew_interval(&self) -> Duration {
        match self {
            Self::Redis(lock) => lock.ttl / 3,
            Self::Postgres(lock) => lock.check_every,
        }
    }
}

/// How keeping the lock ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kept {
    /// `term` was cancelled by the caller; the lock is still ours to release.
    Ours,
    /// The lease could no longer be proven: stop what was started under it by `fence`, abandoning it if need
    /// be.
    Lost {
        /// When work under the lost lease must have stopped.
        fence: Fence,
    },
}

/// When work started under a lost lease must have stopped. Work still running then is abandoned: its batches
/// are rolled back and their rows published again (the stream drops the repeats), since a new owner may be
/// claiming the shard's later rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fence(Instant);

impl Fence {
    /// Runs `work` until the fence; `None` (and a warning) when the fence came first and `work` was dropped.
    pub async fn bound<F: Future>(self, work: F) -> Option<F::Output> {
        let finished = tokio::time::timeout_at(self.0, work).await.ok();
        if finished.is_none() {
            abandoned();
        }
        finished
    }

    /// Sleeps until the fence of the earliest of `fences`, or forever without one; then the caller abandons the
    /// work it started (a warning says so).
    pub async fn earliest(fences: impl Iterator<Item = Self>) {
        match fences.min() {
            Some(Self(at)) => {
                tokio::time::sleep_until(at).await;
                abandoned();
            }
            None => std::future::pending().await,
        }
    }
}

fn abandoned() {
    warn!(
        "a lost lease's batch is still in flight at its fence: abandoned, its rows will be published again"
    );
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn work_under_a_lost_lease_finishes_before_its_fence_or_is_abandoned_there() {
        let fence = Fence(Instant::now() + Duration::from_secs(2));
        let quick = fence.bound(tokio::time::sleep(Duration::from_secs(1))).await;
        assert_eq!(quick, Some(()), "done before the fence");
        let fence = Fence(Instant::now() + Duration::from_secs(2));
        let started = Instant::now();
        let slow = fence.bound(tokio::time::sleep(Duration::from_secs(5))).await;
        assert_eq!(slow, None, "dropped at the fence");
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn the_earliest_fence_is_waited_for_and_none_waits_forever() {
        let now = Instant::now();
        let fences = [Fence(now + Duration::from_secs(3)), Fence(now + Duration::from_secs(1))];
        Fence::earliest(fences.into_iter()).await;
        assert_eq!(now.elapsed(), Duration::from_secs(1));
        let never =
            tokio::time::timeout(Duration::from_secs(3600), Fence::earliest(std::iter::empty())).await;
        assert!(never.is_err(), "without a lost lease there is nothing to wait for");
    }
}
