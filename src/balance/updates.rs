//! The driver's side of the balancer: one update queue per accept thread.
//!
//! Every accept thread keeps its own copy of the routing table, so a route change goes
//! to each of them (in the same order on every queue, so they agree once each has
//! read it). What only one thread needs — connections given back to hand out again,
//! a socket a Node worker asked for — goes to the first thread, which is also the one
//! that watches for stuck workers.

use std::sync::Arc;

use tokio::sync::mpsc;

use super::running::RunState;
use super::Update;
use crate::supervisor::WorkerId;
use crate::via::channel::Conn;
use crate::via::Link;

/// Sends route changes and the rest to every accept thread of the balancer.
#[derive(Debug)]
pub(crate) struct Updates {
    threads: Vec<mpsc::UnboundedSender<Update>>,
}

/// The accept threads' ends of [`Updates`], one per thread, for [`super::start`].
pub(crate) type Inboxes = Vec<mpsc::UnboundedReceiver<Update>>;

impl Updates {
    /// Queues for `threads` accept threads (at least one).
    pub fn new(threads: usize) -> (Updates, Inboxes) {
        let (senders, inboxes) = (0..threads.max(1)).map(|_| mpsc::unbounded_channel()).unzip();
        (Updates { threads: senders }, inboxes)
    }

    /// The slot's active worker changed: every thread routes to it, or nowhere.
    pub fn route(&self, slot: usize, worker: Option<(WorkerId, Link)>, running: Option<Arc<RunState>>) {
        for t in &self.threads {
            let _ = t.send(Update::Route {
                slot,
                worker: worker.clone(),
                running: running.clone(),
            });
        }
    }

    /// Connections taken back from a worker, for the first thread to hand out again.
    pub fn reclaimed(&self, conns: Vec<Conn>) {
        let _ = self.threads[0].send(Update::Reclaimed(conns));
    }

    /// Every thread closes its listening sockets (the cluster is terminating).
    pub fn close_listeners(&self) {
        for t in &self.threads {
            let _ = t.send(Update::CloseListeners);
        }
    }

    /// A weak sender to the first thread, for what delivery paths give back; it never
    /// keeps the balancer alive.
    pub fn give_back_to(&self) -> mpsc::WeakUnboundedSender<Update> {
        self.threads[0].downgrade()
    }
}
