//! The HTTP endpoint of a running relay against clients that misbehave: slow ones that never finish their
//! headers, more connections than it serves, a process out of file descriptors, methods other than GET and HEAD.

use std::process::Command;
use std::time::Duration;

use futures::future::join_all;
use qx_relay::relay::endpoint::MAX_CONNECTIONS;
use qx_relay_testkit::proc::cpu_seconds;
use qx_relay_testkit::{http, Relay, RelayEnv, TestDb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A relay serving its endpoint on a free port, once connected to Postgres and NATS (`/readyz`).
async fn relay_with_endpoint(db: &TestDb) -> (Relay, u16) {
    let (relay, port) = Relay::spawn_serving(&RelayEnv::new(db, "endpoint"));
    let ready =
        || async { http(port, "GET", "/readyz").await.is_some_and(|response| response.status == 200) };
    relay.eventually("the endpoint to answer", Duration::from_secs(30), ready).await;
    (relay, port)
}

/// A connection that sends the start of a request whose headers never end.
async fn slow_client(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.expect("connect to the endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .expect("send partial headers");
    stream
}

/// When the server closed `stream` (end of file or reset), or `None` if it was still open at `deadline`.
async fn closed_at(mut stream: TcpStream, deadline: Instant) -> Option<Instant> {
    let mut buffer = [0; 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buffer)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(Instant::now()),
            Ok(Ok(_)) => {} // an error response before the close
        }
    }
}

/// The relay's CPU time so far (user + system).
fn cpu_time(pid: u32) -> Duration {
    Duration::from_secs_f64(cpu_seconds(pid).expect("the relay's CPU time"))
}

/// The soft limit on open files of `pid`.
fn open_files_limit(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("read the relay's limits");
    let line = limits.lines().find(|line| line.starts_with("Max open files")).expect("an open files limit");
    line["Max open files".len()..]
        .split_whitespace()
        .next()
        .and_then(|soft| soft.parse().ok())
        .expect("a number")
}

/// Sets the soft limit on open files of `pid`.
fn set_open_files_limit(pid: u32, soft: u64) {
    let status = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .status()
        .expect("run prlimit (util-linux)");
    assert!(status.success(), "prlimit --nofile={soft}: for {pid}");
}

#[tokio::test]
async fn slow_clients_are_closed_while_metrics_keep_answering() {
    let db = TestDb::create().await;
    let (relay, port) = relay_with_endpoint(&db).await;
    let slow_count = 200;
    let opened = Instant::now();
    let mut slow = Vec::new();
    for _ in 0..slow_count {
        slow.push(slow_client(port).await);
    }

    let asked = Instant::now();
    let metrics = http(port, "GET", "/metrics").await;
    let latency = asked.elapsed();
    assert_eq!(metrics.map(|response| response.status), Some(200), "/metrics with {slow_count} slow clients");
    assert!(latency < Duration::from_secs(1), "/metrics took {latency:?} with {slow_count} slow clients");

    let deadline = opened + Duration::from_secs(15);
    let closed: Vec<Instant> = join_all(slow.into_iter().map(|stream| closed_at(stream, deadline)))
        .await
        .into_iter()
        .flatten()
        .collect();
    let last = closed.iter().max().map(|at| at.duration_since(opened));
    eprintln!(
        "{} of {slow_count} slow clients closed within 15 s (the last {last:?} after the first connected); \
         /metrics answered in {latency:?}",
        closed.len()
    );
    assert!(closed.len() * 10 >= slow_count * 9, "only {} of {slow_count} slow clients closed", closed.len());
    relay.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let db = TestDb::create().await;
    let (relay, port) = relay_with_endpoint(&db).await;
    let mut served = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        served.push(slow_client(port).await);
    }
    let mut extra = Vec::new();
    for _ in 0..20 {
        extra.push(slow_client(port).await);
    }
    // Well before the header timeout could close anything.
    let deadline = Instant::now() + Duration::from_secs(2);
    let extra_closed = join_all(extra.into_iter().map(|stream| closed_at(stream, deadline))).await;
    assert!(
        extra_closed.iter().all(Option::is_some),
        "every connection beyond {MAX_CONNECTIONS} closed at once"
    );
    let soon = Instant::now() + Duration::from_millis(100);
    let served_closed = join_all(served.into_iter().map(|stream| closed_at(stream, soon))).await;
    assert!(served_closed.iter().all(Option::is_none), "the first {MAX_CONNECTIONS} are still served");
    relay.stop().await;
}

#[tokio::test]
async fn out_of_file_descriptors_the_accept_loop_pauses_instead_of_spinning() {
    let db = TestDb::create().await;
    let (relay, port) = relay_with_endpoint(&db).await;
    let pid = relay.pid();
    let open: Vec<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the relay's descriptors")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    // Room for two more descriptors (a new one takes the lowest free number, and must stay below the limit);
    // the connections beyond them wait in the listen backlog, and every accept fails with EMFILE.
    let second_free = (0..).filter(|fd| !open.contains(fd)).nth(1).expect("free descriptor numbers");
    let limit = open_files_limit(pid);
    set_open_files_limit(pid, second_free + 1);
    let mut waiting = Vec::new();
    for _ in 0..20 {
        waiting.push(TcpStream::connect(("127.0.0.1", port)).await.expect("connect to the backlog"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (before, measured) = (cpu_time(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy = (cpu_time(pid) - before).as_secs_f64() / measured.elapsed().as_secs_f64();
    eprintln!("relay CPU while out of descriptors: {:.0} % of a core", busy * 100.0);
    assert!(busy < 0.25, "the accept loop spins: {:.0} % of a core", busy * 100.0);
    let log = relay.log();
    assert_eq!(log.matches("cannot accept connections").count(), 1, "warned once:\n{log}");

    set_open_files_limit(pid, limit);
    drop(waiting);
    let asked = Instant::now();
    let metrics = http(port, "GET", "/metrics").await;
    let status = metrics.map(|response| response.status);
    assert_eq!(status, Some(200), "answers again once descriptors are free:\n{}", relay.log());
    assert!(asked.elapsed() < Duration::from_secs(2), "answered after {:?}", asked.elapsed());
    relay.stop().await;
}

#[tokio::test]
async fn only_get_and_head_are_served() {
    let db = TestDb::create().await;
    let (relay, port) = relay_with_endpoint(&db).await;
    for (method, path) in [("POST", "/metrics"), ("DELETE", "/livez"), ("PUT", "/readyz")] {
        let response = http(port, method, path).await.expect("an answer");
        assert_eq!(response.status, 405, "{method} {path}: {}", response.head);
        assert!(response.head.to_lowercase().contains("\r\nallow: get, head"), "{method}: {}", response.head);
    }
    let head = http(port, "HEAD", "/metrics").await.expect("an answer");
    assert_eq!((head.status, head.body.as_str()), (200, ""), "HEAD: headers only");
    let get = http(port, "GET", "/metrics").await.expect("an answer");
    assert_eq!(get.status, 200);
    assert!(!get.body.is_empty(), "GET /metrics has a body");
    relay.stop().await;
}
