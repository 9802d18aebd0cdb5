//! What workers run: the command, how it is found, and the environment it gets.
//!
//! [`WorkerCommand`] is the library's description of the command; the builder checks
//! it once ([`resolve_program`]) so that a command that cannot run fails at start with
//! a typed error, not as a respawn loop. [`Launcher`] turns it into what `execve`
//! takes (argv, the environment every worker shares, the descriptors it inherits) and
//! starts each worker through [`super::launch::spawn`].

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::launch::{spawn, Contain, SpawnSpec};
use crate::error::CommandError;

/// Finds the program the way execvp would and checks that it can be executed.
///
/// A program containing `/` is used as given (relative to the current directory);
/// otherwise each `PATH` entry is tried in order (an empty entry meaning the current
/// directory), skipping missing files and directories, as execvp does. Errors are
/// typed, and each says in one line what to do.
pub(crate) fn resolve_program(
    program: &OsStr,
    path_var: Option<&OsString>,
) -> Result<PathBuf, CommandError> {
    let shown = program.to_string_lossy().into_owned();
    if program.is_empty() {
        return Err(CommandError::Empty);
    }
    if program.as_bytes().contains(&b'/') {
        let path = Path::new(program);
        return check_executable(path).map(|()| path.to_path_buf());
    }
    let path_var = match path_var {
        Some(p) if !p.is_empty() => p,
        _ => return Err(CommandError::NoPath { program: shown }),
    };
    let mut not_executable = None;
    for dir in std::env::split_paths(path_var) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        let candidate = dir.join(program);
        match std::fs::metadata(&candidate) {
            Ok(meta) if meta.is_file() => match check_executable(&candidate) {
                Ok(()) => return Ok(candidate),
                Err(e) => {
                    not_executable.get_or_insert(e);
                }
            },
            _ => continue,
        }
    }
    Err(not_executable.unwrap_or_else(|| CommandError::NotInPath {
        program: shown,
        path: path_var.to_string_lossy().into_owned(),
    }))
}

/// Checks that `path` is an existing regular file this process may execute.
fn check_executable(path: &Path) -> Result<(), CommandError> {
    let owned = || path.to_path_buf();
    let meta = match std::fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CommandError::Missing(owned()))
        }
        Err(source) => {
            return Err(CommandError::Inaccessible {
                path: owned(),
                source,
            })
        }
    };
    if meta.is_dir() {
        return Err(CommandError::Directory(owned()));
    }
    if !meta.is_file() {
        return Err(CommandError::NotRegular(owned()));
    }
    let c_path =
        CString::new(path.as_os_str().as_bytes()).map_err(|_| CommandError::Nul(owned()))?;
    // SAFETY: `c_path` is a valid NUL-terminated string.
    if unsafe { libc::access(c_path.as_ptr(), libc::X_OK) } != 0 {
        return Err(CommandError::NotExecutable {
            path: owned(),
            mode: meta.permissions().mode() & 0o7777,
        });
    }
    Ok(())
}

/// Starts workers: the command, the environment every worker shares, and the
/// descriptors it inherits; [`Launcher::launch`] adds the per-worker part.
pub(crate) struct Launcher {
    program: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
    listen_fds: Vec<RawFd>,
    /// `--via socket`: slot k's worker inherits `slot_fds[k]` instead of `listen_fds`.
    slot_fds: Vec<Vec<RawFd>>,
    /// Workers get a worker channel at fd 3 instead of the listening sockets.
    channel: bool,
    /// That channel is Node's cluster IPC: each worker gets its `NODE_UNIQUE_ID`.
    node: bool,
    /// Who workers run as; `None`: as the master.
    run_as: Option<crate::config::Credentials>,
}

impl Launcher {
    /// For `setup`'s command, in `shared` style (listening sockets at fds 3..) until
    /// [`Launcher::use_channel`].
    pub fn new(setup: &super::Setup, notify_path: &Path) -> Launcher {
        let program = CString::new(setup.program.as_os_str().as_bytes())
            .unwrap_or_else(|_| CString::from(c"/nonexistent-nul-in-path"));
        let argv = std::iter::once(setup.command.program.clone())
            .chain(setup.command.args.iter().cloned())
            .map(cstring)
            .collect();
        let mut vars: Vec<(OsString, OsString)> =
            std::env::vars_os().filter(|(k, _)| !withheld(k)).collect();
        // `--user`: the user's own HOME, USER and LOGNAME, as login and systemd set them
        // (a worker must not write into root's home); the command's env still wins.
        if let Some(user) = setup
            .run_as
            .and_then(|c| nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(c.uid)).ok().flatten())
        {
            for (k, v) in [
                ("HOME", user.dir.into_os_string()),
                ("USER", OsString::from(&user.name)),
                ("LOGNAME", OsString::from(&user.name)),
            ] {
                vars.retain(|(ek, _)| ek != k);
                vars.push((k.into(), v));
            }
        }
        for (k, v) in &setup.command.env {
            vars.retain(|(ek, _)| ek != k);
            vars.push((k.clone(), v.clone()));
        }
        let mut env: Vec<CString> = vars.into_iter().map(|(k, v)| assignment(&k, &v)).collect();
        env.push(assignment("RECLUSTER_WORKERS", setup.workers.to_string()));
        env.push(assignment("RECLUSTER_BALANCE", setup.balance.as_str()));
        env.push(assignment("NOTIFY_SOCKET", notify_path.as_os_str()));
        let listen_fds: Vec<RawFd> = setup.listeners.iter().map(|l| l.as_raw_fd()).collect();
        env.push(assignment("LISTEN_FDS", listen_fds.len().to_string()));
        let names: Vec<String> = (0..listen_fds.len())
            .map(|i| format!("listen{i}"))
            .collect();
        env.push(assignment("LISTEN_FDNAMES", names.join(":")));
        Launcher {
            program,
            argv,
            env,
            listen_fds,
            slot_fds: Vec::new(),
            channel: false,
            node: false,
            run_as: setup.run_as,
        }
    }

    /// Workers get a worker channel at fd 3 (`rr`/`sticky`) instead of the sockets.
    pub fn use_channel(&mut self) {
        self.channel = true;
        self.env.retain(|e| {
            !e.as_bytes().starts_with(b"LISTEN_FDS=")
                && !e.as_bytes().starts_with(b"LISTEN_FDNAMES=")
        });
        self.env.push(assignment("RECLUSTER_FD", "3"));
        self.env.push(assignment(
            "RECLUSTER_PROTOCOL",
            crate::channel::VERSION.to_string(),
        ));
    }

    /// Workers get Node's cluster IPC at fd 3 (`--via node`): `NODE_CHANNEL_FD` and,
    /// per worker, `NODE_UNIQUE_ID`, which make Node's `cluster.isWorker` true.
    pub fn use_node_channel(&mut self) {
        self.channel = true;
        self.node = true;
        self.env.retain(|e| {
            !e.as_bytes().starts_with(b"LISTEN_FDS=")
                && !e.as_bytes().starts_with(b"LISTEN_FDNAMES=")
        });
        self.env.push(assignment("NODE_CHANNEL_FD", "3"));
        self.env.push(assignment("NODE_CHANNEL_SERIALIZATION_MODE", "json"));
    }

    /// Each slot's worker inherits its own sockets (`--via socket`): `slots[k]` for slot
    /// k, one per listen address, in the same order as in `shared`.
    pub fn use_slot_sockets(&mut self, slots: Vec<Vec<RawFd>>) {
        self.slot_fds = slots;
    }

    /// Workers that inherit their listening sockets and run Node also get Node's cluster
    /// IPC right after them (`--via socket`), so that a server's `listen(port)` can be
    /// answered with the worker's own socket.
    pub fn add_node_channel(&mut self) {
        self.node = true;
        let at = 3 + self.slot_fds.first().map_or(self.listen_fds.len(), Vec::len);
        self.env.push(assignment("NODE_CHANNEL_FD", at.to_string()));
        self.env.push(assignment("NODE_CHANNEL_SERIALIZATION_MODE", "json"));
    }

    /// Workers started from now on get `RECLUSTER_WORKERS=n` (the cluster was scaled).
    pub fn set_workers(&mut self, n: usize) {
        self.env
            .retain(|e| !e.as_bytes().starts_with(b"RECLUSTER_WORKERS="));
        self.env.push(assignment("RECLUSTER_WORKERS", n.to_string()));
    }

    /// How many listening sockets a `shared` worker inherits.
    pub fn listen_fds(&self) -> usize {
        self.listen_fds.len()
    }

    /// Starts worker `unique` (a number never reused in this cluster) of `slot` and
    /// `generation`, with `channel_fd` (its end of the worker channel) at fd 3 when
    /// workers use one, `output` as its stdout and stderr when given (`--prefix`),
    /// contained as `contain` says; returns its pid.
    pub fn launch(
        &self,
        unique: u64,
        slot: usize,
        generation: u64,
        channel_fd: Option<RawFd>,
        output: Option<[RawFd; 2]>,
        contain: Contain<'_>,
    ) -> io::Result<u32> {
        let mut env = self.env.clone();
        env.push(assignment("WORKER_ID", slot.to_string()));
        env.push(assignment("RECLUSTER_GENERATION", generation.to_string()));
        if self.node {
            // Node's worker ids start at 1 (`cluster.worker.id`).
            env.push(assignment("NODE_UNIQUE_ID", (unique + 1).to_string()));
        }
        // The channel alone at fd 3 (`rr`/`sticky`), or the listening sockets from fd 3
        // on with Node's channel after them (`--via socket` running node).
        let fds: Vec<RawFd> = match channel_fd {
            Some(fd) if self.channel => vec![fd],
            _ => {
                let sockets = self.slot_fds.get(slot).unwrap_or(&self.listen_fds);
                sockets.iter().copied().chain(channel_fd).collect()
            }
        };
        let spec = SpawnSpec {
            program: &self.program,
            args: &self.argv,
            env: &env,
            fds: &fds,
            listen_pid: !self.channel,
            contain,
            run_as: self.run_as,
            output,
        };
        spawn(&spec)
    }
}

/// Variables the master sets for workers itself; inherited values are dropped, and so
/// is every inherited `RECLUSTER_*` (the master's own settings, such as
/// `RECLUSTER_LISTEN`, or those of a recluster this master runs under): a worker gets
/// only the variables documented for it.
const OWN_VARS: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WORKER_ID",
    // Node's IPC: set only for `--via node`, never inherited (a recluster started by
    // Node's `fork` must not hand its own channel's number to its workers).
    "NODE_CHANNEL_FD",
    "NODE_CHANNEL_SERIALIZATION_MODE",
    "NODE_UNIQUE_ID",
];

/// Whether an inherited variable is withheld from workers.
fn withheld(key: &std::ffi::OsStr) -> bool {
    key.as_bytes().starts_with(b"RECLUSTER_") || OWN_VARS.iter().any(|v| key == *v)
}

fn cstring(s: OsString) -> CString {
    // Interior NULs cannot be passed to execve; they cannot come from a command line either.
    CString::new(s.into_vec()).unwrap_or_default()
}

fn assignment(key: impl AsRef<std::ffi::OsStr>, value: impl AsRef<std::ffi::OsStr>) -> CString {
    let mut bytes = key.as_ref().as_bytes().to_vec();
    bytes.push(b'=');
    bytes.extend_from_slice(value.as_ref().as_bytes());
    CString::new(bytes).unwrap_or_default()
}

/// The program each worker runs, with its arguments and extra environment.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub(crate) program: OsString,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
}

impl WorkerCommand {
    /// A command running `program` (looked up in `PATH` when it has no `/`).
    pub fn new(program: impl Into<OsString>) -> WorkerCommand {
        WorkerCommand {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Adds one argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> WorkerCommand {
        self.args.push(arg.into());
        self
    }

    /// Adds several arguments.
    pub fn args<I, S>(mut self, args: I) -> WorkerCommand
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the workers, on top of the master's environment.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> WorkerCommand {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The program as given.
    pub fn program(&self) -> &OsStr {
        &self.program
    }

    /// Whether this is Node running a script file (`node [options] app.js …`): only then
    /// does Node become a cluster worker when given a channel. Code given inline (`-e`,
    /// `-p`) or a REPL does not, and would then fail to listen at all.
    pub(crate) fn runs_node_script(&self) -> bool {
        if crate::config::Via::for_program(&self.program) != crate::config::Via::Node {
            return false;
        }
        let args: Vec<&str> = self.args.iter().filter_map(|a| a.to_str()).collect();
        // `-e`, `-p`, `-i` alone or among other short flags (`-pe`), their long forms, `-`.
        let inline = |a: &str| match a.strip_prefix("--") {
            Some(long) => ["eval", "print", "interactive"]
                .iter()
                .any(|f| long == *f || long.starts_with(&format!("{f}="))),
            None => a == "-" || (a.starts_with('-') && a[1..].chars().any(|c| matches!(c, 'e' | 'p' | 'i'))),
        };
        !args.iter().any(|a| inline(a)) && args.iter().any(|a| !a.starts_with('-'))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_runs_a_script_only_with_a_file_and_no_inline_code() {
        let node = |args: &[&str]| WorkerCommand::new("/usr/bin/node").args(args).runs_node_script();
        assert!(node(&["app.js"]));
        assert!(node(&["--max-old-space-size=512", "-r", "dotenv/config", "app.js"]));
        for inline in [&["-e", "x"][..], &["-pe", "1"], &["--eval=1"], &["--print", "1"], &["-i"], &["-"], &[]] {
            assert!(!node(inline), "{inline:?}");
        }
        assert!(!WorkerCommand::new("python3").arg("app.js").runs_node_script());
    }
    use std::os::unix::fs::OpenOptionsExt;

    #[test]
    fn resolve_program_errors() {
        let dir = std::env::temp_dir().join(format!("recluster-spawn-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("plain");
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o644)
            .open(&plain)
            .unwrap();
        std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).unwrap();
        let path = |p: &Path| p.as_os_str().to_owned();

        let e = resolve_program(
            OsStr::new("recluster-no-such-cmd"),
            Some(&"/usr/bin:/bin".into()),
        );
        assert_eq!(
            e.unwrap_err().to_string(),
            "command `recluster-no-such-cmd` not found in PATH (/usr/bin:/bin); give a path or fix PATH"
        );
        let e = resolve_program(&path(&dir), None).unwrap_err().to_string();
        assert!(e.ends_with("is a directory, not an executable file"), "{e}");
        let e = resolve_program(&path(&dir.join("missing")), None)
            .unwrap_err()
            .to_string();
        assert!(e.ends_with("does not exist"), "{e}");
        // Root may execute anything with an x bit, but not a file without any.
        let e = resolve_program(&path(&plain), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.ends_with("is not executable (mode 0644): chmod +x it"),
            "{e}"
        );
        let e = resolve_program(OsStr::new("plain"), Some(&path(&dir)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not executable"), "{e}");
        assert!(resolve_program(OsStr::new("sh"), None)
            .unwrap_err()
            .to_string()
            .contains("PATH is not set"));

        assert_eq!(
            resolve_program(OsStr::new("sh"), Some(&"/nonexistent:/bin".into())).unwrap(),
            PathBuf::from("/bin/sh")
        );
        assert_eq!(
            resolve_program(OsStr::new("/bin/sh"), None).unwrap(),
            PathBuf::from("/bin/sh")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
