//! A TCP proxy a test can pause: while paused it forwards nothing either way and the bytes wait, as in a
//! partition that later heals.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Forwards 127.0.0.1:`port` to its target until dropped.
pub struct Proxy {
    port: u16,
    paused: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Proxy {
    /// One to the `host:port` of `url` (`scheme://host:port/...`).
    pub async fn start(url: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (paused, stop) = (Arc::new(AtomicBool::new(false)), CancellationToken::new());
        let (target, accept_paused, accept_stop) = (host_port(url).to_owned(), paused.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let inbound = tokio::select! {
                    () = accept_stop.cancelled() => return,
                    accepted = listener.accept() => accepted.expect("accept").0,
                };
                let Ok(outbound) = TcpStream::connect(&target).await else { continue };
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                for (read, write) in [(in_read, out_write), (out_read, in_write)] {
                    tokio::spawn(pump(read, write, accept_paused.clone(), accept_stop.clone()));
                }
            }
        });
        Self { port, paused, stop }
    }

    /// The proxy's address as a `scheme` URL.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `host:port` of `scheme://host:port/...`.
fn host_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.split('/').next().expect("host:port")
}

/// Copies `read` to `write`, holding what it read while `paused`.
async fn pump(
    mut read: OwnedReadHalf,
    mut write: OwnedWriteHalf,
    paused: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let read = tokio::select! {
            () = stop.cancelled() => return,
            read = read.read(&mut buffer) => read,
        };
        let Ok(n @ 1..) = read else { return };
        while paused.load(Ordering::SeqCst) {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        }
        if write.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
