//! The shards this relay publishes now: one record, told to the metrics, the probes and the outbox sample.

use tokio::sync::watch;

use super::health::Health;
use super::metrics;
use super::shard::Shard;

/// The shards this relay publishes now, told to the metrics, the probes and the outbox sample.
pub(crate) struct Owned {
    shards: watch::Sender<Vec<Shard>>,
    health: Health,
}

impl Owned {
    pub(crate) fn new(health: Health) -> Self {
        Self { shards: watch::Sender::new(Vec::new()), health }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Vec<Shard>> {
        self.shards.subscribe()
    }

    pub(crate) fn insert(&self, shard: Shard) {
        metrics::set_leader(shard, true);
        self.shards.send_modify(|shards| shards.push(shard));
        self.changed();
    }

    pub(crate) fn remove(&self, shard: Shard) {
        metrics::set_leader(shard, false);
        self.shards.send_modify(|shards| shards.retain(|s| *s != shard));
        self.changed();
    }

    fn changed(&self) {
        let count = self.shards.borrow().len();
        metrics::set_owned(count);
        self.health.set_leading(count > 0);
    }
}
