//! What the probes judge: `/readyz` (Postgres and NATS reachable) and `/livez` (the relay loop keeps making
//! steps while it runs). [`endpoint`](super::endpoint) serves them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use hyper::StatusCode;
use tracing::warn;

use super::config::Config;
use super::nats::RelayPublisher;
use super::store::OutboxStore;

/// A readiness probe must answer well within Kubernetes' default 1 s timeout.
const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// Added to the relay loop's longest legitimate silence before `/livez` fails: the loop's own short waits (up
/// to 5 s of outage back-off, 1 s for a missing stream) and slow statements. The probe's failureThreshold
/// adds its own.
const STALL_MARGIN: Duration = Duration::from_secs(10);

/// How long the relay loop may go without a step before `/livez` fails. Its longest legitimate silence is one
/// iteration that waits out an outage (`give_up_after`), a publish without PubAcks (`ack_timeout`), a
/// Postgres connect attempt and the longest poll wait, then a drain (`drain_timeout`).
pub fn stall_limit(config: &Config) -> Duration {
    let relay = &config.relay;
    // validate() caps every term, so the sum cannot overflow.
    [
        relay.give_up_after,
        relay.ack_timeout,
        Duration::from_secs_f64(config.nats.connect_timeout_seconds),
        relay.poll_interval.max(relay.idle_poll_interval),
        relay.drain_timeout,
        STALL_MARGIN,
    ]
    .into_iter()
    .sum()
}

/// When the relay loop last made a step: the loop beats it once per iteration, `/livez` reads it. Cheap to
/// clone and to beat.
#[derive(Clone)]
pub struct Heartbeat {
    origin: Instant,
    /// Milliseconds from `origin` to the last beat.
    last: Arc<AtomicU64>,
}

impl Heartbeat {
    fn new() -> Self {
        Self { origin: Instant::now(), last: Arc::default() }
    }

    /// Records a step of the loop.
    pub fn beat(&self) {
        let millis = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(millis, Ordering::Relaxed);
    }

    /// How long before `now` the last beat was.
    fn silence(&self, now: Instant) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        now.saturating_duration_since(self.origin).saturating_sub(last)
    }
}

/// What the probes look at; filled in as the relay connects and leads.
#[derive(Clone)]
pub struct Health {
    inner: Arc<HealthInner>,
}

struct HealthInner {
    dependencies: OnceLock<(OutboxStore, RelayPublisher)>,
    leading: AtomicBool,
    heartbeat: Heartbeat,
    stall_limit: Duration,
}

impl Health {
    /// `/livez` fails once the running relay loop has made no step for longer than `stall_limit`.
    pub fn new(stall_limit: Duration) -> Self {
        Self::with_heartbeat(stall_limit, Heartbeat::new())
    }

    fn with_heartbeat(stall_limit: Duration, heartbeat: Heartbeat) -> Self {
        let inner = HealthInner {
            dependencies: OnceLock::new(),
            leading: AtomicBool::new(false),
            heartbeat,
            stall_limit,
        };
        Self { inner: Arc::new(inner) }
    }

    /// The heartbeat for the relay loop to beat.
    pub fn heartbeat(&self) -> Heartbeat {
        self.inner.heartbeat.clone()
    }

    /// Called once connected; until then `/readyz` says 503.
    pub fn set_dependencies(&self, store: OutboxStore, publisher: RelayPublisher) {
        let _ = self.inner.dependencies.set((store, publisher));
    }

    /// Whether the relay loop runs (this relay publishes its shard): shown on `/readyz`, and the only time
    /// `/livez` judges the loop.
    pub fn set_leading(&self, leading: bool) {
        if leading {
            // Time spent standing by is not the loop's silence.
            self.inner.heartbeat.beat();
        }
        self.inner.leading.store(leading, Ordering::Release);
    }

    /// Live, unless the loop runs but has made no step for longer than the stall limit: then a statement or a
    /// connection never returns, and only a restart helps. A standby, or a relay still connecting or waiting
    /// for its lock, is live.
    pub(super) fn liveness(&self, now: Instant) -> (StatusCode, String) {
        let silence = self.inner.heartbeat.silence(now);
        let limit = self.inner.stall_limit;
        if !self.inner.leading.load(Ordering::Acquire) || silence <= limit {
            return (StatusCode::OK, "ok\n".into());
        }
        let (silence, limit) = (in_millis(silence), in_millis(limit));
        warn!(%silence, %limit, "the relay loop has stalled; /livez fails so the process is restarted");
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("relay loop stalled: no step for {silence} (limit {limit})\n"),
        )
    }

    /// Ready: Postgres answers and NATS is connected. A standby is ready too: it can take over at once.
    pub(super) async fn readiness(&self) -> (StatusCode, String) {
        let Some((store, publisher)) = self.inner.dependencies.get() else {
            return (StatusCode::SERVICE_UNAVAILABLE, "starting\n".into());
        };
        let postgres = tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(store.pool()))
            .await
            .is_ok_and(|r| r.is_ok());
        let nats = publisher.is_up();
        let role = if self.inner.leading.load(Ordering::Acquire) { "leader" } else { "standby" };
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

fn in_millis(duration: Duration) -> humantime::FormattedDuration {
    humantime::format_duration(Duration::from_millis(duration.as_millis().try_into().unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    fn is_live(health: &Health, at: Instant) -> bool {
        health.liveness(at).0 == StatusCode::OK
    }

    #[test]
    fn a_running_loop_is_live_until_its_silence_exceeds_the_limit() {
        let health = Health::new(LIMIT);
        health.set_leading(true);
        let now = Instant::now();
        assert!(is_live(&health, now));
        assert!(is_live(&health, now + LIMIT - Duration::from_millis(100)));
        let (status, body) = health.liveness(now + LIMIT + Duration::from_secs(1));
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("limit 10s"), "{body}");
    }

    #[test]
    fn a_standby_is_never_judged() {
        let health = Health::new(LIMIT);
        assert!(is_live(&health, Instant::now() + LIMIT * 100), "not yet leading");
        health.set_leading(true);
        health.set_leading(false);
        assert!(is_live(&health, Instant::now() + LIMIT * 100), "stood down");
    }

    #[test]
    fn taking_the_lead_after_a_long_standby_starts_the_clock_afresh() {
        // Last beaten an hour ago, as after an hour on standby.
        let stale = Heartbeat { origin: Instant::now() - Duration::from_secs(3600), last: Arc::default() };
        let health = Health::with_heartbeat(LIMIT, stale);
        assert!(is_live(&health, Instant::now()), "standing by");
        health.set_leading(true);
        assert!(is_live(&health, Instant::now()), "leading: the hour on standby does not count");
        assert!(!is_live(&health, Instant::now() + LIMIT + Duration::from_secs(1)));
    }
}
