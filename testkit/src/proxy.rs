//! A TCP proxy a test can pause: while paused it forwards nothing either way and the bytes wait, as in a
//! partition that later heals. It can also delay each direction, as a network in between would.

use std::cmp::Ordering as Order;
use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Chunks a delayed direction holds before it stops reading: far more than the bytes in flight of a
/// loopback-fast link at these delays, so only a peer that stops reading holds the sender back.
const DELAYED_CHUNKS: usize = 1024;

/// Forwards 127.0.0.1:`port` to its target until dropped.
pub struct Proxy {
    port: u16,
    paused: Arc<AtomicBool>,
    stop: CancellationToken,
    delivered: Arc<Delivered>,
}

impl Proxy {
    /// One to the `host:port` of `url` (`scheme://[user@]host:port/...`), forwarding at once.
    pub async fn start(url: &str) -> Self {
        Self::start_delayed(url, Duration::ZERO).await
    }

    /// One that holds what it reads for `one_way` before writing it on, in each direction, while it goes on
    /// reading: a latency, not a bandwidth limit. A request and its answer take `2 × one_way` more.
    pub async fn start_delayed(url: &str, one_way: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let (paused, stop) = (Arc::new(AtomicBool::new(false)), CancellationToken::new());
        let delivered = Arc::new(Delivered::default());
        let target = host_port(url).to_owned();
        let (accept_paused, accept_stop, accept_delivered) =
            (paused.clone(), stop.clone(), delivered.clone());
        // Tokio's timer fires on millisecond ticks (a 1 ms sleep lasts 2 ms on average); a thread's sleep is
        // precise to tens of microseconds.
        let clock = (!one_way.is_zero()).then(Clock::start);
        tokio::spawn(async move {
            loop {
                let inbound = tokio::select! {
                    () = accept_stop.cancelled() => return,
                    accepted = listener.accept() => accepted.expect("accept").0,
                };
                let Ok(outbound) = TcpStream::connect(&target).await else { continue };
                // Small writes (a request, a PubAck) go out when the delay says, not when Nagle does.
                let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                let (in_read, in_write) = inbound.into_split();
                let (out_read, out_write) = outbound.into_split();
                for (read, write) in [(in_read, out_write), (out_read, in_write)] {
                    let (paused, stop) = (accept_paused.clone(), accept_stop.clone());
                    match &clock {
                        None => {
                            tokio::spawn(pump(read, write, paused, stop));
                        }
                        Some(clock) => {
                            let (chunks, queue) = mpsc::channel(DELAYED_CHUNKS);
                            tokio::spawn(hold(read, chunks, paused.clone(), stop.clone()));
                            let (clock, delivered) = (clock.clone(), accept_delivered.clone());
                            let delay = Delay { one_way, clock, delivered };
                            tokio::spawn(deliver(queue, write, delay, paused, stop));
                        }
                    }
                }
            }
        });
        Self { port, paused, stop, delivered }
    }

    /// The proxy's address as a `scheme` URL.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `url` with its `host:port` replaced by the proxy's, user, path and query kept.
    pub fn url_through(&self, url: &str) -> String {
        let target = host_port(url);
        let at = url.find(target).expect("host:port is part of the URL");
        format!("{}127.0.0.1:{}{}", &url[..at], self.port, &url[at + target.len()..])
    }

    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    pub fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }

    /// The mean time a delayed chunk spent in the proxy, from its read to its write, over all chunks so far;
    /// `None` before the first (or without a delay).
    pub fn mean_delay(&self) -> Option<Duration> {
        let chunks = self.delivered.chunks.load(Ordering::Relaxed);
        let nanos = self.delivered.nanos.load(Ordering::Relaxed);
        (chunks > 0).then(|| Duration::from_nanos(nanos / chunks))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// `host:port` of `scheme://[user[:password]@]host:port[/path][?query]`.
fn host_port(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?']).next().expect("host:port");
    authority.rsplit_once('@').map_or(authority, |(_, host_port)| host_port)
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
        let Some(n) = next_read(&mut read, &mut buffer, &stop).await else { return };
        if !wait_while_paused(&paused, &stop).await {
            return;
        }
        if write.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}

/// The number of bytes `read` gives into `buffer` next: `None` at its end, on an error, or once `stop` fires.
async fn next_read(read: &mut OwnedReadHalf, buffer: &mut [u8], stop: &CancellationToken) -> Option<usize> {
    let read = tokio::select! {
        () = stop.cancelled() => return None,
        read = read.read(buffer) => read,
    };
    match read {
        Ok(n @ 1..) => Some(n),
        _ => None,
    }
}

/// Whether `stop` did not come while `paused` held.
async fn wait_while_paused(paused: &AtomicBool, stop: &CancellationToken) -> bool {
    while paused.load(Ordering::SeqCst) {
        tokio::select! {
            () = stop.cancelled() => return false,
            () = tokio::time::sleep(Duration::from_millis(5)) => {}
        }
    }
    true
}

/// A chunk read at `read_at`, to be written one delay later.
struct Chunk {
    read_at: Instant,
    bytes: Vec<u8>,
}

/// Reads `read` into chunks stamped with their read time, holding them while `paused`. Its end (EOF, an
/// error, a stop) closes `chunks`, so the writer shuts its side down once the held chunks are out.
async fn hold(
    mut read: OwnedReadHalf,
    chunks: mpsc::Sender<Chunk>,
    paused: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut buffer = vec![0; 64 * 1024];
    loop {
        let Some(n) = next_read(&mut read, &mut buffer, &stop).await else { return };
        let mut read_at = Instant::now();
        if paused.load(Ordering::SeqCst) {
            if !wait_while_paused(&paused, &stop).await {
                return;
            }
            // Held back by the partition: the delay starts when it heals.
            read_at = Instant::now();
        }
        if chunks.send(Chunk { read_at, bytes: buffer[..n].to_vec() }).await.is_err() {
            return;
        }
    }
}

/// One direction's delay: how long, the clock it waits with, where it counts what it delivered.
struct Delay {
    one_way: Duration,
    clock: Clock,
    delivered: Arc<Delivered>,
}

/// Writes each chunk of `queue` to `write` once `delay.one_way` has passed since its read, in order; chunks
/// due by then go out in the same write.
async fn deliver(
    mut queue: mpsc::Receiver<Chunk>,
    mut write: OwnedWriteHalf,
    delay: Delay,
    paused: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let mut next: Option<Chunk> = None;
    let mut read_at = Vec::new();
    loop {
        let chunk = match next.take() {
            Some(chunk) => chunk,
            None => tokio::select! {
                () = stop.cancelled() => return,
                chunk = queue.recv() => match chunk {
                    Some(chunk) => chunk,
                    None => return,
                },
            },
        };
        let due = chunk.read_at + delay.one_way;
        if Instant::now() < due {
            tokio::select! {
                () = stop.cancelled() => return,
                () = delay.clock.sleep_until(due) => {}
            }
        }
        if !wait_while_paused(&paused, &stop).await {
            return;
        }
        read_at.clear();
        read_at.push(chunk.read_at);
        let mut bytes = chunk.bytes;
        while let Ok(chunk) = queue.try_recv() {
            if chunk.read_at + delay.one_way > Instant::now() {
                next = Some(chunk);
                break;
            }
            read_at.push(chunk.read_at);
            bytes.extend_from_slice(&chunk.bytes);
        }
        if write.write_all(&bytes).await.is_err() {
            return;
        }
        read_at.iter().for_each(|at| delay.delivered.count(at.elapsed()));
    }
}

/// Chunks delivered by the delayed directions and the time they spent in the proxy.
#[derive(Default)]
struct Delivered {
    chunks: AtomicU64,
    nanos: AtomicU64,
}

impl Delivered {
    fn count(&self, held: Duration) {
        self.chunks.fetch_add(1, Ordering::Relaxed);
        self.nanos.fetch_add(u64::try_from(held.as_nanos()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// Wakes tasks at an instant from a thread of its own; the thread ends with the last handle.
#[derive(Clone)]
struct Clock {
    wakes: std_mpsc::Sender<Wake>,
}

/// A task to wake at `at`; `sequence` orders equal instants.
struct Wake {
    at: Instant,
    sequence: u64,
    task: oneshot::Sender<()>,
}

impl Ord for Wake {
    /// Reversed, so the heap's top is the soonest.
    fn cmp(&self, other: &Self) -> Order {
        (other.at, other.sequence).cmp(&(self.at, self.sequence))
    }
}

impl PartialOrd for Wake {
    fn partial_cmp(&self, other: &Self) -> Option<Order> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Wake {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Order::Equal
    }
}

impl Eq for Wake {}

impl Clock {
    fn start() -> Self {
        let (wakes, requests) = std_mpsc::channel::<Wake>();
        std::thread::Builder::new()
            .name("proxy-clock".to_owned())
            .spawn(move || {
                let mut due = BinaryHeap::<Wake>::new();
                let mut sequence = 0;
                loop {
                    let now = Instant::now();
                    while due.peek().is_some_and(|wake| wake.at <= now) {
                        let wake = due.pop().expect("peeked");
                        let _ = wake.task.send(());
                    }
                    let request = match due.peek() {
                        Some(next) => match requests.recv_timeout(next.at - now) {
                            Ok(request) => request,
                            Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
                            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                        },
                        None => match requests.recv() {
                            Ok(request) => request,
                            Err(_) => return,
                        },
                    };
                    sequence += 1;
                    due.push(Wake { sequence, ..request });
                }
            })
            .expect("start the proxy's clock");
        Self { wakes }
    }

    /// Returns at `at` or just after.
    async fn sleep_until(&self, at: Instant) {
        let (task, woken) = oneshot::channel();
        if self.wakes.send(Wake { at, sequence: 0, task }).is_ok() {
            let _ = woken.await;
        }
        // Without the clock (gone with the proxy), tokio's timer still keeps the delay.
        if Instant::now() < at {
            tokio::time::sleep_until(at.into()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback; its address.
    async fn echo_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind echo server");
        let address = listener.local_addr().expect("echo address");
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = vec![0; 1024];
                    while let Ok(n @ 1..) = socket.read(&mut buffer).await {
                        if socket.write_all(&buffer[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        format!("tcp://{address}")
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime")
    }

    /// Sends one byte and waits for its echo; how long that took.
    async fn round_trip(socket: &mut TcpStream, byte: u8) -> Duration {
        let started = Instant::now();
        socket.write_all(&[byte]).await.expect("send");
        let mut echo = [0];
        socket.read_exact(&mut echo).await.expect("echo");
        assert_eq!(echo[0], byte);
        started.elapsed()
    }

    #[test]
    fn a_delayed_round_trip_takes_twice_the_one_way_delay_and_pipelined_ones_overlap() {
        runtime().block_on(async {
            let one_way = Duration::from_millis(20);
            let proxy = Proxy::start_delayed(&echo_server().await, one_way).await;
            let mut socket =
                TcpStream::connect(proxy.url("tcp").trim_start_matches("tcp://")).await.expect("connect");
            socket.set_nodelay(true).expect("nodelay");
            for byte in 0..5 {
                let took = round_trip(&mut socket, byte).await;
                assert!(took >= 2 * one_way, "round trip {took:?}, under 2 × {one_way:?}");
                // Loose: a busy machine may be late, but not by another round trip.
                assert!(took < 4 * one_way, "round trip {took:?}, far above 2 × {one_way:?}");
            }
            // Ten requests 5 ms apart: a latency lets them overlap (the last answer comes about 2 × one_way
            // after the last request), where a link carrying one at a time would take ten round trips.
            let started = Instant::now();
            let (mut reader, mut writer) = socket.into_split();
            let sending = tokio::spawn(async move {
                for byte in 0..10u8 {
                    writer.write_all(&[byte]).await.expect("send");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                writer
            });
            let mut echoes = [0; 10];
            reader.read_exact(&mut echoes).await.expect("echoes");
            let took = started.elapsed();
            let _writer = sending.await.expect("sender");
            assert_eq!(echoes, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
            assert!(took >= 2 * one_way + Duration::from_millis(45), "ten overlapping requests in {took:?}");
            // One at a time would be 20 × one_way; half of that is far above any scheduling delay.
            assert!(took < 10 * one_way, "ten requests 5 ms apart took {took:?}: not overlapping");
            let mean = proxy.mean_delay().expect("chunks delivered");
            assert!(mean >= one_way && mean < one_way + Duration::from_millis(10), "mean delay {mean:?}");
        });
    }

    #[test]
    fn an_undelayed_proxy_forwards_at_once_and_holds_bytes_while_paused() {
        runtime().block_on(async {
            let proxy = Proxy::start(&echo_server().await).await;
            let mut socket =
                TcpStream::connect(proxy.url("tcp").trim_start_matches("tcp://")).await.expect("connect");
            assert!(round_trip(&mut socket, 1).await < Duration::from_millis(20));
            proxy.pause();
            socket.write_all(&[2]).await.expect("send");
            let mut echo = [0];
            let held = tokio::time::timeout(Duration::from_millis(100), socket.read_exact(&mut echo)).await;
            assert!(held.is_err(), "an echo came through a paused proxy");
            proxy.resume();
            socket.read_exact(&mut echo).await.expect("echo after resume");
            assert_eq!(echo[0], 2);
            assert!(proxy.mean_delay().is_none());
        });
    }

    #[test]
    fn urls_keep_their_user_path_and_query() {
        assert_eq!(host_port("postgres://postgres@127.0.0.1:5432/db?application_name=x"), "127.0.0.1:5432");
        assert_eq!(host_port("redis://127.0.0.1:6379?protocol=resp3"), "127.0.0.1:6379");
        assert_eq!(host_port("nats://127.0.0.1:4222"), "127.0.0.1:4222");
    }

    #[test]
    fn a_url_through_the_proxy_names_the_proxy_only() {
        runtime().block_on(async {
            let proxy = Proxy::start("postgres://127.0.0.1:5432").await;
            let through = proxy.url_through("postgres://postgres@127.0.0.1:5432/db?application_name=x");
            assert_eq!(
                through,
                format!("postgres://postgres@127.0.0.1:{}/db?application_name=x", proxy.port)
            );
        });
    }
}
