//! Binding the listening sockets the master owns for its whole life.
//!
//! The master binds every `--listen` address once, at startup, and keeps the sockets
//! open until it exits: that is what makes reloads zero-downtime, since the kernel's
//! accept queue outlives any worker. In `rr`/`sticky` mode the master accepts on them
//! itself; in `shared` mode workers inherit them at fds 3.. and accept directly.
//!
//! The sockets are left **blocking**: in `shared` mode every worker shares the same
//! open file description, and `O_NONBLOCK` lives on the description (a `dup` or an
//! inherited copy shares it), so whatever one holder sets, all see. Servers written
//! for socket activation expect a blocking socket and set it non-blocking themselves
//! if they want to; the master never accepts on a `shared` socket, so it never needs
//! to. In `rr`/`sticky` no worker holds the sockets, and the balancer sets them
//! non-blocking. They are close-on-exec (socket2's default) and only reach a worker
//! through an explicit dup2 in `runtime::launch`.
//!
//! Under systemd socket activation (`LISTEN_PID` = the master's pid, `LISTEN_FDS` = N)
//! the master takes the sockets at fds 3..3+N instead of binding ([`activated`]).
//!
//! For IPv6 addresses `IPV6_V6ONLY` keeps the operating system default
//! (`net.ipv6.bindv6only`, 0 on Linux), so `[::]:port` also accepts IPv4 clients;
//! listening on both `0.0.0.0:port` and `[::]:port` then fails with "address in use",
//! and listening on `[::]:port` alone is the way to serve both families.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{BorrowedFd, FromRawFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Binds `addr` with SO_REUSEADDR, CLOEXEC, blocking, and listens with `backlog`.
///
/// Errors name the address, e.g. `cannot listen on 127.0.0.1:80: Permission denied
/// (os error 13)`, and keep the original error kind.
pub(crate) fn bind(addr: SocketAddr, backlog: i32) -> io::Result<std::net::TcpListener> {
    let with_context =
        |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"));
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(with_context)?;
    // Lets a restarted master bind again while old connections sit in TIME_WAIT.
    socket.set_reuse_address(true).map_err(with_context)?;
    socket.bind(&addr.into()).map_err(with_context)?;
    socket.listen(backlog).map_err(with_context)?;
    Ok(socket.into())
}

/// The first descriptor a service manager passes (systemd's `SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// The listening sockets the service manager passed to this process (socket
/// activation), in order: `None` when `LISTEN_PID` is not this process's pid or
/// `LISTEN_FDS` is unset. Each must be a listening TCP socket; it is made close-on-exec
/// (systemd passes them without), so it reaches workers only as the master decides.
pub(crate) fn activated() -> io::Result<Option<Vec<TcpListener>>> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let (Some(pid), Some(fds)) = (var("LISTEN_PID"), var("LISTEN_FDS")) else {
        return Ok(None);
    };
    if pid.parse::<u32>().ok() != Some(std::process::id()) {
        return Ok(None);
    }
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidInput, why);
    let count: i32 = fds
        .parse()
        .ok()
        .filter(|&n| (0..=1024).contains(&n))
        .ok_or_else(|| bad(format!("LISTEN_FDS={fds}: want a count of passed sockets, 0 to 1024")))?;
    if count == 0 {
        // sd_listen_fds' convention: nothing passed, bind as usual.
        return Ok(None);
    }
    let mut listeners = Vec::with_capacity(count as usize);
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count {
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(bad(format!("LISTEN_FDS={fds}: descriptor {fd} is not open")));
        }
        // SAFETY: the descriptor is open (just checked) and only borrowed for the checks
        // below, while nothing closes it.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = socket2::SockRef::from(&borrowed);
        let tcp_listener = socket.r#type().is_ok_and(|t| t == socket2::Type::STREAM)
            && socket.local_addr().is_ok_and(|a| a.as_socket().is_some())
            && socket.is_listener().unwrap_or(false);
        if !tcp_listener {
            return Err(bad(format!(
                "LISTEN_FDS={fds}: descriptor {fd} is not a listening TCP socket \
                 (recluster serves ListenStream= sockets of TCP addresses)"
            )));
        }
        socket.set_cloexec(true)?;
        // SAFETY: the service manager passed this descriptor to this process for it to
        // own; it is taken once (the loop visits each number once) and nothing else in
        // the master refers to fds 3.. before this runs.
        listeners.push(unsafe { TcpListener::from_raw_fd(fd) });
    }
    Ok(Some(listeners))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::os::fd::AsRawFd;

    #[test]
    fn binds_listens_and_accepts() {
        let listener = bind("127.0.0.1:0".parse().unwrap(), 128).unwrap();
        let addr = listener.local_addr().unwrap();
        assert_ne!(addr.port(), 0);
        // SAFETY: F_GETFD/F_GETFL only read the descriptor's flags.
        let (fd_flags, fl_flags) = unsafe {
            (
                libc::fcntl(listener.as_raw_fd(), libc::F_GETFD),
                libc::fcntl(listener.as_raw_fd(), libc::F_GETFL),
            )
        };
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0, "close-on-exec");
        assert_eq!(fl_flags & libc::O_NONBLOCK, 0, "blocking");

        let mut client = TcpStream::connect(addr).unwrap();
        let (mut conn, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        client.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
    }

    #[test]
    fn ipv6_when_available() {
        match bind("[::1]:0".parse().unwrap(), 16) {
            Ok(listener) => {
                let addr = listener.local_addr().unwrap();
                assert!(addr.is_ipv6());
                TcpStream::connect(addr).unwrap();
                listener.accept().unwrap();
            }
            // Containers without IPv6 loopback.
            Err(e) => assert!(
                e.to_string().starts_with("cannot listen on [::1]:0: "),
                "{e}"
            ),
        }
    }

    #[test]
    fn errors_name_the_address() {
        let first = bind("127.0.0.1:0".parse().unwrap(), 16).unwrap();
        let addr = first.local_addr().unwrap();
        let err = bind(addr, 16).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(
            err.to_string()
                .starts_with(&format!("cannot listen on {addr}: ")),
            "{err}"
        );
    }
}
