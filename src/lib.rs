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
//! * [`channel`]: the worker channel's frames, shared by both ends.
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

#[cfg(feature = "master")]
pub mod balance;
pub mod channel;
#[cfg(feature = "master")]
pub mod cli;
#[cfg(feature = "master")]
mod cluster;
#[cfg(feature = "master")]
pub mod config;
#[cfg(feature = "master")]
mod error;
mod fdpass;
#[cfg(feature = "master")]
mod listen;
#[cfg(feature = "master")]
mod notify;
#[cfg(feature = "master")]
mod runtime;
#[cfg(feature = "master")]
pub mod supervisor;
#[cfg(feature = "master")]
mod via;
pub mod worker;

#[cfg(feature = "master")]
pub use balance::BalanceCounts;
#[cfg(feature = "master")]
pub use cluster::{Cluster, ClusterBuilder};
#[cfg(feature = "master")]
pub use config::{Balance, ReadyWhen, Timing};
#[cfg(feature = "master")]
pub use error::{CommandError, ConfigError, Error};
#[cfg(feature = "master")]
pub use runtime::handle::ClusterHandle;
#[cfg(feature = "master")]
pub use runtime::launch::WorkerCommand;
#[cfg(feature = "master")]
pub use supervisor::{Event, ExitStatus, StartFailure, WorkerId, WorkerInfo, WorkerState};
