//! Reading PROXY protocol headers (`--proxy-protocol`) without ever blocking accepting.
//!
//! A header arrives at the client's pace, so it cannot be read in the accept loop: one
//! sender that connects and sends nothing would stall every other client. Each
//! accepted connection from a trusted peer becomes a small task on the accept thread's
//! own runtime instead, woken by readiness: it peeks (`MSG_PEEK`) at what has arrived,
//! parses it ([`crate::proxy::parse`]), and once a whole header is there reads exactly
//! its bytes, so the worker gets the connection positioned just after it. The
//! connection then comes back to the accept loop (an unbounded queue, bounded in
//! practice by the cap below) to be dispatched with the client the header names.
//!
//! Bounds: a header must be complete within the deadline (`--proxy-timeout`, 3 s by
//! default) and within [`crate::proxy::V1_MAX`] / [`crate::proxy::V2_MAX`] bytes; at
//! most [`PENDING_MAX`] headers are awaited per accept thread. A connection past the
//! cap is closed and counted at once rather than accepting pausing: a pause would let
//! that many silent senders hold every client in the kernel backlog until their
//! deadline, while closing keeps the listener moving and shows in the counters. Every
//! failure (invalid, too long, too slow, closed early, over the cap) closes the
//! connection and counts one `proxy_header_errors`; a peer outside `--trusted-proxy`
//! is closed and counted in `proxy_untrusted` without a byte being read.

use std::io::{self, Read};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::debug;

use super::BalanceStats;
use crate::proxy::{self, Cidr, Parsed, ProxyProtocol};
use crate::via::channel::Conn;

/// Most headers awaited at once per accept thread; past it new connections are closed.
pub const PENDING_MAX: usize = 1024;

/// How long a client has to send its whole header, unless `--proxy-timeout` says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// What `--proxy-protocol` and `--trusted-proxy` asked for.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The versions accepted.
    pub accept: ProxyProtocol,
    /// The peers allowed to send a header; empty: every peer (and each must send one).
    pub trusted: Arc<[Cidr]>,
    /// How long a header may take to arrive.
    pub timeout: Duration,
}

/// One accept thread's headers in flight.
pub(crate) struct Reader {
    settings: ProxySettings,
    stats: Arc<BalanceStats>,
    pending: usize,
    done_tx: mpsc::UnboundedSender<Option<Conn>>,
    done_rx: mpsc::UnboundedReceiver<Option<Conn>>,
}

impl Reader {
    /// A reader counting its failures in `stats`.
    pub fn new(settings: ProxySettings, stats: Arc<BalanceStats>) -> Reader {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Reader {
            settings,
            stats,
            pending: 0,
            done_tx,
            done_rx,
        }
    }

    /// Starts reading `conn`'s header on the current runtime, or closes and counts it.
    pub fn start(&mut self, conn: Conn) {
        let trusted = &self.settings.trusted;
        if !trusted.is_empty() && !trusted.iter().any(|c| c.contains(conn.peer.ip())) {
            BalanceStats::add(&self.stats.proxy_untrusted, 1);
            debug!(event = "proxy_untrusted", peer = %conn.peer, "closing a connection from outside --trusted-proxy");
            return;
        }
        if self.pending >= PENDING_MAX {
            BalanceStats::add(&self.stats.proxy_header_errors, 1);
            debug!(event = "proxy_header_error", peer = %conn.peer, reason = "too many headers pending",
                "closing a connection: {PENDING_MAX} PROXY headers already awaited");
            return;
        }
        self.pending += 1;
        let (tx, stats) = (self.done_tx.clone(), self.stats.clone());
        let (accept, deadline) = (self.settings.accept, conn.since + self.settings.timeout);
        tokio::spawn(async move {
            let peer = conn.peer;
            let outcome = match tokio::time::timeout_at(deadline, read_header(conn, accept)).await {
                Ok(Ok(conn)) => Some(conn),
                Ok(Err(reason)) => {
                    debug!(event = "proxy_header_error", %peer, reason, "closing a connection without a valid PROXY header");
                    None
                }
                Err(_) => {
                    debug!(event = "proxy_header_error", %peer, reason = "timed out", "closing a connection without a valid PROXY header");
                    None
                }
            };
            if outcome.is_none() {
                BalanceStats::add(&stats.proxy_header_errors, 1);
            }
            let _ = tx.send(outcome);
        });
    }

    /// The next connection whose header was read (`None` inside: one that failed).
    pub async fn next(&mut self) -> Option<Conn> {
        let outcome = self.done_rx.recv().await.flatten();
        self.pending -= 1;
        outcome
    }

    /// A further finished one, if there is one already.
    pub fn try_next(&mut self) -> Option<Option<Conn>> {
        let outcome = self.done_rx.try_recv().ok()?;
        self.pending -= 1;
        Some(outcome)
    }
}

/// Reads `conn`'s header; on success returns it positioned after the header, with the
/// peer the header names.
async fn read_header(mut conn: Conn, accept: ProxyProtocol) -> Result<Conn, &'static str> {
    let fail = |_| "cannot watch the socket";
    conn.stream.set_nonblocking(true).map_err(fail)?;
    let fd: AsyncFd<TcpStream> = crate::fdpass::register(conn.stream).map_err(fail)?;
    let mut buf = [0u8; proxy::V2_MAX];
    let buf = &mut buf[..accept.max_len()];
    let header = loop {
        let mut guard = fd.readable().await.map_err(|_| "cannot watch the socket")?;
        match fd.get_ref().peek(buf) {
            Ok(0) => return Err("closed before the header"),
            Ok(n) => match proxy::parse(&buf[..n], accept) {
                Parsed::Header(h) => break h,
                Parsed::Invalid(reason) => return Err(reason),
                // The peer has finished sending: no more will come.
                Parsed::NeedMore if guard.ready().is_read_closed() => {
                    return Err("closed before the header")
                }
                // Wait for more bytes: what has arrived stays where it is.
                Parsed::NeedMore => guard.clear_ready(),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err("read error"),
        }
    };
    // Exactly the header's bytes, all of them already received.
    let mut stream = fd.into_inner();
    let mut read = 0;
    while read < header.len {
        match stream.read(&mut buf[read..header.len]) {
            Ok(0) => return Err("closed before the header"),
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err("read error"),
        }
    }
    set_blocking(&stream).map_err(|_| "cannot restore the socket")?;
    conn.stream = stream;
    if let Some((client, _)) = header.addrs {
        conn.peer = client;
    }
    // Its wait for a worker starts now (the handoff latency is the master's own).
    conn.since = Instant::now();
    Ok(conn)
}

/// Back to blocking, as every accepted socket is handed over.
fn set_blocking(stream: &TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)
}
