//! How busy a worker has been lately: `rr`'s tie-break between workers that have read
//! everything they were sent.
//!
//! What a worker has not read (SIOCOUTQ, see `Link::backlog`) shows a worker that is
//! behind only once something is queued to it. An event-loop worker reads its channel
//! eagerly, so a worker that took a connection and is now busy with a slow request
//! looks exactly as idle as one waiting in `epoll_wait`, and the next connection sent
//! to it waits for that request. The kernel knows the difference: `/proc/PID/schedstat`
//! starts with the time the worker's main thread has run, in nanoseconds. Its growth
//! over a recent span ([`WINDOW`] to twice that, see [`Recent`]) is the share of that
//! span the worker ran: about 1 for a worker stuck in a slow request, about 0 for an
//! idle one. (The time it waited for a CPU, the next field, is left out: on a busy
//! machine a worker that serves quick connections waits about as long as one that
//! spins, and would look as busy.) When accept passes are too far apart for such a
//! span (more than [`STALE`] since the kept sample: a quiet server, or just after the
//! worker started), the state letter of `/proc/PID/stat` says instead whether it is
//! on a CPU right now. `rr` ranks workers with nothing unread by the share, in
//! [`BUSY_STEPS`] steps, and among equals the rotation decides.
//!
//! Cost: one `pread` of a descriptor opened once per worker (three numbers; about half
//! a microsecond; the stat line, 1.6 µs, only after a quiet spell), for at most
//! [`PROBES_PER_PASS`] workers per accept pass, never per connection. What it cannot
//! see: a worker whose serving thread is not its main thread (a Go server, say), or a
//! wrapper waiting for its child, reads as idle, and `rr` then falls back to what it
//! has not read. And a worker that spins for ever after reading everything is passed
//! over, not replaced: `--stuck-timeout` looks at connections left unread, and it has
//! none (its own clients wait; the others are served).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

/// Most workers whose schedstat one accept pass reads (the others keep their last rank).
pub const PROBES_PER_PASS: usize = 8;

/// How finely the share of time a worker ran is ranked (`BUSY_STEPS` = all of it):
/// coarsely (under a quarter: 0, up to three quarters: 1, more: 2), so that workers
/// serving about the same load rank equal and keep the rotation, while one stuck in a
/// slow request ranks behind them.
pub const BUSY_STEPS: usize = 2;

/// One busy step in rank units, in which a connection already given to a worker in
/// the same accept pass counts 1: an idle worker takes this many connections of one
/// pass before one a step busier gets any.
pub const RANK_SCALE: usize = 16;

/// Workers ranked at most this far apart are equals and keep the rotation.
pub const SLACK: usize = 0;

/// The rank of a worker with something unread (plus its unread bytes): behind every
/// worker with nothing unread.
pub const BEHIND: usize = 4 * BUSY_STEPS * RANK_SCALE;

/// The shortest span [`Recent`] measures over: two scheduler ticks at 250 Hz, because
/// the run time of a thread that is running is brought up to date only at a tick (or
/// when it stops), and long enough that a worker that just served a quick connection
/// does not look as busy as one stuck in a slow request.
pub const WINDOW: Duration = Duration::from_millis(8);

/// A span longer than this says nothing of now: the instant state decides instead. Long
/// enough that the span kept after one sparse pass stays usable until the next window
/// (the instant state cannot tell a worker finishing a quick connection from one
/// stuck in a slow request: both are on a CPU).
pub const STALE: Duration = Duration::from_millis(100);

/// A worker process's `/proc/PID/schedstat` and `/proc/PID/stat`, open for reading.
#[derive(Debug)]
pub struct RunState {
    schedstat: File,
    stat: File,
}

/// What one read of a worker's schedstat found, and when.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    at: Instant,
    /// Nanoseconds run since the worker started.
    run_ns: u64,
}

impl RunState {
    /// Opens the files of process `pid`; `None` when they cannot be read.
    pub fn open(pid: u32) -> Option<RunState> {
        Some(RunState {
            schedstat: File::open(format!("/proc/{pid}/schedstat")).ok()?,
            stat: File::open(format!("/proc/{pid}/stat")).ok()?,
        })
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

    /// Whether the process's main thread is on a CPU (or waiting for one) right now.
    pub fn on_cpu(&self) -> bool {
        // "pid (comm) S ...": comm is at most 15 bytes, so 64 bytes hold the state.
        let mut buf = [0u8; 64];
        let Ok(n) = self.stat.read_at(&mut buf, 0) else {
            return false;
        };
        state(&buf[..n]) == Some(b'R')
    }

    /// The worker's rank now (0 = idle, up to `BUSY_STEPS × RANK_SCALE`), from its
    /// recent samples in `recent` (updated), or its instant state when they are too
    /// old or too new to tell; `None` once it has exited.
    pub fn rank(&self, recent: &mut Recent, at: Instant) -> Option<usize> {
        let sample = self.sample(at)?;
        let steps = match recent.observe(sample) {
            Span::Recent(steps) => steps,
            // On a CPU now: busy if it also ran through the long span (stuck in
            // something long), else half (maybe just finishing a quick connection).
            Span::Stale(steps) if self.on_cpu() && steps >= 1 => BUSY_STEPS,
            Span::Stale(_) | Span::Unknown if self.on_cpu() => 1,
            Span::Stale(_) | Span::Unknown => 0,
        };
        Some(steps * RANK_SCALE)
    }
}

/// What [`Recent::observe`] could measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// Busy steps over a span of [`WINDOW`] to [`STALE`].
    Recent(usize),
    /// Busy steps over a span longer than [`STALE`]: they say little of now.
    Stale(usize),
    /// No span (no earlier sample, or only one too recent).
    Unknown,
}

/// A worker's recent samples: measured from the newer of the two kept once it is at
/// least [`WINDOW`] old, else from the older, so the span is between [`WINDOW`] and
/// twice that while accept passes come often.
#[derive(Debug, Clone, Copy, Default)]
pub struct Recent {
    older: Option<Sample>,
    newer: Option<Sample>,
}

impl Recent {
    /// Takes a new sample; returns the busy steps over the span since the kept one.
    pub fn observe(&mut self, now: Sample) -> Span {
        let old_enough = |s: &Sample| now.at.saturating_duration_since(s.at) >= WINDOW;
        let from = match (self.older, self.newer) {
            (_, Some(newer)) if old_enough(&newer) => Some(newer),
            (older, _) => older.filter(old_enough),
        };
        if self.newer.as_ref().is_none_or(old_enough) {
            self.older = self.newer;
            self.newer = Some(now);
        }
        match from {
            None => Span::Unknown,
            Some(f) if now.at.saturating_duration_since(f.at) > STALE => Span::Stale(busy_steps(f, now)),
            Some(f) => Span::Recent(busy_steps(f, now)),
        }
    }
}

/// How busy a worker was between two samples: 0 (it ran under a quarter of the time)
/// to [`BUSY_STEPS`] (it ran throughout).
pub fn busy_steps(before: Sample, now: Sample) -> usize {
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

/// The state letter of a `/proc/PID/stat` line (after the last `)`, which ends comm).
fn state(line: &[u8]) -> Option<u8> {
    let close = line.iter().rposition(|&b| b == b')')?;
    line.get(close + 2).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_schedstat_line_starts_with_the_run_time_and_a_stat_line_has_the_state() {
        assert_eq!(run_ns(b"562634 1000 1\n"), Some(562_634));
        assert_eq!(run_ns(b"12"), None);
        assert_eq!(run_ns(b""), None);
        assert_eq!(state(b"123 (http) S 1 2 3"), Some(b'S'));
        assert_eq!(state(b"123 (a) b) R 1 2 3"), Some(b'R'));
        assert_eq!(state(b"123 (cut"), None);
    }

    /// A sample `us` µs after `t`, the worker having run `ran_us` µs in all.
    fn at(t: Instant, us: u64, ran_us: u64) -> Sample {
        Sample {
            at: t + Duration::from_micros(us),
            run_ns: ran_us * 1000,
        }
    }

    #[test]
    fn the_steps_are_the_share_of_the_time_spent_running() {
        let t = Instant::now();
        let ms = |m: u64| m * 1000;
        assert_eq!(busy_steps(at(t, 0, 0), at(t, ms(10), 0)), 0, "slept throughout");
        assert_eq!(busy_steps(at(t, 0, 0), at(t, ms(10), ms(10))), BUSY_STEPS, "ran throughout");
        assert_eq!(busy_steps(at(t, 0, 0), at(t, ms(10), ms(5))), BUSY_STEPS / 2);
        assert_eq!(busy_steps(at(t, 0, 0), at(t, ms(10), ms(2))), 0, "a fifth of the time is idle");
        assert_eq!(busy_steps(at(t, 0, 0), at(t, 0, ms(5))), 0, "no time elapsed");
    }

    #[test]
    fn the_recent_share_is_measured_over_a_window_to_twice_that_and_never_a_stale_span() {
        let t = Instant::now();
        let ms = |m: u64| m * 1000;
        let mut r = Recent::default();
        assert_eq!(r.observe(at(t, 0, 0)), Span::Unknown, "nothing to compare with yet");
        assert_eq!(r.observe(at(t, ms(4), 0)), Span::Unknown, "under a window: too short to tell");
        assert_eq!(r.observe(at(t, ms(12), 0)), Span::Recent(0), "idle for 12 ms");
        // A quick connection served just now (0.2 ms of running): busy for all of the
        // last short gap, but not of the span since the kept sample.
        assert_eq!(r.observe(at(t, ms(12) + 200, 200)), Span::Recent(0));
        // Spinning with passes every 2.8 ms: measured over 8 to 16 ms, all of it run.
        let mut spinning = Recent::default();
        for i in 0..10 {
            spinning.observe(at(t, i * 2800, i * 2800));
        }
        assert_eq!(spinning.observe(at(t, 28_800, 28_800)), Span::Recent(BUSY_STEPS));
        // Busy long ago, idle for a second and a half, then a slow request began just
        // before a pass, and the next pass comes 20 ms later.
        let mut sparse = Recent::default();
        sparse.observe(at(t, 0, 0));
        assert_eq!(sparse.observe(at(t, ms(150), ms(150))), Span::Stale(BUSY_STEPS), "150 ms: stale");
        assert_eq!(sparse.observe(at(t, ms(1650), ms(150))), Span::Stale(0), "1.5 s since the last pass");
        assert_eq!(sparse.observe(at(t, ms(1670), ms(170))), Span::Recent(BUSY_STEPS), "20 ms since");
        // Passes 1 ms apart after one 40 ms after: the span from the kept sample stays
        // usable (40 to 48 ms) until a newer one is a window old.
        let mut after_gap = Recent::default();
        after_gap.observe(at(t, 0, 0));
        assert_eq!(after_gap.observe(at(t, ms(40), ms(40))), Span::Recent(BUSY_STEPS));
        for i in 1..8 {
            assert_eq!(after_gap.observe(at(t, ms(40 + i), ms(40 + i))), Span::Recent(BUSY_STEPS), "{i}");
        }
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
        let task = |f: &str| File::open(format!("/proc/self/task/{tid}/{f}")).unwrap();
        let own = RunState {
            schedstat: task("schedstat"),
            stat: task("stat"),
        };
        assert!(own.on_cpu(), "the reading thread is on a CPU");
        let mut recent = Recent::default();
        let first = own.rank(&mut recent, Instant::now());
        assert_eq!(first, Some(RANK_SCALE), "no span yet: on a CPU now, maybe briefly");
        // Unless the machine is busy, a spinning thread runs all the time; on a busy
        // one (the test suite's other threads, other builds) it is preempted for part
        // of a span, so one span in 50 must show it.
        let busy = (0..50).any(|_| {
            spin(Duration::from_millis(20));
            own.rank(&mut recent, Instant::now()).unwrap() >= RANK_SCALE
        });
        assert!(busy, "a spinning thread never ranked busy: {recent:?}");

        let mut child = std::process::Command::new("sleep").arg("10").spawn().unwrap();
        let sleeper = RunState::open(child.id()).unwrap();
        // `sleep` runs only until it reaches nanosleep: wait for its state to say so.
        let deadline = Instant::now() + Duration::from_secs(10);
        while sleeper.on_cpu() && Instant::now() < deadline {
            std::thread::yield_now();
        }
        let mut recent = Recent::default();
        assert_eq!(sleeper.rank(&mut recent, Instant::now()), Some(0), "asleep now");
        spin(Duration::from_millis(10));
        assert_eq!(sleeper.rank(&mut recent, Instant::now()), Some(0), "{recent:?}");
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(sleeper.rank(&mut recent, Instant::now()), None, "a reaped process has no rank");
    }
}
