//! Slot choice among the ready slots: round robin, or by the client IP's hash.

use std::net::IpAddr;

use super::sticky::slot_for;
use crate::config::Balance;

/// Chooses slots among the ready ones: round robin, or rendezvous over a client-IP hash.
#[derive(Debug)]
pub struct Router {
    mode: Balance,
    ready: Vec<usize>,
    next: usize,
}

impl Router {
    /// A router with no ready slot.
    pub fn new(mode: Balance) -> Router {
        Router {
            mode,
            ready: Vec::new(),
            next: 0,
        }
    }

    /// The same router with its rotation starting at the `k`-th ready slot (modulo
    /// their number), so that several accept threads do not all begin at one slot.
    pub fn starting_at(mut self, k: usize) -> Router {
        self.next = k;
        self
    }

    /// Marks `slot` ready or not.
    pub fn set_ready(&mut self, slot: usize, ready: bool) {
        match (self.ready.binary_search(&slot), ready) {
            (Err(i), true) => self.ready.insert(i, slot),
            (Ok(i), false) => {
                self.ready.remove(i);
            }
            _ => {}
        }
    }

    /// Whether any slot is ready.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The slot for a client at `ip`, skipping slots for which `skip` is true.
    pub fn choose(&mut self, ip: IpAddr, skip: impl Fn(usize) -> bool) -> Option<usize> {
        match self.mode {
            Balance::Sticky => slot_for(ip, self.ready.iter().copied().filter(|&s| !skip(s))),
            _ => {
                let n = self.ready.len();
                for i in 0..n {
                    let slot = self.ready[(self.next + i) % n];
                    if !skip(slot) {
                        self.next = (self.next + i + 1) % n;
                        return Some(slot);
                    }
                }
                None
            }
        }
    }

    /// `rr` that avoids busy workers (join the idle queue): in rotation order, the first
    /// ready slot not skipped whose `backlog` is at most the least one's plus `slack`
    /// (slots that close are equals, and keep the rotation); the rotation moves past
    /// the one chosen.
    pub fn choose_idle(&mut self, skip: impl Fn(usize) -> bool, backlog: impl Fn(usize) -> usize, slack: usize) -> Option<usize> {
        let n = self.ready.len();
        let candidates = || (0..n).map(|i| (i, self.ready[(self.next + i) % n])).filter(|&(_, s)| !skip(s));
        let least = candidates().map(|(_, s)| backlog(s)).min()?;
        let (i, slot) = candidates().find(|&(_, s)| backlog(s) <= least.saturating_add(slack))?;
        self.next = (self.next + i + 1) % n;
        Some(slot)
    }

    /// The slot a client at `ip` prefers among all ready slots (`sticky`), if any is ready.
    pub fn preferred(&self, ip: IpAddr) -> Option<usize> {
        slot_for(ip, self.ready.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::sticky::ip_hash;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn round_robin_rotates_over_ready_slots_and_skips_full_ones() {
        let mut r = Router::new(Balance::RoundRobin);
        assert_eq!(r.choose(ip("127.0.0.1"), |_| false), None);
        for s in 0..4 {
            r.set_ready(s, true);
        }
        let picks: Vec<_> = (0..8)
            .map(|_| r.choose(ip("127.0.0.1"), |_| false).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        r.set_ready(2, false);
        let picks: Vec<_> = (0..3)
            .map(|_| r.choose(ip("127.0.0.1"), |_| false).unwrap())
            .collect();
        assert_eq!(picks.len(), 3);
        assert!(!picks.contains(&2));
        assert!(r
            .choose(ip("127.0.0.1"), |s| s != 3)
            .is_some_and(|s| s == 3));
        assert_eq!(r.choose(ip("127.0.0.1"), |_| true), None);
    }

    #[test]
    fn idle_rr_prefers_workers_with_nothing_unread_then_the_least_and_rotates_among_equals() {
        let mut r = Router::new(Balance::RoundRobin);
        for s in 0..4 {
            r.set_ready(s, true);
        }
        let idle = |_: usize| 0;
        let picks: Vec<_> = (0..8).map(|_| r.choose_idle(|_| false, idle, 0).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 3, 0, 1, 2, 3], "all idle: plain rotation");
        // Slot 1 is behind: it is passed over while another has nothing unread.
        let busy = |s: usize| if s == 1 { 500 } else { 0 };
        let picks: Vec<_> = (0..6).map(|_| r.choose_idle(|_| false, busy, 0).unwrap()).collect();
        assert_eq!(picks, [0, 2, 3, 0, 2, 3]);
        // Everyone behind: the least.
        let behind = |s: usize| [300, 100, 200, 400][s];
        assert_eq!(r.choose_idle(|_| false, behind, 0), Some(1));
        assert_eq!(r.choose_idle(|s| s == 1, behind, 0), Some(2));
        assert_eq!(r.choose_idle(|_| true, behind, 0), None);
        // Within the slack of the least, slots are equals: the rotation decides.
        let close = |s: usize| [1, 0, 1, 3][s];
        let picks: Vec<_> = (0..6).map(|_| r.choose_idle(|_| false, close, 1).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2], "slot 3 is more than the slack behind");
    }

    #[test]
    fn sticky_ignores_the_port_and_normalises_mapped_ipv6() {
        assert_eq!(ip_hash(ip("10.1.2.3")), ip_hash(ip("::ffff:10.1.2.3")));
        assert_ne!(ip_hash(ip("10.1.2.3")), ip_hash(ip("10.1.2.4")));
        let mut r = Router::new(Balance::Sticky);
        for s in 0..8 {
            r.set_ready(s, true);
        }
        let a = r.choose(ip("127.0.0.7"), |_| false);
        assert_eq!(a, r.choose(ip("::ffff:127.0.0.7"), |_| false));
        assert_eq!(a, r.preferred(ip("127.0.0.7")));
    }

    #[test]
    fn sticky_moves_only_the_clients_of_a_slot_that_goes_away_and_they_come_back() {
        let mut r = Router::new(Balance::Sticky);
        for s in 0..8 {
            r.set_ready(s, true);
        }
        let ips: Vec<IpAddr> = (0..2000u32)
            .map(|i| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
            .collect();
        let before: Vec<usize> = ips.iter().map(|&i| r.preferred(i).unwrap()).collect();
        let mut counts = [0usize; 8];
        before.iter().for_each(|&s| counts[s] += 1);
        // Every slot's share is within ±30 % of the mean.
        assert!(
            counts.iter().all(|&c| (175..=325).contains(&c)),
            "{counts:?}"
        );
        r.set_ready(3, false);
        let during: Vec<usize> = ips.iter().map(|&i| r.preferred(i).unwrap()).collect();
        for (b, d) in before.iter().zip(&during) {
            if *b != 3 {
                assert_eq!(b, d, "clients of other slots stay put");
            } else {
                assert_ne!(*d, 3);
            }
        }
        r.set_ready(3, true);
        let after: Vec<usize> = ips.iter().map(|&i| r.preferred(i).unwrap()).collect();
        assert_eq!(before, after, "they come back when the slot is ready again");
    }

    #[test]
    fn the_sticky_mapping_is_fixed_across_processes() {
        // Pinned values: a master restart, another build or another machine keeps
        // affinity (the function is written down in `sticky`).
        let mut r = Router::new(Balance::Sticky);
        for s in 0..4 {
            r.set_ready(s, true);
        }
        let picks: Vec<usize> = (1..=8)
            .map(|i| r.preferred(IpAddr::from([127, 0, 0, i])).unwrap())
            .collect();
        assert_eq!(picks, [3, 3, 0, 0, 3, 1, 3, 1]);
        assert_eq!(ip_hash(ip("127.0.0.1")), 0x7f00_0001);
        assert_eq!(ip_hash(ip("::ffff:127.0.0.1")), 0x7f00_0001);
        assert_eq!(ip_hash(ip("2001:db8::1")), 0xda53_5546);
    }
}
