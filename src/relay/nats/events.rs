//! What happens to the NATS connection, logged with the server it concerns: a lost connection and each failed
//! reconnect with a new reason at warn (with the client's error), the same failure again at debug, the
//! connection back at info. async-nats' own lines stay at warn: at debug it writes one line per message, and it names a
//! server by its port alone.
//!
//! To know which server each reconnect tries, the relay picks it (the client's own rule: fewest failed
//! attempts first, here in turn among equals instead of at random); the first connection keeps the client's
//! rule, and the server it reached is read from the client's pool afterwards.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{ClientError, Event, ReconnectToServer, Server, ServerAddr};
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

/// Servers named in lines: `host:port`, as configured or discovered (never with credentials: the client is
/// given the URLs without them).
fn address(addr: &ServerAddr) -> String {
    format!("{}:{}", addr.host(), addr.port())
}

/// The connection's story so far, shared by the client's two callbacks and the relay.
#[derive(Debug, Default)]
pub struct ConnectionLog {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The server connected to, or being tried.
    server: Option<ServerAddr>,
    /// The server of the connection made last: the one a loss is of. The client may ask for the next server
    /// to try before it tells of the loss.
    connected_to: Option<ServerAddr>,
    /// Whether the first connection was made; reconnects are chosen by us from then on.
    connected: bool,
    /// When the connection was lost, while it is.
    down_since: Option<Instant>,
    /// Failed reconnects in this outage.
    failures: u32,
    /// The last failed reconnect of this outage: the server and the client's error.
    last_failure: Option<(String, String)>,
    /// Turns taken among equally good servers.
    turn: usize,
}

impl ConnectionLog {
    /// A log for a client about to connect.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The first connection is made: remembers the server, which the client's pool shows as the only one
    /// connected to so far.
    pub async fn connected(&self, client: &async_nats::Client) {
        let pool = tokio::time::timeout(Duration::from_secs(1), client.server_pool()).await;
        let server = match pool {
            Ok(Ok(pool)) => pool.into_iter().find(|server| server.did_connect).map(|server| server.addr),
            _ => None,
        };
        let mut state = self.lock();
        state.connected = true;
        state.connected_to.clone_from(&server);
        state.server = server;
    }

    /// The server connected to, as `host:port`.
    pub fn server(&self) -> String {
        self.lock().server.as_ref().map_or_else(|| "?".to_owned(), address)
    }

    /// Why the last reconnect of this outage failed, naming the server; `None` while none has.
    pub fn last_failure(&self) -> Option<String> {
        let state = self.lock();
        state.last_failure.as_ref().map(|(server, error)| format!("reconnecting to {server} failed: {error}"))
    }

    /// The client's reconnect callback: logs why the last attempt failed, then picks the next server. `None`
    /// before the first connection, which the client makes by its own rule (trying every server in one go).
    pub fn next_server(&self, pool: &[Server]) -> Option<ReconnectToServer> {
        let mut state = self.lock();
        if !state.connected {
            return None;
        }
        let failed = state.server.as_ref().and_then(|tried| pool.iter().find(|server| server.addr == *tried));
        if let Some(Server { addr, last_error: Some(error), failed_attempts, .. }) = failed {
            if *failed_attempts > 0 {
                state.failures += 1;
                let (server, error) = (address(addr), error.to_string());
                // A new reason (refused, then credentials rejected after a rotation) is news; the same again is not.
                let news = state.last_failure.as_ref().is_none_or(|(_, last)| *last != error);
                if news {
                    warn!(%server, %error, "NATS reconnect failed; retrying (the same failure again at debug)");
                } else {
                    debug!(%server, %error, failures = state.failures, "NATS reconnect failed; retrying");
                }
                state.last_failure = Some((server, error));
            }
        }
        let next = choose(pool, state.turn)?.addr.clone();
        state.turn = state.turn.wrapping_add(1);
        state.server = Some(next.clone());
        Some(ReconnectToServer { addr: next, delay: None })
    }

    /// The client's event callback.
    pub fn event(&self, event: Event) {
        let mut state = self.lock();
        let server = state.server.as_ref().map_or_else(|| "?".to_owned(), address);
        match event {
            Event::Connected if state.connected => {
                state.connected_to = state.server.clone();
                if let Some(since) = state.down_since.take() {
                    let down_for = humantime::format_duration(round_to_ms(since.elapsed()));
                    info!(%server, %down_for, failed_attempts = state.failures, "NATS connection back");
                }
                state.failures = 0;
                state.last_failure = None;
            }
            // The first connection; the relay logs it.
            Event::Connected => {}
            Event::Disconnected => {
                state.down_since.get_or_insert_with(Instant::now);
                let lost = state.connected_to.as_ref().map_or(server, address);
                warn!(server = %lost, "NATS connection lost; reconnecting");
            }
            Event::LameDuckMode => warn!(
                %server,
                "NATS server entering lame duck mode (shutting down): publishing goes on until it closes the \
                 connection, then the client reconnects to another server"
            ),
            Event::ServerError(err) => warn!(%server, error = %err, "NATS server error"),
            Event::SlowConsumer(_) => {
                warn!("the NATS client dropped messages for a slow subscription (PubAcks among them are retried)")
            }
            Event::ClientError(ClientError::MaxReconnects) => {
                error!(%server, "NATS client gave up reconnecting (nats.max_reconnect_attempts)")
            }
            other => debug!(%server, event = %other, "NATS client event"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while logging leaves nothing half-written worth refusing.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The server to try next: the fewest failed attempts, as the client's own rule, taking turns among equals.
fn choose(pool: &[Server], turn: usize) -> Option<&Server> {
    let fewest = pool.iter().map(|server| server.failed_attempts).min()?;
    let best: Vec<&Server> = pool.iter().filter(|server| server.failed_attempts == fewest).collect();
    Some(best[turn % best.len()])
}

fn round_to_ms(duration: Duration) -> Duration {
    Duration::from_millis(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(url: &str, failed_attempts: usize) -> Server {
        Server {
            addr: url.parse().unwrap(),
            failed_attempts,
            did_connect: true,
            is_discovered: false,
            last_error: None,
        }
    }

    #[test]
    fn reconnects_go_to_the_least_failed_servers_in_turn() {
        let pool = [server("nats://a:4222", 2), server("nats://b:4222", 0), server("nats://c:4222", 0)];
        let picks: Vec<String> = (0..4).map(|turn| address(&choose(&pool, turn).unwrap().addr)).collect();
        assert_eq!(picks, ["b:4222", "c:4222", "b:4222", "c:4222"]);
        assert!(choose(&[], 0).is_none());
    }
}
