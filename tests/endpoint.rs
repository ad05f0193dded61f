//! The HTTP endpoint of a running relay against clients that misbehave: slow ones that never finish their
//! headers, more connections than it serves, a process out of file descriptors, methods other than GET and HEAD.

#[path = "common/cluster.rs"]
mod cluster;
mod common;

use std::process::Command;
use std::time::Duration;

use cluster::free_port;
use common::{http, Relay, TestDb};
use futures::future::join_all;
use qx_relay::relay::endpoint::MAX_CONNECTIONS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A relay serving its endpoint on a free port, once connected to Postgres and NATS (`/readyz`).
async fn relay_with_endpoint(db: &TestDb) -> (Relay, u16) {
    let port = free_port();
    let relay = Relay::spawn(&Relay::env(db, "endpoint"), &["--metrics-addr", &format!("127.0.0.1:{port}")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while http(port, "GET", "/readyz").await.is_none_or(|response| response.status != 200) {
        assert!(Instant::now() < deadline, "the endpoint did not answer:\n{}", relay.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

/// The relay's CPU time so far (user + system), from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read the relay's stat");
    // The fields after the command name, which is in parentheses and may hold spaces; utime and stime are
    // fields 14 and 15 of the line.
    let fields: Vec<&str> = stat.rsplit_once(')').expect("stat line").1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    let output = Command::new("getconf").arg("CLK_TCK").output().expect("run getconf");
    let per_second: u64 = String::from_utf8_lossy(&output.stdout).trim().parse().expect("CLK_TCK");
    Duration::from_millis(ticks * 1000 / per_second)
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
    db.drop().await;
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
    db.drop().await;
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
    db.drop().await;
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
    db.drop().await;
}
