//! The lifecycle log: one line per supervisor event, naming slot, pid and generation.
//!
//! Lines that a crash loop repeats (unexpected exits, respawns, failed spawns, and
//! the spawns that follow them) are rate-limited per slot, with a `suppressed=` count
//! on the next line that gets through, or on a line of its own when the window ends
//! ([`Journal::flush`]), so a bad worker cannot fill the disk.

use std::collections::HashSet;

use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::runtime::ratelimit::RateLimit;
use crate::supervisor::{Event, ExitStatus, WorkerState};

/// A line about worker `$w`: the event's name, its slot, pid and generation, then the
/// further fields named (local variables), then the message.
macro_rules! worker_line {
    ($level:ident, $event:literal, $w:expr, $msg:literal $(, $field:ident)*) => {
        $level!(
            event = $event,
            slot = $w.slot,
            pid = $w.pid,
            generation = $w.generation,
            $($field,)*
            $msg
        )
    };
}

/// What a rate-limited line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    Exit,
    Respawn,
    Spawn,
    SpawnFailed,
}

/// Writes the lifecycle log.
#[derive(Debug)]
pub(crate) struct Journal {
    limit: RateLimit<(usize, Kind)>,
    /// Slots whose next spawn is a respawn (part of a possible crash loop).
    respawning: HashSet<usize>,
}

impl Journal {
    /// A journal with nothing suppressed yet.
    pub fn new() -> Journal {
        Journal {
            limit: RateLimit::new(),
            respawning: HashSet::new(),
        }
    }

    /// `Some(suppressed)` if a line about `slot` of this kind may be written now.
    fn allow(&mut self, slot: usize, kind: Kind) -> Option<Option<u64>> {
        self.limit
            .allow((slot, kind), Instant::now())
            .map(|n| (n > 0).then_some(n))
    }

    /// When [`Journal::flush`] next has a count to give.
    pub fn next_flush(&self) -> Option<Instant> {
        self.limit.next_flush()
    }

    /// Writes one line per kind of line whose window ended with lines suppressed (with
    /// `all`, as the master exits: every kind with lines suppressed).
    pub fn flush(&mut self, now: Instant, all: bool) {
        let mut counts = self.limit.flush(now, all);
        counts.sort_unstable();
        for ((slot, kind), suppressed) in counts {
            let lines = match kind {
                Kind::Exit => "worker exited",
                Kind::Respawn => "respawn scheduled",
                Kind::Spawn => "worker spawned",
                Kind::SpawnFailed => "spawn failed",
            };
            info!(
                event = "log_suppressed",
                slot, suppressed, lines, "log lines suppressed"
            );
        }
    }

    /// Writes the line for `event`; `workers` is the cluster's size.
    pub fn record(&mut self, event: &Event, workers: usize) {
        match event {
            Event::Spawned(w) => {
                // Only the spawns of a respawn loop are rate-limited.
                let suppressed = if self.respawning.remove(&w.slot) {
                    let Some(suppressed) = self.allow(w.slot, Kind::Spawn) else {
                        return;
                    };
                    suppressed
                } else {
                    None
                };
                worker_line!(info, "worker_spawned", w, "worker spawned", suppressed);
            }
            Event::SpawnFailed {
                slot,
                generation,
                error,
            } => {
                if let Some(suppressed) = self.allow(*slot, Kind::SpawnFailed) {
                    error!(event = "spawn_failed", slot, generation, suppressed, error = %error, "spawn failed");
                }
            }
            Event::Ready(w) => worker_line!(info, "worker_ready", w, "worker ready"),
            Event::Retiring(w) => worker_line!(info, "worker_retiring", w, "worker retiring"),
            Event::Exited { worker: w, status } => {
                let (code, signal) = match *status {
                    ExitStatus::Code(c) => (Some(c), None),
                    ExitStatus::Signal(s) => (None, Some(s)),
                    // Neither field: the line then says nothing about how it ended.
                    ExitStatus::Unknown => (None, None),
                };
                if w.state == WorkerState::Retiring {
                    worker_line!(info, "worker_exited", w, "worker exited", code, signal);
                } else if let Some(suppressed) = self.allow(w.slot, Kind::Exit) {
                    worker_line!(
                        warn,
                        "worker_exited",
                        w,
                        "worker exited",
                        code,
                        signal,
                        suppressed
                    );
                }
            }
            Event::RespawnScheduled { slot, delay } => {
                self.respawning.insert(*slot);
                if let Some(suppressed) = self.allow(*slot, Kind::Respawn) {
                    let delay_ms = delay.as_millis() as u64;
                    info!(
                        event = "respawn_scheduled",
                        slot, delay_ms, suppressed, "respawn scheduled"
                    );
                }
            }
            Event::NotReadyInTime(w) => worker_line!(
                warn,
                "worker_not_ready_in_time",
                w,
                "worker not ready in time"
            ),
            Event::KilledAfterTimeout(w) => worker_line!(
                warn,
                "worker_killed_after_timeout",
                w,
                "worker killed after timeout"
            ),
            Event::Stuck {
                worker: w,
                unread_for,
            } => {
                let unread_ms = unread_for.as_millis() as u64;
                worker_line!(
                    warn,
                    "worker_stuck",
                    w,
                    "worker stuck: a connection unread for --stuck-timeout; replacing it",
                    unread_ms
                )
            }
            Event::Message { worker: w, text } => {
                let bytes = text.len();
                worker_line!(debug, "worker_message", w, "a message from a worker", bytes)
            }
            Event::ReplaceStarted(w) => worker_line!(
                info,
                "worker_replace_requested",
                w,
                "worker asked to be replaced"
            ),
            Event::ReloadStarted { generation } => {
                info!(event = "reload_started", generation, "reload started")
            }
            Event::ReloadFinished { generation } => {
                info!(event = "reload_finished", generation, "reload finished")
            }
            Event::ReloadAborted {
                generation,
                failures,
            } => warn!(
                event = "reload_aborted",
                generation,
                failures,
                "reload aborted after failed starts in a row of its new workers: the old workers keep serving (slots already replaced keep their new ones)"
            ),
            Event::Scaled { from, to } => info!(event = "scaled", from, to, "workers scaled"),
            Event::ClusterReady { generation } => info!(
                event = "cluster_ready",
                generation, workers, "cluster ready"
            ),
            Event::Terminating => info!(event = "terminating", "terminating"),
            Event::CannotExecute { error } => {
                error!(event = "cannot_execute", error = %error, "the command cannot be executed: giving up")
            }
            Event::Garbage { worker: w, count } => worker_line!(
                warn,
                "worker_garbage",
                w,
                "worker sent a message that is not protocol",
                count
            ),
            Event::KilledForGarbage(w) => worker_line!(
                warn,
                "worker_garbage_killed",
                w,
                "worker keeps sending garbage on its channel: killing it"
            ),
            // Logged by the driver, with advice that depends on the mode.
            Event::StartsFailing { .. } => {}
        }
    }
}
