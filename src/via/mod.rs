//! How a worker receives its connections (`--via`).
//!
//! * [`channel`]: the master accepts and hands each connection to the worker over its
//!   worker channel (a `SOCK_SEQPACKET` pair, descriptors in SCM_RIGHTS); this module
//!   holds the master's end. The frames are in [`crate::channel`], the descriptor
//!   passing in `fdpass`.
//!
//! * [`node`]: Node's own cluster IPC, so that an unmodified Node server's
//!   `listen(port)` takes its connections from the master.
//!
//! Per-slot SO_REUSEPORT sockets (`socket`) are the next way, and will live here too.
//! The balancer holds each active worker as a [`Link`], whichever way it receives.

use std::net::TcpListener;
use std::sync::Arc;

pub(crate) mod channel;
pub(crate) mod node;
pub(crate) mod reader;
pub(crate) mod socket;

/// What a delivery path gives back to the balancer.
pub(crate) enum Returned {
    /// Connections a worker did not take, for another worker.
    Conns(Vec<channel::Conn>),
    /// A socket bound because a worker asked for its port, to accept on from now on.
    Listener(TcpListener),
}

/// Where a delivery path sends what it gives back (the runtime points it at the
/// balancer); a call after the balancer has ended does nothing.
pub(crate) type GiveBack = Arc<dyn Fn(Returned) + Send + Sync>;

/// How the balancer reaches one active worker.
#[derive(Debug, Clone)]
pub(crate) enum Link {
    /// recluster's worker channel.
    Channel(Arc<channel::WorkerChannel>),
    /// Node's cluster IPC.
    Node(Arc<node::NodeChannel>),
}

impl Link {
    /// A fingerprint of the oldest connection the worker has not taken yet (see
    /// `balance::stuck`); `None` when it has taken everything.
    pub fn unread_head(&self) -> Option<u64> {
        match self {
            Link::Channel(ch) => ch.unread_head(),
            Link::Node(n) => n.unread_head(),
        }
    }

    /// Counts `n` more connections handed to this worker.
    pub fn count_handed(&self, n: u64) {
        match self {
            Link::Channel(ch) => ch.count_handed(n),
            Link::Node(node) => node.count_handed(n),
        }
    }

    /// Connections handed to this worker so far.
    pub fn handed(&self) -> u64 {
        match self {
            Link::Channel(ch) => ch.handed(),
            Link::Node(node) => node.handed(),
        }
    }

    /// How far behind the worker is: 0 when it has taken everything it was sent, more
    /// the more it has not (bytes of unread messages on a worker channel, connections
    /// not yet accepted under Node). Only comparisons between workers mean anything.
    pub fn backlog(&self) -> usize {
        match self {
            Link::Channel(ch) => ch.unread_bytes(),
            Link::Node(n) => n.backlog(),
        }
    }
}
