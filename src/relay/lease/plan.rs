//! What an elastic replica does at a tick, decided without I/O: how many shards are its fair share among the
//! live members, which shards it gives back above that share, and, below it, which free shards it tries, in
//! what order, and why.

/// One tick's step towards the fair share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Step {
    /// At its share: nothing to do.
    Stay,
    /// Above its share: give these shards back (gracefully: the batch in flight settles first).
    GiveBack(Vec<u32>),
    /// Below its share: try these shards' locks, in this order, until `wanted` of them are taken.
    Take {
        /// How many more shards the share allows.
        wanted: usize,
        /// The shards nobody here leases, from this member's starting point on.
        order: Vec<u32>,
        /// For the log: `start`, `takeover` (a member is gone) or `rebalance`.
        reason: &'static str,
    },
}

/// The step of member `me` among `live` (in token order), which publishes `held` (in order) and has leases
/// in any state on `busy`; `last_members` is how many members the previous tick saw (0 at the first).
pub(super) fn step(
    shard_count: u32,
    live: &[String],
    me: &str,
    held: &[u32],
    busy: &[u32],
    last_members: usize,
) -> Step {
    let share = fair_share(shard_count, live, me) as usize;
    if held.len() > share {
        // The highest shards: a member's starting point makes the low ones the likelier to stay its own.
        return Step::GiveBack(held.iter().rev().take(held.len() - share).copied().collect());
    }
    let wanted = share - held.len();
    if wanted == 0 {
        return Step::Stay;
    }
    let reason = match last_members {
        0 => "start",
        before if live.len() < before => "takeover",
        _ => "rebalance",
    };
    // Members start looking at different shards, so they seldom race for the same free one.
    let rank = live.iter().position(|member| member == me).unwrap_or(0);
    let count = shard_count as usize;
    let offset = rank * count / live.len().max(1);
    let order = (0..count)
        .map(|step| u32::try_from((offset + step) % count).expect("below shard_count"))
        .filter(|id| !busy.contains(id))
        .collect();
    Step::Take { wanted, order, reason }
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

    #[test]
    fn at_its_share_a_member_stays() {
        let live = members(3);
        assert_eq!(step(12, &live, "m01", &[4, 5, 6, 7], &[4, 5, 6, 7], 3), Step::Stay);
    }

    #[test]
    fn above_its_share_a_member_gives_back_its_highest_shards() {
        // A fourth member joined: 3 each.
        let live = members(4);
        let held = [0, 1, 2, 3];
        assert_eq!(step(12, &live, "m00", &held, &held, 3), Step::GiveBack(vec![3]));
        // The 13th member of 12 shards owns none.
        let live = members(13);
        assert_eq!(step(12, &live, "m12", &[5], &[5], 12), Step::GiveBack(vec![5]));
    }

    #[test]
    fn below_its_share_a_member_tries_the_free_shards_from_its_starting_point() {
        let live = members(3);
        let Step::Take { wanted, order, reason } = step(12, &live, "m01", &[], &[], 0) else {
            panic!("a new member takes shards")
        };
        assert_eq!((wanted, reason), (4, "start"));
        assert_eq!(order, vec![4, 5, 6, 7, 8, 9, 10, 11, 0, 1, 2, 3], "m01 of 3 starts a third of the way");
        // Shards it still leases in any state (held, being released, lost) are not tried.
        let Step::Take { order, .. } = step(12, &live, "m01", &[4], &[4, 5], 3) else {
            panic!("below share")
        };
        assert!(!order.contains(&4) && !order.contains(&5));
    }

    #[test]
    fn a_member_gone_is_a_takeover_and_a_member_more_a_rebalance() {
        let reason = |live: usize, before: usize| match step(
            12,
            &members(live),
            "m00",
            &[0, 1, 2],
            &[0, 1, 2],
            before,
        ) {
            Step::Take { reason, .. } => reason,
            other => panic!("below share: {other:?}"),
        };
        assert_eq!(reason(2, 4), "takeover");
        assert_eq!(reason(2, 2), "rebalance");
    }
}
