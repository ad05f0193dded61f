//! What qx-relay's live-service tests (`tests/`), the drain benchmark (`benches/drain/`) and the chaos check
//! (`examples/chaos.rs`) stand on, written once:
//!
//! - [`env`]: the variables the runs need (`DATABASE_URL`, `NATS_URL`, `REDIS_URL`) and [`RelayEnv`], the
//!   settings a relay starts with.
//! - [`relay`]: the real `qx-relay` binary as a process ([`Relay`]) or a command run to completion.
//! - [`db`] and [`stream`]: a database and a JetStream stream of a run's own, removed on drop.
//! - [`handover`]: relays' JSON logs and what the stream holds after handovers: each row once, keys in order.
//! - [`outbox`]: the qx-db table, its fixture rows and every INSERT into it.
//! - [`servers`]: `nats-server`, `redis-server` and Postgres clusters of a run's own, to kill, freeze and restart.
//! - [`prometheus`] and [`crash_loop`]: a real Prometheus evaluating the shipped alerting rules, and a relay
//!   restarted with a kubelet's back-off, to see alerts fire as an on-call person would.
//! - [`wait`]: one way to wait for a condition. [`http`], [`proc`], [`proxy`], [`pki`] and [`redis_keys`]: the
//!   rest a test looks at the relay and its services with.
//!
//! A missing variable or server fails the run and names it; nothing is skipped silently.

pub mod crash_loop;
pub mod db;
pub mod env;
pub mod handover;
pub mod http;
pub mod outbox;
pub mod pki;
pub mod proc;
pub mod prometheus;
pub mod proxy;
pub mod redis_keys;
pub mod relay;
pub mod servers;
pub mod stream;
pub mod wait;

pub use db::TestDb;
pub use env::{env_var, RelayEnv};
pub use http::{http, HttpResponse};
pub use relay::{run_command, run_command_unread, Relay};
pub use servers::{free_port, NatsCluster, NatsServer, PgBouncer, PgCluster, RedisServer};
pub use stream::TestStream;
pub use wait::{eventually, poll};

/// How long cleanup in `Drop` may take before it gives up and leaves the thing behind.
const CLEANUP_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `cleanup` to the end, or for [`CLEANUP_LIMIT`], from `Drop`, which cannot await: on a thread and a
/// runtime of its own, since the caller's runtime may be the single thread that is dropping.
fn clean_up_blocking(cleanup: impl std::future::Future<Output = ()> + Send + 'static) {
    let thread = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
        if let Ok(runtime) = runtime {
            runtime.block_on(async {
                let _ = tokio::time::timeout(CLEANUP_LIMIT, cleanup).await;
            });
        }
    });
    let _ = thread.join();
}
