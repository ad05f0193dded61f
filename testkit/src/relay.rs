//! The real `qx-relay` binary: a [`Relay`] process to signal, kill and read the log of, or [`run_command`] for
//! a subcommand that runs to completion.

use std::fs;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use uuid::Uuid;

use crate::servers::signal;
use crate::wait::{holds_within, poll, poll_every};
use crate::{free_port, RelayEnv, TestDb};

/// How long [`Relay::stop`] gives a relay to exit after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(15);
/// How often [`Relay::stop_when_drained`] counts: a count reads the whole pending end of the table, which the
/// relay is draining.
const DRAINED_EVERY: Duration = Duration::from_millis(50);

/// The `qx-relay` cargo built next to the running executable: tests and benchmarks run from
/// `target/<profile>/deps/`, examples from `target/<profile>/examples/`, and the binary is in `target/<profile>/`.
/// Cargo builds it for integration tests and benchmarks; `scripts/chaos` builds it for the example.
fn relay_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("the path of the running executable");
        let mut dir = exe.parent().expect("the executable's directory");
        if dir.ends_with("deps") || dir.ends_with("examples") {
            dir = dir.parent().expect("the profile directory");
        }
        let bin = dir.join("qx-relay");
        assert!(bin.is_file(), "{} is missing: cargo build --bin qx-relay (same profile)", bin.display());
        bin
    })
}

/// A running `qx-relay`, its stderr in a log file. Killed on drop if still running.
pub struct Relay {
    /// In a mutex so that every method takes `&self`: a wait's check may look at the relay itself.
    child: Mutex<Child>,
    pid: u32,
    log: PathBuf,
    /// A log of the relay's own, removed on drop unless the test is failing.
    temporary_log: bool,
}

impl Relay {
    /// Starts `qx-relay args` with `env`, logging to a temporary file.
    pub fn spawn(env: &RelayEnv, args: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!("qx-relay-test-{}.log", Uuid::new_v4().simple()));
        Self::start(env, args, &log, true)
    }

    /// Starts `qx-relay` with `env`, serving its endpoint on a free loopback port; and the port.
    pub fn spawn_serving(env: &RelayEnv) -> (Self, u16) {
        let port = free_port();
        (Self::spawn(env, &["--metrics-addr", &format!("127.0.0.1:{port}")]), port)
    }

    /// Starts `qx-relay` with `env`, appending its log to `log`, which it keeps.
    pub fn spawn_with_log(env: &RelayEnv, log: &Path) -> Self {
        Self::start(env, &[], log, false)
    }

    fn start(env: &RelayEnv, args: &[&str], log: &Path, temporary_log: bool) -> Self {
        let log_file =
            fs::OpenOptions::new().create(true).append(true).open(log).expect("open the relay's log");
        let child = env
            .command(relay_bin())
            .args(args)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|err| panic!("start {}: {err}", relay_bin().display()));
        Self { pid: child.id(), child: Mutex::new(child), log: log.to_owned(), temporary_log }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn child(&self) -> MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Sends `signal` (`TERM`, `STOP`, …), which must be delivered.
    pub fn signal(&self, name: &str) {
        assert!(signal(self.pid, name), "kill -{name} {} failed", self.pid);
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill9(&self) {
        let mut child = self.child();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// How it exited, or `None` while it runs.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.child().try_wait().expect("poll the relay")
    }

    /// How it exited within `limit`, or `None` while it still runs.
    async fn exit_within(&self, limit: Duration) -> Option<ExitStatus> {
        poll(limit, || async { self.exited() }).await
    }

    /// How it exited within `limit`; otherwise it is killed and the test fails with its log.
    pub async fn wait(&self, limit: Duration) -> ExitStatus {
        match self.exit_within(limit).await {
            Some(status) => status,
            None => {
                self.kill9();
                panic!("relay did not exit within {limit:?}; log:\n{}", self.log());
            }
        }
    }

    /// SIGTERM unless it exited already, then how it exited within `limit`; `None` when it had to be killed.
    pub async fn terminate(&self, limit: Duration) -> Option<ExitStatus> {
        if self.exited().is_none() {
            signal(self.pid, "TERM");
        }
        let status = self.exit_within(limit).await;
        if status.is_none() {
            self.kill9();
        }
        status
    }

    /// SIGTERM unless it exited already, and a clean exit (0) within 15 s.
    pub async fn stop(&self) {
        let status = self.terminate(STOP_LIMIT).await;
        let log = self.log();
        let status =
            status.unwrap_or_else(|| panic!("relay did not exit within {STOP_LIMIT:?}; log:\n{log}"));
        assert_eq!(status.code(), Some(0), "relay exit; log:\n{log}");
    }

    /// Waits until no row of `db` is pending, failing at once should the relay exit, then stops it cleanly.
    pub async fn stop_when_drained(&self, db: &TestDb, limit: Duration) {
        let drained = poll_every(DRAINED_EVERY, limit, || async {
            if let Some(status) = self.exited() {
                panic!("relay exited ({status}) before publishing every row; log:\n{}", self.log());
            }
            (db.unpublished().await == 0).then_some(())
        });
        if drained.await.is_none() {
            panic!("rows left unpublished after {limit:?}; log:\n{}", self.log());
        }
        self.stop().await;
    }

    /// Waits until `check` holds; fails naming `what`, with the log, once `limit` has passed.
    pub async fn eventually<F, Fut>(&self, what: &str, limit: Duration, check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        if !holds_within(limit, check).await {
            panic!("waited {limit:?} for {what}; log:\n{}", self.log());
        }
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if self.temporary_log && !std::thread::panicking() {
            let _ = fs::remove_file(&self.log);
        }
    }
}

/// Runs `qx-relay args` with `env` to completion: its exit code, stdout and stderr.
pub fn run_command(env: &RelayEnv, args: &[&str]) -> (Option<i32>, String, String) {
    let output = env.command(relay_bin()).args(args).output().expect("run qx-relay");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `qx-relay args` with `env` while nobody reads its output (`qx-relay status | head -0`): its exit code
/// and stderr.
pub fn run_command_unread(env: &RelayEnv, args: &[&str]) -> (Option<i32>, String) {
    let mut child = env
        .command(relay_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qx-relay");
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait for qx-relay");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}
