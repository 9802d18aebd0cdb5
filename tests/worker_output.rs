//! Workers' output and the master's log format, end to end: the real binary, real
//! worker processes (`python3`, `sh`), the master's stdout and stderr captured.
//!
//! `--prefix`: every line a worker writes reaches the master's stdout or stderr whole,
//! as `[SLOT PID] line`, even when lines longer than `PIPE_BUF` are written at once by
//! two workers and two streams; a line over 16 KiB is cut into prefixed pieces; a last
//! line without a newline is written when the worker ends. Without it, workers write
//! to the master's stdout themselves. A worker that floods its stdout while nobody
//! reads the master's neither stalls the master (it reloads and terminates on time)
//! nor grows its memory. `--log-format json`: every line of the master's stderr is a
//! JSON object. Waits are for log events or captured lines, with deadlines.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// The piece a long line is cut into (`runtime::output::MAX_LINE`).
const MAX_LINE: usize = 16 * 1024;

/// Lines each worker writes to stdout, and to stderr.
const OUT_LINES: usize = 400;
const ERR_LINES: usize = 120;

/// Length of the long line each worker writes to stdout: more than two pieces.
const LONG: usize = 2 * MAX_LINE + 1000;

/// A worker writing, from two threads at once, `OUT_LINES` lines to stdout and
/// `ERR_LINES` to stderr (many longer than `PIPE_BUF`, each in one `write`), then one
/// line of `LONG` bytes to stdout, then a last line without a newline; then it waits
/// for its stop signal.
const WRITER: &str = r#"
import os, signal, sys, threading
slot = os.environ["WORKER_ID"]
def line(stream, i):
    n = (i * 997) % 9000 + (5000 if i % 7 == 0 else 0)
    body = chr(97 + i % 26) * n
    return f"slot{slot}-{stream}-line{i}-{n}-{body}-end\n".encode()
def write_all(fd, data):
    while data:
        data = data[os.write(fd, data):]
def write(fd, stream, count):
    for i in range(count):
        write_all(fd, line(stream, i))
    if fd == 1:
        write_all(1, f"slot{slot}-long-".encode() + b"L" * int(sys.argv[3]) + b"-end\n")
    write_all(fd, f"slot{slot}-{stream}-done\n".encode())
threads = [threading.Thread(target=write, args=(1, "out", int(sys.argv[1]))),
           threading.Thread(target=write, args=(2, "err", int(sys.argv[2])))]
for t in threads: t.start()
for t in threads: t.join()
write_all(1, f"slot{slot}-partial-no-newline".encode())
signal.pause()
"#;

/// Reads `r` line by line into a shared list until EOF.
fn collect(r: impl std::io::Read + Send + 'static) -> (Arc<Mutex<Vec<String>>>, JoinHandle<()>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    let thread = std::thread::spawn(move || {
        let mut reader = BufReader::new(r);
        let mut buf = Vec::new();
        while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
            let text = String::from_utf8_lossy(&buf);
            sink.lock()
                .unwrap()
                .push(text.trim_end_matches('\n').to_string());
            buf.clear();
        }
    });
    (lines, thread)
}

/// The master's own log lines (not its workers' output), for failure messages.
fn log_only(m: &Master) -> String {
    let lines: Vec<String> = m
        .lines()
        .into_iter()
        .filter(|l| !l.level.is_empty())
        .map(|l| l.raw)
        .collect();
    lines.join("\n")
}

/// `[SLOT PID] rest` → (slot, pid, rest).
fn prefixed(line: &str) -> Option<(usize, u32, &str)> {
    let rest = line.strip_prefix('[')?;
    let (slot, rest) = rest.split_once(' ')?;
    let (pid, rest) = rest.split_once("] ")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(slot) || !digits(pid) {
        return None;
    }
    Some((slot.parse().ok()?, pid.parse().ok()?, rest))
}

/// What `WRITER` wrote as line `i` of `stream` in `slot`.
fn expected(slot: usize, stream: &str, i: usize) -> String {
    let n = (i * 997) % 9000 + if i % 7 == 0 { 5000 } else { 0 };
    let body = char::from(b'a' + (i % 26) as u8).to_string().repeat(n);
    format!("slot{slot}-{stream}-line{i}-{n}-{body}-end")
}

/// Checks one stream's payloads (prefix stripped) of one slot, in order: each line is
/// one `WRITER` wrote, whole; the long line comes as its pieces. Returns which of the
/// numbered lines arrived, and whether the long line and the partial one did.
fn check_payloads(slot: usize, stream: &str, payloads: &[&str]) -> (Vec<usize>, bool, bool) {
    let mut seen = Vec::new();
    let (mut long, mut partial) = (false, false);
    let mut i = 0;
    while i < payloads.len() {
        let p = payloads[i];
        let head = format!("slot{slot}-{stream}-line");
        if let Some(rest) = p.strip_prefix(&head) {
            let n: usize = rest
                .split('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("slot {slot} {stream}: malformed line {:.200}", p));
            assert_eq!(
                p,
                expected(slot, stream, n),
                "slot {slot} {stream}: line {n} mixed or cut"
            );
            seen.push(n);
        } else if p.starts_with(&format!("slot{slot}-long-")) {
            assert_eq!(stream, "out");
            let whole = format!("slot{slot}-long-{}-end", "L".repeat(LONG));
            let pieces = whole.len().div_ceil(MAX_LINE);
            assert!(
                i + pieces <= payloads.len(),
                "slot {slot}: the long line's pieces are missing"
            );
            for (k, piece) in payloads[i..i + pieces].iter().enumerate() {
                let want = &whole[k * MAX_LINE..whole.len().min((k + 1) * MAX_LINE)];
                assert_eq!(*piece, want, "slot {slot}: piece {k} of the long line");
            }
            long = true;
            i += pieces;
            continue;
        } else if p == format!("slot{slot}-partial-no-newline") {
            partial = true;
        } else if p != format!("slot{slot}-{stream}-done") {
            panic!("slot {slot} {stream}: unexpected line {:.300}", p);
        }
        i += 1;
    }
    (seen, long, partial)
}

#[test]
fn prefix_writes_each_worker_line_whole_with_its_slot_and_pid() {
    let Some(python) = require("python3") else {
        return;
    };
    let mut m = Cluster::new()
        .workers(2)
        .args(["--prefix", "--balance", "shared", "--listen", "127.0.0.1:0"])
        .args(["--ready-when", "started"])
        .command([
            python.into_os_string(),
            "-c".into(),
            WRITER.into(),
            OUT_LINES.to_string().into(),
            ERR_LINES.to_string().into(),
            LONG.to_string().into(),
        ])
        .spawn_with_stdout(Stdio::piped());
    let (stdout, reader) = collect(m.take_stdout().expect("piped stdout"));
    let ready = m.wait_cluster_ready(2);
    for s in 0..2 {
        let done = format!("] slot{s}-err-done");
        let out_done = format!("] slot{s}-out-done");
        m.wait_for(&done, DEADLINE, |l| l.raw.ends_with(&done));
        assert!(
            poll_until(DEADLINE, || stdout
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.ends_with(&out_done))),
            "no `{out_done}` on the master's stdout\n{}",
            log_only(&m)
        );
    }
    m.signal(Signal::SIGTERM);
    assert!(m.expect_exit(DEADLINE).success(), "{}", log_only(&m));
    reader.join().unwrap();

    let dropped = !m.events("output_dropped").is_empty();
    let out = stdout.lock().unwrap().clone();
    let err: Vec<String> = m
        .lines()
        .into_iter()
        .filter(|l| l.level.is_empty())
        .map(|l| l.raw)
        .collect();
    for (stream, lines, count) in [("out", &out, OUT_LINES), ("err", &err, ERR_LINES)] {
        let mut by_slot: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
        for l in lines.iter() {
            let (slot, pid, rest) = prefixed(l)
                .unwrap_or_else(|| panic!("std{stream}: a line without `[SLOT PID] `: {:.200}", l));
            assert_eq!(
                ready.get(&slot),
                Some(&pid),
                "std{stream}: {:.100} has another slot's pid",
                l
            );
            by_slot.entry(slot).or_default().push(rest);
        }
        assert_eq!(by_slot.len(), 2, "std{stream}: lines of both slots");
        for (slot, payloads) in &by_slot {
            let (seen, long, partial) = check_payloads(*slot, stream, payloads);
            println!(
                "slot {slot} std{stream}: {} of {count} lines, long line {long}, partial line {partial}",
                seen.len()
            );
            let mut sorted = seen.clone();
            sorted.dedup();
            assert_eq!(
                sorted, seen,
                "slot {slot} std{stream}: lines out of order or repeated"
            );
            if !dropped {
                assert_eq!(
                    seen,
                    (0..count).collect::<Vec<_>>(),
                    "slot {slot} std{stream}: lines lost without output_dropped"
                );
                assert_eq!(
                    long,
                    stream == "out",
                    "slot {slot} std{stream}: the long line"
                );
                assert_eq!(
                    partial,
                    stream == "out",
                    "slot {slot} std{stream}: the last line without a newline"
                );
            }
        }
    }
    assert!(
        !dropped,
        "the test reads the master's stdout as it comes: nothing should be dropped\n{}",
        log_only(&m)
    );
}

#[test]
fn prefix_works_in_rr_with_the_channel_at_fd_3_too() {
    // The worker's fd 3 is its channel; stdout and stderr are the master's pipes.
    let script = "echo \"out $WORKER_ID $(readlink /proc/$$/fd/3 | cut -c1-7)\"; \
                  printf 'err %s' \"$WORKER_ID\" >&2; exec sleep 1000";
    let mut m = Cluster::new()
        .workers(2)
        .args([
            "--prefix",
            "--balance",
            "rr",
            "--listen",
            "127.0.0.1:0",
            "--ready-when",
            "started",
        ])
        .command(["sh", "-c", script])
        .spawn_with_stdout(Stdio::piped());
    let (stdout, reader) = collect(m.take_stdout().expect("piped stdout"));
    let ready = m.wait_cluster_ready(2);
    assert!(
        poll_until(DEADLINE, || stdout.lock().unwrap().len() >= 2),
        "no output from the workers\n{}",
        m.stderr_text()
    );
    m.signal(Signal::SIGTERM);
    assert!(m.expect_exit(DEADLINE).success(), "{}", m.stderr_text());
    reader.join().unwrap();
    let mut out = stdout.lock().unwrap().clone();
    out.sort();
    let want: Vec<String> = ready
        .iter()
        .map(|(s, p)| format!("[{s} {p}] out {s} socket:"))
        .collect();
    assert_eq!(out, want);
    // The stderr lines had no newline: written, prefixed, when the workers ended.
    for (s, p) in &ready {
        let line = format!("[{s} {p}] err {s}");
        m.wait_for(&line, DEADLINE, |l| l.raw == line);
    }
}

#[test]
fn without_prefix_workers_write_to_the_masters_stdout_themselves() {
    let mut m = Cluster::new()
        .workers(2)
        .args([
            "--balance",
            "shared",
            "--listen",
            "127.0.0.1:0",
            "--ready-when",
            "started",
        ])
        .command([
            "sh",
            "-c",
            "echo \"plain line from $WORKER_ID\"; exec sleep 1000",
        ])
        .spawn_with_stdout(Stdio::piped());
    let (stdout, reader) = collect(m.take_stdout().expect("piped stdout"));
    let ready = m.wait_cluster_ready(2);
    assert!(
        poll_until(DEADLINE, || stdout.lock().unwrap().len() >= 2),
        "no output from the workers"
    );
    let fd1 = |pid: u32| std::fs::read_link(format!("/proc/{pid}/fd/1")).unwrap();
    for (&slot, &pid) in &ready {
        assert_eq!(fd1(pid), fd1(m.pid), "slot {slot}'s stdout is the master's");
    }
    m.signal(Signal::SIGTERM);
    assert!(m.expect_exit(DEADLINE).success(), "{}", m.stderr_text());
    reader.join().unwrap();
    let mut out = stdout.lock().unwrap().clone();
    out.sort();
    assert_eq!(out, ["plain line from 0", "plain line from 1"]);
}

#[test]
fn a_worker_flooding_an_unread_stdout_neither_stalls_the_master_nor_grows_it() {
    // Slot 0 floods lines, slot 1 one endless line; the master's stdout is a pipe that
    // stays open and is never read.
    let flood = "if [ \"$WORKER_ID\" = 0 ]; then exec yes \"flood from 0 $(printf '%0200d' 0)\"; \
                 else yes x | tr -d '\\n'; fi";
    let mut m = Cluster::new()
        .workers(2)
        .args(["--prefix", "--balance", "shared", "--listen", "127.0.0.1:0"])
        .args(["--ready-when", "started", "--timeout", "2s"])
        .command(["sh", "-c", flood])
        .spawn_with_stdout(Stdio::piped());
    let _unread = m.take_stdout().expect("piped stdout");
    m.wait_cluster_ready(2);
    let mut peak_kib = 0;
    let mut sample = |m: &Master| {
        peak_kib = peak_kib.max(rss_kib(m.pid).unwrap_or(0));
    };
    // Flooded for a while: at least three reports, at most one a second.
    let first = m.wait_event("output_dropped", DEADLINE);
    assert!(first.num("stdout") > 0, "{}", first.raw);
    assert!(
        poll_until(DEADLINE, || {
            sample(&m);
            m.events("output_dropped").len() >= 3
        }),
        "output_dropped is not reported again while the flood goes on\n{}",
        m.stderr_text()
    );
    let reports = m.events("output_dropped");
    for pair in reports.windows(2) {
        let gap = pair[1]
            .time
            .zip(pair[0].time)
            .map(|(b, a)| b.saturating_sub(a));
        assert!(
            gap.is_none_or(|g| g >= Duration::from_millis(900)),
            "output_dropped more than once a second: {gap:?}"
        );
    }
    let started = Instant::now();
    let mark = m.mark();
    m.signal(Signal::SIGUSR2);
    assert!(
        poll_until(DEADLINE, || {
            sample(&m);
            !m.events("reload_finished generation=2").is_empty()
        }),
        "no reload under the flood\n{}",
        m.stderr_text()
    );
    let reload = started.elapsed();
    let dropped_after = m.wait_event_after(mark, "output_dropped", DEADLINE);
    let started = Instant::now();
    m.signal(Signal::SIGTERM);
    let exit = m.expect_exit(DEADLINE);
    let terminate = started.elapsed();
    println!(
        "flood: reload {reload:?}, terminate {terminate:?}, master VmRSS peak {peak_kib} KiB, \
         last report {}",
        dropped_after.raw
    );
    assert!(exit.success(), "{exit:?}\n{}", m.stderr_text());
    assert!(reload < Duration::from_secs(10), "reload took {reload:?}");
    // --timeout 2s for the workers, then at most a second for the stuck stdout.
    assert!(
        terminate < Duration::from_secs(10),
        "terminate took {terminate:?}"
    );
    assert!(
        peak_kib < 32 * 1024,
        "master VmRSS {peak_kib} KiB under the flood"
    );
}

#[test]
fn log_format_json_writes_one_object_per_line() {
    let m = Cluster::new()
        .workers(2)
        .args([
            "--log-format",
            "json",
            "--balance",
            "shared",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--ready-when", "started"])
        .command(["sh", "-c", "exec sleep 1000"])
        .spawn();
    let event = |l: &LogLine| -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&l.raw).ok()?;
        Some(v["fields"]["event"].as_str()?.to_string())
    };
    m.wait_for("cluster_ready (JSON)", DEADLINE, |l| {
        event(l).as_deref() == Some("cluster_ready")
    });
    m.signal(Signal::SIGTERM);
    assert!(m.expect_exit(DEADLINE).success(), "{}", m.stderr_text());
    m.wait_for("terminated (JSON)", DEADLINE, |l| {
        event(l).as_deref() == Some("terminated")
    });
    let mut ready = BTreeMap::new();
    for l in m.lines() {
        let v: serde_json::Value =
            serde_json::from_str(&l.raw).unwrap_or_else(|e| panic!("not JSON ({e}): {}", l.raw));
        assert!(v["timestamp"].is_string(), "{}", l.raw);
        assert!(v["level"].is_string(), "{}", l.raw);
        assert!(v["fields"]["message"].is_string(), "{}", l.raw);
        assert!(
            v["fields"]["event"].is_string(),
            "every line has its event: {}",
            l.raw
        );
        if v["fields"]["event"] == "worker_ready" {
            let slot = v["fields"]["slot"].as_u64().expect("slot");
            let pid = v["fields"]["pid"].as_u64().expect("pid");
            ready.insert(slot, pid);
        }
    }
    assert_eq!(
        ready.len(),
        2,
        "worker_ready of both slots\n{}",
        m.stderr_text()
    );
}

#[test]
fn with_prefix_and_log_format_json_worker_lines_are_json_objects_too() {
    // A colour escape on stdout, a byte that is not UTF-8 on stderr, a last line
    // without a newline.
    let script = r#"printf 'out one \033[31mred\n'; printf 'err \377 two\n' >&2; printf tail; exec sleep 1000"#;
    let mut m = Cluster::new()
        .workers(1)
        .args(["--prefix", "--log-format", "json"])
        .args(["--balance", "shared", "--listen", "127.0.0.1:0"])
        .args(["--ready-when", "started"])
        .command(["sh", "-c", script])
        .spawn_with_stdout(Stdio::piped());
    let (stdout, reader) = collect(m.take_stdout().expect("piped stdout"));
    let json = |raw: &str| -> serde_json::Value {
        serde_json::from_str(raw).unwrap_or_else(|e| panic!("not JSON ({e}): {raw}"))
    };
    let fields = |l: &LogLine| json(&l.raw)["fields"].clone();
    let ready = m.wait_for("worker_ready (JSON)", DEADLINE, |l| {
        fields(l)["event"] == "worker_ready"
    });
    let pid = fields(&ready)["pid"].as_u64().expect("pid");
    m.wait_for("the worker's stderr line", DEADLINE, |l| {
        fields(l)["event"] == "worker_output"
    });
    assert!(
        poll_until(DEADLINE, || !stdout.lock().unwrap().is_empty()),
        "nothing on the master's stdout"
    );
    // `tail` is written once sh has exec'd sleep: stopped earlier, it never was.
    let comm = format!("/proc/{pid}/comm");
    assert!(
        poll_until(DEADLINE, || std::fs::read_to_string(&comm)
            .is_ok_and(|c| c.trim() == "sleep")),
        "the worker never reached its sleep"
    );
    m.signal(Signal::SIGTERM);
    assert!(m.expect_exit(DEADLINE).success(), "{}", m.stderr_text());
    reader.join().unwrap();

    let out: Vec<serde_json::Value> = stdout.lock().unwrap().iter().map(|l| json(l)).collect();
    let err: Vec<serde_json::Value> = m
        .lines()
        .iter()
        .map(|l| json(&l.raw))
        .filter(|v| v["fields"]["event"] == "worker_output")
        .collect();
    for (stream, lines) in [("stdout", &out), ("stderr", &err)] {
        for v in lines.iter() {
            let f = &v["fields"];
            assert_eq!(
                (&f["event"], &f["slot"], &f["pid"], &f["stream"]),
                (
                    &"worker_output".into(),
                    &0.into(),
                    &pid.into(),
                    &stream.into()
                ),
                "{v}"
            );
            assert!(v["timestamp"].is_string() && v["level"].is_string(), "{v}");
        }
    }
    let messages = |lines: &[serde_json::Value]| -> Vec<String> {
        lines
            .iter()
            .map(|v| v["fields"]["message"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(messages(&out), ["out one \u{1b}[31mred", "tail"]);
    assert_eq!(messages(&err), ["err \u{fffd} two"]);
    // The escape reaches the terminal escaped, as JSON text.
    let raw = stdout.lock().unwrap()[0].clone();
    assert!(raw.contains(r"\u001b[31mred"), "{raw}");
}

#[test]
fn empty_lines_flooding_a_stuck_json_output_leave_the_master_responsive() {
    // Each empty line is a whole JSON object to make: with the master's stdout stuck,
    // dropping them must stay cheap, and the event loop must keep its turns.
    let control =
        std::env::temp_dir().join(format!("recluster-json-flood-{}.sock", std::process::id()));
    let mut m = Cluster::new()
        .workers(1)
        .args(["--prefix", "--log-format", "json"])
        .args(["--balance", "shared", "--listen", "127.0.0.1:0"])
        .args(["--ready-when", "started", "--timeout", "2s"])
        .arg("--control")
        .arg(&control)
        .command(["sh", "-c", "exec yes ''"])
        .spawn_with_stdout(Stdio::piped());
    let _unread = m.take_stdout().expect("piped stdout");
    let event = |l: &LogLine| -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&l.raw).ok()?;
        Some(v["fields"]["event"].as_str()?.to_string())
    };
    m.wait_for("output_dropped (JSON)", DEADLINE, |l| {
        event(l).as_deref() == Some("output_dropped")
    });
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let asked = Instant::now();
        let status = operator_ok(
            None,
            &["--control".as_ref(), control.as_os_str(), "status".as_ref()],
        );
        slowest = slowest.max(asked.elapsed());
        assert!(status.contains("1 slots"), "{status}");
    }
    let started = Instant::now();
    m.signal(Signal::SIGTERM);
    let exit = m.expect_exit(DEADLINE);
    let terminate = started.elapsed();
    println!("json flood of empty lines: slowest status {slowest:?}, terminate {terminate:?}");
    assert!(exit.success(), "{exit:?}");
    // Answered in milliseconds when the loop is free; seconds meant it was not.
    assert!(slowest < Duration::from_secs(2), "status took {slowest:?}");
    assert!(
        terminate < Duration::from_secs(5),
        "terminate took {terminate:?}"
    );
}
