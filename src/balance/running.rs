//! Whether a worker is on a CPU right now: `rr`'s tie-break between workers that have
//! read everything they were sent.
//!
//! What a worker has not read (SIOCOUTQ, see `Link::backlog`) shows a worker that is
//! behind only once something is queued to it. An event-loop worker reads its channel
//! eagerly, so a worker that took a connection and is now busy with a slow request
//! looks exactly as idle as one waiting in `epoll_wait`, and the next connection sent
//! to it waits for that request. The kernel knows the difference: the state letter of
//! `/proc/PID/stat` is `R` while the worker's main thread runs or waits for a CPU, and
//! `S` while it sleeps (in `epoll_wait`, on an idle event loop). So among workers with
//! nothing unread, `rr` prefers the sleeping ones, then those on a CPU, the one handed a
//! connection most recently first ([`busy_rank`]: it is probably finishing that one;
//! one handed nothing for long is busy with something long).
//!
//! Cost: one `pread` of a descriptor opened once per worker (the kernel formats the
//! line; about a microsecond), for at most [`PROBES_PER_PASS`] workers per accept pass,
//! never per connection. What it cannot see: a worker whose serving thread is not its
//! main thread (a Go server, say) or that is a wrapper waiting for its child reads as
//! sleeping, and `rr` then falls back to what it has not read.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::Duration;

/// A worker on a CPU ranks behind sleeping ones by one step per this much time since
/// it was last handed a connection: one handed a connection just now is probably
/// serving it, one handed nothing for long is busy with something long.
pub const RECENT: Duration = Duration::from_millis(1);

/// The rank of a worker with something unread: behind every worker with nothing unread.
pub const BEHIND: usize = 128;

/// The rank of a worker on a CPU with nothing unread, handed its last connection
/// `since` ago: 1 (just now) to 65, always ahead of [`BEHIND`].
pub fn busy_rank(since: Duration) -> usize {
    let steps = since.as_micros() / RECENT.as_micros().max(1);
    1 + steps.min(64) as usize
}

/// Most workers whose state one accept pass reads (the rest count as sleeping).
pub const PROBES_PER_PASS: usize = 8;

/// A worker process's `/proc/PID/stat`, open for reading its state.
#[derive(Debug)]
pub struct RunState {
    stat: File,
}

impl RunState {
    /// Opens the stat file of process `pid`; `None` when it cannot be read (no /proc).
    pub fn open(pid: u32) -> Option<RunState> {
        let stat = File::open(format!("/proc/{pid}/stat")).ok()?;
        Some(RunState { stat })
    }

    /// Whether the process's main thread is running or runnable now (`R`); false when it
    /// sleeps, has exited, or the state cannot be read.
    pub fn running(&self) -> bool {
        // "pid (comm) S ...": comm is at most 15 bytes, so 64 bytes hold the state.
        let mut buf = [0u8; 64];
        let Ok(n) = self.stat.read_at(&mut buf, 0) else {
            return false;
        };
        state(&buf[..n]) == Some(b'R')
    }
}

/// The state letter of a `/proc/PID/stat` line (after the last `)`, which ends comm).
fn state(line: &[u8]) -> Option<u8> {
    let close = line.iter().rposition(|&b| b == b')')?;
    line.get(close + 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_follows_the_last_parenthesis() {
        assert_eq!(state(b"123 (http) S 1 2 3"), Some(b'S'));
        assert_eq!(state(b"123 (a) b) R 1 2 3"), Some(b'R'));
        assert_eq!(state(b"123 (cut"), None);
    }

    #[test]
    fn the_reading_thread_reads_running_and_a_sleeping_process_does_not() {
        // SAFETY: gettid(2) has no preconditions.
        let tid = unsafe { libc::gettid() };
        let own = File::open(format!("/proc/self/task/{tid}/stat")).unwrap();
        assert!(RunState { stat: own }.running(), "the reading thread is on a CPU");
        let mut child = std::process::Command::new("sleep").arg("10").spawn().unwrap();
        let sleeper = RunState::open(child.id()).unwrap();
        // `sleep` runs only until it reaches nanosleep: wait for that, bounded.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while sleeper.running() && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert!(!sleeper.running(), "a sleeping process reads as not running");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!sleeper.running(), "a reaped process reads as not running");
    }
}
