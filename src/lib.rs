//! Supervise a cluster of worker processes behind shared listening sockets.
//!
//! recluster runs N copies of a server command as worker processes, keeps the
//! listening sockets in the master for its whole life, reloads the workers with zero
//! downtime, respawns the ones that die (with per-slot exponential backoff), and
//! hands incoming connections to them. It is the Rust successor of the Node.js
//! packages `recluster` and `sticky-listen`, for workers in any language.
//!
//! The crate is a library first; the `recluster` binary is a thin layer over it.
//!
//! A cluster in a few lines: see [`Cluster`]. A worker: see [`worker`].
//!
//!
//! # Layout
//! * [`supervisor`]: the pure state machine — slots, generations, reload, respawn, and
//!   every lifecycle rule.
//! * `runtime`: the tokio layer that carries out its actions: launching and reaping
//!   processes, timers, readiness, the control socket, the log.
//! * [`balance`]: accept → choose a slot → hand over (`rr`, `sticky`), on a thread of
//!   its own.
//! * `via`: how a worker receives its connections (the worker channel's master end).
//! * `stdio`: the master's stdout and stderr, bounded queues that never block it.
//! * [`channel`]: the worker channel's frames, shared by both ends.
//! * [`proxy`]: the PROXY protocol header a load balancer in front may send.
//! * [`Cluster`], [`ClusterBuilder`], [`ClusterHandle`]: the public API.
//! * [`worker`]: the library a Rust worker uses to receive its connections.
//! * [`cli`]: the command line.
//!
//! # Features
//! * `master` (default): everything above. Without it
//!   (`recluster = { version = "…", default-features = false }`) the crate is the
//!   worker library alone ([`worker`], [`channel`]), built on tokio and libc only.
//! * `axum`: [`worker::Listener`] serves `axum::serve`.

#![warn(missing_docs)]

/// Items of the master (feature `master`, on by default); without it the crate is the
/// worker library alone.
macro_rules! master {
    ($($item:item)*) => { $( #[cfg(feature = "master")] $item )* };
}

pub mod channel;
mod fdpass;
pub mod proxy;
pub mod worker;

master! {
    pub mod balance;
    pub mod cli;
    mod cluster;
    pub mod config;
    mod error;
    mod listen;
    mod notify;
    mod runtime;
    mod stdio;
    pub mod supervisor;
    mod via;

    pub use balance::BalanceCounts;
    pub use cluster::{Cluster, ClusterBuilder};
    pub use config::{Balance, ReadyWhen, RollingReload, Timing, Via};
    pub use error::{CommandError, ConfigError, Error};
    pub use runtime::handle::{ClusterHandle, ReloadError};
    pub use runtime::status::{ReloadCounts, SlotState, SlotStatus, Status, WorkerStatus};
    pub use runtime::command::WorkerCommand;
    pub use supervisor::{Event, ExitStatus, StartFailure, WorkerId, WorkerInfo, WorkerState};
}
