//! Commands on the keys of any Redis server, to look at a leader lock or take it as another holder would.

use redis::aio::MultiplexedConnection;

/// A connection to one server.
pub struct RedisKeys {
    connection: MultiplexedConnection,
}

impl RedisKeys {
    pub async fn connect(url: &str) -> Self {
        let client = redis::Client::open(url).unwrap_or_else(|err| panic!("{url} is not a Redis URL: {err}"));
        let connection = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|err| panic!("connect {url}: {err}"));
        Self { connection }
    }

    /// Runs one command, panicking with the server's error when it fails.
    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> T {
        cmd.query_async(&mut self.connection)
            .await
            .unwrap_or_else(|err| panic!("redis command failed: {err}"))
    }

    /// `GET key`.
    pub async fn get(&mut self, key: &str) -> Option<String> {
        self.query(redis::cmd("GET").arg(key)).await
    }

    /// `PTTL key`: milliseconds left, -1 without expiry, -2 when the key does not exist.
    pub async fn pttl(&mut self, key: &str) -> i64 {
        self.query(redis::cmd("PTTL").arg(key)).await
    }

    /// `DEL key`.
    pub async fn del(&mut self, key: &str) {
        let _: i64 = self.query(redis::cmd("DEL").arg(key)).await;
    }

    /// `SET key value NX EX seconds`, as Qx's `DistributedLock.acquire` does; whether it was set.
    pub async fn set_nx_ex(&mut self, key: &str, value: &str, seconds: u64) -> bool {
        let set: Option<String> =
            self.query(redis::cmd("SET").arg(key).arg(value).arg("NX").arg("EX").arg(seconds)).await;
        set.is_some()
    }
}
