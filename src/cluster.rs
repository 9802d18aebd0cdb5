//! The public face of a cluster: how it is configured, started, and steered.
//!
//! [`ClusterBuilder`] checks everything that can be checked before a process starts —
//! the command exists and is executable, the addresses can be bound — so that bad
//! input fails at once with an error that says what to do, not as a respawn loop.
//! [`Cluster::run`] then drives the cluster until it is terminated, and any number of
//! cloned [`ClusterHandle`]s steer it and watch it meanwhile.

use std::net::SocketAddr;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::config::{self, Balance, ReadyWhen, RollingReload, Timing, Via};
use crate::error::{ConfigError, Error};
use crate::runtime::command::WorkerCommand;
use crate::runtime::handle::ClusterHandle;
use crate::runtime::Setup;

/// Configures a [`Cluster`]; every setting has recluster's default.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    command: WorkerCommand,
    workers: usize,
    listen: Vec<SocketAddr>,
    balance: Balance,
    via: Option<Via>,
    ready_when: ReadyWhen,
    timing: Timing,
    rolling: RollingReload,
    stop_signal: Signal,
    backlog: i32,
    accept_threads: Option<usize>,
    /// Who workers run as (`--user`, `--group`); `None`: as the master.
    run_as: Option<config::Credentials>,
    /// Sockets passed by the service manager (socket activation), served instead of binding.
    activated: std::sync::Arc<[std::net::TcpListener]>,
    subreaper: bool,
    cgroups: bool,
    prefix_output: bool,
    json_output: bool,
    /// `--proxy-protocol VERSION`: none by default.
    proxy_accept: Option<crate::proxy::ProxyProtocol>,
    /// `--proxy-protocol ADDR=VERSION`.
    proxy_on: Vec<(SocketAddr, crate::proxy::ProxyProtocol)>,
    /// `--trusted-proxy`, `--proxy-timeout`.
    proxy: crate::balance::proxy::ProxySettings,
}

impl ClusterBuilder {
    /// Expect a PROXY protocol header of these versions first on every connection the
    /// master accepts, and use the client it names for `sticky` and as the worker's
    /// `peer` (default: none). Only in `rr`/`sticky` with `--via channel` or `node`.
    pub fn proxy_protocol(mut self, accept: crate::proxy::ProxyProtocol) -> Self {
        self.proxy_accept = Some(accept);
        self
    }

    /// As [`ClusterBuilder::proxy_protocol`], on the listener of `addr` only (one of
    /// the [`ClusterBuilder::listen`] addresses, as given); it wins over the setting
    /// for every listener.
    pub fn proxy_protocol_on(mut self, addr: SocketAddr, accept: crate::proxy::ProxyProtocol) -> Self {
        self.proxy_on.push((addr, accept));
        self
    }

    /// Accept PROXY headers only from peers in `network` (repeatable; default: from
    /// every peer); connections from other peers are closed and counted. Effective
    /// with [`ClusterBuilder::proxy_protocol`] only.
    pub fn trusted_proxy(mut self, network: crate::proxy::Cidr) -> Self {
        let mut trusted = self.proxy.trusted.to_vec();
        trusted.push(network);
        self.proxy.trusted = trusted.into();
        self
    }

    /// How long a client has to send its whole PROXY header (default 3 s).
    pub fn proxy_timeout(mut self, d: Duration) -> Self {
        self.proxy.timeout = d;
        self
    }

    /// Relay each line the workers write to stdout and stderr to the master's own,
    /// prefixed `[SLOT PID] ` (default: off, workers write to the master's descriptors
    /// themselves).
    ///
    /// Each worker then writes into pipes the master reads. A line is written whole
    /// (never interleaved with another); one longer than 16 KiB is cut into pieces,
    /// each prefixed; a last line without a newline is written when the worker's end
    /// closes. The event loop never waits for the master's stdout or stderr: lines go
    /// through bounded queues; a worker writing faster than they drain is slowed for
    /// at most half a second, after which (the output is stuck, or fails) its lines
    /// are dropped, counted, and reported (`output_dropped`, at most once a second). A worker's own output buffering may change, since its stdout
    /// is a pipe, not a terminal (set `PYTHONUNBUFFERED=1`, say).
    pub fn prefix_output(mut self, on: bool) -> Self {
        self.prefix_output = on;
        self
    }

    /// With [`ClusterBuilder::prefix_output`], relay each worker line as a JSON object in the
    /// shape of tracing-subscriber's JSON lines (`--log-format json`): `fields` holds
    /// `event` (`worker_output`), `slot`, `pid`, `stream` (`stdout` or `stderr`) and the
    /// line as `message` (invalid UTF-8 replaced, control characters escaped).
    pub fn json_output(mut self, on: bool) -> Self {
        self.json_output = on;
        self
    }

    /// Become a child subreaper and reap orphaned descendants too (default: only when PID 1).
    ///
    /// Only for a process that runs one cluster and no other children: it reaps every child.
    pub fn subreaper(mut self, on: bool) -> Self {
        self.subreaper = on;
        self
    }

    /// Put each worker in a cgroup of its own where cgroup v2 is writable, so that even
    /// daemons that left its process group are killed with it (default: on).
    pub fn cgroups(mut self, on: bool) -> Self {
        self.cgroups = on;
        self
    }

    /// Number of worker slots (default: the available cores); a running cluster can be
    /// scaled with [`ClusterHandle::scale`].
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

    /// How workers receive connections in `rr`/`sticky` (default: `node` when the
    /// command's program is `node` or `nodejs`, else the worker channel).
    pub fn via(mut self, via: Via) -> Self {
        self.via = Some(via);
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

    /// How long an active worker may leave a connection unread (alive but not reading its
    /// channel) before it is routed away, its queue reclaimed and it is replaced
    /// (`rr`/`sticky`; default 10 s, zero: never).
    pub fn stuck_timeout(mut self, d: Duration) -> Self {
        self.timing.stuck_timeout = d;
        self
    }

    /// Most slots replaced at once by a reload, lowest first: each slot whose new worker
    /// gets ready lets the next one start (a rolling reload). Zero, the default: every
    /// slot at once.
    pub fn reload_batch(mut self, k: usize) -> Self {
        self.rolling.batch = k;
        self
    }

    /// Failed starts in a row of a reload's new workers (exited before ready, or not
    /// ready in time) after which the reload is abandoned: slots not yet replaced keep
    /// their old workers. Zero, the default: never abandon.
    pub fn reload_abort_after(mut self, m: u32) -> Self {
        self.rolling.abort_after = m;
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

    /// Threads that accept and hand connections over in `rr`/`sticky` with the worker
    /// channel or Node's IPC (default: one per 4 cores, at least 1, at most one per
    /// worker); all of them accept on the same listening sockets. Ignored in `shared`
    /// and under `--via socket`, where workers accept.
    pub fn accept_threads(mut self, k: usize) -> Self {
        self.accept_threads = Some(k.max(1));
        self
    }

    /// Runs workers as this user and group, supplementary groups reset (default: as
    /// the master). The master must run as root.
    pub fn run_as(mut self, credentials: config::Credentials) -> Self {
        self.run_as = Some(credentials);
        self
    }

    /// Serves on these listening sockets, passed by a service manager (systemd socket
    /// activation: see `LISTEN_FDS`), instead of binding: each `listen` address, if
    /// any is given, must be one of theirs. Not with [`Via::Socket`].
    pub fn activated(mut self, listeners: Vec<std::net::TcpListener>) -> Self {
        self.activated = listeners.into();
        self
    }

    /// Checks the settings and the command, binds the sockets, and returns the cluster.
    pub fn build(self) -> Result<Cluster, Error> {
        if self.workers == 0 {
            return Err(Error::Config(ConfigError::NoWorkers));
        }
        // SAFETY: geteuid has no preconditions.
        if self.run_as.is_some() && unsafe { libc::geteuid() } != 0 {
            return Err(Error::Config(ConfigError::RunAsNeedsRoot));
        }
        let via_chosen = self.via.is_none() && self.balance != Balance::Shared;
        let via = match self.via {
            Some(via) => via,
            None if self.balance == Balance::Shared => Via::Channel,
            None => Via::for_program(&self.command.program),
        };
        match (self.balance, via) {
            (Balance::Shared, Via::Node | Via::Socket) if self.via.is_some() => {
                return Err(Error::Config(ConfigError::ViaShared(via)));
            }
            (_, Via::Socket) if self.workers > crate::balance::steer::MAX_STEERED_SLOTS => {
                return Err(Error::Config(ConfigError::ViaSocketSlots(self.workers)));
            }
            _ => {}
        }
        let proxied = self.proxy_accept.is_some() || !self.proxy_on.is_empty();
        if proxied && (self.balance == Balance::Shared || via == Via::Socket) {
            return Err(Error::Config(ConfigError::ProxyWorkersAccept));
        }
        let via_chosen = via_chosen && via != Via::Channel;
        let path_var = std::env::var_os("PATH");
        let program =
            crate::runtime::command::resolve_program(&self.command.program, path_var.as_ref())
                .map_err(Error::Command)?;
        if !self.activated.is_empty() && via == Via::Socket && self.balance != Balance::Shared {
            return Err(Error::Config(ConfigError::ActivatedViaSocket));
        }
        let addrs = if !self.activated.is_empty() {
            // Served as passed: nothing to bind.
            let have: Vec<SocketAddr> = self.activated.iter().filter_map(|l| l.local_addr().ok()).collect();
            if let Some(&listen) = self.listen.iter().find(|a| !have.contains(a)) {
                return Err(Error::Config(ConfigError::ActivatedMismatch {
                    listen,
                    activated: have,
                }));
            }
            Vec::new()
        } else if self.listen.is_empty() && via == Via::Node && self.balance != Balance::Shared {
            // A Node worker's `listen(port)` names its port; the master binds it then.
            Vec::new()
        } else if self.listen.is_empty() {
            vec![SocketAddr::from(([127, 0, 0, 1], 8080))]
        } else {
            self.listen.clone()
        };
        let mut listeners = Vec::with_capacity(addrs.len().max(self.activated.len()));
        // Each listener's address as given (`--proxy-protocol ADDR=VERSION` names them).
        let mut listen_addrs = Vec::with_capacity(listeners.capacity());
        for l in self.activated.iter() {
            let addr = l.local_addr().map_err(|source| Error::Io {
                context: "cannot read the address of a socket the service manager passed",
                source,
            })?;
            listen_addrs.push(addr);
            listeners.push(l.try_clone().map_err(|source| Error::Listen { addr, source })?);
        }
        // `--via socket`: slot k's sockets, one per address, for k >= 1 (slot 0's are
        // `listeners`), each address's in one SO_REUSEPORT group.
        let mut slot_sockets: Vec<Vec<std::net::TcpListener>> = Vec::new();
        // Several accept threads: thread k's copies of the listening sockets, for k >= 1.
        let threads = match (self.balance, via) {
            (Balance::Shared, _) | (_, Via::Socket) => 1,
            _ => self
                .accept_threads
                .unwrap_or_else(|| config::default_accept_threads().min(self.workers)),
        };
        let mut accept_sockets: Vec<Vec<std::net::TcpListener>> = (1..threads).map(|_| Vec::new()).collect();
        if let Some(&(addr, _)) = self.proxy_on.iter().find(|(a, _)| !addrs.contains(a) && !listen_addrs.contains(a)) {
            return Err(Error::Config(ConfigError::ProxyNotListening(addr)));
        }
        for addr in addrs {
            listen_addrs.push(addr);
            if via == Via::Socket && self.balance != Balance::Shared {
                let mut group = crate::via::socket::bind_group(addr, self.workers, self.backlog)
                    .map_err(|source| Error::Listen { addr, source })?
                    .into_iter();
                listeners.extend(group.next());
                slot_sockets.resize_with(self.workers - 1, Vec::new);
                for (slot, socket) in slot_sockets.iter_mut().zip(group) {
                    slot.push(socket);
                }
                continue;
            }
            let l = crate::listen::bind(addr, self.backlog)
                .map_err(|source| Error::Listen { addr, source })?;
            listeners.push(l);
        }
        // Every accept thread accepts on the same sockets (duplicate descriptors): one
        // accept queue per address, owned as with one thread (see `balance`).
        for thread in &mut accept_sockets {
            for l in &listeners {
                let copy = l.try_clone().map_err(|source| Error::Io {
                    context: "cannot duplicate a listening socket for an accept thread",
                    source,
                })?;
                thread.push(copy);
            }
        }
        let (handle, ends) = crate::runtime::handle::pair();
        Ok(Cluster {
            setup: Setup {
                program,
                command: self.command,
                workers: self.workers,
                balance: self.balance,
                ready_when: self.ready_when,
                timing: self.timing,
                rolling: self.rolling,
                stop_signal: self.stop_signal,
                run_as: self.run_as,
                subreaper: self.subreaper,
                cgroups: self.cgroups,
                prefix_output: self.prefix_output,
                json_output: self.json_output,
                listeners,
                slot_sockets,
                accept_sockets,
                ends,
                via,
                via_chosen,
                backlog: self.backlog,
                proxy: proxied.then(|| crate::balance::proxy::ProxySettings {
                    accept: self.proxy_accept,
                    by_listener: listen_addrs
                        .iter()
                        .map(|a| self.proxy_on.iter().rev().find(|(on, _)| on == a).map(|&(_, v)| v))
                        .collect(),
                    ..self.proxy
                }),
            },
            handle,
        })
    }
}

/// A cluster ready to run: sockets bound, command checked.
///
/// ```
/// use recluster::{Balance, Cluster, Event, ReadyWhen, WorkerCommand};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), recluster::Error> {
/// // Two workers running `sleep 60`, ready as soon as started, on a free port.
/// let cluster = Cluster::builder(WorkerCommand::new("sleep").arg("60"))
///     .workers(2)
///     .listen("127.0.0.1:0".parse().unwrap())
///     .balance(Balance::Shared)
///     .ready_when(ReadyWhen::Started)
///     .build()?;
/// let handle = cluster.handle();
/// let mut events = handle.events();
/// let running = tokio::spawn(cluster.run());
///
/// // Wait for the first generation, look at it, reload it, then terminate.
/// while !matches!(events.recv().await, Ok(Event::ClusterReady { .. })) {}
/// assert!(handle.active_workers().iter().all(Option::is_some));
/// handle.reload();
/// while !matches!(events.recv().await, Ok(Event::ReloadFinished { generation: 2 })) {}
/// handle.terminate(); // SIGTERM to every worker, SIGKILL after the timeout
/// running.await.expect("the cluster task")?;
/// assert!(handle.workers().is_empty());
/// # Ok(())
/// # }
/// ```
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
            via: None,
            ready_when: ReadyWhen::default(),
            timing: Timing::default(),
            rolling: RollingReload::default(),
            stop_signal: Signal::SIGTERM,
            backlog: config::DEFAULT_BACKLOG,
            accept_threads: None,
            run_as: None,
            activated: Vec::new().into(),
            subreaper: std::process::id() == 1,
            cgroups: true,
            prefix_output: false,
            json_output: false,
            proxy_accept: None,
            proxy_on: Vec::new(),
            proxy: crate::balance::proxy::ProxySettings {
                accept: None,
                by_listener: Vec::new().into(),
                trusted: Vec::new().into(),
                timeout: crate::balance::proxy::DEFAULT_TIMEOUT,
            },
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
    ///
    /// Workers are forked from the thread that polls this future, and the kernel ties
    /// each worker's `PR_SET_PDEATHSIG` to that *thread*: poll it from a thread that
    /// lives as long as the cluster (a tokio runtime's own threads do; a
    /// `spawn_blocking` thread, retired when idle, does not). Accepting runs on a
    /// thread of its own (or `accept_threads` of them), so forking never delays it.
    pub async fn run(self) -> Result<(), Error> {
        crate::runtime::run(self.setup).await
    }
}
