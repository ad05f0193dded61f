//! A relay restarted whenever it exits, after the back-off a kubelet uses (10 s, doubling up to 5 min, back to
//! 10 s after 10 min of running), on the same metrics port: what Prometheus sees of a pod in a crash loop.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use crate::{Relay, RelayEnv};

/// The kubelet's first restart delay.
const FIRST_BACK_OFF: Duration = Duration::from_secs(10);
/// Its longest.
const MAX_BACK_OFF: Duration = Duration::from_secs(300);
/// A run this long resets the back-off.
const RESET_AFTER: Duration = Duration::from_secs(600);
/// How often the supervisor looks whether the relay exited.
const LOOK_EVERY: Duration = Duration::from_millis(100);

/// A relay kept running like a pod's container; stopped (the running relay killed) on drop.
pub struct CrashLoop {
    exits: Arc<Mutex<Vec<Option<i32>>>>,
    log: PathBuf,
    supervisor: JoinHandle<()>,
}

impl CrashLoop {
    /// Starts `qx-relay` with `env`, serving its endpoint on 127.0.0.1:`port` in every run.
    pub fn start(env: &RelayEnv, port: u16) -> Self {
        let env = env.clone().set("QX_RELAY__METRICS_ADDR", format!("127.0.0.1:{port}"));
        let log = std::env::temp_dir().join(format!("qx-relay-crash-loop-{}.log", Uuid::new_v4().simple()));
        let exits = Arc::new(Mutex::new(Vec::new()));
        let supervisor = tokio::spawn(supervise(env, log.clone(), exits.clone()));
        Self { exits, log, supervisor }
    }

    /// The exit codes of the runs that ended so far.
    pub fn exits(&self) -> Vec<Option<i32>> {
        self.exits.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Every run's log, one after the other.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

async fn supervise(env: RelayEnv, log: PathBuf, exits: Arc<Mutex<Vec<Option<i32>>>>) {
    let mut back_off = FIRST_BACK_OFF;
    loop {
        let started = Instant::now();
        let relay = Relay::spawn_with_log(&env, &log);
        let status = loop {
            if let Some(status) = relay.exited() {
                break status;
            }
            tokio::time::sleep(LOOK_EVERY).await;
        };
        exits.lock().unwrap_or_else(PoisonError::into_inner).push(status.code());
        if started.elapsed() >= RESET_AFTER {
            back_off = FIRST_BACK_OFF;
        }
        tokio::time::sleep(back_off).await;
        back_off = (back_off * 2).min(MAX_BACK_OFF);
    }
}

impl Drop for CrashLoop {
    fn drop(&mut self) {
        // Aborting drops the running relay, which kills it.
        self.supervisor.abort();
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}
