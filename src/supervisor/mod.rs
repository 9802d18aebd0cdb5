//! The pure supervisor core: slots, generations, reload, respawn, timeouts.
//!
//! This is the whole lifecycle policy of a cluster (DESIGN §5) as a state machine with
//! no I/O. The tokio layer (the `runtime` module) feeds it [`Input`]s — a worker was
//! spawned, became ready, exited; a reload or terminate was asked for — together with
//! the current time, and carries out the [`Action`]s it returns: spawn, stop, kill,
//! route. Timers are deadlines kept here; the driver sleeps until
//! [`Supervisor::next_deadline`] and then hands in [`Input::Tick`]. Because time only
//! enters as an argument, the rules are unit-tested on tokio's paused clock.
//!
//! The rules, in one place:
//! * A slot holds at most one *active* (ready) worker and one *pending* replacement;
//!   any number of *retiring* workers may still be draining.
//! * **Reload** bumps the generation and starts a pending worker in every slot. When a
//!   slot's pending worker becomes ready it turns active and the slot's previous active
//!   worker retires. An old worker is never retired before its replacement is ready.
//!   A reload during a reload supersedes the older pending workers (they retire at once;
//!   they never served).
//! * **Rolling reload** (`--reload-batch K`, K > 0; 0 means every slot at once): a
//!   reload starts pending workers in at most K slots, lowest first; each time a slot's
//!   new worker becomes ready (its old worker retires) the next waiting slot starts, so
//!   at most K slots are mid-replacement: a slot is while a worker starts for it or
//!   its respawn is due, whatever the cause (its turn, a worker that died or asked to
//!   be replaced), so at most N + K workers serve or start. A slot with no worker
//!   serving never waits for a turn: it starts the new generation at once (or when
//!   its respawn is due). A worker that asks to be replaced while its slot waits for
//!   its turn is replaced in that turn.)
//! * **Reload abort** (`--reload-abort-after M`, M > 0; 0 means never): M failed starts
//!   in a row (see "Failing starts") of the reload's new workers abandon the reload:
//!   its pending workers retire, the respawn timers of slots that still have an old
//!   worker are cancelled, and those slots keep their old workers; slots already
//!   replaced keep their new ones (and a replacement their worker asked for); a slot
//!   with no worker keeps, or gets, its respawn. Workers started later (a respawn, a
//!   scale) run the command as it is then, under the aborted generation's number. The reload ends ([`Event::ReloadAborted`]; no
//!   [`Event::ReloadFinished`]). A new worker that gets ready ends the streak. A later
//!   reload starts afresh, with a new generation.
//! * **Scale** ([`Input::Scale`]) to n slots, 1 ≤ n ≤ [`MAX_SLOTS`] (anything else
//!   changes nothing): growing adds slots, each starting a worker of the current
//!   generation at once (so during a reload, of the new one), which joins routing when
//!   ready as any worker does. Shrinking removes the highest slots: each one's active
//!   worker is routed away, then retires; its pending worker retires; its respawn is
//!   cancelled. A reload in progress then waits only for the slots that remain.
//!   Reported as [`Event::Scaled`].
//! * **Respawn**: when a slot loses its active worker, or its pending worker dies or is
//!   not ready within `ready_timeout`, a new worker of the current generation is
//!   started after the slot's delay. The delay starts at `respawn` and doubles per quick
//!   successive failure up to `backoff`; a worker that stayed up for `backoff` resets
//!   it. `backoff` zero disables doubling. Backoff is per slot.
//!   A spawn that fails (fork, exec, the worker channel) is retried no sooner than
//!   [`SPAWN_RETRY`], even with a zero `respawn`: it fails within the same turn, and
//!   retrying at once would never yield.
//! * **Retire**: a retiring worker gets the stop action at once and is killed after
//!   `timeout`.
//! * **Terminate**: every worker retires, no respawn happens any more, and
//!   [`Action::Exit`] is returned once the last worker has exited.
//!
//! * **Failing starts**: a worker that exits before it is ready (and was not told to
//!   stop), or is not ready in time, failed to start; under `--ready-when started`,
//!   where readiness says nothing, a worker that exits within [`QUICK_EXIT`] of its
//!   start. A worker that gets ready ends the streak (under `started`: one that lives
//!   past [`QUICK_EXIT`]). The third failed start in a row, or the first not ready in
//!   time, reports [`Event::StartsFailing`], once in the cluster's life: the usual
//!   cause is a server that binds the port itself or ignores what it was given, and
//!   the log says what a worker must do instead.
//!
//! * **Readiness** follows `--ready-when`: `started` makes a worker ready once it is
//!   spawned; `listening` on [`Input::Listening`] (the worker library says so, or /proc
//!   shows it) or on an explicit [`Input::Ready`]; `ready` on [`Input::Ready`] alone.
//! * **Garbage**: a worker that sends what is not protocol ([`Input::Garbage`]) is
//!   reported at the 1st, 2nd, 4th, 8th … message, and killed at the
//!   [`GARBAGE_LIMIT`]th (then respawned as any dead worker is).
//! * **Stuck**: an active worker that has left a connection unread for
//!   `--stuck-timeout` ([`Input::Stuck`], found by the balancer) is treated as one that
//!   was not ready in time: routed away at once (its clients go to their next choice),
//!   the connections queued to it are taken back ([`Action::Reclaim`]) and handed to
//!   the others, it retires ([`Action::Drain`]: the stop message without the stop
//!   signal, so a worker that was only slow, busy with one long request, finishes it
//!   and then reads `stop`; SIGKILL after `timeout`), and its slot is respawned as for
//!   a worker that died. Reported once per worker ([`Event::Stuck`]).
//! * **A command that cannot run**: when a spawn fails because the program cannot be
//!   executed ([`SpawnError::cannot_execute`]) before any worker was ever ready, the
//!   cluster gives up ([`Event::CannotExecute`]): every worker is killed and the run
//!   ends with that error, instead of respawning forever. Once a worker has been
//!   ready, the same failure (say, a deploy that removed the binary mid-reload) is
//!   retried with backoff while the old workers keep serving.
//!
//! Readiness is counted per slot and generation: a `Ready` from a worker that is not
//! its slot's pending worker (superseded, retired, unknown) is ignored. This is where
//! recluster, which counts ready events globally, can retire workers early.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use crate::config::{ReadyWhen, RollingReload, Timing};

/// Under `--ready-when started`, a worker that exits within this time of its start
/// (not told to stop) failed to start.
pub const QUICK_EXIT: Duration = Duration::from_secs(5);

/// Least time before a worker whose spawn failed (fork, exec, its channel) is
/// started again, whatever `--respawn` says.
pub const SPAWN_RETRY: Duration = Duration::from_millis(100);

/// The most slots a cluster may be scaled to ([`Input::Scale`]).
pub const MAX_SLOTS: usize = 1024;

/// Failed starts in a row that make the cluster report [`Event::StartsFailing`].
pub const FAILED_STARTS_TO_REPORT: u32 = 3;

/// Messages that are not protocol after which a worker is killed (and so replaced);
/// a power of two, so the last report comes with the kill.
pub const GARBAGE_LIMIT: u32 = 64;

/// Why a worker process could not be started: the errno, and the step that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpawnError {
    /// The step that failed.
    pub step: SpawnStep,
    /// The operating system's error number.
    pub errno: i32,
}

/// The step of starting a worker that can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpawnStep {
    /// Creating the worker channel (`rr`/`sticky`).
    Channel,
    /// Forking and executing the command.
    Launch,
    /// Creating the pipes of the worker's stdout and stderr (`--prefix`).
    Output,
}

impl SpawnError {
    /// The command itself cannot be executed (missing, not executable, not a program),
    /// so retrying cannot help.
    pub fn cannot_execute(&self) -> bool {
        self.step == SpawnStep::Launch
            && matches!(
                self.errno,
                libc::ENOENT | libc::EACCES | libc::ENOEXEC | libc::ENOTDIR
            )
    }
}

impl fmt::Display for SpawnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let os = std::io::Error::from_raw_os_error(self.errno);
        match self.step {
            SpawnStep::Channel => write!(f, "cannot create the worker channel: {os}"),
            SpawnStep::Launch => write!(f, "{os}"),
            SpawnStep::Output => write!(f, "cannot create the output pipes: {os}"),
        }
    }
}

/// Why a worker failed to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartFailure {
    /// It exited before it was ready (under `started`: within [`QUICK_EXIT`]).
    Exited(ExitStatus),
    /// It was not ready within the ready timeout.
    NotReady,
}

/// Identifies one worker process for the life of a cluster (never reused, unlike slots and pids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

/// Where a worker is in its life: `starting → ready → retiring`, or `starting → retiring`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorkerState {
    /// Spawned (or being spawned), not ready yet; receives no connections.
    Starting,
    /// Ready and active in its slot: the only state that receives connections.
    Ready,
    /// Told to stop; draining until it exits or is killed after the timeout.
    Retiring,
}

/// What is known about one live worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerInfo {
    /// Names this process for the cluster's whole life (slots and pids are reused).
    pub id: WorkerId,
    /// Its slot, which is its `WORKER_ID`.
    pub slot: usize,
    /// The generation it was started for.
    pub generation: u64,
    /// Its process id, once spawned.
    pub pid: Option<u32>,
    /// Whether it may receive connections (`Ready`), is starting, or is draining.
    pub state: WorkerState,
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal number.
    Signal(i32),
    /// It is gone, but how it ended is unknown (someone else reaped it).
    Unknown,
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "code={c}"),
            ExitStatus::Signal(s) => write!(f, "signal={s}"),
            ExitStatus::Unknown => write!(f, "status=unknown"),
        }
    }
}

/// Something that happened, as the supervisor core is told it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// Nothing happened but time passed: fire due timers.
    Tick,
    /// Replace every worker with one of a new generation.
    Reload,
    /// Run this many slots from now on (1 ≤ n ≤ [`MAX_SLOTS`]; else nothing changes).
    Scale(usize),
    /// Stop every worker gracefully and finish.
    Terminate,
    /// Kill every worker at once and finish (a second SIGINT).
    KillAll,
    /// The process for a [`Action::Spawn`] exists with this pid.
    Spawned {
        /// The worker the spawn was for.
        id: WorkerId,
        /// Its process id.
        pid: u32,
    },
    /// The process for a [`Action::Spawn`] could not be started.
    SpawnFailed {
        /// The worker the spawn was for.
        id: WorkerId,
        /// What went wrong.
        error: SpawnError,
    },
    /// The worker listens: its library said so, or /proc shows it accepting.
    Listening {
        /// Which worker it is about.
        id: WorkerId,
    },
    /// The worker says it is ready (`ready` on its channel, `READY=1` on sd_notify).
    Ready {
        /// Which worker it is about.
        id: WorkerId,
    },
    /// The worker sent a message that is not protocol.
    Garbage {
        /// Which worker it is about.
        id: WorkerId,
    },
    /// The worker asked to be replaced (recluster's `disconnect` message).
    ReplaceRequested {
        /// Which worker it is about.
        id: WorkerId,
    },
    /// The worker has left the oldest connection queued to it unread this long
    /// (`--stuck-timeout` or more): alive, but not reading its channel.
    Stuck {
        /// Which worker it is about.
        id: WorkerId,
        /// How long its oldest unread connection has waited, as far as the balancer saw.
        unread_for: Duration,
    },
    /// The worker sent a message of the application's own (Node's `process.send`), as
    /// JSON text; passed on to the event stream.
    Message {
        /// Which worker it is about.
        id: WorkerId,
        /// The message, as the worker wrote it (one line of JSON, at most 64 KiB).
        text: String,
    },
    /// The worker process was reaped.
    Exited {
        /// Which worker it is about.
        id: WorkerId,
        /// How it ended.
        status: ExitStatus,
    },
}

/// What the supervisor core asks the I/O layer to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a process for this worker, then report [`Input::Spawned`] or [`Input::SpawnFailed`].
    Spawn {
        /// The new worker.
        id: WorkerId,
        /// Its slot (`WORKER_ID`).
        slot: usize,
        /// Its generation (`RECLUSTER_GENERATION`).
        generation: u64,
    },
    /// Tell the worker to stop: stop message and stop signal.
    Stop {
        /// Which worker it is about.
        id: WorkerId,
    },
    /// Tell a stuck worker to stop without cutting what it holds: the stop message on
    /// its worker channel only (it reads it once it reads again), no stop signal; under
    /// Node's IPC the stop signal, since a Node worker that holds its event loop that
    /// long serves none of its connections and its unaccepted ones come back at its exit.
    Drain {
        /// Which worker it is about.
        id: WorkerId,
    },
    /// Kill the worker (SIGKILL).
    Kill {
        /// Which worker it is about.
        id: WorkerId,
    },
    /// Take back the connections queued to the worker and not read yet, and hand them
    /// to other workers (it was routed away just before).
    Reclaim {
        /// Which worker it is about.
        id: WorkerId,
    },
    /// The slot's active worker changed: route its connections to `worker`, or nowhere.
    Route {
        /// The slot (`WORKER_ID`) whose connections are re-routed.
        slot: usize,
        /// Its new active worker, if any.
        worker: Option<WorkerId>,
    },
    /// Report a lifecycle event (logs and the event stream).
    Report(Event),
    /// Terminating is complete: every worker has exited.
    Exit,
}

/// A lifecycle event of the cluster, as logged and as sent on the event stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A worker process was started.
    Spawned(WorkerInfo),
    /// A worker process could not be started.
    SpawnFailed {
        /// The slot that stays without a new worker until the respawn.
        slot: usize,
        /// The generation it was started for.
        generation: u64,
        /// Why.
        error: SpawnError,
    },
    /// The command cannot be executed and no worker was ever ready: the cluster gives up.
    CannotExecute {
        /// Why.
        error: SpawnError,
    },
    /// A worker sent a message that is not protocol (reported at counts 1, 2, 4, 8, …).
    Garbage {
        /// The worker, as the core knew it then.
        worker: WorkerInfo,
        /// Messages that were not protocol so far.
        count: u32,
    },
    /// A worker sent [`GARBAGE_LIMIT`] messages that are not protocol and is killed.
    KilledForGarbage(WorkerInfo),
    /// A worker became ready and active in its slot.
    Ready(WorkerInfo),
    /// A worker was told to stop.
    Retiring(WorkerInfo),
    /// A worker process exited.
    Exited {
        /// The worker, as it was.
        worker: WorkerInfo,
        /// How it ended.
        status: ExitStatus,
    },
    /// A slot will get a new worker after this delay.
    RespawnScheduled {
        /// The slot that waits.
        slot: usize,
        /// How long it waits: `--respawn`, doubled per quick failure up to `--backoff`.
        delay: Duration,
    },
    /// A starting worker did not become ready within the ready timeout; it is stopped.
    NotReadyInTime(WorkerInfo),
    /// A retiring worker was still alive after the timeout and was killed.
    KilledAfterTimeout(WorkerInfo),
    /// A worker asked to be replaced; its replacement is starting.
    ReplaceStarted(WorkerInfo),
    /// An active worker left a connection unread for `--stuck-timeout`: routed away,
    /// its queue reclaimed, retired and replaced.
    Stuck {
        /// The worker, as it was when found stuck.
        worker: WorkerInfo,
        /// How long its oldest unread connection had waited.
        unread_for: Duration,
    },
    /// A reload started this generation.
    ReloadStarted {
        /// The new generation.
        generation: u64,
    },
    /// Every slot is served by a worker of this generation.
    ReloadFinished {
        /// The generation number (1 at start, +1 per reload).
        generation: u64,
    },
    /// The reload to this generation was abandoned after failed starts in a row: slots
    /// not yet replaced keep their old workers (slots already replaced keep their new ones).
    ReloadAborted {
        /// The generation the reload was for.
        generation: u64,
        /// Failed starts in a row of its new workers.
        failures: u32,
    },
    /// The number of slots changed.
    Scaled {
        /// Slots before.
        from: usize,
        /// Slots now.
        to: usize,
    },
    /// Every slot has had a ready worker for the first time.
    ClusterReady {
        /// The generation number (1 at start, +1 per reload).
        generation: u64,
    },
    /// Workers keep failing to start (see the module docs); reported once per cluster.
    StartsFailing {
        /// Failed starts in a row so far.
        failures: u32,
        /// How the last one failed.
        last: StartFailure,
        /// The last one.
        worker: WorkerInfo,
        /// Whether the last one ever said anything (a message on its channel or its
        /// notify socket, protocol or not).
        heard: bool,
    },
    /// Terminate started.
    Terminating,
    /// A worker sent a message of the application's own (`--via node`: `process.send`).
    Message {
        /// The worker, as the core knew it then (its slot is `WORKER_ID`).
        worker: WorkerInfo,
        /// The message as JSON text.
        text: String,
    },
}

#[derive(Debug)]
struct Worker {
    info: WorkerInfo,
    started_at: Instant,
    /// While starting: the ready deadline. While retiring: the kill deadline.
    deadline: Option<Instant>,
    /// It has said something (any message on its channel or notify socket).
    heard: bool,
    /// Messages it sent that were not protocol.
    garbage: u32,
    /// Killed before its pid was known: kill it as soon as it is.
    kill_pending: bool,
}

#[derive(Debug)]
struct Slot {
    active: Option<WorkerId>,
    pending: Option<WorkerId>,
    respawn_at: Option<Instant>,
    /// The delay the next respawn of this slot will wait.
    delay: Duration,
    /// Waiting for its turn in a rolling reload (no pending worker started for it yet).
    queued: bool,
}

impl Slot {
    fn new(delay: Duration) -> Slot {
        Slot {
            active: None,
            pending: None,
            respawn_at: None,
            delay,
            queued: false,
        }
    }
}

/// The cluster's lifecycle state machine; see the module docs for its rules.
#[derive(Debug)]
pub struct Supervisor {
    timing: Timing,
    ready_when: ReadyWhen,
    rolling: RollingReload,
    slots: Vec<Slot>,
    workers: BTreeMap<WorkerId, Worker>,
    generation: u64,
    next_id: u64,
    terminating: bool,
    reloading: Option<u64>,
    cluster_ready: bool,
    exited: bool,
    /// Failed starts in a row (see the module docs).
    failed_starts: u32,
    /// Whether [`Event::StartsFailing`] has been reported.
    starts_failing_reported: bool,
    /// Whether any worker has ever been ready.
    served: bool,
    /// Per slot index: workers started to replace one that died, failed to start, was
    /// stuck or asked to be replaced (never shrinks, see `count_restart`).
    restarts: Vec<u64>,
    /// Failed starts in a row of the current reload's new workers.
    reload_failures: u32,
}

impl Supervisor {
    /// A supervisor for `slots` slots; nothing runs until [`Supervisor::start`].
    pub fn new(slots: usize, timing: Timing) -> Supervisor {
        Supervisor {
            timing,
            ready_when: ReadyWhen::default(),
            rolling: RollingReload::default(),
            slots: (0..slots).map(|_| Slot::new(timing.respawn)).collect(),
            workers: BTreeMap::new(),
            generation: 1,
            next_id: 0,
            terminating: false,
            reloading: None,
            cluster_ready: false,
            exited: false,
            failed_starts: 0,
            starts_failing_reported: false,
            served: false,
            restarts: Vec::new(),
            reload_failures: 0,
        }
    }

    /// How reloads roll through the slots (`--reload-batch`, `--reload-abort-after`).
    pub fn with_rolling(mut self, rolling: RollingReload) -> Supervisor {
        self.rolling = rolling;
        self
    }

    /// The readiness rule (`--ready-when`; the default is `listening`).
    pub fn with_ready_when(mut self, ready_when: ReadyWhen) -> Supervisor {
        self.ready_when = ready_when;
        self
    }

    /// Starts the first generation: a worker in every slot.
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        for slot in 0..self.slots.len() {
            self.spawn(slot, now, &mut out);
        }
        if self.slots.is_empty() {
            self.cluster_ready = true;
        }
        out
    }

    /// Applies one input at time `now`, fires every timer due by then, and returns the actions.
    pub fn handle(&mut self, input: Input, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Tick => {}
            Input::Reload => self.reload(now, &mut out),
            Input::Scale(n) => self.scale(n, now, &mut out),
            Input::Terminate => self.terminate(now, &mut out),
            Input::KillAll => self.kill_all(now, &mut out),
            Input::Spawned { id, pid } => {
                if let Some(w) = self.workers.get_mut(&id) {
                    w.info.pid = Some(pid);
                    out.push(Action::Report(Event::Spawned(w.info)));
                    if w.kill_pending {
                        out.push(Action::Kill { id });
                    } else if w.info.state == WorkerState::Retiring {
                        // Told to stop before its pid was known: tell it now.
                        out.push(Action::Stop { id });
                    } else if self.ready_when == ReadyWhen::Started {
                        self.ready(id, now, &mut out);
                    }
                }
            }
            Input::SpawnFailed { id, error } => {
                if let Some(w) = self.workers.get(&id) {
                    out.push(Action::Report(Event::SpawnFailed {
                        slot: w.info.slot,
                        generation: w.info.generation,
                        error,
                    }));
                }
                self.gone(id, None, now, &mut out);
                if error.cannot_execute() && !self.served && !self.terminating {
                    out.push(Action::Report(Event::CannotExecute { error }));
                    self.kill_all(now, &mut out);
                }
            }
            Input::Listening { id } => {
                if self.heard(id) && self.ready_when == ReadyWhen::Listening {
                    self.ready(id, now, &mut out);
                }
            }
            Input::Ready { id } => {
                if self.heard(id) && self.ready_when != ReadyWhen::Started {
                    self.ready(id, now, &mut out);
                }
            }
            Input::Garbage { id } => self.garbage(id, &mut out),
            Input::ReplaceRequested { id } => {
                if self.heard(id) {
                    self.replace(id, now, &mut out)
                }
            }
            Input::Stuck { id, unread_for } => self.stuck(id, unread_for, now, &mut out),
            Input::Message { id, text } => {
                if self.heard(id) {
                    if let Some(w) = self.workers.get(&id) {
                        out.push(Action::Report(Event::Message {
                            worker: w.info,
                            text,
                        }));
                    }
                }
            }
            Input::Exited { id, status } => self.gone(id, Some(status), now, &mut out),
        }
        self.fire_timers(now, &mut out);
        self.check_exit(&mut out);
        out
    }

    /// The earliest time at which [`Input::Tick`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let slots = self.slots.iter().filter_map(|s| s.respawn_at);
        let workers = self.workers.values().filter_map(|w| w.deadline);
        slots.chain(workers).min()
    }

    /// The current generation (1 for the first, +1 per reload).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The generation a reload under way is bringing in, if one is.
    pub fn reloading(&self) -> Option<u64> {
        self.reloading
    }

    /// Whether terminate has started.
    pub fn is_terminating(&self) -> bool {
        self.terminating
    }

    /// The number of slots.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Whether every slot has had a ready worker at least once.
    pub fn is_cluster_ready(&self) -> bool {
        self.cluster_ready
    }

    /// One entry per slot: its active worker, or `None` (recluster's `activeWorkers()`).
    pub fn active_workers(&self) -> Vec<Option<WorkerInfo>> {
        self.slots
            .iter()
            .map(|s| s.active.and_then(|id| self.info(id)))
            .collect()
    }

    /// Every live worker: starting, ready and retiring.
    pub fn workers(&self) -> Vec<WorkerInfo> {
        self.workers.values().map(|w| w.info).collect()
    }

    /// The current record of one live worker.
    pub fn info(&self, id: WorkerId) -> Option<WorkerInfo> {
        self.workers.get(&id).map(|w| w.info)
    }

    /// Workers started in `slot` to replace one that died, failed to start, was stuck
    /// or asked to be replaced; reloads do not count.
    pub fn restarts(&self, slot: usize) -> u64 {
        self.restarts.get(slot).copied().unwrap_or(0)
    }

    /// [`Supervisor::restarts`] of every slot index so far (scaled away ones included).
    pub fn restart_counts(&self) -> &[u64] {
        &self.restarts
    }

    /// When a live worker was started (asked to spawn).
    pub fn started_at(&self, id: WorkerId) -> Option<Instant> {
        self.workers.get(&id).map(|w| w.started_at)
    }

    /// Counts a restart of `slot`; the counts outlive a slot scaled away, so that a
    /// slot added again at the same index counts on from them (they only grow).
    fn count_restart(&mut self, slot: usize) {
        if self.restarts.len() <= slot {
            self.restarts.resize(slot + 1, 0);
        }
        self.restarts[slot] += 1;
    }

    fn spawn(&mut self, slot: usize, now: Instant, out: &mut Vec<Action>) {
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        let info = WorkerInfo {
            id,
            slot,
            generation: self.generation,
            pid: None,
            state: WorkerState::Starting,
        };
        self.workers.insert(
            id,
            Worker {
                info,
                started_at: now,
                // Zero means no ready deadline, as systemd's TimeoutStartSec=0.
                deadline: (!self.timing.ready_timeout.is_zero())
                    .then(|| now + self.timing.ready_timeout),
                heard: false,
                garbage: 0,
                kill_pending: false,
            },
        );
        let s = &mut self.slots[slot];
        s.pending = Some(id);
        s.respawn_at = None;
        s.queued = false;
        out.push(Action::Spawn {
            id,
            slot,
            generation: self.generation,
        });
    }

    fn retire(&mut self, id: WorkerId, now: Instant, out: &mut Vec<Action>) {
        let timeout = self.timing.timeout;
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let kill_at = now + timeout;
        if w.info.state == WorkerState::Retiring {
            // Already told to stop; a terminate may only bring the kill closer.
            w.deadline = w.deadline.map(|d| d.min(kill_at));
            return;
        }
        w.info.state = WorkerState::Retiring;
        w.deadline = Some(kill_at);
        out.push(Action::Report(Event::Retiring(w.info)));
        out.push(Action::Stop { id });
    }

    fn reload(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.terminating {
            return;
        }
        self.generation += 1;
        self.reloading = Some(self.generation);
        self.reload_failures = 0;
        out.push(Action::Report(Event::ReloadStarted {
            generation: self.generation,
        }));
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            let superseded = s.pending.take();
            let serving = s.active.is_some();
            if serving {
                // A respawn of a replacement that failed is superseded too: the slot
                // waits for its turn.
                s.respawn_at = None;
                s.queued = true;
            }
            let due = !serving && s.respawn_at.is_none();
            if let Some(old) = superseded {
                self.retire(old, now, out);
            }
            if due {
                // No worker serves it: it starts the new generation now (or when its
                // respawn is due), never waiting for a turn it does not need.
                self.spawn(slot, now, out);
            }
        }
        self.roll(now, out);
        self.check_reload_finished(out);
    }

    /// Starts the waiting slots of a reload, lowest first, while fewer than the batch
    /// are mid-replacement (see "Rolling reload" in the module docs).
    fn roll(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.reloading.is_none() {
            return;
        }
        if self.terminating {
            return;
        }
        let batch = match self.rolling.batch {
            0 => usize::MAX,
            k => k,
        };
        // A slot is mid-replacement while a worker starts for it or its respawn is
        // due (a replacement that failed, a replace request, a slot that lost its
        // worker): at most `batch` of them, so at most N + K workers run.
        let mut busy = self
            .slots
            .iter()
            .filter(|s| !s.queued && (s.pending.is_some() || s.respawn_at.is_some()))
            .count();
        for slot in 0..self.slots.len() {
            if busy >= batch {
                break;
            }
            if self.slots[slot].queued {
                self.spawn(slot, now, out);
                busy += 1;
            }
        }
    }

    /// Counts a failed start of a reload's new worker; abandons the reload at the
    /// `--reload-abort-after`th in a row (see "Reload abort" in the module docs).
    fn reload_failed_start(&mut self, worker: WorkerInfo, now: Instant, out: &mut Vec<Action>) {
        let Some(generation) = self.reloading else {
            return;
        };
        if worker.generation != generation || self.terminating {
            return;
        }
        self.reload_failures += 1;
        let limit = self.rolling.abort_after;
        if limit == 0 || self.reload_failures < limit {
            return;
        }
        let failures = self.reload_failures;
        self.reloading = None;
        self.reload_failures = 0;
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            s.queued = false;
            let active_generation = s.active.and_then(|id| self.workers.get(&id)).map(|w| w.info.generation);
            match active_generation {
                None => {
                    // No old worker to keep serving: its new one is its best chance,
                    // and a slot with none at all must get one.
                    if s.pending.is_none() && s.respawn_at.is_none() {
                        self.schedule_respawn(slot, Duration::ZERO, now, out);
                    }
                }
                // Already on the new generation: a replacement starting there was asked
                // for by its worker, not by this reload.
                Some(g) if g >= generation => {}
                Some(_) => {
                    s.respawn_at = None;
                    if let Some(id) = s.pending.take() {
                        self.retire(id, now, out);
                    }
                }
            }
        }
        out.push(Action::Report(Event::ReloadAborted {
            generation,
            failures,
        }));
    }

    /// Grows or shrinks the cluster to `n` slots (see "Scale" in the module docs).
    fn scale(&mut self, n: usize, now: Instant, out: &mut Vec<Action>) {
        let from = self.slots.len();
        if self.terminating || n == 0 || n > MAX_SLOTS || n == from {
            return;
        }
        // Reported first, so that the workers started below are told the new size.
        out.push(Action::Report(Event::Scaled { from, to: n }));
        if n > from {
            for slot in from..n {
                self.slots.push(Slot::new(self.timing.respawn));
                self.spawn(slot, now, out);
            }
        } else {
            for slot in (n..from).rev() {
                let s = &mut self.slots[slot];
                s.respawn_at = None;
                let (active, pending) = (s.active.take(), s.pending.take());
                if let Some(id) = active {
                    out.push(Action::Route { slot, worker: None });
                    self.retire(id, now, out);
                }
                if let Some(id) = pending {
                    self.retire(id, now, out);
                }
            }
            self.slots.truncate(n);
        }
        self.check_cluster_ready(out);
        self.roll(now, out);
        self.check_reload_finished(out);
    }

    fn terminate(&mut self, now: Instant, out: &mut Vec<Action>) {
        if !self.terminating {
            self.terminating = true;
            self.reloading = None;
            out.push(Action::Report(Event::Terminating));
        }
        for slot in 0..self.slots.len() {
            let s = &mut self.slots[slot];
            s.respawn_at = None;
            s.pending = None;
            if s.active.take().is_some() {
                out.push(Action::Route { slot, worker: None });
            }
        }
        let ids: Vec<WorkerId> = self.workers.keys().copied().collect();
        for id in ids {
            self.retire(id, now, out);
        }
    }

    fn ready(&mut self, id: WorkerId, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        let slot = w.info.slot;
        if w.info.state != WorkerState::Starting
            || self.slots.get(slot).and_then(|s| s.pending) != Some(id)
        {
            return; // superseded, retired or already ready: readiness counts per slot and generation
        }
        w.info.state = WorkerState::Ready;
        w.deadline = None;
        self.served = true;
        if self.ready_when != ReadyWhen::Started {
            self.failed_starts = 0;
        }
        if Some(w.info.generation) == self.reloading {
            self.reload_failures = 0;
        }
        let info = w.info;
        let s = &mut self.slots[slot];
        s.pending = None;
        let old = s.active.replace(id);
        out.push(Action::Route {
            slot,
            worker: Some(id),
        });
        out.push(Action::Report(Event::Ready(info)));
        if let Some(old) = old {
            self.retire(old, now, out);
        }
        self.check_cluster_ready(out);
        self.roll(now, out);
        self.check_reload_finished(out);
    }

    fn check_cluster_ready(&mut self, out: &mut Vec<Action>) {
        if !self.cluster_ready && self.slots.iter().all(|s| s.active.is_some()) {
            self.cluster_ready = true;
            // The oldest generation serving: a reload started before the cluster was
            // first ready is not finished because every slot serves.
            let generation = self
                .slots
                .iter()
                .filter_map(|s| self.workers.get(&s.active?))
                .map(|w| w.info.generation)
                .min()
                .unwrap_or(self.generation);
            out.push(Action::Report(Event::ClusterReady { generation }));
        }
    }

    fn check_reload_finished(&mut self, out: &mut Vec<Action>) {
        let Some(generation) = self.reloading else {
            return;
        };
        let done = self.slots.iter().all(|s| {
            s.active
                .and_then(|id| self.workers.get(&id))
                .is_some_and(|w| w.info.generation >= generation)
        });
        if done {
            self.reloading = None;
            out.push(Action::Report(Event::ReloadFinished { generation }));
        }
    }

    fn replace(&mut self, id: WorkerId, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let slot = w.info.slot;
        let info = w.info;
        if self.terminating
            || self.slots.get(slot).and_then(|s| s.active) != Some(id)
            || self.slots[slot].pending.is_some()
            || self.slots[slot].queued
        {
            return; // not active, a replacement is already on its way, or due in its turn
        }
        out.push(Action::Report(Event::ReplaceStarted(info)));
        self.count_restart(slot);
        self.spawn(slot, now, out);
    }

    /// An active worker stopped reading its channel: see "Stuck" in the module docs.
    fn stuck(&mut self, id: WorkerId, unread_for: Duration, now: Instant, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get(&id) else {
            return;
        };
        let (info, slot) = (w.info, w.info.slot);
        let uptime = now.saturating_duration_since(w.started_at);
        if self.terminating || self.slots.get(slot).and_then(|s| s.active) != Some(id) {
            return; // no longer active: nothing is routed to it any more
        }
        out.push(Action::Report(Event::Stuck {
            worker: info,
            unread_for,
        }));
        self.slots[slot].active = None;
        out.push(Action::Route { slot, worker: None });
        out.push(Action::Reclaim { id });
        if let Some(w) = self.workers.get_mut(&id) {
            w.info.state = WorkerState::Retiring;
            w.deadline = Some(now + self.timing.timeout);
            out.push(Action::Report(Event::Retiring(w.info)));
            out.push(Action::Drain { id });
        }
        if self.slots[slot].pending.is_none() {
            self.schedule_respawn(slot, uptime, now, out);
        }
    }

    /// A worker is gone: exited (`status`), or never started (`None`).
    fn gone(
        &mut self,
        id: WorkerId,
        status: Option<ExitStatus>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(w) = self.workers.remove(&id) else {
            return;
        };
        let slot = w.info.slot;
        let uptime = now.saturating_duration_since(w.started_at);
        if let Some(status) = status {
            out.push(Action::Report(Event::Exited {
                worker: w.info,
                status,
            }));
            let started_mode = self.ready_when == ReadyWhen::Started;
            if started_mode && uptime >= QUICK_EXIT {
                self.failed_starts = 0;
            }
            let failed = match self.ready_when {
                ReadyWhen::Started => uptime < QUICK_EXIT,
                _ => w.info.state == WorkerState::Starting,
            };
            if failed && w.info.state != WorkerState::Retiring && !self.terminating {
                self.failed_start(w.info, w.heard, StartFailure::Exited(status), out);
            }
        }
        if self.terminating {
            return;
        }
        let Some(s) = self.slots.get_mut(slot) else {
            return; // its slot was removed (scaled down)
        };
        if s.active == Some(id) {
            s.active = None;
            out.push(Action::Route { slot, worker: None });
            if s.pending.is_none() {
                self.schedule_respawn(slot, uptime, now, out);
            }
        } else if s.pending == Some(id) {
            // Died before ready: the old worker (if any) keeps serving. A spawn that
            // failed (`status` none: fork, exec or the channel) is retried no sooner
            // than SPAWN_RETRY, whatever `--respawn` says: it fails at once, in the
            // same turn, and a zero delay would retry it for ever without yielding.
            s.pending = None;
            let floor = if status.is_none() { SPAWN_RETRY } else { Duration::ZERO };
            self.schedule_respawn_after(slot, Duration::ZERO, floor, now, out);
            self.reload_failed_start(w.info, now, out);
        }
    }

    fn schedule_respawn(
        &mut self,
        slot: usize,
        uptime: Duration,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        self.schedule_respawn_after(slot, uptime, Duration::ZERO, now, out);
    }

    /// [`Supervisor::schedule_respawn`], waiting at least `floor`.
    fn schedule_respawn_after(
        &mut self,
        slot: usize,
        uptime: Duration,
        floor: Duration,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Timing {
            respawn, backoff, ..
        } = self.timing;
        let s = &mut self.slots[slot];
        if backoff.is_zero() || uptime >= backoff {
            s.delay = respawn;
        }
        let delay = s.delay;
        if !backoff.is_zero() {
            s.delay = (delay * 2).min(backoff).max(respawn);
        }
        let delay = delay.max(floor);
        s.respawn_at = Some(now + delay);
        out.push(Action::Report(Event::RespawnScheduled { slot, delay }));
    }

    fn fire_timers(&mut self, now: Instant, out: &mut Vec<Action>) {
        // Repeat: a zero respawn delay or a zero timeout makes new deadlines due at once.
        loop {
            let mut fired = false;
            for slot in 0..self.slots.len() {
                let s = &self.slots[slot];
                if s.respawn_at.is_some_and(|t| t <= now) {
                    fired = true;
                    self.slots[slot].respawn_at = None;
                    // A slot that serves and waits for its turn in a rolling reload
                    // is started by `roll`, never past the batch.
                    let waits = self.slots[slot].queued && self.slots[slot].active.is_some();
                    if !self.terminating && self.slots[slot].pending.is_none() && !waits {
                        self.count_restart(slot);
                        self.spawn(slot, now, out);
                    }
                }
            }
            let due: Vec<WorkerId> = self
                .workers
                .values()
                .filter(|w| w.deadline.is_some_and(|t| t <= now))
                .map(|w| w.info.id)
                .collect();
            for id in due {
                fired = true;
                let w = self.workers.get_mut(&id).expect("due worker is live");
                w.deadline = None;
                let info = w.info;
                match info.state {
                    WorkerState::Starting => {
                        out.push(Action::Report(Event::NotReadyInTime(info)));
                        let heard = w.heard;
                        self.failed_start(info, heard, StartFailure::NotReady, out);
                        let slot = info.slot;
                        let was_pending = self.slots.get(slot).and_then(|s| s.pending) == Some(id);
                        if was_pending {
                            self.slots[slot].pending = None;
                        }
                        self.retire(id, now, out);
                        if was_pending && !self.terminating {
                            self.schedule_respawn(slot, Duration::ZERO, now, out);
                            self.reload_failed_start(info, now, out);
                        }
                    }
                    WorkerState::Retiring => {
                        out.push(Action::Report(Event::KilledAfterTimeout(info)));
                        out.push(Action::Kill { id });
                    }
                    WorkerState::Ready => {}
                }
            }
            if !fired {
                break;
            }
        }
    }

    fn kill_all(&mut self, now: Instant, out: &mut Vec<Action>) {
        self.terminate(now, out);
        for w in self.workers.values_mut() {
            w.deadline = None;
            if w.info.pid.is_some() {
                out.push(Action::Kill { id: w.info.id });
            } else {
                w.kill_pending = true;
            }
        }
    }

    /// Notes that the worker said something; false when it was killed for garbage,
    /// whose later words count for nothing (it must not become ready while it dies).
    fn heard(&mut self, id: WorkerId) -> bool {
        match self.workers.get_mut(&id) {
            Some(w) if w.garbage >= GARBAGE_LIMIT => false,
            Some(w) => {
                w.heard = true;
                true
            }
            None => false,
        }
    }

    fn garbage(&mut self, id: WorkerId, out: &mut Vec<Action>) {
        let Some(w) = self.workers.get_mut(&id) else {
            return;
        };
        w.heard = true;
        if w.garbage >= GARBAGE_LIMIT {
            return; // already killed for it: the rest is noise
        }
        w.garbage += 1;
        let count = w.garbage;
        if count.is_power_of_two() {
            out.push(Action::Report(Event::Garbage {
                worker: w.info,
                count,
            }));
        }
        if count == GARBAGE_LIMIT {
            out.push(Action::Report(Event::KilledForGarbage(w.info)));
            out.push(Action::Kill { id });
        }
    }

    /// Counts a failed start; reports [`Event::StartsFailing`] the first time it is due.
    fn failed_start(
        &mut self,
        worker: WorkerInfo,
        heard: bool,
        how: StartFailure,
        out: &mut Vec<Action>,
    ) {
        self.failed_starts += 1;
        let due = self.failed_starts >= FAILED_STARTS_TO_REPORT || how == StartFailure::NotReady;
        if due && !self.starts_failing_reported {
            self.starts_failing_reported = true;
            out.push(Action::Report(Event::StartsFailing {
                failures: self.failed_starts,
                last: how,
                worker,
                heard,
            }));
        }
    }

    fn check_exit(&mut self, out: &mut Vec<Action>) {
        if self.terminating && self.workers.is_empty() && !self.exited {
            self.exited = true;
            out.push(Action::Exit);
        }
    }
}

#[cfg(test)]
mod tests;
