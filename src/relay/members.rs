//! Who is alive among the replicas sharing the shards (`shard_id = "auto"`): a sorted set in the leader
//! lock's Redis, `<leader_key>:members`, of each replica's token scored by when its heartbeat expires. Scores
//! are Redis' own clock, so replicas' clocks never disagree about who has expired.

use std::time::Duration;

use tracing::debug;
use uuid::Uuid;

use super::config::CacheConfig;
use super::leader::{LockError, RedisLink};

/// Drops expired members, (re)adds `ARGV[1]` until `ARGV[2]` ms from now, and returns the live members in
/// token order. The set itself expires when every replica has been gone for two TTLs.
const BEAT_SCRIPT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('time')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('zremrangebyscore', KEYS[1], '-inf', now)
redis.call('zadd', KEYS[1], now + ARGV[2], ARGV[1])
redis.call('pexpire', KEYS[1], ARGV[2] * 2)
return redis.call('zrange', KEYS[1], 0, -1)";
/// The live members, without joining.
const LIVE_SCRIPT: &str = r"
local t = redis.call('time')
return redis.call('zrangebyscore', KEYS[1], t[1] * 1000 + math.floor(t[2] / 1000), '+inf')";

/// This replica's entry in the membership record.
pub struct Membership {
    link: RedisLink,
    key: String,
    token: String,
    ttl: Duration,
}

impl Membership {
    /// A fresh member of `<leader_key>:members` whose heartbeat lasts `ttl`.
    ///
    /// # Errors
    /// When `cache.url` is not a Redis URL, or its certificates cannot be read.
    pub fn new(cache: &CacheConfig, leader_key: &str, ttl: Duration) -> Result<Self, LockError> {
        Ok(Self {
            link: RedisLink::new(cache)?,
            key: members_key(leader_key),
            token: Uuid::new_v4().to_string(),
            ttl,
        })
    }

    /// This replica's token in the record.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Renews this replica's heartbeat; returns the live members, this one included, in token order.
    ///
    /// # Errors
    /// When Redis fails or does not answer within a third of the TTL.
    pub async fn beat(&mut self) -> Result<Vec<String>, LockError> {
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        let beat =
            redis::cmd("EVAL").arg(BEAT_SCRIPT).arg(1).arg(&self.key).arg(&self.token).arg(ttl_ms).to_owned();
        self.link.query(beat, self.ttl / 3).await
    }

    /// Leaves the record, so the others rebalance now rather than when the heartbeat expires.
    pub async fn leave(&mut self) {
        let leave = redis::cmd("ZREM").arg(&self.key).arg(&self.token).to_owned();
        if let Err(err) = self.link.query::<i64>(leave, self.ttl / 3).await {
            debug!(error = %super::error_chain(&err), "membership not left; it expires by itself");
        }
    }
}

/// How many replicas are alive, for `status`.
///
/// # Errors
/// When Redis cannot be reached.
pub async fn live_members(
    cache: &CacheConfig,
    leader_key: &str,
    limit: Duration,
) -> Result<usize, LockError> {
    let mut link = RedisLink::new(cache)?;
    let live = redis::cmd("EVAL").arg(LIVE_SCRIPT).arg(1).arg(members_key(leader_key)).to_owned();
    let members: Vec<String> = link.query(live, limit).await?;
    Ok(members.len())
}

fn members_key(leader_key: &str) -> String {
    format!("{leader_key}:members")
}

/// How many of `shard_count` shards the member `me` should own: an even split in token order, the first
/// `shard_count % members` members taking one more, so every shard has an owner, no two shares differ by more
/// than one, and members beyond `shard_count` stand by. Zero when `me` is not a member.
pub fn fair_share(shard_count: u32, members: &[String], me: &str) -> u32 {
    let Some(rank) = members.iter().position(|member| member == me) else { return 0 };
    let (count, rank) = (shard_count as usize, rank);
    let share = count / members.len() + usize::from(rank < count % members.len());
    u32::try_from(share).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("m{i:02}")).collect()
    }

    #[test]
    fn shares_cover_every_shard_and_differ_by_at_most_one() {
        for count in 1..=16 {
            for n in 1..=20 {
                let members = members(n);
                let shares: Vec<u32> = members.iter().map(|m| fair_share(count, &members, m)).collect();
                assert_eq!(shares.iter().sum::<u32>(), count, "{count} shards over {n}");
                let (min, max) = (shares.iter().min().unwrap(), shares.iter().max().unwrap());
                assert!(max - min <= 1, "{count} shards over {n}: {shares:?}");
                assert!(*max <= count.div_ceil(n as u32));
            }
        }
    }

    #[test]
    fn twelve_shards_split_four_ways_three_ways_and_stand_by_beyond() {
        let share = |n: usize, m: &str| fair_share(12, &members(n), m);
        assert_eq!(share(3, "m00"), 4);
        assert_eq!(share(4, "m03"), 3);
        assert_eq!(share(5, "m01"), 3);
        assert_eq!(share(5, "m04"), 2);
        assert_eq!(share(13, "m12"), 0, "the 13th replica is a hot standby");
        assert_eq!(share(3, "gone"), 0);
    }
}
