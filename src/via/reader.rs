//! The reader of one worker's channel: what the worker says, as supervisor inputs.
//!
//! A worker is untrusted input, and so is anything it forks (which may inherit the
//! channel). Three bounds keep a flood of messages from costing the master memory or
//! CPU, whatever the worker writes:
//! * **Bounded hand-over.** Inputs go to the supervisor's loop over a bounded queue;
//!   when it is full the reader waits, stops reading, and the worker's writes block on
//!   its full socket buffer: the flood pushes back on the flooder.
//! * **Coalescing.** `listening`, `ready` and `replace` are one-shot: each is passed
//!   on the first time only; repeats are dropped here.
//! * **A rate budget.** More than [`MESSAGE_BUDGET`] lines in one second make every
//!   further line of that second an offence, passed on as [`Input::Garbage`]: the core
//!   logs it and kills the worker at its garbage limit, as for any protocol offender.
//!   After that many offences the reader passes nothing more on.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::channel::{self, WorkerLine};
use crate::fdpass::FdBuf;
use crate::supervisor::{Input, WorkerId, GARBAGE_LIMIT};
use crate::via::channel::WorkerChannel;

/// Lines a worker may send per second; a well-behaved one sends two or three in its life.
pub(crate) const MESSAGE_BUDGET: u32 = 100;

/// Inputs that may wait between all readers and the supervisor's loop.
pub(crate) const QUEUE: usize = 256;

/// Reads `ch` until the worker is gone, passing what counts to `tx` (see the module docs).
pub(crate) async fn read_worker(id: WorkerId, ch: Arc<WorkerChannel>, tx: mpsc::Sender<Input>) {
    let mut buf = [0u8; channel::MAX_WORKER_MESSAGE];
    let mut cbuf = FdBuf::new();
    let mut said = Said::default();
    let mut budget = Budget::new(Instant::now());
    let mut offences = 0u32;
    loop {
        let Ok((len, bad)) = ch.recv(&mut buf, &mut cbuf).await else {
            return;
        };
        // An empty message is not EOF here (the master holds a copy of the worker's end,
        // so EOF never comes): it is one more message that is not protocol, as is one
        // too long or carrying descriptors.
        let whole_message_bad = bad || len == 0;
        let lines = channel::lines(if whole_message_bad { b"-" } else { &buf[..len] });
        let now = Instant::now();
        for line in lines {
            let input = if whole_message_bad || !budget.take(now) {
                Some(Input::Garbage { id })
            } else {
                said.first(id, channel::parse_worker_line(line))
            };
            let Some(input) = input else { continue };
            if matches!(input, Input::Garbage { .. }) {
                if offences >= GARBAGE_LIMIT {
                    continue; // the core has killed it: nothing more to say
                }
                offences += 1;
            }
            if tx.send(input).await.is_err() {
                return;
            }
        }
    }
}

/// Which one-shot messages have been passed on.
#[derive(Default)]
pub(crate) struct Said {
    listening: bool,
    ready: bool,
    replace: bool,
}

impl Said {
    /// The input for `line`, or `None` for a repeat of a one-shot message.
    fn first(&mut self, id: WorkerId, line: WorkerLine<'_>) -> Option<Input> {
        let (flag, input) = match line {
            WorkerLine::Listening => (&mut self.listening, Input::Listening { id }),
            WorkerLine::Ready => (&mut self.ready, Input::Ready { id }),
            WorkerLine::Replace => (&mut self.replace, Input::ReplaceRequested { id }),
            WorkerLine::Unknown(_) => return Some(Input::Garbage { id }),
        };
        (!std::mem::replace(flag, true)).then_some(input)
    }

    /// Whether `listening` is said for the first time (Node's dialect).
    pub(crate) fn listening(&mut self) -> bool {
        !std::mem::replace(&mut self.listening, true)
    }

    /// Whether `ready` is said for the first time (Node's dialect).
    pub(crate) fn ready(&mut self) -> bool {
        !std::mem::replace(&mut self.ready, true)
    }

    /// Whether a replacement is asked for the first time (Node's dialect).
    pub(crate) fn replace(&mut self) -> bool {
        !std::mem::replace(&mut self.replace, true)
    }
}

/// [`MESSAGE_BUDGET`] lines per one-second window.
pub(crate) struct Budget {
    since: Instant,
    used: u32,
}

impl Budget {
    pub(crate) fn new(now: Instant) -> Budget {
        Budget { since: now, used: 0 }
    }

    /// Whether one more line fits this window.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.since) >= Duration::from_secs(1) {
            self.since = now;
            self.used = 0;
        }
        self.used = self.used.saturating_add(1);
        self.used <= MESSAGE_BUDGET
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shot_messages_pass_once_and_unknown_lines_always() {
        let id = WorkerId(7);
        let mut said = Said::default();
        assert_eq!(
            said.first(id, WorkerLine::Listening),
            Some(Input::Listening { id })
        );
        assert_eq!(said.first(id, WorkerLine::Listening), None);
        assert_eq!(said.first(id, WorkerLine::Ready), Some(Input::Ready { id }));
        assert_eq!(said.first(id, WorkerLine::Ready), None);
        assert_eq!(
            said.first(id, WorkerLine::Replace),
            Some(Input::ReplaceRequested { id })
        );
        assert_eq!(said.first(id, WorkerLine::Replace), None);
        for _ in 0..3 {
            assert_eq!(
                said.first(id, WorkerLine::Unknown(b"x")),
                Some(Input::Garbage { id })
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_allows_so_many_lines_a_second() {
        let t0 = Instant::now();
        let mut b = Budget::new(t0);
        assert!((0..MESSAGE_BUDGET).all(|_| b.take(t0)));
        assert!(!b.take(t0 + Duration::from_millis(999)));
        assert!(b.take(t0 + Duration::from_secs(1)), "a new window");
    }
}
