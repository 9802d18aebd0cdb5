//! Telling a stuck worker from a busy one: the oldest unread message on its channel.
//!
//! A worker that is alive but no longer reads its channel (a stuck loop, SIGSTOP, a
//! deadlock) keeps the connections queued to it, and `sticky` keeps sending it its
//! clients. No message from the worker can say so: it is the one not talking. What
//! the master can see is its channel's queue, through the duplicate of the worker's
//! end it keeps (see `via::channel`): every [`CHECKS_PER_TIMEOUT`]th of
//! `--stuck-timeout` the balancer peeks at the oldest unread message. A worker that
//! reads anything moves the head of its queue on, however busy it is; one whose head
//! stays the same message for the whole timeout has read nothing for that long while
//! a connection waited. That is exact where it matters: a busy worker with a queue
//! that is never empty is never taken for a stuck one, and a peek costs one system
//! call per worker per check, on no connection's path.
//!
//! The balancer only reports: the supervisor core decides (it takes the worker out
//! of routing, reclaims what it queued and replaces it, `Input::Stuck`).

use std::time::Duration;

use tokio::time::Instant;

/// How many times per `--stuck-timeout` each worker's queue is looked at: a stuck
/// worker is found between one and `1 + 1/CHECKS_PER_TIMEOUT` timeouts after its
/// oldest unread connection was queued.
pub const CHECKS_PER_TIMEOUT: u32 = 4;

/// The shortest interval between two looks, whatever the timeout.
const MIN_CHECK: Duration = Duration::from_millis(10);

/// What the balancer knows of one slot's queue.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Watch {
    /// The oldest unread message's fingerprint, and when it was first seen there.
    head: Option<(u64, Instant)>,
    /// Reported stuck already: not again for this worker.
    reported: bool,
}

impl Watch {
    /// A new worker in the slot: forget the last one's queue.
    pub fn reset(&mut self) {
        *self = Watch::default();
    }

    /// Takes one look (`head` as [`crate::via::channel::WorkerChannel::unread_head`]
    /// returned it). Returns how long the same message has waited unread when that is
    /// `timeout` or more and the worker was not reported yet; it is then reported.
    pub fn look(&mut self, head: Option<u64>, now: Instant, timeout: Duration) -> Option<Duration> {
        let Some(head) = head else {
            self.head = None;
            return None;
        };
        let since = match self.head {
            Some((seen, since)) if seen == head => since,
            _ => {
                self.head = Some((head, now));
                now
            }
        };
        let unread_for = now.saturating_duration_since(since);
        if self.reported || unread_for < timeout {
            return None;
        }
        self.reported = true;
        Some(unread_for)
    }
}

/// The interval between two looks at the queues for `timeout` (zero: never).
pub fn check_interval(timeout: Duration) -> Option<Duration> {
    (!timeout.is_zero()).then(|| (timeout / CHECKS_PER_TIMEOUT).max(MIN_CHECK))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn the_same_head_for_the_whole_timeout_is_stuck_once() {
        let mut w = Watch::default();
        let t0 = Instant::now();
        assert_eq!(w.look(Some(7), t0, T), None);
        assert_eq!(w.look(Some(7), t0 + T / 2, T), None);
        assert_eq!(w.look(Some(7), t0 + T, T), Some(T));
        // Reported once per worker.
        assert_eq!(w.look(Some(7), t0 + 3 * T, T), None);
        w.reset();
        assert_eq!(w.look(Some(7), t0 + 3 * T, T), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_worker_that_reads_is_never_stuck_however_full_its_queue() {
        let mut w = Watch::default();
        let t0 = Instant::now();
        // Never empty, but the head moves on at every look: busy, not stuck.
        for i in 0..100u64 {
            assert_eq!(w.look(Some(i), t0 + T / 2 * i as u32, T), None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_empty_queue_restarts_the_clock() {
        let mut w = Watch::default();
        let t0 = Instant::now();
        assert_eq!(w.look(Some(1), t0, T), None);
        assert_eq!(w.look(None, t0 + T / 2, T), None);
        // The same fingerprint again after an empty queue is a new wait.
        assert_eq!(w.look(Some(1), t0 + T, T), None);
        assert_eq!(w.look(Some(1), t0 + 2 * T, T), Some(T));
    }

    #[test]
    fn intervals() {
        assert_eq!(check_interval(Duration::ZERO), None);
        assert_eq!(check_interval(T), Some(T / 4));
        assert_eq!(check_interval(Duration::from_millis(1)), Some(MIN_CHECK));
    }
}
