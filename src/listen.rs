//! Binding the listening sockets the master owns for its whole life.
//!
//! STUB — interface fixed, body to be written.

use std::io;
use std::net::SocketAddr;

/// Binds `addr` with SO_REUSEADDR, CLOEXEC, blocking, and listens with `backlog`.
pub(crate) fn bind(_addr: SocketAddr, _backlog: i32) -> io::Result<std::net::TcpListener> {
    unimplemented!()
}
