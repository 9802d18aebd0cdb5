//! Workers' output with `--prefix`: each line a worker writes to stdout or stderr is
//! written to the master's own, with `[SLOT PID] ` in front (as foreman and PM2 do),
//! or, with `--log-format json`, as a JSON object like the master's own lines
//! (`event` `worker_output`, `slot`, `pid`, `stream`, the line as `message`), so that
//! a log shipper parsing JSON is not broken by a worker's text.
//!
//! Without it, workers write to the master's descriptors themselves: N servers'
//! lines arrive unlabelled, and two lines longer than `PIPE_BUF` written at once may
//! be mixed inside a line. With it, each worker gets a pipe for fd 1 and one for fd
//! 2 (close-on-exec on the master's side), which the event loop reads, and each line
//! goes whole, prefixed, into the queue of the master's stdout or stderr
//! (`crate::stdio`), whose one writer thread per descriptor keeps lines apart.
//!
//! A worker is untrusted, so everything is bounded:
//! * a pipe is read into a buffer of [`MAX_LINE`] bytes: a longer line is cut into
//!   pieces of that size, each written with the prefix as a line of its own;
//! * the event loop never waits for the master's stdout or stderr: lines go into their
//!   bounded queues, and memory stays the queues' bound plus one buffer per pipe;
//! * when a queue is full, the relay stops reading for up to [`GRACE`], which slows a
//!   worker that writes faster than the master's output takes (as a terminal would);
//!   if the queue is still full then, the output is stuck: the relay reads again and
//!   drops lines until one fits, so a worker is never held in a write to its stdout
//!   (it would stop serving). Drops are counted, and logged (`output_dropped`) at most
//!   once per [`REPORT_EVERY`].
//!
//! A pipe ends when every process holding its write end has closed it: the worker's
//! children inherit it, and may keep writing after the worker is gone. A last line
//! without a newline is written, prefixed, at that end. When the cluster ends, the
//! relays get [`crate::stdio::FLUSH_DEADLINE`] to reach the end of their pipes and
//! the queues to be written; what is left then is dropped.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::stdio::{self, Queue};

/// The longest piece of a line written as one line; a longer line is cut.
pub(crate) const MAX_LINE: usize = 16 * 1024;

/// At most one `output_dropped` line per this long.
pub(crate) const REPORT_EVERY: Duration = Duration::from_secs(1);

/// How long a relay waits for room in a full queue before it drops lines: longer
/// than a slow reader's hiccup, shorter than [`crate::stdio::FLUSH_DEADLINE`].
const GRACE: Duration = Duration::from_millis(500);

/// More than a worker line's JSON object holds besides the line itself (escaped, at
/// most 6 bytes a byte: `\u001f`).
const JSON_OVERHEAD: usize = 256;

/// Stream names, by index: 0 for stdout, 1 for stderr.
const STREAMS: [&str; 2] = ["stdout", "stderr"];

/// The queue of the master's descriptor for stream `i`.
fn queue(i: usize) -> &'static Queue {
    if i == 0 {
        stdio::stdout()
    } else {
        stdio::stderr()
    }
}

/// The two pipes of one worker about to be started.
pub(crate) struct Pipes {
    /// Write ends, to become the worker's stdout and stderr.
    pub worker: [OwnedFd; 2],
    /// Read ends, for the master.
    master: [OwnedFd; 2],
}

impl Pipes {
    /// Two pipes, every end close-on-exec (the worker gets its copies by `dup2`).
    pub fn new() -> io::Result<Pipes> {
        let (out_r, out_w) = cloexec_pipe()?;
        let (err_r, err_w) = cloexec_pipe()?;
        Ok(Pipes {
            worker: [out_w, err_w],
            master: [out_r, err_r],
        })
    }
}

/// Creates a pipe whose both ends are close-on-exec; the write end stays blocking, as
/// a worker's stdout is expected to be.
fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Lines refused by the queues, per stream, not yet reported.
#[derive(Default)]
struct Drops {
    counts: [AtomicU64; 2],
    /// Wakes the reporter.
    wake: Notify,
}

impl Drops {
    /// Logs what was dropped since the last report (refused by the queues, or failed
    /// in the writer threads), if anything was.
    fn report(&self) {
        let [out, err] = [0, 1].map(|i| {
            self.counts[i].swap(0, Ordering::AcqRel) + queue(i).take_worker_failed()
        });
        if out + err > 0 {
            warn!(
                event = "output_dropped",
                stdout = out,
                stderr = err,
                "dropped lines of the workers' output: the master's stdout or stderr was too slow, or failed"
            );
        }
    }
}

/// The relays of every worker's output, and the reporter of their drops.
pub(crate) struct Output {
    /// Lines become JSON objects.
    json: bool,
    drops: Arc<Drops>,
    reporter: JoinHandle<()>,
    relays: Vec<JoinHandle<()>>,
}

impl Output {
    /// Starts the reporter (a task that sleeps until something is dropped); `json`:
    /// each line is written as a JSON object.
    pub fn new(json: bool) -> Output {
        let drops = Arc::new(Drops::default());
        let reporter = tokio::spawn(report(drops.clone()));
        Output {
            json,
            drops,
            reporter,
            relays: Vec::new(),
        }
    }

    /// Relays the output of worker `pid` of `slot`, just started with `pipes`.
    pub fn relay(&mut self, pipes: Pipes, slot: usize, pid: u32) {
        // Only the worker (and what it starts) holds the write ends now: the pipes end
        // when it and its children have closed them.
        let Pipes { worker, master } = pipes;
        drop(worker);
        self.relays.retain(|r| !r.is_finished());
        let label = if self.json {
            Label::Json { slot, pid }
        } else {
            Label::Prefix(format!("[{slot} {pid}] ").into_bytes().into())
        };
        for (stream, fd) in master.into_iter().enumerate() {
            let task = relay(fd, stream, label.clone(), self.drops.clone());
            self.relays.push(tokio::spawn(task));
        }
    }

    /// At the end of the cluster: lets the relays reach the end of their pipes and the
    /// queues be written, within [`stdio::FLUSH_DEADLINE`], then reports what was
    /// dropped.
    pub async fn finish(self) {
        let deadline = Instant::now() + stdio::FLUSH_DEADLINE;
        for mut relay in self.relays {
            if tokio::time::timeout_at(deadline, &mut relay).await.is_err() {
                relay.abort();
            }
        }
        self.reporter.abort();
        // The writer threads may be stuck: wait for them off the event loop.
        let flushed = tokio::task::spawn_blocking(move || {
            (0..2).all(|i| queue(i).flush(deadline.saturating_duration_since(Instant::now())))
        })
        .await
        .unwrap_or(false);
        if !flushed {
            debug!(
                event = "output_unflushed",
                "the workers' last output was not all written: the master's stdout or stderr is stuck"
            );
        }
        self.drops.report();
    }
}

/// The reporter: one `output_dropped` line when something was dropped, then at most
/// one per [`REPORT_EVERY`].
async fn report(drops: Arc<Drops>) {
    loop {
        drops.wake.notified().await;
        drops.report();
        tokio::time::sleep(REPORT_EVERY).await;
    }
}

/// How a worker's lines are marked as its own.
#[derive(Clone)]
enum Label {
    /// `[SLOT PID] ` in front.
    Prefix(Arc<[u8]>),
    /// A JSON object each.
    Json { slot: usize, pid: u32 },
}

/// Reads one pipe to its end, queueing each line with `label` on stream `stream`.
async fn relay(fd: OwnedFd, stream: usize, label: Label, drops: Arc<Drops>) {
    let mut rx = match pipe::Receiver::from_owned_fd(fd) {
        Ok(rx) => rx,
        Err(e) => {
            warn!(event = "output_failed", stream = STREAMS[stream], error = %e, "cannot read a worker's output");
            return;
        }
    };
    let mut sink = Sink {
        stream,
        label,
        drops,
        stuck: false,
    };
    let mut lines = Lines::new();
    loop {
        match rx.read(lines.room()).await {
            Ok(0) => break,
            Ok(n) => {
                lines.filled(n);
                while let Some(piece) = lines.next_piece() {
                    sink.put(piece).await;
                    // A worker writing empty lines into a stuck output makes thousands
                    // of drops per read, none of which waits: let the event loop run.
                    tokio::task::coop::consume_budget().await;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                debug!(event = "output_failed", stream = STREAMS[stream], error = %e, "reading a worker's output failed");
                break;
            }
        }
    }
    if let Some(last) = lines.rest() {
        sink.put(last).await;
    }
}

/// Where one pipe's lines go: the queue of the master's descriptor.
struct Sink {
    stream: usize,
    label: Label,
    drops: Arc<Drops>,
    /// The queue stayed full for [`GRACE`]: lines are dropped at once until one fits.
    stuck: bool,
}

impl Sink {
    /// Queues `prefix piece \n` (or the JSON object). When the queue is full, waits up
    /// to [`GRACE`] for room (not reading the pipe meanwhile, so a worker writing faster
    /// than the master's output takes is slowed, not cut); past that, or while stuck,
    /// drops and counts the line.
    async fn put(&mut self, piece: &[u8]) {
        let queue = queue(self.stream);
        // Stuck, a line that cannot fit is dropped before it costs anything.
        let most = match &self.label {
            Label::Prefix(prefix) => prefix.len() + piece.len() + 1,
            Label::Json { .. } => JSON_OVERHEAD + piece.len() * 6,
        };
        if self.stuck && !queue.may_fit(most) {
            self.dropped();
            return;
        }
        let object: String;
        let json: [&[u8]; 1];
        let prefixed;
        let parts: &[&[u8]] = match &self.label {
            Label::Prefix(prefix) => {
                prefixed = [&prefix[..], piece, b"\n"];
                &prefixed
            }
            Label::Json { slot, pid } => {
                let fields = serde_json::json!({
                    "message": String::from_utf8_lossy(piece),
                    "event": "worker_output",
                    "slot": slot,
                    "pid": pid,
                    "stream": STREAMS[self.stream],
                });
                object = stdio::json_object("INFO", "worker", fields);
                json = [object.as_bytes()];
                &json
            }
        };
        let queued = queue.offer(parts) || (!self.stuck && self.wait(queue, parts).await);
        self.stuck = !queued;
        if !queued {
            self.dropped();
        } else if queue.worker_failed() {
            self.drops.wake.notify_one();
        }
    }

    /// Counts a dropped line and wakes the reporter.
    fn dropped(&self) {
        self.drops.counts[self.stream].fetch_add(1, Ordering::AcqRel);
        self.drops.wake.notify_one();
    }

    /// Offers `parts` each time a line leaves the queue, until [`GRACE`] has passed;
    /// true once queued.
    async fn wait(&self, queue: &Queue, parts: &[&[u8]]) -> bool {
        let deadline = Instant::now() + GRACE;
        loop {
            let room = queue.room().notified();
            tokio::pin!(room);
            // Registered before the offer: a line leaving in between still wakes us.
            room.as_mut().enable();
            if queue.offer(parts) {
                return true;
            }
            if tokio::time::timeout_at(deadline, room).await.is_err() {
                return false;
            }
        }
    }
}

/// Cuts bytes into lines (without their newline) and pieces of at most [`MAX_LINE`]
/// bytes, in a buffer of that size.
struct Lines {
    buf: Box<[u8]>,
    /// Bytes read into `buf`.
    len: usize,
    /// Bytes of `buf` already given out as pieces.
    start: usize,
    /// Bytes of `buf` searched for a newline.
    scanned: usize,
    /// The last piece was cut from a line, not ended by its newline: a newline that
    /// comes right after it ends that line, and is no empty line of its own.
    cut: bool,
}

impl Lines {
    fn new() -> Self {
        Lines {
            buf: vec![0; MAX_LINE].into_boxed_slice(),
            len: 0,
            start: 0,
            scanned: 0,
            cut: false,
        }
    }

    /// Where the next bytes go: never empty once [`Lines::next_piece`] has returned
    /// `None`.
    fn room(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.len, 0);
            self.len -= self.start;
            self.scanned -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.len..]
    }

    /// `n` bytes were read into [`Lines::room`].
    fn filled(&mut self, n: usize) {
        self.len += n;
    }

    /// The next complete line, or a full buffer without a newline as one piece.
    fn next_piece(&mut self) -> Option<&[u8]> {
        if self.cut && self.start < self.len {
            self.cut = false;
            if self.buf[self.start] == b'\n' {
                self.start += 1;
                self.scanned = self.start;
            }
        }
        let from = self.scanned.max(self.start);
        match self.buf[from..self.len].iter().position(|&b| b == b'\n') {
            Some(i) => {
                let line = self.start..from + i;
                self.start = from + i + 1;
                self.scanned = self.start;
                Some(&self.buf[line])
            }
            None if self.start == 0 && self.len == self.buf.len() => {
                // Cut before a character the buffer holds only the start of: it goes
                // whole into the next piece.
                let end = self.len - incomplete_tail(&self.buf[..self.len]);
                self.start = end;
                self.scanned = end;
                self.cut = true;
                Some(&self.buf[..end])
            }
            None => {
                self.scanned = self.len;
                None
            }
        }
    }

    /// At the end of the stream: a last line without a newline.
    fn rest(&self) -> Option<&[u8]> {
        (self.start < self.len).then(|| &self.buf[self.start..self.len])
    }
}

/// How many bytes at the end of `buf` begin a UTF-8 character that is not complete
/// (0 to 3; 0 for bytes that are not UTF-8 at all).
fn incomplete_tail(buf: &[u8]) -> usize {
    for back in 1..=buf.len().min(3) {
        let b = buf[buf.len() - back];
        if b & 0xc0 == 0x80 {
            continue; // a continuation byte: its lead is further back
        }
        let needs = match b {
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 1,
        };
        return if needs > back { back } else { 0 };
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `chunks`, read in turn, are cut into.
    fn cut(chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut lines = Lines::new();
        for chunk in chunks {
            let mut rest = *chunk;
            while !rest.is_empty() {
                let room = lines.room();
                let n = room.len().min(rest.len());
                room[..n].copy_from_slice(&rest[..n]);
                lines.filled(n);
                rest = &rest[n..];
                while let Some(piece) = lines.next_piece() {
                    out.push(piece.to_vec());
                }
            }
        }
        out.extend(lines.rest().map(<[u8]>::to_vec));
        out
    }

    #[test]
    fn lines_are_split_at_newlines_across_reads() {
        assert_eq!(
            cut(&[b"one\ntw", b"o\n\nthr", b"ee"]),
            vec![b"one".to_vec(), b"two".to_vec(), b"".to_vec(), b"three".to_vec()]
        );
        assert!(cut(&[b""]).is_empty());
    }

    #[test]
    fn a_long_line_is_cut_into_pieces_of_max_line() {
        let long = vec![b'x'; MAX_LINE * 2 + 10];
        let mut input = long.clone();
        input.extend_from_slice(b"\nshort\n");
        let out = cut(&[&input[..100], &input[100..]]);
        let lens: Vec<usize> = out.iter().map(Vec::len).collect();
        assert_eq!(lens, vec![MAX_LINE, MAX_LINE, 10, 5]);
        assert_eq!(out[..3].concat(), long);
        // Exactly MAX_LINE then a newline: one piece, no empty line after it.
        let mut exact = vec![b'y'; MAX_LINE];
        exact.extend_from_slice(b"\n\nz\n");
        let out = cut(&[&exact]);
        assert_eq!(out.iter().map(Vec::len).collect::<Vec<_>>(), vec![MAX_LINE, 0, 1]);
    }

    #[test]
    fn a_long_line_is_cut_between_characters_not_inside_one() {
        // 3-byte and 4-byte characters: MAX_LINE is a multiple of neither.
        for ch in ["€", "😀"] {
            let line = ch.repeat(MAX_LINE * 2 / ch.len() + 5);
            let mut input = line.clone().into_bytes();
            input.push(b'\n');
            let out = cut(&[&input]);
            assert!(out.len() >= 3, "{ch}: {} pieces", out.len());
            for piece in &out {
                assert!(piece.len() <= MAX_LINE);
                assert!(std::str::from_utf8(piece).is_ok(), "{ch}: a piece cut a character");
            }
            assert_eq!(out.concat(), line.into_bytes());
        }
        assert_eq!(incomplete_tail(b"ab\xe2\x82"), 2);
        assert_eq!(incomplete_tail(b"ab\xe2\x82\xac"), 0);
        assert_eq!(incomplete_tail(b"ab\xf0"), 1);
        assert_eq!(incomplete_tail(b"\x80\x80\x80"), 0, "not UTF-8: cut anywhere");
        assert_eq!(incomplete_tail(b""), 0);
    }
}
