//! The master's end of Node's cluster IPC (`--via node`): an unmodified Node server
//! takes its connections from recluster as it would from Node's own primary.
//!
//! A Node process started with `NODE_CHANNEL_FD` and `NODE_UNIQUE_ID` is a cluster
//! worker: its `server.listen(port)` asks the primary for the server (`queryServer`),
//! and an answer without a descriptor puts the server in round-robin mode, where every
//! connection comes from the primary as a `newconn` message carrying the socket. This
//! module is that primary, for one worker (docs/NODE.md has the whole dialect; the
//! facts were checked against `lib/internal/cluster/{child,utils}.js` and the `node`
//! on the test machine):
//!
//! * **Framing.** JSON, one message per line, over a `SOCK_STREAM` socketpair. A
//!   descriptor travels in SCM_RIGHTS with the line
//!   `{"cmd":"NODE_HANDLE","type":"net.Native","msg":{…"act":"newconn"…}}`; the worker
//!   answers `NODE_HANDLE_ACK` (or `NODE_HANDLE_NACK`: no descriptor arrived, sent
//!   again up to [`NACK_RETRIES`] times), in the order the lines were written. Up to
//!   [`PIPELINE`] handles are written before the first is answered (Node's own primary
//!   writes one), each in a write of its own; a line without a handle waits until
//!   every handle written was answered, as Node's sender does. Then the worker answers
//!   the `newconn` itself with `{"ack":seq,"accepted":bool}`.
//! * **Never lost.** The master keeps its copy of every connection it wrote until the
//!   worker says `accepted: true`. A connection refused, not acknowledged, or written
//!   to a worker that went away is handed back to the balancer and goes to another
//!   worker (Node's own primary loses these: node issues 3551 and 21746). Node answers
//!   `accepted` before its server reads a byte, so a connection handed back was never
//!   served.
//! * **Bounded.** At most [`WINDOW`] connections per worker are offered and not yet
//!   accepted (Node's primary keeps one in flight and queues the rest in one shared
//!   list); a worker with a full window is "full" to the balancer, as a full worker
//!   channel is. A line longer than [`MAX_LINE`], a line that
//!   is not JSON, or a worker over the message budget (acknowledgements of
//!   connections excepted) is an offence, passed on as [`Input::Garbage`] as on the
//!   worker channel; the core kills the worker at its garbage limit.
//! * **Lifecycle in Node's terms.** The worker's `listening` is recluster's
//!   `listening`; `process.send({cmd: 'ready'})` is `ready`; `{cmd: 'disconnect'}` or
//!   the worker's own `cluster.worker.disconnect()` asks for a replacement. Stopping
//!   sends Node's graceful `disconnect` (the worker closes its servers, lets open
//!   connections finish and closes the channel); the stop signal follows once the
//!   channel has closed, or at once for a worker that never spoke Node's protocol.
//!   A closed channel means the worker is gone, never an error of the master.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::fdpass::{self, FdBuf};
use crate::via::reader::{Budget, Said};
use crate::via::{GiveBack, Returned};
use crate::supervisor::{Input, WorkerId, GARBAGE_LIMIT};
use crate::via::channel::Conn;

/// Connections offered to one worker and not yet accepted (queued here or written);
/// more wait in the balancer. It bounds the descriptors the master holds for a
/// worker; at most [`PIPELINE`] of them are written and unacknowledged. It is as deep as a burst of one client's
/// connections can be, because a `sticky` connection that finds its worker full
/// goes to another worker after `STICKY_WAIT`, and socket.io's polling sessions break
/// when that happens.
pub const WINDOW: usize = 64;

/// The longest line a worker may send; anything longer is an offence and skipped.
pub const MAX_LINE: usize = 64 * 1024;

/// How long a worker may run without a word of Node's cluster protocol before the
/// master says, once, that it is probably not `node` running a script.
pub const SILENT_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Node major versions the dialect was checked against (docs/NODE.md).
pub const TESTED_MAJORS: &[u32] = &[20];

/// How long a stopping worker whose channel has closed may take to exit by itself
/// before it gets the stop signal.
pub const EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Handles written to one worker before the first of them is acknowledged. Node's
/// own primary writes one and waits for its `NODE_HANDLE_ACK`, so a worker takes one
/// connection per turn of its event loop. Node's receiver needs less: the kernel
/// never joins two descriptor-carrying writes in one read, each read hands Node at
/// most one descriptor, kept until the line it came with is complete, and the
/// answers come in the order the lines were written. What it cannot take is a
/// second descriptor before the first line is complete, so a handle line that went
/// out in more than one write is answered before the next is written.
pub const PIPELINE: usize = 16;

/// The most listening sockets a cluster holds under `--via node`, `--listen` ones
/// included: a worker asking for port after port cannot exhaust the master's fds.
pub const MAX_PORTS: usize = 64;

/// The most servers one worker may have asked for; more are answered `EMFILE`.
pub const MAX_SERVERS: usize = 64;

/// How often a handle the worker did not receive (`NODE_HANDLE_NACK`) is sent again.
pub const NACK_RETRIES: u32 = 3;

/// The listening sockets of a `--via node` cluster: the `--listen` ones, and those bound
/// when a worker first asks for a port no `--listen` address has.
pub(crate) struct Ports {
    inner: Mutex<Vec<Port>>,
    /// New sockets and connections handed back go to the balancer.
    give_back: GiveBack,
    backlog: i32,
    /// The "never spoke Node's protocol" warning was given (once per cluster).
    warned_silent: std::sync::atomic::AtomicBool,
    /// `--via socket`: slot k's listening sockets (address, descriptor), one per
    /// `--listen` address; a worker's `listen` gets its own slot's socket and accepts
    /// on it itself. Empty when the master hands connections over.
    slots: Vec<Vec<(SocketAddr, RawFd)>>,
}

/// One listening socket, by its index in the balancer.
struct Port {
    addr: SocketAddr,
    /// For a socket bound because a worker asked for port 0: the key it asked with.
    asked: Option<String>,
}

impl Ports {
    /// The registry of `listening` (the balancer's sockets, in its order).
    pub fn new(listening: &[SocketAddr], give_back: GiveBack, backlog: i32) -> Ports {
        Ports {
            inner: Mutex::new(listening.iter().map(|&addr| Port { addr, asked: None }).collect()),
            give_back,
            backlog,
            warned_silent: std::sync::atomic::AtomicBool::new(false),
            slots: Vec::new(),
        }
    }

    /// Workers accept on their own slot's sockets (`--via socket`): `slots[k]` are slot
    /// k's, in `--listen` order; the master keeps them open for its whole life.
    pub fn with_slot_sockets(mut self, slots: Vec<Vec<(SocketAddr, RawFd)>>) -> Ports {
        self.slots = slots;
        self
    }

    /// The socket for a worker's `listen(port, address)`: the `--listen` one with that
    /// port, or one bound now (and kept for the master's whole life).
    fn resolve(&self, address: Option<&str>, port: u16, asked: &str) -> io::Result<(usize, SocketAddr)> {
        let mut ports = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let found = ports.iter().position(|p| {
            if port == 0 {
                p.asked.as_deref() == Some(asked)
            } else {
                p.addr.port() == port
            }
        });
        if let Some(i) = found {
            return Ok((i, ports[i].addr));
        }
        if ports.len() >= MAX_PORTS {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        let listener = bind_for(address, port, self.backlog)?;
        let addr = listener.local_addr()?;
        let index = ports.len();
        ports.push(Port {
            addr,
            asked: (port == 0).then(|| asked.to_string()),
        });
        info!(event = "listening", addr = %addr, index, balance = "node", "listening (asked for by a worker)");
        (self.give_back)(Returned::Listener(listener));
        Ok((index, addr))
    }
}

/// Binds what a Node server asked for: its address, or `[::]` (both families) as Node
/// does for a server with no host, `0.0.0.0` where IPv6 is not available.
fn bind_for(address: Option<&str>, port: u16, backlog: i32) -> io::Result<TcpListener> {
    let ips: Vec<IpAddr> = match address {
        Some(a) => match a.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => {
                use std::net::ToSocketAddrs;
                (a, port).to_socket_addrs()?.map(|s| s.ip()).collect()
            }
        },
        None => vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED), IpAddr::from([0, 0, 0, 0])],
    };
    let mut last = io::Error::new(io::ErrorKind::AddrNotAvailable, "no address to listen on");
    for ip in ips {
        match crate::listen::bind(SocketAddr::new(ip, port), backlog) {
            Ok(l) => return Ok(l),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// What the balancer and the channel's task share about one worker.
#[derive(Default)]
struct State {
    /// `disconnect` was sent (or is about to be): no more connections.
    stopping: bool,
    /// The channel closed or failed: the worker takes nothing more.
    gone: bool,
    /// The worker has said something in Node's protocol (`online` at least).
    spoke: bool,
    /// The worker's servers: their key, and the balancer's socket each stands for.
    servers: Vec<(String, usize)>,
    /// Offered by the balancer, not written yet.
    queue: VecDeque<Conn>,
    /// Written (or being written), not yet accepted: `(seq, conn)`, oldest first.
    in_flight: VecDeque<(u64, Conn)>,
    /// Lines to write before the next connection: answers, `disconnect`.
    control: VecDeque<Line>,
    /// The next `seq` of a message of ours.
    seq: u64,
    /// The start of a line the task has read and not yet seen the end of: when the
    /// worker exits, [`NodeChannel::reclaim_after_exit`] reads on from it (the task is
    /// aborted then, and an answer cut in two by it would be lost).
    partial: Vec<u8>,
}

impl State {
    fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq += 1;
        s
    }

    fn load(&self) -> usize {
        self.queue.len() + self.in_flight.len()
    }
}

/// The master's end of one Node worker's IPC channel.
pub(crate) struct NodeChannel {
    fd: AsyncFd<OwnedFd>,
    state: Mutex<State>,
    /// Wakes the channel's task: something to write.
    wake: Notify,
    /// The cluster's sockets, and where connections handed back go.
    ports: Arc<Ports>,
    /// The worker's slot (which sockets it gets under `--via socket`).
    slot: usize,
    /// The worker's pid once started, for the log.
    pid: std::sync::atomic::AtomicU32,
    /// Connections handed to this worker so far (for `status` and metrics).
    handed: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for NodeChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeChannel").field("fd", &self.fd.as_raw_fd()).finish()
    }
}

impl NodeChannel {
    /// Creates a channel; returns it and the end to place in the worker (a blocking
    /// stream socket, as Node expects at `NODE_CHANNEL_FD`).
    pub fn new(ports: Arc<Ports>, slot: usize) -> io::Result<(NodeChannel, OwnedFd)> {
        let (master, worker) = fdpass::stream_pair()?;
        fdpass::set_flags(worker.as_fd(), false, true)?;
        let channel = NodeChannel {
            fd: fdpass::register(master)?,
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            ports,
            slot,
            pid: std::sync::atomic::AtomicU32::new(0),
            handed: std::sync::atomic::AtomicU64::new(0),
        };
        Ok((channel, worker))
    }

    /// Records the worker's pid, once it is started.
    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts `n` more connections handed to this worker.
    pub fn count_handed(&self, n: u64) {
        self.handed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Connections handed to this worker so far.
    pub fn handed(&self) -> u64 {
        self.handed.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers the worker one connection (from the balancer's thread); gives it back
    /// when the worker cannot take it now: its window is full, it has no server for
    /// the socket the connection came in on, or it is stopping or gone.
    pub fn offer(&self, conn: Conn) -> Result<(), Conn> {
        let mut st = self.state();
        let serves = st.servers.iter().any(|(_, l)| *l == conn.listener);
        if st.stopping || st.gone || !serves || st.load() >= WINDOW {
            return Err(conn);
        }
        st.queue.push_back(conn);
        drop(st);
        self.wake.notify_one();
        Ok(())
    }

    /// A fingerprint of the oldest connection written and not yet accepted, for the
    /// balancer's stuck check (`balance::stuck`): the same one for the whole
    /// `--stuck-timeout` means the worker read nothing meanwhile.
    pub fn unread_head(&self) -> Option<u64> {
        let st = self.state();
        st.in_flight.front().map(|(seq, _)| *seq).or_else(|| st.queue.front().map(|_| u64::MAX))
    }

    /// Connections offered and not accepted yet.
    pub fn backlog(&self) -> usize {
        self.state().load()
    }

    /// Takes back what was offered and not written yet (the worker was found stuck).
    /// What was written stays until the worker answers or exits: handing it to another
    /// worker now could serve one connection twice.
    pub fn reclaim_unsent(&self) -> Vec<Conn> {
        let mut st = self.state();
        st.stopping = true;
        st.queue.drain(..).collect()
    }

    /// After the worker exited: reads what it wrote before it died (its last answers),
    /// then takes back every connection it did not accept.
    pub fn reclaim_after_exit(&self) -> Vec<Conn> {
        let mut inbuf = std::mem::take(&mut self.state().partial);
        let mut buf = [0u8; 16 * 1024];
        loop {
            let mut fds = Vec::new();
            match fdpass::recv(self.fd.as_fd(), &mut buf, &mut fds, &mut FdBuf::new()) {
                Ok(got) if got.len > 0 => {
                    inbuf.extend_from_slice(&buf[..got.len]);
                    while let Some(end) = inbuf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = inbuf.drain(..=end).collect();
                        if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                            if let Some((seq, accepted)) = accepted_answer(&v) {
                                self.answered(seq, accepted);
                            }
                        }
                    }
                    if inbuf.len() > MAX_LINE {
                        inbuf.clear();
                    }
                }
                _ => break,
            }
        }
        let mut st = self.state();
        st.gone = true;
        let mut out: Vec<Conn> = st.in_flight.drain(..).map(|(_, c)| c).collect();
        out.extend(st.queue.drain(..));
        out
    }

    /// Asks the worker to stop gracefully: Node's `disconnect`. Returns whether that
    /// can work: the worker speaks Node's protocol and has a server (if not, the caller
    /// signals it at once).
    pub fn stop(&self) -> bool {
        let mut st = self.state();
        if !st.stopping {
            st.stopping = true;
            let seq = st.next_seq();
            let line = format!("{{\"cmd\":\"NODE_CLUSTER\",\"act\":\"disconnect\",\"seq\":{seq}}}\n");
            st.control.push_back(Line::plain(line.into_bytes()));
        }
        let back: Vec<Conn> = st.queue.drain(..).collect();
        // A worker with no server yet serves nothing to drain: signal it at once (after
        // a `disconnect` Node would leave a `listen` in progress hanging, alive).
        let spoke = st.spoke && !st.gone && !st.servers.is_empty();
        drop(st);
        self.hand_back(back);
        self.wake.notify_one();
        spoke
    }

    /// Gives connections back to the balancer, for another worker.
    fn hand_back(&self, conns: Vec<Conn>) {
        if !conns.is_empty() {
            (self.ports.give_back)(Returned::Conns(conns));
        }
    }

    /// The worker answered a `newconn`: forget an accepted connection (closing the
    /// master's copy), hand a refused one back. False for an answer to nothing.
    fn answered(&self, seq: u64, accepted: bool) -> bool {
        let mut st = self.state();
        let Some(i) = st.in_flight.iter().position(|(s, _)| *s == seq) else {
            return false;
        };
        let (_, conn) = st.in_flight.remove(i).expect("position is in range");
        drop(st);
        let pid = self.pid.load(std::sync::atomic::Ordering::Relaxed);
        if accepted {
            // The worker owns the connection from here on: a test that kills a worker
            // counts these to know which connections died with it.
            debug!(event = "node_accepted", pid, seq, "a node worker accepted a connection");
        } else {
            debug!(event = "node_refused", pid, seq, "a node worker refused a connection: handing it to another");
            self.hand_back(vec![conn]);
        }
        self.wake.notify_one();
        true
    }
}

/// `{"cmd":"NODE_CLUSTER","ack":seq,"accepted":bool}`: a worker's answer to a `newconn`.
fn accepted_answer(v: &Value) -> Option<(u64, bool)> {
    if v.get("cmd")?.as_str()? != "NODE_CLUSTER" {
        return None;
    }
    Some((v.get("ack")?.as_u64()?, v.get("accepted")?.as_bool()?))
}

/// Who the channel's task reports to, and how it ends a worker.
pub(crate) struct Task {
    /// The worker.
    pub id: WorkerId,
    /// Its pid (process group): the stop signal goes there once its channel closed.
    pub pid: u32,
    /// `--stop-signal`.
    pub stop_signal: Signal,
    /// The supervisor's input queue.
    pub inputs: mpsc::Sender<Input>,
}

/// What the task is writing: a line, and the connection's descriptor with its first byte.
struct Out {
    bytes: Vec<u8>,
    at: usize,
    /// The `seq` of the `newconn` whose descriptor goes with the first byte.
    handle: Option<u64>,
    /// How many times this `newconn` was sent before (NACKs).
    sent: u32,
    /// Writes that sent only part of the line so far.
    writes: u32,
    /// A descriptor of the master's own to send with the first byte (a listening socket).
    fd: Option<RawFd>,
}

/// Runs the channel of one worker until it closes: writes answers and connections,
/// reads and acts on what the worker says.
pub(crate) async fn run(ch: Arc<NodeChannel>, task: Task) {
    let mut reader = Reader {
        inbuf: Vec::with_capacity(4096),
        skipping: false,
        skipped: 0,
        budget: Budget::new(Instant::now()),
        said: Said::default(),
        offences: 0,
    };
    let mut out: Option<Out> = None;
    // Handles written whose NODE_HANDLE_ACK (or NACK) has not come, oldest first
    // (Node answers them in the order they were written).
    let mut awaiting: VecDeque<Awaited> = VecDeque::new();
    // Handles to write again after a NACK: (`seq`, times sent so far).
    let mut resend: VecDeque<(u64, u32)> = VecDeque::new();
    // A handle line went out in more than one write: no other handle until it is
    // answered (see [`PIPELINE`]).
    let mut split = false;
    let mut cbuf = FdBuf::new();
    let mut buf = vec![0u8; 16 * 1024];
    let silent_at = Instant::now() + SILENT_AFTER;
    let mut silent_checked = false;
    loop {
        if out.is_none() {
            let room = if split { 0 } else { PIPELINE.saturating_sub(awaiting.len()) };
            out = match resend.pop_front() {
                Some((seq, sent)) if room > 0 => Some(newconn_out(&ch, seq, sent)),
                Some(back) => {
                    resend.push_front(back);
                    None
                }
                None => next_out(&ch, awaiting.is_empty(), room > 0),
            };
        }
        let want_write = out.is_some();
        let interest = if want_write {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let ready = tokio::select! {
            r = ch.fd.ready(interest) => match r {
                Ok(g) => Some(g),
                Err(_) => break,
            },
            _ = ch.wake.notified(), if !want_write => None,
            _ = tokio::time::sleep_until(silent_at), if !silent_checked => {
                silent_checked = true;
                warn_if_silent(&ch, &task);
                None
            }
        };
        let Some(mut guard) = ready else { continue };
        if guard.ready().is_readable() {
            match fdpass::recv(ch.fd.as_fd(), &mut buf, &mut Vec::new(), &mut cbuf) {
                Ok(got) if got.len == 0 => break, // EOF: the worker closed its channel
                Ok(got) => {
                    let heard = reader.take(&buf[..got.len], got.fds_truncated);
                    if !reader.inbuf.is_empty() || !ch.state().partial.is_empty() {
                        ch.state().partial.clone_from(&reader.inbuf);
                    }
                    // Every line is acted on before the first await: the task is
                    // aborted when the worker exits, and an answer read but not acted
                    // on would be lost (its connection handed to another worker).
                    let mut inputs = Vec::new();
                    for heard in heard {
                        let input = match heard {
                            // An answer to no handle is an offence (a flood of them is
                            // garbage, not work), and so is a handle refused to the end.
                            Heard::HandleAck => {
                                let offence = awaiting.pop_front().is_none();
                                split &= !awaiting.is_empty();
                                offence.then(|| reader.offence(task.id)).flatten()
                            }
                            Heard::HandleNack => {
                                // Node got the line without the descriptor: again, a few times.
                                let offence = match awaiting.pop_front() {
                                    Some(Awaited::Conn(seq, sent)) if sent <= NACK_RETRIES => {
                                        resend.push_back((seq, sent));
                                        false
                                    }
                                    Some(Awaited::Conn(seq, _)) => {
                                        if let Some(conn) = remove_in_flight(&ch, seq) {
                                            ch.hand_back(vec![conn]);
                                        }
                                        true
                                    }
                                    Some(Awaited::Line(line)) if line.sent <= NACK_RETRIES => {
                                        ch.state().control.push_front(line);
                                        false
                                    }
                                    Some(Awaited::Line(_)) => {
                                        warn!(event = "node_handle_refused", pid = task.pid, "a node worker did not receive its listening socket");
                                        true
                                    }
                                    None => true,
                                };
                                split &= !awaiting.is_empty();
                                offence.then(|| reader.offence(task.id)).flatten()
                            }
                            Heard::Line(v) => handle_line(&ch, &task, &mut reader, v),
                            Heard::Offence => reader.offence(task.id),
                        };
                        inputs.extend(input);
                    }
                    for input in inputs {
                        if task.inputs.send(input).await.is_err() {
                            return;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready_matching(tokio::io::Ready::READABLE)
                }
                Err(_) => break,
            }
        }
        if guard.ready().is_writable() {
            if let Some(o) = out.as_mut() {
                let raw = match (o.handle, o.at) {
                    (Some(seq), 0) => raw_fd_of(&ch, seq),
                    (None, 0) => o.fd,
                    _ => None,
                };
                let fds: &[i32] = match &raw {
                    Some(fd) => std::slice::from_ref(fd),
                    None => &[],
                };
                match fdpass::send_some(ch.fd.as_fd(), &o.bytes[o.at..], fds, &mut cbuf) {
                    Ok(n) => {
                        o.at += n;
                        if o.at == o.bytes.len() {
                            if let Some(seq) = o.handle {
                                awaiting.push_back(Awaited::Conn(seq, o.sent + 1));
                                split |= o.writes > 0;
                            } else if let Some(fd) = o.fd {
                                let line = Line {
                                    bytes: std::mem::take(&mut o.bytes),
                                    fd: Some(fd),
                                    sent: o.sent + 1,
                                };
                                awaiting.push_back(Awaited::Line(line));
                                split |= o.writes > 0;
                            }
                            out = None;
                        } else {
                            o.writes += 1;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        guard.clear_ready_matching(tokio::io::Ready::WRITABLE)
                    }
                    Err(_) => break,
                }
            }
        }
    }
    // The channel closed: the worker is gone or disconnected. Everything it did not
    // accept goes to another worker, and a stopping worker gets the stop signal now.
    let (back, stopping) = {
        let mut st = ch.state();
        st.gone = true;
        let mut back: Vec<Conn> = st.in_flight.drain(..).map(|(_, c)| c).collect();
        back.extend(st.queue.drain(..));
        (back, st.stopping)
    };
    ch.hand_back(back);
    if stopping {
        // A Node worker whose servers and channel are closed exits by itself as soon
        // as nothing else keeps its event loop alive; the stop signal is for one that
        // has more (timers, pools). This task ends when the worker is reaped.
        tokio::time::sleep(EXIT_GRACE).await;
        let _ = killpg(Pid::from_raw(task.pid as i32), task.stop_signal);
    }
    debug!(event = "node_channel_closed", pid = task.pid, "a node worker closed its channel");
}

/// Says once per cluster that a worker runs without a word of Node's protocol: the
/// usual cause is a launcher written in Node (`npm start`: npm itself becomes the
/// cluster worker and deletes the variables) or `node -e`, which Node does not make a
/// cluster worker. (A shell wrapper passes fd 3 and the variables on: it works.)
fn warn_if_silent(ch: &NodeChannel, task: &Task) {
    use std::sync::atomic::Ordering;
    if ch.state().spoke || ch.ports.warned_silent.swap(true, Ordering::Relaxed) {
        return;
    }
    warn!(
        event = "node_silent",
        pid = task.pid,
        after_ms = SILENT_AFTER.as_millis() as u64,
        "a worker has said nothing in Node's cluster protocol since it started: with --via \
         node the worker must be node running a script (node server.js). Under npm start \
         (or any launcher written in Node) the launcher takes the channel and the app never \
         sees it; node -e is not a cluster worker (it asks for a server once, then exits). \
         See docs/NODE.md"
    );
}

/// Logs the version of the Node the workers run, and warns when the dialect was not
/// checked against that major version (a Node that answers differently then shows as
/// workers that never get ready, and this line says why to look).
pub(crate) fn check_version(program: &std::path::Path) {
    let program = program.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let asked = std::thread::Builder::new()
        .name("recluster-node-version".into())
        .spawn(move || {
            let out = std::process::Command::new(&program)
                .arg("--version")
                .stdin(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .output();
            let _ = tx.send(out);
        });
    if asked.is_err() {
        return;
    }
    // A node that does not answer in time is not waited for: the workers will show it.
    let Ok(Ok(out)) = rx.recv_timeout(std::time::Duration::from_secs(5)) else {
        return;
    };
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let major = version
        .strip_prefix('v')
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(m) if TESTED_MAJORS.contains(&m) => {
            info!(event = "node_version", version = %version, tested = true, "node version")
        }
        _ => warn!(
            event = "node_version",
            version = %version,
            tested = false,
            "recluster's Node cluster dialect was checked against Node {TESTED_MAJORS:?}, not \
             this one: if workers never get ready, see docs/NODE.md"
        ),
    }
}

/// The next thing to write: an answer first (only once every handle written was
/// answered, `answered`), then the oldest offered connection (if `handle_room`).
fn next_out(ch: &NodeChannel, answered: bool, handle_room: bool) -> Option<Out> {
    let mut st = ch.state();
    if !st.control.is_empty() {
        // Node's order: nothing but handles between a handle and its answer.
        if !answered {
            return None;
        }
        let line = st.control.pop_front()?;
        return Some(Out {
            bytes: line.bytes,
            at: 0,
            handle: None,
            sent: line.sent,
            writes: 0,
            fd: line.fd,
        });
    }
    if st.gone || !handle_room {
        return None;
    }
    let conn = st.queue.pop_front()?;
    let Some(key) = st.servers.iter().find(|(_, l)| *l == conn.listener).map(|(k, _)| k.clone()) else {
        // Its server closed since the offer: another worker takes it.
        drop(st);
        ch.hand_back(vec![conn]);
        return None;
    };
    let seq = st.next_seq();
    st.in_flight.push_back((seq, conn));
    Some(Out {
        bytes: newconn_line(&key, seq),
        at: 0,
        handle: Some(seq),
        sent: 0,
        writes: 0,
        fd: None,
    })
}

/// The `newconn` for connection `seq` again (after a NACK), sent `sent` times so far.
fn newconn_out(ch: &NodeChannel, seq: u64, sent: u32) -> Out {
    let st = ch.state();
    let key = st
        .in_flight
        .iter()
        .find(|(s, _)| *s == seq)
        .and_then(|(_, c)| st.servers.iter().find(|(_, l)| *l == c.listener))
        .map(|(k, _)| k.clone())
        .unwrap_or_default();
    Out {
        bytes: newconn_line(&key, seq),
        at: 0,
        handle: Some(seq),
        sent,
        writes: 0,
        fd: None,
    }
}

fn newconn_line(key: &str, seq: u64) -> Vec<u8> {
    let key = Value::from(key).to_string();
    format!(
        "{{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{{\"cmd\":\"NODE_CLUSTER\",\"act\":\"newconn\",\"key\":{key},\"seq\":{seq}}}}}\n"
    )
    .into_bytes()
}

fn raw_fd_of(ch: &NodeChannel, seq: u64) -> Option<i32> {
    let st = ch.state();
    st.in_flight.iter().find(|(s, _)| *s == seq).map(|(_, c)| c.stream.as_raw_fd())
}

fn remove_in_flight(ch: &NodeChannel, seq: u64) -> Option<Conn> {
    let mut st = ch.state();
    let i = st.in_flight.iter().position(|(s, _)| *s == seq)?;
    st.in_flight.remove(i).map(|(_, c)| c)
}

/// Acts on one line of the worker's; returns what the supervisor core must hear.
fn handle_line(ch: &NodeChannel, task: &Task, reader: &mut Reader, v: Value) -> Option<Input> {
    let id = task.id;
    let cmd = v.get("cmd").and_then(Value::as_str).unwrap_or("");
    if cmd == "NODE_CLUSTER" {
        if let Some((seq, accepted)) = accepted_answer(&v) {
            // An answer to nothing of ours is not protocol (and costs a look-up each).
            return (!ch.answered(seq, accepted)).then_some(Input::Garbage { id });
        }
        if !reader.budget.take(Instant::now()) {
            return Some(Input::Garbage { id });
        }
        ch.state().spoke = true;
        let act = v.get("act").and_then(Value::as_str).unwrap_or("");
        return match act {
            "online" => None,
            "queryServer" => {
                query_server(ch, &v);
                None
            }
            "listening" => reader.said.listening().then_some(Input::Listening { id }),
            "close" => {
                if let Some(key) = v.get("key").and_then(Value::as_str) {
                    ch.state().servers.retain(|(k, _)| k != key);
                }
                None
            }
            "exitedAfterDisconnect" => {
                // The worker's own cluster.worker.disconnect(): it waits for our answer.
                if let Some(seq) = v.get("seq").and_then(Value::as_u64) {
                    answer(ch, format!("\"ack\":{seq}"));
                }
                reader.said.replace().then_some(Input::ReplaceRequested { id })
            }
            _ => {
                debug!(event = "node_message_ignored", act, "ignored a node cluster message");
                None
            }
        };
    }
    if !reader.budget.take(Instant::now()) || cmd.starts_with("NODE_") {
        // The worker has no business sending a handle or other internals to us.
        return Some(Input::Garbage { id });
    }
    ch.state().spoke = true;
    match cmd {
        "ready" => reader.said.ready().then_some(Input::Ready { id }),
        "disconnect" => reader.said.replace().then_some(Input::ReplaceRequested { id }),
        // The application's own: to the event stream, as Node's primary emits `message`.
        _ => Some(Input::Message {
            id,
            text: v.to_string(),
        }),
    }
}

/// Answers a `queryServer` as Node's primary does in round-robin scheduling: with no
/// descriptor, so that the worker's server takes its connections from the master.
fn query_server(ch: &NodeChannel, v: &Value) {
    let Some(seq) = v.get("seq").and_then(Value::as_u64) else {
        return;
    };
    let address = v.get("address").and_then(Value::as_str);
    let port = v.get("port").and_then(Value::as_i64).unwrap_or(-1);
    let index = v.get("index").and_then(Value::as_u64).unwrap_or(0);
    let asked = format!(
        "{}:{}:{}:{index}",
        address.unwrap_or(""),
        port,
        v.get("addressType").map(Value::to_string).unwrap_or_default()
    );
    if ch.state().servers.len() >= MAX_SERVERS {
        warn!(event = "node_listen_failed", port, servers = MAX_SERVERS, "a node worker asked for more servers than a worker may have");
        answer(ch, format!("\"ack\":{seq},\"errno\":{},\"data\":null", -libc::EMFILE));
        return;
    }
    if !ch.ports.slots.is_empty() {
        return query_slot_socket(ch, v, seq, port, &asked);
    }
    let resolved = if v.get("fd").is_some_and(|f| !f.is_null()) || !(0..=65535).contains(&port) {
        // `listen({fd})` and unix paths: nothing the master can share this way.
        Err(io::Error::from_raw_os_error(libc::EINVAL))
    } else {
        ch.ports.resolve(address, port as u16, &asked)
    };
    match resolved {
        Ok((listener, addr)) => answer(ch, new_server(ch, seq, listener, &asked, addr)),
        Err(e) => {
            warn!(event = "node_listen_failed", error = %e, port, "a node worker asked for a server the master cannot open");
            // Node turns a negative errno into the server's `error` event (`listen EADDRINUSE`).
            let errno = -e.raw_os_error().unwrap_or(match e.kind() {
                io::ErrorKind::AddrInUse => libc::EADDRINUSE,
                io::ErrorKind::AddrNotAvailable => libc::EADDRNOTAVAIL,
                io::ErrorKind::PermissionDenied => libc::EACCES,
                _ => libc::EINVAL,
            });
            answer(ch, format!("\"ack\":{seq},\"errno\":{errno},\"data\":null"));
        }
    }
}

/// Answers a `queryServer` under `--via socket` with the worker's own slot's socket for
/// that port (or, for `listen({fd: n})`, its `n - 3`th, as it would inherit them), as
/// Node's primary answers with a shared handle: the worker's server accepts on it
/// itself, and the kernel's program chooses the slot.
fn query_slot_socket(ch: &NodeChannel, v: &Value, seq: u64, port: i64, asked: &str) {
    let mine = ch.ports.slots.get(ch.slot).map(Vec::as_slice).unwrap_or_default();
    let found = match v.get("fd").and_then(Value::as_i64) {
        Some(fd) => fd
            .checked_sub(3)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| mine.get(i).map(|s| (i, *s))),
        None => mine.iter().copied().enumerate().find(|(_, (addr, _))| i64::from(addr.port()) == port && port != 0),
    };
    let Some((index, (addr, fd))) = found else {
        warn!(event = "node_listen_failed", port, slot = ch.slot, "under --via socket a node worker must listen on a --listen port (or fd 3..): the master binds no other");
        answer(ch, format!("\"ack\":{seq},\"errno\":{},\"data\":null", -libc::EADDRNOTAVAIL));
        return;
    };
    answer_with_handle(ch, new_server(ch, seq, index, asked, addr), fd);
}

/// Records the worker's server on the balancer's socket `listener` (bound to `addr`)
/// and returns the fields of the successful answer to its `queryServer` `seq`.
fn new_server(ch: &NodeChannel, seq: u64, listener: usize, asked: &str, addr: SocketAddr) -> String {
    let key = format!("{listener}:{asked}");
    ch.state().servers.push((key.clone(), listener));
    let family = if addr.is_ipv4() { "IPv4" } else { "IPv6" };
    let sockname = serde_json::json!({"address": addr.ip().to_string(), "family": family, "port": addr.port()});
    format!(
        "\"ack\":{seq},\"errno\":0,\"key\":{},\"data\":null,\"sockname\":{sockname}",
        Value::from(key)
    )
}

/// Queues `{"cmd":"NODE_CLUSTER",<fields>,"seq":n}` for the worker.
fn answer(ch: &NodeChannel, fields: String) {
    let mut st = ch.state();
    let seq = st.next_seq();
    st.control.push_back(Line::plain(
        format!("{{\"cmd\":\"NODE_CLUSTER\",{fields},\"seq\":{seq}}}\n").into_bytes(),
    ));
    drop(st);
    ch.wake.notify_one();
}

/// Queues the same answer carrying descriptor `fd` (a listening socket, which the
/// worker's server then accepts on itself), as Node's primary sends a shared handle.
fn answer_with_handle(ch: &NodeChannel, fields: String, fd: RawFd) {
    let mut st = ch.state();
    let seq = st.next_seq();
    let bytes = format!(
        "{{\"cmd\":\"NODE_HANDLE\",\"type\":\"net.Native\",\"msg\":{{\"cmd\":\"NODE_CLUSTER\",{fields},\"seq\":{seq}}}}}\n"
    );
    st.control.push_back(Line {
        bytes: bytes.into_bytes(),
        fd: Some(fd),
        sent: 0,
    });
    drop(st);
    ch.wake.notify_one();
}

/// A line of the master's other than a connection, with the descriptor it carries.
struct Line {
    bytes: Vec<u8>,
    /// A descriptor the master keeps open for its whole life (a listening socket).
    fd: Option<RawFd>,
    /// How many times it was sent before (NACKs).
    sent: u32,
}

impl Line {
    fn plain(bytes: Vec<u8>) -> Line {
        Line { bytes, fd: None, sent: 0 }
    }
}

/// A handle written and not answered yet.
enum Awaited {
    /// Connection `seq`, sent so many times.
    Conn(u64, u32),
    /// A line with a listening socket.
    Line(Line),
}

/// What one line from the worker amounts to.
enum Heard {
    HandleAck,
    HandleNack,
    Line(Value),
    Offence,
}

/// Splits what the worker writes into lines, within [`MAX_LINE`].
struct Reader {
    inbuf: Vec<u8>,
    /// In the middle of an overlong line: drop bytes up to its end.
    skipping: bool,
    /// Bytes of the overlong line dropped since its last offence: every further
    /// [`MAX_LINE`] is one more, so a line that never ends reaches the garbage limit.
    skipped: usize,
    budget: Budget,
    said: Said,
    offences: u32,
}

impl Reader {
    /// One more offence of worker `id`, as an input for the core, until the core has
    /// had enough of them to kill it (then nothing more is passed on).
    fn offence(&mut self, id: WorkerId) -> Option<Input> {
        (self.offences < GARBAGE_LIMIT).then(|| {
            self.offences += 1;
            Input::Garbage { id }
        })
    }

    fn take(&mut self, bytes: &[u8], fds_came: bool) -> Vec<Heard> {
        let mut out = Vec::new();
        if fds_came {
            out.push(Heard::Offence);
        }
        let mut rest = bytes;
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(end) => {
                    let (line, tail) = rest.split_at(end + 1);
                    rest = tail;
                    if std::mem::take(&mut self.skipping) {
                        continue;
                    }
                    let whole;
                    let line = if self.inbuf.is_empty() {
                        line
                    } else {
                        self.inbuf.extend_from_slice(line);
                        whole = std::mem::take(&mut self.inbuf);
                        &whole[..]
                    };
                    out.push(parse(line));
                }
                None => {
                    if self.skipping {
                        self.skipped += rest.len();
                        if self.skipped > MAX_LINE {
                            self.skipped = 0;
                            out.push(Heard::Offence);
                        }
                    } else {
                        self.inbuf.extend_from_slice(rest);
                        if self.inbuf.len() > MAX_LINE {
                            self.inbuf = Vec::with_capacity(4096);
                            self.skipping = true;
                            self.skipped = 0;
                            out.push(Heard::Offence);
                        }
                    }
                    rest = &[];
                }
            }
        }
        out
    }
}

fn parse(line: &[u8]) -> Heard {
    let line = line.trim_ascii();
    if line == br#"{"cmd":"NODE_HANDLE_ACK"}"# {
        return Heard::HandleAck;
    }
    match serde_json::from_slice::<Value>(line) {
        Ok(v) => match v.get("cmd").and_then(Value::as_str) {
            Some("NODE_HANDLE_ACK") => Heard::HandleAck,
            Some("NODE_HANDLE_NACK") => Heard::HandleNack,
            _ if v.is_object() => Heard::Line(v),
            _ => Heard::Offence,
        },
        Err(_) => Heard::Offence,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader() -> Reader {
        Reader {
            inbuf: Vec::new(),
            skipping: false,
            skipped: 0,
            budget: Budget::new(Instant::now()),
            said: Said::default(),
            offences: 0,
        }
    }

    fn kinds(heard: &[Heard]) -> Vec<&'static str> {
        heard
            .iter()
            .map(|h| match h {
                Heard::HandleAck => "ack",
                Heard::HandleNack => "nack",
                Heard::Line(_) => "line",
                Heard::Offence => "offence",
            })
            .collect()
    }

    #[test]
    fn lines_split_across_reads_and_acks_are_recognised() {
        let mut r = reader();
        let a = r.take(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n{\"cmd\":\"NODE_CLU", false);
        assert_eq!(kinds(&a), ["ack"]);
        let b = r.take(b"STER\",\"ack\":3,\"accepted\":true}\n{\"cmd\":\"NODE_HANDLE_NACK\"}\n", false);
        assert_eq!(kinds(&b), ["line", "nack"]);
        let Heard::Line(v) = &b[0] else { unreachable!() };
        assert_eq!(accepted_answer(v), Some((3, true)));
    }

    #[test]
    fn garbage_overlong_lines_and_descriptors_are_offences_and_memory_stays_bounded() {
        let mut r = reader();
        assert_eq!(kinds(&r.take(b"not json\n[1,2]\n{}\n", false)), ["offence", "offence", "line"]);
        // A line longer than MAX_LINE: its bytes dropped up to its end, one offence per
        // MAX_LINE of it, so a line that never ends reaches the garbage limit.
        let chunk = vec![b'x'; 16 * 1024];
        let mut offences = 0;
        for _ in 0..(4 * MAX_LINE / chunk.len()) {
            offences += r.take(&chunk, false).len();
            assert!(r.inbuf.len() <= MAX_LINE + chunk.len());
        }
        assert!((3..=4).contains(&offences), "{offences}");
        assert_eq!(kinds(&r.take(b"yyy\n{\"cmd\":\"ready\"}\n", false)), ["line"]);
        assert_eq!(kinds(&r.take(b"", true)), ["offence"]);
    }

    #[test]
    fn newconn_lines_are_json_with_the_key_escaped() {
        let line = newconn_line("0:a\"b", 7);
        let v: Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["cmd"], "NODE_HANDLE");
        assert_eq!(v["type"], "net.Native");
        assert_eq!(v["msg"]["act"], "newconn");
        assert_eq!(v["msg"]["key"], "0:a\"b");
        assert_eq!(v["msg"]["seq"], 7);
        assert!(line.ends_with(b"}\n"));
    }

    /// The worker's side of the channel in [`handles_are_pipelined_and_answered_in_order`]:
    /// reads lines, keeping the descriptor each `NODE_HANDLE` line brought.
    struct FakeWorker {
        fd: OwnedFd,
        inbuf: Vec<u8>,
        fds: VecDeque<OwnedFd>,
    }

    impl FakeWorker {
        fn send(&self, line: &str) {
            let n = nix::unistd::write(&self.fd, line.as_bytes()).expect("write to the master");
            assert_eq!(n, line.len());
        }

        /// The next line, with its descriptor for a `NODE_HANDLE`; `None` when nothing
        /// came for 300 ms (the master had nothing more to write).
        fn line(&mut self) -> Option<(Value, Option<OwnedFd>)> {
            loop {
                if let Some(end) = self.inbuf.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.inbuf.drain(..=end).collect();
                    let v: Value = serde_json::from_slice(&line).expect("the master writes JSON");
                    let fd = (v["cmd"] == "NODE_HANDLE").then(|| self.fds.pop_front().expect("a handle line brings its descriptor"));
                    return Some((v, fd));
                }
                let mut poll = libc::pollfd {
                    fd: self.fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for the duration of the call.
                if unsafe { libc::poll(&mut poll, 1, 300) } == 0 {
                    return None;
                }
                let mut buf = [0u8; 4096];
                let mut fds = Vec::new();
                match fdpass::recv(self.fd.as_fd(), &mut buf, &mut fds, &mut FdBuf::new()) {
                    Ok(got) => {
                        assert!(got.len > 0, "the master closed the channel");
                        assert!(fds.len() <= 1, "one descriptor per read, as Node assumes");
                        self.inbuf.extend_from_slice(&buf[..got.len]);
                        self.fds.extend(fds);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => panic!("read from the master: {e}"),
                }
            }
        }
    }

    /// Reads which client (the byte it wrote) a received connection is.
    fn client_of(fd: OwnedFd) -> u8 {
        let mut stream = std::net::TcpStream::from(fd);
        let mut byte = [0u8; 1];
        std::io::Read::read_exact(&mut stream, &mut byte).expect("the client's byte");
        byte[0]
    }

    #[tokio::test]
    async fn handles_are_pipelined_and_answered_in_order() {
        const CLIENTS: usize = 20;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (back_tx, back_rx) = std::sync::mpsc::channel::<Vec<Conn>>();
        let back_tx = Mutex::new(back_tx);
        let give_back: GiveBack = Arc::new(move |r| {
            if let Returned::Conns(conns) = r {
                let _ = back_tx.lock().unwrap().send(conns);
            }
        });
        let ports = Arc::new(Ports::new(&[addr], give_back, 128));
        let (ch, worker_end) = NodeChannel::new(ports, 0).unwrap();
        let ch = Arc::new(ch);
        let (inputs, mut inputs_rx) = mpsc::channel(1024);
        tokio::spawn(async move { while inputs_rx.recv().await.is_some() {} });
        let task = Task {
            id: WorkerId(1),
            pid: u32::MAX,
            stop_signal: Signal::SIGTERM,
            inputs,
        };
        tokio::spawn(run(ch.clone(), task));

        // The worker: one server, then it reads without answering.
        let mut worker = FakeWorker {
            fd: worker_end,
            inbuf: Vec::new(),
            fds: VecDeque::new(),
        };
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (clients_tx, clients_rx) = std::sync::mpsc::channel::<()>();
        let worker_thread = std::thread::spawn(move || {
            worker.send("{\"cmd\":\"NODE_CLUSTER\",\"act\":\"online\",\"seq\":0}\n");
            worker.send(&format!(
                "{{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\",\"index\":0,\"data\":null,\"address\":null,\"port\":{},\"addressType\":4,\"backlog\":0,\"seq\":1}}\n",
                addr.port()
            ));
            let (answer, fd) = worker.line().expect("the queryServer answer");
            assert_eq!((answer["ack"].as_u64(), answer["errno"].as_i64(), fd.is_none()), (Some(1), Some(0), true));
            ready_tx.send(()).unwrap();
            clients_rx.recv().unwrap();

            // PIPELINE handles arrive before any acknowledgement, and no more.
            let mut written = Vec::new();
            while let Some((v, fd)) = worker.line() {
                written.push((v["msg"]["seq"].as_u64().expect("a newconn seq"), fd.expect("a descriptor")));
            }
            assert_eq!(written.len(), PIPELINE, "handles written before the first acknowledgement");
            // Answer them in order: the second as not received (its descriptor dropped, as
            // Node's receiver would have none), every other one acknowledged.
            let nacked = written[1].0;
            let mut got: Vec<(u64, OwnedFd)> = Vec::new();
            for (i, (seq, fd)) in written.into_iter().enumerate() {
                if i == 1 {
                    drop(fd);
                    worker.send("{\"cmd\":\"NODE_HANDLE_NACK\"}\n");
                } else {
                    got.push((seq, fd));
                    worker.send("{\"cmd\":\"NODE_HANDLE_ACK\"}\n");
                }
            }
            // The rest come, the NACKed one again with its connection.
            while got.len() < CLIENTS {
                let (v, fd) = worker.line().expect("the remaining handles and the one sent again");
                got.push((v["msg"]["seq"].as_u64().unwrap(), fd.unwrap()));
                worker.send("{\"cmd\":\"NODE_HANDLE_ACK\"}\n");
            }
            assert!(worker.line().is_none(), "nothing more than {CLIENTS} connections");
            assert!(got.iter().any(|(seq, _)| *seq == nacked), "the NACKed handle came again");
            // Accept all but the last; refuse that one.
            let mut clients = Vec::new();
            let last = got.len() - 1;
            for (i, (seq, fd)) in got.into_iter().enumerate() {
                clients.push(client_of(fd));
                let accepted = i != last;
                worker.send(&format!("{{\"cmd\":\"NODE_CLUSTER\",\"ack\":{seq},\"accepted\":{accepted},\"seq\":{}}}\n", i + 2));
            }
            (clients, worker)
        });

        ready_rx.await.unwrap();
        let mut streams = Vec::new();
        for i in 0..CLIENTS {
            let mut client = std::net::TcpStream::connect(addr).unwrap();
            std::io::Write::write_all(&mut client, &[i as u8]).unwrap();
            let (stream, peer) = listener.accept().unwrap();
            let conn = Conn {
                stream,
                listener: 0,
                peer,
                local: addr,
                since: Instant::now(),
            };
            assert!(ch.offer(conn).is_ok(), "the window takes {CLIENTS}");
            streams.push(client);
        }
        clients_tx.send(()).unwrap();
        let (mut clients, worker) = tokio::task::spawn_blocking(move || worker_thread.join().unwrap()).await.unwrap();
        // The refused connection comes back; then nothing is in flight.
        let back = tokio::task::spawn_blocking(move || back_rx.recv_timeout(std::time::Duration::from_secs(10)))
            .await
            .unwrap()
            .expect("the refused connection handed back");
        assert_eq!(back.len(), 1);
        assert_eq!(ch.unread_head(), None, "every connection answered");
        // Every client reached the worker exactly once.
        clients.sort_unstable();
        assert_eq!(clients, (0..CLIENTS as u8).collect::<Vec<_>>());
        drop(worker);
    }

    #[tokio::test]
    async fn answers_to_no_handle_are_offences_up_to_the_garbage_limit() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let ports = Arc::new(Ports::new(&[addr], Arc::new(|_| {}), 16));
        let (ch, worker_end) = NodeChannel::new(ports, 0).unwrap();
        let (inputs, mut inputs_rx) = mpsc::channel(1024);
        let task = Task {
            id: WorkerId(3),
            pid: u32::MAX,
            stop_signal: Signal::SIGTERM,
            inputs,
        };
        tokio::spawn(run(Arc::new(ch), task));
        // A flood of acknowledgements and NACKs of nothing, as fast as it can write.
        let flood = "{\"cmd\":\"NODE_HANDLE_ACK\"}\n{\"cmd\":\"NODE_HANDLE_NACK\"}\n".repeat(100);
        let n = nix::unistd::write(&worker_end, flood.as_bytes()).unwrap();
        assert_eq!(n, flood.len());
        let mut garbage = 0;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while garbage < GARBAGE_LIMIT {
            match tokio::time::timeout_at(deadline, inputs_rx.recv()).await {
                Ok(Some(Input::Garbage { id })) => {
                    assert_eq!(id, WorkerId(3));
                    garbage += 1;
                }
                Ok(other) => panic!("unexpected input {other:?}"),
                Err(_) => panic!("only {garbage} offences reported for 200 answers to nothing"),
            }
        }
        // And no more than the limit: the core has killed the worker by then.
        assert!(inputs_rx.try_recv().is_err());
    }

    /// Waits (polling, 10 s at most) for `done`.
    async fn until(mut done: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "timed out");
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_answer_cut_in_two_by_the_workers_exit_is_still_heard() {
        let (ch, worker, running, _inputs, seq, _client) = one_connection_written(16).await;
        let answer = format!("{{\"cmd\":\"NODE_CLUSTER\",\"ack\":{seq},\"accepted\":true,\"seq\":2}}\n");
        let (head, tail) = answer.split_at(20);
        worker.send(head);
        until(|| !ch.state().partial.is_empty()).await;
        // The worker exits: its task is aborted with half the answer read.
        running.abort();
        assert!(running.await.unwrap_err().is_cancelled());
        worker.send(tail);
        let back = ch.reclaim_after_exit();
        assert!(back.is_empty(), "the accepted connection was handed back: {} of them", back.len());
    }

    #[tokio::test]
    async fn an_answer_read_while_the_core_is_busy_is_acted_on_before_the_task_waits() {
        // Room for one input: the second offence blocks the task's send.
        let (ch, worker, running, inputs, seq, _client) = one_connection_written(1).await;
        worker.send(&format!(
            "x\ny\n{{\"cmd\":\"NODE_CLUSTER\",\"ack\":{seq},\"accepted\":true,\"seq\":2}}\n"
        ));
        until(|| inputs.capacity() == 0).await;
        running.abort();
        assert!(running.await.unwrap_err().is_cancelled());
        let back = ch.reclaim_after_exit();
        assert!(back.is_empty(), "the accepted connection was handed back: {} of them", back.len());
    }

    /// A worker with one server that has received one connection (handle
    /// acknowledged, not yet accepted), its channel's task, and the inputs' sender.
    async fn one_connection_written(
        inputs_room: usize,
    ) -> (Arc<NodeChannel>, FakeWorker, tokio::task::JoinHandle<()>, mpsc::Sender<Input>, u64, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let ports = Arc::new(Ports::new(&[addr], Arc::new(|_| {}), 16));
        let (ch, worker_end) = NodeChannel::new(ports, 0).unwrap();
        let ch = Arc::new(ch);
        let (inputs, inputs_rx) = mpsc::channel(inputs_room);
        // Never read: a send blocks the task once `inputs_room` inputs wait.
        std::mem::forget(inputs_rx);
        let task = Task {
            id: WorkerId(4),
            pid: u32::MAX,
            stop_signal: Signal::SIGTERM,
            inputs: inputs.clone(),
        };
        let running = tokio::spawn(run(ch.clone(), task));
        let mut worker = FakeWorker {
            fd: worker_end,
            inbuf: Vec::new(),
            fds: VecDeque::new(),
        };
        let (mut worker, conn, client) = tokio::task::spawn_blocking(move || {
            worker.send(&format!(
                "{{\"cmd\":\"NODE_CLUSTER\",\"act\":\"queryServer\",\"index\":0,\"data\":null,\"address\":null,\"port\":{},\"addressType\":4,\"backlog\":0,\"seq\":1}}\n",
                addr.port()
            ));
            worker.line().expect("the queryServer answer");
            let client = std::net::TcpStream::connect(addr).unwrap();
            let (stream, peer) = listener.accept().unwrap();
            let conn = Conn { stream, listener: 0, peer, local: addr, since: Instant::now() };
            (worker, conn, client)
        })
        .await
        .unwrap();
        assert!(ch.offer(conn).is_ok());
        let (worker, seq) = tokio::task::spawn_blocking(move || {
            let (v, fd) = worker.line().expect("the newconn");
            assert!(fd.is_some());
            worker.send("{\"cmd\":\"NODE_HANDLE_ACK\"}\n");
            (worker, v["msg"]["seq"].as_u64().unwrap())
        })
        .await
        .unwrap();
        (ch, worker, running, inputs, seq, client)
    }
}
