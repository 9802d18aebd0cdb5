//! The worker process of recluster's end-to-end test suite (`tests/shared_mode.rs`).
//!
//! It is a systemd socket-activation server, as `recluster --balance shared` runs it:
//! it takes the listening sockets at fds `3..3+LISTEN_FDS` (checking `LISTEN_PID`),
//! and answers every connection with one line, then closes it:
//!
//! ```text
//! id=<WORKER_ID> pid=<pid> gen=<RECLUSTER_GENERATION> fds=<0,1,2,3> listen_pid_ok=<true|false> \
//!     listen_fds=<LISTEN_FDS> fdnames=<LISTEN_FDNAMES> workers=<RECLUSTER_WORKERS> \
//!     balance=<RECLUSTER_BALANCE> index=<listener>
//! ```
//!
//! (on one line) where `fds` lists `/proc/self/fd` as it was at the very start of
//! `main`, before any runtime, thread or epoll instance existed: exactly the
//! descriptors the worker inherited.
//!
//! On SIGTERM, SIGINT or SIGQUIT it stops accepting, finishes the connections it has
//! accepted, and exits 0.
//!
//! # How it accepts without touching the shared socket's flags
//!
//! The listening socket's open file description is shared with the master and every
//! sibling worker, so its `O_NONBLOCK` flag is too: setting it here would change it
//! under servers that expect a blocking socket. So the listener is left as it is, and:
//!
//! * one thread per listening fd (the main thread for fd 3) loops on a *blocking*
//!   `accept4(SOCK_NONBLOCK | SOCK_CLOEXEC)`, which makes only the *accepted* socket
//!   non-blocking. Should someone else have made the listener non-blocking (Node does),
//!   `EAGAIN` is met with a `poll` for readability. A connection that was accepted is
//!   always served, even if it arrived after the stop signal;
//! * the accepted sockets go over a channel to a current-thread tokio runtime (on its
//!   own thread), which writes the reply, and handles signals and sd_notify; accepting
//!   starts only once the runtime's signal handlers are installed, so a worker the
//!   master sees listening always stops gracefully;
//! * to stop, the runtime sets a flag and interrupts the accepting threads with
//!   `SIGUSR1`, whose handler is installed without `SA_RESTART` so a blocked `accept4`
//!   or `poll` returns `EINTR`; it repeats that until every accepting thread has left
//!   its loop (which closes the channel), so a signal that lands just before the call
//!   is not lost;
//! * the runtime also registers fds 3.. in its epoll instance (read interest, never
//!   awaited), as a tokio server's would be, so the master's `listening` probe can see
//!   the worker from `/proc/<pid>/fdinfo` as well as from the main thread blocked in
//!   `accept4` on fd 3 (`/proc/<pid>/syscall`). `TEST_WORKER_NO_EPOLL=1` skips that
//!   registration, leaving only the blocked `accept4` to be seen.
//!
//! # Knobs (environment)
//!
//! * `TEST_WORKER_EXIT=<code>`: exit at once with that code.
//! * `TEST_WORKER_NOTIFY=1`: send `READY=1` to `NOTIFY_SOCKET` once accepting.
//! * `TEST_WORKER_NOTIFY_DELAY_MS=<n>`: wait that long before sending it.
//! * `TEST_WORKER_IGNORE_TERM=1`: ignore SIGTERM.
//! * `TEST_WORKER_NO_LISTEN=1`: never register or accept on the listening fds.
//! * `TEST_WORKER_NO_EPOLL=1`: accept, but do not register the fds with epoll.
//! * `TEST_WORKER_REPLY_DELAY_MS=<n>`: wait that long before answering a connection.
//! * `TEST_WORKER_LISTEN_DELAY_MS=<n>`: wait that long before starting to listen (a slow
//!   boot).

use std::env;
use std::io;
use std::net::TcpStream as StdTcpStream;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncWriteExt, Interest};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// State shared by the accepting threads and the runtime.
struct Shared {
    /// Set when the worker must stop accepting.
    stop: AtomicBool,
    /// Accepting threads that entered their loop.
    started: AtomicUsize,
    /// Accepting threads that have not left their loop yet.
    running: AtomicUsize,
    /// The accepting threads, to interrupt with SIGUSR1.
    threads: std::sync::Mutex<Vec<libc::pthread_t>>,
}

/// What the runtime needs to know.
struct Config {
    reply: Arc<str>,
    listen_fds: Vec<RawFd>,
    no_listen: bool,
    no_epoll: bool,
    ignore_term: bool,
    notify: bool,
    notify_delay: Duration,
    reply_delay: Duration,
}

fn main() {
    // First of all, before anything opens a descriptor.
    let inherited = inherited_fds();

    if let Ok(code) = env::var("TEST_WORKER_EXIT") {
        std::process::exit(code.trim().parse().unwrap_or(1));
    }

    let var = |name: &str| env::var(name).unwrap_or_default();
    let flag = |name: &str| var(name) == "1";
    let millis = |name: &str| Duration::from_millis(var(name).trim().parse().unwrap_or(0));

    let no_listen = flag("TEST_WORKER_NO_LISTEN");
    let listen_fds_var = var("LISTEN_FDS");
    let listen_pid_ok = var("LISTEN_PID").trim().parse::<u32>().ok() == Some(std::process::id());
    let listen_count: usize = listen_fds_var.trim().parse().unwrap_or(0);
    if !no_listen && listen_count == 0 {
        fail(&format!(
            "LISTEN_FDS is {listen_fds_var:?}: no listening socket to serve"
        ));
    }
    let listen_fds: Vec<RawFd> = (0..listen_count).map(|i| 3 + i as RawFd).collect();
    if !no_listen {
        for &fd in &listen_fds {
            if !is_listening_socket(fd) {
                fail(&format!("fd {fd} is not a listening socket"));
            }
        }
    }

    let fds = inherited
        .iter()
        .map(|fd| fd.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let reply_prefix = format!(
        "id={} pid={} gen={} fds={} listen_pid_ok={} listen_fds={} fdnames={} workers={} balance={}",
        or_dash(var("WORKER_ID")),
        std::process::id(),
        or_dash(var("RECLUSTER_GENERATION")),
        fds,
        listen_pid_ok,
        or_dash(listen_fds_var),
        or_dash(var("LISTEN_FDNAMES")),
        or_dash(var("RECLUSTER_WORKERS")),
        or_dash(var("RECLUSTER_BALANCE")),
    );
    let ignore_term = flag("TEST_WORKER_IGNORE_TERM");
    install_signal_dispositions(ignore_term);
    std::thread::sleep(millis("TEST_WORKER_LISTEN_DELAY_MS"));

    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        started: AtomicUsize::new(0),
        running: AtomicUsize::new(if no_listen { 0 } else { listen_count }),
        threads: std::sync::Mutex::new(Vec::new()),
    });
    let config = Config {
        reply: Arc::from(reply_prefix),
        listen_fds: listen_fds.clone(),
        no_listen,
        no_epoll: flag("TEST_WORKER_NO_EPOLL"),
        ignore_term,
        notify: flag("TEST_WORKER_NOTIFY"),
        notify_delay: millis("TEST_WORKER_NOTIFY_DELAY_MS"),
        reply_delay: millis("TEST_WORKER_REPLY_DELAY_MS"),
    };

    let (tx, rx) = mpsc::unbounded_channel::<(usize, StdTcpStream)>();
    // The runtime says when its signal handlers are in place: accepting before that
    // could make the master see a listening worker that a SIGTERM would still kill.
    let (booted_tx, booted_rx) = std::sync::mpsc::channel::<()>();
    if !no_listen {
        // SAFETY: pthread_self has no preconditions.
        shared
            .threads
            .lock()
            .unwrap()
            .push(unsafe { libc::pthread_self() });
    }
    let runtime_thread = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("runtime".into())
            .spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime")
                    .block_on(run(config, shared, rx, booted_tx))
            })
            .expect("spawn runtime thread")
    };

    if booted_rx.recv().is_err() {
        // The runtime ended before booting; its exit code tells why.
        std::process::exit(runtime_thread.join().unwrap_or(101));
    }
    let mut acceptors = Vec::new();
    if no_listen {
        drop(tx);
    } else {
        for (index, &fd) in listen_fds.iter().enumerate().skip(1) {
            let (shared, tx) = (shared.clone(), tx.clone());
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            acceptors.push(
                std::thread::Builder::new()
                    .name(format!("accept-{fd}"))
                    .spawn(move || {
                        // SAFETY: pthread_self has no preconditions.
                        shared
                            .threads
                            .lock()
                            .unwrap()
                            .push(unsafe { libc::pthread_self() });
                        let _ = ready_tx.send(());
                        accept_loop(fd, index, &tx, &shared);
                    })
                    .expect("spawn accept thread"),
            );
            // Registered before the runtime can be asked to interrupt it.
            let _ = ready_rx.recv();
        }
        accept_loop(listen_fds[0], 0, &tx, &shared);
        drop(tx);
    }

    let code = runtime_thread.join().unwrap_or(101);
    for thread in acceptors {
        let _ = thread.join();
    }
    std::process::exit(code);
}

/// Blocking accept loop on one listening fd; every accepted socket goes to the runtime.
fn accept_loop(
    fd: RawFd,
    index: usize,
    tx: &mpsc::UnboundedSender<(usize, StdTcpStream)>,
    shared: &Shared,
) {
    shared.started.fetch_add(1, Ordering::SeqCst);
    while !shared.stop.load(Ordering::SeqCst) {
        // SAFETY: plain syscall; null address pointers are allowed.
        let conn = unsafe {
            libc::accept4(
                fd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if conn >= 0 {
            // SAFETY: accept4 just returned this descriptor, owned by nobody else.
            let stream = unsafe { StdTcpStream::from_raw_fd(conn) };
            if tx.send((index, stream)).is_err() {
                break;
            }
            continue;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error().unwrap_or(0) {
            libc::EINTR => {}
            libc::EAGAIN => {
                // Someone made the shared listener non-blocking: wait for a connection.
                let mut pfd = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; EINTR simply returns to the loop.
                unsafe { libc::poll(&mut pfd, 1, -1) };
            }
            libc::ECONNABORTED | libc::EPROTO | libc::EPERM => {}
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                std::thread::sleep(Duration::from_millis(10));
            }
            _ => {
                eprintln!(
                    "test_worker[{}]: accept on fd {fd}: {err}",
                    std::process::id()
                );
                break;
            }
        }
    }
    shared.running.fetch_sub(1, Ordering::SeqCst);
}

async fn run(
    config: Config,
    shared: Arc<Shared>,
    mut conns: mpsc::UnboundedReceiver<(usize, StdTcpStream)>,
    booted: std::sync::mpsc::Sender<()>,
) -> i32 {
    let mut stop_signals = Vec::new();
    let mut kinds = vec![SignalKind::interrupt(), SignalKind::quit()];
    if !config.ignore_term {
        kinds.push(SignalKind::terminate());
    }
    for kind in kinds {
        match signal(kind) {
            Ok(s) => stop_signals.push(s),
            Err(e) => fail(&format!("signal handler: {e}")),
        }
    }
    let stop = async move {
        let waits = stop_signals.iter_mut().map(|s| Box::pin(s.recv()));
        futures_select_all(waits).await
    };
    tokio::pin!(stop);

    // Watch the listeners from this runtime's epoll, as a tokio server's would be.
    let mut registrations = Vec::new();
    if !config.no_listen && !config.no_epoll {
        for &fd in &config.listen_fds {
            // SAFETY: fds 3.. stay open, unchanged, for the whole life of the process.
            match unsafe { AsyncFd::register_with_interest(Borrowed(fd), Interest::READABLE) } {
                Ok(r) => registrations.push(r),
                Err(e) => fail(&format!("epoll registration of fd {fd}: {e}")),
            }
        }
    }

    let _ = booted.send(());

    if config.notify {
        let (shared, delay, wanted) = (
            shared.clone(),
            config.notify_delay,
            if config.no_listen {
                0
            } else {
                config.listen_fds.len()
            },
        );
        tokio::spawn(async move {
            while shared.started.load(Ordering::SeqCst) < wanted {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Err(e) = sd_notify("READY=1") {
                eprintln!("test_worker[{}]: sd_notify: {e}", std::process::id());
            }
        });
    }

    if config.no_listen {
        stop.await;
        return 0;
    }

    let mut handlers = JoinSet::new();
    let mut stopping = false;
    let mut code = 0;
    loop {
        tokio::select! {
            _ = &mut stop, if !stopping => {
                stopping = true;
                registrations.clear();
                shared.stop.store(true, Ordering::SeqCst);
                let shared = shared.clone();
                tokio::spawn(async move {
                    while shared.running.load(Ordering::SeqCst) > 0 {
                        for &thread in shared.threads.lock().unwrap().iter() {
                            // SAFETY: these threads are joined only after the runtime ends.
                            unsafe { libc::pthread_kill(thread, libc::SIGUSR1) };
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                });
            }
            conn = conns.recv() => match conn {
                Some((index, stream)) => {
                    handlers.spawn(serve(stream, index, config.reply.clone(), config.reply_delay));
                }
                None => {
                    if !stopping {
                        eprintln!("test_worker[{}]: every accept loop failed", std::process::id());
                        code = 1;
                    }
                    break;
                }
            },
            Some(_) = handlers.join_next() => {}
        }
    }
    while handlers.join_next().await.is_some() {}
    code
}

/// Answers one connection: the reply line, then close.
async fn serve(stream: StdTcpStream, index: usize, reply: Arc<str>, delay: Duration) {
    let Ok(mut stream) = tokio::net::TcpStream::from_std(stream) else {
        return;
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let line = format!("{reply} index={index}\n");
    let _ = stream.write_all(line.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Resolves when any of the futures does (a tiny `select_all`, to avoid a dependency).
async fn futures_select_all<F: std::future::Future + Unpin>(futures: impl Iterator<Item = F>) {
    let mut futures: Vec<F> = futures.collect();
    if futures.is_empty() {
        return std::future::pending().await;
    }
    std::future::poll_fn(|cx| {
        for f in futures.iter_mut() {
            if std::pin::Pin::new(f).poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
        }
        std::task::Poll::Pending
    })
    .await
}

/// A descriptor this process does not own (fds 3.. are never closed here).
struct Borrowed(RawFd);

impl AsRawFd for Borrowed {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Sends one sd_notify datagram to `NOTIFY_SOCKET`.
fn sd_notify(state: &str) -> io::Result<()> {
    use std::os::unix::net::UnixDatagram;
    let path = env::var_os("NOTIFY_SOCKET")
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "NOTIFY_SOCKET is not set"))?;
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
    } else {
        socket.send_to(state.as_bytes(), &path)?;
    }
    Ok(())
}

/// The descriptors open now, sorted.
fn inherited_fds() -> Vec<RawFd> {
    let mut fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => Vec::new(),
    };
    // The listing includes the directory's own descriptor, closed by now.
    // SAFETY: F_GETFD only inspects the descriptor table.
    fds.retain(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1);
    fds.sort_unstable();
    fds
}

fn is_listening_socket(fd: RawFd) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: value and len are valid for getsockopt to write.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            &mut value as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0 && value != 0
}

extern "C" fn interrupt_accept(_: libc::c_int) {}

fn install_signal_dispositions(ignore_term: bool) {
    // SAFETY: sigaction with a zeroed struct, an empty mask and an async-signal-safe
    // handler; SIG_IGN for SIGTERM.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = interrupt_accept as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = 0; // no SA_RESTART: blocked accept4/poll return EINTR
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) != 0 {
            fail("sigaction(SIGUSR1) failed");
        }
        if ignore_term {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        }
    }
}

fn or_dash(s: String) -> String {
    if s.is_empty() || s.contains(char::is_whitespace) {
        "-".into()
    } else {
        s
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("test_worker[{}]: {msg}", std::process::id());
    std::process::exit(3);
}
