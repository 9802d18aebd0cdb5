//! The master's standard output and error: each a bounded queue of lines, written by
//! a thread of its own.
//!
//! The master must outlive its stdout and stderr. `recluster … 2>&1 | head -3` leaves
//! it a pipe nobody reads (every write fails with EPIPE); a closed terminal leaves it a
//! hung-up tty (SIGHUP, then EIO on every write); a full disk gives ENOSPC; a pipe whose
//! reader is merely slow blocks. Writing straight to them from the event loop turns
//! each of these into an outage: tracing-subscriber reports a failed write with
//! `eprintln!`, which panics when stderr is broken (the master exits 101 and its
//! workers die with it), and a blocking write stalls the one thread that also
//! supervises the workers.
//!
//! So a line only ever goes into a queue here, which never blocks and never fails: a
//! bounded channel of lines (at most [`MAX_LINES`] lines and [`MAX_BYTES`] bytes)
//! emptied by one writer thread per descriptor. There is one queue per descriptor for
//! the whole process ([`stdout`], [`stderr`]), so that everything the master writes to
//! one descriptor — its own log, its workers' prefixed output (`--prefix`,
//! `runtime::output`) — is written whole line by whole line by one thread: two lines
//! never interleave, whatever their length.
//!
//! Two kinds of line go in. The master's own log lines ([`Queue::send`]): one that does
//! not fit, or whose write fails, is dropped and counted, and on stderr the next line
//! is preceded by one `recluster: dropped N log lines (…)` line: drops are reported
//! once each time stderr comes back. Workers' lines ([`Queue::offer`]): an untrusted
//! worker may write without end, so its lines may take at most three quarters of the
//! queue (a flooding worker cannot crowd the master's own log out), a line that does
//! not fit is refused for the caller to count (or to wait for [`Queue::room`]), and one whose write fails is counted
//! here ([`Queue::take_worker_failed`]). At exit [`StderrLog`] flushes what is queued,
//! but waits at most [`FLUSH_DEADLINE`], so a stuck descriptor cannot hang the exit.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// At most this many lines wait in a queue.
pub(crate) const MAX_LINES: usize = 512;
/// At most this many bytes wait in a queue.
pub(crate) const MAX_BYTES: usize = 256 * 1024;
/// Workers' lines may take at most this many of the queue's lines…
const WORKER_LINES: usize = MAX_LINES / 4 * 3;
/// …and of its bytes: the rest is kept for the master's own log.
const WORKER_BYTES: usize = MAX_BYTES / 4 * 3;
/// How long [`StderrLog`] waits at exit for the queue to be written.
pub(crate) const FLUSH_DEADLINE: Duration = Duration::from_secs(1);

/// The queue of the master's stdout (fd 1), started on first use.
pub(crate) fn stdout() -> &'static Queue {
    static STDOUT: OnceLock<Queue> = OnceLock::new();
    STDOUT.get_or_init(|| Queue::start(1, false))
}

/// The queue of the master's stderr (fd 2), started on first use.
pub(crate) fn stderr() -> &'static Queue {
    static STDERR: OnceLock<Queue> = OnceLock::new();
    STDERR.get_or_init(|| Queue::start(2, true))
}

/// The log writer of the command line: the stderr queue, flushed (bounded by
/// [`FLUSH_DEADLINE`]) when dropped.
pub(crate) struct StderrLog {
    queue: Queue,
}

/// The sending side of one descriptor's queue; for stderr, also the tracing
/// subscriber's [`MakeWriter`].
#[derive(Clone)]
pub(crate) struct Queue {
    /// `None` when the writer thread could not be started: log lines are then written
    /// straight to the descriptor, errors ignored, and workers' lines dropped.
    tx: Option<SyncSender<Line>>,
    /// The descriptor, for the straight writes.
    fd: RawFd,
    shared: Arc<Shared>,
}

/// One queued line and who sent it.
struct Line {
    bytes: Vec<u8>,
    /// A worker's line ([`Queue::offer`]), not the master's own.
    worker: bool,
}

/// State shared by the senders and the writer thread.
#[derive(Default)]
struct Shared {
    /// Bytes of the lines in the queue.
    queued_bytes: AtomicUsize,
    /// Lines in the queue.
    queued_lines: AtomicUsize,
    /// Log lines dropped because the queue was full, not yet reported.
    dropped_full: AtomicU64,
    /// Workers' lines whose write failed, not yet taken.
    worker_failed: AtomicU64,
    /// Drop notices are JSON objects (`--log-format json`), not text.
    json: AtomicBool,
    /// Lines put into the queue, ever.
    sent: AtomicU64,
    /// Lines the writer thread took out of the queue and wrote or dropped, ever.
    done: Mutex<u64>,
    /// Signalled when `done` grows.
    progress: Condvar,
    /// Woken when a line has left the queue: there may be room again.
    room: tokio::sync::Notify,
}

impl StderrLog {
    /// The stderr queue (its writer thread started if it was not), with drop notices in
    /// JSON when `json`.
    pub(crate) fn start(json: bool) -> StderrLog {
        let queue = stderr().clone();
        queue.shared.json.store(json, Ordering::Relaxed);
        StderrLog { queue }
    }

    /// The [`MakeWriter`] to give the tracing subscriber.
    pub(crate) fn queue(&self) -> Queue {
        self.queue.clone()
    }

    /// Queues one line of an error that ends the master (a newline is added; with
    /// `--log-format json`, as the message of an `exit_error` object); never blocks,
    /// never fails.
    pub(crate) fn line(&self, text: std::fmt::Arguments<'_>) {
        let line = if self.queue.shared.json.load(Ordering::Relaxed) {
            json_line("ERROR", "exit_error", &text.to_string(), None)
        } else {
            format!("{text}\n")
        };
        self.queue.send(line.into_bytes());
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
    /// Starts the writer thread of descriptor `fd`; `notices`: drops of log lines are
    /// reported on `fd` itself (stderr), not only counted.
    fn start(fd: RawFd, notices: bool) -> Queue {
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::sync_channel(MAX_LINES);
        let thread_shared = shared.clone();
        let started = std::thread::Builder::new()
            .name(format!("fd{fd}-writer"))
            .spawn(move || write_lines(rx, &thread_shared, &mut RawOut(fd), notices))
            .is_ok();
        Queue {
            tx: started.then_some(tx),
            fd,
            shared,
        }
    }

    /// Puts a log line in the queue, or drops and counts it when the queue is full.
    pub(crate) fn send(&self, line: Vec<u8>) {
        if line.is_empty() {
            return;
        }
        if self.tx.is_none() {
            let _ = write_fully(&mut RawOut(self.fd), &line);
            return;
        }
        if !self.push(line, false, MAX_LINES, MAX_BYTES) {
            self.shared.dropped_full.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Puts a worker's line, the concatenation of `parts`, in the queue; false (and
    /// nothing allocated) when it does not fit: the caller counts it. Never blocks.
    pub(crate) fn offer(&self, parts: &[&[u8]]) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if self.tx.is_none() || len == 0 || !self.reserve(len, WORKER_LINES, WORKER_BYTES) {
            return false;
        }
        let bytes = parts.concat();
        self.enqueue(Line {
            bytes,
            worker: true,
        })
    }

    /// Whether a worker's line of `len` bytes would fit now (a hint: the queue may
    /// change before it is offered).
    pub(crate) fn may_fit(&self, len: usize) -> bool {
        let shared = &self.shared;
        self.tx.is_some()
            && shared.queued_bytes.load(Ordering::Acquire) + len <= WORKER_BYTES
            && shared.queued_lines.load(Ordering::Acquire) < WORKER_LINES
    }

    /// Woken (`notify_waiters`) each time a line has left the queue, for a sender that
    /// waits for room.
    pub(crate) fn room(&self) -> &tokio::sync::Notify {
        &self.shared.room
    }

    /// Workers' lines whose write failed since the last call.
    pub(crate) fn take_worker_failed(&self) -> u64 {
        self.shared.worker_failed.swap(0, Ordering::AcqRel)
    }

    /// Whether workers' lines failed since the last [`Queue::take_worker_failed`].
    pub(crate) fn worker_failed(&self) -> bool {
        self.shared.worker_failed.load(Ordering::Acquire) > 0
    }

    /// Reserves room and queues `bytes`; false when it does not fit.
    fn push(&self, bytes: Vec<u8>, worker: bool, lines: usize, max: usize) -> bool {
        self.reserve(bytes.len(), lines, max) && self.enqueue(Line { bytes, worker })
    }

    /// Counts `len` bytes and one line in, if the queue then holds at most `lines`
    /// lines and `max` bytes.
    fn reserve(&self, len: usize, lines: usize, max: usize) -> bool {
        let shared = &self.shared;
        let fits = shared
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued + len <= max).then_some(queued + len)
            })
            .is_ok();
        if !fits {
            return false;
        }
        let counted = shared
            .queued_lines
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued < lines).then_some(queued + 1)
            })
            .is_ok();
        if !counted {
            shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
        }
        counted
    }

    /// Sends a line whose room is reserved; false (room given back) when the channel
    /// is full or its thread gone.
    fn enqueue(&self, line: Line) -> bool {
        let Some(tx) = &self.tx else { return false };
        let len = line.bytes.len();
        match tx.try_send(line) {
            Ok(()) => {
                self.shared.sent.fetch_add(1, Ordering::AcqRel);
                true
            }
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.shared.queued_bytes.fetch_sub(len, Ordering::AcqRel);
                self.shared.queued_lines.fetch_sub(1, Ordering::AcqRel);
                false
            }
        }
    }

    /// Waits until every line queued so far is written (or dropped), at most
    /// `timeout`; returns whether it was.
    pub(crate) fn flush(&self, timeout: Duration) -> bool {
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

/// A descriptor written with plain `write(2)`: no buffer of its own, so a line is
/// written, or failed, when the writer thread writes it.
struct RawOut(RawFd);

impl Write for RawOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for `buf.len()` bytes; a closed fd is EBADF.
        let n = unsafe { libc::write(self.0, buf.as_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for RawOut {
    fn as_raw_fd(&self) -> RawFd {
        self.0
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

    /// `recluster: dropped 12 log lines (stderr failed: Broken pipe (os error 32))`,
    /// or that text as the `message` of a JSON log object when `json`.
    fn notice(&self, json: bool) -> String {
        let n = self.total();
        let lines = if n == 1 { "line" } else { "lines" };
        let why = match (&self.error, self.full) {
            (Some(e), 0) => format!("stderr failed: {e}"),
            (Some(e), full) => format!("stderr failed: {e}; {full} while the queue was full"),
            (None, _) => "stderr too slow: the queue was full".to_string(),
        };
        let text = format!("recluster: dropped {n} log {lines} ({why})");
        if json {
            json_line("WARN", "log_dropped", &text, Some(n))
        } else {
            format!("{text}\n")
        }
    }
}

/// A line the master writes itself, outside tracing, in the shape of
/// tracing-subscriber's JSON lines (`--log-format json`), newline included.
fn json_line(level: &str, event: &str, message: &str, lines: Option<u64>) -> String {
    let mut fields = serde_json::json!({ "message": message, "event": event });
    if let Some(n) = lines {
        fields["lines"] = n.into();
    }
    json_object(level, "recluster", fields)
}

/// One line in the shape of tracing-subscriber's JSON lines, with `fields` and the
/// time now, newline included.
pub(crate) fn json_object(level: &str, target: &str, fields: serde_json::Value) -> String {
    use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
    let mut timestamp = String::new();
    let _ = SystemTime.format_time(&mut tracing_subscriber::fmt::format::Writer::new(
        &mut timestamp,
    ));
    let object = serde_json::json!({
        "timestamp": timestamp,
        "level": level,
        "fields": fields,
        "target": target,
    });
    format!("{object}\n")
}

/// The writer thread: writes each queued line to `out`, counting the ones it cannot
/// write, until every sender is gone. With `notices`, dropped log lines are reported
/// on `out` once it works again.
fn write_lines(
    rx: Receiver<Line>,
    shared: &Shared,
    out: &mut (impl Write + AsRawFd),
    notices: bool,
) {
    let mut dropped = Dropped::default();
    while let Ok(line) = rx.recv() {
        shared
            .queued_bytes
            .fetch_sub(line.bytes.len(), Ordering::AcqRel);
        shared.queued_lines.fetch_sub(1, Ordering::AcqRel);
        dropped.full += shared.dropped_full.swap(0, Ordering::Relaxed);
        // After drops, the notice goes first: its write tells whether stderr is back.
        let result = if notices && dropped.total() > 0 {
            let json = shared.json.load(Ordering::Relaxed);
            write_fully(out, dropped.notice(json).as_bytes()).and_then(|()| {
                dropped = Dropped::default();
                write_fully(out, &line.bytes)
            })
        } else {
            write_fully(out, &line.bytes)
        };
        if let Err(e) = result {
            if line.worker {
                shared.worker_failed.fetch_add(1, Ordering::AcqRel);
            } else {
                dropped.failed += 1;
                dropped.error = Some(e);
            }
        }
        *lock(&shared.done) += 1;
        shared.progress.notify_all();
        shared.room.notify_waiters();
    }
}

/// `write_all`, waiting for room when the descriptor is non-blocking (one shared with
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
        std::thread::spawn(move || write_lines(rx, &thread_shared, &mut out, true));
        let log = StderrLog {
            queue: Queue {
                tx: Some(tx),
                fd: -1,
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

    #[test]
    fn workers_lines_leave_room_for_the_log() {
        let (log, fake) = fake_log();
        fake.set(true, false);
        let shared = &log.queue.shared;
        log.line(format_args!("first"));
        let deadline = Instant::now() + LONG;
        while shared.queued_lines.load(Ordering::Acquire) != 0 {
            assert!(Instant::now() < deadline, "the writer never took the first line");
            std::thread::yield_now();
        }
        let piece = [b'w'; 999];
        let mut offered = 0;
        while log.queue.offer(&[&piece, b"\n"]) {
            offered += 1;
            assert!(offered <= MAX_LINES, "workers' lines are never refused");
        }
        assert!(shared.queued_bytes.load(Ordering::Acquire) <= WORKER_BYTES);
        assert_eq!(offered, WORKER_BYTES / 1000);
        for i in 0..10 {
            log.line(format_args!("log {i}"));
        }
        assert_eq!(shared.dropped_full.load(Ordering::Acquire), 0, "the log still fits");
        fake.set(false, false);
        assert!(log.flush(LONG));
        let text = fake.text();
        assert_eq!(text.lines().filter(|l| l.starts_with('w')).count(), offered);
        assert!(text.ends_with("log 8\nlog 9\n"), "{text}");
        assert!(!text.contains("dropped"), "{text}");
    }

    #[test]
    fn failed_worker_lines_are_counted_for_the_caller_not_in_the_log_notice() {
        let (log, fake) = fake_log();
        fake.set(false, true);
        assert!(log.queue.offer(&[b"[0 1] lost\n"]));
        assert!(log.queue.offer(&[b"[0 1] lost too\n"]));
        assert!(log.flush(LONG));
        assert!(log.queue.worker_failed());
        assert_eq!(log.queue.take_worker_failed(), 2);
        assert_eq!(log.queue.take_worker_failed(), 0);
        fake.set(false, false);
        log.line(format_args!("back"));
        assert!(log.flush(LONG));
        assert_eq!(fake.text(), "back\n");
    }

    #[test]
    fn json_notices_are_log_objects() {
        let dropped = Dropped {
            failed: 2,
            full: 1,
            error: Some(io::Error::from_raw_os_error(libc::EPIPE)),
        };
        let line = dropped.notice(true);
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1, "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["fields"]["event"], "log_dropped");
        assert_eq!(v["fields"]["lines"], 3);
        assert!(v["timestamp"].as_str().unwrap().ends_with('Z'), "{line}");
        assert!(v["fields"]["message"].as_str().unwrap().contains("dropped 3 log lines"));
    }
}
