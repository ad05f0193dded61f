//! Plain HTTP/1.1 to the relay's endpoint (and to a test's Prometheus), as read off the wire, so a test sees
//! exactly what a probe or a scraper gets.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTP/1.1 response.
pub struct HttpResponse {
    pub status: u16,
    /// The status line and the headers.
    pub head: String,
    pub body: String,
}

/// `method path` to 127.0.0.1:`port`, with `Connection: close`; `None` while nothing answers.
pub async fn http(port: u16, method: &str, path: &str) -> Option<HttpResponse> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let request = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let chunked = head.lines().any(|line| line.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked { unchunked(body)? } else { body.to_owned() };
    Some(HttpResponse { status, head: head.to_owned(), body })
}

/// A chunked body's content: `<size in hex>\r\n<data>\r\n` until a chunk of size 0.
fn unchunked(mut body: &str) -> Option<String> {
    let mut content = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(content);
        }
        content.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}
