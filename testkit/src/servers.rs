//! Servers of a run's own for fault tests and the chaos check: a `nats-server -js`, a `redis-server` and a
//! Postgres cluster, each on a free loopback port with its data in a temporary directory, so a run can kill -9,
//! freeze (SIGSTOP) and restart them without touching the shared services on 4222, 6379 and 5432.

use std::fs;
use std::marker::PhantomData;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use uuid::Uuid;

use crate::proc::children_of;
use crate::wait::eventually;

/// How long a (re)started server may take to accept connections.
const STARTUP: Duration = Duration::from_secs(30);

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

/// A fresh directory under the system temp dir.
pub(crate) fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qxr-{kind}-{}", Uuid::new_v4().simple()));
    fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// Sends `signal` to `pid` with kill(1); whether it was delivered.
pub(crate) fn signal(pid: u32, signal: &str) -> bool {
    Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Waits until something accepts TCP connections on `port`.
async fn wait_for_port(port: u16, what: &str) {
    eventually(&format!("{what} to listen on {port}"), STARTUP, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;
}

/// A server program run on a port of its own, restartable with the same arguments; its output goes to
/// `server.log` in its directory, which goes on drop. [`NatsServer`] and [`RedisServer`] say which program.
pub struct PrivateServer<P> {
    pub port: u16,
    dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    program: PhantomData<P>,
}

/// `nats-server`, for [`PrivateServer`].
pub enum Nats {}
/// `redis-server`, for [`PrivateServer`].
pub enum Redis {}

/// A `nats-server` of a run's own, JetStream on unless asked otherwise; its store survives restarts.
pub type NatsServer = PrivateServer<Nats>;
/// A `redis-server` of a run's own without persistence: a restart forgets every key, as a crashed cache would.
pub type RedisServer = PrivateServer<Redis>;

/// What differs between the programs.
pub trait Program {
    const NAME: &'static str;
    const SCHEME: &'static str;
}

impl Program for Nats {
    const NAME: &'static str = "nats-server";
    const SCHEME: &'static str = "nats";
}

impl Program for Redis {
    const NAME: &'static str = "redis-server";
    const SCHEME: &'static str = "redis";
}

impl<P: Program> PrivateServer<P> {
    async fn start_on(port: u16, dir: PathBuf, args: Vec<String>) -> Self {
        let mut server = Self { port, dir, args, child: None, program: PhantomData };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", P::SCHEME, self.port)
    }

    fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Makes later (re)starts pass `new` where they passed `old`: a rotated password, another certificate.
    pub fn replace_arg(&mut self, old: &str, new: &str) {
        let arg = self.args.iter_mut().find(|arg| *arg == old).unwrap_or_else(|| panic!("no argument {old}"));
        *arg = new.to_owned();
    }

    /// Starts it again (same port, same data) unless it runs; returns when it accepts connections.
    pub async fn restart(&mut self) {
        if self.is_running() {
            return;
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .expect("open the server's log");
        let child = Command::new(P::NAME)
            .args(&self.args)
            .stdout(log.try_clone().expect("the server's log, twice"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|err| panic!("start {} (is it installed?): {err}", P::NAME));
        self.child = Some(child);
        wait_for_port(self.port, P::NAME).await;
    }

    /// SIGTERM, then up to 10 s for it to exit before a SIGKILL.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        signal(child.id(), "TERM");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGSTOP: connections stay open but nothing answers, as with a hung server or a partition.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`Self::freeze`].
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    /// SIGUSR2: a `nats-server` enters lame duck mode (tells its clients, then closes their connections over
    /// its `lame_duck_duration`), as before a rolling upgrade.
    pub fn lame_duck(&self) {
        self.signal("USR2");
    }

    fn signal(&self, name: &str) {
        let child = self.child.as_ref().unwrap_or_else(|| panic!("{} is not running", P::NAME));
        assert!(signal(child.id(), name), "kill -{name} {}", P::NAME);
    }

    /// What it printed so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl<P> PrivateServer<P> {
    /// SIGKILL: nothing is flushed or closed. Works while frozen too.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl<P> Drop for PrivateServer<P> {
    fn drop(&mut self) {
        self.kill9();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

impl NatsServer {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// One with `args` added to every start, e.g. `--user`/`--pass` or `--tls …`.
    pub async fn start_with(args: &[&str]) -> Self {
        Self::start_as(true, args).await
    }

    /// One with JetStream off: core NATS only.
    pub async fn start_without_jetstream() -> Self {
        Self::start_as(false, &[]).await
    }

    async fn start_as(jetstream: bool, args: &[&str]) -> Self {
        let (port, dir) = (free_port(), temp_dir("nats"));
        let mut command_line =
            vec!["-a".to_owned(), "127.0.0.1".to_owned(), "-p".to_owned(), port.to_string()];
        command_line.extend(args.iter().map(|arg| (*arg).to_owned()));
        if jetstream {
            command_line.extend([
                "-js".to_owned(),
                "-sd".to_owned(),
                dir.join("store").display().to_string(),
            ]);
        }
        Self::start_on(port, dir, command_line).await
    }
}

/// A JetStream cluster of `nats-server`s on loopback: each one a [`NatsServer`] to kill, freeze and restart.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// `size` servers routed to each other, JetStream on; returns once each accepts clients (the cluster
    /// elects its meta leader shortly after).
    pub async fn start(size: usize) -> Self {
        let name = format!("qxr{}", Uuid::new_v4().simple());
        let routes: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let route_urls: Vec<String> = routes.iter().map(|port| format!("nats://127.0.0.1:{port}")).collect();
        let mut servers = Vec::with_capacity(size);
        for (index, route) in routes.iter().enumerate() {
            let server_name = format!("n{index}");
            let args = [
                "--server_name",
                &server_name,
                "--cluster_name",
                &name,
                "--cluster",
                &format!("nats://127.0.0.1:{route}"),
                "--routes",
                &route_urls.join(","),
            ];
            servers.push(NatsServer::start_with(&args).await);
        }
        Self { servers }
    }

    /// Every server's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }

    /// The server named `n<index>`, as `nats-server` reports it (a stream's leader).
    pub fn named(&mut self, name: &str) -> &mut NatsServer {
        let index: usize = name.strip_prefix('n').and_then(|n| n.parse().ok()).expect("a name n<index>");
        &mut self.servers[index]
    }
}

impl RedisServer {
    pub async fn start() -> Self {
        Self::start_with(|_| Vec::new()).await
    }

    /// One with the arguments `args` gives for its port added to every start; later arguments win, so
    /// `--port 0 --tls-port <port>` makes it a TLS-only server.
    pub async fn start_with(args: impl FnOnce(u16) -> Vec<String>) -> Self {
        let (port, dir) = (free_port(), temp_dir("redis"));
        let dir_text = dir.display().to_string();
        let mut command_line: Vec<String> = [
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            &dir_text,
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        command_line.extend(args(port));
        Self::start_on(port, dir, command_line).await
    }
}

/// A Postgres cluster of a run's own (initdb, trust auth, superuser `postgres`) managed with `pg_ctl`.
///
/// Postgres refuses to run as root; as root, its commands run as the `postgres` user, in a directory it owns.
pub struct PgCluster {
    pub port: u16,
    dir: PathBuf,
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

    fn log(&self) -> String {
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

/// Debian's PgBouncer in front of the Postgres on loopback port `postgres_port`, as a team runs it: the
/// package's settings but for the address, trust auth and what a test adds. As root it runs as `postgres`.
pub struct PgBouncer {
    pub port: u16,
    process: Spawned,
}

impl PgBouncer {
    /// Starts one with `settings` added to its `[pgbouncer]` section (`pool_mode = transaction`, …); returns
    /// when it accepts connections.
    pub async fn start(postgres_port: u16, settings: &[&str]) -> Self {
        let (port, dir) = (free_port(), temp_dir("pgbouncer"));
        let ini = format!(
            "[databases]\n* = host=127.0.0.1 port={postgres_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {dir}/userlist.txt\n\
             logfile = {dir}/pgbouncer.log\npidfile = {dir}/pgbouncer.pid\n{settings}\n",
            dir = dir.display(),
            settings = settings.join("\n"),
        );
        fs::write(dir.join("pgbouncer.ini"), ini).expect("write pgbouncer.ini");
        fs::write(dir.join("userlist.txt"), "\"postgres\" \"\"\n").expect("write userlist.txt");
        let mut command = Command::new("pgbouncer");
        if is_root() {
            let status = Command::new("chown").arg("-R").arg("postgres:").arg(&dir).status();
            assert!(status.is_ok_and(|s| s.success()), "chown {} to postgres", dir.display());
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("start pgbouncer (is it installed?): {err}"));
        wait_for_port(port, "pgbouncer").await;
        Self { port, process: Spawned { child, dir } }
    }

    /// A connection URL for `database` through it.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.process.dir.join("pgbouncer.log")).unwrap_or_default()
    }
}

/// A program a run started with a temporary directory of its own: killed, and the directory removed, on drop.
pub(crate) struct Spawned {
    pub(crate) child: Child,
    pub(crate) dir: PathBuf,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
