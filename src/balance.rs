//! The balancer: accept → choose a slot → hand the descriptor over, in `rr` and `sticky`.
//!
//! One task owns the non-blocking listening sockets and a routing table (slot →
//! channel of its active worker) that the driver updates whenever the supervisor core
//! says a slot's active worker changed. The supervisor never learns how connections
//! travel; the balancer never decides who is ready.
//!
//! The hot path, per wake-up of a listener: accept until `EAGAIN` (at most
//! [`ACCEPT_BATCH`]), append each connection to its slot's batch, then send each
//! batch in one `sendmsg`. Buffers are allocated once; nothing is allocated per
//! connection. Every accepted connection ends in exactly one of: handed to a worker,
//! or closed and counted in [`BalanceStats`].
//!
//! * `rr` rotates over the ready slots; a worker whose queue is full is skipped (counted).
//! * `sticky` picks by rendezvous hashing of the client IP over the ready slots; when
//!   the chosen worker's queue is full the connection waits up to [`STICKY_WAIT`] for
//!   it, then goes to its next choice (counted).
//! * With no ready worker the balancer stops accepting: clients wait in the kernel
//!   backlog until one is ready.
//! * `EMFILE`/`ENFILE` pause accepting for [`FD_PAUSE`] instead of spinning.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, warn};

use crate::channel;
use crate::config::Balance;
use crate::fdpass::{FdBuf, MAX_FDS};
use crate::worker_channel::{Conn, WorkerChannel};

/// Most connections accepted per listener wake-up before the others get a turn.
pub const ACCEPT_BATCH: usize = 256;

/// How long a `sticky` connection waits for its own worker's full queue.
pub const STICKY_WAIT: Duration = Duration::from_millis(100);

/// How long accepting pauses after `EMFILE`/`ENFILE`.
pub const FD_PAUSE: Duration = Duration::from_millis(100);

/// How long a connection may wait for a worker (none ready, or all full) before it is closed.
pub const MAX_PARK: Duration = Duration::from_secs(30);

/// Most connections held back (queues full) before accepting pauses.
const PARK_LIMIT: usize = 4096;

/// How often held-back connections are retried while workers' queues are full.
const PARK_RETRY: Duration = Duration::from_millis(2);

/// Counters of the balancer, readable at any time.
#[derive(Debug, Default)]
pub struct BalanceStats {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections handed to a worker.
    pub handed: AtomicU64,
    /// Connections closed without reaching a worker (no worker for [`MAX_PARK`]).
    pub closed: AtomicU64,
    /// Sends that found a worker's queue full.
    pub full: AtomicU64,
    /// `sticky` connections that went to their second (or later) choice.
    pub fallbacks: AtomicU64,
    /// Connections taken back from a worker that exited before reading them.
    pub reclaimed: AtomicU64,
    /// Accept errors (fd exhaustion and others).
    pub accept_errors: AtomicU64,
}

impl BalanceStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A change the driver tells the balancer about.
#[derive(Debug)]
pub(crate) enum Update {
    /// The slot's active worker changed: route to this channel, or nowhere.
    Route {
        slot: usize,
        channel: Option<Arc<WorkerChannel>>,
    },
    /// Connections taken back from an exited worker, to hand out again.
    Reclaimed(Vec<Conn>),
}

/// Fixed seeds: the same IP maps to the same slot across reloads and master restarts.
const SEEDS: [u64; 4] = [
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
    0x082e_fa98_ec4e_6c89,
];

/// The hash of a client IP used by `sticky`: IPv4-mapped IPv6 counts as IPv4.
pub fn ip_hash(ip: IpAddr) -> u64 {
    let state = ahash::RandomState::with_seeds(SEEDS[0], SEEDS[1], SEEDS[2], SEEDS[3]);
    match ip {
        IpAddr::V4(v4) => state.hash_one(u32::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => state.hash_one(u32::from(v4)),
            None => state.hash_one(u128::from(v6)),
        },
    }
}

/// The rendezvous weight of `slot` for a client whose IP hashed to `h`.
fn weight(h: u64, slot: usize) -> u64 {
    // splitmix64 finaliser over the pair: cheap, and every bit of both inputs matters.
    let mut z = h
        ^ (slot as u64)
            .wrapping_add(1)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

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
            Balance::Sticky => {
                let h = ip_hash(ip);
                self.ready
                    .iter()
                    .copied()
                    .filter(|&s| !skip(s))
                    .max_by_key(|&s| weight(h, s))
            }
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

    /// The slot a client at `ip` prefers among all ready slots (`sticky`), if any is ready.
    pub fn preferred(&self, ip: IpAddr) -> Option<usize> {
        let h = ip_hash(ip);
        self.ready.iter().copied().max_by_key(|&s| weight(h, s))
    }
}

/// A connection waiting because its worker's queue was full.
struct Parked {
    conn: Conn,
    /// The slot it was meant for (`usize::MAX`: none was ready).
    slot: usize,
}

/// The balancer task's state.
pub(crate) struct Balancer {
    mode: Balance,
    listeners: Vec<Listener>,
    router: Router,
    table: Vec<Option<Arc<WorkerChannel>>>,
    updates: mpsc::UnboundedReceiver<Update>,
    batches: Vec<Vec<Conn>>,
    /// Slots found full during the current dispatch.
    full: Vec<bool>,
    parked: VecDeque<Parked>,
    text: Vec<u8>,
    raw: Vec<RawFd>,
    cbuf: FdBuf,
    stats: Arc<BalanceStats>,
    paused_until: Option<Instant>,
    last_emfile_log: Option<Instant>,
}

struct Listener {
    fd: AsyncFd<TcpListener>,
    /// The local address when it is the same for every connection (not a wildcard).
    fixed_local: Option<SocketAddr>,
}

impl Balancer {
    /// A balancer over `listeners` (set non-blocking here) for `slots` slots.
    pub fn new(
        mode: Balance,
        listeners: Vec<TcpListener>,
        slots: usize,
        updates: mpsc::UnboundedReceiver<Update>,
        stats: Arc<BalanceStats>,
    ) -> io::Result<Balancer> {
        let listeners = listeners
            .into_iter()
            .map(|l| {
                l.set_nonblocking(true)?;
                let local = l.local_addr()?;
                let fixed_local = (!local.ip().is_unspecified()).then_some(local);
                Ok(Listener {
                    fd: crate::fdpass::register(l)?,
                    fixed_local,
                })
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Balancer {
            mode,
            listeners,
            router: Router::new(mode),
            table: (0..slots).map(|_| None).collect(),
            updates,
            batches: (0..slots).map(|_| Vec::with_capacity(MAX_FDS)).collect(),
            full: vec![false; slots],
            parked: VecDeque::new(),
            text: Vec::with_capacity(channel::MAX_MASTER_MESSAGE),
            raw: Vec::with_capacity(MAX_FDS),
            cbuf: FdBuf::new(),
            stats,
            paused_until: None,
            last_emfile_log: None,
        })
    }

    /// Runs until the driver drops its end of the update channel.
    pub async fn run(mut self) {
        loop {
            let now = Instant::now();
            if self.paused_until.is_some_and(|t| t <= now) {
                self.paused_until = None;
            }
            let accepting = self.router.has_ready()
                && self.paused_until.is_none()
                && self.parked.len() < PARK_LIMIT;
            let wake = self
                .paused_until
                .or_else(|| (!self.parked.is_empty()).then(|| now + PARK_RETRY));
            tokio::select! {
                biased;
                update = self.updates.recv() => match update {
                    Some(u) => self.update(u),
                    None => return self.close_held(),
                },
                index = poll_listeners(&self.listeners), if accepting => self.accept(index),
                _ = sleep_until(wake.unwrap_or(now)), if wake.is_some() => self.retry_parked(),
            }
        }
    }

    fn update(&mut self, update: Update) {
        match update {
            Update::Route { slot, channel } => {
                self.router.set_ready(slot, channel.is_some());
                self.table[slot] = channel;
            }
            Update::Reclaimed(conns) => {
                BalanceStats::add(&self.stats.reclaimed, conns.len() as u64);
                let now = Instant::now();
                for conn in conns {
                    self.dispatch(conn, now);
                }
                self.flush_all();
            }
        }
        if self.router.has_ready() && !self.parked.is_empty() {
            self.retry_parked();
        }
    }

    fn accept(&mut self, index: usize) {
        let now = Instant::now();
        let mut accepted = 0;
        while accepted < ACCEPT_BATCH {
            let listener = &self.listeners[index];
            match listener.fd.get_ref().accept() {
                Ok((stream, peer)) => {
                    accepted += 1;
                    let local = match listener.fixed_local {
                        Some(a) => a,
                        None => stream.local_addr().unwrap_or(peer),
                    };
                    let conn = Conn {
                        stream,
                        listener: index,
                        peer,
                        local,
                        since: now,
                    };
                    self.dispatch(conn, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.clear_ready(index);
                    break;
                }
                Err(e) => {
                    BalanceStats::add(&self.stats.accept_errors, 1);
                    match e.raw_os_error() {
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                            self.paused_until = Some(now + FD_PAUSE);
                            if self
                                .last_emfile_log
                                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                            {
                                self.last_emfile_log = Some(now);
                                warn!(event = "accept_paused_fds", error = %e, pause_ms = FD_PAUSE.as_millis() as u64,
                                    "accept failed: out of file descriptors; pausing accepts (raise ulimit -n)");
                            }
                            break;
                        }
                        // The client went away between SYN and accept: take the next one.
                        Some(libc::ECONNABORTED | libc::EPROTO | libc::EINTR) => {
                            debug!(error = %e, "accept failed");
                        }
                        // Anything else may persist (a broken listener): never spin on it.
                        _ => {
                            self.paused_until = Some(now + FD_PAUSE);
                            warn!(event = "accept_paused", error = %e, "accept failed; pausing accepts");
                            break;
                        }
                    }
                }
            }
        }
        BalanceStats::add(&self.stats.accepted, accepted as u64);
        self.flush_all();
    }

    fn clear_ready(&self, index: usize) {
        // Re-arm readiness so the next poll waits for a new connection.
        // A no-op waker is enough: the run loop polls again with the task's own
        // waker before it sleeps.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(Ok(mut guard)) = self.listeners[index].fd.poll_read_ready(&mut cx) {
            guard.clear_ready();
        }
    }

    /// Adds `conn` to the batch of the slot it should go to, or parks it.
    fn dispatch(&mut self, conn: Conn, now: Instant) {
        let full = &self.full;
        let slot = match self.mode {
            Balance::Sticky => match self.router.preferred(conn.peer.ip()) {
                Some(s) if full[s] => {
                    self.parked.push_back(Parked { conn, slot: s });
                    return;
                }
                s => s,
            },
            _ => self.router.choose(conn.peer.ip(), |s| full[s]),
        };
        match slot {
            Some(slot) => {
                self.batches[slot].push(conn);
                if self.batches[slot].len() == MAX_FDS {
                    self.flush(slot, now);
                }
            }
            None => self.parked.push_back(Parked {
                slot: usize::MAX,
                conn,
            }),
        }
    }

    fn flush_all(&mut self) {
        let now = Instant::now();
        // A failed send re-dispatches its batch, possibly to a slot already flushed in
        // this pass: go round until every batch is out. Each failure marks its slot
        // full for the rest of the round, so this ends after at most one pass per slot.
        loop {
            let mut sent_any = false;
            for slot in 0..self.batches.len() {
                if !self.batches[slot].is_empty() {
                    sent_any = true;
                    self.flush(slot, now);
                }
            }
            if !sent_any {
                break;
            }
        }
        self.full.iter_mut().for_each(|f| *f = false);
    }

    /// Sends slot `slot`'s batch in one message; on failure re-dispatches or parks it.
    fn flush(&mut self, slot: usize, now: Instant) {
        let result = match &self.table[slot] {
            Some(ch) => {
                self.text.clear();
                self.raw.clear();
                for c in &self.batches[slot] {
                    channel::encode_conn(&mut self.text, c.listener, c.peer, c.local);
                    self.raw.push(c.stream.as_raw_fd());
                }
                ch.send(&self.text, &self.raw, &mut self.cbuf)
            }
            None => Err(io::ErrorKind::NotConnected.into()),
        };
        match result {
            Ok(()) => {
                BalanceStats::add(&self.stats.handed, self.batches[slot].len() as u64);
                self.batches[slot].clear(); // closes the master's copies
            }
            Err(e) => {
                // Full (EAGAIN), stopped (a route update is on its way), or out of
                // in-flight descriptors (ETOOMANYREFS): skip the slot for this round
                // only, so a passing condition never takes a worker out for good.
                if e.kind() == io::ErrorKind::WouldBlock {
                    BalanceStats::add(&self.stats.full, 1);
                } else if e.kind() != io::ErrorKind::BrokenPipe {
                    debug!(slot, error = %e, "handing connections over failed");
                }
                self.full[slot] = true;
                // `full[slot]` keeps re-dispatch away from this slot's batch while it is out.
                let mut batch = std::mem::take(&mut self.batches[slot]);
                for conn in batch.drain(..) {
                    if self.mode == Balance::Sticky {
                        self.parked.push_back(Parked { conn, slot });
                    } else {
                        self.dispatch(conn, now);
                    }
                }
                self.batches[slot] = batch;
            }
        }
    }

    /// At the end (the cluster terminated): closes and counts what no worker took.
    fn close_held(&mut self) {
        let held = self.parked.len() + self.batches.iter().map(Vec::len).sum::<usize>();
        if held > 0 {
            warn!(
                event = "closing_unhanded",
                count = held,
                "closing connections no worker took before the end"
            );
        }
        BalanceStats::add(&self.stats.closed, held as u64);
        self.parked.clear();
        self.batches.iter_mut().for_each(Vec::clear);
    }

    /// Tries again to hand out connections held back by full queues or missing workers.
    ///
    /// The slow path, taken only while queues are full or no worker is ready: each
    /// connection is batched again (`sticky`: for its own slot until it has waited
    /// [`STICKY_WAIT`], then for its next choice), and what fails to go out is parked
    /// again by `flush`.
    fn retry_parked(&mut self) {
        let now = Instant::now();
        for p in std::mem::take(&mut self.parked) {
            let age = now.saturating_duration_since(p.conn.since);
            if age >= MAX_PARK {
                // No worker ready, or every one full, for that long: give the client up.
                BalanceStats::add(&self.stats.closed, 1);
                warn!(event = "connection_closed", peer = %p.conn.peer, "no worker took the connection in {MAX_PARK:?}: closing it");
                continue;
            }
            if !self.router.has_ready() {
                self.parked.push_back(p);
                continue;
            }
            let ip = p.conn.peer.ip();
            let own_slot_ready = self.table.get(p.slot).is_some_and(Option::is_some);
            let slot = match self.mode {
                Balance::Sticky if age < STICKY_WAIT && own_slot_ready => Some(p.slot),
                Balance::Sticky => {
                    let next = self.router.choose(ip, |s| s == p.slot);
                    let preferred = self.router.preferred(ip);
                    if next.is_some() && next != preferred {
                        BalanceStats::add(&self.stats.fallbacks, 1);
                    }
                    next.or(preferred)
                }
                _ => self.router.choose(ip, |_| false),
            };
            match slot {
                Some(slot) => {
                    self.batches[slot].push(p.conn);
                    if self.batches[slot].len() == MAX_FDS {
                        self.flush(slot, now);
                    }
                }
                None => self.parked.push_back(p),
            }
        }
        self.flush_all();
    }
}

/// Waits until one of the listeners has a connection; returns its index.
async fn poll_listeners(listeners: &[Listener]) -> usize {
    std::future::poll_fn(|cx| {
        for (i, l) in listeners.iter().enumerate() {
            if let Poll::Ready(Ok(mut guard)) = l.fd.poll_read_ready(cx) {
                // Keep readiness: accept() clears it on EAGAIN.
                guard.retain_ready();
                return Poll::Ready(i);
            }
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

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
        // Fixed seeds: this pins the mapping, so a master restart keeps affinity.
        let mut r = Router::new(Balance::Sticky);
        for s in 0..4 {
            r.set_ready(s, true);
        }
        let picks: Vec<usize> = (1..=8)
            .map(|i| r.preferred(IpAddr::from([127, 0, 0, i])).unwrap())
            .collect();
        let again: Vec<usize> = (1..=8)
            .map(|i| r.preferred(IpAddr::from([127, 0, 0, i])).unwrap())
            .collect();
        assert_eq!(picks, again);
        assert_eq!(ip_hash(ip("127.0.0.1")), ip_hash(ip("127.0.0.1")));
    }
}
