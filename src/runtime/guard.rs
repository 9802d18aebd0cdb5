//! The guard: a small process that outlives a killed master and kills its workers.
//!
//! `PR_SET_PDEATHSIG` (set in every worker, `launch.rs`) reaches only the worker
//! process itself. A worker that does not exec its server (`sh -c './server & wait'`),
//! or a server that forks helpers, leaves grandchildren that live on after `kill -9` of
//! the master, keep the listening socket open and answer on it, so that the next
//! master fails with "Address already in use". While the master lives it kills a
//! worker's process group when the worker exits; once the master is dead nobody would.
//!
//! So the master forks a guard when a cluster starts. The guard holds one end of a
//! `SOCK_SEQPACKET` socket pair, the master the other, and the master (and each worker
//! child, see below) sends it fixed-size records: `add <pgid>` and `remove <pgid>`.
//! When its end reads EOF without a `bye` first, the master is gone (killed, crashed,
//! or the cluster's future was dropped): the guard then writes `cgroup.kill` of the
//! cluster's base cgroup when there is one (`cgroup.rs`: reaches `setsid` daemons
//! too), SIGKILLs every process group it recorded, removes the cgroups once empty, and
//! exits. A master that ends cleanly sends `bye` and the guard exits at once.
//!
//! Choices, and why:
//! * **A fork, not an exec.** The library runs in any host program, so there is no
//!   binary to re-exec into a hidden mode. The guard is forked like a worker: between
//!   fork and `_exit` it makes only async-signal-safe system calls on data prepared
//!   before the fork (the master is multi-threaded), and it never returns.
//! * **Double fork, own session.** An intermediate child calls `setsid` and forks the
//!   guard, then exits (the master reaps it at once). The guard is therefore nobody's
//!   child but init's (or the nearest subreaper's): the master never has to reap it,
//!   it is not one of the master's children that tools count as workers, and when the
//!   master dies it is re-parented and reaped as it exits. In a session and process
//!   group of its own, it gets no SIGINT from Ctrl-C and no SIGHUP when the terminal
//!   closes; it also blocks every signal, so only SIGKILL stops it.
//! * **Nothing of the master kept.** It closes every descriptor but its socket (the
//!   listening sockets above all: a guard holding them would keep the port busy),
//!   moves to `/`, names itself `recluster-guard`, and blanks its copy of the master's
//!   command line and environment, so that nothing that finds a cluster's processes
//!   by command line or environment takes it for the master or a worker.
//! * **The worker records itself, before exec.** The child sends `add <own pid>` after
//!   `setpgid` and before `execve` (`launch.rs`), so the guard knows a worker's group
//!   before any program of the worker runs and can fork: there is no window in which a
//!   grandchild exists but its group is unknown. A master killed between fork and that
//!   record kills the child by `PR_SET_PDEATHSIG` (or the child sees its parent gone
//!   and exits) before exec. Records of at most `PIPE_BUF` bytes on a `SOCK_SEQPACKET`
//!   socket are sent whole, so the master's and the children's never mix, and
//!   `MSG_NOSIGNAL` means a dead guard raises no SIGPIPE.
//! * **No stale group is killed.** The master sends `remove <pgid>` only after it has
//!   reaped the worker and SIGKILLed its group (which it already did). The kernel does
//!   not hand out a number again while a process of that group lives, and every one of
//!   them has a SIGKILL pending by then, so the id leaves the guard's table before it
//!   can name anyone else. A child whose exec failed is removed the same way. (The
//!   window that remains is the master's own: between reaping a worker whose group was
//!   already empty and its `killpg`, as before.)
//! * **Bounded.** Records are 8 bytes; the table holds [`CAPACITY`] groups (a cluster
//!   has a few live workers at a time: active, pending and retiring); `add`s beyond it
//!   are dropped (the cgroup, where there is one, still covers them). The sends never
//!   block the master: a guard that cannot keep up (stopped) loses records, and the
//!   master warns once.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::ptr;

use tracing::{debug, info, warn};

use super::cgroup::{self, Leaf, Tree};
use super::launch::Contain;

/// Record: a worker's process group to kill should the master die.
pub(crate) const ADD: u32 = 1;
/// Record: a group that is empty now (its worker reaped, the group killed).
pub(crate) const REMOVE: u32 = 2;
/// Record: the master ends cleanly; the guard exits without killing anything.
const BYE: u32 = 3;
/// Record (guard → master): the guard is set up; carries its pid.
const HELLO: u32 = 4;

/// Size of a record: the operation and a pid, native endian.
const RECORD: usize = 8;

/// Most process groups the guard tracks at once.
pub(crate) const CAPACITY: usize = 4096;

/// The guard's name in `ps` (and `/proc/<pid>/comm`).
const NAME: &[u8] = b"recluster-guard\0";

/// How long the master waits for a new guard to say it is ready.
const HELLO_TIMEOUT_MS: libc::c_int = 5000;

/// How many times the guard tries to remove the killed cgroups, 10 ms apart.
const REMOVE_TRIES: u32 = 200;

/// A record's bytes.
fn record(op: u32, pid: i32) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    r[..4].copy_from_slice(&op.to_ne_bytes());
    r[4..].copy_from_slice(&pid.to_ne_bytes());
    r
}

/// Sends one record on the guard socket `fd` without blocking and without SIGPIPE;
/// whether it was sent whole. Async-signal-safe: the child calls it before exec.
pub(crate) fn send(fd: RawFd, op: u32, pid: i32) -> bool {
    let r = record(op, pid);
    // SAFETY: `r` is a valid buffer of RECORD bytes; send only reads it.
    let n = unsafe {
        libc::send(
            fd,
            r.as_ptr().cast(),
            RECORD,
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    n == RECORD as isize
}

/// What a master does to leave nothing behind: its guard process and, where it may
/// create them, one cgroup per worker.
pub(crate) struct Guard {
    /// The guard process, unless it could not be started.
    process: Option<Process>,
    /// The cluster's cgroups, where cgroup v2 is writable.
    tree: Option<Tree>,
    /// Whether a worker was seen in its leaf (checked on the first one).
    verified: bool,
    /// Whether a failed send to the guard was logged.
    warned: bool,
}

impl Guard {
    /// Sets up the cgroups where possible and starts the guard; says in the log what it
    /// could not do (and carries on: workers still have their process groups and
    /// `PR_SET_PDEATHSIG`).
    pub fn start(cgroups: bool) -> Guard {
        let created = if cgroups {
            Tree::create()
        } else {
            Err("turned off (--cgroups=false)".to_owned())
        };
        let tree = match created {
            Ok(tree) => Some(tree),
            Err(reason) => {
                info!(
                    event = "cgroups_unused",
                    reason = ?reason,
                    "workers are contained by their process groups, not by cgroups: {reason}"
                );
                None
            }
        };
        let process = match Process::start(tree.as_ref().map(Tree::base)) {
            Ok(p) => {
                info!(
                    event = "guard_started",
                    pid = p.pid,
                    cgroup = %tree.as_ref().map(|t| t.base().display().to_string()).unwrap_or_else(|| "none".into()),
                    "guard started: workers are killed if the master dies"
                );
                Some(p)
            }
            Err(e) => {
                warn!(event = "guard_failed", error = %e, "cannot start the guard: a worker's children may outlive a killed master");
                None
            }
        };
        Guard {
            process,
            tree,
            verified: false,
            warned: false,
        }
    }

    /// A new cgroup for the next worker, where cgroups are used.
    pub fn leaf(&mut self) -> Option<Leaf> {
        let tree = self.tree.as_mut()?;
        match tree.leaf() {
            Ok(leaf) => Some(leaf),
            Err(e) => {
                debug!(event = "cgroup_failed", error = %e, "cannot create a worker's cgroup");
                None
            }
        }
    }

    /// What the child of a spawn does to be contained: join `leaf`, record itself.
    pub fn contain<'a>(&self, leaf: Option<&'a Leaf>) -> Contain<'a> {
        Contain {
            guard: self.process.as_ref().map(|p| p.sock.as_raw_fd()),
            cgroup_procs: leaf.map(|l| l.procs.as_c_str()),
        }
    }

    /// A worker started in `leaf`: the first time, checks that it really joined it
    /// (`cgroup.procs` may refuse a move the directory permissions allowed); if not,
    /// cgroups are given up, with the reason in the log.
    pub fn spawned(&mut self, pid: u32, leaf: Option<&Leaf>) {
        let Some(leaf) = leaf else { return };
        if self.verified {
            return;
        }
        match leaf.holds(pid) {
            Some(true) => self.verified = true,
            Some(false) => {
                let reason = format!(
                    "a worker could not move itself into {} (cgroup.procs refused it)",
                    leaf.path().display()
                );
                info!(event = "cgroups_unused", reason = ?reason,
                    "workers are contained by their process groups, not by cgroups: {reason}");
                if let Some(tree) = self.tree.take() {
                    tokio::spawn(cgroup::remove(tree.base().to_path_buf()));
                }
            }
            None => {} // already gone: look at the next one
        }
    }

    /// A worker has been reaped and its process group killed (`pid`), or it never
    /// started (`None`): the guard forgets the group, and the worker's cgroup is
    /// killed (what left the group with `setsid` goes too) and removed once empty.
    pub fn released(&mut self, pid: Option<u32>, leaf: Option<Leaf>) {
        if let (Some(p), Some(pid)) = (&self.process, pid) {
            if !send(p.sock.as_raw_fd(), REMOVE, pid as i32) && !self.warned {
                self.warned = true;
                warn!(event = "guard_unreachable", error = %io::Error::last_os_error(),
                    "the guard missed a record (stopped or gone): should the master be killed, \
                     workers it does not know may outlive it");
            }
        }
        if let Some(leaf) = leaf {
            match leaf.kill() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => debug!(event = "cgroup_kill_failed", error = %e, "cgroup.kill failed"),
            }
            let path = leaf.path().to_path_buf();
            tokio::spawn(async move {
                if let Err(e) = cgroup::remove(path.clone()).await {
                    debug!(event = "cgroup_left", path = %path.display(), error = %e, "cannot remove a worker's cgroup");
                }
            });
        }
    }

    /// The cluster has ended: kills what is left in its cgroups and removes them, then
    /// says `bye` to the guard if no worker is left (`clean`); otherwise the guard
    /// sees its socket close and kills what it recorded.
    pub async fn finish(&mut self, clean: bool) {
        if let Some(tree) = self.tree.take() {
            let _ = cgroup::kill(tree.base());
            if let Err(e) = cgroup::remove(tree.base().to_path_buf()).await {
                debug!(event = "cgroup_left", path = %tree.base().display(), error = %e, "cannot remove the cluster's cgroup");
            }
        }
        if let Some(p) = self.process.take() {
            if clean {
                send(p.sock.as_raw_fd(), BYE, 0);
            }
        }
    }
}

/// The master's side of a running guard.
struct Process {
    /// The master's end of the socket pair (close-on-exec).
    sock: OwnedFd,
    /// The guard's pid.
    pid: u32,
}

/// Everything the intermediate child and the guard need, prepared before the fork.
struct Plan {
    /// The guard's end of the socket pair.
    sock: RawFd,
    /// The master's end, closed by the guard.
    master_end: RawFd,
    /// Room for [`CAPACITY`] process group ids.
    table: *mut libc::pid_t,
    /// `<base>/cgroup.kill`, if cgroups are used.
    cgroup_kill: Option<CString>,
    /// The base cgroup's directory, if cgroups are used.
    cgroup_base: Option<CString>,
    /// The master's command line and environment strings, to blank (address, length).
    scrub: [(usize, usize); 2],
    /// One past the highest signal number whose disposition is reset.
    nsig: libc::c_int,
    /// The descriptor limit, for the close loop where `close_range` is missing.
    fd_limit: RawFd,
}

impl Process {
    /// Forks the guard (through an intermediate child, see the module docs) and waits
    /// for its hello.
    fn start(cgroup_base: Option<&Path>) -> io::Result<Process> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
        if unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socketpair succeeded; both descriptors are ours alone.
        let (master_end, guard_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).ok();
        let mut table: Vec<libc::pid_t> = vec![0; CAPACITY];
        let plan = Plan {
            sock: guard_end.as_raw_fd(),
            master_end: master_end.as_raw_fd(),
            table: table.as_mut_ptr(),
            cgroup_kill: cgroup_base.and_then(|b| c(&b.join("cgroup.kill"))),
            cgroup_base: cgroup_base.and_then(c),
            scrub: scrub_ranges(),
            nsig: libc::SIGRTMAX() + 1,
            fd_limit: super::launch::fd_limit(),
        };

        // SAFETY: sigfillset fully initialises the zeroed set.
        let full = unsafe {
            let mut full: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut full);
            full
        };
        // SAFETY: zeroed is a valid sigset_t to receive the old mask.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // Every signal blocked around the fork: no handler of the master runs in the
        // children (they keep the full mask for good).
        // SAFETY: both pointers are valid sigsets owned by this frame.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &full, &mut old) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        // SAFETY: as in `launch::spawn`: the child runs only `intermediate`, which makes
        // async-signal-safe system calls on the plan prepared above, writes only into
        // its own copies of the table and of the master's argument and environment
        // strings, never allocates, never returns and never unwinds.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: we are the freshly forked child.
            unsafe { intermediate(&plan) }
        }
        let fork_error = io::Error::last_os_error();
        // SAFETY: restores the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, ptr::null_mut()) };
        drop(guard_end);
        drop(table);
        if pid < 0 {
            return Err(fork_error);
        }
        // The intermediate exits as soon as it has forked the guard.
        loop {
            let mut status = 0;
            // SAFETY: waitpid on our own child with a valid status pointer.
            let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
            if rc >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break;
            }
        }
        let guard_pid = read_hello(&master_end)?;
        Ok(Process {
            sock: master_end,
            pid: guard_pid,
        })
    }
}

/// Waits (bounded) for the guard's hello; its pid.
fn read_hello(sock: &OwnedFd) -> io::Result<u32> {
    let mut pfd = libc::pollfd {
        fd: sock.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, HELLO_TIMEOUT_MS) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = [0u8; RECORD];
    // SAFETY: `buf` is valid for RECORD bytes of writes.
    let got = unsafe {
        libc::recv(
            sock.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            RECORD,
            libc::MSG_DONTWAIT,
        )
    };
    if got != RECORD as isize {
        return Err(io::Error::other("the guard did not start (no hello)"));
    }
    let op = u32::from_ne_bytes(buf[..4].try_into().unwrap_or_default());
    let pid = i32::from_ne_bytes(buf[4..].try_into().unwrap_or_default());
    if op != HELLO || pid <= 0 {
        return Err(io::Error::other("bad hello from the guard"));
    }
    Ok(pid as u32)
}

/// The master's command line and environment strings (`/proc/self/stat` fields 48 to
/// 51), each kept only if it lies within one writable mapping of `/proc/self/maps`.
fn scrub_ranges() -> [(usize, usize); 2] {
    let mut out = [(0, 0); 2];
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return out;
    };
    let Some(close) = stat.rfind(')') else {
        return out;
    };
    // Fields after the name start at field 3 (state).
    let f: Vec<usize> = stat[close + 1..]
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let Some(&[arg_start, arg_end, env_start, env_end]) = f.get(45..49) else {
        return out;
    };
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let writable = |start: usize, end: usize| {
        start < end
            && maps.lines().any(|l| {
                let mut parts = l.split_whitespace();
                let (Some(range), Some(perms)) = (parts.next(), parts.next()) else {
                    return false;
                };
                let Some((a, b)) = range.split_once('-') else {
                    return false;
                };
                let a = usize::from_str_radix(a, 16).unwrap_or(usize::MAX);
                let b = usize::from_str_radix(b, 16).unwrap_or(0);
                perms.starts_with("rw") && a <= start && end <= b
            })
    };
    if writable(arg_start, arg_end) {
        out[0] = (arg_start, arg_end - arg_start);
    }
    if writable(env_start, env_end) {
        out[1] = (env_start, env_end - env_start);
    }
    out
}

/// The first child: a new session, then the guard as its child, then exit.
///
/// # Safety
/// Child of `fork` only, with `plan` prepared by [`Process::start`]; async-signal-safe.
unsafe fn intermediate(plan: &Plan) -> ! {
    // A session of its own (and so a process group): no terminal signal reaches it.
    libc::setsid();
    let pid = libc::fork();
    if pid == 0 {
        guard_main(plan)
    }
    libc::_exit(if pid < 0 { 1 } else { 0 })
}

/// The guard itself: see the module docs.
///
/// # Safety
/// Grandchild of the master's `fork`, with `plan` prepared by [`Process::start`]: only
/// async-signal-safe system calls, on the plan's data and the stack.
unsafe fn guard_main(plan: &Plan) -> ! {
    let sock = plan.sock;
    libc::close(plan.master_end);
    // Every other descriptor goes: listening sockets, pipes, the notify socket, stdio.
    let closed_below = sock == 0
        || libc::syscall(libc::SYS_close_range, 0 as libc::c_uint, (sock - 1) as libc::c_uint, 0)
            == 0;
    let closed_above = libc::syscall(
        libc::SYS_close_range,
        (sock + 1) as libc::c_uint,
        libc::c_uint::MAX,
        0,
    ) == 0;
    if !closed_below || !closed_above {
        for fd in 0..plan.fd_limit {
            if fd != sock {
                libc::close(fd);
            }
        }
    }
    // Default dispositions (no handler of the master's may run here), and every signal
    // stays blocked (the mask was full at the fork): only SIGKILL and SIGSTOP act.
    let default_action = [0u64; 8];
    for sig in 1..plan.nsig {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                default_action.as_ptr(),
                ptr::null_mut::<u64>(),
                8usize,
            );
        }
    }
    libc::chdir(c"/".as_ptr());
    libc::prctl(libc::PR_SET_NAME, NAME.as_ptr() as libc::c_ulong, 0, 0, 0);
    // The command line reads `recluster-guard`; the environment reads empty. The
    // ranges are the kernel's (`/proc/self/stat`), checked before the fork to lie in
    // one writable mapping; this process's copy of them is private (copy-on-write), and
    // nothing here reads them again (no `std::env`, no `getenv`).
    let (arg, arg_len) = plan.scrub[0];
    if arg_len > 0 {
        let dst = arg as *mut u8;
        ptr::write_bytes(dst, 0, arg_len);
        // The name without its NUL, cut to leave the area's last byte a NUL.
        ptr::copy_nonoverlapping(NAME.as_ptr(), dst, (NAME.len() - 1).min(arg_len - 1));
    }
    let (env, env_len) = plan.scrub[1];
    if env_len > 0 {
        ptr::write_bytes(env as *mut u8, 0, env_len);
    }

    if !send(sock, HELLO, libc::getpid()) {
        libc::_exit(1);
    }
    let table = plan.table;
    let mut len = 0usize;
    let mut buf = [0u8; RECORD];
    loop {
        let n = libc::recv(sock, buf.as_mut_ptr().cast(), RECORD, 0);
        if n == 0 {
            break; // EOF: the master is gone
        }
        if n < 0 {
            if *libc::__errno_location() == libc::EINTR {
                continue;
            }
            break; // an error reading is no promise the master lives: act
        }
        if n as usize != RECORD {
            continue;
        }
        let op = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
        let pid = i32::from_ne_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if pid <= 0 && op != BYE {
            continue;
        }
        let found = (0..len).find(|&i| *table.add(i) == pid);
        match (op, found) {
            (ADD, None) if len < CAPACITY => {
                *table.add(len) = pid;
                len += 1;
            }
            (REMOVE, Some(i)) => {
                len -= 1;
                *table.add(i) = *table.add(len);
            }
            (BYE, _) => libc::_exit(0),
            _ => {}
        }
    }

    // The master is gone. The cgroup first: one write takes every process in it,
    // `setsid` daemons and forks in flight included; then the groups, which is all
    // there is where cgroups are not used.
    if let Some(kill) = &plan.cgroup_kill {
        let fd = libc::open(kill.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, b"1".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
    for i in 0..len {
        libc::kill(-*table.add(i), libc::SIGKILL);
    }
    if let Some(base) = &plan.cgroup_base {
        // Killed processes leave their cgroups as they exit: try for about 2 s.
        let pause = libc::timespec {
            tv_sec: 0,
            tv_nsec: 10_000_000,
        };
        for _ in 0..REMOVE_TRIES {
            if remove_cgroups(base) {
                break;
            }
            libc::nanosleep(&pause, ptr::null_mut());
        }
    }
    libc::_exit(0)
}

/// Removes the cgroups in `base`, then `base`; whether `base` is gone.
///
/// # Safety
/// Async-signal-safe (raw system calls on the stack); for [`guard_main`].
unsafe fn remove_cgroups(base: &CString) -> bool {
    let dir = libc::open(
        base.as_ptr(),
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
    );
    if dir >= 0 {
        // struct linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name NUL-ended.
        let mut buf = [0u8; 4096];
        loop {
            let n = libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len());
            if n <= 0 {
                break;
            }
            let mut at = 0usize;
            while at + 19 < n as usize {
                let reclen = u16::from_ne_bytes([buf[at + 16], buf[at + 17]]) as usize;
                let kind = buf[at + 18];
                let name = buf.as_ptr().add(at + 19) as *const libc::c_char;
                let dot = *name == b'.' as libc::c_char;
                if kind == libc::DT_DIR && !dot {
                    libc::unlinkat(dir, name, libc::AT_REMOVEDIR);
                }
                if reclen == 0 {
                    break;
                }
                at += reclen;
            }
        }
        libc::close(dir);
    }
    libc::rmdir(base.as_ptr()) == 0 || *libc::__errno_location() == libc::ENOENT
}
