//! Why a cluster could not be built or run: each error says what to do about it.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::supervisor::SpawnError;

/// Why a cluster could not be built or run.
#[derive(Debug)]
pub enum Error {
    /// A setting is out of range or not supported.
    Config(ConfigError),
    /// The worker command cannot be executed.
    Command(CommandError),
    /// A listening address could not be bound.
    Listen {
        /// The address that could not be bound, as given.
        addr: SocketAddr,
        /// The operating system's reason.
        source: io::Error,
    },
    /// An operating-system call the master needs failed.
    Io {
        /// What the master was doing.
        context: &'static str,
        /// The operating system's reason.
        source: io::Error,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(e) => write!(f, "{e}"),
            Error::Command(e) => write!(f, "{e}"),
            // The source already names the address (see `listen::bind`).
            Error::Listen { source, .. } => write!(f, "{source}"),
            Error::Io { context, source } => write!(f, "{context}: {source}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Listen { source, .. } | Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// Zero worker slots.
    NoWorkers,
    /// `--balance shared` with a `--via` that needs the master to accept.
    ViaShared(crate::config::Via),
    /// `--via socket` with more slots than its kernel program can steer.
    ViaSocketSlots(usize),
    /// Socket activation with `--via socket`, which binds a group of sockets per slot.
    ActivatedViaSocket,
    /// `--proxy-protocol` where workers accept themselves (`shared`, `--via socket`).
    ProxyWorkersAccept,
    /// `--user` or `--group` while the master does not run as root.
    RunAsNeedsRoot,
    /// A `--listen` address that is none of the socket-activated ones.
    ActivatedMismatch {
        /// The `--listen` address.
        listen: SocketAddr,
        /// The addresses of the sockets the service manager passed.
        activated: Vec<SocketAddr>,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::NoWorkers => f.write_str("--workers must be at least 1"),
            ConfigError::ViaShared(via) => write!(
                f,
                "--balance shared cannot be combined with --via {via}: in shared mode the \
                 workers accept on the inherited socket themselves. Use --balance rr or \
                 sticky with --via {via}, or keep --balance shared and have the server \
                 listen on fd 3 (Node: server.listen({{fd: 3}}))"
            ),
            ConfigError::ViaSocketSlots(workers) => write!(
                f,
                "--via socket steers at most {} workers (the kernel's program limit), not \
                 {workers}: use fewer workers, --via channel, or --balance shared",
                crate::balance::steer::MAX_STEERED_SLOTS
            ),
            ConfigError::RunAsNeedsRoot => f.write_str(
                "--user and --group need the master to run as root (to switch the workers \
                 to another user); run it as root, or leave them out to run workers as yourself",
            ),
            ConfigError::ProxyWorkersAccept => f.write_str(
                "--proxy-protocol needs the master to accept (rr or sticky, with --via channel \
                 or node): with --balance shared or --via socket the workers read the header",
            ),
            ConfigError::ActivatedViaSocket => f.write_str(
                "--via socket binds a socket per slot itself and cannot serve sockets passed \
                 by the service manager (LISTEN_FDS): use --via channel, or drop the .socket unit",
            ),
            ConfigError::ActivatedMismatch { listen, activated } => {
                let list: Vec<String> = activated.iter().map(ToString::to_string).collect();
                write!(
                    f,
                    "--listen {listen} is not among the sockets the service manager passed \
                 (LISTEN_FDS: {}): make the .socket unit's ListenStream= and --listen agree, \
                 or leave --listen out",
                    list.join(", ")
                )
            }
        }
    }
}

/// Why the worker command cannot run; each message says what to do.
#[derive(Debug)]
pub enum CommandError {
    /// Nothing was given after `--`.
    Empty,
    /// A bare name, and `PATH` is unset or empty.
    NoPath {
        /// The program name as given after `--`.
        program: String,
    },
    /// A bare name found in no `PATH` directory.
    NotInPath {
        /// The program name as given after `--`.
        program: String,
        /// The `PATH` searched.
        path: String,
    },
    /// The file does not exist.
    Missing(PathBuf),
    /// The file cannot be looked at.
    Inaccessible {
        /// The file, as resolved.
        path: PathBuf,
        /// The operating system's reason.
        source: io::Error,
    },
    /// A directory, not a program.
    Directory(PathBuf),
    /// Neither a regular file nor a directory (a device, a socket…).
    NotRegular(PathBuf),
    /// The path holds a NUL byte, which `execve` cannot take.
    Nul(PathBuf),
    /// No execute permission.
    NotExecutable {
        /// The file, as resolved.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The first workers could not be executed (see [`SpawnError::cannot_execute`]).
    CannotExecute {
        /// The resolved program.
        program: PathBuf,
        /// Why.
        error: SpawnError,
    },
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::Empty => {
                f.write_str("the command is empty: give a program to run after `--`")
            }
            CommandError::NoPath { program } => write!(
                f,
                "command `{program}` not found: PATH is not set; give a path or set PATH"
            ),
            CommandError::NotInPath { program, path } => write!(
                f,
                "command `{program}` not found in PATH ({path}); give a path or fix PATH"
            ),
            CommandError::Missing(p) => write!(f, "`{}` does not exist", p.display()),
            CommandError::Inaccessible { path, source } => {
                write!(f, "cannot access `{}`: {source}", path.display())
            }
            CommandError::Directory(p) => {
                write!(
                    f,
                    "`{}` is a directory, not an executable file",
                    p.display()
                )
            }
            CommandError::NotRegular(p) => write!(f, "`{}` is not a regular file", p.display()),
            CommandError::Nul(p) => write!(f, "`{}` contains a NUL byte", p.display()),
            CommandError::NotExecutable { path, mode } => write!(
                f,
                "`{}` is not executable (mode {mode:04o}): chmod +x it",
                path.display()
            ),
            CommandError::CannotExecute { program, error } => {
                write!(f, "cannot execute {}: {error}", program.display())
            }
        }
    }
}
