//! Why a cluster could not be built or run: each error says what to do about it.

use std::fmt;
use std::io;
use std::net::SocketAddr;

/// Why a cluster could not be built or run.
#[derive(Debug)]
pub enum Error {
    /// A setting is out of range or not supported; the text says which and what to use.
    Config(String),
    /// The worker command cannot be executed; the text says why and what to do.
    Command(String),
    /// A listening address could not be bound.
    Listen {
        /// The address.
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
            Error::Config(msg) | Error::Command(msg) => f.write_str(msg),
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
