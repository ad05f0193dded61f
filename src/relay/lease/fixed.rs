//! A static shard (`--shard-id N`, or the whole table) relayed under its leader lock: lead while the lock is
//! ours, stand by while another relay's, hand it over on the way out. Without a lock (`leader = "none"`) the
//! shard is simply relayed.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{Kept, LeaderLock, LeaseError};
use crate::relay::config::RelayConfig;
use crate::relay::engine::{Engine, EngineError};
use crate::relay::owned::Owned;
use crate::relay::shard::Shard;

/// One shard's loop, under its leader lock or without one.
pub(crate) async fn relay_one(
    mut engine: Engine,
    shard: Shard,
    lock: Option<LeaderLock>,
    owned: &Owned,
    shutdown: &CancellationToken,
    relay: &RelayConfig,
) -> Result<(), LeaseError> {
    let result = match lock {
        None => {
            owned.insert(shard);
            engine.run(shutdown).await.map_err(LeaseError::from)
        }
        Some(lock) => lead(lock, &mut engine, shard, owned, shutdown, relay).await,
    };
    owned.remove(shard);
    result
}

/// Relays while holding the lock; stands by while someone else does.
async fn lead(
    mut lock: LeaderLock,
    engine: &mut Engine,
    shard: Shard,
    owned: &Owned,
    shutdown: &CancellationToken,
    relay: &RelayConfig,
) -> Result<(), LeaseError> {
    loop {
        info!("standing by for the leader lock");
        if !lock.acquire(shutdown, relay.give_up_after).await? {
            return Ok(());
        }
        owned.insert(shard);
        let (kept, result) = hold(&mut lock, engine, shutdown).await;
        owned.remove(shard);
        if result.is_err() || shutdown.is_cancelled() {
            // We are exiting: let a standby take over now rather than when the lease runs out.
            if kept == Kept::Ours {
                info!("stopped claiming; handing the leader lock over");
                if lock.release().await {
                    info!("leader lock released");
                }
            }
            return result.map_err(LeaseError::from);
        }
        warn!("leadership lost; stopped claiming");
    }
}

/// Relays `engine`'s shard under `lock`, which is ours, until `stop` is cancelled or the lease can no longer
/// be proven; the lock is still held afterwards only when it was [`Kept::Ours`].
async fn hold(
    lock: &mut LeaderLock,
    engine: &mut Engine,
    stop: &CancellationToken,
) -> (Kept, Result<(), EngineError>) {
    let term = stop.child_token();
    let run = engine.run(&term);
    tokio::pin!(run);
    let (kept, finished) = {
        let keep = lock.keep(&term);
        tokio::pin!(keep);
        tokio::select! {
            kept = &mut keep => (kept, None),
            result = &mut run => {
                term.cancel(); // stops the renewals
                (keep.await, Some(result))
            }
        }
    };
    let result = match (finished, kept) {
        (Some(result), _) => result,
        // Stop: the batch in flight finishes (the caller's drain_timeout bounds it).
        (None, Kept::Ours) => run.await,
        // Lost: finish the batch in flight only while nobody else can have the lock. Its rows stay locked
        // until then, so a new leader claiming later rows of the same keys would publish them first.
        (None, Kept::Lost { fence }) => fence.bound(&mut run).await.unwrap_or(Ok(())),
    };
    (kept, result)
}
