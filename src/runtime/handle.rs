//! The handle that steers a running cluster and reads its state.
//!
//! A [`ClusterHandle`] sends [`Command`]s to the runtime's event loop, reads the
//! latest [`Snapshot`] the loop publishes after every event, and subscribes to the
//! event stream. It never waits for the loop: every call returns at once.

use std::sync::Arc;

use tokio::sync::{broadcast, mpsc, watch};

use crate::balance::{BalanceCounts, BalanceStats};
use crate::supervisor::{Event, WorkerInfo};

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
}

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
}
