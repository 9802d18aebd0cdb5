//! The master outlives its stderr (issue 8, item 2): a pipe whose reader went away
//! (`recluster … 2>&1 | head -3`) and a terminal that was closed (SIGHUP, then EIO on
//! every write) must not end the master or its workers.
//!
//! These tests start the binary themselves, not through [`Cluster::spawn`], because
//! they must own the other end of its stdout and stderr. They follow the cluster
//! through its control socket (`--control PATH`), never through its log.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use nix::fcntl::OFlag;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const WORKERS: usize = 2;

/// A control socket path unique to this call.
fn control_path(what: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("{}.sock", unique_tag(what)));
    let _ = std::fs::remove_file(&path);
    path
}

/// `recluster --workers 2 --listen 127.0.0.1:<port> --control <path> -- echo`, with an
/// environment of its own (the variables that would change the master's behaviour are
/// not passed on) tagged with `tag` so that every worker it starts can be found.
fn command(port: u16, control: &Path, tag: &str) -> Command {
    let mut cmd = Command::new(recluster_bin());
    cmd.arg("--workers")
        .arg(WORKERS.to_string())
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--control")
        .arg(control)
        .arg("--")
        .arg(echo())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("TERMINAL_TEST_TAG", tag);
    cmd
}

/// The master under test. Dropping it kills the master and every worker it started.
struct Running {
    child: Child,
    tag: String,
}

impl Running {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the master ended, if it has.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("waitpid on the master")
    }

    /// Panics, saying how the master ended, unless it is still running.
    fn assert_alive(&mut self, when: &str) {
        if let Some(status) = self.exited() {
            panic!(
                "the master died {when}: {status} (code {:?}, signal {:?})",
                status.code(),
                status.signal()
            );
        }
    }

    /// Waits until the control socket shows generation `generation` with all its
    /// workers ready and no other generation ready; panics if the master dies or the
    /// deadline passes.
    fn wait_generation_ready(&mut self, control: &Path, generation: u32) {
        let mut last = None;
        let ready = poll_until(DEADLINE, || {
            if self.exited().is_some() {
                return true;
            }
            last = status(control);
            last.as_deref()
                .is_some_and(|s| generation_ready(s, generation))
        });
        self.assert_alive(&format!("waiting for generation {generation}"));
        assert!(
            ready,
            "generation {generation} not ready within {DEADLINE:?}; last status: {last:?}"
        );
    }

    /// SIGTERM, then the exit status (within the deadline).
    fn terminate(&mut self) -> std::process::ExitStatus {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).expect("SIGTERM to the master");
        let mut exit = None;
        let ended = poll_until(DEADLINE, || {
            exit = self.exited();
            exit.is_some()
        });
        assert!(
            ended,
            "the master is still running {DEADLINE:?} after SIGTERM"
        );
        exit.unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGKILL);
        }
        for pid in pids_with_env("TERMINAL_TEST_TAG", &self.tag) {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// The `status` reply of the control socket, without its final `end`; `None` when
/// the master does not answer.
fn status(control: &Path) -> Option<Vec<String>> {
    let mut s = UnixStream::connect(control).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"status\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let mut lines: Vec<String> = out.lines().map(String::from).collect();
    (lines.pop().as_deref() == Some("end")).then_some(lines)
}

/// Whether a status reply shows `generation` with all its workers ready, and no
/// worker of another generation ready.
fn generation_ready(status: &[String], generation: u32) -> bool {
    let ready_of = |g: u32| {
        status
            .iter()
            .filter(|l| l.ends_with(&format!(" generation={g} state=ready")))
            .count()
    };
    let ready_total = status
        .iter()
        .filter(|l| l.ends_with(" state=ready"))
        .count();
    status.first().map(String::as_str)
        == Some(format!("generation={generation} workers={WORKERS}").as_str())
        && ready_of(generation) == WORKERS
        && ready_total == WORKERS
}

/// Several connections, each answered by a worker of `generation`.
fn assert_served_by(port: u16, generation: u32) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for i in 0..6 {
        // The echo worker answers, then echoes until EOF: half-close.
        let reply = request_from(addr, None, true, Duration::from_secs(10))
            .unwrap_or_else(|f| panic!("connection {i} to {addr}: {f:?}"));
        assert_eq!(
            reply.gen, generation,
            "connection {i} answered by another generation: {}",
            reply.raw
        );
    }
}

/// The master is alive `when`, serves with `generation`, and SIGTERM ends it with 0.
fn serves_then_ends_cleanly(mut master: Running, port: u16, generation: u32, when: &str) {
    master.assert_alive(when);
    assert_served_by(port, generation);
    master.assert_alive("after serving");
    let exit = master.terminate();
    assert_eq!(
        exit.code(),
        Some(0),
        "SIGTERM ends the master cleanly: {exit}"
    );
}

#[test]
fn a_closed_stderr_pipe_does_not_end_the_master() {
    let port = free_port();
    let control = control_path("terminal-pipe");
    let tag = unique_tag("terminal-pipe");
    // stdout and stderr into one pipe, as `2>&1 | head -3` does. Both ends are
    // close-on-exec: only the master's fds 1 and 2 hold the write end.
    let (read_end, write_end) = nix::unistd::pipe2(OFlag::O_CLOEXEC).expect("pipe2");
    let child = {
        let mut cmd = command(port, &control, &tag);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(write_end.try_clone().expect("dup")))
            .stderr(Stdio::from(write_end));
        cmd.spawn().expect("start recluster")
        // The command, and with it the test's copies of the write end, is dropped here.
    };
    let mut master = Running { child, tag };

    // `head -3`: read three lines, then close the read end.
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let head = std::thread::spawn(move || {
        let mut reader = BufReader::new(File::from(read_end));
        let mut lines = Vec::new();
        for _ in 0..3 {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(n) if n > 0 => lines.push(line),
                _ => break,
            }
        }
        let _ = lines_tx.send(lines);
        // `reader` is dropped here: nobody reads the pipe any more.
    });
    let lines = lines_rx
        .recv_timeout(DEADLINE)
        .expect("three lines on the master's stderr");
    head.join().expect("the reader thread");
    assert_eq!(lines.len(), 3, "the master's output ended early: {lines:?}");

    // The master now logs into a pipe without a reader: every write fails (EPIPE).
    master.wait_generation_ready(&control, 1);
    for generation in 2..=4 {
        kill(Pid::from_raw(master.pid() as i32), Signal::SIGUSR2).expect("SIGUSR2");
        master.wait_generation_ready(&control, generation);
    }
    serves_then_ends_cleanly(master, port, 4, "after the reloads");
}

#[test]
fn a_closed_terminal_reloads_and_the_master_keeps_serving() {
    use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
    let port = free_port();
    let control = control_path("terminal-pty");
    let tag = unique_tag("terminal-pty");

    // A pty pair, both ends close-on-exec in this process.
    let pty =
        posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).expect("posix_openpt");
    grantpt(&pty).expect("grantpt");
    unlockpt(&pty).expect("unlockpt");
    let slave_name = ptsname_r(&pty).expect("ptsname_r");
    let slave: OwnedFd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave_name)
        .unwrap_or_else(|e| panic!("open {slave_name}: {e}"))
        .into();
    // SAFETY: fcntl on a descriptor this function owns.
    let flags = unsafe { libc::fcntl(pty.as_raw_fd(), libc::F_GETFL) };
    assert!(flags >= 0, "F_GETFL: {}", std::io::Error::last_os_error());
    // SAFETY: as above.
    let rc = unsafe { libc::fcntl(pty.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    assert_eq!(rc, 0, "F_SETFL: {}", std::io::Error::last_os_error());

    // The master is a session leader with the slave as its controlling terminal and
    // as its stdin, stdout and stderr, as in a terminal window.
    let child = {
        let mut cmd = command(port, &control, &tag);
        cmd.stdin(Stdio::from(slave.try_clone().expect("dup")))
            .stdout(Stdio::from(slave.try_clone().expect("dup")))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().expect("start recluster on the pty")
    };
    let mut master = Running { child, tag };

    // Read the terminal (so that the master never blocks on a full one) until the
    // cluster is ready.
    let mut seen = Vec::new();
    let mut last = None;
    let ready = poll_until(DEADLINE, || {
        let mut buf = [0u8; 4096];
        loop {
            match (&pty).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break, // WouldBlock: all read; EIO: the slave side is closed
            }
        }
        if master.exited().is_some() {
            return true;
        }
        last = status(&control);
        last.as_deref().is_some_and(|s| generation_ready(s, 1))
    });
    master.assert_alive(&format!(
        "starting on the terminal; it wrote:\n{}",
        String::from_utf8_lossy(&seen)
    ));
    assert!(
        ready,
        "generation 1 not ready within {DEADLINE:?}; last status: {last:?}"
    );
    assert!(
        !seen.is_empty(),
        "the master logged nothing on its terminal"
    );

    // Close the terminal: the kernel hangs up the slave, sends SIGHUP (a reload) to
    // the session leader, and every later write to the slave fails with EIO.
    drop(pty);
    master.wait_generation_ready(&control, 2);
    serves_then_ends_cleanly(master, port, 2, "after the terminal was closed");
}
