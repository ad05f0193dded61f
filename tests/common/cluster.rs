//! Private servers for fault tests: a `nats-server -js`, a `redis-server` and a Postgres cluster, each on a free
//! loopback port with its data in a temporary directory, so a test (or `scripts/chaos`) can kill -9 and restart
//! them without touching the shared services on 4222, 6379 and 5432.
//!
//! Stand-alone (no `common` items), so `examples/chaos.rs` includes it too.
// Each includer uses its own subset of these helpers.
#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use uuid::Uuid;

/// How long a (re)started server may take to accept connections.
const STARTUP: Duration = Duration::from_secs(30);

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// A fresh directory under the system temp dir.
fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qxr-{kind}-{}", Uuid::new_v4().simple()));
    fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Waits until something accepts TCP connections on `port`.
async fn wait_for_port(port: u16, what: &str) {
    let deadline = tokio::time::Instant::now() + STARTUP;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "{what} did not listen on {port} within {STARTUP:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sends `signal` to `pid` with kill(1); whether it was delivered.
pub fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Reaps `child` within `limit`, killing it when it does not go.
fn reap(child: &mut Child, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while matches!(child.try_wait(), Ok(None)) {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.wait();
}

/// A `nats-server -js` of our own; its store survives restarts.
pub struct NatsServer {
    pub port: u16,
    pub dir: PathBuf,
    jetstream: bool,
    /// Added to every start, e.g. `--user`/`--pass` or `--tls …`.
    args: Vec<String>,
    child: Option<Child>,
}

impl NatsServer {
    /// Starts one on a free port.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts one on a free port with `args` added to the command line.
    pub async fn start_with(args: &[&str]) -> Self {
        Self::start_as(true, args).await
    }

    /// Starts one with JetStream off: core NATS only.
    pub async fn start_without_jetstream() -> Self {
        Self::start_as(false, &[]).await
    }

    async fn start_as(jetstream: bool, args: &[&str]) -> Self {
        let args = args.iter().map(|arg| (*arg).to_owned()).collect();
        let mut server = Self { port: free_port(), dir: temp_dir("nats"), jetstream, args, child: None };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Starts it again (same port, same store) unless it runs; returns when it accepts connections.
    pub async fn restart(&mut self) {
        if self.is_running() {
            return;
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("nats.log"))
            .expect("open nats log");
        let mut command = Command::new("nats-server");
        command.args(["-a", "127.0.0.1", "-p", &self.port.to_string()]).args(&self.args);
        if self.jetstream {
            command.arg("-js").arg("-sd").arg(self.dir.join("store"));
        }
        let child =
            command.stdout(Stdio::null()).stderr(log).spawn().expect("start nats-server (is it installed?)");
        self.child = Some(child);
        wait_for_port(self.port, "nats-server").await;
    }

    /// SIGKILL: nothing is flushed or closed.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: connections stay open but nothing answers, as with a hung server or a partition. Killing it
    /// (or dropping it) still works while it is frozen.
    pub fn freeze(&self) {
        if let Some(child) = &self.child {
            assert!(signal(child.id(), "STOP"), "freeze nats-server");
        }
    }

    /// SIGTERM, then wait for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            reap(&mut child, Duration::from_secs(10));
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill9();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A `redis-server` of our own, without persistence: a restart forgets every key, as a crashed cache would.
pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    /// Added to every start, after the defaults they override.
    args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        Self::start_with(|_| Vec::new()).await
    }

    /// Starts one with the arguments `args` gives for its port added to the command line; later arguments win,
    /// so `--port 0 --tls-port <port>` makes it a TLS-only server.
    pub async fn start_with(args: impl FnOnce(u16) -> Vec<String>) -> Self {
        let port = free_port();
        let mut server = Self { port, dir: temp_dir("redis"), args: args(port), child: None };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    pub async fn restart(&mut self) {
        if self.is_running() {
            return;
        }
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
        wait_for_port(self.port, "redis-server").await;
    }

    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            reap(&mut child, Duration::from_secs(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A Postgres cluster of our own (initdb, trust auth, superuser `postgres`) managed with `pg_ctl`.
///
/// Postgres refuses to run as root; as root, its commands run as the `postgres` user, in a directory it owns.
pub struct PgCluster {
    pub port: u16,
    pub dir: PathBuf,
    bin: PathBuf,
}

impl PgCluster {
    /// initdb and start, on a free port.
    pub async fn start() -> Self {
        let cluster = Self::init();
        cluster.restart().await;
        cluster
    }

    /// initdb, TLS on with these PEM files (copied in, the key readable by the server alone), `hba` lines ahead
    /// of initdb's trust lines; then start.
    pub async fn start_with_tls(cert: &Path, key: &Path, ca: &Path, hba: &[&str]) -> Self {
        let cluster = Self::init();
        let mut settings = String::from("\nssl = on\n");
        for (setting, file, mode) in
            [("ssl_cert_file", cert, "644"), ("ssl_key_file", key, "600"), ("ssl_ca_file", ca, "644")]
        {
            let copy = cluster.dir.join(file.file_name().expect("a file name"));
            fs::copy(file, &copy).expect("copy a TLS file");
            cluster.give(&copy, mode);
            settings.push_str(&format!("{setting} = '{}'\n", copy.display()));
        }
        let conf = cluster.data().join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).expect("read postgresql.conf");
        text.push_str(&settings);
        fs::write(&conf, text).expect("write postgresql.conf");
        let hba_file = cluster.data().join("pg_hba.conf");
        let hba = format!("{}\n{}", hba.join("\n"), fs::read_to_string(&hba_file).expect("read pg_hba.conf"));
        fs::write(&hba_file, hba).expect("write pg_hba.conf");
        cluster.restart().await;
        cluster
    }

    /// Hands `path` to the server's user with `mode`.
    fn give(&self, path: &Path, mode: &str) {
        let status = Command::new("chmod").arg(mode).arg(path).status();
        assert!(status.is_ok_and(|s| s.success()), "chmod {}", path.display());
        if is_root() {
            let status = Command::new("chown").arg("postgres:").arg(path).status();
            assert!(status.is_ok_and(|s| s.success()), "chown {} to postgres", path.display());
        }
    }

    fn init() -> Self {
        let dir = temp_dir("pg");
        let cluster = Self { port: free_port(), bin: pg_bin(), dir };
        if is_root() {
            let status = Command::new("chown").arg("postgres:").arg(&cluster.dir).status();
            assert!(status.is_ok_and(|s| s.success()), "chown {} to postgres", cluster.dir.display());
        }
        let data = cluster.data();
        let out = cluster
            .command("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        cluster
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A connection URL for `database`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--"]).arg(path);
            command.current_dir(&self.dir);
            command
        } else {
            Command::new(path)
        }
    }

    /// Starts the server (after a crash: crash recovery); returns when it accepts connections.
    pub async fn restart(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.display()
        );
        // A killed postmaster's children may hold the shared memory a moment longer: retry.
        let deadline = tokio::time::Instant::now() + STARTUP;
        loop {
            let out = self
                .command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.join("postgres.log"))
                .args(["-o", &options, "-w", "-t", "30", "start"])
                .stdout(Stdio::null())
                .output()
                .expect("run pg_ctl start");
            if out.status.success() {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pg_ctl start failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        wait_for_port(self.port, "postgres").await;
    }

    /// `pg_ctl stop -m <mode>`: `immediate` is a crash (recovery on the next start), `fast` a clean restart.
    pub fn stop(&self, mode: &str) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", mode, "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// SIGKILL to the postmaster and every process it started: a host crash, as far as Postgres can tell.
    pub fn kill9(&self) {
        let Some(postmaster) = self.postmaster_pid() else { return };
        let children = children_of(postmaster);
        signal(postmaster, "KILL");
        for child in children {
            signal(child, "KILL");
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while Path::new(&format!("/proc/{postmaster}")).exists() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGSTOP to the postmaster and every process it started: a hung server or a network blackhole, as
    /// far as its clients can tell (connections open, nothing answers). New backends forked later are not
    /// frozen, but a frozen postmaster forks none.
    pub fn freeze(&self) {
        self.signal_all("STOP");
    }

    /// SIGCONT to what [`PgCluster::freeze`] stopped.
    pub fn thaw(&self) {
        self.signal_all("CONT");
    }

    fn signal_all(&self, name: &str) {
        let Some(postmaster) = self.postmaster_pid() else { return };
        signal(postmaster, name);
        for child in children_of(postmaster) {
            signal(child, name);
        }
    }

    fn postmaster_pid(&self) -> Option<u32> {
        let text = fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        let pid: u32 = text.lines().next()?.trim().parse().ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop("immediate");
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn is_root() -> bool {
    // The real uid from /proc, to need no libc binding for getuid().
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:").map(|ids| ids.split_whitespace().next() == Some("0")))
        })
        .unwrap_or(false)
}

/// The newest Postgres under /usr/lib/postgresql (Debian keeps one directory per major version).
fn pg_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<u32> = fs::read_dir(root)
        .unwrap_or_else(|err| panic!("{}: {err} (is postgresql installed?)", root.display()))
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|version: &u32| root.join(version.to_string()).join("bin/initdb").is_file())
        .collect();
    versions.sort_unstable();
    let newest = versions.last().unwrap_or_else(|| panic!("no bin/initdb under {}", root.display()));
    root.join(newest.to_string()).join("bin")
}

/// Direct children of `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|entry| {
            let child: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(format!("/proc/{child}/stat")).ok()?;
            // The fields after the command name, which is in parentheses and may hold spaces.
            let after = stat.rsplit_once(')')?.1;
            let ppid: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == pid).then_some(child)
        })
        .collect()
}
