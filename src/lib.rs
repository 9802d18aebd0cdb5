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
//! ```
//! use recluster::{Balance, Cluster, Event, ReadyWhen, WorkerCommand};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), recluster::Error> {
//! // Two workers running `sleep 60`, ready as soon as started, on a free port.
//! let cluster = Cluster::builder(WorkerCommand::new("sleep").arg("60"))
//!     .workers(2)
//!     .listen("127.0.0.1:0".parse().unwrap())
//!     .balance(Balance::Shared)
//!     .ready_when(ReadyWhen::Started)
//!     .build()?;
//! let handle = cluster.handle();
//! let mut events = handle.events();
//! let running = tokio::spawn(cluster.run());
//!
//! // Wait for the first generation, look at it, reload it, then terminate.
//! while !matches!(events.recv().await, Ok(Event::ClusterReady { .. })) {}
//! assert!(handle.active_workers().iter().all(Option::is_some));
//! handle.reload();
//! while !matches!(events.recv().await, Ok(Event::ReloadFinished { generation: 2 })) {}
//! handle.terminate(); // SIGTERM to every worker, SIGKILL after the timeout
//! running.await.expect("the cluster task")?;
//! assert!(handle.workers().is_empty());
//! # Ok(())
//! # }
//! ```
//!
//! # Layout
//! * [`supervisor`]: the pure state machine — slots, generations, reload, respawn.
//! * `driver`: the tokio layer that carries out its actions: processes, timers, readiness.
//! * [`Cluster`], [`ClusterBuilder`], [`ClusterHandle`]: the public API.
//! * [`worker`]: the library a Rust worker uses to receive its connections.
//! * [`cli`]: the command line.

#![warn(missing_docs)]

pub mod balance;
pub mod channel;
pub mod cli;
mod cluster;
pub mod config;
mod error;
mod fdpass;
mod listen;
mod notify;
mod probe;
mod runtime;
pub mod supervisor;
mod via;
pub mod worker;

pub use balance::BalanceCounts;
pub use cluster::{Cluster, ClusterBuilder};
pub use config::{Balance, ReadyWhen, Timing};
pub use error::Error;
pub use runtime::handle::ClusterHandle;
pub use runtime::launch::WorkerCommand;
pub use supervisor::{Event, ExitStatus, StartFailure, WorkerId, WorkerInfo, WorkerState};
