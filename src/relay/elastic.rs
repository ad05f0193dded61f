//! Elastic shards (`shard_id = "auto"`): replicas started alike share the `shard_count` shards by lease.
//!
//! Each shard is owned through its own leader lock (`<leader_key>:N`, the leader mode's protocol), so no shard
//! is ever published by two replicas. Every tick a replica renews its heartbeat in the membership record,
//! learns who is alive, and moves towards its [`fair_share`]: above it, it releases shards gracefully (the batch
//! in flight is published and marked, then the lease released); below it, it takes shards whose lease is free.
//! A killed replica's leases and heartbeat expire within `leader_ttl`, and the others take its shards at their
//! next tick. Each owned shard runs its own [`Engine`] on the shared pool and NATS connection.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::config::{CacheConfig, Config};
use super::engine::{Engine, EngineError, Parts};
use super::leader::{Kept, LeaderLock, LockError, RedisLock};
use super::members::{fair_share, Membership};
use super::metrics;
use super::outage::OutageClock;
use super::shard::Shard;
use super::{error_chain, hold, Owned, RelayError};

/// The longest time between two ticks: a free shard is taken, and a new member noticed, within about this.
const TICK_MAX: Duration = Duration::from_millis(500);

/// The smallest byte budget a shard loop gets (a row larger than its budget still goes, alone).
const SHARD_BUDGET_MIN: u64 = 64 << 10;

/// How a shard's loop ended.
enum Ending {
    /// Told to stop; the lease was released.
    Released,
    /// The lease could no longer be proven.
    LostLease,
    /// Postgres or NATS stayed unavailable past `give_up_after`: the replica exits.
    Failed(EngineError),
}

/// A shard this replica publishes.
struct Owner {
    stop: CancellationToken,
    /// Why it is being released, once it is.
    releasing: Option<&'static str>,
}

/// Shares the shards with the other replicas until stopped.
pub(super) struct Coordinator<'a> {
    parts: Parts,
    owned: &'a Owned,
    cache: CacheConfig,
    leader_key: String,
    ttl: Duration,
    give_up_after: Duration,
    shard_count: u32,
    members: Membership,
    /// Locks of shards not owned now, kept for their connection and token.
    idle: BTreeMap<u32, LeaderLock>,
    owners: BTreeMap<u32, Owner>,
    loops: JoinSet<(Shard, LeaderLock, Ending)>,
    /// How many members the last tick saw, to tell a takeover from a rebalance.
    last_members: usize,
}

impl<'a> Coordinator<'a> {
    /// A coordinator for the shards of `config`, running shard loops made of `parts`.
    ///
    /// # Errors
    /// When `cache.url` is not a Redis URL, or its certificates cannot be read.
    pub(super) fn new(config: &Config, mut parts: Parts, owned: &'a Owned) -> Result<Self, RelayError> {
        let relay = &config.relay;
        // The shard loops share the replica's byte budget, so its memory stays bounded by max_batch_bytes
        // however many shards it owns.
        parts.relay.max_batch_bytes =
            (relay.max_batch_bytes / u64::from(relay.shard_count)).max(SHARD_BUDGET_MIN);
        Ok(Self {
            members: Membership::new(&config.cache, &relay.leader_key, relay.leader_ttl)?,
            cache: config.cache.clone(),
            leader_key: relay.leader_key.clone(),
            ttl: relay.leader_ttl,
            give_up_after: relay.give_up_after,
            shard_count: relay.shard_count,
            parts,
            owned,
            idle: BTreeMap::new(),
            owners: BTreeMap::new(),
            loops: JoinSet::new(),
            last_members: 0,
        })
    }

    /// Joins the members and keeps this replica's share until `shutdown`; then stops every shard loop (each
    /// finishes its batch and releases its lease) and leaves.
    ///
    /// # Errors
    /// A shard loop's [`EngineError`], or Redis unavailable for longer than `give_up_after`.
    pub(super) async fn run(mut self, shutdown: &CancellationToken) -> Result<(), RelayError> {
        info!(
            shard_count = self.shard_count,
            member = self.members.token(),
            "sharing the shards with the other replicas"
        );
        let result = self.share(shutdown).await;
        for owner in self.owners.values_mut() {
            owner.releasing.get_or_insert(if result.is_ok() { "stop" } else { "exit" });
            owner.stop.cancel();
        }
        let mut failed = None;
        while let Some(ended) = self.loops.join_next().await {
            if let Err(err) = self.ended(ended) {
                failed.get_or_insert(err);
            }
        }
        self.members.leave().await;
        result.and(failed.map_or(Ok(()), Err))
    }

    async fn share(&mut self, shutdown: &CancellationToken) -> Result<(), RelayError> {
        let mut tick = tokio::time::interval((self.ttl / 3).min(TICK_MAX));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut outage = OutageClock::new(self.give_up_after);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                Some(ended) = self.loops.join_next() => {
                    self.ended(ended)?;
                    continue;
                }
                _ = tick.tick() => {}
            }
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
        }
    }

    /// Moves this replica towards its fair share of the shards among `live` members.
    async fn rebalance(&mut self, live: &[String]) -> Result<(), RelayError> {
        let share = fair_share(self.shard_count, live, self.members.token()) as usize;
        let kept: Vec<u32> =
            self.owners.iter().filter(|(_, owner)| owner.releasing.is_none()).map(|(id, _)| *id).collect();
        if kept.len() > share {
            for id in kept.iter().rev().take(kept.len() - share) {
                let owner = self.owners.get_mut(id).expect("an owned shard");
                owner.releasing = Some("rebalance");
                owner.stop.cancel();
            }
            return Ok(());
        }
        let mut wanted = share - kept.len();
        if wanted == 0 {
            return Ok(());
        }
        let reason = match self.last_members {
            0 => "start",
            before if live.len() < before => "takeover",
            _ => "rebalance",
        };
        // Members start looking at different shards, so they seldom race for the same free one.
        let rank = live.iter().position(|member| member == self.members.token()).unwrap_or(0);
        let offset = rank * self.shard_count as usize / live.len().max(1);
        for step in 0..self.shard_count as usize {
            let id = u32::try_from((offset + step) % self.shard_count as usize).expect("below shard_count");
            if wanted == 0 {
                break;
            }
            if self.owners.contains_key(&id) {
                continue;
            }
            let mut lock = match self.idle.remove(&id) {
                Some(lock) => lock,
                None => {
                    let key = Shard { id, count: self.shard_count }.lock_key(&self.leader_key);
                    LeaderLock::Redis(Box::new(RedisLock::new(&self.cache, key, self.ttl)?))
                }
            };
            let taken = lock.try_acquire().await;
            match taken {
                Ok(true) => {
                    self.start(Shard { id, count: self.shard_count }, lock, reason);
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
        Ok(())
    }

    /// Starts publishing `shard`, whose lock is ours.
    fn start(&mut self, shard: Shard, mut lock: LeaderLock, reason: &'static str) {
        info!(shard = shard.id, reason, key = %lock.key(), "shard acquired");
        let stop = CancellationToken::new();
        self.owners.insert(shard.id, Owner { stop: stop.clone(), releasing: None });
        self.owned.insert(shard);
        let mut engine = Engine::new(&self.parts, shard);
        let span = tracing::info_span!("shard", shard = shard.id);
        self.loops.spawn(
            async move {
                let (kept, result) = hold(&mut lock, &mut engine, &stop).await;
                let ending = match (kept, result) {
                    (_, Err(err)) => Ending::Failed(err),
                    (Kept::Ours, Ok(())) => Ending::Released,
                    (Kept::Lost { .. }, Ok(())) => Ending::LostLease,
                };
                if kept == Kept::Ours {
                    lock.release().await;
                }
                (shard, lock, ending)
            }
            .instrument(span),
        );
    }

    /// A shard loop ended: logs why, and hands the lock back to the idle ones.
    fn ended(
        &mut self,
        ended: Result<(Shard, LeaderLock, Ending), tokio::task::JoinError>,
    ) -> Result<(), RelayError> {
        let (shard, lock, ending) = match ended {
            Ok(ended) => ended,
            // Only a panic (the set is never aborted while running): no shard loop may fail silently.
            Err(err) => std::panic::resume_unwind(err.into_panic()),
        };
        let owner = self.owners.remove(&shard.id);
        self.owned.remove(shard);
        self.idle.insert(shard.id, lock);
        let reason = owner.and_then(|owner| owner.releasing).unwrap_or("stop");
        match ending {
            Ending::Released => {
                info!(shard = shard.id, reason, "shard released");
                Ok(())
            }
            Ending::LostLease => {
                warn!(shard = shard.id, reason = "lost lease", "shard released");
                Ok(())
            }
            Ending::Failed(err) => {
                warn!(shard = shard.id, reason = "failed", "shard released");
                Err(err.into())
            }
        }
    }
}
