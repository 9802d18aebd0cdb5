//! Observing from /proc whether an unmodified worker listens on an inherited socket.
//!
//! In `shared` mode the worker is any server that supports socket activation; it
//! sends no message when it starts accepting, yet `--ready-when listening` (the
//! default) must know when it does. A server that is ready to take connections has
//! either registered the listening socket with an event loop or is blocked in
//! `accept`, and Linux shows both without the worker's help:
//!
//! * every epoll descriptor lists the descriptors it watches in
//!   `/proc/<pid>/fdinfo/<epoll fd>` as `tfd: <fd> …` lines — this covers tokio/mio,
//!   Node/libuv, Go's netpoller, nginx and Python's selectors;
//! * a thread blocked in a system call shows its number and arguments in
//!   `/proc/<pid>/task/<tid>/syscall`, so `accept`/`accept4` on a listening fd is
//!   visible (threaded or prefork servers, `socket.accept()` loops).
//!
//! A watched or accepted descriptor counts when it is one of the inherited listening
//! sockets, compared by socket *inode* rather than fd number: many runtimes (Go's
//! `net.FileListener`, Python's `socket.fromfd`) duplicate fd 3 to another number
//! before using it. The worker's descendants are examined too (bounded), so shell
//! wrappers that do not `exec` and prefork servers whose children do the accepting
//! (gunicorn, nginx, Apache) are recognised.
//!
//! This is a heuristic, polled every ~25 ms while a worker starts: `poll`/`select`
//! loops and io_uring are not seen, and `--ready-timeout` bounds the wait; a worker's
//! explicit `READY=1` is the exact signal. Reading another process's `syscall` file
//! needs ptrace access, which a parent has over its children under Yama's default
//! policy. Every read error (process gone, not exec'd yet) counts as "not listening".

use std::collections::HashSet;
use std::fs;

/// Most processes (the worker and its descendants) examined per call.
const MAX_PROCESSES: usize = 64;

/// `accept` and `accept4` system call numbers of this architecture.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
const ACCEPT_SYSCALLS: [libc::c_long; 2] = [libc::SYS_accept, libc::SYS_accept4];

/// No known `accept` numbers here: only the epoll check applies.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ACCEPT_SYSCALLS: [libc::c_long; 0] = [];

/// True when `pid` (or any of its threads) watches or accepts on one of fds `3..3+count`.
///
/// Descendants of `pid` are examined as well, and a descriptor counts when it refers to
/// the same socket as one of fds `3..3+count` of `pid`, whatever its number.
pub(crate) fn is_listening(pid: u32, count: usize) -> bool {
    let targets: HashSet<String> = (3..3 + count)
        .filter_map(|fd| fd_target(pid, fd as i64))
        .filter(|t| t.starts_with("socket:["))
        .collect();
    if targets.is_empty() {
        return false;
    }
    let mut queue = vec![pid];
    let mut seen = 0;
    while let Some(p) = queue.pop() {
        if process_listens(p, &targets) {
            return true;
        }
        seen += 1;
        if seen >= MAX_PROCESSES {
            return false;
        }
        queue.extend(children(p));
    }
    false
}

/// Whether process `pid` watches (epoll) or accepts on a socket of `targets`.
fn process_listens(pid: u32, targets: &HashSet<String>) -> bool {
    let hits = |fd: i64| fd_target(pid, fd).is_some_and(|t| targets.contains(&t));
    blocked_in_accept(pid, &hits) || epoll_watches(pid, &hits)
}

/// Whether a thread of `pid` is blocked in `accept`/`accept4` on an fd where `hits`.
fn blocked_in_accept(pid: u32, hits: &dyn Fn(i64) -> bool) -> bool {
    if ACCEPT_SYSCALLS.is_empty() {
        return false;
    }
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|task| {
        let Ok(line) = fs::read_to_string(task.path().join("syscall")) else {
            return false;
        };
        // "<nr> <arg0 hex> <arg1 hex> …", or "running", or "-1 <sp> <pc>".
        let mut fields = line.split_ascii_whitespace();
        let nr = fields.next().and_then(|n| n.parse::<libc::c_long>().ok());
        let fd = fields
            .next()
            .and_then(|a| i64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
        matches!((nr, fd), (Some(nr), Some(fd)) if ACCEPT_SYSCALLS.contains(&nr) && hits(fd))
    })
}

/// Whether one of `pid`'s epoll descriptors watches an fd where `hits`.
fn epoll_watches(pid: u32, hits: &dyn Fn(i64) -> bool) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(Result::ok).any(|entry| {
        let is_epoll =
            fs::read_link(entry.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:[eventpoll]");
        if !is_epoll {
            return false;
        }
        let info = format!("/proc/{pid}/fdinfo/{}", entry.file_name().to_string_lossy());
        let Ok(info) = fs::read_to_string(info) else {
            return false;
        };
        // "tfd:        3 events:       19 data: … pos:0 ino:… sdev:…"
        info.lines()
            .filter_map(|l| l.strip_prefix("tfd:"))
            .filter_map(|rest| rest.split_ascii_whitespace().next()?.parse::<i64>().ok())
            .any(hits)
    })
}

/// What `/proc/<pid>/fd/<fd>` points to (e.g. `socket:[1234]`), if readable.
fn fd_target(pid: u32, fd: i64) -> Option<String> {
    let target = fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    target.into_os_string().into_string().ok()
}

/// Direct children of every thread of `pid` (needs CONFIG_PROC_CHILDREN; else none).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_ascii_whitespace()
                .filter_map(|c| c.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::launch::{spawn, SpawnSpec};
    use std::ffi::CString;
    use std::net::TcpListener;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    /// Deadline for a worker to be seen listening.
    const DEADLINE: Duration = Duration::from_secs(20);

    /// Whether python3 is available (the probe tests need a real server). Under
    /// `CI=true` a missing python3 fails the test instead: CI may not pass by skipping.
    fn have_python() -> bool {
        let found = std::process::Command::new("python3")
            .arg("-c")
            .arg("pass")
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found || std::env::var("CI").as_deref() != Ok("true"),
            "python3 is missing and CI=true: .ci/run must install it"
        );
        found
    }

    /// A started test worker, killed and reaped on drop.
    struct Worker(u32);

    impl Drop for Worker {
        /// Kills the worker's process group (it leads one) and reaps the worker.
        fn drop(&mut self) {
            // SAFETY: plain kill/waitpid on our own child and its process group.
            unsafe {
                libc::kill(-(self.0 as libc::pid_t), libc::SIGKILL);
                libc::waitpid(self.0 as libc::pid_t, std::ptr::null_mut(), 0);
            }
        }
    }

    /// Starts `python3 -c code` (via sh, to find python3 in PATH) with `fds` at 3….
    fn python(code: &str, fds: &[i32]) -> Worker {
        let program = CString::new("/bin/sh").unwrap();
        let args = [
            CString::new("sh").unwrap(),
            CString::new("-c").unwrap(),
            CString::new("exec python3 -c \"$0\"").unwrap(),
            CString::new(code).unwrap(),
        ];
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into());
        let env = [CString::new(format!("PATH={path}")).unwrap()];
        let pid = spawn(&SpawnSpec {
            program: &program,
            args: &args,
            env: &env,
            fds,
            listen_pid: false,
            contain: Default::default(),
            run_as: None,
            output: None,
        })
        .unwrap();
        Worker(pid)
    }

    /// Polls `is_listening` until true or the deadline passes.
    fn becomes_listening(pid: u32, count: usize) -> bool {
        let start = Instant::now();
        while start.elapsed() < DEADLINE {
            if is_listening(pid, count) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Waits (with the deadline) until the worker writes a byte on `pipe`.
    fn wait_signal(pipe: &OwnedFd) {
        let mut pfd = libc::pollfd {
            fd: pipe.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, DEADLINE.as_millis() as i32) };
        assert_eq!(n, 1, "worker did not signal in time");
    }

    /// A CLOEXEC pipe for test signalling.
    fn pipe() -> (OwnedFd, OwnedFd) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        (r, w)
    }

    #[test]
    fn blocking_accept() {
        if !have_python() {
            return;
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let w = python(
            "import socket\ns = socket.socket(fileno=3)\ns.accept()",
            &[l.as_raw_fd()],
        );
        assert!(becomes_listening(w.0, 1));
    }

    #[test]
    fn epoll_selector_on_second_fd() {
        if !have_python() {
            return;
        }
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let w = python(
            "import selectors, socket\ns = socket.socket(fileno=4)\n\
             sel = selectors.EpollSelector()\nsel.register(s, selectors.EVENT_READ)\nsel.select()",
            &[l1.as_raw_fd(), l2.as_raw_fd()],
        );
        assert!(becomes_listening(w.0, 2));
        assert!(!is_listening(w.0, 1), "fd 4 is not among the first one");
    }

    #[test]
    fn duplicated_fd_in_a_child_process() {
        if !have_python() {
            return;
        }
        // Like Go (dup of fd 3) in a prefork child: the worker itself only waits.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let w = python(
            "import os, selectors, socket\n\
             if os.fork() == 0:\n\
             \x20   s = socket.fromfd(3, socket.AF_INET, socket.SOCK_STREAM)\n\
             \x20   sel = selectors.EpollSelector()\n\
             \x20   sel.register(s, selectors.EVENT_READ)\n\
             \x20   sel.select()\n\
             else:\n\
             \x20   os.wait()",
            &[l.as_raw_fd()],
        );
        assert!(becomes_listening(w.0, 1));
    }

    #[test]
    fn sleeping_is_not_listening() {
        if !have_python() {
            return;
        }
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let (r, wr) = pipe();
        // Also watches a non-listening fd with epoll and blocks in a read.
        let w = python(
            "import os, select\nep = select.epoll()\nep.register(4, select.EPOLLIN)\n\
             os.write(4, b'x')\nimport time\ntime.sleep(60)",
            &[l.as_raw_fd(), wr.as_raw_fd()],
        );
        drop(wr);
        wait_signal(&r);
        for _ in 0..5 {
            assert!(!is_listening(w.0, 1));
        }
    }

    #[test]
    fn missing_process_is_not_listening() {
        assert!(!is_listening(u32::MAX, 1));
        assert!(!is_listening(std::process::id(), 0));
    }
}
