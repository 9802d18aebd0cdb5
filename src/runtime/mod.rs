//! The tokio layer that runs the supervisor core: processes, signals, timers, readiness.
//!
//! One task owns the [`Supervisor`] and everything with side effects: it spawns and
//! signals worker processes, reaps them on SIGCHLD, reads readiness from the notify
//! socket or from /proc, sleeps until the core's next deadline, and turns the core's
//! reports into log lines and events. The core decides; this layer only carries out.

use std::collections::{HashMap, VecDeque};

use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use crate::balance::{Update, Updates};
use crate::config::{Balance, ReadyWhen, Timing};
use crate::error::{CommandError, Error};
use crate::notify::{NotifyMessage, NotifySocket};
use crate::supervisor::{
    Action, Event, ExitStatus, Input, SpawnError, SpawnStep, Supervisor, WorkerId,
};
use crate::balance::steer::Steering;
use crate::config::Via;
use crate::via::channel::WorkerChannel;
use crate::via::node::{NodeChannel, Ports};
use crate::via::{reader, GiveBack, Link, Returned};
use command::{Launcher, WorkerCommand};
use handle::{Command, Snapshot};
use journal::Journal;

mod advice;
mod cgroup;
pub(crate) mod command;
pub(crate) mod control;
mod guard;
pub(crate) mod handle;
mod journal;
pub(crate) mod launch;
pub(crate) mod metrics;
mod output;
mod probe;
pub(crate) mod status;
mod ratelimit;
mod reap;

/// Everything the runtime needs to run a cluster, checked and bound by the builder.
pub(crate) struct Setup {
    pub program: PathBuf,
    pub command: WorkerCommand,
    pub workers: usize,
    pub balance: Balance,
    pub ready_when: ReadyWhen,
    pub timing: Timing,
    /// How reloads roll through the slots.
    pub rolling: crate::config::RollingReload,
    pub stop_signal: Signal,
    /// Who workers run as; `None`: as the master.
    pub run_as: Option<crate::config::Credentials>,
    pub subreaper: bool,
    /// Whether workers get cgroups of their own where cgroup v2 is writable.
    pub cgroups: bool,
    /// `--prefix`: workers' stdout and stderr are relayed line by line, prefixed.
    pub prefix_output: bool,
    /// With `prefix_output`, each line is relayed as a JSON object (`--log-format json`).
    pub json_output: bool,
    pub listeners: Vec<TcpListener>,
    /// `--via socket`: the sockets of slots 1.. (slot 0's are `listeners`), per address.
    pub slot_sockets: Vec<Vec<TcpListener>>,
    /// `--accept-threads K`: the sockets of accept threads 1.. (thread 0's are
    /// `listeners`), per address.
    pub accept_sockets: Vec<Vec<TcpListener>>,
    pub ends: handle::Ends,
    /// How workers receive connections (`rr`/`sticky`).
    pub via: Via,
    /// `via` was chosen from the command, not given: say so once.
    pub via_chosen: bool,
    /// The backlog of sockets bound later (a Node worker asked for a port).
    pub backlog: i32,
    /// `--proxy-protocol`: read a PROXY header first on each connection.
    pub proxy: Option<crate::balance::proxy::ProxySettings>,
}

impl Setup {
    /// Whether workers accept on sockets they inherit (`shared`, `--via socket`), so
    /// that no balancer runs and /proc tells when they listen.
    fn workers_accept(&self) -> bool {
        self.balance == Balance::Shared || self.via == Via::Socket
    }
}

/// How often a starting worker is checked in /proc for listening (`shared` + `listening`).
const PROBE_INTERVAL: Duration = Duration::from_millis(25);

/// A live worker process as the driver knows it.
struct Proc {
    pid: u32,
    /// Whether /proc should be polled for this worker's listening.
    probing: bool,
    /// The master's end of its channel (`rr`/`sticky`).
    link: Option<Link>,
    /// The task reading the worker's messages.
    reader: Option<tokio::task::JoinHandle<()>>,
    /// The worker's own cgroup, where cgroups are used.
    cgroup: Option<cgroup::Leaf>,
}

/// The driver's state besides the supervisor core.
struct Driver {
    setup: Setup,
    sup: Supervisor,
    notify: NotifySocket,
    /// Starts worker processes with their environment and descriptors.
    launcher: Launcher,
    /// The addresses the master listens on, for the advice to workers that fail to start.
    addrs: Vec<std::net::SocketAddr>,
    procs: HashMap<WorkerId, Proc>,
    by_pid: HashMap<u32, WorkerId>,
    journal: Journal,
    /// Route updates to the balancer (`rr`/`sticky`).
    balancer: Option<Updates>,
    /// Fire when the balancer's threads have ended, awaited at the end so their last
    /// counts are in.
    balancer_task: Option<Vec<tokio::sync::oneshot::Receiver<()>>>,
    /// The sockets Node workers may ask for (`--via node`).
    ports: Option<Arc<Ports>>,
    /// Worker messages, as supervisor inputs, from the channel readers.
    messages: mpsc::Sender<Input>,
    fatal: Option<Error>,
    exit: bool,
    /// Kills the workers if the master dies; their cgroups (`guard.rs`).
    guard: guard::Guard,
    /// `--via socket`: which slots the kernel's program sends connections to.
    steering: Option<Steering>,
    /// What `status` shows that never changes.
    facts: Arc<handle::Facts>,
    /// Reloads and ready generations so far, for `status`.
    tally: Tally,
    /// Per slot: connections handed to its workers that have exited.
    handed_gone: Vec<u64>,
    /// `--prefix`: the relays of the workers' output.
    output: Option<output::Output>,
}

/// What the driver counts from the core's events, for `status` and `reload --wait`.
#[derive(Debug, Default)]
struct Tally {
    ready_generation: u64,
    aborted_generation: u64,
    reloads: status::ReloadCounts,
    /// A reload has started and has neither finished nor been aborted.
    reload_in_flight: bool,
}

/// Runs a cluster until it has terminated.
pub(crate) async fn run(setup: Setup) -> Result<(), Error> {
    let io = |context| move |source| Error::Io { context, source };
    let mut sigchld = signal(SignalKind::child()).map_err(io("cannot watch SIGCHLD"))?;
    if setup.subreaper {
        crate::runtime::reap::become_subreaper().map_err(io("cannot become a child subreaper"))?;
    }
    let notify = NotifySocket::bind().map_err(io("cannot create the notify socket"))?;
    if let Some(c) = setup.run_as {
        notify
            .allow_group(c.gid)
            .map_err(io("cannot give the workers' user the notify socket"))?;
    }
    for (index, l) in setup.listeners.iter().enumerate() {
        if let Ok(addr) = l.local_addr() {
            let accept_threads = if setup.workers_accept() { 0 } else { 1 + setup.accept_sockets.len() };
            info!(event = "listening", addr = %addr, index, balance = %setup.balance, accept_threads, "listening");
        }
    }
    let (messages, mut message_rx) = mpsc::channel(reader::QUEUE);
    let mut driver = Driver::new(setup, notify, messages)?;
    let first = driver.sup.start(Instant::now());
    driver.apply(first);
    driver.publish();

    let mut probe = tokio::time::interval(PROBE_INTERVAL);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !driver.exit {
        let deadline = driver.sup.next_deadline();
        let probing = driver.procs.values().any(|p| p.probing);
        let flush = driver.journal.next_flush();
        tokio::select! {
            _ = sigchld.recv() => driver.reap().await,
            cmd = driver.setup.ends.commands.recv() => driver.command(cmd),
            msg = driver.notify.recv() => match msg {
                Ok(msg) => driver.notified(msg),
                Err(e) => warn!(event = "notify_failed", error = %e, "notify socket receive failed"),
            },
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                driver.feed(Input::Tick);
            }
            _ = probe.tick(), if probing => driver.probe(),
            _ = sleep_until(flush.unwrap_or_else(Instant::now)), if flush.is_some() => {
                driver.journal.flush(Instant::now(), false);
            }
            Some(input) = message_rx.recv() => driver.feed(input),
        }
        driver.publish();
    }
    if let Some(output) = driver.output.take() {
        output.finish().await;
    }
    driver.journal.flush(Instant::now(), true);
    let clean = driver.procs.is_empty();
    driver.guard.finish(clean).await;
    match driver.fatal.take() {
        Some(e) => Err(e),
        None => {
            // Closing the update channel ends the balancer; it counts what it still held.
            if driver.balancer.take().is_some() {
                for thread in driver.balancer_task.take().into_iter().flatten() {
                    let _ = thread.await;
                }
                let c = crate::balance::BalanceCounts::from(&*driver.setup.ends.stats);
                info!(
                    event = "balancer_totals",
                    accepted = c.accepted,
                    handed = c.handed,
                    closed = c.closed,
                    reclaimed = c.reclaimed,
                    full = c.full,
                    fallbacks = c.fallbacks,
                    accept_errors = c.accept_errors,
                    proxy_header_errors = c.proxy_header_errors,
                    proxy_untrusted = c.proxy_untrusted,
                    handoff_p50_us = c.handoff_p50_us,
                    handoff_p99_us = c.handoff_p99_us,
                    "balancer totals"
                );
            }
            info!(event = "terminated", "terminated");
            Ok(())
        }
    }
}

impl Driver {
    fn new(
        mut setup: Setup,
        notify: NotifySocket,
        messages: mpsc::Sender<Input>,
    ) -> Result<Driver, Error> {
        let mut launcher = Launcher::new(&setup, notify.path());
        let addrs: Vec<std::net::SocketAddr> = setup
            .listeners
            .iter()
            .filter_map(|l| l.local_addr().ok())
            .collect();
        let mut balancer = None;
        let mut balancer_task = None;
        let mut ports = None;
        let mut steering = None;
        if setup.via == Via::Socket && setup.balance != Balance::Shared {
            // Each slot's sockets (slot 0's are `listeners`), with their addresses.
            let by_slot: Vec<Vec<(std::net::SocketAddr, std::os::fd::RawFd)>> = std::iter::once(&setup.listeners)
                .chain(&setup.slot_sockets)
                .map(|s| s.iter().filter_map(|l| Some((l.local_addr().ok()?, l.as_raw_fd()))).collect())
                .collect();
            launcher.use_slot_sockets(by_slot.iter().map(|s| s.iter().map(|&(_, fd)| fd).collect()).collect());
            if setup.command.runs_node_script() {
                // Node: a server's `listen(port)` asks the master, which answers with the
                // worker's own slot's socket (`via::node`).
                let nowhere: GiveBack = Arc::new(|_| {});
                ports = Some(Arc::new(Ports::new(&addrs, nowhere, setup.backlog).with_slot_sockets(by_slot)));
                crate::via::node::check_version(&setup.program);
                info!(event = "via_socket_node", "the command runs node: workers also get Node's cluster IPC, and a server's listen(port) is answered with its slot's socket");
                launcher.add_node_channel();
            }
            steering = Some(Steering::new(setup.balance, setup.workers, setup.listeners.len()));
        }
        if !setup.workers_accept() {
            let (tx, inboxes) = Updates::new(1 + setup.accept_sockets.len());
            if setup.via == Via::Node {
                launcher.use_node_channel();
                ports = Some(Arc::new(Ports::new(&addrs, give_back(&tx), setup.backlog)));
            } else {
                launcher.use_channel();
            }
            if setup.via == Via::Node && crate::config::Via::for_program(setup.program.as_os_str()) == Via::Node {
                crate::via::node::check_version(&setup.program);
            }
            if setup.via_chosen {
                info!(event = "via_chosen", via = %setup.via, "the command runs node: workers get connections through Node's cluster IPC (--via node)");
            }
            let listeners = std::iter::once(std::mem::take(&mut setup.listeners))
                .chain(std::mem::take(&mut setup.accept_sockets))
                .collect();
            let running = crate::balance::start(
                setup.balance,
                listeners,
                setup.workers,
                inboxes,
                setup.ends.stats.clone(),
                crate::balance::StuckReports {
                    timeout: setup.timing.stuck_timeout,
                    to: messages.clone(),
                },
                setup.proxy.clone(),
            )
            .map_err(|source| Error::Io {
                context: "cannot set up the balancer",
                source,
            })?;
            balancer_task = Some(running.done);
            balancer = Some(tx);
        }
        let guard = guard::Guard::start(setup.cgroups);
        let facts = Arc::new(handle::Facts {
            balance: setup.balance,
            via: (setup.balance != Balance::Shared).then_some(setup.via),
            listeners: addrs.clone(),
            started: Instant::now(),
        });
        let setup_prefix = setup.prefix_output;
        let setup_json = setup.json_output;
        Ok(Driver {
            facts,
            tally: Tally::default(),
            handed_gone: Vec::new(),
            sup: Supervisor::new(setup.workers, setup.timing)
                .with_ready_when(setup.ready_when)
                .with_rolling(setup.rolling),
            setup,
            notify,
            launcher,
            addrs,
            procs: HashMap::new(),
            by_pid: HashMap::new(),
            journal: Journal::new(),
            balancer,
            balancer_task,
            ports,
            messages,
            fatal: None,
            exit: false,
            guard,
            steering,
            output: setup_prefix.then(|| output::Output::new(setup_json)),
        })
    }

    /// Feeds one input to the core and carries out what it returns.
    fn feed(&mut self, input: Input) {
        let actions = self.sup.handle(input, Instant::now());
        self.apply(actions);
    }

    fn apply(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let follow = match action {
                Action::Spawn {
                    id,
                    slot,
                    generation,
                } => self.spawn(id, slot, generation),
                Action::Stop { id } => {
                    let mut signal_now = true;
                    if let Some(p) = self.procs.get_mut(&id) {
                        p.probing = false;
                        match &p.link {
                            Some(Link::Channel(ch)) => ch.stop_soon(),
                            // Node's graceful disconnect; the stop signal follows when the
                            // worker closes its channel (a Node worker dies of SIGTERM at
                            // once, requests in flight and all), unless it never spoke.
                            Some(Link::Node(n)) => signal_now = !n.stop(),
                            None => {}
                        }
                    }
                    if signal_now {
                        self.signal(id, self.setup.stop_signal);
                    }
                    Vec::new()
                }
                Action::Drain { id } => {
                    match self.procs.get(&id).and_then(|p| p.link.clone()) {
                        Some(Link::Channel(ch)) => ch.stop_soon(),
                        _ => self.signal(id, self.setup.stop_signal),
                    }
                    Vec::new()
                }
                Action::Kill { id } => {
                    self.signal(id, Signal::SIGKILL);
                    Vec::new()
                }
                Action::Route { slot, worker } => {
                    // In `shared` there is no balancer: workers accept themselves;
                    // under `--via socket` the kernel's program follows the ready set.
                    if let Some(steering) = &mut self.steering {
                        let changed = steering.set_ready(slot, worker.is_some());
                        if self.rejoin_slot_sockets() || changed {
                            self.steer();
                        }
                    }
                    if let Some(tx) = &self.balancer {
                        let proc = worker.and_then(|id| Some((id, self.procs.get(&id)?)));
                        // `rr` ranks workers with nothing unread by how busy they were lately (balance::running).
                        let running = proc
                            .filter(|_| self.setup.balance == Balance::RoundRobin)
                            .and_then(|(_, p)| crate::balance::running::RunState::open(p.pid))
                            .map(Arc::new);
                        let worker = proc.and_then(|(id, p)| Some((id, p.link.clone()?)));
                        tx.route(slot, worker, running);
                    }
                    Vec::new()
                }
                Action::Reclaim { id } => {
                    self.reclaim(id);
                    Vec::new()
                }
                Action::Report(event) => {
                    self.report(&event);
                    let _ = self.setup.ends.events.send(event);
                    Vec::new()
                }
                Action::Exit => {
                    self.exit = true;
                    Vec::new()
                }
            };
            queue.extend(follow);
        }
    }

    fn spawn(&mut self, id: WorkerId, slot: usize, generation: u64) -> Vec<Action> {
        let shared = self.setup.workers_accept();
        let now = Instant::now();
        let made = match &self.ports {
            Some(ports) => NodeChannel::new(ports.clone(), slot)
                .map(|(n, end)| (Some(Link::Node(Arc::new(n))), Some(end))),
            None if shared => Ok((None, None)),
            None => WorkerChannel::new().map(|(ch, end)| (Some(Link::Channel(Arc::new(ch))), Some(end))),
        };
        let (link, worker_end) = match made {
            Ok(made) => made,
            Err(e) => {
                let error = spawn_error(SpawnStep::Channel, &e);
                return self.sup.handle(Input::SpawnFailed { id, error }, now);
            }
        };
        let pipes = match self.output.is_some().then(output::Pipes::new).transpose() {
            Ok(pipes) => pipes,
            Err(e) => {
                let error = spawn_error(SpawnStep::Output, &e);
                return self.sup.handle(Input::SpawnFailed { id, error }, now);
            }
        };
        let output_fds = pipes
            .as_ref()
            .map(|p| p.worker.each_ref().map(|fd| fd.as_raw_fd()));
        let channel_fd = worker_end.as_ref().map(|e| e.as_raw_fd());
        let cgroup = self.guard.leaf();
        let contain = self.guard.contain(cgroup.as_ref());
        let spawned = self
            .launcher
            .launch(id.0, slot, generation, channel_fd, output_fds, contain);
        drop(worker_end); // the worker has its copy (a channel keeps one for reclaiming)
        match spawned {
            Ok(pid) => {
                self.guard.spawned(pid, cgroup.as_ref());
                if let (Some(pipes), Some(output)) = (pipes, self.output.as_mut()) {
                    output.relay(pipes, slot, pid);
                }
                if let Some(Link::Node(n)) = &link {
                    n.set_pid(pid);
                }
                let probing = shared && self.setup.ready_when == ReadyWhen::Listening;
                let reader = match &link {
                    Some(Link::Channel(ch)) => Some(tokio::spawn(reader::read_worker(
                        id,
                        ch.clone(),
                        self.messages.clone(),
                    ))),
                    Some(Link::Node(n)) => Some(tokio::spawn(crate::via::node::run(
                        n.clone(),
                        crate::via::node::Task {
                            id,
                            pid,
                            stop_signal: self.setup.stop_signal,
                            inputs: self.messages.clone(),
                        },
                    ))),
                    None => None,
                };
                self.procs.insert(
                    id,
                    Proc {
                        pid,
                        probing,
                        link,
                        reader,
                        cgroup,
                    },
                );
                self.by_pid.insert(pid, id);
                self.sup.handle(Input::Spawned { id, pid }, now)
            }
            Err(e) => {
                self.guard.released(None, cgroup);
                let error = spawn_error(SpawnStep::Launch, &e);
                self.sup.handle(Input::SpawnFailed { id, error }, now)
            }
        }
    }

    fn signal(&self, id: WorkerId, signal: Signal) {
        if let Some(p) = self.procs.get(&id) {
            // Each worker leads its own process group: the signal reaches what it forked too.
            let _ = killpg(Pid::from_raw(p.pid as i32), signal);
        }
    }

    async fn reap(&mut self) {
        let mut exited: Vec<(u32, ExitStatus)> = Vec::new();
        if self.setup.subreaper {
            // A subreaper inherits orphans: reap every child, ours or not.
            while let Some((pid, status)) = crate::runtime::reap::reap_any() {
                if !self.by_pid.contains_key(&pid) {
                    debug!(event = "orphan_reaped", pid, %status, "reaped an orphaned process");
                }
                exited.push((pid, status));
            }
        } else {
            // Only our own pids: other children of a host program are not ours to reap.
            exited.extend(
                self.procs
                    .values()
                    .filter_map(|p| crate::runtime::reap::try_reap(p.pid).map(|s| (p.pid, s))),
            );
        }
        for (pid, status) in exited {
            let Some(id) = self.by_pid.remove(&pid) else {
                continue;
            };
            let Some(p) = self.procs.remove(&id) else {
                continue;
            };
            if let Some(r) = p.reader {
                // Its channel's task ends (on a multi-thread runtime it may be running
                // right now: it stops at its next await, having acted on every line it
                // read), and only then is the rest of the channel read, below.
                r.abort();
                let _ = r.await;
            }
            // Whatever the worker left in its process group (a server under `sh -c`
            // that did not exec, a forked helper) goes with it, as systemd's
            // control-group kill does: it would otherwise hold sockets and old code.
            if killpg(Pid::from_raw(pid as i32), Signal::SIGKILL).is_ok() {
                debug!(
                    event = "group_killed",
                    pid, "killed what the worker left in its process group"
                );
            }
            // Everything in the group has a SIGKILL pending, and the number cannot be
            // reused while any of it lives: the guard forgets it. The cgroup goes too.
            self.guard.released(Some(pid), p.cgroup);
            let slot = self.sup.info(id).map(|w| w.slot);
            if let (Some(slot), Some(link)) = (slot, &p.link) {
                // Its count stays in its slot's total (a counter never goes down).
                if self.handed_gone.len() <= slot {
                    self.handed_gone.resize(slot + 1, 0);
                }
                self.handed_gone[slot] += link.handed();
            }
            // First the core (which routes the slot away), then the connections the
            // worker never read go to the workers that remain.
            self.feed(Input::Exited { id, status });
            match p.link {
                Some(Link::Channel(ch)) => self.hand_back(ch.reclaim(), slot, pid),
                Some(Link::Node(n)) => self.hand_back(n.reclaim_after_exit(), slot, pid),
                None => {}
            }
        }
    }

    /// Takes back what a live worker (found stuck, and routed away) has not read.
    fn reclaim(&self, id: WorkerId) {
        if let Some(p) = self.procs.get(&id) {
            let slot = self.sup.info(id).map(|w| w.slot);
            match &p.link {
                Some(Link::Channel(ch)) => self.hand_back(ch.reclaim(), slot, p.pid),
                Some(Link::Node(n)) => self.hand_back(n.reclaim_unsent(), slot, p.pid),
                None => {}
            }
        }
    }

    /// Gives the balancer connections a worker never took, to hand out again.
    fn hand_back(&self, conns: Vec<crate::via::channel::Conn>, slot: Option<usize>, pid: u32) {
        if !conns.is_empty() {
            info!(
                event = "reclaimed",
                slot,
                pid,
                count = conns.len(),
                "reclaimed connections the worker never read"
            );
            if let Some(tx) = &self.balancer {
                tx.reclaimed(conns);
            }
        }
    }

    fn command(&mut self, cmd: Option<Command>) {
        match cmd {
            Some(Command::Reload) => self.feed(Input::Reload),
            Some(Command::Terminate) => self.feed(Input::Terminate),
            Some(Command::Kill) => self.feed(Input::KillAll),
            Some(Command::Scale(scale)) => self.scale(scale),
            None => {} // the cluster keeps a handle itself, so this does not happen
        }
    }

    /// Scales to what a handle asked for, or says why not (see [`ClusterHandle::scale`]).
    ///
    /// [`ClusterHandle::scale`]: crate::ClusterHandle::scale
    fn scale(&mut self, scale: handle::Scale) {
        let from = self.sup.slots();
        let to = match scale {
            handle::Scale::To(n) => n as i128,
            handle::Scale::By(delta) => from as i128 + i128::from(delta),
        };
        let refused = |to: i128, why: &str| {
            warn!(event = "scale_refused", from, to = to as i64, "cannot scale the workers: {why}; nothing changes");
        };
        if self.sup.is_terminating() {
            refused(to, "terminating");
        } else if self.setup.via == Via::Socket && self.setup.balance != Balance::Shared {
            refused(to, "under --via socket each slot's sockets are bound at start");
        } else if to < 1 {
            refused(to, "a cluster keeps at least 1 worker");
        } else if to > crate::supervisor::MAX_SLOTS as i128 {
            refused(to, "more than 1024 workers");
        } else if to as usize != from {
            self.feed(Input::Scale(to as usize));
        }
    }

    fn notified(&mut self, msg: NotifyMessage) {
        // Only the worker process itself, as systemd's NotifyAccess=main (DESIGN §4):
        // a datagram from any other pid, its own children included, is ignored.
        let Some(&id) = self.by_pid.get(&msg.pid) else {
            debug!(
                event = "notify_ignored",
                pid = msg.pid,
                "ignored a notify message from a process that is no worker"
            );
            return;
        };
        if msg.ready {
            self.feed(Input::Ready { id });
        }
        if msg.replace {
            self.feed(Input::ReplaceRequested { id });
        }
    }

    fn probe(&mut self) {
        let count = self.launcher.listen_fds();
        let listening: Vec<WorkerId> = self
            .procs
            .iter_mut()
            .filter(|(_, p)| p.probing)
            .filter_map(|(&id, p)| {
                let yes = crate::runtime::probe::is_listening(p.pid, count);
                if yes {
                    p.probing = false;
                }
                yes.then_some(id)
            })
            .collect();
        for id in listening {
            self.feed(Input::Listening { id });
        }
    }

    /// Side effects of an event besides its log line.
    fn report(&mut self, event: &Event) {
        if let Event::Scaled { to, .. } = event {
            // RECLUSTER_WORKERS of new workers, and the counts in the log and STATUS.
            self.setup.workers = *to;
            self.launcher.set_workers(*to);
        }
        self.journal.record(event, self.setup.workers);
        if matches!(event, Event::Exited { .. }) && self.rejoin_slot_sockets() {
            self.steer();
        }
        match event {
            Event::Retiring(w) => {
                if let Some(p) = self.procs.get_mut(&w.id) {
                    p.probing = false;
                }
            }
            Event::CannotExecute { error } if self.fatal.is_none() => {
                self.fatal = Some(Error::Command(CommandError::CannotExecute {
                    program: self.setup.program.clone(),
                    error: *error,
                }));
            }
            Event::StartsFailing {
                failures,
                last,
                worker,
                heard,
            } => {
                let silent = !self.setup.workers_accept() && !heard;
                let text = crate::runtime::advice::advice(&crate::runtime::advice::Situation {
                    balance: self.setup.balance,
                    via: self.setup.via,
                    ready_when: self.setup.ready_when,
                    addrs: &self.addrs,
                    program: self.setup.command.program(),
                    last: *last,
                    failures: *failures,
                    silent,
                });
                warn!(event = "starts_failing",
                    slot = worker.slot,
                    pid = worker.pid,
                    failures,
                    balance = %self.setup.balance,
                    "{text}"
                );
            }
            Event::ClusterReady { generation } | Event::ReloadFinished { generation } => {
                if matches!(event, Event::ReloadFinished { .. }) {
                    self.tally.reloads.finished += 1;
                    self.tally.reload_in_flight = false;
                }
                self.tally.ready_generation = self.tally.ready_generation.max(*generation);
                let workers = self.setup.workers;
                self.tell_service_manager(&format!(
                    "READY=1\nSTATUS=ready: generation {generation}, {workers} workers"
                ));
            }
            Event::ReloadAborted { generation, .. } => {
                self.tally.reloads.aborted += 1;
                self.tally.reload_in_flight = false;
                self.tally.aborted_generation = self.tally.aborted_generation.max(*generation);
                let workers = self.setup.workers;
                self.tell_service_manager(&format!(
                    "READY=1\nSTATUS=reload to generation {generation} aborted: the old workers keep serving, {workers} workers"
                ));
            }
            Event::Scaled { to, .. } => {
                self.tell_service_manager(&format!("STATUS=scaled to {to} workers"));
            }
            Event::ReloadStarted { generation } => {
                self.tally.reloads.started += 1;
                // The one in flight will never finish: the new one overtakes it.
                if std::mem::replace(&mut self.tally.reload_in_flight, true) {
                    self.tally.reloads.superseded += 1;
                }
                // systemd's Type=notify-reload wants the time the reload began.
                let usec = crate::notify::monotonic_usec();
                self.tell_service_manager(&format!(
                    "RELOADING=1\nMONOTONIC_USEC={usec}\nSTATUS=reloading to generation {generation}"
                ));
            }
            Event::Terminating => {
                // A stop overtakes a reload in flight as a newer reload would.
                if std::mem::take(&mut self.tally.reload_in_flight) {
                    self.tally.reloads.superseded += 1;
                }
                self.tell_service_manager("STOPPING=1\nSTATUS=stopping: workers are draining");
                self.close_listeners();
            }
            _ => {}
        }
    }

    /// Sends `state` to the master's own service manager (`NOTIFY_SOCKET`), if any; a
    /// failure is logged and changes nothing else.
    fn tell_service_manager(&self, state: &str) {
        if let Err(e) = crate::notify::notify_service_manager(state) {
            warn!(event = "service_notify_failed", error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
        }
    }

    /// Terminating: new clients are refused at once rather than left to wait in the
    /// backlog until every worker has drained (up to `--timeout`), as nginx and HAProxy
    /// unbind on a graceful stop. In `rr`/`sticky` the balancer closes its sockets. In
    /// `shared` the workers hold the same sockets and close them as they stop: shutting
    /// them down under a draining server would fail its `accept`, and many servers (Go's
    /// `http.Serve`, say) end at once on that, cutting the requests in flight.
    fn close_listeners(&mut self) {
        if let Some(tx) = &self.balancer {
            tx.close_listeners();
        }
    }

    /// Slot `slot`'s socket of listen address `group` (`--via socket`).
    fn slot_socket(&self, group: usize, slot: usize) -> Option<&TcpListener> {
        match slot {
            0 => self.setup.listeners.get(group),
            k => self.setup.slot_sockets.get(k - 1)?.get(group),
        }
    }

    /// Finds slot sockets that stopped listening (a worker's `shutdown()` on its copy
    /// reaches the master's: the socket leaves its group, and what was queued on it is
    /// reset) and makes them listen again, tracking where the kernel now has each
    /// socket in its group. True when a group changed. Run at each exit and change of
    /// the ready set; if several sockets left at once the kernel's order is a guess.
    fn rejoin_slot_sockets(&mut self) -> bool {
        let Some(mut steering) = self.steering.take() else {
            return false;
        };
        let mut changed = false;
        for group in 0..self.setup.listeners.len() {
            for slot in 0..self.setup.workers {
                let Some(socket) = self.slot_socket(group, slot) else { continue };
                if crate::via::socket::is_listening(socket.as_fd()) {
                    continue;
                }
                changed = true;
                steering.left(group, slot);
                let addr = socket.local_addr().ok();
                match crate::via::socket::listen_again(socket.as_fd(), self.setup.backlog) {
                    Ok(()) => {
                        steering.joined(group, slot);
                        warn!(event = "slot_socket_restored", slot, addr = ?addr, "a worker shut down its listening socket (close it instead): the connections queued on it were reset; it listens again");
                    }
                    Err(e) => {
                        tracing::error!(event = "slot_socket_lost", slot, addr = ?addr, error = %e, "a worker shut down its listening socket and it cannot listen again: this slot gets no connections on it; restart the cluster");
                    }
                }
            }
        }
        self.steering = Some(steering);
        changed
    }

    /// Attaches the kernel's slot choice to every listen address's reuseport group
    /// (`--via socket`), through any member still listening: once per change of the
    /// ready set or of a group.
    fn steer(&mut self) {
        let Some(steering) = self.steering.as_mut() else {
            return;
        };
        let ready = steering.ready_slots();
        let (programs, attached) = steering.programs();
        for (group, program) in programs.iter().enumerate() {
            let member = (0..self.setup.workers)
                .filter_map(|slot| self.slot_socket(group, slot))
                .find(|s| crate::via::socket::is_listening(s.as_fd()));
            let Some(member) = member else { continue };
            let addr = member.local_addr().ok();
            match crate::balance::steer::attach(member.as_fd(), program) {
                Ok(()) => info!(event = "steering_attached", attached, ready = ?ready, instructions = program.len(), addr = ?addr, "steering program attached"),
                Err(e) => warn!(event = "steering_failed", error = %e, addr = ?addr, "cannot attach the steering program: the program attached before stays"),
            }
        }
    }

    fn publish(&self) {
        let workers = self.sup.workers();
        let rows = workers
            .iter()
            .map(|w| handle::Row {
                started: self.sup.started_at(w.id).unwrap_or(self.facts.started),
                link: self.procs.get(&w.id).and_then(|p| p.link.clone()),
            })
            .collect();
        let snapshot = Snapshot {
            generation: self.sup.generation(),
            active: self.sup.active_workers(),
            workers,
            facts: Some(self.facts.clone()),
            rows,
            ready_generation: self.tally.ready_generation,
            aborted_generation: self.tally.aborted_generation,
            reloading: self.sup.reloading().is_some(),
            terminating: self.sup.is_terminating(),
            reloads: self.tally.reloads,
            handed_gone: self.handed_gone.clone(),
            restarts: self.sup.restart_counts().to_vec(),
        };
        self.setup.ends.state.send_replace(Arc::new(snapshot));
    }
}

/// A failed step of starting a worker, as the supervisor core takes it.
fn spawn_error(step: SpawnStep, e: &std::io::Error) -> SpawnError {
    SpawnError {
        step,
        errno: e.raw_os_error().unwrap_or(libc::EINVAL),
    }
}

/// What a delivery path gives back goes to the balancer's queue; nowhere once the
/// balancer has ended (the sender is weak: workers left over never keep it alive).
fn give_back(updates: &Updates) -> GiveBack {
    let updates = updates.give_back_to();
    Arc::new(move |returned| {
        if let Some(updates) = updates.upgrade() {
            let _ = updates.send(match returned {
                Returned::Conns(conns) => Update::Reclaimed(conns),
                Returned::Listener(listener) => Update::AddListener(listener),
            });
        }
    })
}
