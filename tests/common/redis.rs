//! Redis for the leader tests: commands on any server, and a `redis-server` of a test's own on a free loopback
//! port that the test may kill -9, freeze (SIGSTOP) and start again without touching the shared one on 6379.
//! Keys on the shared server are per test (`test:<uuid>:…`).
// Each includer uses its own subset of these helpers.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use redis::aio::MultiplexedConnection;

/// How long a (re)started server may take to accept connections.
const STARTUP: Duration = Duration::from_secs(30);

/// A connection to `url`.
pub async fn connect(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).unwrap_or_else(|err| panic!("{url} is not a Redis URL: {err}"));
    client.get_multiplexed_async_connection().await.unwrap_or_else(|err| panic!("connect {url}: {err}"))
}

/// Runs one command, panicking with its name when it fails.
pub async fn query<T: redis::FromRedisValue>(connection: &mut MultiplexedConnection, cmd: &redis::Cmd) -> T {
    cmd.query_async(connection).await.unwrap_or_else(|err| panic!("redis command failed: {err}"))
}

/// `GET key`.
pub async fn get(connection: &mut MultiplexedConnection, key: &str) -> Option<String> {
    query(connection, redis::cmd("GET").arg(key)).await
}

/// `PTTL key`: milliseconds left, -1 without expiry, -2 when the key does not exist.
pub async fn pttl(connection: &mut MultiplexedConnection, key: &str) -> i64 {
    query(connection, redis::cmd("PTTL").arg(key)).await
}

/// `DEL key`.
pub async fn del(connection: &mut MultiplexedConnection, key: &str) {
    let _: i64 = query(connection, redis::cmd("DEL").arg(key)).await;
}

/// `SET key value NX EX seconds`, as Qx's `DistributedLock.acquire` does; whether it was set.
pub async fn set_nx_ex(connection: &mut MultiplexedConnection, key: &str, value: &str, seconds: u64) -> bool {
    let set: Option<String> =
        query(connection, redis::cmd("SET").arg(key).arg(value).arg("NX").arg("EX").arg(seconds)).await;
    set.is_some()
}

/// A `redis-server` without persistence, so a restart forgets every key, as a crashed cache would.
pub struct PrivateRedis {
    pub port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts one on a free loopback port.
    pub async fn start() -> Self {
        let port =
            TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().expect("port").port();
        let mut server = Self { port, child: None };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port, empty; returns when it answers PING.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "redis-server already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + STARTUP;
        loop {
            if let Ok(client) = redis::Client::open(self.url()) {
                if let Ok(mut connection) = client.get_multiplexed_async_connection().await {
                    if redis::cmd("PING").query_async::<String>(&mut connection).await.is_ok() {
                        return;
                    }
                }
            }
            assert!(tokio::time::Instant::now() < deadline, "redis-server did not answer on {}", self.port);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL: the server and every key are gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP: connections stay open but nothing answers, as with a hung server or a partition.
    pub fn freeze(&self) {
        self.signal("STOP");
    }

    /// SIGCONT after [`Self::freeze`].
    pub fn thaw(&self) {
        self.signal("CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis-server running").id();
        let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{signal} {pid}");
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too.
        self.kill9();
    }
}
