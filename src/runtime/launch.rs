//! Starting a worker process: fork, lay out its file descriptors, exec.
//!
//! We fork and exec by hand instead of using `std::process::Command` because the
//! systemd socket-activation protocol wants `LISTEN_PID` to equal the worker's *own*
//! pid (`sd_listen_fds` ignores the fds otherwise), and that pid is only known in the
//! child, after `fork`. Owning the child side also lets us place the listening sockets
//! at exactly fds `3, 4, …` (clearing their close-on-exec flag), give the worker its
//! own process group, tie its life to the master with `PR_SET_PDEATHSIG`, and, before
//! any program of the worker runs, move it into its own cgroup (`cgroup.rs`) and
//! record its process group with the guard (`guard.rs`), which kills what the worker
//! started should the master be killed.
//!
//! The master is multi-threaded (tokio), so between `fork` and `execve` the child may
//! only make async-signal-safe calls: another thread may have held the allocator's or
//! any other lock at the moment of the fork, and that lock stays held forever in the
//! child. Everything that allocates — argv and envp pointer arrays, the
//! `LISTEN_PID=` buffer, the `/dev/null` descriptor, the exec-error pipe — is therefore
//! prepared before the fork, and the child only issues raw system calls.
//!
//! **Call [`spawn`] from a long-lived thread.** `PR_SET_PDEATHSIG` fires when the
//! *thread* that forked the child exits, not when the process does: forking from a
//! short-lived thread (e.g. tokio's `spawn_blocking` pool, whose threads are retired
//! when idle) would get healthy workers SIGKILLed. A runtime worker thread, or a
//! dedicated thread that lives as long as the supervisor, is fine.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr;


/// Everything needed to start one worker process.
pub(crate) struct SpawnSpec<'a> {
    /// Resolved path of the program (see [`resolve_program`]).
    pub program: &'a CString,
    /// argv, including argv[0].
    pub args: &'a [CString],
    /// Complete environment as `KEY=VALUE` entries (no LISTEN_PID: see `listen_pid`).
    pub env: &'a [CString],
    /// Descriptors of the master to appear in the worker at 3, 4, … in this order.
    pub fds: &'a [RawFd],
    /// Whether to add `LISTEN_PID=<the worker's own pid>` to the environment.
    pub listen_pid: bool,
    /// What the child does to stay contained (see [`Contain`]).
    pub contain: Contain<'a>,
    /// Who the worker runs as; `None`: as the master.
    pub run_as: Option<crate::config::Credentials>,
    /// Descriptors of the master to become the worker's stdout and stderr (`--prefix`:
    /// pipes the master reads); `None`: the worker inherits the master's.
    pub output: Option<[RawFd; 2]>,
}

/// What the child does, before exec, so that a killed master leaves nothing behind
/// (`guard.rs`, `cgroup.rs`).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Contain<'a> {
    /// The guard's socket: the child records its process group there (`add <pid>`),
    /// before exec, so no program of the worker can fork before the guard knows.
    pub guard: Option<RawFd>,
    /// `cgroup.procs` of the worker's own cgroup: the child moves itself in (a failed
    /// move leaves it where it is: the master checks the first worker).
    pub cgroup_procs: Option<&'a CStr>,
}

/// First descriptor number of the inherited sockets (after stdin, stdout, stderr).
const FIRST_FD: RawFd = 3;

/// `LISTEN_PID=` prefix of the preallocated environment entry.
const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

/// Size of the `LISTEN_PID=` entry: prefix, up to 20 digits, terminating NUL.
const LISTEN_PID_LEN: usize = LISTEN_PID_PREFIX.len() + 20 + 1;

/// Size of the kernel's signal set, as `rt_sigaction` wants it (64 signals).
const KERNEL_SIGSET_BYTES: usize = 8;

/// Everything the child needs, prepared (and allocated) before the fork.
struct ChildPlan<'a> {
    /// NUL-terminated program path for `execve`.
    program: *const libc::c_char,
    /// Null-terminated argv pointer array.
    argv: &'a [*const libc::c_char],
    /// Null-terminated envp pointer array (may point into `listen_pid_buf`).
    envp: &'a [*const libc::c_char],
    /// Where the child writes its pid digits, if `LISTEN_PID` is wanted.
    listen_pid_buf: Option<*mut u8>,
    /// Master descriptors to place at 3, 4, ….
    fds: &'a [RawFd],
    /// Preallocated room (`fds.len()` entries) for the child's phase-1 copies.
    high: *mut RawFd,
    /// Lowest number free of every source and target, for the first dup phase.
    high_min: RawFd,
    /// `/dev/null`, opened for the child's stdin.
    dev_null: RawFd,
    /// The child's stdout and stderr, or -1 each to keep the master's.
    output: [RawFd; 2],
    /// Write end of the CLOEXEC pipe that reports an exec failure.
    err_pipe: RawFd,
    /// Pid of the forking process, to detect that it died before PDEATHSIG was armed.
    parent_pid: libc::pid_t,
    /// One past the highest signal number whose disposition is reset.
    nsig: libc::c_int,
    /// Empty signal set, installed as the child's mask just before exec.
    empty_mask: libc::sigset_t,
    /// The descriptor limit: the fallback loop's bound where `close_range` is missing.
    fd_limit: RawFd,
    /// The guard's socket, or -1.
    guard: RawFd,
    /// `cgroup.procs` of the worker's cgroup, or null.
    cgroup_procs: *const libc::c_char,
    /// User and group to switch to (after the cgroup move, which needs the master's
    /// rights), or `None`.
    run_as: Option<(libc::uid_t, libc::gid_t)>,
}

/// Forks and execs a worker; returns its pid once exec succeeded.
///
/// The worker gets `/dev/null` as stdin, inherits stdout and stderr (or gets
/// `spec.output` as them), finds
/// `spec.fds[i]` at fd `3 + i` (without close-on-exec), leads its own process group,
/// has an empty signal mask and default signal dispositions, and receives SIGKILL when
/// the calling thread dies (see the module docs: call from a long-lived thread). Every
/// other descriptor is closed at exec in the child (`close_range` with
/// `CLOSE_RANGE_CLOEXEC`), even one the master holds without close-on-exec, and
/// without touching the master's own flags. An exec failure (missing program, permission, …) is
/// returned as the errno of `execve`, after the failed child has been reaped.
pub(crate) fn spawn(spec: &SpawnSpec<'_>) -> io::Result<u32> {
    let mut argv: Vec<*const libc::c_char> = spec.args.iter().map(|a| a.as_ptr()).collect();
    argv.push(ptr::null());

    let mut listen_pid_buf = [0u8; LISTEN_PID_LEN];
    listen_pid_buf[..LISTEN_PID_PREFIX.len()].copy_from_slice(LISTEN_PID_PREFIX);
    let mut envp: Vec<*const libc::c_char> = Vec::with_capacity(spec.env.len() + 2);
    envp.extend(spec.env.iter().map(|e| e.as_ptr()));
    let listen_pid_ptr = if spec.listen_pid {
        let p = listen_pid_buf.as_mut_ptr();
        envp.push(p as *const libc::c_char);
        Some(p)
    } else {
        None
    };
    envp.push(ptr::null());

    for &fd in spec.fds.iter().chain(spec.output.iter().flatten()) {
        // SAFETY: F_GETFD only queries the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    let mut high: Vec<RawFd> = vec![-1; spec.fds.len()];
    let dev_null: OwnedFd = File::open("/dev/null")?.into(); // std opens with O_CLOEXEC
    let (err_read, err_write) = cloexec_pipe()?;

    let len = RawFd::try_from(spec.fds.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many descriptors"))?;
    let high_min = spec
        .fds
        .iter()
        .copied()
        .chain(spec.output.into_iter().flatten())
        .chain([FIRST_FD + len, err_write.as_raw_fd(), dev_null.as_raw_fd()])
        .max()
        .unwrap_or(FIRST_FD)
        .saturating_add(1);

    // SAFETY: `sigemptyset`/`sigfillset` fully initialise the zeroed sets.
    let (empty_mask, full_mask) = unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        let mut full: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut full);
        (empty, full)
    };

    let plan = ChildPlan {
        program: spec.program.as_ptr(),
        argv: &argv,
        envp: &envp,
        listen_pid_buf: listen_pid_ptr,
        fds: spec.fds,
        high: high.as_mut_ptr(),
        high_min,
        dev_null: dev_null.as_raw_fd(),
        output: spec.output.unwrap_or([-1, -1]),
        err_pipe: err_write.as_raw_fd(),
        parent_pid: std::process::id() as libc::pid_t,
        nsig: libc::SIGRTMAX() + 1,
        empty_mask,
        fd_limit: fd_limit(),
        guard: spec.contain.guard.unwrap_or(-1),
        cgroup_procs: spec.contain.cgroup_procs.map_or(ptr::null(), CStr::as_ptr),
        run_as: spec.run_as.map(|c| (c.uid, c.gid)),
    };

    // Block every signal in this thread around the fork so that no handler of the
    // master (tokio's writes to its self-pipe) can run in the child before the
    // dispositions are reset; the child unblocks them just before exec.
    let mut old_mask: libc::sigset_t = empty_mask;
    // SAFETY: both pointers are valid, initialised sigsets owned by this frame.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &full_mask, &mut old_mask) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }

    // SAFETY: the master is multi-threaded, so the child of `fork` holds a copy of
    // memory in which other threads may have been holding locks (allocator, stdio,
    // tracing). The child therefore runs only `exec_child`, which makes nothing but
    // async-signal-safe system calls (setpgid, prctl, getppid, getpid, open, write,
    // close, send, rt_sigaction, sigprocmask, fcntl, dup2, execve, _exit) on data prepared above, writes
    // only into its own copies of `listen_pid_buf` and `high`, never allocates, never
    // formats, never returns (it execs or `_exit`s), and never unwinds. Only the
    // forking thread exists in the child, and PR_SET_PDEATHSIG is tied to *this*
    // thread: callers fork from a long-lived thread (see the module docs).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: we are the freshly forked child; see `exec_child`'s contract.
        unsafe { exec_child(&plan) }
    }
    let fork_error = io::Error::last_os_error();

    // SAFETY: restores the mask saved above, a valid initialised sigset.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old_mask, ptr::null_mut()) };
    drop(err_write);
    drop(dev_null);
    if pid < 0 {
        return Err(fork_error);
    }

    // A child that recorded itself with the guard and then failed is forgotten once
    // reaped (it exec'd nothing, so its group held nothing else).
    let forget = || {
        if let Some(fd) = spec.contain.guard {
            super::guard::send(fd, super::guard::REMOVE, pid);
        }
    };
    match read_exec_error(&err_read) {
        Ok(None) => Ok(pid as u32),
        Ok(Some(errno)) => {
            reap(pid);
            forget();
            Err(io::Error::from_raw_os_error(errno))
        }
        Err(e) => {
            // Unknown outcome: do not leave a half-started worker behind.
            // SAFETY: `pid` is our own child, not yet reaped, so it names no one else.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            reap(pid);
            forget();
            Err(e)
        }
    }
}

/// The soft `RLIMIT_NOFILE`, capped, for the child's fallback loop.
pub(crate) fn fd_limit() -> RawFd {
    // SAFETY: getrlimit writes into the struct we own.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur.min(1 << 20) as RawFd
}

/// Creates a pipe whose both ends are close-on-exec.
fn cloexec_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Reads the exec-error pipe until EOF (exec succeeded) or a 4-byte errno arrives.
fn read_exec_error(pipe: &OwnedFd) -> io::Result<Option<i32>> {
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: the destination range lies within `buf`, and `pipe` is open.
        let n = unsafe {
            libc::read(
                pipe.as_raw_fd(),
                buf[got..].as_mut_ptr().cast(),
                buf.len() - got,
            )
        };
        match n {
            0 => break,
            n if n > 0 => got += n as usize,
            _ => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok((got == buf.len()).then(|| i32::from_ne_bytes(buf)))
}

/// Waits for a child known to have exited (retrying on EINTR).
fn reap(pid: libc::pid_t) {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid int to write the exit status into.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// The child between fork and exec: sets up the process and execs, or `_exit(127)`.
///
/// # Safety
/// Must only be called in the child of `fork`, with `plan` prepared by [`spawn`].
/// Only async-signal-safe calls are made; nothing is allocated.
unsafe fn exec_child(plan: &ChildPlan<'_>) -> ! {
    // Own process group, so terminal signals and group kills target workers on purpose.
    if libc::setpgid(0, 0) != 0 {
        fail(plan.err_pipe);
    }
    // Die with the master; if it already died before this was armed, go away now.
    if libc::prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        0,
        0,
        0,
    ) != 0
    {
        fail(plan.err_pipe);
    }
    if libc::getppid() != plan.parent_pid {
        libc::_exit(127);
    }
    // Contained before any program of the worker runs: in its own cgroup (writing `0`
    // to `cgroup.procs` moves the writer), then recorded with the guard. A master killed
    // from here on finds the guard knowing this group; one killed before the check
    // above took this child with it (PR_SET_PDEATHSIG) or made it exit there.
    if !plan.cgroup_procs.is_null() {
        let fd = libc::open(plan.cgroup_procs, libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
        }
    }
    if plan.guard >= 0 {
        super::guard::send(plan.guard, super::guard::ADD, libc::getpid());
    }
    // `--user`/`--group`: drop to them now that the steps needing the master's rights
    // are done: no supplementary groups, then the group, then the user (a failure is
    // the exec failure the master reports). Changing credentials clears the
    // parent-death signal, so it is armed again, and the master checked again.
    if let Some((uid, gid)) = plan.run_as {
        if libc::setgroups(0, ptr::null()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
            fail(plan.err_pipe);
        }
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
            fail(plan.err_pipe);
        }
        if libc::getppid() != plan.parent_pid {
            libc::_exit(127);
        }
    }
    // Handlers are reset by exec anyway, but SIG_IGN survives it (Rust ignores SIGPIPE,
    // `nohup` ignores SIGHUP). The raw system call also reaches the signals glibc
    // reserves for itself (32, 33), which its `sigaction` refuses; an all-zero kernel
    // `struct sigaction` means SIG_DFL, no flags, empty mask, whatever the layout.
    let default_action = [0u64; 8];
    for sig in 1..plan.nsig {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // Errors (no such signal) leave nothing to reset.
            libc::syscall(
                libc::SYS_rt_sigaction,
                sig,
                default_action.as_ptr(),
                ptr::null_mut::<u64>(),
                KERNEL_SIGSET_BYTES,
            );
        }
    }
    if let Some(buf) = plan.listen_pid_buf {
        write_pid(buf.add(LISTEN_PID_PREFIX.len()), libc::getpid());
    }

    // Phase 1: copy every source (and the error pipe) above all sources and targets,
    // so that phase 2 cannot overwrite a source that has yet to be placed, and so that
    // a source already at its target still gets a fresh, non-CLOEXEC descriptor.
    let err_pipe = libc::fcntl(plan.err_pipe, libc::F_DUPFD_CLOEXEC, plan.high_min);
    if err_pipe < 0 {
        fail(plan.err_pipe);
    }
    for (i, &src) in plan.fds.iter().enumerate() {
        let fd = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, plan.high_min);
        if fd < 0 {
            fail(err_pipe);
        }
        // Writes into the child's private copy of the buffer allocated before fork.
        *plan.high.add(i) = fd;
    }
    // Copied high too, so that neither can be overwritten before it is placed.
    let mut output = [-1 as RawFd; 2];
    for (high, &src) in output.iter_mut().zip(&plan.output) {
        if src >= 0 {
            *high = libc::fcntl(src, libc::F_DUPFD_CLOEXEC, plan.high_min);
            if *high < 0 {
                fail(err_pipe);
            }
        }
    }
    // Stdin now (a source at fd 0 has been copied, and `dev_null` may be a target),
    // then stdout and stderr when the master gives them.
    if libc::dup2(plan.dev_null, 0) < 0 {
        fail(err_pipe);
    }
    for (target, &high) in (1..).zip(&output) {
        if high >= 0 && libc::dup2(high, target) < 0 {
            fail(err_pipe);
        }
    }
    // Phase 2: dup2 onto the targets; dup2 leaves the new descriptor without CLOEXEC.
    for i in 0..plan.fds.len() {
        if libc::dup2(*plan.high.add(i), FIRST_FD + i as RawFd) < 0 {
            fail(err_pipe);
        }
    }

    // Everything above the targets is close-on-exec in the child, whatever the master
    // left open without the flag (descriptors it inherited from its own parent, or a
    // host program's): the worker gets 0, 1, 2 and its targets, nothing else. This
    // changes only the child's descriptor table, never the master's.
    let first_other = FIRST_FD + plan.fds.len() as RawFd;
    if libc::syscall(
        libc::SYS_close_range,
        first_other as libc::c_uint,
        libc::c_uint::MAX,
        libc::CLOSE_RANGE_CLOEXEC,
    ) != 0
    {
        // Kernels before 5.11: one fcntl per possible descriptor (EBADF for most).
        for fd in first_other..plan.fd_limit {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
    }
    libc::sigprocmask(libc::SIG_SETMASK, &plan.empty_mask, ptr::null_mut());
    libc::execve(plan.program, plan.argv.as_ptr(), plan.envp.as_ptr());
    fail(err_pipe)
}

/// Writes the decimal digits of `pid` and a NUL at `dst` (at most 21 bytes).
///
/// # Safety
/// `dst` must be valid for 21 bytes of writes. Async-signal-safe.
unsafe fn write_pid(dst: *mut u8, pid: libc::pid_t) {
    let mut digits = [0u8; 20];
    let mut n = pid as u64;
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        *dst.add(i) = digits[len - 1 - i];
    }
    *dst.add(len) = 0;
}

/// Reports the current errno on the error pipe and exits with status 127.
///
/// # Safety
/// Child of `fork` only (see [`exec_child`]).
unsafe fn fail(err_pipe: RawFd) -> ! {
    let errno = *libc::__errno_location();
    let bytes = errno.to_ne_bytes();
    libc::write(err_pipe, bytes.as_ptr().cast(), bytes.len());
    libc::_exit(127)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;

    /// Builds a CString from a test literal.
    fn c(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    /// Spawns `/bin/sh -c script` with `fds`, returns its pid.
    fn sh(script: &str, fds: &[RawFd], env: &[CString], listen_pid: bool) -> io::Result<u32> {
        let program = c("/bin/sh");
        let args = [c("sh"), c("-c"), c(script)];
        spawn(&SpawnSpec {
            program: &program,
            args: &args,
            env,
            fds,
            listen_pid,
            contain: Contain::default(),
            run_as: None,
            output: None,
        })
    }

    /// Waits for `pid` and returns its exit status code.
    fn wait_exit(pid: u32) -> i32 {
        let mut status = 0;
        // SAFETY: plain waitpid on our own child with a valid status pointer.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        assert_eq!(rc, pid as libc::pid_t);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    /// Reads a pipe to EOF (the child closing its copies is the event we wait for).
    fn read_all(read: OwnedFd) -> String {
        let mut s = String::new();
        File::from(read).read_to_string(&mut s).unwrap();
        s
    }

    #[test]
    fn a_descriptor_the_master_holds_without_cloexec_does_not_leak_and_keeps_its_flag() {
        // SAFETY: a plain pipe2 without O_CLOEXEC into an array we own.
        let mut raw = [0 as RawFd; 2];
        assert_eq!(unsafe { libc::pipe2(raw.as_mut_ptr(), 0) }, 0);
        // SAFETY: fresh descriptors, owned here alone.
        let (leak_r, leak_w) =
            unsafe { (OwnedFd::from_raw_fd(raw[0]), OwnedFd::from_raw_fd(raw[1])) };
        let (out_r, out_w) = cloexec_pipe().unwrap();
        let script = format!(
            "exec 1>&3; if [ -e /proc/self/fd/{} ]; then echo leaked; else echo closed; fi",
            leak_w.as_raw_fd()
        );
        let pid = sh(&script, &[out_w.as_raw_fd()], &[], false).unwrap();
        drop(out_w);
        let out = read_all(out_r);
        assert_eq!(wait_exit(pid), 0);
        assert_eq!(out.trim(), "closed");
        // SAFETY: F_GETFD only reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(leak_w.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(
            flags & libc::FD_CLOEXEC,
            0,
            "the master's own flag is untouched"
        );
        drop(leak_r);
    }

    #[test]
    fn lays_out_fds_env_and_stdin() {
        // Whatever the harness inherited from its own parent must not leak either
        // (the child marks everything above its targets close-on-exec).
        let l1 = TcpListener::bind("127.0.0.1:0").unwrap();
        let l2 = TcpListener::bind("127.0.0.1:0").unwrap();
        let (out_r, out_w) = cloexec_pipe().unwrap();
        let fds = [l1.as_raw_fd(), l2.as_raw_fd(), out_w.as_raw_fd()];
        let env = [c("FOO=bar"), c("PATH=/usr/bin:/bin")];
        // Output goes to fd 5; ls then runs as the same process (exec) and lists its own
        // fds: 0-5 plus the one it opens for the directory.
        let script = "exec 1>&5; echo pid=$$; echo LISTEN_PID=$LISTEN_PID; echo FOO=$FOO; \
                      echo stdin=$(readlink /proc/$$/fd/0); echo fd3=$(readlink /proc/$$/fd/3); \
                      echo fd4=$(readlink /proc/$$/fd/4); echo pgid=$(cut -d' ' -f5 /proc/$$/stat); \
                      echo fds:; exec ls -1 /proc/self/fd";
        let pid = sh(script, &fds, &env, true).unwrap();
        drop(out_w);
        let out = read_all(out_r);
        assert_eq!(wait_exit(pid), 0, "{out}");
        let line = |key: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(key))
                .unwrap_or_else(|| panic!("{key} missing in {out}"))
                .to_owned()
        };
        assert_eq!(line("pid="), pid.to_string());
        assert_eq!(line("LISTEN_PID="), pid.to_string());
        assert_eq!(line("FOO="), "bar");
        assert_eq!(
            line("pgid="),
            pid.to_string(),
            "the worker leads its own group"
        );
        assert_eq!(line("stdin="), "/dev/null");
        assert!(line("fd3=").starts_with("socket:["), "{out}");
        assert!(line("fd4=").starts_with("socket:["), "{out}");
        assert_ne!(line("fd3="), line("fd4="));
        let listed: Vec<RawFd> = out
            .split("fds:\n")
            .nth(1)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        // 0..=5 and exactly one more: ls's own directory descriptor.
        assert_eq!(listed.len(), 7, "unexpected fds {listed:?}");
        assert_eq!(
            &listed[..6],
            &[0, 1, 2, 3, 4, 5],
            "unexpected fds {listed:?}"
        );
    }

    #[test]
    fn fds_keep_their_order_even_when_numbers_overlap() {
        // Many pipes, passed in reverse order: with the low numbers a test process
        // hands out, sources and targets overlap.
        let pipes: Vec<(OwnedFd, OwnedFd)> = (0..6).map(|_| cloexec_pipe().unwrap()).collect();
        let fds: Vec<RawFd> = pipes.iter().rev().map(|(_, w)| w.as_raw_fd()).collect();
        let script = "for i in 0 1 2 3 4 5; do eval \"echo \\$i >&$((i + 3))\"; done";
        let pid = sh(script, &fds, &[], false).unwrap();
        let mut reads = Vec::new();
        for (r, w) in pipes.into_iter().rev() {
            drop(w);
            reads.push(r);
        }
        assert_eq!(wait_exit(pid), 0);
        for (i, r) in reads.into_iter().enumerate() {
            assert_eq!(read_all(r).trim(), i.to_string());
        }
    }

    #[test]
    fn no_listen_pid_unless_asked() {
        let (out_r, out_w) = cloexec_pipe().unwrap();
        let pid = sh(
            "echo \"[$LISTEN_PID]\" >&3",
            &[out_w.as_raw_fd()],
            &[],
            false,
        )
        .unwrap();
        drop(out_w);
        assert_eq!(read_all(out_r).trim(), "[]");
        assert_eq!(wait_exit(pid), 0);
    }

    #[test]
    fn signals_are_reset() {
        let (out_r, out_w) = cloexec_pipe().unwrap();
        // The Rust test harness ignores SIGPIPE; the worker must see it at default.
        let pid = sh(
            // `exec`: grep reads its own status as the worker's exec left it (a shell
            // that forks blocks signals around the fork, which would race the check).
            "exec grep -E '^Sig(Ign|Blk)' /proc/self/status >&3",
            &[out_w.as_raw_fd()],
            &[],
            false,
        )
        .unwrap();
        drop(out_w);
        let out = read_all(out_r);
        assert_eq!(wait_exit(pid), 0);
        for l in out.lines() {
            let mask = l.split_whitespace().nth(1).unwrap();
            assert!(mask.chars().all(|c| c == '0'), "{out}");
        }
    }

    #[test]
    fn missing_program_is_enoent() {
        let program = c("/nonexistent/recluster-test");
        let args = [c("x")];
        let err = spawn(&SpawnSpec {
            program: &program,
            args: &args,
            env: &[],
            fds: &[],
            listen_pid: false,
            contain: Contain::default(),
            run_as: None,
            output: None,
        })
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOENT));
    }

    #[test]
    fn output_descriptors_become_stdout_and_stderr() {
        let (out_r, out_w) = cloexec_pipe().unwrap();
        let (err_r, err_w) = cloexec_pipe().unwrap();
        let (fd3_r, fd3_w) = cloexec_pipe().unwrap();
        let program = c("/bin/sh");
        let args = [
            c("sh"),
            c("-c"),
            c("echo out; echo err >&2; echo three >&3; ls /proc/self/fd | wc -l >&3"),
        ];
        let pid = spawn(&SpawnSpec {
            program: &program,
            args: &args,
            env: &[],
            fds: &[fd3_w.as_raw_fd()],
            listen_pid: false,
            contain: Contain::default(),
            run_as: None,
            output: Some([out_w.as_raw_fd(), err_w.as_raw_fd()]),
        })
        .unwrap();
        drop((out_w, err_w, fd3_w));
        assert_eq!(read_all(out_r), "out\n");
        assert_eq!(read_all(err_r), "err\n");
        // 0..=3 and ls's directory: the high copies did not leak.
        assert_eq!(read_all(fd3_r), "three\n5\n");
        assert_eq!(wait_exit(pid), 0);
    }

    #[test]
    fn bad_fd_is_reported() {
        let err = sh("true", &[1_000_000], &[], false).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
    }

}
