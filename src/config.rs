//! The settings of a cluster, their defaults, and the values they take.
//!
//! These are recluster's options (DESIGN §4) with the same defaults: the CLI parses
//! into them and [`crate::ClusterBuilder`] carries them, so the two never disagree.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How accepted connections reach workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Balance {
    /// The master accepts and hands each connection to the next ready worker.
    #[default]
    RoundRobin,
    /// The master accepts and picks the worker from a hash of the client IP.
    Sticky,
    /// Every worker accepts on the inherited listening socket itself (systemd style).
    Shared,
}

impl Balance {
    /// The name used on the command line and in `RECLUSTER_BALANCE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "rr",
            Balance::Sticky => "sticky",
            Balance::Shared => "shared",
        }
    }
}

impl fmt::Display for Balance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rr" | "round-robin" => Ok(Balance::RoundRobin),
            "sticky" => Ok(Balance::Sticky),
            "shared" => Ok(Balance::Shared),
            _ => Err(format!("expected rr, sticky or shared, got `{s}`")),
        }
    }
}

/// How a worker receives the connections the master accepted (`--via`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Via {
    /// recluster's worker channel: the worker library, or its protocol (docs/PROTOCOL.md).
    #[default]
    Channel,
    /// Node's own cluster IPC: an unmodified Node server's `listen(port)` (docs/NODE.md).
    Node,
    /// Per-slot SO_REUSEPORT sockets balanced in the kernel (not available yet).
    Socket,
}

impl Via {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Channel => "channel",
            Via::Node => "node",
            Via::Socket => "socket",
        }
    }

    /// The delivery an unset `--via` means for `program`: `node` for Node itself.
    pub fn for_program(program: &std::ffi::OsStr) -> Via {
        let base = std::path::Path::new(program).file_name();
        match base.and_then(|b| b.to_str()) {
            Some("node" | "nodejs") => Via::Node,
            _ => Via::Channel,
        }
    }
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Via {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "channel" => Ok(Via::Channel),
            "node" => Ok(Via::Node),
            "socket" => Ok(Via::Socket),
            _ => Err(format!("expected channel, node or socket, got `{s}`")),
        }
    }
}

/// When a new worker counts as ready to take connections (recluster's `readyWhen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ReadyWhen {
    /// As soon as the process has been spawned.
    Started,
    /// When the worker listens (its library says so, or /proc shows it in `shared`).
    #[default]
    Listening,
    /// When the worker says `ready` explicitly (worker channel or `READY=1` sd_notify).
    Ready,
}

impl ReadyWhen {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ReadyWhen::Started => "started",
            ReadyWhen::Listening => "listening",
            ReadyWhen::Ready => "ready",
        }
    }
}

impl fmt::Display for ReadyWhen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ReadyWhen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "started" => Ok(ReadyWhen::Started),
            "listening" => Ok(ReadyWhen::Listening),
            "ready" => Ok(ReadyWhen::Ready),
            _ => Err(format!("expected started, listening or ready, got `{s}`")),
        }
    }
}

/// The timing rules of the supervisor core: everything it needs besides events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a retiring worker has between the stop signal and SIGKILL.
    pub timeout: Duration,
    /// The first delay before a dead worker's slot is respawned.
    pub respawn: Duration,
    /// The most the respawn delay doubles up to, and the uptime that resets it; zero disables doubling.
    pub backoff: Duration,
    /// How long a new worker may take to become ready before it is stopped and retried.
    pub ready_timeout: Duration,
    /// How long an active worker may leave a connection unread before it is replaced; zero: never.
    pub stuck_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            timeout: default_timeout(),
            respawn: Duration::from_secs(1),
            backoff: Duration::ZERO,
            ready_timeout: DEFAULT_READY_TIMEOUT,
            stuck_timeout: DEFAULT_STUCK_TIMEOUT,
        }
    }
}

/// How a reload rolls through the slots (`--reload-batch`, `--reload-abort-after`);
/// the default replaces every slot at once and never gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RollingReload {
    /// Most slots mid-replacement at once, lowest slots first; zero: every slot at once.
    pub batch: usize,
    /// Failed starts in a row of a reload's new workers that abandon the reload (the
    /// slots not yet replaced keep their old workers); zero: never.
    pub abort_after: u32,
}

/// Default `--ready-timeout`: long enough for slow starters, short enough that a stuck reload shows.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Default `--stuck-timeout`: far beyond any healthy event loop's pause, short enough
/// that a stuck worker's clients are served elsewhere within seconds.
pub const DEFAULT_STUCK_TIMEOUT: Duration = Duration::from_secs(10);

/// Default listen backlog, as nginx and Node use.
pub const DEFAULT_BACKLOG: i32 = 511;

/// True when `RECLUSTER_ENV` or `NODE_ENV` says `production` (recluster's rule).
pub fn is_production() -> bool {
    ["RECLUSTER_ENV", "NODE_ENV"]
        .iter()
        .any(|k| std::env::var(k).map(|v| v == "production").unwrap_or(false))
}

/// recluster's default kill timeout: 1 s in development, 1 h in production.
pub fn default_timeout() -> Duration {
    if is_production() {
        Duration::from_secs(3600)
    } else {
        Duration::from_secs(1)
    }
}

/// Default worker count: the number of cores this process may use.
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Who workers run as (`--user`, `--group`): set in each worker before exec, with its
/// supplementary groups reset (so the master may bind port 80 as root while workers
/// run unprivileged). Only a master running as root can switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials {
    /// User id the workers run as.
    pub uid: u32,
    /// Group id the workers run as (their only group).
    pub gid: u32,
}

/// Cores per accept thread of the default `--accept-threads`: one thread per this many
/// cores, at least one. A thread's master CPU per connection is about a third of a
/// minimal worker's, and real workers cost more, so a quarter of the cores keeps the
/// master off the critical path without starving the workers (BENCHMARKS.md).
pub const CORES_PER_ACCEPT_THREAD: usize = 4;

/// Default `--accept-threads`: one per [`CORES_PER_ACCEPT_THREAD`] cores, at least one.
pub fn default_accept_threads() -> usize {
    (default_workers() / CORES_PER_ACCEPT_THREAD).max(1)
}

/// Parses a duration: `250ms`, `2s`, `1.5` (seconds, as recluster), `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("expected a duration like 500ms, 2s, 1.5 or 1h, got `{s}`"))?;
    let scale = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "us" => 0.000_001,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{s}`: use ms, s, m or h (a bare number is seconds)"
            ))
        }
    };
    let secs = value * scale;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration `{s}` is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_and_without_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("5x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("-1").is_err());
    }

    #[test]
    fn modes_round_trip_their_names() {
        for b in [Balance::RoundRobin, Balance::Sticky, Balance::Shared] {
            assert_eq!(b.as_str().parse::<Balance>(), Ok(b));
        }
        for r in [ReadyWhen::Started, ReadyWhen::Listening, ReadyWhen::Ready] {
            assert_eq!(r.as_str().parse::<ReadyWhen>(), Ok(r));
        }
        assert!("bogus".parse::<Balance>().is_err());
    }
}
