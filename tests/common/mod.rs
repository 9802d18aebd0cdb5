//! Harness of the end-to-end tests: runs the real `recluster` binary with real
//! workers, follows its log, and talks to the workers over TCP.
//!
//! Tests synchronise on log events and other conditions with deadlines
//! ([`Master::wait_event`], [`poll_until`], channel timeouts), never on fixed sleeps.
//! A log event is found by its machine-readable `event=` field and its other fields
//! (`worker_ready slot=1`), never by the wording of its message: see
//! [`LogLine::matches`].
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Default deadline for something that should happen promptly (generous: CI has 2 cores).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// The binary under test.
pub fn recluster_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_recluster"))
}

/// The crate's root directory.
pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// An example binary built next to the test binary: target/<profile>/deps/<test> →
/// target/<profile>/examples/<name>. Plain `cargo test` builds the examples; when it
/// did not (`cargo test --test shared_mode` does not) or the binary is older than its
/// source, it is built here with the same profile.
pub fn example_bin(name: &str) -> PathBuf {
    static BUILT: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is in target/<profile>/deps");
    let path = profile_dir.join("examples").join(name);
    let source = manifest_dir().join("examples").join(format!("{name}.rs"));
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if !built.contains(name) {
        let modified = |p: &Path| p.metadata().and_then(|m| m.modified()).ok();
        // Stale if older than its source or than the library it links (src/).
        let newest_source = [modified(&source), newest_in(&manifest_dir().join("src"))]
            .into_iter()
            .flatten()
            .max();
        let stale = match (modified(&path), newest_source) {
            (None, _) => true,
            (Some(binary), Some(source)) => binary < source,
            (Some(_), None) => false,
        };
        if stale {
            build_example(name, profile_dir);
        }
        built.insert(name.to_string());
    }
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --examples`",
        path.display()
    );
    path
}

/// The latest modification time of any file below `dir`.
fn newest_in(dir: &Path) -> Option<std::time::SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let t = if path.is_dir() {
            newest_in(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

fn build_example(name: &str, profile_dir: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--example", name])
        .current_dir(manifest_dir());
    match profile_dir.file_name().and_then(OsStr::to_str) {
        Some("debug") => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
        None => {}
    }
    if let Some(target_dir) = profile_dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build example {name}: {e}"));
    assert!(status.success(), "building example {name} failed: {status}");
}

/// The test suite's worker, `examples/test_worker.rs`.
pub fn test_worker() -> PathBuf {
    example_bin("test_worker")
}

/// Path of a file in the crate's `examples/` directory (e.g. `fd3.js`).
pub fn example_source(name: &str) -> PathBuf {
    manifest_dir().join("examples").join(name)
}

/// Finds `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// `program` on PATH. A test that needs it and finds none is skipped on a developer's
/// machine (it says so), but fails under `CI=true`: CI must not pass by skipping.
pub fn require(program: &str) -> Option<PathBuf> {
    let found = which(program);
    if found.is_none() {
        skip(&format!("{program} is not on PATH"));
    }
    found
}

/// Says why a test is skipped, on a developer's machine; under `CI=true` fails it
/// instead, so that CI cannot pass by skipping (`.ci/run` installs what tests need).
pub fn skip(why: &str) {
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "cannot run under CI=true: {why}; .ci/run must install it"
    );
    println!("skipped: {why}");
}

/// A port that was free a moment ago (the kernel hands out ephemeral ports in turn,
/// so another test is unlikely to take it before the master binds it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// Calls `cond` until it returns true or `timeout` passes; returns its last answer.
/// The pause between calls only paces the polling; it synchronises nothing.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::park_timeout(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------
// Log lines
// ---------------------------------------------------------------------------------

/// One line of the master's stderr, parsed as a tracing fmt event
/// (`<time>  INFO <target>: <message> key=value …`).
#[derive(Clone, Debug)]
pub struct LogLine {
    /// Position in the master's stderr, from 0.
    pub index: usize,
    /// When the harness read it.
    pub at: Instant,
    /// The line's own timestamp (RFC 3339, UTC), as time since the Unix epoch.
    pub time: Option<Duration>,
    pub raw: String,
    /// `INFO`, `WARN`, …; empty for a line that is not a log event (a worker's output).
    pub level: String,
    pub target: String,
    /// The words before the first `key=value`: for people to read. Tests find a line
    /// by its `event` field ([`LogLine::event`], [`LogLine::matches`]); they read the
    /// message only where its words are what is tested (the advice of
    /// `starts_failing`).
    pub message: String,
    pub fields: BTreeMap<String, String>,
}

impl LogLine {
    /// Time from `earlier` to this line, by the master's timestamps when both lines
    /// have one (the harness may read lines late, in bursts), else by reading time.
    pub fn since(&self, earlier: &LogLine) -> Duration {
        match (self.time, earlier.time) {
            (Some(t), Some(e)) => t.saturating_sub(e),
            _ => self.at.saturating_duration_since(earlier.at),
        }
    }

    pub fn field(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// A numeric field; panics with the line if it is missing or not a number.
    pub fn num(&self, key: &str) -> u64 {
        self.field(key)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric field {key} in log line: {}", self.raw))
    }

    pub fn pid(&self) -> u32 {
        self.num("pid") as u32
    }

    pub fn slot(&self) -> usize {
        self.num("slot") as usize
    }

    pub fn generation(&self) -> u32 {
        self.num("generation") as u32
    }

    /// The machine-readable name of the event (its `event=` field), e.g.
    /// `worker_ready`; `None` for a line that has none (a worker's output).
    pub fn event(&self) -> Option<&str> {
        self.field("event")
    }

    /// Whether the line is the event named by the first word of `pattern` and has every
    /// field that follows, written as the log writes them:
    /// `"worker_ready slot=1 generation=2"` is an `event="worker_ready"` line with
    /// `slot=1` and `generation=2`. The message's wording plays no part.
    ///
    /// Panics on a pattern that does not start with one event name (such as the
    /// message `worker ready`), so that no test can wait on phrasing by mistake.
    pub fn matches(&self, pattern: &str) -> bool {
        let (event, fields) = parse_pattern(pattern);
        self.event() == Some(event.as_str())
            && fields
                .iter()
                .all(|(k, v)| self.fields.get(k).is_some_and(|have| have == v))
    }
}

/// A pattern of [`LogLine::matches`]: its event name and fields. Panics unless it
/// starts with one event name.
fn parse_pattern(pattern: &str) -> (String, BTreeMap<String, String>) {
    let (event, fields) = split_message_fields(pattern);
    assert!(
        !event.is_empty()
            && event
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "a log pattern starts with an event name such as `worker_ready`, not {pattern:?}"
    );
    (event, fields)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

fn is_field_token(token: &str) -> bool {
    match token.split_once('=') {
        Some((key, _)) => {
            !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        }
        None => false,
    }
}

/// Splits `worker ready slot=0 pid=1` into the message and its fields. A token that is
/// not `key=value` after the first field continues the previous value (values such as
/// `error=No such file or directory (os error 2)` hold spaces).
fn split_message_fields(text: &str) -> (String, BTreeMap<String, String>) {
    let mut message: Vec<&str> = Vec::new();
    let mut fields: Vec<(String, String)> = Vec::new();
    for token in text.split_whitespace() {
        if is_field_token(token) {
            let (k, v) = token.split_once('=').unwrap();
            fields.push((k.to_string(), v.to_string()));
        } else if let Some((_, v)) = fields.last_mut() {
            v.push(' ');
            v.push_str(token);
        } else {
            message.push(token);
        }
    }
    let fields = fields
        .into_iter()
        .map(|(k, v)| {
            let v = match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
                Some(inner) => inner.to_string(),
                None => v,
            };
            (k, v)
        })
        .collect();
    (message.join(" "), fields)
}

/// Parses `2026-11-25T14:50:00.123456Z` into time since the Unix epoch.
fn parse_timestamp(token: &str) -> Option<Duration> {
    let token = token.strip_suffix('Z')?;
    let (date, time) = token.split_once('T')?;
    let mut ymd = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, d) = (ymd.next()??, ymd.next()??, ymd.next()??);
    let mut hms = time.splitn(3, ':');
    let (h, min) = (
        hms.next()?.parse::<u64>().ok()?,
        hms.next()?.parse::<u64>().ok()?,
    );
    let secs: f64 = hms.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some(Duration::from_secs(days * 86_400 + h * 3600 + min * 60) + Duration::from_secs_f64(secs))
}

/// The lines of a whole stderr text (of [`Cluster::run`]) that match `pattern` (see
/// [`LogLine::matches`]).
pub fn events_in(text: &str, pattern: &str) -> Vec<LogLine> {
    let at = Instant::now();
    text.lines()
        .enumerate()
        .map(|(i, raw)| parse_log_line(i, at, raw))
        .filter(|l| l.matches(pattern))
        .collect()
}

pub fn parse_log_line(index: usize, at: Instant, raw: &str) -> LogLine {
    let clean = strip_ansi(raw);
    let tokens: Vec<&str> = clean.split_whitespace().collect();
    const LEVELS: [&str; 5] = ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"];
    let level_at = tokens.iter().take(3).position(|t| LEVELS.contains(t));
    let (level, target, rest) = match level_at {
        Some(i) => {
            // After the level: optional spans (`name{k=v}:`) and the target (`a::b:`).
            let mut j = i + 1;
            let mut target = String::new();
            while j < tokens.len()
                && tokens[j].ends_with(':')
                && (tokens[j].contains('{') || !tokens[j].contains('='))
                && (tokens[j].contains("::") || tokens[j].contains('{') || j == i + 1)
            {
                target = tokens[j].trim_end_matches(':').to_string();
                j += 1;
            }
            (tokens[i].to_string(), target, tokens[j..].join(" "))
        }
        None => (String::new(), String::new(), clean.trim().to_string()),
    };
    let (message, fields) = if level.is_empty() {
        (rest, BTreeMap::new())
    } else {
        split_message_fields(&rest)
    };
    let time = match level_at {
        Some(i) if i > 0 => parse_timestamp(tokens[0]),
        _ => None,
    };
    LogLine {
        index,
        at,
        time,
        raw: raw.to_string(),
        level,
        target,
        message,
        fields,
    }
}

// ---------------------------------------------------------------------------------
// The master process
// ---------------------------------------------------------------------------------

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
}

impl Exit {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Environment variables that would change the master's behaviour behind a test's back.
const SCRUBBED_ENV: [&str; 6] = [
    "RUST_LOG",
    "NODE_ENV",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
];

/// Builder of a `recluster` command line.
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    args: Vec<OsString>,
    command: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
    cwd: Option<PathBuf>,
    no_separator: bool,
    /// Soft and hard `RLIMIT_NOFILE` of the master (set between fork and exec).
    nofile: Option<u64>,
    /// A program and its arguments that run the master (`unshare --pid --fork`).
    wrapper: Vec<OsString>,
}

/// `recluster --workers n --balance shared --listen 127.0.0.1:0 -- test_worker`.
pub fn shared_cluster(workers: usize) -> Cluster {
    Cluster::new()
        .workers(workers)
        .args(["--balance", "shared", "--listen", "127.0.0.1:0"])
}

impl Cluster {
    /// No options at all; the command defaults to the test worker.
    pub fn new() -> Cluster {
        Cluster::default()
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Cluster {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Cluster {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn workers(self, n: usize) -> Cluster {
        self.arg("--workers").arg(n.to_string())
    }

    /// Environment of the master (and so of its workers).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Cluster {
        self.envs
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// The worker command (after `--`); the default is the test worker.
    pub fn command<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, cmd: I) -> Cluster {
        self.command = cmd.into_iter().map(|a| a.as_ref().to_owned()).collect();
        self
    }

    /// Passes the arguments as they are: no `--`, no default command.
    pub fn raw(mut self) -> Cluster {
        self.no_separator = true;
        self
    }

    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> Cluster {
        self.cwd = Some(dir.as_ref().to_owned());
        self
    }

    /// Starts the master with `ulimit -n` = `soft` (the hard limit is kept, so the limit
    /// can be raised again from outside with [`set_nofile`]). Workers inherit it.
    pub fn nofile(mut self, soft: u64) -> Cluster {
        self.nofile = Some(soft);
        self
    }

    /// Runs the master under a program that execs or forks it, such as
    /// `unshare --pid --fork`: [`Master::pid`] is then that program's pid.
    pub fn wrapped_in<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, wrapper: I) -> Cluster {
        self.wrapper = wrapper.into_iter().map(|a| a.as_ref().to_owned()).collect();
        self
    }

    fn command_line(&self) -> Command {
        let mut cmd = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(recluster_bin());
                cmd
            }
            None => Command::new(recluster_bin()),
        };
        cmd.args(&self.args);
        if !self.no_separator {
            cmd.arg("--");
            if self.command.is_empty() {
                cmd.arg(test_worker());
            } else {
                cmd.args(&self.command);
            }
        }
        for (k, _) in std::env::vars_os() {
            let name = k.to_string_lossy();
            if name.starts_with("RECLUSTER_")
                || name.starts_with("TEST_WORKER_")
                || SCRUBBED_ENV.contains(&name.as_ref())
            {
                cmd.env_remove(&k);
            }
        }
        // Control sockets of the suite's masters in a directory of this test process,
        // not in the machine's default one (a test may set its own).
        cmd.env(
            "RECLUSTER_CONTROL_DIR",
            std::env::temp_dir().join(format!("recluster-tests-{}", std::process::id())),
        );
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        if let Some(soft) = self.nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: getrlimit/setrlimit are async-signal-safe system calls on plain data.
            unsafe {
                cmd.pre_exec(move || {
                    let mut lim: libc::rlimit = std::mem::zeroed();
                    if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    lim.rlim_cur = soft.min(lim.rlim_max);
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        cmd.stdin(Stdio::null());
        cmd
    }

    /// Starts the master, its stderr followed by the harness.
    pub fn spawn(&self) -> Master {
        self.spawn_with_stdout(Stdio::null())
    }

    /// Starts the master with `stdout` as its stdout (with `Stdio::piped()`, see
    /// [`Master::take_stdout`]), its stderr followed by the harness.
    pub fn spawn_with_stdout(&self, stdout: Stdio) -> Master {
        let mut cmd = self.command_line();
        cmd.stdout(stdout).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", recluster_bin().display()));
        let pid = child.id();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Log::default());
        {
            let log = log.clone();
            std::thread::spawn(move || log.follow(pid, stderr));
        }
        let exit = Arc::new(ExitCell::default());
        {
            let exit = exit.clone();
            std::thread::spawn(move || exit.reap(pid));
        }
        Master {
            pid,
            log,
            exit,
            _child: child,
        }
    }

    /// Runs the master to its end (for command-line errors): `None` if it is still
    /// running after `timeout` (it is killed then).
    pub fn run(&self, timeout: Duration) -> Option<(Exit, String)> {
        let master = self.spawn();
        let exit = master.wait_exit(timeout);
        // The reader thread may still be draining the pipe.
        let _ = master.log.wait_eof(Duration::from_secs(5));
        let stderr = master.stderr_text();
        exit.map(|e| (e, stderr))
    }
}

#[derive(Default)]
struct Log {
    lines: Mutex<LogState>,
    changed: Condvar,
}

#[derive(Default)]
struct LogState {
    lines: Vec<LogLine>,
    eof: bool,
}

impl Log {
    /// The lines, even after a panic under the lock (a test's predicate): the harness
    /// must still read them to report and to clean up.
    fn state(&self) -> MutexGuard<'_, LogState> {
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn follow(&self, pid: u32, stderr: impl Read) {
        let mut reader = BufReader::new(stderr);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let raw = String::from_utf8_lossy(&buf);
                    let raw = raw.trim_end_matches(['\n', '\r']);
                    // Shown by the test harness when a test fails.
                    eprintln!("[recluster {pid}] {raw}");
                    let mut state = self.state();
                    let index = state.lines.len();
                    state.lines.push(parse_log_line(index, Instant::now(), raw));
                    self.changed.notify_all();
                }
            }
        }
        self.state().eof = true;
        self.changed.notify_all();
    }

    fn wait_eof(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        while !state.eof {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

/// The master's exit status, filled by a thread that waits for it. The thread waits
/// with WNOWAIT and reaps under the lock, so a signal sent under the lock while the
/// status is empty cannot reach a recycled pid.
#[derive(Default)]
struct ExitCell {
    status: Mutex<Option<Exit>>,
    changed: Condvar,
}

impl ExitCell {
    fn reap(&self, pid: u32) {
        loop {
            // SAFETY: siginfo is plain data, filled by waitid.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let rc = unsafe {
                libc::waitid(
                    libc::P_PID,
                    pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        let mut status = self.status.lock().unwrap();
        let mut raw: libc::c_int = 0;
        // SAFETY: waitpid on our own child; it has exited, so this does not block.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut raw, 0) };
        *status = Some(if rc != pid as libc::pid_t {
            Exit {
                code: None,
                signal: None,
            }
        } else if libc::WIFEXITED(raw) {
            Exit {
                code: Some(libc::WEXITSTATUS(raw)),
                signal: None,
            }
        } else {
            Exit {
                code: None,
                signal: Some(libc::WTERMSIG(raw)),
            }
        });
        self.changed.notify_all();
    }
}

/// The master's `balancer_totals` line.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalancerTotals {
    pub accepted: u64,
    pub handed: u64,
    pub closed: u64,
    pub reclaimed: u64,
    pub full: u64,
    pub fallbacks: u64,
    pub accept_errors: u64,
}

/// A running `recluster` master. Dropping it kills the master (SIGKILL) and its
/// remaining workers.
pub struct Master {
    pub pid: u32,
    log: Arc<Log>,
    exit: Arc<ExitCell>,
    _child: Child,
}

impl Master {
    /// The read end of the master's stdout, when it was spawned with `Stdio::piped()`.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self._child.stdout.take()
    }

    /// Every line read so far.
    pub fn lines(&self) -> Vec<LogLine> {
        self.log.state().lines.clone()
    }

    /// Sends SIGUSR2 and waits for the reload to `generation` to finish.
    pub fn reload_to(&self, generation: u32) -> LogLine {
        let mark = self.mark();
        self.signal(nix::sys::signal::Signal::SIGUSR2);
        self.wait_event_after(
            mark,
            &format!("reload_finished generation={generation}"),
            DEADLINE,
        )
    }

    /// Number of lines read so far: a mark for [`Master::wait_event_after`].
    pub fn mark(&self) -> usize {
        self.log.state().lines.len()
    }

    /// The whole stderr so far.
    pub fn stderr_text(&self) -> String {
        self.lines()
            .iter()
            .map(|l| l.raw.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Lines matching a pattern (see [`LogLine::matches`]).
    pub fn events(&self, pattern: &str) -> Vec<LogLine> {
        self.lines()
            .into_iter()
            .filter(|l| l.matches(pattern))
            .collect()
    }

    /// The first line at or after `from` satisfying `pred`, waiting up to `timeout`.
    pub fn try_wait_for_after(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&LogLine) -> bool,
    ) -> Option<LogLine> {
        let deadline = Instant::now() + timeout;
        let mut next = from;
        let mut state = self.log.state();
        loop {
            if let Some(line) = state.lines[next.min(state.lines.len())..]
                .iter()
                .find(|l| pred(l))
            {
                return Some(line.clone());
            }
            next = next.max(state.lines.len());
            let now = Instant::now();
            if now >= deadline || state.eof {
                return None;
            }
            state = self
                .log
                .changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Like [`Master::try_wait_for_after`], but panics with the log on timeout.
    pub fn wait_for_after(
        &self,
        from: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&LogLine) -> bool,
    ) -> LogLine {
        match self.try_wait_for_after(from, timeout, pred) {
            Some(line) => line,
            None => panic!(
                "no log line {what} (from line {from}) within {timeout:?}{}\n--- master log ---\n{}",
                if self.log.state().eof {
                    " (stderr closed)"
                } else {
                    ""
                },
                self.stderr_text()
            ),
        }
    }

    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&LogLine) -> bool,
    ) -> LogLine {
        self.wait_for_after(0, what, timeout, pred)
    }

    /// Waits for a line matching `pattern` (see [`LogLine::matches`]), e.g.
    /// `"reload_finished generation=2"`.
    pub fn wait_event(&self, pattern: &str, timeout: Duration) -> LogLine {
        self.wait_event_after(0, pattern, timeout)
    }

    pub fn wait_event_after(&self, from: usize, pattern: &str, timeout: Duration) -> LogLine {
        parse_pattern(pattern);
        self.wait_for_after(from, &format!("`{pattern}`"), timeout, |l| {
            l.matches(pattern)
        })
    }

    pub fn try_wait_event_after(
        &self,
        from: usize,
        pattern: &str,
        timeout: Duration,
    ) -> Option<LogLine> {
        parse_pattern(pattern);
        self.try_wait_for_after(from, timeout, |l| l.matches(pattern))
    }

    /// The `balancer_totals` line (logged just before `terminated` in rr/sticky).
    pub fn balancer_totals(&self, timeout: Duration) -> BalancerTotals {
        let line = self.wait_event("balancer_totals", timeout);
        BalancerTotals {
            accepted: line.num("accepted"),
            handed: line.num("handed"),
            closed: line.num("closed"),
            reclaimed: line.num("reclaimed"),
            full: line.num("full"),
            fallbacks: line.num("fallbacks"),
            accept_errors: line.num("accept_errors"),
        }
    }

    /// The bound addresses, by `index`, once `count` `listening` events were logged.
    pub fn listen_addrs(&self, count: usize) -> Vec<SocketAddr> {
        let mut addrs = Vec::new();
        for index in 0..count {
            let line = self.wait_event(&format!("listening index={index}"), DEADLINE);
            let addr: SocketAddr = line
                .field("addr")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("bad addr in: {}", line.raw));
            addrs.push(addr);
        }
        addrs
    }

    /// The one listening address.
    pub fn addr(&self) -> SocketAddr {
        self.listen_addrs(1)[0]
    }

    /// The address of the `--metrics` endpoint, from its `metrics_listening` line.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.wait_event("metrics_listening", DEADLINE)
            .field("addr")
            .expect("metrics_listening has addr=")
            .parse()
            .expect("a socket address")
    }

    /// Waits for `cluster_ready generation=1` and returns the ready worker of each
    /// slot, `slot → pid`.
    pub fn wait_cluster_ready(&self, workers: usize) -> BTreeMap<usize, u32> {
        self.wait_event(
            &format!("cluster_ready generation=1 workers={workers}"),
            DEADLINE,
        );
        let ready = self.ready_workers(1);
        assert_eq!(
            ready.len(),
            workers,
            "cluster ready, but ready workers of generation 1 are {ready:?}\n{}",
            self.stderr_text()
        );
        ready
    }

    /// `slot → pid` of the workers of `generation` logged ready (the latest per slot).
    pub fn ready_workers(&self, generation: u32) -> BTreeMap<usize, u32> {
        self.events(&format!("worker_ready generation={generation}"))
            .iter()
            .map(|l| (l.slot(), l.pid()))
            .collect()
    }

    /// Every worker pid the master reported spawning.
    pub fn spawned_pids(&self) -> Vec<u32> {
        self.events("worker_spawned")
            .iter()
            .map(LogLine::pid)
            .collect()
    }

    /// Spawned workers that are still alive (not zombies).
    pub fn live_worker_pids(&self) -> Vec<u32> {
        self.spawned_pids()
            .into_iter()
            .filter(|&p| pid_alive(p))
            .collect()
    }

    pub fn signal(&self, signal: Signal) {
        let status = self.exit.status.lock().unwrap();
        if status.is_none() {
            kill(Pid::from_raw(self.pid as i32), signal)
                .unwrap_or_else(|e| panic!("kill({}, {signal:?}): {e}", self.pid));
        }
    }

    /// The exit status, if the master has exited.
    pub fn exit_status(&self) -> Option<Exit> {
        *self.exit.status.lock().unwrap()
    }

    /// Waits for the master to exit.
    pub fn wait_exit(&self, timeout: Duration) -> Option<Exit> {
        let deadline = Instant::now() + timeout;
        let mut status = self.exit.status.lock().unwrap();
        loop {
            if let Some(exit) = *status {
                return Some(exit);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            status = self
                .exit
                .changed
                .wait_timeout(status, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Waits for the master to exit; panics with the log on timeout.
    pub fn expect_exit(&self, timeout: Duration) -> Exit {
        self.wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "master still running after {timeout:?}\n--- master log ---\n{}",
                self.stderr_text()
            )
        })
    }
}

impl Drop for Master {
    fn drop(&mut self) {
        // Workers still attached to this master: kill their process groups first, so a
        // missing PR_SET_PDEATHSIG cannot leak them.
        if self.exit_status().is_none() {
            for pid in self.live_worker_pids() {
                if parent_pid(pid) == Some(self.pid) {
                    let _ = kill(Pid::from_raw(-(pid as i32)), Signal::SIGKILL);
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                }
            }
        }
        let status = self.exit.status.lock().unwrap();
        if status.is_none() {
            let _ = kill(Pid::from_raw(self.pid as i32), Signal::SIGKILL);
        }
        drop(status);
        let _ = self.wait_exit(Duration::from_secs(10));
    }
}

// ---------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------

fn proc_stat(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = &stat[stat.rfind(')')? + 1..];
    Some(after.split_whitespace().map(str::to_string).collect())
}

/// The process exists and one of its threads at least is not a zombie. (A process
/// whose main thread has exited shows `Z` in /proc/<pid>/stat while its other threads,
/// and so its descriptors, may still be alive.)
pub fn pid_alive(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|task| {
        std::fs::read_to_string(task.path().join("stat"))
            .ok()
            .and_then(|stat| {
                let state = stat[stat.rfind(')')? + 1..].split_whitespace().next()?;
                Some(!matches!(state, "Z" | "X"))
            })
            .unwrap_or(false)
    })
}

pub fn parent_pid(pid: u32) -> Option<u32> {
    proc_stat(pid)?.get(1)?.parse().ok()
}

pub fn process_group(pid: u32) -> Option<u32> {
    proc_stat(pid)?.get(2)?.parse().ok()
}

/// CPU time (user + system) the process has used, from /proc/<pid>/stat.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = proc_stat(pid)?;
    // Fields 14 and 15 of stat(5); the vector starts at field 3 (state).
    let ticks: u64 = stat.get(11)?.parse::<u64>().ok()? + stat.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_millis(ticks * 1000 / hz))
}

/// The open descriptors of a process (0 if it is gone).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The descriptor numbers a process has open, sorted.
pub fn fd_numbers(pid: u32) -> Vec<i32> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    fds.sort_unstable();
    fds
}

/// The lowest descriptor number the process has free: the number its next
/// `open`/`accept` would get.
pub fn lowest_free_fd(pid: u32) -> u64 {
    let fds = fd_numbers(pid);
    (0u64..)
        .find(|n| fds.binary_search(&(*n as i32)).is_err())
        .unwrap_or(0)
}

/// Resident set size of a process, in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Sets the soft `RLIMIT_NOFILE` of a running process (prlimit(2)); returns the old one.
pub fn set_nofile(pid: u32, soft: u64) -> u64 {
    // SAFETY: prlimit on plain data; reading the old limit first.
    unsafe {
        let mut old: libc::rlimit = std::mem::zeroed();
        let rc = libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        );
        assert_eq!(rc, 0, "prlimit({pid}): {}", std::io::Error::last_os_error());
        let new = libc::rlimit {
            rlim_cur: soft.min(old.rlim_max),
            rlim_max: old.rlim_max,
        };
        let rc = libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        );
        assert_eq!(
            rc,
            0,
            "prlimit({pid}, {soft}): {}",
            std::io::Error::last_os_error()
        );
        old.rlim_cur
    }
}

/// Every live process (not a zombie) whose parent is `pid`.
pub fn children_of(pid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&p| parent_pid(p) == Some(pid) && pid_alive(p))
        .collect()
}

/// Every live process whose environment holds `key=value` (own user's processes only).
/// Tests tag a master with a unique variable to find every process it ever started,
/// including ones the log never named.
pub fn pids_with_env(key: &str, value: &str) -> Vec<u32> {
    let wanted = format!("{key}={value}");
    all_pids()
        .into_iter()
        .filter(|&p| {
            std::fs::read(format!("/proc/{p}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|v| v == wanted.as_bytes()))
                .unwrap_or(false)
                && pid_alive(p)
        })
        .collect()
}

fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A tag unique to this call in this test process, for [`pids_with_env`].
pub fn unique_tag(what: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{what}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A small pseudo-random generator (xorshift64*), seeded and printed by tests so a
/// failing run can be repeated.
pub struct Rng(u64);

impl Rng {
    /// Seeded from `FAULTS_SEED` when set, else from the clock.
    pub fn from_env_or_clock() -> Rng {
        let seed = std::env::var("FAULTS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        Rng::new(seed)
    }

    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn seed(&self) -> u64 {
        self.0
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

// ---------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------

/// The line a worker answers with (`id=… pid=… gen=… …`).
#[derive(Clone, Debug)]
pub struct Reply {
    pub id: usize,
    pub pid: u32,
    pub gen: u32,
    /// `fds=` of the test worker: its descriptors at start.
    pub fds: Option<Vec<i32>>,
    pub listen_pid_ok: Option<bool>,
    pub fields: BTreeMap<String, String>,
    pub raw: String,
}

impl Reply {
    pub fn parse(line: &str) -> Option<Reply> {
        let fields: BTreeMap<String, String> = line
            .split_whitespace()
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Some(Reply {
            id: fields.get("id")?.parse().ok()?,
            pid: fields.get("pid")?.parse().ok()?,
            gen: fields.get("gen")?.parse().ok()?,
            fds: fields
                .get("fds")
                .map(|v| v.split(',').filter_map(|f| f.parse().ok()).collect()),
            listen_pid_ok: fields.get("listen_pid_ok").and_then(|v| v.parse().ok()),
            raw: line.to_string(),
            fields,
        })
    }
}

/// Why a request failed, as a short stable key (`connect: ConnectionRefused`, …).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Failure(pub String);

/// One request: connect, read the reply line until EOF, close.
pub fn request(addr: SocketAddr) -> Result<Reply, Failure> {
    request_with(addr, Duration::from_secs(10))
}

pub fn request_with(addr: SocketAddr, timeout: Duration) -> Result<Reply, Failure> {
    request_from(addr, None, false, timeout)
}

/// One request from source address `src` (any when `None`): connect, half-close when
/// `half_close` (workers that echo until EOF, like `examples/echo`, answer and close),
/// read the reply line until EOF, close.
/// `python3`, if it has `socket.send_fds`/`recv_fds` (3.9+), for the Python workers.
pub fn python3_with_recv_fds() -> Option<String> {
    let py = which("python3")?;
    let ok = std::process::Command::new(&py)
        .args(["-c", "import socket; socket.send_fds; socket.recv_fds"])
        .status()
        .ok()?
        .success();
    ok.then(|| py.display().to_string())
}

/// The quick-start echo worker (`examples/echo.rs`), built by `cargo test`.
pub fn echo() -> String {
    example_bin("echo").display().to_string()
}

/// `tests/workers/channel_worker.py` under Python 3.9+, or `None` (the test says it
/// is skipped) where there is none.
pub fn channel_worker() -> Option<Vec<String>> {
    let Some(py) = python3_with_recv_fds() else {
        skip("no python3 with socket.recv_fds (3.9+) on this machine");
        return None;
    };
    let script = manifest_dir().join("tests/workers/channel_worker.py");
    Some(vec![py, script.display().to_string()])
}

pub fn request_from(
    addr: SocketAddr,
    src: Option<std::net::Ipv4Addr>,
    half_close: bool,
    timeout: Duration,
) -> Result<Reply, Failure> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .map_err(|e| Failure(format!("socket: {:?}", e.kind())))?;
    if let Some(ip) = src {
        sock.bind(&SocketAddr::from((ip, 0)).into())
            .map_err(|e| Failure(format!("bind: {:?}", e.kind())))?;
    }
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))
        .map_err(|e| Failure(format!("connect: {:?}", e.kind())))?;
    let mut stream: TcpStream = sock.into();
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| Failure(format!("setsockopt: {:?}", e.kind())))?;
    if half_close {
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
    let mut buf = Vec::new();
    let result = stream.read_to_end(&mut buf);
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
    if let Err(e) = result {
        return Err(Failure(format!(
            "read: {:?}{}",
            e.kind(),
            if buf.is_empty() { "" } else { " (partial)" }
        )));
    }
    let text = String::from_utf8_lossy(&buf);
    if text.is_empty() {
        return Err(Failure("eof without reply".into()));
    }
    let Some((line, _)) = text.split_once('\n') else {
        return Err(Failure("truncated reply".into()));
    };
    Reply::parse(line).ok_or_else(|| Failure(format!("malformed reply {text:?}")))
}

/// Source address `i` of a load: 127.0.0.1 ..= 127.0.0.250.
pub fn source_ip(i: usize) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::new(127, 0, 0, (1 + i % 250) as u8)
}

/// Requests one after another until `done(&replies)` or `timeout`; every request must
/// succeed. Returns the replies.
pub fn requests_until(
    addr: SocketAddr,
    timeout: Duration,
    what: &str,
    mut done: impl FnMut(&[Reply]) -> bool,
) -> Vec<Reply> {
    let deadline = Instant::now() + timeout;
    let mut replies = Vec::new();
    loop {
        match request(addr) {
            Ok(r) => replies.push(r),
            Err(f) => panic!("request {} to {addr} failed: {f:?}", replies.len() + 1),
        }
        if done(&replies) {
            return replies;
        }
        assert!(
            Instant::now() < deadline,
            "not {what} within {timeout:?} after {} replies; last ones: {:#?}",
            replies.len(),
            &replies[replies.len().saturating_sub(5)..]
        );
    }
}

/// Requests until every slot in `0..workers` has answered; returns `slot → reply`.
pub fn collect_ids(addr: SocketAddr, workers: usize, timeout: Duration) -> BTreeMap<usize, Reply> {
    let mut seen = BTreeMap::new();
    requests_until(
        addr,
        timeout,
        &format!("served by all {workers} slots"),
        |replies| {
            let r = replies.last().unwrap();
            seen.entry(r.id).or_insert_with(|| r.clone());
            seen.len() >= workers
        },
    );
    seen
}

// ---------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------

/// Sum of what a load's clients saw.
#[derive(Clone, Debug, Default)]
pub struct LoadTotals {
    pub ok: u64,
    pub failures: BTreeMap<String, u64>,
    /// Replies per worker generation and per worker id.
    pub by_gen: BTreeMap<u32, u64>,
    pub by_id: BTreeMap<usize, u64>,
    /// The worker ids that served each source address (loads with `sources`).
    pub by_source: BTreeMap<std::net::Ipv4Addr, BTreeSet<usize>>,
    pub pids: BTreeSet<u32>,
    /// The first few failures, with when they happened (since the load started).
    pub first_failures: Vec<(Duration, String)>,
    /// When every failure happened (since the load started), up to 100 000 of them.
    pub failure_times: Vec<Duration>,
    pub elapsed: Duration,
}

impl LoadTotals {
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    fn merge(&mut self, other: LoadTotals) {
        self.ok += other.ok;
        for (k, v) in other.failures {
            *self.failures.entry(k).or_default() += v;
        }
        for (k, v) in other.by_gen {
            *self.by_gen.entry(k).or_default() += v;
        }
        for (k, v) in other.by_id {
            *self.by_id.entry(k).or_default() += v;
        }
        for (k, v) in other.by_source {
            self.by_source.entry(k).or_default().extend(v);
        }
        self.pids.extend(other.pids);
        self.first_failures.extend(other.first_failures);
        self.first_failures.sort();
        self.first_failures.truncate(10);
        self.failure_times.extend(other.failure_times);
        self.failure_times.sort();
    }
}

/// How a load's clients talk (see [`request_from`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    /// Client requests cycle over source addresses 127.0.0.1..=127.0.0.`sources`
    /// (0: the kernel's choice). `sticky` hashes the client IP: it needs several.
    pub sources: usize,
    /// Half-close after connecting (for workers that echo until EOF).
    pub half_close: bool,
}

/// `threads` clients, each making new-connection requests in a loop until stopped.
/// Bounded by itself: a client stops after [`Load::MAX_DURATION`].
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    started: Instant,
    threads: Vec<JoinHandle<LoadTotals>>,
}

impl Load {
    pub const MAX_DURATION: Duration = Duration::from_secs(300);

    pub fn start(addr: SocketAddr, threads: usize) -> Load {
        Load::start_with(addr, threads, LoadOptions::default())
    }

    pub fn start_with(addr: SocketAddr, threads: usize, options: LoadOptions) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let threads = (0..threads)
            .map(|t| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    let mut totals = LoadTotals::default();
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < Load::MAX_DURATION {
                        let src = (options.sources > 0).then(|| source_ip(i % options.sources));
                        let result = if options.sources == 0 && !options.half_close {
                            request(addr)
                        } else {
                            i += threads;
                            request_from(addr, src, options.half_close, Duration::from_secs(10))
                        };
                        match result {
                            Ok(reply) => {
                                if let Some(ip) = src {
                                    totals.by_source.entry(ip).or_default().insert(reply.id);
                                }
                                totals.ok += 1;
                                ok.fetch_add(1, Ordering::Relaxed);
                                *totals.by_gen.entry(reply.gen).or_default() += 1;
                                *totals.by_id.entry(reply.id).or_default() += 1;
                                totals.pids.insert(reply.pid);
                            }
                            Err(Failure(kind)) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                if totals.failure_times.len() < 100_000 {
                                    totals.failure_times.push(started.elapsed());
                                }
                                if totals.first_failures.len() < 10 {
                                    totals
                                        .first_failures
                                        .push((started.elapsed(), kind.clone()));
                                }
                                *totals.failures.entry(kind).or_default() += 1;
                            }
                        }
                    }
                    totals
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            started,
            threads,
        }
    }

    /// When the load started: failure times count from here.
    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn ok_so_far(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn failed_so_far(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests than now have succeeded; panics after `timeout`.
    pub fn wait_more_ok(&self, n: u64, timeout: Duration) {
        let target = self.ok_so_far() + n;
        assert!(
            poll_until(timeout, || self.ok_so_far() >= target),
            "load: fewer than {n} successful requests in {timeout:?} (ok {}, failed {})",
            self.ok_so_far(),
            self.failed_so_far()
        );
    }

    pub fn stop(mut self) -> LoadTotals {
        self.stop.store(true, Ordering::Relaxed);
        let mut totals = LoadTotals::default();
        for t in std::mem::take(&mut self.threads) {
            totals.merge(t.join().expect("load thread panicked"));
        }
        totals.elapsed = self.started.elapsed();
        totals
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `recluster ARGS` (a subcommand) as an operator would: none of the test's own
/// `RECLUSTER_*` variables, `control_dir` as the default control directory if given.
/// Fails the test if the command cannot run at all.
pub fn operator<S: AsRef<std::ffi::OsStr>>(
    control_dir: Option<&Path>,
    args: &[S],
) -> std::process::Output {
    let mut cmd = Command::new(recluster_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("RECLUSTER_") {
            cmd.env_remove(k);
        }
    }
    if let Some(dir) = control_dir {
        cmd.env("RECLUSTER_CONTROL_DIR", dir);
    }
    cmd.args(args).output().expect("run recluster")
}

/// [`operator`] that must succeed: its stdout.
pub fn operator_ok<S: AsRef<std::ffi::OsStr>>(control_dir: Option<&Path>, args: &[S]) -> String {
    let out = operator(control_dir, args);
    assert!(
        out.status.success(),
        "recluster {:?}: {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
