//! What the probes judge: `/livez` (the process answers) and `/readyz` (Postgres and NATS reachable).
//! [`endpoint`](super::endpoint) serves them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use hyper::StatusCode;

use super::publisher::RelayPublisher;
use super::store::OutboxStore;

/// A readiness probe must answer well within Kubernetes' default 1 s timeout.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);

/// What the probes look at; filled in as the relay connects.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Default)]
struct HealthInner {
    dependencies: OnceLock<(OutboxStore, RelayPublisher)>,
    leading: AtomicBool,
}

impl Health {
    /// Called once connected; until then `/readyz` says 503.
    pub fn set_dependencies(&self, store: OutboxStore, publisher: RelayPublisher) {
        let _ = self.inner.dependencies.set((store, publisher));
    }

    /// Whether this relay currently publishes its shard (shown on `/readyz`).
    pub fn set_leading(&self, leading: bool) {
        self.inner.leading.store(leading, Ordering::Relaxed);
    }

    /// Ready: Postgres answers and NATS is connected. A standby is ready too: it can take over at once.
    pub(super) async fn readiness(&self) -> (StatusCode, String) {
        let Some((store, publisher)) = self.inner.dependencies.get() else {
            return (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into());
        };
        let postgres = tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(store.pool()))
            .await
            .is_ok_and(|r| r.is_ok());
        let nats = publisher.is_connected();
        let role = if self.inner.leading.load(Ordering::Relaxed) { "leader" } else { "standby" };
        let status = if postgres && nats { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        (status, format!("postgres: {}\nnats: {}\nrole: {role}\n", up(postgres), up(nats)))
    }
}

fn up(ok: bool) -> &'static str {
    if ok {
        "up"
    } else {
        "down"
    }
}
