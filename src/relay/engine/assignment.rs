//! The shards a loop over several of them (elastic shards) claims, as its owner assigns them. Every change
//! has a generation; the loop acknowledges it once nothing it claimed under an earlier one is still open
//! (published and settled, or rolled back), so the owner knows when a shard it took away is really let go.

use tokio::sync::watch;

/// The shards a loop claims, and the generation of that assignment.
#[derive(Debug, Clone, Default)]
struct Assigned {
    generation: u64,
    shards: Vec<i32>,
}

/// The owner's end.
pub struct Assigner {
    assigned: watch::Sender<Assigned>,
    acknowledged: watch::Receiver<u64>,
}

/// The loop's end.
pub struct Assignee {
    assigned: watch::Receiver<Assigned>,
    acknowledged: watch::Sender<u64>,
}

impl Default for Assigner {
    /// An assignment of no shards, with no loop yet.
    fn default() -> Self {
        let (assigned, _) = watch::channel(Assigned::default());
        let (_, acknowledged) = watch::channel(0);
        Self { assigned, acknowledged }
    }
}

impl Assigner {
    /// Assigns `shards`; returns the generation to wait for with [`Assigner::released`].
    pub fn assign(&self, shards: impl IntoIterator<Item = u32>) -> u64 {
        let shards = shards.into_iter().filter_map(|id| i32::try_from(id).ok()).collect();
        let mut generation = 0;
        self.assigned.send_modify(|assigned| {
            assigned.generation += 1;
            assigned.shards = shards;
            generation = assigned.generation;
        });
        generation
    }

    /// Whether the loop has let go of what it claimed before `generation`.
    pub fn released(&self, generation: u64) -> bool {
        *self.acknowledged.borrow() >= generation
    }

    /// Waits until the loop acknowledges a newer generation (or is gone).
    pub async fn acknowledged(&mut self) {
        if self.acknowledged.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// The end of a new loop, assigned the current shards. The loop before it, if any, must be gone: whatever it
    /// claimed counts as let go.
    pub fn assignee(&mut self) -> Assignee {
        let (acknowledged_tx, acknowledged_rx) = watch::channel(self.assigned.borrow().generation);
        self.acknowledged = acknowledged_rx;
        Assignee { assigned: self.assigned.subscribe(), acknowledged: acknowledged_tx }
    }
}

impl Assignee {
    /// The shards to claim now.
    pub fn shards(&self) -> Vec<i32> {
        self.assigned.borrow().shards.clone()
    }

    /// Whether the assignment changed since the last [`Assignee::acknowledge`].
    pub fn changed(&self) -> bool {
        self.assigned.has_changed().unwrap_or(false)
    }

    /// Takes the current assignment as the one claims follow: the caller has let go of everything claimed
    /// under earlier ones.
    pub fn acknowledge(&mut self) {
        let generation = self.assigned.borrow_and_update().generation;
        self.acknowledged.send_replace(generation);
    }

    /// Waits for a new assignment (forever, once the owner is gone); leaves it to [`Assignee::acknowledge`].
    pub async fn reassigned(&self) {
        let mut assigned = self.assigned.clone();
        if assigned.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_taken_away_is_released_once_the_loop_acknowledges() {
        let mut assigner = Assigner::default();
        let mut assignee = assigner.assignee();
        let first = assigner.assign([1, 4]);
        assert!(assignee.changed());
        assignee.acknowledge();
        assert_eq!(assignee.shards(), [1, 4]);
        assert!(assigner.released(first));
        let second = assigner.assign([4]);
        assert!(!assigner.released(second), "the loop may still hold rows of shard 1");
        assignee.acknowledge();
        assert!(assigner.released(second) && !assignee.changed());
        let third = assigner.assign([]);
        let fresh = assigner.assignee();
        assert!(assigner.released(third), "a loop started anew holds nothing");
        assert!(fresh.shards().is_empty());
    }
}
