//! Starting a worker process: fork, lay out its file descriptors, exec.
//!
//! STUB — interface fixed, body to be written.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;

/// Everything needed to start one worker process.
pub(crate) struct SpawnSpec<'a> {
    /// Resolved path of the program (see [`resolve_program`]).
    pub program: &'a CString,
    /// argv, including argv[0].
    pub args: &'a [CString],
    /// Complete environment as `KEY=VALUE` entries (no LISTEN_PID: see `listen_pid`).
    pub env: &'a [CString],
    /// Descriptors of the master to appear in the worker at 3, 4, … in this order.
    pub fds: &'a [RawFd],
    /// Whether to add `LISTEN_PID=<the worker's own pid>` to the environment.
    pub listen_pid: bool,
}

/// Forks and execs a worker; returns its pid once exec succeeded.
pub(crate) fn spawn(_spec: &SpawnSpec<'_>) -> io::Result<u32> {
    unimplemented!()
}

/// Finds the program the way execvp would and checks that it can be executed.
pub(crate) fn resolve_program(_program: &OsStr, _path_var: Option<&OsString>) -> Result<PathBuf, String> {
    unimplemented!()
}
