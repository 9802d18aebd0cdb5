//! The handle that steers a running cluster and reads its state.
//!
//! A [`ClusterHandle`] sends [`Command`]s to the runtime's event loop, reads the
//! latest [`Snapshot`] the loop publishes after every event, and subscribes to the
//! event stream. It never waits for the loop: every call returns at once.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use crate::balance::{BalanceCounts, BalanceStats};
use crate::config::{Balance, Via};
use crate::runtime::status::{ReloadCounts, SlotState, SlotStatus, Status, WorkerStatus};
use crate::supervisor::{Event, WorkerInfo, WorkerState};
use crate::via::Link;

/// A request from a handle to the running cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    Reload,
    Terminate,
    Kill,
    Scale(Scale),
}

/// The number of slots a handle asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scale {
    /// Exactly this many.
    To(usize),
    /// This many more (or fewer) than the cluster has when the request is handled.
    By(i64),
}

/// What handles can read about the cluster without asking it.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub generation: u64,
    pub active: Vec<Option<WorkerInfo>>,
    pub workers: Vec<WorkerInfo>,
    /// What never changes while the cluster runs (`None` until it runs).
    pub facts: Option<Arc<Facts>>,
    /// One row per live worker, in `workers` order.
    pub rows: Vec<Row>,
    /// The newest generation that served every slot.
    pub ready_generation: u64,
    /// The newest generation whose reload was given up.
    pub aborted_generation: u64,
    pub reloading: bool,
    pub terminating: bool,
    pub reloads: ReloadCounts,
    /// Per slot: connections handed to its workers that have exited.
    pub handed_gone: Vec<u64>,
    /// Per slot index: its restarts so far (indexes of slots scaled away included).
    pub restarts: Vec<u64>,
}

/// The cluster's facts that never change while it runs.
#[derive(Debug)]
pub(crate) struct Facts {
    pub balance: Balance,
    pub via: Option<Via>,
    pub listeners: Vec<SocketAddr>,
    pub started: Instant,
}

/// A live worker's row besides its [`WorkerInfo`].
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub started: Instant,
    /// Where its handed-over count is kept (`rr`/`sticky`).
    pub link: Option<Link>,
}

/// Why [`ClusterHandle::reload_and_wait`] did not see the new generation ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadError {
    /// The new generation kept failing to start (`--reload-abort-after`): the old
    /// workers keep serving.
    Aborted {
        /// The generation that was given up.
        generation: u64,
    },
    /// The cluster is terminating (or terminated before the reload finished).
    Terminating,
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::Aborted { generation } => write!(
                f,
                "the reload to generation {generation} was aborted: its workers kept failing to start; the old workers keep serving (see the master's log)"
            ),
            ReloadError::Terminating => f.write_str("the cluster is terminating"),
        }
    }
}

impl std::error::Error for ReloadError {}

/// The loop's ends of what a [`ClusterHandle`] talks to.
pub(crate) struct Ends {
    /// Events, as the loop sends them.
    pub events: broadcast::Sender<Event>,
    /// Commands from handles.
    pub commands: mpsc::UnboundedReceiver<Command>,
    /// The published state.
    pub state: watch::Sender<Arc<Snapshot>>,
    /// The balancer's counters.
    pub stats: Arc<BalanceStats>,
}

/// A new handle and the loop's ends of it.
pub(crate) fn pair() -> (ClusterHandle, Ends) {
    let (events, _) = broadcast::channel(1024);
    let (commands, command_rx) = mpsc::unbounded_channel();
    let (state_tx, state) = watch::channel(Arc::new(Snapshot::default()));
    let stats = Arc::new(BalanceStats::default());
    let handle = ClusterHandle {
        commands,
        events: events.clone(),
        state,
        stats: stats.clone(),
    };
    let ends = Ends {
        events,
        commands: command_rx,
        state: state_tx,
        stats,
    };
    (handle, ends)
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

    /// Runs `n` worker slots from now on: new slots start a worker of the current
    /// generation; the highest slots retire gracefully (routed away first, then
    /// stopped). Refused, with a `scale_refused` warning and no change, below 1, above
    /// [`MAX_SLOTS`](crate::supervisor::MAX_SLOTS), and under `--via socket`, whose
    /// per-slot sockets are bound at start.
    pub fn scale(&self, n: usize) {
        let _ = self.commands.send(Command::Scale(Scale::To(n)));
    }

    /// Adds `delta` worker slots (removes them when negative), counted from the number
    /// the cluster has when the request is handled (so two quick calls add two); see
    /// [`ClusterHandle::scale`]. SIGTTIN is `scale_by(1)`, SIGTTOU `scale_by(-1)`.
    pub fn scale_by(&self, delta: i64) {
        let _ = self.commands.send(Command::Scale(Scale::By(delta)));
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

    /// The cluster's state and counters now: what `recluster status` shows.
    pub fn status(&self) -> Status {
        let snapshot = self.state.borrow().clone();
        let now = Instant::now();
        let facts = snapshot.facts.as_deref();
        let workers: Vec<WorkerStatus> = snapshot
            .workers
            .iter()
            .zip(&snapshot.rows)
            .map(|(info, row)| {
                let handed = row.link.as_ref().map_or(0, Link::handed);
                let restarts = snapshot.restarts.get(info.slot).copied().unwrap_or(0);
                WorkerStatus::new(*info, now.saturating_duration_since(row.started), restarts, handed)
            })
            .collect();
        let slots = (0..snapshot.active.len())
            .map(|slot| {
                let live = workers.iter().filter(|w| w.slot == slot);
                let handed = snapshot.handed_gone.get(slot).copied().unwrap_or(0)
                    + live.map(|w| w.handed).sum::<u64>();
                let serving = snapshot.active[slot].map(|w| (SlotState::Ready, w)).or_else(|| {
                    let starting = snapshot.workers.iter().filter(|w| w.slot == slot && w.state == WorkerState::Starting);
                    starting.max_by_key(|w| w.id).map(|w| (SlotState::Starting, *w))
                });
                SlotStatus {
                    slot,
                    state: serving.map_or(SlotState::Down, |(s, _)| s),
                    pid: serving.and_then(|(_, w)| w.pid),
                    generation: serving.map(|(_, w)| w.generation),
                    restarts: snapshot.restarts.get(slot).copied().unwrap_or(0),
                    handed,
                }
            })
            .collect();
        Status {
            pid: std::process::id(),
            balance: facts.map_or_else(Balance::default, |f| f.balance),
            via: facts.and_then(|f| f.via),
            listeners: facts.map_or_else(Vec::new, |f| f.listeners.clone()),
            uptime: facts.map_or(std::time::Duration::ZERO, |f| now.saturating_duration_since(f.started)),
            generation: snapshot.generation,
            ready_generation: snapshot.ready_generation,
            reloading: snapshot.reloading,
            terminating: snapshot.terminating,
            slots,
            totals: self.balance_counts(),
            reloads: snapshot.reloads,
            workers,
        }
    }

    /// Reloads and waits until every slot is served by the new generation (or a newer
    /// one); returns that generation, or why it will not be. Bound the wait with
    /// `tokio::time::timeout`: a new generation that keeps failing to start without
    /// `--reload-abort-after` is retried for ever while the old one serves.
    pub async fn reload_and_wait(&self) -> Result<u64, ReloadError> {
        let mut state = self.state.clone();
        let target = state.borrow_and_update().generation + 1;
        self.reload();
        loop {
            {
                let s = state.borrow_and_update();
                if s.ready_generation >= target {
                    return Ok(s.ready_generation);
                }
                if s.aborted_generation >= target {
                    return Err(ReloadError::Aborted {
                        generation: s.aborted_generation,
                    });
                }
                if s.terminating {
                    return Err(ReloadError::Terminating);
                }
            }
            if state.changed().await.is_err() {
                return Err(ReloadError::Terminating);
            }
        }
    }
}
