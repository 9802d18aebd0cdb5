//! The worker side: what a Rust worker uses to receive its connections, in every mode.
//!
//! One API whatever `--balance` says: [`Listener::from_env`] finds the worker channel
//! (`RECLUSTER_FD`, modes `rr`/`sticky`) or the inherited listening sockets
//! (`LISTEN_FDS`, mode `shared`), and [`Listener::accept`] yields connections with the
//! client's address. After the master says `stop` (or closes the channel, or the stop
//! signal arrives in `shared`), `accept` yields no more and the worker drains.
//!
//! ```no_run
//! # async fn serve() -> std::io::Result<()> {
//! let mut listener = recluster::worker::Listener::from_env()?;
//! recluster::worker::ready()?; // only needed with --ready-when ready
//! while let Some((stream, peer)) = listener.accept().await? {
//!     tokio::spawn(async move { let _ = (stream, peer); /* serve */ });
//! }
//! // stop received: in-flight connections finish, then the process exits.
//! # Ok(()) }
//! ```
//!
//! # Draining keep-alive connections
//!
//! A connection that carries several requests (HTTP/1.1 keep-alive, say) must learn
//! that stop has begun, or it keeps the old worker alive until the master kills it at
//! `--timeout`, cutting whatever request is in flight then. Give each connection task
//! a [`Stopping`] ([`Listener::stopping`]): once [`Stopping::is_stopping`] is true,
//! answer the request in hand and close (`Connection: close`); a connection waiting
//! for its next request selects on [`Stopping::stopped`], then waits a short idle
//! grace for that request before it closes. Closing an idle connection at the very
//! moment of stop would race a request the client is already sending: the client
//! would see the connection close with no response. `docs/PROTOCOL.md`, "Draining on
//! stop", is the contract; `examples/http.rs` follows it by hand and `examples/axum.rs`
//! with axum.
//!
//! ```no_run
//! # async fn serve() -> std::io::Result<()> {
//! use recluster::worker::{Listener, Stopping};
//! use tokio::net::TcpStream;
//!
//! async fn connection(stream: TcpStream, stopping: Stopping) {
//!     let stop = stopping.stopped();
//!     tokio::pin!(stop);
//!     loop {
//!         tokio::select! {
//!             _ = stream.readable() => { /* read and answer one request; if
//!                 stopping.is_stopping(), answer it with `Connection: close` and return */ }
//!             _ = &mut stop => { /* wait an idle grace for one more request, then return */ return }
//!         }
//!     }
//! }
//!
//! let mut listener = Listener::from_env()?;
//! let mut tasks = tokio::task::JoinSet::new();
//! while let Some((stream, _peer)) = listener.accept().await? {
//!     tasks.spawn(connection(stream, listener.stopping()));
//! }
//! while tasks.join_next().await.is_some() {} // every connection drained: exit
//! # Ok(()) }
//! ```

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, OnceLock};

use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::channel::{self, MasterLine};
use crate::fdpass::{self, FdBuf};

/// The worker's slot number (`WORKER_ID`), 0 when not run by recluster.
pub fn id() -> usize {
    env_number("WORKER_ID").unwrap_or(0)
}

/// The worker's generation (`RECLUSTER_GENERATION`), 0 when not run by recluster.
pub fn generation() -> u64 {
    env_number("RECLUSTER_GENERATION").unwrap_or(0)
}

/// Whether this process runs under recluster.
pub fn is_worker() -> bool {
    std::env::var_os("RECLUSTER_FD").is_some() || std::env::var_os("LISTEN_FDS").is_some()
}

fn env_number<T: std::str::FromStr>(key: &str) -> Option<T> {
    std::env::var(key).ok()?.parse().ok()
}

/// Tells the master this worker is ready (`--ready-when ready`).
///
/// Over the worker channel in `rr`/`sticky`, as `READY=1` on `NOTIFY_SOCKET` in
/// `shared`; does nothing outside recluster.
pub fn ready() -> io::Result<()> {
    send_to_master(b"ready\n", "READY=1")
}

/// Asks the master to start a replacement; this worker is stopped once it is ready.
///
/// recluster's `{cmd: 'disconnect'}`, e.g. for a worker whose memory grows.
pub fn request_replacement() -> io::Result<()> {
    send_to_master(b"replace\n", "RECLUSTER_REPLACE=1")
}

fn send_to_master(line: &[u8], notify: &str) -> io::Result<()> {
    if let Some(ch) = channel() {
        return fdpass::send(ch.as_fd(), line, &[], &mut FdBuf::new());
    }
    if let Some(path) = std::env::var_os("NOTIFY_SOCKET") {
        let sock = UnixDatagram::unbound()?;
        sock.send_to(notify.as_bytes(), path)?;
    }
    Ok(())
}

/// The worker channel, owned by the process for its whole life once validated.
///
/// A static owner, shared with [`Listener`], so that `ready()` and
/// `request_replacement()` can never write to a descriptor number that was closed and
/// reused: the channel is never closed.
fn channel() -> Option<&'static Arc<OwnedFd>> {
    static CHANNEL: OnceLock<Option<Arc<OwnedFd>>> = OnceLock::new();
    CHANNEL
        .get_or_init(|| {
            let fd: RawFd = env_number("RECLUSTER_FD")?;
            // A process that inherited the variable but not the channel (a grandchild,
            // fd 3 reused) must not take over whatever fd 3 is now.
            if socket_option(fd, libc::SO_TYPE) != Some(libc::SOCK_SEQPACKET) {
                return None;
            }
            // SAFETY: RECLUSTER_FD names the worker channel the master placed in this
            // process (an open SOCK_SEQPACKET socket, checked above); this static takes
            // it over once and never closes it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            set_nonblocking_cloexec(&owned).ok()?;
            Some(Arc::new(owned))
        })
        .as_ref()
}

/// Connections for this worker, however the master hands them over.
pub struct Listener {
    source: Source,
    local: Option<SocketAddr>,
    /// Set by `stop`, EOF, or the stop signal (a task watches SIGTERM).
    stopped: Arc<watch::Sender<bool>>,
    /// Set once `accept` has returned `None`: nothing received is left to hand out.
    drained: watch::Sender<bool>,
}

enum Source {
    /// `rr`/`sticky`: descriptors arrive over the worker channel.
    Channel {
        fd: AsyncFd<Arc<OwnedFd>>,
        queue: VecDeque<(std::net::TcpStream, SocketAddr)>,
        buf: Vec<u8>,
        cbuf: FdBuf,
        fds: Vec<OwnedFd>,
        /// The highest descriptor number of the last message (see `fd_headroom`).
        last_fd: RawFd,
    },
    /// `shared`: the inherited listening sockets.
    Shared(Vec<TcpListener>),
}

impl Listener {
    /// Takes over what the master gave this worker and says `listening` to it.
    ///
    /// Must be called inside a tokio runtime, once per process.
    pub fn from_env() -> io::Result<Listener> {
        static TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if TAKEN.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Err(io::Error::other(
                "Listener::from_env takes over the inherited descriptors: call it once per process",
            ));
        }
        raise_fd_limit();
        if let Some(ch) = channel() {
            if env_number::<u32>("RECLUSTER_PROTOCOL").is_some_and(|v| v != channel::VERSION) {
                return Err(io::Error::other(
                    "the master speaks another worker-channel protocol version: upgrade the worker library",
                ));
            }
            let stopped = drain_on_stop_signal()?;
            let listener = Listener {
                source: Source::Channel {
                    fd: fdpass::register(ch.clone())?,
                    queue: VecDeque::new(),
                    buf: vec![0u8; channel::MAX_MASTER_MESSAGE],
                    cbuf: FdBuf::new(),
                    fds: Vec::with_capacity(fdpass::MAX_FDS),
                    last_fd: 0,
                },
                local: None,
                stopped,
                drained: watch::channel(false).0,
            };
            send_to_master(b"listening\n", "")?;
            return Ok(listener);
        }
        let count: usize = env_number("LISTEN_FDS").ok_or_else(|| {
            io::Error::other("not started by recluster: neither RECLUSTER_FD nor LISTEN_FDS is set")
        })?;
        // As sd_listen_fds(3): the descriptors are this process's only if LISTEN_PID
        // names it (a child that inherited the variables must not take them).
        if env_number::<u32>("LISTEN_PID") != Some(std::process::id()) {
            return Err(io::Error::other(
                "LISTEN_FDS is not meant for this process: LISTEN_PID is missing or names another",
            ));
        }
        let count = RawFd::try_from(count)
            .ok()
            .filter(|&n| n <= 1024)
            .ok_or_else(|| io::Error::other("LISTEN_FDS is out of range"))?;
        for fd in 3..3 + count {
            if !is_listening_socket(fd) {
                return Err(io::Error::other(format!(
                    "descriptor {fd}, named by LISTEN_FDS, is not an open listening socket"
                )));
            }
        }
        let stopped = drain_on_stop_signal()?;
        let mut listeners = Vec::with_capacity(count as usize);
        for fd in 3..3 + count {
            // SAFETY: the socket-activation protocol hands fds 3..3+LISTEN_FDS to this
            // process (LISTEN_PID says so, and each is an open listening socket, checked
            // above); we take ownership once (from_env is once per process).
            let std = unsafe { std::net::TcpListener::from_raw_fd(fd) };
            // O_NONBLOCK lives on the open file description, which the master and the
            // sibling workers share: they all see it. The master never accepts in
            // `shared`, and siblings run this same library, so that is harmless here;
            // a cluster mixing in a server that expects a blocking socket would not be.
            set_nonblocking_cloexec(&std)?;
            listeners.push(TcpListener::from_std(std)?);
        }
        let local = listeners.first().and_then(|l| l.local_addr().ok());
        Ok(Listener {
            source: Source::Shared(listeners),
            local,
            stopped,
            drained: watch::channel(false).0,
        })
    }

    /// The next connection and its client's address; `None` once the master said stop.
    pub async fn accept(&mut self) -> io::Result<Option<(TcpStream, SocketAddr)>> {
        let mut stop = self.stopped.subscribe();
        let next = match &mut self.source {
            Source::Shared(_) if *stop.borrow_and_update() => Ok(None),
            Source::Shared(listeners) => {
                tokio::select! {
                    biased;
                    _ = stop.changed() => Ok(None),
                    r = accept_any(listeners) => r.map(Some),
                }
            }
            Source::Channel {
                fd,
                queue,
                buf,
                cbuf,
                fds,
                last_fd,
            } => loop {
                // Connections already read off the channel are this worker's to serve,
                // stop or not: nobody else can take them back.
                if let Some((s, peer)) = queue.pop_front() {
                    s.set_nonblocking(true)?;
                    break Ok(Some((TcpStream::from_std(s)?, peer)));
                }
                // Once stopped, read no more: what is still queued on the channel is
                // taken back by the master once this process has exited.
                if *stop.borrow_and_update() {
                    break Ok(None);
                }
                // Read only with room for a whole message of descriptors: past the fd
                // limit the kernel would drop them, and their clients with them. Left
                // unread, they wait in the channel, and the master sends new ones to
                // other workers; what this worker frees lets it read again.
                if !fd_headroom(fds_in_use_hint(queue, *last_fd)) {
                    tokio::select! {
                        biased;
                        _ = stop.changed() => {}
                        _ = tokio::time::sleep(HEADROOM_RECHECK) => {}
                    }
                    continue;
                }
                let mut guard = tokio::select! {
                    biased;
                    _ = stop.changed() => continue,
                    g = fd.readable() => g?,
                };
                let got = match guard.try_io(|f| fdpass::recv(f.as_fd(), buf, fds, cbuf)) {
                    Ok(r) => r?,
                    Err(_would_block) => continue,
                };
                if got.fds_truncated {
                    report_lost_connections();
                }
                {
                    use std::os::fd::AsRawFd;
                    *last_fd = fds.iter().map(|f| f.as_raw_fd()).max().unwrap_or(*last_fd);
                }
                if got.len == 0 && fds.is_empty() {
                    self.stopped.send_replace(true); // EOF: the master is gone
                    break Ok(None);
                }
                let mut got_stop = false;
                let mut fd_iter = fds.drain(..);
                for line in channel::lines(&buf[..got.len]) {
                    match channel::parse_master_line(line) {
                        MasterLine::Conn { peer, local, .. } => {
                            if let Some(fd) = fd_iter.next() {
                                self.local.get_or_insert(local);
                                queue.push_back((std::net::TcpStream::from(fd), peer));
                            }
                        }
                        MasterLine::Stop => got_stop = true,
                        MasterLine::Unknown(_) => {} // a newer master: ignore
                    }
                }
                drop(fd_iter); // closes descriptors without a record
                if got_stop {
                    // Connections before `stop` are ours to serve (the loop hands them
                    // out first); nothing comes after it.
                    self.stopped.send_replace(true);
                }
            },
        };
        if matches!(next, Ok(None)) {
            self.drained.send_replace(true);
        }
        next
    }

    /// The local address connections arrive on (known in `rr`/`sticky` after the first one).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local
    }

    /// Resolves once this worker has nothing more to accept: after the master's `stop`,
    /// EOF, or the stop signal, `accept` has handed out every connection already
    /// received and returned `None`. Then drain the open connections and exit (a
    /// connection task learns that stop has begun from [`Listener::stopping`]).
    pub fn shutdown(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.drained.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Whether stop has begun, for the connection tasks: one per connection, cheap.
    ///
    /// It turns true the moment the master says `stop` (seen by `accept`), closes the
    /// channel, or the stop signal arrives, before `accept` has handed out what it had
    /// already received: those connections, too, are served as the worker stops.
    pub fn stopping(&self) -> Stopping {
        Stopping {
            rx: self.stopped.subscribe(),
        }
    }
}

/// Whether this worker has begun to stop: what a connection task checks to drain.
///
/// Cloning it is cheap (a reference count); [`Stopping::is_stopping`] takes no system
/// call. Get one from [`Listener::stopping`], or make one from a flag of your own
/// with `From<watch::Receiver<bool>>` (true = stop), say for a server also run
/// outside recluster. See the module's "Draining keep-alive connections".
#[derive(Clone, Debug)]
pub struct Stopping {
    rx: watch::Receiver<bool>,
}

impl Stopping {
    /// True once stop has begun: answer the request in hand with `Connection: close`.
    pub fn is_stopping(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once stop has begun (at once if it has), or once nothing can say stop
    /// any more (the flag's sender is gone). Cancel-safe, `Send` and `'static`: pin it
    /// once per connection and select on it while waiting for the next request.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

impl From<watch::Receiver<bool>> for Stopping {
    /// A stop flag of your own: stop begins when it turns true.
    fn from(rx: watch::Receiver<bool>) -> Stopping {
        Stopping { rx }
    }
}

/// Accepts on whichever of the shared listeners has a connection first.
async fn accept_any(listeners: &[TcpListener]) -> io::Result<(TcpStream, SocketAddr)> {
    std::future::poll_fn(|cx| {
        for l in listeners {
            if let std::task::Poll::Ready(r) = l.poll_accept(cx) {
                return std::task::Poll::Ready(r);
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// How often a worker at its descriptor limit checks whether it may read again.
const HEADROOM_RECHECK: std::time::Duration = std::time::Duration::from_millis(10);

/// The soft `RLIMIT_NOFILE` as [`raise_fd_limit`] left it (descriptor numbers must be
/// below it).
static FD_LIMIT: OnceLock<i64> = OnceLock::new();

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as servers commonly do: a worker
/// holds one descriptor per connection, and the soft default (often 1024) is low.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit read and write a struct we own.
    let limit = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        lim.rlim_cur.min(i32::MAX as libc::rlim_t) as i64
    };
    let _ = FD_LIMIT.set(limit);
    // A hard limit so low that a whole message of descriptors never fits: this worker
    // would never read a connection (they wait, and the master replaces it as stuck).
    // Say so plainly, once, rather than serve nothing in silence.
    let need = fdpass::MAX_FDS as i64 + 8;
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64);
    if limit - open < need {
        let line = format!(
            "recluster worker {}: the descriptor limit ({limit}, {open} in use) leaves no room \
             for a message of {} connections, so this worker cannot take any: raise the hard \
             limit (ulimit -H -n) to at least {}\n",
            std::process::id(),
            fdpass::MAX_FDS,
            open + need + 64
        );
        // SAFETY: write(2) of a buffer we own to stderr; a failure is ignored.
        unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    }
}

/// The highest descriptor number this library knows to be in use: a cheap sign of how
/// close the process is to its limit (descriptors are allocated lowest first).
fn fds_in_use_hint(queue: &VecDeque<(std::net::TcpStream, SocketAddr)>, last: RawFd) -> RawFd {
    use std::os::fd::AsRawFd;
    queue
        .iter()
        .map(|(s, _)| s.as_raw_fd())
        .max()
        .unwrap_or(0)
        .max(last)
}

/// Whether the process has room for one more message of [`fdpass::MAX_FDS`]
/// descriptors. Far from the limit (by `hint`, and the lowest free descriptor) it
/// answers at once; near it, it counts the open descriptors in /proc.
fn fd_headroom(hint: RawFd) -> bool {
    let Some(&limit) = FD_LIMIT.get() else {
        return true;
    };
    let need = fdpass::MAX_FDS as i64 + 8;
    // The hot path: far below the limit, no system call at all.
    if hint as i64 + 4 * need < limit {
        return true;
    }
    // The lowest free descriptor: dup'd and closed at once.
    // SAFETY: F_DUPFD_CLOEXEC on stdin's slot number only allocates a new descriptor,
    // which we close right away; a failure (EMFILE, EINVAL) returns -1.
    let lowest = unsafe {
        let fd = libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 0);
        if fd >= 0 {
            libc::close(fd);
        }
        fd as i64
    };
    if lowest >= 0 && (hint as i64).max(lowest) + 2 * need < limit {
        return true;
    }
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as i64);
    limit - open >= need
}

/// Says on stderr, once in a while, that the kernel dropped descriptors sent to this
/// worker (its clients lost their connections): the limit is too low.
fn report_lost_connections() {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LOST: AtomicU64 = AtomicU64::new(0);
    let n = LOST.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        let line = format!(
            "recluster worker {}: connections lost at the descriptor limit ({n} times): raise ulimit -n\n",
            std::process::id()
        );
        // SAFETY: write(2) of a buffer we own to stderr; a failure is ignored.
        unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
    }
}

/// From here on SIGTERM drains instead of killing: the returned flag is set when it
/// comes. Installed only once the environment checked out, so that a process that is
/// no worker keeps SIGTERM's default action.
fn drain_on_stop_signal() -> io::Result<Arc<watch::Sender<bool>>> {
    let stopped = Arc::new(watch::channel(false).0);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let on_term = stopped.clone();
    tokio::spawn(async move {
        if term.recv().await.is_some() {
            on_term.send_replace(true);
        }
    });
    Ok(stopped)
}

/// Whether `fd` is an open, listening TCP socket (IPv4 or IPv6, `SOCK_STREAM`).
fn is_listening_socket(fd: RawFd) -> bool {
    socket_option(fd, libc::SO_ACCEPTCONN).is_some_and(|on| on != 0)
        && socket_option(fd, libc::SO_TYPE) == Some(libc::SOCK_STREAM)
        && matches!(
            socket_option(fd, libc::SO_DOMAIN),
            Some(libc::AF_INET | libc::AF_INET6)
        )
}

/// An integer `SOL_SOCKET` option of `fd`; `None` when it is closed or no socket.
fn socket_option(fd: RawFd, option: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `value`, which we own; a
    // closed descriptor or one that is no socket gives an error, not undefined behaviour.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            (&mut value as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

fn set_nonblocking_cloexec(fd: &impl AsFd) -> io::Result<()> {
    fdpass::set_flags(fd.as_fd(), true, true)
}

/// `axum::serve(listener, app)` runs unchanged on a recluster worker (feature `axum`).
///
/// After the master says stop, `accept` never completes: pair it with
/// `.with_graceful_shutdown(…)` so the server drains and returns. Not with
/// `listener.shutdown()` alone if clients keep connections alive: axum's graceful
/// shutdown closes the connections idle at that moment, cutting the requests their
/// clients are sending (641 failed requests in 20 reloads with 32 clients, in
/// `tests/keepalive.rs`).
/// `examples/axum.rs` drains without loss: after [`Listener::stopping`], every
/// response says `Connection: close`, and the graceful shutdown starts an idle grace
/// later.
#[cfg(feature = "axum")]
impl axum::serve::Listener for Listener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match Listener::accept(self).await {
                Ok(Some(conn)) => return conn,
                Ok(None) => std::future::pending::<()>().await,
                Err(e) => {
                    // As axum does for its own listener: say so, back off, retry.
                    tracing::error!(event = "accept_failed", error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Listener::local_addr(self).ok_or_else(|| {
            io::Error::other("the local address is known after the first connection")
        })
    }
}
