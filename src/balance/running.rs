//! How busy a worker has been lately: `rr`'s tie-break between workers that have read
//! everything they were sent.
//!
//! What a worker has not read (SIOCOUTQ, see `Link::backlog`) shows a worker that is
//! behind only once something is queued to it. An event-loop worker reads its channel
//! eagerly, so a worker that took a connection and is now busy with a slow request
//! looks exactly as idle as one waiting in `epoll_wait`, and the next connection sent
//! to it waits for that request. The kernel knows the difference: `/proc/PID/schedstat`
//! starts with the time the worker's main thread has run, in nanoseconds. Its growth
//! over the time elapsed between two accept passes is the share of that time the
//! worker ran: about 1 for a worker stuck in a slow request, about 0 for an idle one.
//! (The time it waited for a CPU, the next field, is left out: on a busy machine a
//! worker that serves quick connections waits about as long as one that spins, and
//! would look as busy.) `rr` ranks workers with nothing unread by
//! that share, in [`BUSY_STEPS`] steps, and among equals the rotation decides.
//!
//! Cost: one `pread` of a descriptor opened once per worker (three numbers; about half
//! a microsecond), for at most [`PROBES_PER_PASS`] workers per accept pass, never per
//! connection. What it cannot see: a worker whose serving thread is not its main
//! thread (a Go server, say), or a wrapper waiting for its child, reads as idle, and
//! `rr` then falls back to what it has not read. After a quiet spell the first pass
//! measures over the whole spell, so a worker that only just began a slow request
//! still looks idle to it (as it does to unread bytes alone).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// Most workers whose schedstat one accept pass reads (the rest rank as idle).
pub const PROBES_PER_PASS: usize = 8;

/// How finely the share of time a worker ran is ranked (`BUSY_STEPS` = all of it):
/// coarsely (under a quarter: 0, up to three quarters: 1, more: 2), so that workers
/// serving about the same load rank equal and keep the rotation, while one stuck in a
/// slow request ranks behind them.
pub const BUSY_STEPS: usize = 2;

/// Workers ranked at most this far apart are equals and keep the rotation.
pub const SLACK: usize = 0;

/// The rank of a worker with something unread: behind every worker with nothing unread.
pub const BEHIND: usize = 2 * BUSY_STEPS;

/// A worker process's `/proc/PID/schedstat`, open for reading.
#[derive(Debug)]
pub struct RunState {
    schedstat: File,
}

/// What one read of a worker's schedstat found, and when.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    at: Instant,
    /// Nanoseconds run since the worker started.
    run_ns: u64,
}

impl RunState {
    /// Opens the schedstat file of process `pid`; `None` when it cannot be read.
    pub fn open(pid: u32) -> Option<RunState> {
        let schedstat = File::open(format!("/proc/{pid}/schedstat")).ok()?;
        Some(RunState { schedstat })
    }

    /// Reads how long the process's main thread has run, at `at`;
    /// `None` once it has exited (or the file is unreadable).
    pub fn sample(&self, at: Instant) -> Option<Sample> {
        let mut buf = [0u8; 64];
        let n = self.schedstat.read_at(&mut buf, 0).ok()?;
        Some(Sample {
            at,
            run_ns: run_ns(&buf[..n])?,
        })
    }
}

/// The shortest span [`Recent`] measures over (when passes come often enough): long
/// enough that a worker that just served a quick connection does not look as busy as
/// one stuck in a slow request.
pub const WINDOW: Duration = Duration::from_millis(2);

/// A worker's recent busy share: the span from the older of two kept samples to the
/// newest is between [`WINDOW`] and twice that while accept passes come often.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recent {
    older: Option<Sample>,
    newer: Option<Sample>,
}

impl Recent {
    /// Takes a new sample; returns the rank over the span since the older kept one
    /// (0 when there is none yet).
    pub fn observe(&mut self, now: Sample) -> usize {
        let rank = self.older.or(self.newer).map_or(0, |from| busy_rank(from, now));
        match self.newer {
            Some(newer) if now.at.saturating_duration_since(newer.at) < WINDOW => {}
            newer => {
                self.older = newer.or(Some(now));
                self.newer = Some(now);
            }
        }
        rank
    }
}

/// How busy a worker was between two samples: 0 (it slept throughout) to
/// [`BUSY_STEPS`] (it ran throughout).
pub fn busy_rank(before: Sample, now: Sample) -> usize {
    let wall = now.at.saturating_duration_since(before.at).as_nanos() as f64;
    if wall <= 0.0 {
        return 0;
    }
    let ran = now.run_ns.saturating_sub(before.run_ns) as f64;
    ((ran / wall).min(1.0) * BUSY_STEPS as f64).round() as usize
}

/// The run time of a schedstat line (`run_ns wait_ns timeslices`).
fn run_ns(line: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(line).ok()?;
    let mut fields = text.split_ascii_whitespace().map(|f| f.parse::<u64>().ok());
    let run = fields.next()??;
    // A line cut short is no line: the wait and timeslice fields must follow.
    fields.next()??;
    Some(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedstat_line_starts_with_the_run_time() {
        assert_eq!(run_ns(b"562634 1000 1\n"), Some(562_634));
        assert_eq!(run_ns(b"12"), None);
        assert_eq!(run_ns(b""), None);
    }

    #[test]
    fn the_rank_is_the_share_of_the_time_spent_running() {
        let t = Instant::now();
        let at = |ms: u64, ran_ms: u64| Sample {
            at: t + Duration::from_millis(ms),
            run_ns: ran_ms * 1_000_000,
        };
        assert_eq!(busy_rank(at(0, 0), at(10, 0)), 0, "slept throughout");
        assert_eq!(busy_rank(at(0, 0), at(10, 10)), BUSY_STEPS, "ran throughout");
        assert_eq!(busy_rank(at(0, 0), at(10, 5)), BUSY_STEPS / 2);
        assert_eq!(busy_rank(at(0, 0), at(10, 2)), 0, "a fifth of the time is idle");
        assert_eq!(busy_rank(at(0, 0), at(0, 5)), 0, "no time elapsed");
    }

    #[test]
    fn the_recent_share_is_measured_over_at_least_a_window() {
        let t = Instant::now();
        let at = |us: u64, ran_us: u64| Sample {
            at: t + Duration::from_micros(us),
            run_ns: ran_us * 1000,
        };
        let mut idle_then_quick = Recent::default();
        assert_eq!(idle_then_quick.observe(at(0, 0)), 0, "nothing to compare with yet");
        assert_eq!(idle_then_quick.observe(at(3000, 0)), 0);
        // A quick connection served just now: busy for all of a short gap, but not of
        // the span since the older sample.
        assert_eq!(idle_then_quick.observe(at(3200, 200)), 0);
        let mut spinning = Recent::default();
        for i in 0..10 {
            spinning.observe(at(i * 700, i * 700));
        }
        assert_eq!(spinning.observe(at(7200, 7200)), BUSY_STEPS);
    }

    /// Spins the calling thread for `d`.
    fn spin(d: Duration) {
        let start = Instant::now();
        while start.elapsed() < d {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn a_spinning_thread_ranks_busy_and_a_sleeping_process_idle() {
        // SAFETY: gettid(2) has no preconditions.
        let tid = unsafe { libc::gettid() };
        let own = RunState {
            schedstat: File::open(format!("/proc/self/task/{tid}/schedstat")).unwrap(),
        };
        let before = own.sample(Instant::now()).unwrap();
        spin(Duration::from_millis(20));
        let after = own.sample(Instant::now()).unwrap();
        // Unless the machine is busy, a spinning thread runs all the time.
        assert!(busy_rank(before, after) >= 1, "{before:?} {after:?}");

        let mut child = std::process::Command::new("sleep").arg("10").spawn().unwrap();
        let sleeper = RunState::open(child.id()).unwrap();
        // `sleep` runs only until it reaches nanosleep: wait for its state to say so.
        let stat = format!("/proc/{}/stat", child.id());
        let asleep = || {
            let s = std::fs::read_to_string(&stat).unwrap_or_default();
            s.rfind(')').and_then(|i| s.get(i + 2..i + 3)) == Some("S")
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !asleep() && Instant::now() < deadline {
            std::thread::yield_now();
        }
        let before = sleeper.sample(Instant::now()).unwrap();
        spin(Duration::from_millis(5));
        let after = sleeper.sample(Instant::now()).unwrap();
        assert_eq!(busy_rank(before, after), 0, "{before:?} {after:?}");
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(sleeper.sample(Instant::now()).is_none(), "a reaped process has no schedstat");
    }
}
