//! Elastic shards (`shard_id = "auto"`): replicas started alike share the `shard_count` shards by lease.
//!
//! Each shard is owned through its own leader lock, the leader mode's (the Redis lease `<leader_key>:N`, or the
//! shard's advisory lock on a session Postgres ends after `leader_ttl` idle), so no shard is ever published by
//! two replicas. Every tick a replica renews its heartbeat in the membership record, learns who is alive, and
//! takes the [`plan`](super::plan) step towards its fair share: above it, it releases shards gracefully (the
//! batch in flight is published and marked, then the lease released); below it, it takes shards whose lease is
//! free.
//! A killed replica's leases and heartbeat expire within `leader_ttl`, and the others take its shards at their
//! next tick.
//!
//! A replica runs one [`Engine`] over the shards it owns, whatever their number: its claims take rows of any
//! owned shard in one scan of the pending index, so owning k shards costs what one unsharded relay costs (k
//! engines would walk the whole index k times). The engine acknowledges every change of its shards once nothing
//! claimed before it is open; only then is a shard's lease released.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::plan::{self, Step};
use super::{Backend, Fence, Kept, LeaderLock, LeaseError, LockError, Membership};
use crate::relay::causes::error_chain;
use crate::relay::config::Config;
use crate::relay::engine::{Assigner, Engine, EngineError, Parts};
use crate::relay::metrics;
use crate::relay::outage::OutageClock;
use crate::relay::owned::Owned;
use crate::relay::shard::Shard;

/// The longest time between two ticks: a free shard is taken, and a new member noticed, within about this.
const TICK_MAX: Duration = Duration::from_millis(500);

/// The engine's run, owned, so it can be dropped (abandoning its batches) and started anew.
type EngineRun = Pin<Box<dyn Future<Output = Result<(), EngineError>> + Send>>;

/// A shard lease's keeper: renews it until told to stop or until it is lost, then hands the lock back.
type Keepers = JoinSet<(u32, LeaderLock, Kept)>;

/// Why sharing ended.
enum Shared {
    /// Shutdown: the engine still runs, to finish its batch.
    Stopped,
    /// The engine ended by itself.
    EngineEnded(Result<(), EngineError>),
}

/// Where an owned shard is.
enum Lease {
    /// Published by the engine; its keeper renews the lease.
    Held { stop: CancellationToken },
    /// Taken out of the engine's shards at `generation`; the lease goes once the engine acknowledges it.
    Releasing { stop: CancellationToken, generation: u64, reason: &'static str, stopping: bool },
    /// The lease could no longer be proven: the engine must let go of the shard's rows by `fence`, or be
    /// abandoned.
    Lost { lock: LeaderLock, generation: u64, fence: Fence },
}

/// Shares the shards with the other replicas until stopped.
pub(crate) struct Coordinator<'a> {
    parts: Parts,
    owned: &'a Owned,
    backend: Backend,
    ttl: Duration,
    give_up_after: Duration,
    shard_count: u32,
    members: Membership,
    assigner: Assigner,
    /// Locks of shards not owned now, kept for their connection and token.
    idle: BTreeMap<u32, LeaderLock>,
    leases: BTreeMap<u32, Lease>,
    keepers: Keepers,
    /// How many members the last tick saw, to tell a takeover from a rebalance.
    last_members: usize,
}

impl<'a> Coordinator<'a> {
    /// A coordinator for the shards of `config`, leased in `backend`, its engine made of `parts`.
    ///
    /// # Errors
    /// When `cache.url` is not a Redis URL, or its certificates cannot be read.
    pub(crate) fn new(
        config: &Config,
        backend: Backend,
        parts: Parts,
        owned: &'a Owned,
    ) -> Result<Self, LeaseError> {
        let relay = &config.relay;
        Ok(Self {
            members: backend.membership()?,
            backend,
            ttl: relay.leader_ttl,
            give_up_after: relay.give_up_after,
            shard_count: relay.shard_count,
            parts,
            owned,
            assigner: Assigner::default(),
            idle: BTreeMap::new(),
            leases: BTreeMap::new(),
            keepers: JoinSet::new(),
            last_members: 0,
        })
    }

    /// Joins the members and keeps this replica's share until `shutdown`; then stops the engine (its batch in
    /// flight finishes), releases every lease and leaves.
    ///
    /// # Errors
    /// The engine's [`EngineError`], or the lock backend unavailable for longer than `give_up_after`.
    pub(crate) async fn run(mut self, shutdown: &CancellationToken) -> Result<(), LeaseError> {
        info!(
            shard_count = self.shard_count,
            member = self.members.token(),
            "sharing the shards with the other replicas"
        );
        let engine_stop = CancellationToken::new();
        let mut engine = self.start_engine(&engine_stop);
        let shared = self.share(shutdown, &mut engine, &engine_stop).await;
        engine_stop.cancel();
        let (result, engine_result) = match shared {
            // The engine ended by itself: nothing it claimed is open any more.
            Ok(Shared::EngineEnded(ended)) => (ended.map_err(LeaseError::from), Ok(())),
            Ok(Shared::Stopped) => (Ok(()), engine.await),
            Err(err) => (Err(err), engine.await),
        };
        let reason = if result.is_ok() { "stop" } else { "exit" };
        for lease in self.leases.values_mut() {
            if let Lease::Held { stop } | Lease::Releasing { stop, .. } = lease {
                stop.cancel();
            }
        }
        while let Some(kept) = self.keepers.join_next().await {
            let (id, mut lock, kept) = kept.unwrap_or_else(|err| std::panic::resume_unwind(err.into_panic()));
            self.gone(id, reason);
            if kept == Kept::Ours {
                lock.release().await;
            }
        }
        let lost: Vec<u32> = self.leases.keys().copied().collect();
        for id in lost {
            if let Some(Lease::Lost { .. }) = self.leases.remove(&id) {
                self.gone(id, "lost lease");
            }
        }
        self.members.leave().await;
        result.and(engine_result.map_err(LeaseError::from))
    }

    /// Ticks, and follows the keepers and the engine, until `shutdown` or a failure.
    async fn share(
        &mut self,
        shutdown: &CancellationToken,
        engine: &mut EngineRun,
        engine_stop: &CancellationToken,
    ) -> Result<Shared, LeaseError> {
        let mut tick = tokio::time::interval((self.ttl / 3).min(TICK_MAX));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut outage = OutageClock::new(self.give_up_after);
        loop {
            let fences = self.fences();
            tokio::select! {
                () = shutdown.cancelled() => return Ok(Shared::Stopped),
                // Not stopped, so only a failure ends it.
                ended = &mut *engine => return Ok(Shared::EngineEnded(ended)),
                Some(kept) = self.keepers.join_next() => {
                    let kept = kept.unwrap_or_else(|err| std::panic::resume_unwind(err.into_panic()));
                    self.keeper_ended(kept).await;
                }
                () = self.assigner.acknowledged() => {}
                () = Fence::earliest(fences.into_iter()) => *engine = self.start_engine(engine_stop),
                _ = tick.tick() => self.tick(&mut outage).await?,
            }
            self.release_acknowledged().await;
        }
    }

    /// One tick: the heartbeat, and a step towards this replica's fair share.
    async fn tick(&mut self, outage: &mut OutageClock) -> Result<(), LeaseError> {
        let started = Instant::now();
        match self.members.beat().await {
            Ok(live) => {
                if let Some(down_for) = outage.recovered() {
                    info!(?down_for, "membership record available again");
                }
                metrics::set_members(live.len());
                self.rebalance(&live).await?;
                self.last_members = live.len();
            }
            Err(err) if err.is_config_error() => return Err(err.into()),
            Err(err) => {
                let first = !outage.is_down();
                outage.failed(started).map_err(|_| LockError::GaveUp(self.give_up_after))?;
                if first {
                    warn!(error = %error_chain(&err), "membership record unavailable; keeping the shards whose leases hold");
                } else {
                    debug!(error = %error_chain(&err), "membership record still unavailable");
                }
            }
        }
        Ok(())
    }

    /// Moves this replica towards its fair share of the shards among `live` members.
    async fn rebalance(&mut self, live: &[String]) -> Result<(), LeaseError> {
        let busy: Vec<u32> = self.leases.keys().copied().collect();
        let step =
            plan::step(self.shard_count, live, &self.members.token(), &self.held(), &busy, self.last_members);
        match step {
            Step::Stay => {}
            Step::GiveBack(extra) => {
                let generation =
                    self.assigner.assign(self.held().into_iter().filter(|id| !extra.contains(id)));
                for id in extra {
                    if let Some(Lease::Held { stop }) = self.leases.remove(&id) {
                        let releasing =
                            Lease::Releasing { stop, generation, reason: "rebalance", stopping: false };
                        self.leases.insert(id, releasing);
                    }
                }
            }
            Step::Take { wanted, order, reason } => {
                if self.take(wanted, order, reason).await? {
                    self.assigner.assign(self.held());
                }
            }
        }
        Ok(())
    }

    /// Tries the locks of the shards in `order` until `wanted` are taken or the backend fails; whether any was.
    async fn take(
        &mut self,
        mut wanted: usize,
        order: Vec<u32>,
        reason: &'static str,
    ) -> Result<bool, LeaseError> {
        let mut acquired = false;
        for id in order {
            if wanted == 0 {
                break;
            }
            let mut lock = match self.idle.remove(&id) {
                Some(lock) => lock,
                None => self.backend.lease(self.shard(id))?,
            };
            match lock.try_acquire().await {
                Ok(true) => {
                    info!(shard = id, reason, key = %lock.key(), "shard acquired");
                    let stop = CancellationToken::new();
                    self.keepers.spawn(keep(id, lock, stop.clone()));
                    self.leases.insert(id, Lease::Held { stop });
                    self.owned.insert(self.shard(id));
                    acquired = true;
                    wanted -= 1;
                }
                Ok(false) => {
                    self.idle.insert(id, lock);
                }
                Err(err) if err.is_config_error() => return Err(err.into()),
                Err(err) => {
                    self.idle.insert(id, lock);
                    debug!(shard = id, error = %error_chain(&err), "could not try the shard's lock");
                    break;
                }
            }
        }
        Ok(acquired)
    }

    /// A keeper handed its lock back: released on request, or lost.
    async fn keeper_ended(&mut self, (id, mut lock, kept): (u32, LeaderLock, Kept)) {
        let lease = self.leases.remove(&id);
        match (lease, kept) {
            (Some(Lease::Releasing { reason, .. }), Kept::Ours) => {
                // Said first: once released, another replica may take the shard at once.
                self.gone(id, reason);
                lock.release().await;
                self.idle.insert(id, lock);
            }
            (Some(Lease::Held { .. } | Lease::Releasing { .. }), Kept::Lost { fence }) => {
                warn!(shard = id, "shard lease lost; letting go of its rows");
                let generation = self.assigner.assign(self.held());
                self.leases.insert(id, Lease::Lost { lock, generation, fence });
            }
            // Stopped without being asked to: nothing else stops a keeper.
            (lease, kept) => unreachable!("shard {id}: keeper ended {kept:?} in state {}", lease.is_some()),
        }
    }

    /// Lets go of the shards the engine no longer holds rows of: stops their keepers (which hand the locks back
    /// for release), or, for lost leases, forgets them.
    async fn release_acknowledged(&mut self) {
        let ids: Vec<u32> = self.leases.keys().copied().collect();
        for id in ids {
            match self.leases.get_mut(&id) {
                Some(Lease::Releasing { stop, generation, stopping, .. })
                    if !*stopping && self.assigner.released(*generation) =>
                {
                    stop.cancel();
                    *stopping = true;
                }
                Some(Lease::Lost { generation, .. }) if self.assigner.released(*generation) => {
                    if let Some(Lease::Lost { lock, .. }) = self.leases.remove(&id) {
                        self.gone(id, "lost lease");
                        self.idle.insert(id, lock);
                    }
                }
                _ => {}
            }
        }
    }

    /// The engine no longer publishes the shard.
    fn gone(&self, id: u32, reason: &'static str) {
        if reason == "lost lease" {
            warn!(shard = id, reason, "shard released");
        } else {
            info!(shard = id, reason, "shard released");
        }
        self.owned.remove(self.shard(id));
    }

    /// A new engine over the shards held now; the one before it, if any, is dropped by the caller.
    fn start_engine(&mut self, stop: &CancellationToken) -> EngineRun {
        let mut engine = Engine::assigned(&self.parts, self.shard_count, self.assigner.assignee());
        let stop = stop.clone();
        Box::pin(async move { engine.run(&stop).await })
    }

    /// The shards the engine publishes (not being released or lost), in order.
    fn held(&self) -> Vec<u32> {
        self.leases
            .iter()
            .filter(|(_, lease)| matches!(lease, Lease::Held { .. }))
            .map(|(id, _)| *id)
            .collect()
    }

    /// The fences of lost leases the engine has not let go of yet.
    fn fences(&self) -> Vec<Fence> {
        self.leases
            .values()
            .filter_map(|lease| match lease {
                Lease::Lost { generation, fence, .. } if !self.assigner.released(*generation) => Some(*fence),
                _ => None,
            })
            .collect()
    }

    fn shard(&self, id: u32) -> Shard {
        Shard { id, count: self.shard_count }
    }
}

/// Renews shard `id`'s lease until `stop`, or until it is lost.
async fn keep(id: u32, mut lock: LeaderLock, stop: CancellationToken) -> (u32, LeaderLock, Kept) {
    let kept = lock.keep(&stop).await;
    (id, lock, kept)
}
