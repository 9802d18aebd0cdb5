//! Collecting the exit status of worker processes.
//!
//! The master reaps only the pids it spawned (never `waitpid(-1)`), so several
//! clusters, or other child processes of a host program, can live in one process.
//! SIGCHLD only says that *some* child changed state, so on each one every known
//! pid is polled with `WNOHANG`. A master that is a child subreaper (`--subreaper`,
//! the default for PID 1 in a container) reaps every child instead, orphans included.

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
            // ECHILD: not our child any more (reaped elsewhere); gone, status unknown.
            Err(_) => return Some(ExitStatus::Unknown),
        }
    }
}

/// Reaps any one exited child (`waitpid(-1, WNOHANG)`): its pid and how it ended.
pub(crate) fn reap_any() -> Option<(u32, ExitStatus)> {
    loop {
        match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => {
                return Some((pid.as_raw() as u32, ExitStatus::Code(code)))
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                return Some((pid.as_raw() as u32, ExitStatus::Signal(sig as i32)))
            }
            Ok(WaitStatus::StillAlive) => return None,
            Ok(_) => continue, // stopped/continued: not an exit; look further
            Err(Errno::EINTR) => continue,
            Err(_) => return None, // ECHILD: no children left
        }
    }
}

/// Makes this process a child subreaper: orphaned descendants are re-parented to it.
pub(crate) fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes plain integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
