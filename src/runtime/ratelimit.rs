//! Rate limiting of repeated log lines, so a crash-looping worker cannot fill the disk.
//!
//! Each key (say, "slot 3 exited") may log a burst of lines per window; past that,
//! lines are counted, not written, and the next line that gets through says how many
//! were suppressed. If none comes, the count is given when the window ends
//! ([`RateLimit::next_flush`], [`RateLimit::flush`]), so a crash loop that stops is
//! never left looking smaller than it was.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// Lines allowed per key per window.
const BURST: u32 = 10;

/// How long a burst's budget lasts before it starts again.
const WINDOW: Duration = Duration::from_secs(10);

/// Per-key budgets of log lines.
#[derive(Debug)]
pub(crate) struct RateLimit<K> {
    keys: HashMap<K, Budget>,
}

#[derive(Debug)]
struct Budget {
    since: Instant,
    used: u32,
    suppressed: u64,
}

impl<K: Hash + Eq> RateLimit<K> {
    /// No key has used anything yet.
    pub fn new() -> Self {
        RateLimit {
            keys: HashMap::new(),
        }
    }

    /// `Some(n)` when a line for `key` may be written (`n` were suppressed before it), `None` when not.
    pub fn allow(&mut self, key: K, now: Instant) -> Option<u64> {
        let b = self.keys.entry(key).or_insert(Budget {
            since: now,
            used: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(b.since) >= WINDOW {
            b.since = now;
            b.used = 0;
        }
        if b.used < BURST {
            b.used += 1;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed += 1;
            None
        }
    }
}

impl<K: Hash + Eq + Clone> RateLimit<K> {
    /// When the earliest window holding suppressed lines ends.
    pub fn next_flush(&self) -> Option<Instant> {
        self.keys
            .values()
            .filter(|b| b.suppressed > 0)
            .map(|b| b.since + WINDOW)
            .min()
    }

    /// The keys whose window has ended (or every key, with `all`) with lines
    /// suppressed, and how many; their counts start again from zero.
    pub fn flush(&mut self, now: Instant, all: bool) -> Vec<(K, u64)> {
        self.keys
            .iter_mut()
            .filter(|(_, b)| {
                b.suppressed > 0 && (all || now.saturating_duration_since(b.since) >= WINDOW)
            })
            .map(|(k, b)| (k.clone(), std::mem::take(&mut b.suppressed)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_then_lines_are_counted_until_the_window_ends() {
        let mut r = RateLimit::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert_eq!(r.allow("k", t0), Some(0));
        }
        assert_eq!(r.allow("k", t0), None);
        assert_eq!(r.allow("k", t0 + Duration::from_secs(1)), None);
        assert_eq!(r.allow("other", t0), Some(0), "keys are independent");
        assert_eq!(
            r.allow("k", t0 + WINDOW),
            Some(2),
            "the next line says 2 were suppressed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn suppressed_lines_are_flushed_when_the_window_ends_without_a_next_line() {
        let mut r = RateLimit::new();
        let t0 = Instant::now();
        assert_eq!(r.next_flush(), None);
        for _ in 0..BURST + 3 {
            r.allow("k", t0);
        }
        r.allow("quiet", t0);
        assert_eq!(r.next_flush(), Some(t0 + WINDOW));
        assert!(r
            .flush(t0 + WINDOW - Duration::from_millis(1), false)
            .is_empty());
        assert_eq!(r.flush(t0 + WINDOW, false), vec![("k", 3)]);
        assert_eq!(r.next_flush(), None, "flushed once");
        assert_eq!(
            r.allow("k", t0 + WINDOW),
            Some(0),
            "nothing is counted twice"
        );
    }
}
