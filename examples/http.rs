//! The benchmark worker: a minimal HTTP/1.1 keep-alive server that answers every
//! request with `200 OK` and a short body naming its `WORKER_ID` and generation
//! (`worker=1 gen=3`).
//!
//! It is what `cargo bench --bench compare` runs behind every front balancer, so that
//! the only thing that changes between the measurements is how connections reach it:
//!
//! * under recluster, in every balance mode (`rr`, `sticky`, `shared`), through
//!   [`recluster::worker::Listener`]:
//!
//!   ```text
//!   cargo build --release --bin recluster --example http
//!   target/release/recluster --workers 2 --listen 127.0.0.1:8080 -- target/release/examples/http
//!   ```
//!
//! * standalone, binding its own `SO_REUSEPORT` socket, for the baseline of N copies
//!   sharing a port with no master at all (the kernel's own balancing), or one copy
//!   alone, or as a backend behind HAProxy:
//!
//!   ```text
//!   target/release/examples/http --reuseport 127.0.0.1:8080 &
//!   target/release/examples/http --reuseport 127.0.0.1:8080 &
//!   ```
//!
//! The HTTP parsing is hand-written and deliberately small: request line and headers
//! up to `\r\n\r\n`, a `Content-Length` body is skipped, `Connection: close` (or
//! HTTP/1.0 without `keep-alive`) closes after the response, pipelined requests are
//! answered in order. It is single-threaded (one process per core is the point of a
//! cluster).
//!
//! **Uneven work.** A request for `/work?ms=N` (N ≤ [`MAX_WORK_MS`]; a larger N is
//! capped) burns N ms of CPU before it is answered as usual: a busy loop on the
//! monotonic clock, not a sleep, as a CPU-bound handler would (see [`burn`]). The
//! runtime is `current_thread`, so while it spins the whole worker is stopped: its
//! other connections, its accept loop and, under recluster, the reading of its
//! channel from the master all wait behind it, which is what the `uneven` load of
//! `cargo bench --bench compare` (1 request in 20 at 5 ms) measures. Any other path
//! is answered at once.
//!
//! On stop (the master's `stop`, or SIGTERM) it drains as `docs/PROTOCOL.md` ("Draining
//! on stop") says, with [`recluster::worker::Stopping`]: it accepts no more; a request
//! in flight, already buffered or arriving is answered with `Connection: close`, then
//! the connection is closed; a connection with no request begun gets [`IDLE_GRACE`] to
//! begin one before it is closed. Once every connection is closed it exits; the
//! master's `--timeout` (SIGKILL) is the only bound on the whole drain.

use std::net::SocketAddr;

use recluster::worker::Stopping;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest request head accepted; beyond it the connection gets `431` and is closed.
const MAX_HEAD: usize = 8192;

/// After stop, how long a connection with no request begun waits for the client's next
/// request (answered with `Connection: close`) before it is closed, and how long a
/// closing connection waits for the client's EOF (see [`close_gracefully`]).
///
/// Closing an idle keep-alive connection races a request the client may be sending
/// at that moment: the client sees the connection end with no response. A client that
/// uses its connection sends its next request within milliseconds of the previous
/// response, well within this grace: its request is answered, with `Connection: close`,
/// and it reconnects to another worker. Only a connection left unused for a whole
/// second is closed without a last answer, which is what any keep-alive timeout does
/// (Node's default is 5 s, nginx's 75 s): a client sending on a connection that idle
/// retries on a new one (RFC 9112 §9.3.1). One second also keeps the drain short next
/// to a production `--timeout` (1 h), so old workers do not linger for idle browsers.
const IDLE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Largest CPU time a `/work?ms=N` request may ask for, in ms; a larger N is capped.
const MAX_WORK_MS: u64 = 1000;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let id = std::env::var("WORKER_ID").unwrap_or_else(|_| "0".into());
    let generation = recluster::worker::generation();
    let body: &'static [u8] = format!("worker={id} gen={generation}\n")
        .into_bytes()
        .leak();
    let mut tasks = tokio::task::JoinSet::new();
    match args.as_slice() {
        [flag, addr] if flag == "--reuseport" => {
            let addr: SocketAddr = addr
                .parse()
                .map_err(|e| std::io::Error::other(format!("--reuseport {addr}: {e}")))?;
            let listener = reuseport_listener(addr)?;
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            // SIGTERM is the stop: the same drain as under recluster.
            let (stop, stopping) = tokio::sync::watch::channel(false);
            let stopping = Stopping::from(stopping);
            loop {
                let stream = tokio::select! {
                    biased;
                    _ = term.recv() => {
                        stop.send_replace(true);
                        break;
                    }
                    r = listener.accept() => match r {
                        Ok((s, _)) => s,
                        // EMFILE and the like: back off a little instead of spinning.
                        Err(_) => {
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                            continue;
                        }
                    },
                };
                tasks.spawn(serve(stream, body, stopping.clone()));
                while tasks.try_join_next().is_some() {}
            }
        }
        [] => {
            let mut listener = recluster::worker::Listener::from_env()?;
            recluster::worker::ready()?;
            while let Some((stream, _peer)) = listener.accept().await? {
                tasks.spawn(serve(stream, body, listener.stopping()));
                while tasks.try_join_next().is_some() {}
            }
        }
        _ => {
            eprintln!("usage: http                      (under recluster)\n       http --reuseport ADDR     (standalone, SO_REUSEPORT)");
            std::process::exit(2);
        }
    }
    // Stop: every connection drains (see `serve`), then exit. No bound of our own:
    // the master's `--timeout` is the bound, and a fixed one here would cut requests.
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// A listening socket of its own on `addr`, shared with sibling processes by SO_REUSEPORT.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(511)?;
    tokio::net::TcpListener::from_std(sock.into())
}

/// Serves one connection: answers each request, until the client closes or asks to,
/// or, once `stopping`, until one more request has been answered (see [`IDLE_GRACE`]).
async fn serve(mut stream: TcpStream, body: &'static [u8], stopping: Stopping) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0;
    let mut out = Vec::with_capacity(256);
    // Pinned once per connection: waiting on it again costs no allocation.
    let stop = stopping.stopped();
    tokio::pin!(stop);
    let mut stopped = false;
    loop {
        // Answer every complete request in the buffer (pipelining), then write once.
        // After stop, the first one is answered with `Connection: close`, and is the last.
        let draining = stopped || stopping.is_stopping();
        let mut close = false;
        out.clear();
        let mut start = 0;
        while let Some(req) = parse_request(&buf[start..filled]) {
            // The body, if any, must be in the buffer too (it is never larger than
            // the buffer: see parse_request); otherwise read more first.
            if start + req.len > filled {
                break;
            }
            close = req.close || draining;
            burn(req.work_ms);
            respond(&mut out, body, close);
            start += req.len;
            if close {
                break;
            }
        }
        if !out.is_empty() && stream.write_all(&out).await.is_err() {
            return;
        }
        if close {
            close_gracefully(stream, &mut buf).await;
            return;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if filled == buf.len() {
            let _ = stream
                .write_all(b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
            return;
        }
        let read = if !stopped {
            tokio::select! {
                biased;
                r = stream.read(&mut buf[filled..]) => r,
                _ = &mut stop => {
                    stopped = true;
                    continue;
                }
            }
        } else if filled == 0 {
            // Stopping, no request begun: the client gets IDLE_GRACE to begin one.
            match tokio::time::timeout(IDLE_GRACE, stream.read(&mut buf)).await {
                Ok(r) => r,
                Err(_idle) => {
                    close_gracefully(stream, &mut buf).await;
                    return;
                }
            }
        } else {
            // Stopping, a request begun: it is finished and answered (the master's
            // `--timeout` bounds a client that never finishes it).
            stream.read(&mut buf[filled..]).await
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(n) => filled += n,
        }
    }
}

/// Closes a connection without losing the response just written: half-closes, then
/// reads (and discards) until the client's EOF, for at most [`IDLE_GRACE`].
///
/// Closing a socket with unread bytes in it (a request the client sent before it read
/// `Connection: close`) makes the kernel reset the connection, and a reset can destroy
/// the response still on its way to the client. A client that read the response closes
/// at once, so this wait is one round trip.
async fn close_gracefully(mut stream: TcpStream, buf: &mut [u8]) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(IDLE_GRACE, async {
        while let Ok(1..) = stream.read(buf).await {}
    })
    .await;
}

/// A complete request at the start of a buffer.
struct Request {
    /// Bytes it takes: head and body.
    len: usize,
    /// Whether the connection closes after the response.
    close: bool,
    /// CPU time to burn before answering (`/work?ms=N`), ms; 0 for any other path.
    work_ms: u64,
}

/// Occupies this thread for `ms` milliseconds of wall-clock time, spinning on the
/// monotonic clock ([`std::time::Instant`]) rather than sleeping, as a CPU-bound handler
/// would.
///
/// It blocks the thread, not just the task: the runtime is `current_thread`, so no
/// other connection of this worker is read or answered, no connection is accepted and
/// (under recluster) nothing is read from the master's channel until it returns. On a
/// multi-threaded runtime it would block one of its threads only; this worker has one.
/// When the machine is oversubscribed the worker may be descheduled while spinning, so
/// the CPU time it gets can be less than `ms`; the delay it imposes is never less.
fn burn(ms: u64) {
    if ms == 0 {
        return;
    }
    let end = std::time::Instant::now() + std::time::Duration::from_millis(ms);
    while std::time::Instant::now() < end {
        std::hint::spin_loop();
    }
}

/// The `N` of a request line `GET /work?ms=N ...`, capped at [`MAX_WORK_MS`]; 0 for
/// any other request target or an unparsable `N`.
fn work_ms(request_line: &[u8]) -> u64 {
    let mut parts = request_line.split(|&b| b == b' ');
    let target = parts.nth(1).unwrap_or_default();
    let Some(query) = target.strip_prefix(b"/work?") else {
        return 0;
    };
    query
        .split(|&b| b == b'&')
        .find_map(|kv| kv.strip_prefix(b"ms="))
        .and_then(|n| std::str::from_utf8(n).ok()?.parse::<u64>().ok())
        .map_or(0, |n| n.min(MAX_WORK_MS))
}

/// Parses the request at the start of `buf`, if its head is complete.
fn parse_request(buf: &[u8]) -> Option<Request> {
    let head_end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = &buf[..head_end];
    let mut lines = head.split(|&b| b == b'\n');
    let request_line = lines.next()?;
    let http10 = request_line.ends_with(b"HTTP/1.0\r");
    let work_ms = work_ms(request_line.strip_suffix(b"\r").unwrap_or(request_line));
    let mut close = http10;
    let mut content_length = 0usize;
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"connection") {
            if value.eq_ignore_ascii_case(b"close") {
                close = true;
            } else if value.eq_ignore_ascii_case(b"keep-alive") {
                close = false;
            }
        } else if name.eq_ignore_ascii_case(b"content-length") {
            content_length = std::str::from_utf8(value).ok()?.parse().ok()?;
        }
    }
    // A body that cannot fit the buffer is answered as if the request ended at its head
    // and the connection closes: this worker only serves benchmarks' GETs.
    if head_end + content_length > MAX_HEAD {
        return Some(Request {
            len: head_end,
            close: true,
            work_ms,
        });
    }
    Some(Request {
        len: head_end + content_length,
        close,
        work_ms,
    })
}

/// Appends a `200 OK` response carrying `body` to `out`.
fn respond(out: &mut Vec<u8>, body: &[u8], close: bool) {
    use std::io::Write;
    let connection = if close { "close" } else { "keep-alive" };
    let _ = write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n",
        body.len()
    );
    out.extend_from_slice(body);
}
