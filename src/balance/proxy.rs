//! Reading PROXY protocol headers (`--proxy-protocol`) without ever blocking accepting.
//!
//! A header arrives at the client's pace, so it cannot be waited for in the accept
//! loop: one sender that connects and sends nothing would stall every other client.
//! The accept loop only looks once, without waiting (`MSG_PEEK | MSG_DONTWAIT`): a
//! proxy sends the header with its first segment, so it is usually all there already,
//! and then exactly its bytes are read and the connection goes on at once. Otherwise
//! the connection becomes a small task on the accept thread's own runtime, woken by
//! readiness, that peeks again at each arrival, parses what is there
//! ([`crate::proxy::parse`]), and once a whole header is in reads exactly its bytes, so
//! the worker gets the connection positioned just after it; the connection then comes
//! back to the accept loop (a queue bounded by the cap below) to be dispatched with the
//! client the header names. Every read says `MSG_DONTWAIT`, so the socket's own flags
//! never change on the way to the worker.
//!
//! Bounds: a header must be complete within the deadline (`--proxy-timeout`, 3 s by
//! default) and within [`crate::proxy::V1_MAX`] / [`crate::proxy::V2_MAX`] bytes; at
//! most [`PENDING_MAX`] headers are awaited per accept thread. At the cap the oldest
//! awaited header is given up (closed and counted) to make room, rather than the new
//! connection refused or accepting paused: silent senders that fill the cap then only
//! push each other out, while a client whose header is a segment late still gets its
//! turn (refusing new ones let 1024 silent senders shut the port for the whole
//! deadline; pausing would hold every client in the kernel backlog as long). Every
//! failure (invalid, too long, too slow, closed early, over the cap) closes the
//! connection and counts one `proxy_header_errors`; a peer outside `--trusted-proxy`
//! is closed and counted in `proxy_untrusted` without a byte being read.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::BalanceStats;
use crate::proxy::{self, Cidr, Parsed, ProxyProtocol};
use crate::via::channel::Conn;

/// Most headers awaited at once per accept thread (fewer when the descriptor limit is
/// low, see [`pending_cap`]); at it the oldest is given up for the new one.
pub const PENDING_MAX: usize = 1024;

/// Headers awaited at once per accept thread, for `threads` threads: [`PENDING_MAX`],
/// or a quarter of the soft descriptor limit shared by the threads if that is less
/// (at least 16), so that awaited headers never take the descriptors that accepting,
/// the workers' channels and the control socket need (at 1024 descriptors, the usual
/// soft default, 1024 awaited headers exhausted the master).
pub fn pending_cap(threads: usize) -> usize {
    // SAFETY: getrlimit writes one struct we own.
    let soft = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return PENDING_MAX;
        }
        lim.rlim_cur
    };
    let share = usize::try_from(soft / 4).unwrap_or(usize::MAX) / threads.max(1);
    share.clamp(16, PENDING_MAX)
}

/// How long a client has to send its whole header, unless `--proxy-timeout` says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

/// What `--proxy-protocol` and `--trusted-proxy` asked for.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// The versions accepted on the listeners `by_listener` does not name; `None`: no
    /// header is read there.
    pub accept: Option<ProxyProtocol>,
    /// The versions accepted on listener `i`, when `--proxy-protocol ADDR=VERSION` named it.
    pub by_listener: Arc<[Option<ProxyProtocol>]>,
    /// The peers allowed to send a header; empty: every peer (and each must send one).
    pub trusted: Arc<[Cidr]>,
    /// How long a header may take to arrive.
    pub timeout: Duration,
}

impl ProxySettings {
    /// The versions accepted on listener `index`; `None`: it takes no header.
    pub fn accept_for(&self, index: usize) -> Option<ProxyProtocol> {
        self.by_listener.get(index).copied().flatten().or(self.accept)
    }
}

/// One accept thread's headers in flight.
pub(crate) struct Reader {
    settings: ProxySettings,
    stats: Arc<BalanceStats>,
    /// The tasks awaiting a header, oldest first (by number), so that the oldest can
    /// make room for a new one at the cap.
    pending: std::collections::BTreeMap<u64, tokio::task::AbortHandle>,
    /// The number of the next task.
    next_id: u64,
    /// Most tasks at once ([`pending_cap`]).
    cap: usize,
    /// Where headers are peeked at on the accept path (allocated once).
    buf: Box<[u8]>,
    done_tx: mpsc::UnboundedSender<Outcome>,
    done_rx: mpsc::UnboundedReceiver<Outcome>,
    /// When the last failure was logged, and how many were not logged since.
    last_warn: Option<Instant>,
    unlogged: u64,
}

impl Drop for Reader {
    /// The failures not logged since the last line are said when the accept thread
    /// ends, so the log's `more` counts add up to the counter.
    fn drop(&mut self) {
        if self.unlogged > 0 {
            warn!(event = "proxy_header_error", more = self.unlogged,
                "closed connections without a valid PROXY header since the last such line");
        }
    }
}

/// What became of a header awaited in task `.0`: the connection, or why it was closed.
type Outcome = (u64, Result<Conn, (SocketAddr, &'static str)>);

impl Reader {
    /// A reader counting its failures in `stats`.
    pub fn new(settings: ProxySettings, stats: Arc<BalanceStats>, cap: usize) -> Reader {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Reader {
            settings,
            stats,
            pending: std::collections::BTreeMap::new(),
            next_id: 0,
            cap,
            buf: vec![0; proxy::V2_MAX].into_boxed_slice(),
            done_tx,
            done_rx,
            last_warn: None,
            unlogged: 0,
        }
    }

    /// Takes `conn`'s header: returns the connection at once when the whole header has
    /// already arrived (the common case: a proxy sends it with its first segment),
    /// else starts a task that waits for it, or closes and counts the connection.
    pub fn start(&mut self, mut conn: Conn) -> Option<Conn> {
        let Some(accept) = self.settings.accept_for(conn.listener) else {
            return Some(conn);
        };
        let trusted = &self.settings.trusted;
        if !trusted.is_empty() && !trusted.iter().any(|c| c.contains(conn.peer.ip())) {
            BalanceStats::add(&self.stats.proxy_untrusted, 1);
            debug!(event = "proxy_untrusted", peer = %conn.peer, "closing a connection from outside --trusted-proxy");
            return None;
        }
        match step(&mut conn, accept, &mut self.buf[..accept.max_len()]) {
            Ok(true) => return Some(conn),
            Ok(false) => {}
            Err(reason) => return self.failed(conn.peer, reason),
        }
        if self.pending.len() >= self.cap {
            // Full: the oldest goes, not the newest. Silent senders that fill the cap
            // then only ever push each other out, and a client whose header is merely
            // a segment late still gets its turn.
            if let Some((_, oldest)) = self.pending.pop_first() {
                oldest.abort();
                self.failed(conn.peer, "pushed out by newer headers at the cap");
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        let tx = self.done_tx.clone();
        let deadline = conn.since + self.settings.timeout;
        let task = tokio::spawn(async move {
            let peer = conn.peer;
            let outcome = match tokio::time::timeout_at(deadline, read_header(conn, accept)).await {
                Ok(Ok(conn)) => Ok(conn),
                Ok(Err(reason)) => Err((peer, reason)),
                Err(_) => Err((peer, "timed out")),
            };
            let _ = tx.send((id, outcome));
        });
        self.pending.insert(id, task.abort_handle());
        None
    }

    /// Counts a connection closed for `reason` (dropping it closes it), and says so in
    /// the log at most once a second (a flood of bad clients must not flood the log).
    fn failed(&mut self, peer: SocketAddr, reason: &'static str) -> Option<Conn> {
        BalanceStats::add(&self.stats.proxy_header_errors, 1);
        let now = Instant::now();
        if self
            .last_warn
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            self.unlogged += 1;
            debug!(event = "proxy_header_error", %peer, reason, "closing a connection without a valid PROXY header");
            return None;
        }
        self.last_warn = Some(now);
        warn!(event = "proxy_header_error", %peer, reason, more = std::mem::take(&mut self.unlogged),
            "closing a connection without a valid PROXY header (`more`: others since the last such line)");
        None
    }

    /// The next connection whose header was read (`None` inside: one that failed).
    pub async fn next(&mut self) -> Option<Conn> {
        let outcome = self.done_rx.recv().await?;
        self.settle(outcome)
    }

    /// A further finished one, if there is one already.
    pub fn try_next(&mut self) -> Option<Option<Conn>> {
        let outcome = self.done_rx.try_recv().ok()?;
        Some(self.settle(outcome))
    }

    /// The connection of an outcome, or `None` once its failure is counted (or when it
    /// was pushed out at the cap after it finished: closed, and counted then).
    fn settle(&mut self, (id, outcome): Outcome) -> Option<Conn> {
        self.pending.remove(&id)?;
        match outcome {
            Ok(conn) => Some(conn),
            Err((peer, reason)) => self.failed(peer, reason),
        }
    }
}

/// Reads `conn`'s header, waiting for it; on success returns the connection positioned
/// after the header, with the peer the header names.
async fn read_header(mut conn: Conn, accept: ProxyProtocol) -> Result<Conn, &'static str> {
    // Registered as it is (blocking): every read says MSG_DONTWAIT, so the descriptor's
    // flags never change and need no restoring before the hand-over.
    let fd: AsyncFd<TcpStream> =
        crate::fdpass::register(conn.stream).map_err(|_| "cannot watch the socket")?;
    let mut buf = vec![0u8; accept.max_len()];
    let header = loop {
        let mut guard = fd.readable().await.map_err(|_| "cannot watch the socket")?;
        match peek_header(fd.get_ref(), accept, &mut buf)? {
            Some(h) => break h,
            // The peer has finished sending: no more will come.
            None if guard.ready().is_read_closed() => return Err("closed before the header"),
            // Wait for more bytes: what has arrived stays where it is.
            None => guard.clear_ready(),
        }
    };
    conn.stream = fd.into_inner();
    consume(&mut conn, header, &mut buf)?;
    Ok(conn)
}

/// Takes `conn`'s header if all of it has arrived (`Ok(true)`); `Ok(false)`: not yet.
fn step(conn: &mut Conn, accept: ProxyProtocol, buf: &mut [u8]) -> Result<bool, &'static str> {
    match peek_header(&conn.stream, accept, buf)? {
        Some(header) => consume(conn, header, buf).map(|()| true),
        None => Ok(false),
    }
}

/// Looks at what has arrived, without taking it: the header if it is all there.
fn peek_header(
    stream: &TcpStream,
    accept: ProxyProtocol,
    buf: &mut [u8],
) -> Result<Option<proxy::Header>, &'static str> {
    loop {
        return match recv(stream, buf, libc::MSG_PEEK) {
            Ok(0) => Err("closed before the header"),
            Ok(n) => match proxy::parse(&buf[..n], accept) {
                Parsed::Header(h) => Ok(Some(h)),
                Parsed::Invalid(reason) => Err(reason),
                Parsed::NeedMore => Ok(None),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => Err("read error"),
        };
    }
}

/// Reads exactly the header's bytes (all already received), and takes its client.
fn consume(conn: &mut Conn, header: proxy::Header, buf: &mut [u8]) -> Result<(), &'static str> {
    let mut read = 0;
    while read < header.len {
        match recv(&conn.stream, &mut buf[read..header.len], 0) {
            Ok(0) => return Err("closed before the header"),
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Err("read error"),
        }
    }
    if let Some((client, _)) = header.addrs {
        // An IPv4-mapped client is the IPv4 client it maps (as sticky hashes it).
        conn.peer = match client {
            SocketAddr::V6(v6) => v6
                .ip()
                .to_ipv4_mapped()
                .map_or(client, |v4| SocketAddr::new(v4.into(), v6.port())),
            v4 => v4,
        };
    }
    // Its wait for a worker starts now (the handoff latency is the master's own).
    conn.since = Instant::now();
    Ok(())
}

/// `recv` with `flags | MSG_DONTWAIT`.
fn recv(stream: &TcpStream, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes, and the descriptor is
    // open for as long as `stream` is borrowed.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
