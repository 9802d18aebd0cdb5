//! The sd_notify endpoint workers report readiness to (`NOTIFY_SOCKET`).
//!
//! STUB — interface fixed, body to be written.

use std::io;
use std::path::Path;

/// One datagram received on the notify socket, with the sender's pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotifyMessage {
    /// Pid of the sending process, from SCM_CREDENTIALS.
    pub pid: u32,
    /// `READY=1` was among the assignments.
    pub ready: bool,
    /// `STOPPING=1` was among the assignments.
    pub stopping: bool,
}

/// A unix datagram socket bound in a private (0700) directory.
pub(crate) struct NotifySocket {}

impl NotifySocket {
    /// Creates the private directory and binds the socket with SO_PASSCRED.
    pub(crate) fn bind() -> io::Result<NotifySocket> {
        unimplemented!()
    }
    /// Filesystem path to give workers in `NOTIFY_SOCKET`.
    pub(crate) fn path(&self) -> &Path {
        unimplemented!()
    }
    /// Receives the next well-formed datagram that carries credentials.
    pub(crate) async fn recv(&self) -> io::Result<NotifyMessage> {
        unimplemented!()
    }
}

/// Sends `READY=1` (or other state) to the master's own service manager, if `NOTIFY_SOCKET` is set.
pub(crate) fn notify_service_manager(_state: &str) -> io::Result<bool> {
    unimplemented!()
}
