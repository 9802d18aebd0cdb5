//! The sd_notify endpoint workers report readiness to (`NOTIFY_SOCKET`).
//!
//! Speaking systemd's notification protocol lets a worker written in any language
//! signal readiness with the library it already has (`sd_notify(0, "READY=1")`,
//! Python's `sdnotify`, Rust's `sd-notify`, …) instead of a recluster-specific one.
//! The socket is a unix datagram socket with `SO_PASSCRED`, so the kernel stamps
//! every datagram with the sender's pid: the master attributes readiness to the
//! worker that really sent it, and ignores anyone else.
//!
//! It is bound to a filesystem path rather than an abstract address because some
//! sd_notify clients (the Rust `sd-notify` crate among them) only connect to paths,
//! and it lives in a fresh directory of mode 0700 so that only our user (and the
//! workers we start as that user) can reach it.
//!
//! [`notify_service_manager`] is the other direction: the master telling *its own*
//! service manager (systemd running recluster as a `Type=notify` service) that it is
//! ready, reloading or stopping.

use std::collections::hash_map::RandomState;
use std::ffi::OsString;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::os::fd::AsFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use nix::sys::socket::{setsockopt, sockopt};
use tokio::io::unix::AsyncFd;

use crate::fdpass::{self, FdBuf};

/// Largest datagram accepted; longer ones are truncated by the kernel and dropped.
const MAX_DATAGRAM: usize = 4096;

/// File name of the socket inside its private directory.
const SOCKET_NAME: &str = "notify.sock";

/// Distinguishes directories of several sockets bound by one process.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// One datagram received on the notify socket, with the sender's pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotifyMessage {
    /// Pid of the sending process, from SCM_CREDENTIALS.
    pub pid: u32,
    /// `READY=1` was among the assignments.
    pub ready: bool,
    /// `STOPPING=1` was among the assignments.
    pub stopping: bool,
    /// `RECLUSTER_REPLACE=1` (recluster's own): the worker asks to be replaced.
    pub replace: bool,
}

/// A unix datagram socket bound in a private (0700) directory.
pub(crate) struct NotifySocket {
    /// The non-blocking socket, registered with tokio's reactor.
    socket: AsyncFd<UnixDatagram>,
    /// The private directory holding the socket, removed on drop.
    dir: PathBuf,
    /// `dir/notify.sock`, the address given to workers.
    path: PathBuf,
}

impl NotifySocket {
    /// Creates the private directory and binds the socket with SO_PASSCRED.
    ///
    /// The directory is created under `$XDG_RUNTIME_DIR` when set, else the system
    /// temporary directory. Must be called within a tokio runtime (an error otherwise).
    pub(crate) fn bind() -> io::Result<NotifySocket> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute() && p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        remove_stale_dirs(&base);
        let dir = create_private_dir(&base)?;
        let path = dir.join(SOCKET_NAME);
        match bind_socket(&path) {
            Ok(socket) => Ok(NotifySocket { socket, dir, path }),
            Err(e) => {
                let _ = std::fs::remove_dir(&dir);
                Err(io::Error::new(
                    e.kind(),
                    format!("cannot bind notify socket {}: {e}", path.display()),
                ))
            }
        }
    }

    /// Lets workers running in group `gid` (`--user`, `--group`) reach the socket and
    /// nothing more: the private directory stays the master's, searchable by that group
    /// only (0710: no listing, no creating, no renaming or deleting), and the socket is
    /// writable by it (0660), which `connect`/`sendto` need.
    pub(crate) fn allow_group(&self, gid: u32) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::os::unix::fs::chown(&self.dir, None, Some(gid))?;
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o710))?;
        std::os::unix::fs::chown(&self.path, None, Some(gid))?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o660))
    }

    /// Filesystem path to give workers in `NOTIFY_SOCKET`.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Receives the next well-formed datagram that carries credentials.
    ///
    /// Datagrams without credentials, truncated ones (over 4 KiB) and ones that carry
    /// neither `READY=1` nor `STOPPING=1` are skipped; descriptors sent along are
    /// closed. Cancel-safe: a datagram is consumed only when returned or skipped.
    pub(crate) async fn recv(&self) -> io::Result<NotifyMessage> {
        let mut data = vec![0u8; MAX_DATAGRAM];
        // Descriptors past the buffer's room are never installed (the kernel drops
        // them, MSG_CTRUNC); the ones that fit are closed by `recv_one`.
        let mut cbuf = FdBuf::with_credentials();
        loop {
            let mut guard = self.socket.readable().await?;
            match guard.try_io(|s| recv_one(s.get_ref(), &mut data, &mut cbuf)) {
                Ok(Ok(Some(message))) => return Ok(message),
                Ok(Ok(None)) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

impl Drop for NotifySocket {
    /// Removes the socket file and its private directory.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Removes the directories that masters killed before they could clean up left in
/// `base`: `recluster-<pid>-<n>-<hex>`, owned by this user, holding nothing but the
/// socket, which nobody has bound any more (or, with no socket yet, whose pid is
/// gone). Anything else (a live master's, another user's, a link, a directory with
/// other contents) is left alone.
///
/// The socket, not the pid, tells: a master in another PID namespace that shares this
/// directory (a container's PID 1 with the host's /tmp, or the host's master seen from
/// the container) has a pid this process cannot see, or one that names another
/// process here; each would take the other's live directory for stale, or keep a
/// stale one for ever.
fn remove_stale_dirs(base: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    for entry in entries.flatten().take(100_000) {
        let name = entry.file_name();
        let Some(pid) = stale_dir_pid(&name.to_string_lossy()) else {
            continue;
        };
        let dir = entry.path();
        let owned_dir = std::fs::symlink_metadata(&dir)
            .is_ok_and(|m| m.is_dir() && m.uid() == uid);
        if !owned_dir {
            continue;
        }
        let stale = match socket_bound(&dir.join(SOCKET_NAME)) {
            Some(bound) => !bound,
            // No socket: a master between creating its directory and binding, or killed
            // there. (One in another PID namespace could lose its directory in that
            // moment, and fail to start, saying so.)
            None => !pid_alive(pid),
        };
        if !stale {
            continue;
        }
        let _ = std::fs::remove_file(dir.join(SOCKET_NAME));
        let _ = std::fs::remove_dir(&dir); // fails, harmlessly, if anything else is inside
    }
}

/// The pid in a notify directory's name `recluster-<pid>-<n>-<16 hex digits>`.
fn stale_dir_pid(name: &str) -> Option<i32> {
    let mut parts = name.strip_prefix("recluster-")?.split('-');
    let pid: i32 = parts.next()?.parse().ok()?;
    let n_ok = parts.next()?.parse::<u64>().is_ok();
    let hex = parts.next()?;
    let hex_ok = hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit());
    (n_ok && hex_ok && parts.next().is_none() && pid > 0).then_some(pid)
}

/// Whether a socket is bound at `path` (a datagram `connect` to it succeeds), not
/// (refused: a socket file nobody holds, or not a socket); `None` when there is none.
fn socket_bound(path: &Path) -> Option<bool> {
    let probe = UnixDatagram::unbound().ok()?;
    match probe.connect(path) {
        Ok(()) => Some(true),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Some(false),
        Err(_) => None,
    }
}

/// Whether a process `pid` exists (another user's counts).
fn pid_alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

fn create_private_dir(base: &Path) -> io::Result<PathBuf> {
    let pid = std::process::id();
    for _ in 0..16 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // RandomState is seeded from the OS's random source once per process and
        // then incremented, so hashing the counter and clock gives a fresh suffix.
        let mut h = RandomState::new().build_hasher();
        h.write_u64(n);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        let dir = base.join(format!("recluster-{pid}-{n}-{:016x}", h.finish()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                // The umask can only have removed bits; make it exactly 0700.
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
                return Ok(dir);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot create directory {}: {e}", dir.display()),
                ))
            }
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("cannot create a fresh directory in {}", base.display()),
    ))
}

/// Binds the datagram socket at `path`, non-blocking, with SO_PASSCRED.
fn bind_socket(path: &Path) -> io::Result<AsyncFd<UnixDatagram>> {
    let socket = UnixDatagram::bind(path)?; // std opens with SOCK_CLOEXEC
    socket.set_nonblocking(true)?;
    setsockopt(&socket, sockopt::PassCred, &true)?;
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other("the notify socket needs a tokio runtime"));
    }
    fdpass::register(socket)
}

/// Receives one datagram; `Ok(None)` when it is to be skipped.
fn recv_one(
    socket: &UnixDatagram,
    data: &mut [u8],
    cbuf: &mut FdBuf,
) -> io::Result<Option<NotifyMessage>> {
    let mut fds = Vec::new();
    let got = fdpass::recv(socket.as_fd(), data, &mut fds, cbuf)?;
    drop(fds); // descriptors have no place in sd_notify: closed
    if got.truncated {
        return Ok(None);
    }
    let Some(pid) = got.pid.filter(|&p| p != 0) else {
        return Ok(None);
    };
    let (ready, stopping, replace) = parse(&data[..got.len]);
    Ok((ready || stopping || replace).then_some(NotifyMessage {
        pid,
        ready,
        stopping,
        replace,
    }))
}

/// Finds `READY=1`, `STOPPING=1` and `RECLUSTER_REPLACE=1` among newline-separated assignments.
fn parse(data: &[u8]) -> (bool, bool, bool) {
    let (mut ready, mut stopping, mut replace) = (false, false, false);
    for line in data.split(|&b| b == b'\n') {
        match line {
            b"READY=1" => ready = true,
            b"STOPPING=1" => stopping = true,
            b"RECLUSTER_REPLACE=1" => replace = true,
            _ => {}
        }
    }
    (ready, stopping, replace)
}

/// `CLOCK_MONOTONIC` now, in microseconds (`MONOTONIC_USEC=` of a `RELOADING=1`).
pub(crate) fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the pointer given, valid for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

/// Sends `READY=1` (or other state) to the master's own service manager, if `NOTIFY_SOCKET` is set.
///
/// `state` goes out as one datagram. Returns `Ok(false)` when the variable is unset or
/// empty (not running under a service manager that wants notifications).
pub(crate) fn notify_service_manager(state: &str) -> io::Result<bool> {
    notify_to(std::env::var_os("NOTIFY_SOCKET"), state)
}

/// [`notify_service_manager`] with the `NOTIFY_SOCKET` value given.
fn notify_to(addr: Option<OsString>, state: &str) -> io::Result<bool> {
    match addr {
        Some(addr) if !addr.is_empty() => {
            send_to(&addr, state.as_bytes())?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Sends one datagram to a `NOTIFY_SOCKET` address (a path, or `@name` for abstract).
fn send_to(addr: &OsString, data: &[u8]) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = addr.as_bytes();
    let address = match bytes.first() {
        Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
        Some(b'/') => SocketAddr::from_pathname(addr)?,
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "unsupported NOTIFY_SOCKET address `{}` (want a path or @name)",
                    addr.to_string_lossy()
                ),
            ))
        }
    };
    let socket = UnixDatagram::unbound()?;
    // A manager that does not read must not stop the master: EAGAIN is an error here.
    socket.set_nonblocking(true)?;
    let sent = socket.send_to_addr(data, &address)?;
    if sent != data.len() {
        return Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "notification datagram was cut short",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::timeout;

    /// Deadline for anything the tests wait for.
    const DEADLINE: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn ready_from_own_pid() {
        let sock = NotifySocket::bind().unwrap();
        let client = UnixDatagram::unbound().unwrap();
        client
            .send_to(b"STATUS=starting\nREADY=1\n", sock.path())
            .unwrap();
        let msg = timeout(DEADLINE, sock.recv()).await.unwrap().unwrap();
        assert_eq!(
            msg,
            NotifyMessage {
                pid: std::process::id(),
                ready: true,
                stopping: false,
                replace: false
            }
        );
    }

    #[tokio::test]
    async fn directory_is_private_and_removed_on_drop() {
        let sock = NotifySocket::bind().unwrap();
        let dir = sock.path().parent().unwrap().to_path_buf();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o7777, 0o700);
        assert!(sock.path().exists());
        let other = NotifySocket::bind().unwrap();
        assert_ne!(other.path(), sock.path());
        drop(sock);
        assert!(!dir.exists());
    }

    #[tokio::test]
    async fn garbage_is_not_ready() {
        let sock = NotifySocket::bind().unwrap();
        let client = UnixDatagram::unbound().unwrap();
        client
            .send_to(b"READY=10\nREADY\n\xff\xfe", sock.path())
            .unwrap();
        client
            .send_to(&[b'x'; MAX_DATAGRAM + 1], sock.path())
            .unwrap();
        let mut big = vec![b'\n'; MAX_DATAGRAM + 100];
        big[..7].copy_from_slice(b"READY=1");
        client.send_to(&big, sock.path()).unwrap();
        client.send_to(b"STOPPING=1", sock.path()).unwrap();
        // The first datagram that counts is the last one: garbage and truncated
        // datagrams were skipped.
        let msg = timeout(DEADLINE, sock.recv()).await.unwrap().unwrap();
        assert!(!msg.ready && msg.stopping, "{msg:?}");
    }

    #[tokio::test]
    async fn passed_fds_are_closed() {
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        use std::os::fd::AsRawFd;
        let sock = NotifySocket::bind().unwrap();
        let client = UnixDatagram::unbound().unwrap();
        let (a, _b) = UnixDatagram::pair().unwrap();
        // More than the receive buffer's room (the kernel drops the excess, MSG_CTRUNC).
        let fds = [a.as_raw_fd(); 2 * crate::fdpass::MAX_FDS];
        let addr = nix::sys::socket::UnixAddr::new(sock.path()).unwrap();
        sendmsg(
            client.as_raw_fd(),
            &[io::IoSlice::new(b"READY=1")],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            Some(&addr),
        )
        .unwrap();
        let msg = timeout(DEADLINE, sock.recv()).await.unwrap().unwrap();
        assert!(msg.ready);
        // Nothing in this process points at `a`'s socket but `a` itself now.
        let target = std::fs::read_link(format!("/proc/self/fd/{}", a.as_raw_fd())).unwrap();
        let count = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
            .filter(|t| *t == target)
            .count();
        assert_eq!(count, 1);
    }

    #[test]
    fn stale_directories_of_dead_masters_are_removed_and_nothing_else() {
        let base = create_private_dir(&std::env::temp_dir()).unwrap();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = base.join(format!("recluster-{dead}-0-00000000000000ab"));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join(SOCKET_NAME), b"").unwrap();
        let live = base.join(format!("recluster-{}-0-00000000000000ab", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        let crowded = base.join(format!("recluster-{dead}-1-00000000000000ab"));
        std::fs::create_dir(&crowded).unwrap();
        std::fs::write(crowded.join("other"), b"").unwrap();
        let odd = base.join(format!("recluster-{dead}-x"));
        std::fs::create_dir(&odd).unwrap();
        // A live master in another PID namespace: its pid means nothing here, its
        // socket is bound.
        let elsewhere = base.join(format!("recluster-{dead}-2-00000000000000ab"));
        std::fs::create_dir(&elsewhere).unwrap();
        let bound = UnixDatagram::bind(elsewhere.join(SOCKET_NAME)).unwrap();
        // A killed master of another namespace whose pid (1, say) lives here: its
        // socket file is left, bound by nobody.
        let reused = base.join(format!("recluster-{}-3-00000000000000ab", std::process::id()));
        std::fs::create_dir(&reused).unwrap();
        drop(UnixDatagram::bind(reused.join(SOCKET_NAME)).unwrap());
        remove_stale_dirs(&base);
        assert!(!stale.exists(), "a dead master's directory stays");
        assert!(!reused.exists(), "a directory whose socket nobody holds stays");
        assert!(live.exists() && crowded.exists() && odd.exists());
        assert!(elsewhere.exists(), "a live socket's directory was removed");
        drop(bound);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn service_manager_path_and_abstract() {
        let dir = create_private_dir(&std::env::temp_dir()).unwrap();
        let path = dir.join("sm.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_read_timeout(Some(DEADLINE)).unwrap();
        assert!(notify_to(Some(path.clone().into()), "READY=1").unwrap());
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        let name = format!("recluster-test-{}", std::process::id());
        let abs = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
        abs.set_read_timeout(Some(DEADLINE)).unwrap();
        assert!(notify_to(Some(format!("@{name}").into()), "STOPPING=1").unwrap());
        let n = abs.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");

        assert!(notify_to(Some("relative".into()), "READY=1").is_err());
        assert!(!notify_to(Some("".into()), "READY=1").unwrap());
        assert!(!notify_to(None, "READY=1").unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
