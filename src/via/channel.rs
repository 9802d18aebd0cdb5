//! The master's end of one worker channel: hand connections over, say stop, read messages.
//!
//! Each worker in `rr`/`sticky` gets one end of a `SOCK_SEQPACKET` socketpair at
//! `RECLUSTER_FD`; the master keeps the other end here, **and a duplicate of the
//! worker's end**. That duplicate is what lets the master take back connections that
//! were queued to a worker that died or was killed before reading them: once the
//! worker has exited, [`WorkerChannel::reclaim`] reads its unread messages and the
//! balancer hands those connections to another worker. (Node's primary loses them:
//! node issues 3551 and 21746.) The cost is that the master never sees EOF on its own
//! end; it learns of a worker's death from SIGCHLD instead.
//!
//! Sending connections and sending `stop` take the same lock, so no connection can
//! follow `stop` on the wire: a worker that has read `stop` will get nothing more.

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::Mutex;

use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

use crate::channel::{self, MasterLine};
use crate::fdpass::{self, FdBuf};

/// A connection the master accepted and has not handed over yet.
#[derive(Debug)]
pub(crate) struct Conn {
    /// The accepted socket; dropping it closes the master's copy.
    pub stream: TcpStream,
    /// Index of the listener it came in on.
    pub listener: usize,
    /// The client's address.
    pub peer: SocketAddr,
    /// The local address it was accepted on.
    pub local: SocketAddr,
    /// When the master took it (accept, or reclaim): how long it has waited for a worker.
    pub since: Instant,
}

/// The master's side of one worker's channel.
#[derive(Debug)]
pub(crate) struct WorkerChannel {
    fd: AsyncFd<OwnedFd>,
    /// Set once `stop` has been sent; guards every send.
    stopped: Mutex<bool>,
    /// The master's duplicate of the worker's end, for [`WorkerChannel::reclaim`].
    worker_end: OwnedFd,
    /// Connections handed to this worker so far (for `status` and metrics).
    handed: std::sync::atomic::AtomicU64,
}

impl WorkerChannel {
    /// Creates a channel; returns it and the end to place in the worker.
    pub fn new() -> io::Result<(WorkerChannel, OwnedFd)> {
        let (master, worker) = fdpass::seqpacket_pair()?;
        // The worker gets a plain blocking socket; the master only ever reads the
        // worker's end with MSG_DONTWAIT (see `reclaim`), so this costs it nothing.
        set_blocking(&worker)?;
        let keep = worker.try_clone()?; // F_DUPFD_CLOEXEC: never leaks into a worker
        let channel = WorkerChannel {
            fd: fdpass::register(master)?,
            stopped: Mutex::new(false),
            worker_end: keep,
            handed: std::sync::atomic::AtomicU64::new(0),
        };
        Ok((channel, worker))
    }

    /// Counts `n` more connections handed to this worker.
    pub fn count_handed(&self, n: u64) {
        self.handed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Connections handed to this worker so far.
    pub fn handed(&self) -> u64 {
        self.handed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Bytes the master sent that the worker has not read yet (`SIOCOUTQ` on the
    /// master's end: the kernel frees a message's memory once the worker reads it).
    /// 0 when the worker has read everything; more the further behind it is.
    pub fn unread_bytes(&self) -> usize {
        use std::os::fd::AsRawFd;
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int to the pointer given, valid for the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        if rc == 0 {
            usize::try_from(queued).unwrap_or(0)
        } else {
            0
        }
    }

    /// Sends one batch: `text` holds one `conn` record per descriptor in `fds`, in order.
    ///
    /// `WouldBlock` when the worker's queue is full, `BrokenPipe` after `stop`; on any
    /// error nothing was sent.
    pub fn send(&self, text: &[u8], fds: &[RawFd], cbuf: &mut FdBuf) -> io::Result<()> {
        let stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        if *stopped {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        fdpass::send(self.fd.as_fd(), text, fds, cbuf)
    }

    /// Marks the channel stopped (no connection is sent from now on) and sends `stop`.
    ///
    /// Returns false when the worker's queue was full and `stop` did not go out: then
    /// call [`WorkerChannel::stop_when_writable`].
    pub fn stop(&self) -> bool {
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        *stopped = true;
        self.send_stop()
    }

    /// Marks the channel stopped and sends `stop`: now, or, when the worker's queue is
    /// full, from a task as soon as it has read enough to take it (on this runtime).
    pub fn stop_soon(self: &std::sync::Arc<Self>) {
        if !self.stop() {
            let ch = self.clone();
            tokio::spawn(async move { ch.stop_when_writable().await });
        }
    }

    /// Sends `stop` once the worker has read enough of its queue to take it.
    pub async fn stop_when_writable(&self) {
        loop {
            let Ok(mut guard) = self.fd.writable().await else {
                return;
            };
            if self.send_stop() {
                return;
            }
            guard.clear_ready();
        }
    }

    /// One `stop` message; false if the queue is full (a gone worker counts as done).
    fn send_stop(&self) -> bool {
        let mut msg = Vec::with_capacity(8);
        channel::encode_stop(&mut msg);
        let sent = fdpass::send(self.fd.as_fd(), &msg, &[], &mut FdBuf::new());
        !matches!(sent, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Receives the next message from the worker into `buf`; closes any descriptors it carried.
    ///
    /// Returns the message length and whether it was cut short (too long to be valid).
    pub async fn recv(&self, buf: &mut [u8], cbuf: &mut FdBuf) -> io::Result<(usize, bool)> {
        let mut fds = Vec::new();
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| fdpass::recv(fd.as_fd(), buf, &mut fds, cbuf)) {
                Ok(Ok(got)) => {
                    // Workers have no business sending descriptors: close them.
                    let bad = !fds.is_empty();
                    fds.clear();
                    return Ok((got.len, got.truncated || got.fds_truncated || bad));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// A fingerprint of the oldest message the worker has not read yet; `None` when it
    /// has read everything.
    ///
    /// This is how the balancer tells a stuck worker from a busy one (see
    /// `balance::stuck`): the same fingerprint seen again later means the worker read
    /// nothing in between. It peeks (`MSG_PEEK`) at the head of the worker's queue
    /// through the master's duplicate of the worker's end, with no control buffer, so
    /// the kernel installs no descriptor in the master and the worker loses nothing.
    /// Each message starts with a `conn` record naming the client's address and port,
    /// so two different messages look the same only if one client address and port
    /// came back while the first message still waited.
    pub fn unread_head(&self) -> Option<u64> {
        use nix::sys::socket::{recv, MsgFlags};
        use std::hash::{Hash, Hasher};
        use std::os::fd::AsRawFd;
        let end = &self.worker_end;
        let mut head = [0u8; 128];
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_TRUNC;
        // With MSG_TRUNC a SOCK_SEQPACKET receive returns the message's whole length.
        let len = recv(end.as_raw_fd(), &mut head, flags).ok()?;
        if len == 0 {
            return None;
        }
        let mut hasher = std::hash::DefaultHasher::new();
        len.hash(&mut hasher);
        head[..len.min(head.len())].hash(&mut hasher);
        Some(hasher.finish())
    }

    /// Takes back every connection queued to the worker and not read yet: after it
    /// exited, or once it is found stuck (then whatever it reads meanwhile it serves).
    ///
    /// Records that do not parse have their descriptors closed.
    pub fn reclaim(&self) -> Vec<Conn> {
        // Hold the send lock throughout, marked stopped: a batch the balancer sends
        // (from another thread, on a multi-thread runtime) either went out before and is
        // read back here, or fails with BrokenPipe and is re-dispatched. None can slip in
        // after the last read, where nobody would read it.
        let mut stopped = self.stopped.lock().unwrap_or_else(|e| e.into_inner());
        *stopped = true;
        // The duplicate stays open until the channel is dropped: while the master holds
        // it, the master's own end never reads EOF, which the channel's reader relies on
        // (a worker reclaimed while alive, as a stuck one is, exits later).
        let end = &self.worker_end;
        let mut out = Vec::new();
        let mut buf = vec![0u8; channel::MAX_MASTER_MESSAGE];
        let mut cbuf = FdBuf::new();
        let mut fds = Vec::new();
        while let Ok(got) = fdpass::recv(end.as_fd(), &mut buf, &mut fds, &mut cbuf) {
            if got.len == 0 && fds.is_empty() {
                break;
            }
            let mut fds_iter = fds.drain(..);
            for line in channel::lines(&buf[..got.len]) {
                if let MasterLine::Conn {
                    listener,
                    peer,
                    local,
                } = channel::parse_master_line(line)
                {
                    if let Some(fd) = fds_iter.next() {
                        out.push(Conn {
                            stream: TcpStream::from(fd),
                            listener,
                            peer,
                            local,
                            since: Instant::now(),
                        });
                    }
                }
            }
            // Any descriptor left over is dropped (closed) with the iterator.
        }
        out
    }
}

fn set_blocking(fd: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsFd;
    fdpass::set_flags(fd.as_fd(), false, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unread_bytes_count_what_the_worker_has_not_read_yet() {
        let (ch, worker) = WorkerChannel::new().unwrap();
        assert_eq!(ch.unread_bytes(), 0);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        use std::os::fd::AsRawFd;
        ch.send(b"conn 127.0.0.1 1 127.0.0.1 2 0\n", &[a.as_raw_fd()], &mut FdBuf::new()).unwrap();
        ch.send(b"conn 127.0.0.1 3 127.0.0.1 2 0\n", &[a.as_raw_fd()], &mut FdBuf::new()).unwrap();
        let two = ch.unread_bytes();
        assert!(two > 0, "two messages unread");
        let mut buf = [0u8; 256];
        let mut fds = Vec::new();
        fdpass::recv(worker.as_fd(), &mut buf, &mut fds, &mut FdBuf::new()).unwrap();
        let one = ch.unread_bytes();
        assert!(0 < one && one < two, "one read: {one} of {two}");
        fdpass::recv(worker.as_fd(), &mut buf, &mut fds, &mut FdBuf::new()).unwrap();
        assert_eq!(ch.unread_bytes(), 0, "all read");
    }
}
