//! `--via socket`: every slot accepts on listening sockets of its own, and the kernel
//! chooses the slot, so no master is on the data path.
//!
//! For each listen address the master binds one socket per slot, all with
//! SO_REUSEPORT on the same address: one *reuseport group*. The kernel gives each new
//! connection (at SYN time) to one socket of the group; slot `k`'s worker inherits
//! only slot `k`'s sockets, at fds 3.. as in `shared`, and so does every worker that
//! replaces it, so nothing queued on a slot is lost to a reload or a respawn. The
//! master keeps every socket open for its whole life: a group's sockets are indexed in
//! the order they joined it, and closing one would move the last into its place.
//! Which socket of a group gets a connection is `balance::steer`'s program.

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, BorrowedFd};

use socket2::{Domain, Protocol, Socket, Type};

/// Whether `socket` is still listening (`SO_ACCEPTCONN`).
pub(crate) fn is_listening(socket: BorrowedFd<'_>) -> bool {
    let mut on: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `on` and `len` are valid for writes of the sizes given, for the call.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut on as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    rc == 0 && on != 0
}

/// Makes a socket that was shut down listen again (it stays bound to its address).
pub(crate) fn listen_again(socket: BorrowedFd<'_>, backlog: i32) -> io::Result<()> {
    // SAFETY: listen(2) on a descriptor we own; no memory is passed.
    if unsafe { libc::listen(socket.as_raw_fd(), backlog) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Binds `slots` listening sockets on `addr` in one SO_REUSEPORT group, slot 0 first
/// (a port 0 is resolved first and used by all). Blocking and close-on-exec, as
/// `listen::bind` leaves its sockets.
///
/// SO_REUSEPORT would also let this group join another process's group on the same
/// address (same user), both then serving half the clients. So the address is first
/// bound without SO_REUSEPORT, which fails with "address in use" as a plain bind
/// would, and released just before the group binds it. What this does not stop: a
/// group bound by another process in the instant between the two, or a socket of the
/// same user joining the group later (`sticky`'s program never picks it, but in `rr`,
/// while every slot is ready, the kernel's own hash spreads over it too; see
/// `balance::steer`).
pub(crate) fn bind_group(addr: SocketAddr, slots: usize, backlog: i32) -> io::Result<Vec<TcpListener>> {
    let mut group: Vec<TcpListener> = Vec::with_capacity(slots);
    let mut at = {
        let with_context = |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"));
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(with_context)?;
        probe.set_reuse_address(true).map_err(with_context)?;
        probe.bind(&addr.into()).map_err(with_context)?;
        let at = probe.local_addr().map_err(with_context)?;
        at.as_socket().ok_or_else(|| with_context(io::ErrorKind::InvalidData.into()))?
    };
    for _ in 0..slots {
        let with_context = |e: io::Error| io::Error::new(e.kind(), format!("cannot listen on {at}: {e}"));
        let socket = Socket::new(Domain::for_address(at), Type::STREAM, Some(Protocol::TCP)).map_err(with_context)?;
        socket.set_reuse_address(true).map_err(with_context)?;
        socket.set_reuse_port(true).map_err(with_context)?;
        socket.bind(&at.into()).map_err(with_context)?;
        socket.listen(backlog).map_err(with_context)?;
        let listener: TcpListener = socket.into();
        at = listener.local_addr()?;
        group.push(listener);
    }
    Ok(group)
}
