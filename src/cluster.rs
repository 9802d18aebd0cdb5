//! The public face of a cluster: how it is configured, started, and steered.
//!
//! [`ClusterBuilder`] checks everything that can be checked before a process starts —
//! the command exists and is executable, the addresses can be bound — so that bad
//! input fails at once with an error that says what to do, not as a respawn loop.
//! [`Cluster::run`] then drives the cluster until it is terminated, and any number of
//! cloned [`ClusterHandle`]s steer it and watch it meanwhile.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::{broadcast, mpsc, watch};

use crate::balance::BalanceStats;
use crate::config::{self, Balance, ReadyWhen, Timing};
use crate::supervisor::{Event, WorkerInfo};

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
}

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

/// Configures a [`Cluster`]; every setting has recluster's default.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    command: WorkerCommand,
    workers: usize,
    listen: Vec<SocketAddr>,
    balance: Balance,
    ready_when: ReadyWhen,
    timing: Timing,
    stop_signal: Signal,
    backlog: i32,
    subreaper: bool,
}

impl ClusterBuilder {
    /// Become a child subreaper and reap orphaned descendants too (default: only when PID 1).
    ///
    /// Only for a process that runs one cluster and no other children: it reaps every child.
    pub fn subreaper(mut self, on: bool) -> Self {
        self.subreaper = on;
        self
    }

    /// Number of worker slots (default: the available cores).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Adds a listening address; the first call replaces the default `127.0.0.1:8080`.
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.listen.push(addr);
        self
    }

    /// How connections reach workers (default: round robin).
    pub fn balance(mut self, balance: Balance) -> Self {
        self.balance = balance;
        self
    }

    /// When a new worker counts as ready (default: listening).
    pub fn ready_when(mut self, ready_when: ReadyWhen) -> Self {
        self.ready_when = ready_when;
        self
    }

    /// Time a retiring worker gets before SIGKILL (default 1 s, 1 h in production).
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timing.timeout = d;
        self
    }

    /// First delay before respawning a slot whose worker died (default 1 s).
    pub fn respawn(mut self, d: Duration) -> Self {
        self.timing.respawn = d;
        self
    }

    /// Maximum the respawn delay doubles up to; zero disables doubling (default).
    pub fn backoff(mut self, d: Duration) -> Self {
        self.timing.backoff = d;
        self
    }

    /// Time a new worker has to become ready before it is stopped and retried (zero: no limit).
    pub fn ready_timeout(mut self, d: Duration) -> Self {
        self.timing.ready_timeout = d;
        self
    }

    /// Signal that asks a worker to stop (default SIGTERM).
    pub fn stop_signal(mut self, signal: Signal) -> Self {
        self.stop_signal = signal;
        self
    }

    /// Listen backlog of the sockets the master binds (default 511).
    pub fn backlog(mut self, backlog: i32) -> Self {
        self.backlog = backlog;
        self
    }

    /// Checks the settings and the command, binds the sockets, and returns the cluster.
    pub fn build(self) -> Result<Cluster, Error> {
        if self.workers == 0 {
            return Err(Error::Config("--workers must be at least 1".to_string()));
        }
        let path_var = std::env::var_os("PATH");
        let program = crate::spawn::resolve_program(&self.command.program, path_var.as_ref())
            .map_err(Error::Command)?;
        let addrs = if self.listen.is_empty() {
            vec![SocketAddr::from(([127, 0, 0, 1], 8080))]
        } else {
            self.listen.clone()
        };
        let mut listeners = Vec::with_capacity(addrs.len());
        for addr in addrs {
            let l = crate::listen::bind(addr, self.backlog)
                .map_err(|source| Error::Listen { addr, source })?;
            listeners.push(l);
        }
        let (events, _) = broadcast::channel(1024);
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (state_tx, state) = watch::channel(Arc::new(Snapshot::default()));
        let stats = Arc::new(BalanceStats::default());
        Ok(Cluster {
            setup: Setup {
                program,
                command: self.command,
                workers: self.workers,
                balance: self.balance,
                ready_when: self.ready_when,
                timing: self.timing,
                stop_signal: self.stop_signal,
                subreaper: self.subreaper,
                listeners,
                events: events.clone(),
                commands: command_rx,
                state: state_tx,
                stats: stats.clone(),
            },
            handle: ClusterHandle {
                commands,
                events,
                state,
                stats,
            },
        })
    }
}

/// Everything the driver needs to run a cluster.
pub(crate) struct Setup {
    pub program: PathBuf,
    pub command: WorkerCommand,
    pub workers: usize,
    pub balance: Balance,
    pub ready_when: ReadyWhen,
    pub timing: Timing,
    pub stop_signal: Signal,
    pub subreaper: bool,
    pub listeners: Vec<TcpListener>,
    pub events: broadcast::Sender<Event>,
    pub commands: mpsc::UnboundedReceiver<Command>,
    pub state: watch::Sender<Arc<Snapshot>>,
    pub stats: Arc<BalanceStats>,
}

/// A request from a handle to the running cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Reload,
    Terminate,
    Kill,
}

/// What handles can read about the cluster without asking it.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub generation: u64,
    pub active: Vec<Option<WorkerInfo>>,
    pub workers: Vec<WorkerInfo>,
}

/// A cluster ready to run: sockets bound, command checked.
pub struct Cluster {
    setup: Setup,
    handle: ClusterHandle,
}

impl Cluster {
    /// A builder for a cluster of workers running `command`.
    pub fn builder(command: WorkerCommand) -> ClusterBuilder {
        ClusterBuilder {
            command,
            workers: config::default_workers(),
            listen: Vec::new(),
            balance: Balance::default(),
            ready_when: ReadyWhen::default(),
            timing: Timing::default(),
            stop_signal: Signal::SIGTERM,
            backlog: config::DEFAULT_BACKLOG,
            subreaper: std::process::id() == 1,
        }
    }

    /// A handle to steer and watch the cluster; clone it freely.
    pub fn handle(&self) -> ClusterHandle {
        self.handle.clone()
    }

    /// The addresses actually bound (a port 0 is resolved), in `--listen` order.
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.setup
            .listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect()
    }

    /// Starts the workers and supervises them until the cluster is terminated and every worker reaped.
    ///
    /// Fails only when the cluster cannot work at all: the first workers cannot be
    /// executed, or the master cannot set up its own sockets and signals.
    pub async fn run(self) -> Result<(), Error> {
        crate::driver::run(self.setup).await
    }
}

/// Steers a running cluster and reads its state; cheap to clone, usable from any task.
#[derive(Debug, Clone)]
pub struct ClusterHandle {
    commands: mpsc::UnboundedSender<Command>,
    events: broadcast::Sender<Event>,
    state: watch::Receiver<Arc<Snapshot>>,
    stats: Arc<BalanceStats>,
}

impl ClusterHandle {
    /// Replaces every worker with one of a new generation, with zero downtime.
    pub fn reload(&self) {
        let _ = self.commands.send(Command::Reload);
    }

    /// Stops every worker gracefully (stop signal, SIGKILL after the timeout); `run` then returns.
    pub fn terminate(&self) {
        let _ = self.commands.send(Command::Terminate);
    }

    /// Kills every worker at once; `run` returns once they are reaped.
    pub fn kill(&self) {
        let _ = self.commands.send(Command::Kill);
    }

    /// One entry per slot: its active (ready) worker, or `None` (recluster's `activeWorkers()`).
    pub fn active_workers(&self) -> Vec<Option<WorkerInfo>> {
        self.state.borrow().active.clone()
    }

    /// Every live worker, starting and retiring ones included (recluster's `workers()`).
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.state.borrow().workers.clone()
    }

    /// The current generation: 1 at start, +1 per reload.
    pub fn generation(&self) -> u64 {
        self.state.borrow().generation
    }

    /// A stream of lifecycle events from now on (a receiver that lags loses the oldest).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    /// The balancer's counters so far (all zero in `shared`, where workers accept).
    pub fn balance_counts(&self) -> BalanceCounts {
        BalanceCounts::from(&*self.stats)
    }
}

/// A snapshot of the balancer's counters: where every accepted connection went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalanceCounts {
    /// Connections accepted by the master.
    pub accepted: u64,
    /// Connections handed to a worker.
    pub handed: u64,
    /// Connections closed because no worker was ready for a long time.
    pub closed: u64,
    /// Sends that found a worker's queue full (the worker was skipped or waited for).
    pub full: u64,
    /// `sticky` connections that went to their second choice.
    pub fallbacks: u64,
    /// Connections taken back from an exited worker and handed out again.
    pub reclaimed: u64,
    /// Accept errors, fd exhaustion included.
    pub accept_errors: u64,
}

impl From<&BalanceStats> for BalanceCounts {
    fn from(s: &BalanceStats) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        BalanceCounts {
            accepted: s.accepted.load(Relaxed),
            handed: s.handed.load(Relaxed),
            closed: s.closed.load(Relaxed),
            full: s.full.load(Relaxed),
            fallbacks: s.fallbacks.load(Relaxed),
            reclaimed: s.reclaimed.load(Relaxed),
            accept_errors: s.accept_errors.load(Relaxed),
        }
    }
}
