//! Rate limiting of repeated log lines, so a crash-looping worker cannot fill the disk.
//!
//! Each key (say, "slot 3 exited") may log a burst of lines per window; past that,
//! lines are counted, not written, and the next line that gets through says how many
//! were suppressed.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// Lines allowed per key per window.
const BURST: u32 = 10;

/// The window.
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
}
