//! Observing from /proc whether an unmodified worker listens on an inherited socket.
//!
//! STUB — interface fixed, body to be written.

/// True when `pid` (or any of its threads) watches or accepts on one of fds `3..3+count`.
pub(crate) fn is_listening(_pid: u32, _count: usize) -> bool {
    unimplemented!()
}
