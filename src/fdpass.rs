//! Passing file descriptors over a unix socket (SCM_RIGHTS), in one small unsafe module.
//!
//! Both directions go straight to `libc`, for two reasons written down so nobody
//! "simplifies" them away:
//! * `nix::sys::socket::sendmsg` allocates a control buffer on every call; the
//!   master's hot path sends with a buffer allocated once ([`FdBuf`]).
//! * `nix`'s `RecvMsg::cmsgs` refuses to iterate a truncated control buffer
//!   (`MSG_CTRUNC`), yet the kernel has already installed the descriptors that fit:
//!   they must be found and closed, or they leak. `sendfd` 0.4 neither sets
//!   `MSG_CMSG_CLOEXEC` nor checks `MSG_CTRUNC`. So the receive side parses the
//!   control messages itself and always takes ownership of every descriptor it got.
//!
//! Received descriptors are close-on-exec from the moment they exist
//! (`MSG_CMSG_CLOEXEC`), so a worker that forks and execs leaks none of them.
//!
//! The same receive serves the worker channel (both ends) and the master's sd_notify
//! socket, where it also reads the sender's credentials (`SCM_CREDENTIALS`, with
//! `SO_PASSCRED`) and closes whatever descriptors a sender attached.

use std::io;
use std::mem;
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Most descriptors in one message; the kernel's own limit (SCM_MAX_FD) is 253.
pub const MAX_FDS: usize = 64;

/// A control-message buffer sized for [`MAX_FDS`] descriptors, reused across calls.
pub struct FdBuf {
    buf: Vec<u64>, // u64 for cmsghdr alignment
}

impl FdBuf {
    /// A buffer that holds one SCM_RIGHTS message of up to [`MAX_FDS`] descriptors.
    pub fn new() -> FdBuf {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let bytes = unsafe { libc::CMSG_SPACE((MAX_FDS * mem::size_of::<RawFd>()) as u32) };
        FdBuf {
            buf: vec![0u64; (bytes as usize).div_ceil(8)],
        }
    }

    /// A buffer that also holds the sender's credentials (`SCM_CREDENTIALS`).
    #[cfg(feature = "master")]
    pub fn with_credentials() -> FdBuf {
        // SAFETY: CMSG_SPACE is a pure size computation.
        let bytes = unsafe {
            libc::CMSG_SPACE((MAX_FDS * mem::size_of::<RawFd>()) as u32)
                + libc::CMSG_SPACE(mem::size_of::<libc::ucred>() as u32)
        };
        FdBuf {
            buf: vec![0u64; (bytes as usize).div_ceil(8)],
        }
    }

    fn bytes(&self) -> usize {
        self.buf.len() * 8
    }
}

impl Default for FdBuf {
    fn default() -> Self {
        FdBuf::new()
    }
}

/// Sends `data` with `fds` attached as one message, without blocking.
///
/// On a `SOCK_SEQPACKET` socket the message goes whole or not at all: an error
/// (`WouldBlock` when the peer's queue is full) means nothing was sent and the caller
/// still owns every descriptor. On success the receiver holds its own copies; the
/// caller's may be closed.
pub fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[RawFd], cbuf: &mut FdBuf) -> io::Result<()> {
    send_some(sock, data, fds, cbuf).map(drop)
}

/// Sends what it can of `data`, with `fds` attached to its first byte, without
/// blocking; returns how many bytes went.
///
/// On a `SOCK_STREAM` socket part of `data` may go: the descriptors then went with it,
/// and the rest is sent later without them (the receiver gets them with the first
/// byte). On a `SOCK_SEQPACKET` socket it is all or nothing, as [`send`].
#[cfg_attr(not(feature = "master"), allow(dead_code))]
pub fn send_some(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[RawFd],
    cbuf: &mut FdBuf,
) -> io::Result<usize> {
    assert!(
        fds.len() <= MAX_FDS,
        "at most MAX_FDS descriptors per message"
    );
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if !fds.is_empty() {
        let payload = mem::size_of_val(fds);
        // SAFETY: pure size computations.
        let space = unsafe { libc::CMSG_SPACE(payload as u32) } as usize;
        debug_assert!(space <= cbuf.bytes());
        msg.msg_control = cbuf.buf.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: msg_control points to `space` writable, 8-aligned bytes we own, so
        // CMSG_FIRSTHDR returns a pointer to the start of that buffer, and the header
        // plus CMSG_LEN(payload) bytes of data fit inside `space` by construction.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(payload as u32) as _;
            std::ptr::copy_nonoverlapping(
                fds.as_ptr().cast::<u8>(),
                libc::CMSG_DATA(cmsg),
                payload,
            );
        }
    }
    loop {
        // SAFETY: `msg` points to `iov` and the control buffer, both alive for the call;
        // the kernel only reads them. `sock` is a valid open descriptor by its type.
        let n = unsafe {
            libc::sendmsg(
                sock_raw(sock),
                &msg,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// One received message: its length and the descriptors that came with it.
#[derive(Debug)]
#[cfg_attr(not(feature = "master"), allow(dead_code))]
pub struct Received {
    /// Bytes of data written into the caller's buffer; 0 with no fds means EOF.
    pub len: usize,
    /// The message did not fit the data buffer and was cut (`MSG_TRUNC`).
    pub truncated: bool,
    /// Some descriptors did not fit the control buffer and were dropped by the kernel (`MSG_CTRUNC`).
    pub fds_truncated: bool,
    /// The sender's pid, when the socket passes credentials (`SO_PASSCRED`).
    pub pid: Option<u32>,
}

/// Receives one message into `data`, pushing every descriptor that arrived onto `fds`.
///
/// Never blocks (`WouldBlock` when nothing is queued). Descriptors arrive
/// close-on-exec and are owned from here on: even when the message was truncated
/// every descriptor the kernel installed is returned, so dropping them closes them.
pub fn recv(
    sock: BorrowedFd<'_>,
    data: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    cbuf: &mut FdBuf,
) -> io::Result<Received> {
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.buf.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.bytes() as _;
    let n = loop {
        // SAFETY: `msg` points to `iov` (over `data`) and the control buffer, both
        // exclusively borrowed and alive for the call; the kernel writes at most their
        // stated lengths. `sock` is a valid open descriptor by its type.
        let n = unsafe {
            libc::recvmsg(
                sock_raw(sock),
                &mut msg,
                libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
            )
        };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    };
    // SAFETY: after a successful recvmsg, msg_control/msg_controllen describe the control
    // messages the kernel wrote into our buffer (possibly cut short when MSG_CTRUNC is set,
    // in which case msg_controllen covers only what was written). CMSG_FIRSTHDR/NXTHDR
    // never step outside msg_controllen. Each SCM_RIGHTS payload holds
    // (cmsg_len - CMSG_LEN(0)) / 4 descriptors that the kernel installed in this
    // process for us alone, so taking ownership of each exactly once is sound.
    // An SCM_CREDENTIALS payload is one `ucred`, read unaligned when it is whole.
    let mut pid = None;
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET
                && (*cmsg).cmsg_type == libc::SCM_CREDENTIALS
                && (*cmsg).cmsg_len as usize
                    >= libc::CMSG_LEN(mem::size_of::<libc::ucred>() as u32) as usize
            {
                let cred = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::ucred>());
                pid = u32::try_from(cred.pid).ok();
            }
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let header = libc::CMSG_LEN(0) as usize;
                let payload = ((*cmsg).cmsg_len as usize).saturating_sub(header);
                let count = payload / mem::size_of::<RawFd>();
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    let fd = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Ok(Received {
        len: n,
        truncated: msg.msg_flags & libc::MSG_TRUNC != 0,
        fds_truncated: msg.msg_flags & libc::MSG_CTRUNC != 0,
        pid,
    })
}

fn sock_raw(sock: BorrowedFd<'_>) -> RawFd {
    use std::os::fd::AsRawFd;
    sock.as_raw_fd()
}

/// A value that owns its descriptor: while it lives, the descriptor stays open and
/// names the same file description.
///
/// # Safety
///
/// Implement it only for types that own their descriptor and never close or replace
/// it before they are dropped ([`register`] relies on it).
pub unsafe trait OwnsFd: std::os::fd::AsRawFd {}

// SAFETY: an `OwnedFd` closes its descriptor only when dropped.
unsafe impl OwnsFd for OwnedFd {}
// SAFETY: a std listener owns its descriptor and closes it only when dropped.
unsafe impl OwnsFd for std::net::TcpListener {}
// SAFETY: a std stream owns its descriptor and closes it only when dropped.
unsafe impl OwnsFd for std::net::TcpStream {}
// SAFETY: a std datagram socket owns its descriptor and closes it only when dropped.
unsafe impl OwnsFd for std::os::unix::net::UnixDatagram {}
// SAFETY: the `Arc` keeps the owner alive, and so the descriptor open, while any
// clone lives; the shared owner cannot close it without being dropped.
unsafe impl<T: OwnsFd> OwnsFd for std::sync::Arc<T> {}

/// Registers a descriptor-owning value with tokio's reactor.
pub fn register<T: OwnsFd>(inner: T) -> io::Result<tokio::io::unix::AsyncFd<T>> {
    // SAFETY: `T: OwnsFd` keeps its descriptor open and the same for as long as it
    // lives, and the AsyncFd owns `inner`, so nothing can close or replace the
    // descriptor while it is registered (AsyncFd::register's contract).
    unsafe { tokio::io::unix::AsyncFd::register(inner) }.map_err(io::Error::from)
}

/// Sets or clears `O_NONBLOCK` on the open file description behind `fd` (shared by
/// every descriptor that `dup`s or inherits it), and with `cloexec` sets close-on-exec
/// on this descriptor.
pub fn set_flags(fd: BorrowedFd<'_>, nonblocking: bool, cloexec: bool) -> io::Result<()> {
    let raw = sock_raw(fd);
    // SAFETY: F_GETFL/F_SETFL/F_SETFD only read and change flags of a descriptor the
    // caller holds open (it is borrowed for this call).
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        let wanted = if nonblocking {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        if wanted != flags && libc::fcntl(raw, libc::F_SETFL, wanted) < 0 {
            return Err(io::Error::last_os_error());
        }
        if cloexec && libc::fcntl(raw, libc::F_SETFD, libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg_attr(not(feature = "master"), allow(dead_code))]
/// A connected pair of non-blocking, close-on-exec `SOCK_SEQPACKET` unix sockets.
pub fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket_pair(libc::SOCK_SEQPACKET)
}

#[cfg_attr(not(feature = "master"), allow(dead_code))]
/// A connected pair of non-blocking, close-on-exec `SOCK_STREAM` unix sockets (Node's IPC).
pub fn stream_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    socket_pair(libc::SOCK_STREAM)
}

#[cfg_attr(not(feature = "master"), allow(dead_code))]
fn socket_pair(kind: libc::c_int) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: socketpair writes two descriptors into the array on success.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            kind | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::fd::AsRawFd;

    fn is_cloexec(fd: &OwnedFd) -> bool {
        // SAFETY: F_GETFD on a descriptor we own.
        let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) };
        flags & libc::FD_CLOEXEC != 0
    }

    #[test]
    fn a_batch_of_descriptors_arrives_in_order_and_close_on_exec() {
        let (a, b) = seqpacket_pair().unwrap();
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..3).map(|_| nix::unistd::pipe().unwrap()).collect();
        let raw: Vec<RawFd> = pipes.iter().map(|(_, w)| w.as_raw_fd()).collect();
        let mut cbuf = FdBuf::new();
        send(a.as_fd(), b"three\n", &raw, &mut cbuf).unwrap();
        let mut data = [0u8; 64];
        let mut fds = Vec::new();
        let got = recv(b.as_fd(), &mut data, &mut fds, &mut cbuf).unwrap();
        assert_eq!(&data[..got.len], b"three\n");
        assert!(!got.truncated && !got.fds_truncated);
        assert_eq!(fds.len(), 3);
        assert!(fds.iter().all(is_cloexec));
        // Each received fd is the write end of the matching pipe: write through it.
        for (i, fd) in fds.iter().enumerate() {
            nix::unistd::write(fd, &[i as u8]).unwrap();
            let mut byte = [9u8];
            nix::unistd::read(pipes[i].0.as_fd(), &mut byte).unwrap();
            assert_eq!(byte[0], i as u8);
        }
        // Nothing more queued: WouldBlock, not EOF.
        let err = recv(b.as_fd(), &mut data, &mut fds, &mut cbuf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        assert_eq!(
            recv(b.as_fd(), &mut data, &mut fds, &mut cbuf).unwrap().len,
            0
        );
    }

    #[test]
    fn a_truncated_control_message_still_hands_over_what_arrived() {
        let (a, b) = seqpacket_pair().unwrap();
        let (_r, w) = nix::unistd::pipe().unwrap();
        let raw = vec![w.as_raw_fd(); 10];
        send(a.as_fd(), b"ten", &raw, &mut FdBuf::new()).unwrap();
        // A receive buffer with room for fewer descriptors than were sent.
        let mut small = FdBuf {
            buf: vec![0u64; 4], // 32 bytes: header (16) + 4 descriptors
        };
        let mut data = [0u8; 8];
        let mut fds = Vec::new();
        let got = recv(b.as_fd(), &mut data, &mut fds, &mut small).unwrap();
        assert!(got.fds_truncated);
        assert_eq!(
            fds.len(),
            4,
            "the descriptors that fit are returned, to be closed"
        );
        assert!(
            fds.iter().all(is_cloexec),
            "each one is a live descriptor we own"
        );
    }

    #[test]
    fn a_full_peer_queue_is_would_block_and_nothing_is_sent() {
        let (a, _b) = seqpacket_pair().unwrap();
        let mut cbuf = FdBuf::new();
        let payload = [0u8; 1024];
        let mut sent = 0;
        let err = loop {
            match send(a.as_fd(), &payload, &[], &mut cbuf) {
                Ok(()) => sent += 1,
                Err(e) => break e,
            }
            assert!(sent < 1_000_000, "the queue must fill up");
        };
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(sent > 0);
    }
}
