//! The agent's observability endpoint: `/metrics` for Prometheus, `/healthz`
//! (the process is alive) and `/readyz` (the agent can do its job: catalog
//! readable, repositories reachable, and so on), served on a loopback address.
//!
//! Three read-only paths do not justify an HTTP stack in the dependency tree,
//! so this is a small HTTP/1.1 server (RFC 9112) on a bare
//! [`TcpListener`], made strict so that it stays small and hard to abuse:
//!
//! - One request per connection. Every response says `Connection: close` and
//!   carries `Content-Length`, so there is no keep-alive, pipelining or
//!   chunked encoding to get wrong. A request body is never read.
//! - The request line and headers must arrive within 5 s and fit in 8 KiB
//!   (431 otherwise); a client that is slower is dropped without an answer.
//!   Lines end in CRLF; bare CR or LF, whitespace before a header's colon,
//!   obsolete line folding, an HTTP/1.1 request without exactly one `Host`, or
//!   any other malformed head gets 400.
//! - Only `GET` and `HEAD` (405 with `Allow: GET, HEAD` otherwise); only the
//!   three paths (404 otherwise); a query string is ignored.
//! - At most 16 connections are served at once (a semaphore); a connection
//!   beyond that is closed at once rather than queued, so a flood costs
//!   nothing but the accept.
//!
//! The [`Probe`] answers read the catalog (SQLite) and may block briefly, so
//! they run on tokio's blocking pool. A connection keeps its semaphore permit
//! until its probe call returns, which also bounds how many blocking threads
//! scrapes can occupy.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// What the endpoint asks the agent for on each request. Implemented by the
/// agent's state.
pub trait Probe: Send + Sync + 'static {
    /// The Prometheus exposition text for `/metrics`.
    fn metrics(&self) -> String;
    /// The deep readiness check for `/readyz`: each named part and whether it
    /// is OK, with a detail message.
    fn readiness(&self) -> Vec<ReadinessCheck>;
}

/// One part of the readiness check, as `/readyz` reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReadinessCheck {
    /// What was checked, e.g. `catalog` or `repository home`.
    pub name: String,
    /// Whether it is fit for use.
    pub ok: bool,
    /// A human-readable explanation, above all when `ok` is false.
    pub detail: String,
}

/// Largest request head (request line, headers and the blank line) accepted.
const MAX_HEAD: usize = 8 * 1024;

/// How long to wait before retrying `accept` after an error that is not about
/// one connection, typically running out of file descriptors (EMFILE): the
/// error repeats until some descriptor is closed, and retrying at once would
/// spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// After answering, how much of a request the client is still sending (a body,
/// the rest of an oversize head) is read and thrown away before closing.
const LINGER_MAX_BYTES: usize = 64 * 1024;

const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT_CONTENT_TYPE: &str = "text/plain; charset=utf-8";
const JSON_CONTENT_TYPE: &str = "application/json";

/// The server's bounds; tests shrink them.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// Connections served at once.
    max_connections: usize,
    /// Time for the whole request head to arrive, from accept.
    head_timeout: Duration,
    /// Time to hand the whole response to the client.
    write_timeout: Duration,
    /// Time to wait for the client to close after the response (see
    /// [`linger`]).
    linger: Duration,
}

impl Limits {
    const DEFAULT: Limits = Limits {
        max_connections: 16,
        head_timeout: Duration::from_secs(5),
        write_timeout: Duration::from_secs(10),
        linger: Duration::from_secs(1),
    };
}

/// Serves until `shutdown` resolves. Returns the bound address via the
/// listener the caller passes (caller binds, so tests can bind port 0).
///
/// The caller should bind a loopback address: the endpoint has no
/// authentication, and warns if it finds itself on another one. Errors from
/// `accept` are logged and serving continues. On shutdown the listener is
/// closed and connections still in progress are cut off; `serve` returns
/// once they are gone. The only error returned is failing to read the
/// listener's own address at start, which means the listener is unusable.
pub async fn serve(
    listener: TcpListener,
    probe: Arc<dyn Probe>,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    serve_with(listener, probe, shutdown, Limits::DEFAULT).await
}

async fn serve_with(
    listener: TcpListener,
    probe: Arc<dyn Probe>,
    shutdown: impl Future<Output = ()> + Send,
    limits: Limits,
) -> io::Result<()> {
    let address = listener.local_addr()?;
    if !address.ip().is_loopback() {
        log::warn!(
            "the observability endpoint on {address} is not on a loopback address; \
             anyone who can reach it can read the agent's metrics"
        );
    }
    log::debug!("observability endpoint listening on http://{address}");

    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Reap finished connections as they end, so the set stays as
            // small as the number of connections in flight.
            Some(joined) = connections.join_next() => {
                if let Err(error) = joined {
                    if error.is_panic() {
                        log::warn!("an observability connection handler panicked: {error}");
                    }
                }
                continue;
            }
            accepted = listener.accept() => match accepted {
                Ok(connection) => connection,
                Err(error) => {
                    log::warn!("observability endpoint on {address}: accept failed: {error}");
                    if !is_connection_error(&error) {
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&permits).try_acquire_owned() else {
            log::debug!(
                "{peer}: {} observability connections already open; closing this one",
                limits.max_connections
            );
            drop(stream);
            continue;
        };
        let probe = Arc::clone(&probe);
        connections.spawn(async move {
            handle_connection(stream, peer, probe, limits).await;
            drop(permit);
        });
    }

    drop(listener);
    connections.shutdown().await;
    log::debug!("observability endpoint on {address} stopped");
    Ok(())
}

/// Whether an `accept` error concerns only the connection being accepted (it
/// was reset or aborted before we got to it), so the next accept may succeed
/// at once. Anything else, above all running out of file descriptors, calls
/// for [`ACCEPT_BACKOFF`].
fn is_connection_error(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Reads one request, answers it and closes the connection.
async fn handle_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    probe: Arc<dyn Probe>,
    limits: Limits,
) {
    let Ok(read) = timeout(limits.head_timeout, read_head(&mut stream)).await else {
        log::debug!(
            "{peer}: no complete request within {:?}; dropping the connection",
            limits.head_timeout
        );
        return;
    };
    let (response, head_only) = match read {
        Ok(head) => match parse_head(&head) {
            Ok(request) => {
                let response = respond(&request, &probe).await;
                log::debug!(
                    "{peer} \"{} {}\" {}",
                    request.method,
                    request.target,
                    response.status.code
                );
                (response, request.method == "HEAD")
            }
            Err(reason) => {
                log::debug!("{peer}: malformed request ({reason}); answering 400");
                (Response::text(Status::BAD_REQUEST, "bad request\n"), false)
            }
        },
        Err(HeadError::TooLarge) => {
            log::debug!("{peer}: request head over {MAX_HEAD} bytes; answering 431");
            let body = format!("request line and headers exceed {MAX_HEAD} bytes\n");
            (Response::text(Status::HEADER_TOO_LARGE, &body), false)
        }
        Err(HeadError::Truncated) => {
            log::debug!("{peer}: connection closed in the middle of the request; answering 400");
            (
                Response::text(Status::BAD_REQUEST, "incomplete request\n"),
                false,
            )
        }
        Err(HeadError::Closed) => return,
        Err(HeadError::Io(error)) => {
            log::debug!("{peer}: reading the request failed: {error}");
            return;
        }
    };

    let bytes = response.encode(head_only);
    let written = timeout(limits.write_timeout, async {
        stream.write_all(&bytes).await?;
        // Half-close: the client sees the end of the response at once.
        stream.shutdown().await
    })
    .await;
    match written {
        Err(_elapsed) => log::debug!("{peer}: client did not take the response in time"),
        Ok(Err(error)) => log::debug!("{peer}: sending the response failed: {error}"),
        Ok(Ok(())) => {
            let _ = timeout(limits.linger, linger(&mut stream)).await;
        }
    }
}

/// Reads and discards what the client still sends, until it closes its side
/// (or [`LINGER_MAX_BYTES`] have gone by). Closing a socket that still has
/// unread input makes the kernel send a reset, which can destroy the response
/// before the client reads it; this is the "lingering close" of RFC 9112
/// §9.6. The caller bounds it in time.
async fn linger(stream: &mut TcpStream) {
    let mut sink = [0u8; 4096];
    let mut budget = LINGER_MAX_BYTES;
    while budget > 0 {
        match stream.read(&mut sink).await {
            Ok(0) | Err(_) => return,
            Ok(n) => budget = budget.saturating_sub(n),
        }
    }
}

/// Why no complete request head was read.
#[derive(Debug)]
enum HeadError {
    /// The client closed the connection without sending anything (a TCP
    /// health check, a port scan): nothing to answer.
    Closed,
    /// The client closed the connection (or its sending half) mid-head.
    Truncated,
    /// No blank line within [`MAX_HEAD`] bytes.
    TooLarge,
    Io(io::Error),
}

/// Reads up to and including the blank line that ends the request head. Bytes
/// after it (a body) are left unread or discarded; no more than [`MAX_HEAD`]
/// bytes are ever buffered.
async fn read_head(stream: &mut TcpStream) -> Result<Vec<u8>, HeadError> {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let room = (MAX_HEAD - head.len()).min(chunk.len());
        if room == 0 {
            return Err(HeadError::TooLarge);
        }
        let n = stream
            .read(&mut chunk[..room])
            .await
            .map_err(HeadError::Io)?;
        if n == 0 {
            return Err(if head.is_empty() {
                HeadError::Closed
            } else {
                HeadError::Truncated
            });
        }
        // The terminator may straddle two reads: look back three bytes.
        let search_from = head.len().saturating_sub(3);
        head.extend_from_slice(&chunk[..n]);
        if let Some(at) = find(&head[search_from..], b"\r\n\r\n") {
            head.truncate(search_from + at + 4);
            return Ok(head);
        }
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The parts of a request the server acts on.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: &'a str,
    /// The request target as sent, query included (for the log).
    target: &'a str,
    /// The target without its query.
    path: &'a str,
}

/// Parses a request head as returned by [`read_head`]: the request line, then
/// header fields, each line ending in CRLF, then an empty line. Header values
/// are checked but not kept; only `Host` is counted.
fn parse_head(head: &[u8]) -> Result<Request<'_>, &'static str> {
    // Drop the final empty line, so that every remaining line ends in CRLF.
    let head = head
        .strip_suffix(b"\r\n")
        .ok_or("head does not end in CRLF")?;
    let mut lines = head.split_inclusive(|&b| b == b'\n').map(|line| {
        let line = line.strip_suffix(b"\r\n").ok_or("line ends in a bare LF")?;
        if line.contains(&b'\r') {
            return Err("bare CR inside a line");
        }
        Ok(line)
    });

    let request_line = lines.next().ok_or("empty request")??;
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("request line is not `METHOD target HTTP-version` with single spaces");
    };
    if method.is_empty() || !method.iter().copied().all(is_tchar) {
        return Err("invalid method");
    }
    // Only the origin form (`/path?query`) names one of our resources; the
    // absolute form is for proxies and the asterisk form for OPTIONS.
    if target.first() != Some(&b'/') || !target.iter().all(|&b| b.is_ascii_graphic() && b != b'#') {
        return Err("request target is not an absolute path");
    }
    let http11 = match version {
        b"HTTP/1.1" => true,
        b"HTTP/1.0" => false,
        _ => return Err("unsupported HTTP version"),
    };

    let mut hosts = 0;
    for line in lines {
        let line = line?;
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or("header line without a colon")?;
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        // This also rejects whitespace before the colon and obsolete line
        // folding (a line starting with whitespace), as RFC 9112 §5 asks.
        if name.is_empty() || !name.iter().copied().all(is_tchar) {
            return Err("invalid header name");
        }
        if value.iter().any(|&b| (b < b' ' && b != b'\t') || b == 0x7f) {
            return Err("control character in a header value");
        }
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        }
    }
    // RFC 9112 §3.2: an HTTP/1.1 request must carry exactly one Host, and
    // none may carry several.
    if hosts > 1 || (http11 && hosts == 0) {
        return Err("an HTTP/1.1 request needs exactly one Host header");
    }

    // Both were checked to be ASCII above, so these conversions cannot fail.
    let method = std::str::from_utf8(method).map_err(|_| "invalid method")?;
    let target = std::str::from_utf8(target).map_err(|_| "invalid request target")?;
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    Ok(Request {
        method,
        target,
        path,
    })
}

/// A `tchar` of RFC 9110 §5.6.2, the characters of methods and header names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Metrics,
    Health,
    Ready,
}

impl Route {
    fn from_path(path: &str) -> Option<Route> {
        match path {
            "/metrics" => Some(Route::Metrics),
            "/healthz" => Some(Route::Health),
            "/readyz" => Some(Route::Ready),
            _ => None,
        }
    }
}

/// The answer to a well-formed request.
async fn respond(request: &Request<'_>, probe: &Arc<dyn Probe>) -> Response {
    let Some(route) = Route::from_path(request.path) else {
        return Response::text(Status::NOT_FOUND, "not found\n");
    };
    if request.method != "GET" && request.method != "HEAD" {
        return Response::text(
            Status::METHOD_NOT_ALLOWED,
            "only GET and HEAD are allowed\n",
        );
    }
    match route {
        Route::Health => Response::new(
            Status::OK,
            JSON_CONTENT_TYPE,
            br#"{"status":"ok"}"#.to_vec(),
        ),
        Route::Metrics => {
            let probe = Arc::clone(probe);
            match tokio::task::spawn_blocking(move || probe.metrics()).await {
                Ok(text) => Response::new(Status::OK, METRICS_CONTENT_TYPE, text.into_bytes()),
                Err(error) => probe_failed("metrics", &error),
            }
        }
        Route::Ready => {
            let probe = Arc::clone(probe);
            match tokio::task::spawn_blocking(move || probe.readiness()).await {
                Ok(checks) => readiness_response(&checks),
                Err(error) => probe_failed("readiness", &error),
            }
        }
    }
}

/// `/readyz`: 200 when every check passes (vacuously so when there are none),
/// 503 otherwise, with every check in the body either way.
fn readiness_response(checks: &[ReadinessCheck]) -> Response {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        ready: bool,
        checks: &'a [ReadinessCheck],
    }
    let ready = checks.iter().all(|check| check.ok);
    // Serialising strings and booleans into memory cannot fail.
    let body = serde_json::to_vec(&Body { ready, checks }).expect("readiness JSON serialises");
    let status = if ready {
        Status::OK
    } else {
        Status::UNAVAILABLE
    };
    Response::new(status, JSON_CONTENT_TYPE, body)
}

/// The probe panicked (the blocking task's panic is caught by tokio).
fn probe_failed(what: &str, error: &tokio::task::JoinError) -> Response {
    log::warn!("the agent's {what} probe failed: {error}");
    Response::text(Status::INTERNAL_ERROR, "internal error\n")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status {
    code: u16,
    reason: &'static str,
}

impl Status {
    const OK: Status = Status {
        code: 200,
        reason: "OK",
    };
    const BAD_REQUEST: Status = Status {
        code: 400,
        reason: "Bad Request",
    };
    const NOT_FOUND: Status = Status {
        code: 404,
        reason: "Not Found",
    };
    const METHOD_NOT_ALLOWED: Status = Status {
        code: 405,
        reason: "Method Not Allowed",
    };
    const HEADER_TOO_LARGE: Status = Status {
        code: 431,
        reason: "Request Header Fields Too Large",
    };
    const INTERNAL_ERROR: Status = Status {
        code: 500,
        reason: "Internal Server Error",
    };
    const UNAVAILABLE: Status = Status {
        code: 503,
        reason: "Service Unavailable",
    };
}

struct Response {
    status: Status,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Response {
    fn new(status: Status, content_type: &'static str, body: Vec<u8>) -> Response {
        Response {
            status,
            content_type,
            body,
        }
    }

    fn text(status: Status, body: &str) -> Response {
        Response::new(status, TEXT_CONTENT_TYPE, body.as_bytes().to_vec())
    }

    /// The response as sent: status line, headers and, unless answering
    /// `HEAD`, the body. A `HEAD` answer carries the `Content-Length` the
    /// `GET` would have (RFC 9110 §9.3.2).
    fn encode(&self, head_only: bool) -> Vec<u8> {
        // RFC 9110 §6.6.1: a server with a clock sends Date, in IMF-fixdate.
        let date = chrono::Utc::now().format("%a, %d %b %Y %H:%M:%S GMT");
        let mut head = format!(
            "HTTP/1.1 {} {}\r\nDate: {date}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status.code,
            self.status.reason,
            self.content_type,
            self.body.len()
        );
        if self.status == Status::METHOD_NOT_ALLOWED {
            // RFC 9110 §15.5.6: a 405 must say what is allowed.
            head.push_str("Allow: GET, HEAD\r\n");
        }
        head.push_str("Connection: close\r\n\r\n");
        let mut bytes = head.into_bytes();
        if !head_only {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::sync::oneshot;
    use tokio::task::JoinHandle;

    const METRICS: &str = "# HELP lifeboat_up Whether the agent is running.\n\
                           # TYPE lifeboat_up gauge\n\
                           lifeboat_up 1\n";

    struct FakeProbe {
        checks: Vec<ReadinessCheck>,
    }

    impl Probe for FakeProbe {
        fn metrics(&self) -> String {
            METRICS.to_string()
        }
        fn readiness(&self) -> Vec<ReadinessCheck> {
            self.checks.clone()
        }
    }

    fn check(name: &str, ok: bool, detail: &str) -> ReadinessCheck {
        ReadinessCheck {
            name: name.to_string(),
            ok,
            detail: detail.to_string(),
        }
    }

    fn healthy() -> FakeProbe {
        FakeProbe {
            checks: vec![
                check("catalog", true, "schema 3"),
                check("repository home", true, "reachable"),
            ],
        }
    }

    /// Runs a test body, failing it instead of hanging if it takes too long.
    async fn bounded<T>(test: impl Future<Output = T>) -> T {
        timeout(Duration::from_secs(20), test)
            .await
            .expect("test timed out")
    }

    /// Starts a server that runs until the test ends.
    async fn start(probe: FakeProbe) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local address");
        tokio::spawn(serve(listener, Arc::new(probe), std::future::pending()));
        address
    }

    /// Starts a server with the given limits that stops when the sender fires.
    async fn start_with(
        probe: FakeProbe,
        limits: Limits,
    ) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<io::Result<()>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("local address");
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
        };
        let server = tokio::spawn(serve_with(listener, Arc::new(probe), shutdown, limits));
        (address, stop, server)
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn parse(raw: &[u8]) -> Reply {
            let raw = std::str::from_utf8(raw).expect("response is UTF-8");
            let (head, body) = raw
                .split_once("\r\n\r\n")
                .expect("response has a complete head");
            let mut lines = head.split("\r\n");
            let status_line = lines.next().expect("status line");
            let mut parts = status_line.splitn(3, ' ');
            assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
            let status = parts
                .next()
                .and_then(|code| code.parse().ok())
                .expect("status code");
            let headers = lines
                .map(|line| {
                    let (name, value) = line.split_once(": ").expect("header line");
                    (name.to_ascii_lowercase(), value.to_string())
                })
                .collect();
            Reply {
                status,
                headers,
                body: body.to_string(),
            }
        }

        fn header(&self, name: &str) -> Option<&str> {
            let name = name.to_ascii_lowercase();
            self.headers
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.as_str())
        }

        /// Checks the framing every response must have.
        fn assert_framed(&self, head_only: bool) {
            assert_eq!(self.header("connection"), Some("close"), "{self:?}");
            assert!(
                self.header("date").is_some_and(|d| d.ends_with(" GMT")),
                "{self:?}"
            );
            let length: usize = self
                .header("content-length")
                .expect("Content-Length")
                .parse()
                .unwrap();
            if head_only {
                assert!(self.body.is_empty(), "HEAD answered with a body: {self:?}");
            } else {
                assert_eq!(length, self.body.len(), "{self:?}");
            }
        }
    }

    /// Sends raw bytes and reads the whole response (the server closes).
    async fn exchange(address: SocketAddr, request: &[u8]) -> Reply {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        stream.write_all(request).await.expect("send request");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read response");
        Reply::parse(&raw)
    }

    async fn get(address: SocketAddr, path: &str) -> Reply {
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: test\r\n\r\n");
        let reply = exchange(address, request.as_bytes()).await;
        reply.assert_framed(false);
        reply
    }

    #[tokio::test]
    async fn metrics_are_served_as_prometheus_text() {
        bounded(async {
            let address = start(healthy()).await;
            let reply = get(address, "/metrics").await;
            assert_eq!(reply.status, 200);
            assert_eq!(
                reply.header("content-type"),
                Some("text/plain; version=0.0.4; charset=utf-8")
            );
            assert_eq!(reply.body, METRICS);
        })
        .await;
    }

    #[tokio::test]
    async fn head_sends_the_get_headers_without_the_body() {
        bounded(async {
            let address = start(healthy()).await;
            let reply = exchange(
                address,
                b"HEAD /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
            )
            .await;
            reply.assert_framed(true);
            assert_eq!(reply.status, 200);
            assert_eq!(
                reply.header("content-length"),
                Some(METRICS.len().to_string().as_str())
            );
        })
        .await;
    }

    #[tokio::test]
    async fn healthz_says_ok_and_ignores_a_query() {
        bounded(async {
            let address = start(healthy()).await;
            for path in ["/healthz", "/healthz?verbose=1"] {
                let reply = get(address, path).await;
                assert_eq!(reply.status, 200);
                assert_eq!(reply.header("content-type"), Some("application/json"));
                assert_eq!(reply.body, r#"{"status":"ok"}"#);
            }
        })
        .await;
    }

    #[tokio::test]
    async fn readyz_is_200_when_every_check_passes() {
        bounded(async {
            let address = start(healthy()).await;
            let reply = get(address, "/readyz").await;
            assert_eq!(reply.status, 200);
            assert_eq!(reply.header("content-type"), Some("application/json"));
            let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON body");
            assert_eq!(
                body,
                serde_json::json!({
                    "ready": true,
                    "checks": [
                        {"name": "catalog", "ok": true, "detail": "schema 3"},
                        {"name": "repository home", "ok": true, "detail": "reachable"},
                    ],
                })
            );
        })
        .await;
    }

    #[tokio::test]
    async fn readyz_is_503_and_names_the_failing_part() {
        bounded(async {
            let probe = FakeProbe {
                checks: vec![
                    check("catalog", true, "schema 3"),
                    check("repository home", false, "connection refused by s3.example"),
                ],
            };
            let address = start(probe).await;
            let reply = get(address, "/readyz").await;
            assert_eq!(reply.status, 503);
            let body: serde_json::Value = serde_json::from_str(&reply.body).expect("JSON body");
            assert_eq!(body["ready"], false);
            let failing: Vec<_> = body["checks"]
                .as_array()
                .expect("checks array")
                .iter()
                .filter(|check| check["ok"] == false)
                .collect();
            assert_eq!(failing.len(), 1, "{body}");
            assert_eq!(failing[0]["name"], "repository home");
            assert_eq!(failing[0]["detail"], "connection refused by s3.example");
        })
        .await;
    }

    #[tokio::test]
    async fn other_paths_are_404() {
        bounded(async {
            let address = start(healthy()).await;
            for path in ["/", "/metrics/", "/metricsx", "/healthz/../metrics"] {
                assert_eq!(get(address, path).await.status, 404, "{path}");
            }
        })
        .await;
    }

    #[tokio::test]
    async fn post_is_405_with_allow() {
        bounded(async {
            let address = start(healthy()).await;
            let reply = exchange(
                address,
                b"POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello",
            )
            .await;
            reply.assert_framed(false);
            assert_eq!(reply.status, 405);
            assert_eq!(reply.header("allow"), Some("GET, HEAD"));
        })
        .await;
    }

    #[tokio::test]
    async fn garbage_is_400() {
        bounded(async {
            let address = start(healthy()).await;
            for garbage in [
                &b"hello\r\n\r\n"[..],
                b"GET /metrics\r\n\r\n",
                b"GET /metrics HTTP/1.1\r\n\r\n",
                b"GET  /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
            ] {
                let reply = exchange(address, garbage).await;
                reply.assert_framed(false);
                assert_eq!(reply.status, 400, "{:?}", String::from_utf8_lossy(garbage));
            }
        })
        .await;
    }

    #[tokio::test]
    async fn a_request_cut_short_is_400() {
        bounded(async {
            let address = start(healthy()).await;
            let mut stream = TcpStream::connect(address).await.expect("connect");
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                .await
                .expect("send");
            stream.shutdown().await.expect("half-close");
            let mut raw = Vec::new();
            stream.read_to_end(&mut raw).await.expect("read response");
            assert_eq!(Reply::parse(&raw).status, 400);
        })
        .await;
    }

    #[tokio::test]
    async fn an_oversize_header_block_is_rejected() {
        bounded(async {
            let address = start(healthy()).await;
            let mut request = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n".to_vec();
            for i in 0..200 {
                request
                    .extend_from_slice(format!("X-Filler-{i}: {}\r\n", "a".repeat(80)).as_bytes());
            }
            request.extend_from_slice(b"\r\n");
            assert!(request.len() > 2 * MAX_HEAD);
            let reply = exchange(address, &request).await;
            reply.assert_framed(false);
            assert_eq!(reply.status, 431);
        })
        .await;
    }

    #[tokio::test]
    async fn a_head_of_exactly_the_limit_is_accepted() {
        bounded(async {
            let address = start(healthy()).await;
            let prefix = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Pad: ";
            let end = b"\r\n\r\n";
            let mut request = prefix.to_vec();
            request.resize(MAX_HEAD - end.len(), b'a');
            request.extend_from_slice(end);
            assert_eq!(request.len(), MAX_HEAD);
            assert_eq!(exchange(address, &request).await.status, 200);
        })
        .await;
    }

    #[tokio::test]
    async fn a_slow_client_is_dropped_without_an_answer() {
        bounded(async {
            let limits = Limits {
                head_timeout: Duration::from_millis(200),
                ..Limits::DEFAULT
            };
            let (address, _stop, _server) = start_with(healthy(), limits).await;
            let mut stream = TcpStream::connect(address).await.expect("connect");
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\n")
                .await
                .expect("send");
            let mut raw = Vec::new();
            // Reading ends only when the server gives up and closes.
            let read = stream.read_to_end(&mut raw).await;
            assert!(
                read.is_err() || raw.is_empty(),
                "got {:?}",
                String::from_utf8_lossy(&raw)
            );
        })
        .await;
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_at_once() {
        bounded(async {
            let limits = Limits {
                max_connections: 1,
                ..Limits::DEFAULT
            };
            let (address, _stop, _server) = start_with(healthy(), limits).await;
            // The first connection holds the only permit while it says nothing.
            let mut first = TcpStream::connect(address).await.expect("connect");
            // Connections are accepted in order, so the second finds no permit.
            let mut second = TcpStream::connect(address).await.expect("connect");
            let mut raw = Vec::new();
            let read = timeout(Duration::from_secs(2), second.read_to_end(&mut raw))
                .await
                .expect("the second connection is closed well before the head timeout");
            assert!(read.is_err() || raw.is_empty());
            // The first is still served.
            first
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await
                .expect("send");
            let mut raw = Vec::new();
            first.read_to_end(&mut raw).await.expect("read response");
            assert_eq!(Reply::parse(&raw).status, 200);
        })
        .await;
    }

    #[tokio::test]
    async fn shutdown_stops_the_server_and_cuts_off_open_connections() {
        bounded(async {
            let limits = Limits {
                head_timeout: Duration::from_secs(60),
                ..Limits::DEFAULT
            };
            let (address, stop, server) = start_with(healthy(), limits).await;
            assert_eq!(get(address, "/healthz").await.status, 200);
            let mut idle = TcpStream::connect(address).await.expect("connect");

            stop.send(()).expect("server is running");
            let result = timeout(Duration::from_secs(5), server)
                .await
                .expect("serve returns promptly after shutdown")
                .expect("serve did not panic");
            result.expect("serve returns Ok");

            // The idle connection did not keep the server alive and was
            // closed (or, if never accepted, reset with the listener).
            let mut raw = Vec::new();
            let read = timeout(Duration::from_secs(2), idle.read_to_end(&mut raw))
                .await
                .expect("the idle connection is closed by shutdown");
            assert!(read.is_err() || raw.is_empty());
        })
        .await;
    }

    #[test]
    fn parse_accepts_a_plain_request_and_splits_the_query() {
        let request =
            parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: localhost:9184\r\nAccept: */*\r\n\r\n");
        assert_eq!(
            request,
            Ok(Request {
                method: "GET",
                target: "/metrics?x=1",
                path: "/metrics"
            })
        );
    }

    #[test]
    fn parse_allows_http10_without_host_and_any_header_case() {
        assert!(parse_head(b"GET / HTTP/1.0\r\n\r\n").is_ok());
        assert!(
            parse_head(b"GET / HTTP/1.1\r\nhOsT: x\r\nX-Empty:\r\nX-Tab:\tv\t\r\n\r\n").is_ok()
        );
        assert!(parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nX-Latin1: caf\xe9\r\n\r\n").is_ok());
    }

    #[test]
    fn parse_rejects_malformed_heads() {
        for bad in [
            &b"\r\n\r\n"[..],
            b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\ry\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
            b"GET / http/1.1\r\nHost: x\r\n\r\n",
            b"GET http://x/metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n",
            b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n: empty name\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
        ] {
            assert!(
                parse_head(bad).is_err(),
                "accepted {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn method_names_are_case_sensitive() {
        // `get` is a well-formed method that this server does not implement.
        let request = parse_head(b"get /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("well-formed");
        assert_eq!(request.method, "get");
    }
}
