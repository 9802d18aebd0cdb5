//! Collecting the exit status of worker processes.
//!
//! The master reaps only the pids it spawned (never `waitpid(-1)`), so several
//! clusters, or other child processes of a host program, can live in one process.
//! SIGCHLD only says that *some* child changed state, so on each one every known
//! pid is polled with `WNOHANG`.

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::supervisor::ExitStatus;

/// Returns how `pid` ended if it has exited (and reaps it), `None` while it runs.
pub(crate) fn try_reap(pid: u32) -> Option<ExitStatus> {
    let pid = Pid::from_raw(pid as i32);
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return Some(ExitStatus::Code(code)),
            Ok(WaitStatus::Signaled(_, sig, _)) => return Some(ExitStatus::Signal(sig as i32)),
            Ok(WaitStatus::StillAlive) => return None,
            Ok(_) => return None, // stopped/continued: not an exit
            Err(Errno::EINTR) => continue,
            // ECHILD: not our child any more (reaped elsewhere); count it as gone.
            Err(_) => return Some(ExitStatus::Code(-1)),
        }
    }
}
