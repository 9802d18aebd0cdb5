//! The master's log writer: stderr through a bounded queue and a thread of its own.
//!
//! The master must outlive its stderr. `recluster … 2>&1 | head -3` leaves it a pipe
//! nobody reads (every write fails with EPIPE); a closed terminal leaves it a hung-up
//! tty (SIGHUP, then EIO on every write); a full disk gives ENOSPC; a pipe whose reader
//! is merely slow blocks. Writing the log straight to stderr from the event loop turns
//! each of these into an outage: tracing-subscriber reports a failed write with
//! `eprintln!`, which panics when stderr is broken (the master exits 101 and its
//! workers die with it), and a blocking write stalls the one thread that also accepts
//! connections.
//!
//! So a log line only ever goes into a queue here, which never blocks and never fails:
//! a bounded channel of lines (at most [`MAX_LINES`] lines and [`MAX_BYTES`] bytes)
//! emptied by one writer thread. A line that does not fit is dropped and counted; a
//! line whose write fails is dropped and counted. When stderr works again, the next
//! line is preceded by one `recluster: dropped N log lines (…)` line: drops are
//! reported once each time stderr comes back. At exit [`StderrLog`] flushes what is
//! queued, but waits at most [`FLUSH_DEADLINE`], so a stuck stderr cannot hang the exit.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// At most this many lines wait in the queue.
pub(crate) const MAX_LINES: usize = 512;
/// At most this many bytes wait in the queue.
pub(crate) const MAX_BYTES: usize = 256 * 1024;
/// How long [`StderrLog`] waits at exit for the queue to be written.
pub(crate) const FLUSH_DEADLINE: Duration = Duration::from_secs(1);

/// The log writer of the master: owns the queue; dropping it flushes (see
/// [`StderrLog::flush`], bounded by [`FLUSH_DEADLINE`]).
pub(crate) struct StderrLog {
    queue: Queue,
}

/// The sending side of the log: the tracing subscriber's [`MakeWriter`].
#[derive(Clone)]
pub(crate) struct Queue {
    /// `None` when the writer thread could not be started: lines are then written
    /// straight to stderr, errors ignored.
    tx: Option<SyncSender<Vec<u8>>>,
    shared: Arc<Shared>,
}

/// State shared by the senders and the writer thread.
#[derive(Default)]
struct Shared {
    /// Bytes of the lines in the queue.
    queued_bytes: AtomicUsize,
    /// Lines dropped because the queue was full, not yet reported.
    dropped_full: AtomicU64,
    /// Lines put into the queue, ever.
    sent: AtomicU64,
    /// Lines the writer thread took out of the queue and wrote or dropped, ever.
    done: Mutex<u64>,
    /// Signalled when `done` grows.
    progress: Condvar,
}

impl StderrLog {
    /// Starts the writer thread.
    pub(crate) fn start() -> StderrLog {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::sync_channel(MAX_LINES);
        let thread_shared = shared.clone();
        let started = std::thread::Builder::new()
            .name("stderr-log".into())
            .spawn(move || write_lines(rx, &thread_shared, &mut io::stderr()))
            .is_ok();
        StderrLog {
            queue: Queue {
                tx: started.then_some(tx),
                shared,
            },
        }
    }

    /// The [`MakeWriter`] to give the tracing subscriber.
    pub(crate) fn queue(&self) -> Queue {
        self.queue.clone()
    }

    /// Queues one line (a newline is added); never blocks, never fails.
    pub(crate) fn line(&self, text: std::fmt::Arguments<'_>) {
        self.queue.send(format!("{text}\n").into_bytes());
    }

    /// Waits until every line queued so far is written (or dropped), at most
    /// `timeout`; returns whether it was.
    pub(crate) fn flush(&self, timeout: Duration) -> bool {
        self.queue.flush(timeout)
    }
}

impl Drop for StderrLog {
    fn drop(&mut self) {
        self.flush(FLUSH_DEADLINE);
    }
}

impl Queue {
    /// Puts `line` in the queue, or drops and counts it when the queue is full.
    fn send(&self, line: Vec<u8>) {
        if line.is_empty() {
            return;
        }
        let Some(tx) = &self.tx else {
            let _ = io::stderr().write_all(&line);
            return;
        };
        let shared = &self.shared;
        let len = line.len();
        let fits = shared
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued + len <= MAX_BYTES).then_some(queued + len)
            })
            .is_ok();
        if !fits {
            shared.dropped_full.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match tx.try_send(line) {
            Ok(()) => {
                shared.sent.fetch_add(1, Ordering::AcqRel);
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                shared.dropped_full.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn flush(&self, timeout: Duration) -> bool {
        if self.tx.is_none() {
            return true;
        }
        let deadline = Instant::now() + timeout;
        let target = self.shared.sent.load(Ordering::Acquire);
        let mut done = lock(&self.shared.done);
        while *done < target {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            done = self
                .shared
                .progress
                .wait_timeout(done, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

/// One log event being formatted; queued as one line when dropped.
pub(crate) struct LineWriter<'a> {
    queue: &'a Queue,
    buf: Vec<u8>,
}

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // More than the queue could ever hold is cut (and then dropped as too big).
        let room = (MAX_BYTES + 1).saturating_sub(self.buf.len());
        self.buf.extend_from_slice(&buf[..buf.len().min(room)]);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter<'_> {
    fn drop(&mut self) {
        self.queue.send(std::mem::take(&mut self.buf));
    }
}

impl<'a> MakeWriter<'a> for Queue {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> LineWriter<'a> {
        LineWriter {
            queue: self,
            buf: Vec::new(),
        }
    }
}

/// Drops counted by the writer thread and not reported yet.
#[derive(Default)]
struct Dropped {
    /// Lines whose write failed.
    failed: u64,
    /// Lines dropped because the queue was full.
    full: u64,
    /// The last write error.
    error: Option<io::Error>,
}

impl Dropped {
    fn total(&self) -> u64 {
        self.failed + self.full
    }

    /// `recluster: dropped 12 log lines (stderr failed: Broken pipe (os error 32))`.
    fn notice(&self) -> String {
        let n = self.total();
        let lines = if n == 1 { "line" } else { "lines" };
        let why = match (&self.error, self.full) {
            (Some(e), 0) => format!("stderr failed: {e}"),
            (Some(e), full) => format!("stderr failed: {e}; {full} while the queue was full"),
            (None, _) => "stderr too slow: the queue was full".to_string(),
        };
        format!("recluster: dropped {n} log {lines} ({why})\n")
    }
}

/// The writer thread: writes each queued line to `out`, counting the ones it cannot
/// write, until every sender is gone.
fn write_lines(rx: Receiver<Vec<u8>>, shared: &Shared, out: &mut (impl Write + AsRawFd)) {
    let mut dropped = Dropped::default();
    while let Ok(line) = rx.recv() {
        shared.queued_bytes.fetch_sub(line.len(), Ordering::AcqRel);
        dropped.full += shared.dropped_full.swap(0, Ordering::Relaxed);
        // After drops, the notice goes first: its write tells whether stderr is back.
        let result = if dropped.total() > 0 {
            write_fully(out, dropped.notice().as_bytes()).and_then(|()| {
                dropped = Dropped::default();
                write_fully(out, &line)
            })
        } else {
            write_fully(out, &line)
        };
        if let Err(e) = result {
            dropped.failed += 1;
            dropped.error = Some(e);
        }
        *lock(&shared.done) += 1;
        shared.progress.notify_all();
    }
}

/// `write_all`, waiting for room when stderr is non-blocking (a descriptor shared with
/// a program that set O_NONBLOCK on it): only this thread waits.
fn write_fully(out: &mut (impl Write + AsRawFd), mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        match out.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut fd = libc::pollfd {
                    fd: out.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; an error or POLLERR shows in the next write.
                unsafe { libc::poll(&mut fd, 1, -1) };
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stderr that blocks while `stuck`, fails while `broken`, and records what it
    /// was given.
    #[derive(Clone, Default)]
    struct Fake {
        state: Arc<(Mutex<(bool, bool)>, Condvar)>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Fake {
        fn set(&self, stuck: bool, broken: bool) {
            *lock(&self.state.0) = (stuck, broken);
            self.state.1.notify_all();
        }

        fn text(&self) -> String {
            String::from_utf8(lock(&self.written).clone()).unwrap()
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut state = lock(&self.state.0);
            while state.0 {
                state = self.state.1.wait(state).unwrap();
            }
            if state.1 {
                return Err(io::Error::from_raw_os_error(libc::EPIPE));
            }
            lock(&self.written).extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl AsRawFd for Fake {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            -1
        }
    }

    /// A log on a [`Fake`] stderr.
    fn fake_log() -> (StderrLog, Fake) {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::sync_channel(MAX_LINES);
        let fake = Fake::default();
        let mut out = fake.clone();
        let thread_shared = shared.clone();
        std::thread::spawn(move || write_lines(rx, &thread_shared, &mut out));
        let log = StderrLog {
            queue: Queue {
                tx: Some(tx),
                shared,
            },
        };
        (log, fake)
    }

    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn failed_writes_are_counted_and_reported_once_stderr_is_back() {
        let (log, fake) = fake_log();
        log.line(format_args!("one"));
        assert!(log.flush(LONG));
        fake.set(false, true);
        for i in 0..3 {
            log.line(format_args!("lost {i}"));
        }
        assert!(log.flush(LONG));
        fake.set(false, false);
        log.line(format_args!("two"));
        log.line(format_args!("three"));
        assert!(log.flush(LONG));
        assert_eq!(
            fake.text(),
            "one\nrecluster: dropped 3 log lines (stderr failed: Broken pipe (os error 32))\n\
             two\nthree\n"
        );
    }

    #[test]
    fn a_stuck_stderr_never_blocks_the_sender_and_keeps_the_queue_bounded() {
        let (log, fake) = fake_log();
        fake.set(true, false);
        let line = "x".repeat(999);
        let sent = (MAX_BYTES / 1000) * 4;
        let shared = &log.queue.shared;
        // The writer takes the first line and sticks on it; only then the flood, so that
        // every drop happens while stderr is stuck (a writer that started late would
        // report drops from before and after its first write separately).
        log.line(format_args!("{line}"));
        let deadline = Instant::now() + LONG;
        while shared.queued_bytes.load(Ordering::Acquire) != 0 {
            assert!(Instant::now() < deadline, "the writer never took the first line");
            std::thread::yield_now();
        }
        for _ in 1..sent {
            log.line(format_args!("{line}"));
        }
        assert!(shared.queued_bytes.load(Ordering::Acquire) <= MAX_BYTES);
        assert!(shared.dropped_full.load(Ordering::Acquire) > 0);
        let started = Instant::now();
        assert!(!log.flush(Duration::from_millis(100)), "stderr is stuck");
        assert!(started.elapsed() < LONG, "the flush is bounded");

        fake.set(false, false);
        log.line(format_args!("back"));
        assert!(log.flush(LONG));
        let text = fake.text();
        let written = text.lines().filter(|l| *l == line).count();
        let notice = format!(
            "recluster: dropped {} log lines (stderr too slow: the queue was full)",
            sent - written
        );
        assert_eq!(
            text.lines().filter(|l| *l == notice).count(),
            1,
            "{notice} once in:\n{text}"
        );
        assert!(text.ends_with("\nback\n"), "{text}");
    }

    #[test]
    fn the_tracing_writer_queues_one_line_per_event() {
        let (log, fake) = fake_log();
        let queue = log.queue();
        {
            let mut w = queue.make_writer();
            w.write_all(b"part one, ").unwrap();
            w.write_all(b"part two\n").unwrap();
        }
        assert!(log.flush(LONG));
        assert_eq!(fake.text(), "part one, part two\n");
    }
}
