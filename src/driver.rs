//! The tokio layer that runs the supervisor core: processes, signals, timers, readiness.
//!
//! One task owns the [`Supervisor`] and everything with side effects: it spawns and
//! signals worker processes, reaps them on SIGCHLD, reads readiness from the notify
//! socket or from /proc, sleeps until the core's next deadline, and turns the core's
//! reports into log lines and events. The core decides; this layer only carries out.

use std::collections::{HashMap, VecDeque};
use std::ffi::{CString, OsString};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::time::{sleep_until, Instant};
use tracing::{error, info, warn};

use crate::cluster::{Command, Error, Setup, Snapshot};
use crate::config::{Balance, ReadyWhen};
use crate::notify::{NotifyMessage, NotifySocket};
use crate::supervisor::{Action, Event, ExitStatus, Input, Supervisor, WorkerId, WorkerState};

/// How often a starting worker is checked in /proc for listening (`shared` + `listening`).
const PROBE_INTERVAL: Duration = Duration::from_millis(25);

/// Variables the master sets for workers itself; inherited values are dropped.
const OWN_VARS: &[&str] = &[
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "RECLUSTER_FD",
    "WORKER_ID",
    "RECLUSTER_WORKERS",
    "RECLUSTER_GENERATION",
    "RECLUSTER_BALANCE",
];

/// A live worker process as the driver knows it.
struct Proc {
    pid: u32,
    /// Whether /proc should be polled for this worker's listening.
    probing: bool,
}

/// The driver's state besides the supervisor core.
struct Driver {
    setup: Setup,
    sup: Supervisor,
    notify: NotifySocket,
    program: CString,
    argv: Vec<CString>,
    base_env: Vec<CString>,
    listen_fds: Vec<RawFd>,
    procs: HashMap<WorkerId, Proc>,
    by_pid: HashMap<u32, WorkerId>,
    /// Set once any worker has become ready: from then on spawn errors are retried, not fatal.
    served: bool,
    fatal: Option<Error>,
    exit: bool,
}

/// Runs a cluster until it has terminated.
pub(crate) async fn run(setup: Setup) -> Result<(), Error> {
    let io = |context| move |source| Error::Io { context, source };
    let mut sigchld = signal(SignalKind::child()).map_err(io("cannot watch SIGCHLD"))?;
    let notify = NotifySocket::bind().map_err(io("cannot create the notify socket"))?;
    for (index, l) in setup.listeners.iter().enumerate() {
        if let Ok(addr) = l.local_addr() {
            info!(addr = %addr, index, balance = %setup.balance, "listening");
        }
    }
    let mut driver = Driver::new(setup, notify);
    let first = driver.sup.start(Instant::now());
    driver.apply(first);

    let mut probe = tokio::time::interval(PROBE_INTERVAL);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !driver.exit {
        let deadline = driver.sup.next_deadline();
        let probing = driver.procs.values().any(|p| p.probing);
        tokio::select! {
            _ = sigchld.recv() => driver.reap(),
            cmd = driver.setup.commands.recv() => driver.command(cmd),
            msg = driver.notify.recv() => match msg {
                Ok(msg) => driver.notified(msg),
                Err(e) => warn!(error = %e, "notify socket receive failed"),
            },
            _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                driver.feed(Input::Tick);
            }
            _ = probe.tick(), if probing => driver.probe(),
        }
        driver.publish();
    }
    match driver.fatal.take() {
        Some(e) => Err(e),
        None => {
            info!("terminated");
            Ok(())
        }
    }
}

impl Driver {
    fn new(setup: Setup, notify: NotifySocket) -> Driver {
        let program = CString::new(setup.program.as_os_str().as_bytes())
            .unwrap_or_else(|_| CString::from(c"/nonexistent-nul-in-path"));
        let argv = std::iter::once(setup.command.program.clone())
            .chain(setup.command.args.iter().cloned())
            .map(cstring)
            .collect();
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(k, _)| !OWN_VARS.iter().any(|v| k == v))
            .collect();
        for (k, v) in &setup.command.env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        let mut base_env: Vec<CString> = env.into_iter().map(|(k, v)| assignment(&k, &v)).collect();
        base_env.push(assignment("RECLUSTER_WORKERS", &setup.workers.to_string()));
        base_env.push(assignment("RECLUSTER_BALANCE", setup.balance.as_str()));
        base_env.push(assignment("NOTIFY_SOCKET", notify.path().as_os_str()));
        let listen_fds: Vec<RawFd> = setup.listeners.iter().map(|l| l.as_raw_fd()).collect();
        if setup.balance == Balance::Shared {
            base_env.push(assignment("LISTEN_FDS", &listen_fds.len().to_string()));
            let names: Vec<String> = (0..listen_fds.len()).map(|i| format!("listen{i}")).collect();
            base_env.push(assignment("LISTEN_FDNAMES", &names.join(":")));
        }
        Driver {
            sup: Supervisor::new(setup.workers, setup.timing),
            setup,
            notify,
            program,
            argv,
            base_env,
            listen_fds,
            procs: HashMap::new(),
            by_pid: HashMap::new(),
            served: false,
            fatal: None,
            exit: false,
        }
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
                    self.signal(id, self.setup.stop_signal);
                    if let Some(p) = self.procs.get_mut(&id) {
                        p.probing = false;
                    }
                    Vec::new()
                }
                Action::Kill { id } => {
                    self.signal(id, Signal::SIGKILL);
                    Vec::new()
                }
                Action::Route { .. } => Vec::new(), // connections go straight to workers in `shared`
                Action::Report(event) => {
                    self.report(&event);
                    let _ = self.setup.events.send(event);
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
        let mut env = self.base_env.clone();
        env.push(assignment("WORKER_ID", &slot.to_string()));
        env.push(assignment("RECLUSTER_GENERATION", &generation.to_string()));
        let shared = self.setup.balance == Balance::Shared;
        let spec = crate::spawn::SpawnSpec {
            program: &self.program,
            args: &self.argv,
            env: &env,
            fds: &self.listen_fds,
            listen_pid: shared,
        };
        let now = Instant::now();
        match crate::spawn::spawn(&spec) {
            Ok(pid) => {
                let probing = shared && self.setup.ready_when == ReadyWhen::Listening;
                self.procs.insert(id, Proc { pid, probing });
                self.by_pid.insert(pid, id);
                let mut out = self.sup.handle(Input::Spawned { id, pid }, now);
                if self.setup.ready_when == ReadyWhen::Started {
                    out.extend(self.sup.handle(Input::Ready { id }, now));
                }
                out
            }
            Err(e) => {
                let fatal = !self.served
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT | libc::EACCES | libc::ENOEXEC | libc::ENOTDIR)
                    );
                let out = self.sup.handle(
                    Input::SpawnFailed {
                        id,
                        error: e.to_string(),
                    },
                    now,
                );
                if fatal && self.fatal.is_none() {
                    self.fatal = Some(Error::Command(format!(
                        "cannot execute {}: {e}",
                        self.setup.program.display()
                    )));
                    let mut out = out;
                    out.extend(self.sup.handle(Input::KillAll, now));
                    return out;
                }
                out
            }
        }
    }

    fn signal(&self, id: WorkerId, signal: Signal) {
        if let Some(p) = self.procs.get(&id) {
            // Each worker leads its own process group: the signal reaches what it forked too.
            let _ = killpg(Pid::from_raw(p.pid as i32), signal);
        }
    }

    fn reap(&mut self) {
        let exited: Vec<(WorkerId, u32, ExitStatus)> = self
            .procs
            .iter()
            .filter_map(|(&id, p)| crate::reap::try_reap(p.pid).map(|s| (id, p.pid, s)))
            .collect();
        for (id, pid, status) in exited {
            self.procs.remove(&id);
            self.by_pid.remove(&pid);
            self.feed(Input::Exited { id, status });
        }
    }

    fn command(&mut self, cmd: Option<Command>) {
        match cmd {
            Some(Command::Reload) => self.feed(Input::Reload),
            Some(Command::Terminate) => self.feed(Input::Terminate),
            Some(Command::Kill) => self.feed(Input::KillAll),
            None => {} // the cluster keeps a handle itself, so this does not happen
        }
    }

    fn notified(&mut self, msg: NotifyMessage) {
        let Some(&id) = self.by_pid.get(&msg.pid) else {
            return; // not a worker of ours: ignored, as systemd's NotifyAccess=main
        };
        if msg.ready && self.setup.ready_when != ReadyWhen::Started {
            self.feed(Input::Ready { id });
        }
    }

    fn probe(&mut self) {
        let count = self.listen_fds.len();
        let listening: Vec<WorkerId> = self
            .procs
            .iter_mut()
            .filter(|(_, p)| p.probing)
            .filter_map(|(&id, p)| {
                let yes = crate::probe::is_listening(p.pid, count);
                if yes {
                    p.probing = false;
                }
                yes.then_some(id)
            })
            .collect();
        for id in listening {
            self.feed(Input::Ready { id });
        }
    }

    fn report(&mut self, event: &Event) {
        match event {
            Event::Spawned(w) => {
                info!(slot = w.slot, pid = w.pid, generation = w.generation, "worker spawned")
            }
            Event::SpawnFailed {
                slot,
                generation,
                error,
            } => error!(slot, generation, error = %error, "spawn failed"),
            Event::Ready(w) => {
                self.served = true;
                info!(slot = w.slot, pid = w.pid, generation = w.generation, "worker ready")
            }
            Event::Retiring(w) => {
                if let Some(p) = self.procs.get_mut(&w.id) {
                    p.probing = false;
                }
                info!(slot = w.slot, pid = w.pid, generation = w.generation, "worker retiring")
            }
            Event::Exited { worker: w, status } => {
                let expected = w.state == WorkerState::Retiring;
                match (status, expected) {
                    (ExitStatus::Code(code), true) => info!(
                        slot = w.slot,
                        pid = w.pid,
                        generation = w.generation,
                        code,
                        "worker exited"
                    ),
                    (ExitStatus::Signal(signal), true) => info!(
                        slot = w.slot,
                        pid = w.pid,
                        generation = w.generation,
                        signal,
                        "worker exited"
                    ),
                    (ExitStatus::Code(code), false) => warn!(
                        slot = w.slot,
                        pid = w.pid,
                        generation = w.generation,
                        code,
                        "worker exited"
                    ),
                    (ExitStatus::Signal(signal), false) => warn!(
                        slot = w.slot,
                        pid = w.pid,
                        generation = w.generation,
                        signal,
                        "worker exited"
                    ),
                }
            }
            Event::RespawnScheduled { slot, delay } => {
                info!(slot, delay_ms = delay.as_millis() as u64, "respawn scheduled")
            }
            Event::NotReadyInTime(w) => warn!(
                slot = w.slot,
                pid = w.pid,
                generation = w.generation,
                "worker not ready in time"
            ),
            Event::KilledAfterTimeout(w) => warn!(
                slot = w.slot,
                pid = w.pid,
                generation = w.generation,
                "worker killed after timeout"
            ),
            Event::ReplaceStarted(w) => info!(
                slot = w.slot,
                pid = w.pid,
                generation = w.generation,
                "worker asked to be replaced"
            ),
            Event::ReloadStarted { generation } => info!(generation, "reload started"),
            Event::ReloadFinished { generation } => info!(generation, "reload finished"),
            Event::ClusterReady { generation } => {
                info!(generation, workers = self.setup.workers, "cluster ready");
                if let Err(e) = crate::notify::notify_service_manager("READY=1") {
                    warn!(error = %e, "cannot tell the service manager we are ready");
                }
            }
            Event::Terminating => {
                info!("terminating");
                let _ = crate::notify::notify_service_manager("STOPPING=1");
            }
        }
    }

    fn publish(&self) {
        let snapshot = Snapshot {
            generation: self.sup.generation(),
            active: self.sup.active_workers(),
            workers: self.sup.workers(),
        };
        self.setup.state.send_replace(Arc::new(snapshot));
    }
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
