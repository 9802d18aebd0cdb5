//! What `recluster status` shows: the master's facts and counters, one row per worker.
//!
//! [`Status`] is read from a [`crate::ClusterHandle`] at any time, without asking the
//! event loop: the loop publishes its state after every event, the balancer's counters
//! are atomics. The control socket's `status json` answers with [`Status::to_json`],
//! whose schema is versioned ([`JSON_VERSION`]) and documented in README.md: fields are
//! only ever added within a version; a removal or a change of meaning bumps it.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};

use crate::balance::BalanceCounts;
use crate::config::{Balance, Via};
use crate::supervisor::{WorkerInfo, WorkerState};

/// The version of the JSON that [`Status::to_json`] writes.
pub const JSON_VERSION: u64 = 1;

/// A cluster's state and counters at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// The master's process id.
    pub pid: u32,
    /// How connections reach workers.
    pub balance: Balance,
    /// How workers receive them (`None` in `shared`, where workers accept).
    pub via: Option<Via>,
    /// The addresses the master listens on.
    pub listeners: Vec<SocketAddr>,
    /// Time since the cluster started running.
    pub uptime: Duration,
    /// The current generation: 1 at start, +1 per reload.
    pub generation: u64,
    /// The newest generation that served every slot (0 before the cluster was first ready).
    pub ready_generation: u64,
    /// Whether a reload is under way.
    pub reloading: bool,
    /// Whether the cluster is terminating.
    pub terminating: bool,
    /// One entry per slot (`--workers` of them).
    pub slots: Vec<SlotStatus>,
    /// The balancer's counters (all zero where workers accept: `shared`, `--via socket`).
    pub totals: BalanceCounts,
    /// Reloads so far.
    pub reloads: ReloadCounts,
    /// Every live worker (starting, ready, retiring), by slot then age.
    pub workers: Vec<WorkerStatus>,
}

/// How many reloads started, finished, were given up or were overtaken: `started` is
/// the sum of the other three, plus one while a reload is in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadCounts {
    /// Reloads started (signals, the control socket, the API).
    pub started: u64,
    /// Reloads after which every slot was served by the new generation.
    pub finished: u64,
    /// Reloads given up because the new generation kept failing to start.
    pub aborted: u64,
    /// Reloads overtaken by a newer one, or by the stop, before they finished.
    pub superseded: u64,
}

/// One slot: the worker serving it (or starting for it) and its totals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotStatus {
    /// The slot (`WORKER_ID`).
    pub slot: usize,
    /// Served by a ready worker, waiting for a starting one, or neither.
    pub state: SlotState,
    /// The pid of the worker serving it (else of the one starting for it).
    pub pid: Option<u32>,
    /// That worker's generation.
    pub generation: Option<u64>,
    /// Workers started in it to replace one that died, failed to start, was stuck or
    /// asked to be replaced.
    pub restarts: u64,
    /// Connections handed to its workers, past and present: only ever grows.
    pub handed: u64,
}

/// Whether a slot has a worker taking its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotState {
    /// A ready worker serves it.
    Ready,
    /// No ready worker; one is starting.
    Starting,
    /// No worker at all: waiting to respawn (or the cluster is terminating).
    Down,
}

impl SlotState {
    /// Every state, in the order metrics list them.
    pub const ALL: [SlotState; 3] = [SlotState::Ready, SlotState::Starting, SlotState::Down];

    /// Its name in `status` and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SlotState::Ready => "ready",
            SlotState::Starting => "starting",
            SlotState::Down => "down",
        }
    }
}

/// One live worker as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerStatus {
    /// Its slot (`WORKER_ID`).
    pub slot: usize,
    /// Its process id, once spawned.
    pub pid: Option<u32>,
    /// The generation it was started for.
    pub generation: u64,
    /// Starting, ready (receiving connections) or retiring.
    pub state: WorkerState,
    /// Time since it was started.
    pub uptime: Duration,
    /// Workers started in its slot to replace one that died, failed to start, was
    /// stuck or asked to be replaced (reloads do not count).
    pub restarts: u64,
    /// Connections the master handed to it (0 where workers accept themselves).
    pub handed: u64,
}

impl WorkerStatus {
    /// A row for `info`, started `uptime` ago.
    pub(crate) fn new(info: WorkerInfo, uptime: Duration, restarts: u64, handed: u64) -> Self {
        WorkerStatus {
            slot: info.slot,
            pid: info.pid,
            generation: info.generation,
            state: info.state,
            uptime,
            restarts,
            handed,
        }
    }
}

/// The name of a worker state in `status` and in metrics.
pub fn state_name(state: WorkerState) -> &'static str {
    match state {
        WorkerState::Starting => "starting",
        WorkerState::Ready => "ready",
        WorkerState::Retiring => "retiring",
    }
}

impl Status {
    /// The status as the versioned JSON object of `recluster status --json`.
    pub fn to_json(&self) -> Value {
        let t = &self.totals;
        let workers: Vec<Value> = self
            .workers
            .iter()
            .map(|w| {
                json!({
                    "slot": w.slot,
                    "pid": w.pid,
                    "generation": w.generation,
                    "state": state_name(w.state),
                    "uptime_seconds": seconds(w.uptime),
                    "restarts": w.restarts,
                    "handed": w.handed,
                })
            })
            .collect();
        json!({
            "version": JSON_VERSION,
            "master": {
                "pid": self.pid,
                "balance": self.balance.as_str(),
                "via": self.via.map(Via::as_str),
                "listeners": self.listeners.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "uptime_seconds": seconds(self.uptime),
                "generation": self.generation,
                "ready_generation": self.ready_generation,
                "reloading": self.reloading,
                "terminating": self.terminating,
                "slots": self.slots.len(),
            },
            "totals": {
                "accepted": t.accepted,
                "handed": t.handed,
                "closed": t.closed,
                "fallbacks": t.fallbacks,
                "reclaimed": t.reclaimed,
                "full": t.full,
                "accept_errors": t.accept_errors,
                "proxy_header_errors": t.proxy_header_errors,
                "proxy_untrusted": t.proxy_untrusted,
            },
            "reloads": {
                "started": self.reloads.started,
                "finished": self.reloads.finished,
                "aborted": self.reloads.aborted,
                "superseded": self.reloads.superseded,
            },
            "workers": workers,
            "slots": self.slots.iter().map(|s| json!({
                "slot": s.slot,
                "state": s.state.as_str(),
                "pid": s.pid,
                "generation": s.generation,
                "restarts": s.restarts,
                "handed": s.handed,
            })).collect::<Vec<_>>(),
        })
    }
}

/// A duration in seconds with millisecond precision, for JSON.
fn seconds(d: Duration) -> f64 {
    (d.as_millis() as f64) / 1000.0
}
