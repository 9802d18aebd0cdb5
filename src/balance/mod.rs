//! The balancer: accept → choose a slot → hand the descriptor over, in `rr` and `sticky`.
//!
//! Each accept thread (`--accept-threads`, one by default on small machines) runs one
//! task that owns its non-blocking listening sockets and its own copy of the routing
//! table (slot → channel of its active worker), which the driver updates on every
//! thread whenever the supervisor core says a slot's active worker changed
//! (`Updates`). The supervisor never learns how connections travel; the balancer
//! never decides who is ready.
//!
//! With more than one thread, every thread accepts on the same listening sockets (each
//! holds a duplicate descriptor, registered with its own runtime): one accept queue per
//! address, so whichever thread is free takes the next connection, and the port is
//! owned exactly as with one thread. (A SO_REUSEPORT group of one socket per thread
//! was tried first: any process of the same user could join the group later and take
//! a share of the clients, and two masters started at the same instant could both
//! bind it.) A connection wakes every thread that sleeps in `epoll_wait`; the ones
//! that lose the race get `EAGAIN` once. Nothing on the hot path is shared but that
//! queue, the counters (relaxed atomics) and a worker channel's send lock
//! (uncontended unless two threads send to one worker at the same instant; a
//! `SOCK_SEQPACKET` message goes whole, so their records never interleave). `sticky`
//! stays exact because every thread hashes over the same ready set; `rr` stays even
//! because every thread rotates over all the ready slots (starting at different ones)
//! and joins the idle queue from the same kernel counters.
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
//! * `--proxy-protocol`: a connection is dispatched once its PROXY header is read,
//!   with the client the header names as its peer; headers still on their way are
//!   awaited off the accept path (module [`proxy`]), so a slow sender delays no one.
//! * A worker whose oldest unread connection has waited `--stuck-timeout` is reported
//!   stuck to the supervisor core, which routes it away and replaces it (module `stuck`).
//! * `EMFILE`/`ENFILE`: the connections in hand go out first (each one handed over
//!   frees a descriptor), and accepting goes on at once if any did. Only when nothing
//!   could move (every worker full, or no worker ready) does accepting pause for
//!   [`FD_PAUSE`] instead of spinning; held-back connections are still retried
//!   during the pause, and the first one that goes out ends it.

use std::collections::VecDeque;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use crate::channel;
use crate::config::Balance;
use crate::fdpass::{FdBuf, MAX_FDS};
use crate::supervisor::{Input, WorkerId};
use crate::via::channel::Conn;
use crate::via::Link;

pub mod proxy;
mod router;
pub(crate) mod running;
mod sticky;
pub(crate) mod steer;
pub(crate) mod stuck;
mod updates;

pub use router::Router;
pub use sticky::{fmix32, ip_hash, seed, slot_for, weight};
pub(crate) use updates::{Inboxes, Updates};

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

/// How soon held-back connections are retried while workers' queues are full; each
/// retry that moves nothing doubles the wait, up to [`PARK_RETRY_MAX`], so thousands of
/// connections held for stopped workers do not cost a core.
const PARK_RETRY: Duration = Duration::from_millis(2);

/// The longest wait between two retries of held-back connections.
const PARK_RETRY_MAX: Duration = Duration::from_millis(16);

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
    /// Connections closed for want of a valid PROXY header in time (or over the cap of
    /// headers awaited; see [`proxy`]).
    pub proxy_header_errors: AtomicU64,
    /// Connections closed because their peer is outside `--trusted-proxy`.
    pub proxy_untrusted: AtomicU64,
    /// How long connections waited in the master, from accept to hand-over.
    pub handoff: Latency,
}

impl BalanceStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// A histogram of durations in microseconds, 4 buckets per power of two (so a
/// percentile read from it is within 25 %), up to about 131 ms (longer ones count in
/// the last bucket). Recording is one increment.
#[derive(Debug)]
pub struct Latency {
    buckets: [AtomicU64; 64],
}

impl Default for Latency {
    fn default() -> Latency {
        Latency {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Latency {
    /// Counts one duration.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let index = if us < 4 {
            us as usize
        } else {
            let p = 63 - us.leading_zeros() as usize;
            ((p - 1) * 4 + ((us >> (p - 2)) & 3) as usize).min(63)
        };
        self.buckets[index].fetch_add(1, Ordering::Relaxed);
    }

    /// The `q` quantile (0 < q ≤ 1) in microseconds: the upper end of its bucket; 0
    /// when nothing was recorded.
    pub fn quantile_us(&self, q: f64) -> u64 {
        let counts: Vec<u64> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return 0;
        }
        let target = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (index, &c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                if index < 4 {
                    return index as u64;
                }
                let (p, sub) = (index / 4 + 1, (index % 4) as u64);
                return ((4 + sub) << (p - 2)) + (1 << (p - 2)) - 1;
            }
        }
        u64::MAX
    }
}

/// A change the driver tells the balancer about.
#[derive(Debug)]
pub(crate) enum Update {
    /// The slot's active worker changed: route to this worker, or nowhere.
    Route {
        slot: usize,
        worker: Option<(WorkerId, Link)>,
        /// The worker's run state (`rr`; see [`running`]).
        running: Option<Arc<running::RunState>>,
    },
    /// A listening socket bound after the start (a Node worker asked for its port):
    /// accept on it too, as listener number `listeners.len()`.
    AddListener(TcpListener),
    /// Connections taken back from an exited worker, to hand out again.
    Reclaimed(Vec<Conn>),
    /// The cluster is terminating: close the listening sockets, so that new clients
    /// are refused at once (and retry elsewhere) instead of waiting in the backlog.
    CloseListeners,
}

/// A snapshot of the balancer's counters: where every accepted connection went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalanceCounts {
    /// Connections accepted by the master.
    pub accepted: u64,
    /// Connections handed to a worker.
    pub handed: u64,
    /// Connections closed because no worker was ready for a long time.
    pub closed: u64,
    /// Sends that found a worker's queue full (the worker was skipped or waited for).
    pub full: u64,
    /// `sticky` connections that went to their second choice.
    pub fallbacks: u64,
    /// Connections taken back from an exited worker and handed out again.
    pub reclaimed: u64,
    /// Accept errors, fd exhaustion included.
    pub accept_errors: u64,
    /// Connections closed without a valid PROXY header (`--proxy-protocol`).
    pub proxy_header_errors: u64,
    /// Connections closed because their peer is outside `--trusted-proxy`.
    pub proxy_untrusted: u64,
    /// Median time from accept to hand-over, in microseconds (within 25 %).
    pub handoff_p50_us: u64,
    /// 99th percentile of the same.
    pub handoff_p99_us: u64,
}

impl From<&BalanceStats> for BalanceCounts {
    fn from(s: &BalanceStats) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        BalanceCounts {
            accepted: s.accepted.load(Relaxed),
            handed: s.handed.load(Relaxed),
            closed: s.closed.load(Relaxed),
            full: s.full.load(Relaxed),
            fallbacks: s.fallbacks.load(Relaxed),
            reclaimed: s.reclaimed.load(Relaxed),
            accept_errors: s.accept_errors.load(Relaxed),
            proxy_header_errors: s.proxy_header_errors.load(Relaxed),
            proxy_untrusted: s.proxy_untrusted.load(Relaxed),
            handoff_p50_us: s.handoff.quantile_us(0.5),
            handoff_p99_us: s.handoff.quantile_us(0.99),
        }
    }
}

/// A connection waiting because its worker's queue was full.
struct Parked {
    conn: Conn,
    /// The slot it was meant for; `None` when none was ready.
    slot: Option<usize>,
}

/// How the balancer reports a stuck worker to the supervisor core, and after how long.
pub(crate) struct StuckReports {
    /// `--stuck-timeout`; zero: never.
    pub timeout: Duration,
    /// Where [`Input::Stuck`] goes (the driver's bounded input queue).
    pub to: mpsc::Sender<Input>,
}

/// The balancer task's state.
pub(crate) struct Balancer {
    mode: Balance,
    listeners: Vec<Acceptor>,
    router: Router,
    table: Vec<Option<Link>>,
    /// The active worker of each slot, for stuck reports.
    workers: Vec<Option<WorkerId>>,
    /// What is known of each slot's queue (see [`stuck`]).
    watches: Vec<stuck::Watch>,
    stuck: StuckReports,
    updates: mpsc::UnboundedReceiver<Update>,
    batches: Vec<Vec<Conn>>,
    /// Slots found full during the current dispatch.
    full: Vec<bool>,
    /// How far behind each slot's worker was when this accept pass began (`rr`: see
    /// [`Router::choose_idle`]): with nothing unread, its rank by how busy it was
    /// lately ([`running::RunState::rank`]); with something unread, [`running::BEHIND`] + its
    /// unread bytes (or, under Node, connections).
    backlogs: Vec<usize>,
    /// Each slot's worker's run state (`rr`).
    running: Vec<Option<Arc<running::RunState>>>,
    /// Each slot's worker's recent schedstat samples (`rr`).
    samples: Vec<running::Recent>,
    /// Each slot's worker's rank when last read (`rr`; see [`running::RunState::rank`]).
    ranks: Vec<usize>,
    /// The slot where the next pass starts reading run states.
    probe_from: usize,
    parked: VecDeque<Parked>,
    text: Vec<u8>,
    raw: Vec<RawFd>,
    cbuf: FdBuf,
    stats: Arc<BalanceStats>,
    paused_until: Option<Instant>,
    last_emfile_log: Option<Instant>,
    /// The listeners were closed for good (terminate): accept on none again.
    closed: bool,
    /// Connections a Node worker could not take in one flush, reused.
    refused: Vec<Conn>,
    /// The current wait before held-back connections are retried (see [`PARK_RETRY`]).
    park_retry: Duration,
    /// Connections this thread handed over (the shared counter adds every thread's).
    handed_here: u64,
    /// Connections this thread accepted.
    accepted_here: u64,
    /// Connections given back to this thread to hand out again.
    reclaimed_here: u64,
    /// This accept thread's number (0 for the first).
    thread: usize,
    /// `--proxy-protocol`: the PROXY headers being read.
    proxy: Option<proxy::Reader>,
}

/// A listening socket the balancer accepts on.
struct Acceptor {
    fd: AsyncFd<TcpListener>,
    /// The local address when it is the same for every connection (not a wildcard).
    fixed_local: Option<SocketAddr>,
}

impl Acceptor {
    /// Accepting on `l` (set non-blocking here), registered with this thread's runtime.
    fn new(l: TcpListener) -> io::Result<Acceptor> {
        l.set_nonblocking(true)?;
        let local = l.local_addr()?;
        let fixed_local = (!local.ip().is_unspecified()).then_some(local);
        Ok(Acceptor {
            fd: crate::fdpass::register(l)?,
            fixed_local,
        })
    }
}

impl Balancer {
    /// A balancer over `listeners` (set non-blocking here) for `slots` slots.
    #[allow(clippy::too_many_arguments)]
    fn new(
        mode: Balance,
        listeners: Vec<TcpListener>,
        slots: usize,
        updates: mpsc::UnboundedReceiver<Update>,
        stats: Arc<BalanceStats>,
        stuck: StuckReports,
        thread: usize,
        proxy: Option<(proxy::ProxySettings, usize)>,
    ) -> io::Result<Balancer> {
        let listeners = listeners
            .into_iter()
            .map(Acceptor::new)
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Balancer {
            mode,
            listeners,
            // Threads start their rotations at different slots.
            router: Router::new(mode).starting_at(thread),
            table: (0..slots).map(|_| None).collect(),
            workers: vec![None; slots],
            watches: vec![stuck::Watch::default(); slots],
            stuck,
            updates,
            batches: (0..slots).map(|_| Vec::with_capacity(MAX_FDS)).collect(),
            full: vec![false; slots],
            backlogs: vec![0; slots],
            running: vec![None; slots],
            samples: vec![running::Recent::default(); slots],
            ranks: vec![0; slots],
            probe_from: 0,
            parked: VecDeque::new(),
            text: Vec::with_capacity(channel::MAX_MASTER_MESSAGE),
            raw: Vec::with_capacity(MAX_FDS),
            cbuf: FdBuf::new(),
            paused_until: None,
            last_emfile_log: None,
            closed: false,
            refused: Vec::with_capacity(MAX_FDS),
            park_retry: PARK_RETRY,
            handed_here: 0,
            accepted_here: 0,
            reclaimed_here: 0,
            thread,
            proxy: proxy.map(|(p, cap)| proxy::Reader::new(p, stats.clone(), cap)),
            stats,
        })
    }

    /// Runs until the driver drops its end of the update channel.
    async fn run(mut self) {
        let mut check = stuck::check_interval(self.stuck.timeout).map(|every| {
            let mut i = tokio::time::interval(every);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        loop {
            let now = Instant::now();
            if self.paused_until.is_some_and(|t| t <= now) {
                self.paused_until = None;
            }
            let accepting = self.router.has_ready()
                && self.paused_until.is_none()
                && self.parked.len() < PARK_LIMIT;
            let retry = (!self.parked.is_empty()).then(|| now + self.park_retry);
            let wake = match (self.paused_until, retry) {
                (Some(pause), Some(retry)) => Some(pause.min(retry)),
                (pause, retry) => pause.or(retry),
            };
            tokio::select! {
                biased;
                update = self.updates.recv() => match update {
                    Some(u) => self.update(u),
                    None => {
                        info!(event = "accept_thread_totals", thread = self.thread,
                            accepted = self.accepted_here, reclaimed = self.reclaimed_here,
                            handed = self.handed_here, "accept thread ended");
                        return self.close_held();
                    }
                },
                index = poll_listeners(&self.listeners), if accepting => self.accept(index),
                conn = async { self.proxy.as_mut().expect("checked").next().await }, if self.proxy.is_some() => {
                    self.headers_read(conn);
                }
                _ = async { check.as_mut().expect("checked").tick().await }, if check.is_some() => {
                    self.look_for_stuck();
                }
                _ = sleep_until(wake.unwrap_or(now)), if wake.is_some() => {
                    // Anything handed over frees descriptors: a pause for lack of them ends.
                    if self.retry_parked() > 0 {
                        self.paused_until = None;
                        self.park_retry = PARK_RETRY;
                    } else {
                        self.park_retry = (self.park_retry * 2).min(PARK_RETRY_MAX);
                    }
                }
            }
        }
    }

    fn update(&mut self, update: Update) {
        match update {
            Update::Route {
                slot,
                worker,
                running,
            } => {
                // A slot added since the start (the cluster was scaled up).
                self.grow(slot + 1);
                self.running[slot] = running;
                self.samples[slot] = running::Recent::default();
                self.ranks[slot] = 0;
                // A new worker may take what is held back: retry soon again.
                self.park_retry = PARK_RETRY;
                self.router.set_ready(slot, worker.is_some());
                self.watches[slot].reset();
                let (id, channel) = worker.unzip();
                self.workers[slot] = id;
                self.table[slot] = channel;
            }
            Update::Reclaimed(conns) => {
                self.reclaimed_here += conns.len() as u64;
                BalanceStats::add(&self.stats.reclaimed, conns.len() as u64);
                let now = Instant::now();
                for conn in conns {
                    // One that workers keep refusing does not go round for ever.
                    if now.saturating_duration_since(conn.since) >= MAX_PARK {
                        BalanceStats::add(&self.stats.closed, 1);
                        warn!(event = "connection_closed", peer = %conn.peer, "no worker took the connection in {MAX_PARK:?}: closing it");
                        continue;
                    }
                    self.dispatch(conn, now);
                }
                self.flush_all();
            }
            Update::AddListener(l) => {
                if !self.closed {
                    match Acceptor::new(l) {
                        Ok(a) => self.listeners.push(a),
                        // Only registering with epoll can fail here (out of memory);
                        // later sockets would then be numbered one off: say so loudly.
                        Err(e) => tracing::error!(event = "listen_failed", error = %e,
                            "cannot accept on a socket a worker asked for; restart the cluster"),
                    }
                }
            }
            Update::CloseListeners => {
                self.closed = true;
                self.listeners.clear();
            }
        }
        if self.router.has_ready() && !self.parked.is_empty() {
            self.retry_parked();
        }
    }

    /// Sizes every per-slot vector for at least `slots` slots (they never shrink: a
    /// removed slot is routed nowhere, and its entries stay empty).
    fn grow(&mut self, slots: usize) {
        if self.table.len() >= slots {
            return;
        }
        self.table.resize_with(slots, || None);
        self.workers.resize(slots, None);
        self.watches.resize(slots, stuck::Watch::default());
        self.batches
            .resize_with(slots, || Vec::with_capacity(MAX_FDS));
        self.full.resize(slots, false);
        self.backlogs.resize(slots, 0);
        self.running.resize(slots, None);
        self.samples.resize(slots, running::Recent::default());
        self.ranks.resize(slots, 0);
    }

    fn accept(&mut self, index: usize) {
        let now = Instant::now();
        // Read how far behind the workers are once something was accepted: with several
        // accept threads, the ones that lose the race for a connection pay nothing more.
        let mut backlogs_read = self.mode != Balance::RoundRobin;
        let mut accepted = 0;
        let mut out_of_fds = None;
        while accepted < ACCEPT_BATCH {
            let listener = &self.listeners[index];
            let fixed_local = listener.fixed_local;
            match listener.fd.get_ref().accept() {
                Ok((stream, peer)) => {
                    accepted += 1;
                    if !backlogs_read {
                        self.read_backlogs(now);
                        backlogs_read = true;
                    }
                    let local = match fixed_local {
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
                    // With `--proxy-protocol`, only once its header is read.
                    let conn = match &mut self.proxy {
                        Some(reader) => reader.start(conn),
                        None => Some(conn),
                    };
                    if let Some(conn) = conn {
                        self.dispatch(conn, now);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.clear_ready(index);
                    break;
                }
                Err(e) => {
                    BalanceStats::add(&self.stats.accept_errors, 1);
                    match e.raw_os_error() {
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                            // Decided below, once what is in hand has gone out.
                            out_of_fds = Some(e);
                            break;
                        }
                        // The client went away between SYN and accept: take the next one.
                        Some(libc::ECONNABORTED | libc::EPROTO | libc::EINTR) => {
                            debug!(event = "accept_failed", error = %e, "accept failed");
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
        self.accepted_here += accepted as u64;
        BalanceStats::add(&self.stats.accepted, accepted as u64);
        let handed = self.handed();
        self.flush_all();
        if let Some(e) = out_of_fds {
            if !self.parked.is_empty() {
                self.retry_parked();
            }
            // Connections went out, so descriptors are free again: accept on at once
            // (the listener is still readable). Pausing now would only delay clients.
            if self.handed() == handed {
                self.pause_for_fds(&e, now);
            }
        }
    }

    /// Dispatches `first` (a connection whose PROXY header was read, or `None` for one
    /// that failed) and every other one already read, then sends them.
    fn headers_read(&mut self, first: Option<Conn>) {
        let now = Instant::now();
        if self.mode == Balance::RoundRobin {
            self.read_backlogs(now);
        }
        let mut next = Some(first);
        let mut n = 0;
        while let Some(outcome) = next {
            if let Some(conn) = outcome {
                self.dispatch(conn, now);
            }
            n += 1;
            next = if n < ACCEPT_BATCH {
                self.proxy.as_mut().and_then(proxy::Reader::try_next)
            } else {
                None
            };
        }
        self.flush_all();
    }

    /// `rr`: how far behind each worker is as this pass begins (see `backlogs`): one
    /// SIOCOUTQ per worker, and the schedstat of at most [`running::PROBES_PER_PASS`]
    /// of those with nothing unread.
    fn read_backlogs(&mut self, now: Instant) {
        let n = self.table.len();
        let mut probes = 0;
        for i in 0..n {
            let slot = (self.probe_from + i) % n;
            let Some(link) = &self.table[slot] else {
                continue;
            };
            let unread = link.backlog();
            // Workers beyond the probes of this pass keep the rank they last had.
            if unread == 0 && probes < running::PROBES_PER_PASS {
                if let Some(state) = &self.running[slot] {
                    probes += 1;
                    let rank = state.rank(&mut self.samples[slot], now.into_std());
                    self.ranks[slot] = rank.unwrap_or(0);
                }
            }
            self.backlogs[slot] = if unread > 0 {
                running::BEHIND + unread
            } else {
                self.ranks[slot]
            };
        }
        self.probe_from = (self.probe_from + running::PROBES_PER_PASS) % n.max(1);
    }

    /// Looks at every active worker's queue; reports the ones stuck (see [`stuck`]).
    fn look_for_stuck(&mut self) {
        let now = Instant::now();
        for slot in 0..self.table.len() {
            let (Some(channel), Some(id)) = (&self.table[slot], self.workers[slot]) else {
                continue;
            };
            let head = channel.unread_head();
            if let Some(unread_for) = self.watches[slot].look(head, now, self.stuck.timeout) {
                // A full queue (the driver is far behind) loses nothing: look again later.
                if self
                    .stuck
                    .to
                    .try_send(Input::Stuck { id, unread_for })
                    .is_err()
                {
                    self.watches[slot].reset();
                }
            }
        }
    }

    /// Connections this thread has handed over so far.
    fn handed(&self) -> u64 {
        self.handed_here
    }

    /// Counts `n` connections handed over to slot `slot`'s worker.
    fn count_handed(&mut self, slot: usize, n: u64) {
        if n == 0 {
            return;
        }
        if let Some(link) = &self.table[slot] {
            link.count_handed(n);
        }
        self.handed_here += n;
        BalanceStats::add(&self.stats.handed, n);
    }

    /// Out of descriptors with none to free by handing over: pause accepting a while.
    fn pause_for_fds(&mut self, e: &io::Error, now: Instant) {
        self.paused_until = Some(now + FD_PAUSE);
        if self
            .last_emfile_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_emfile_log = Some(now);
            warn!(event = "accept_paused_fds", error = %e, pause_ms = FD_PAUSE.as_millis() as u64,
                "accept failed: out of file descriptors; pausing accepts (raise ulimit -n)");
        }
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
                    self.parked.push_back(Parked {
                        conn,
                        slot: Some(s),
                    });
                    return;
                }
                s => s,
            },
            _ => {
                // Join the idle queue: what a worker has not read yet, plus what this
                // pass already gave it (in the same units as `backlogs`).
                let (backlogs, batches) = (&self.backlogs, &self.batches);
                self.router.choose_idle(|s| full[s], |s| backlogs[s] + batches[s].len(), running::SLACK)
            }
        };
        match slot {
            Some(slot) => {
                self.batches[slot].push(conn);
                if self.batches[slot].len() == MAX_FDS {
                    self.flush(slot, now);
                }
            }
            None => self.parked.push_back(Parked { slot: None, conn }),
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
        // Under Node, what the worker took before its window filled (counted even when
        // the rest of the batch is refused).
        let mut taken = 0;
        let result = match &self.table[slot] {
            Some(Link::Node(node)) => {
                // One connection at a time, as far as the worker's window goes; what
                // does not fit stays in the batch, to be re-dispatched as on a full queue.
                for conn in self.batches[slot].drain(..) {
                    match node.offer(conn) {
                        Ok(()) => taken += 1,
                        Err(conn) => self.refused.push(conn),
                    }
                }
                std::mem::swap(&mut self.batches[slot], &mut self.refused);
                if self.batches[slot].is_empty() {
                    Ok(())
                } else {
                    Err(io::ErrorKind::WouldBlock.into())
                }
            }
            Some(Link::Channel(ch)) => {
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
        self.count_handed(slot, taken);
        match result {
            Ok(()) => {
                self.count_handed(slot, self.batches[slot].len() as u64);
                let sent = Instant::now();
                for c in &self.batches[slot] {
                    self.stats.handoff.record(sent.saturating_duration_since(c.since));
                }
                self.batches[slot].clear(); // closes the master's copies
            }
            Err(e) => {
                // Full (EAGAIN), stopped (a route update is on its way), or out of
                // in-flight descriptors (ETOOMANYREFS): skip the slot for this round
                // only, so a passing condition never takes a worker out for good.
                if e.kind() == io::ErrorKind::WouldBlock {
                    BalanceStats::add(&self.stats.full, 1);
                } else if e.kind() != io::ErrorKind::BrokenPipe {
                    debug!(event = "handover_failed", slot, error = %e, "handing connections over failed");
                }
                self.full[slot] = true;
                // `full[slot]` keeps re-dispatch away from this slot's batch while it is out.
                let mut batch = std::mem::take(&mut self.batches[slot]);
                for conn in batch.drain(..) {
                    if self.mode == Balance::Sticky {
                        self.parked.push_back(Parked {
                            conn,
                            slot: Some(slot),
                        });
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
    /// again by `flush`. Returns how many connections went out.
    fn retry_parked(&mut self) -> u64 {
        let handed = self.handed();
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
            let own_slot_ready = p
                .slot
                .and_then(|s| self.table.get(s))
                .is_some_and(Option::is_some);
            let slot = match self.mode {
                Balance::Sticky if age < STICKY_WAIT && own_slot_ready => p.slot,
                Balance::Sticky => {
                    let next = self.router.choose(ip, |s| Some(s) == p.slot);
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
        self.handed() - handed
    }
}

/// The balancer running on threads of its own (see [`start`]).
pub(crate) struct Running {
    /// One per accept thread; each fires when its thread has finished, its last counts in.
    pub done: Vec<tokio::sync::oneshot::Receiver<()>>,
}

/// Starts the balancer: one accept thread per entry of `listeners` (that thread's
/// sockets, one per listen address in the same order), each with a runtime of its own,
/// so that nothing the supervisor's loop does (forking a worker, writing the log,
/// reaping) ever delays accepting. Thread `k` reads `inboxes[k]` and ends when the
/// [`Updates`] they came from is dropped; the first thread also watches for stuck workers.
pub(crate) fn start(
    mode: Balance,
    listeners: Vec<Vec<TcpListener>>,
    slots: usize,
    inboxes: Inboxes,
    stats: Arc<BalanceStats>,
    stuck: StuckReports,
    proxy: Option<proxy::ProxySettings>,
) -> io::Result<Running> {
    assert_eq!(listeners.len(), inboxes.len(), "one inbox per accept thread");
    let cap = proxy::pending_cap(inboxes.len());
    let mut done = Vec::with_capacity(inboxes.len());
    for (thread, (sockets, inbox)) in listeners.into_iter().zip(inboxes).enumerate() {
        let stuck = StuckReports {
            // One thread is enough to watch the workers' queues.
            timeout: if thread == 0 { stuck.timeout } else { Duration::ZERO },
            to: stuck.to.clone(),
        };
        done.push(start_thread(
            mode,
            sockets,
            slots,
            inbox,
            stats.clone(),
            stuck,
            thread,
            proxy.clone().map(|p| (p, cap)),
        )?);
    }
    Ok(Running { done })
}

/// Starts accept thread number `thread` (see [`start`]).
#[allow(clippy::too_many_arguments)]
fn start_thread(
    mode: Balance,
    listeners: Vec<TcpListener>,
    slots: usize,
    updates: mpsc::UnboundedReceiver<Update>,
    stats: Arc<BalanceStats>,
    stuck: StuckReports,
    thread: usize,
    proxy: Option<(proxy::ProxySettings, usize)>,
) -> io::Result<tokio::sync::oneshot::Receiver<()>> {
    let (built_tx, built_rx) = std::sync::mpsc::sync_channel(1);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    // Log lines from the balancer go where the caller's go.
    let dispatch = tracing::dispatcher::get_default(Clone::clone);
    let name = match thread {
        0 => "recluster-balance".to_string(),
        k => format!("recluster-balance-{k}"),
    };
    std::thread::Builder::new().name(name).spawn(move || {
        tracing::dispatcher::with_default(&dispatch, || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let runtime = match runtime {
                Ok(r) => r,
                Err(e) => return drop(built_tx.send(Err(e))),
            };
            // The listeners register with this thread's runtime, so it builds them.
            let balancer = runtime.block_on(async {
                Balancer::new(mode, listeners, slots, updates, stats, stuck, thread, proxy)
            });
            match balancer {
                Ok(b) => {
                    let _ = built_tx.send(Ok(()));
                    runtime.block_on(b.run());
                }
                Err(e) => return drop(built_tx.send(Err(e))),
            }
            let _ = done_tx.send(());
        })
    })?;
    built_rx
        .recv()
        .map_err(|_| io::Error::other("the balancer thread ended before it started"))??;
    Ok(done)
}

/// Waits until one of the listeners has a connection; returns its index.
async fn poll_listeners(listeners: &[Acceptor]) -> usize {
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

    #[test]
    fn latency_quantiles_are_within_a_quarter() {
        let l = Latency::default();
        assert_eq!(l.quantile_us(0.99), 0);
        for us in 1..=1000u64 {
            l.record(Duration::from_micros(us));
        }
        let p50 = l.quantile_us(0.5);
        let p99 = l.quantile_us(0.99);
        assert!((500..=625).contains(&p50), "p50 {p50}");
        assert!((990..=1238).contains(&p99), "p99 {p99}");
        l.record(Duration::from_secs(5));
        assert!(l.quantile_us(1.0) >= 100_000, "the longest counts in the last bucket");
    }
}
