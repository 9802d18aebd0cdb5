//! Several hosts behind an L4 balancer, for real (issue 15): HAProxy in TCP mode with
//! `balance source` + `hash-type consistent` in front of two hosts, each running the
//! `recluster` binary with `--balance sticky` and two workers, and 100 client
//! addresses. Every host is a network namespace of its own on one bridge:
//!
//! ```text
//!   client ns  10.77.0.1 + 10.77.1.1..=100 ─┐
//!   lb ns      10.77.0.2   haproxy -db       ├─ br0 (in a namespace of its own)
//!   h1 ns      10.77.0.11  recluster :8080  ─┤
//!   h2 ns      10.77.0.12  recluster :8080  ─┘
//! ```
//!
//! Names carry this process's pid and a counter, so parallel runs do not collide, and
//! nothing is made in the machine's own namespace: the bridge and the veths' far ends
//! live in the switch namespace, so deleting the namespaces (a guard does, also when
//! a test fails) removes every interface. The clients run in the client namespace as
//! a helper process (`tests/multihost_client.py` under `ip netns exec`) that goes
//! through every address once per round, 8 connections at a time; each request is one
//! connection from one client address, never retried. The workers
//! (`tests/workers/channel_worker.py` with `HOST_LABEL`, and `DRAIN` so that a retiring
//! worker answers every connection it was handed) answer with their host, their
//! WORKER_ID and the peer address the master handed them. HAProxy runs in the
//! foreground (`haproxy -db`); its restart is a new process that takes the listening
//! socket over from the old one (`-x` stats socket, `-sf` old pid), as a seamless
//! HAProxy reload does.
//!
//! * With the PROXY protocol (HAProxy `send-proxy-v2`, masters `--proxy-protocol v2
//!   --trusted-proxy 10.77.0.2/32`), `sticky` hashes the client's own address: every
//!   address stays on one host and one worker through a reload of each master, one
//!   after the other, and a restart of HAProxy, with no failed request, and the
//!   workers see the clients' addresses.
//! * Without it, every connection a host gets comes from HAProxy's address, so
//!   `sticky` puts all of a host's clients on one worker: the collapse the PROXY
//!   protocol is for.
//!
//! Needs root, `ip` (iproute2), `haproxy` and python3; under `CI=true` a missing one
//! fails the test instead of skipping it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use common::*;

/// Client addresses: 10.77.1.1 ..= 10.77.1.100.
const CLIENTS: usize = 100;
/// The port HAProxy and both masters listen on, each in its own namespace.
const PORT: u16 = 8080;
const CLIENT_MAIN: &str = "10.77.0.1";
const LB: &str = "10.77.0.2";
/// Short namespace name, host label (HOST_LABEL, HAProxy's server name) and address.
const HOSTS: [(&str, &str); 2] = [("h1", "10.77.0.11"), ("h2", "10.77.0.12")];

fn client_ip(i: usize) -> String {
    format!("10.77.1.{}", i + 1)
}

// ---------------------------------------------------------------------------------
// The network
// ---------------------------------------------------------------------------------

/// Runs `ip ARGS`; the error says what failed.
fn ip<I: IntoIterator<Item = S>, S: AsRef<std::ffi::OsStr>>(args: I) -> Result<(), String> {
    let args: Vec<std::ffi::OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let out = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespaces, the bridge and a scratch directory of one test. Dropping it
/// deletes them all (start it first, so that it is dropped after every process
/// that runs inside it).
struct Net {
    prefix: String,
    namespaces: Vec<String>,
    dir: PathBuf,
}

impl Net {
    /// `None` (the test says it is skipped; under `CI=true` it fails) where network
    /// namespaces cannot be made.
    fn create() -> Option<Net> {
        static N: AtomicU64 = AtomicU64::new(0);
        let prefix = format!(
            "rcl{}x{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(format!("recluster-multihost-{prefix}"));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let mut net = Net {
            prefix,
            namespaces: Vec::new(),
            dir,
        };
        let sw = net.ns("sw");
        if let Err(e) = ip(["netns", "add", &sw]) {
            skip(&format!("cannot create a network namespace: {e}"));
            return None;
        }
        net.namespaces.push(sw.clone());
        net.setup(&sw)
            .unwrap_or_else(|e| panic!("network setup: {e}"));
        Some(net)
    }

    fn setup(&mut self, sw: &str) -> Result<(), String> {
        ip(["-n", sw, "link", "add", "br0", "type", "bridge"])?;
        ip(["-n", sw, "link", "set", "br0", "up"])?;
        let mut nodes = vec![("c", CLIENT_MAIN), ("lb", LB)];
        nodes.extend(HOSTS);
        for (short, addr) in nodes {
            let ns = self.ns(short);
            ip(["netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            let port = format!("v-{short}");
            ip([
                "-n", sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(["-n", sw, "link", "set", &port, "master", "br0", "up"])?;
            ip([
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/16"),
                "dev",
                "eth0",
            ])?;
            ip(["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(["-n", &ns, "link", "set", "lo", "up"])?;
        }
        // The 100 client addresses, in one `ip -batch`.
        let batch = self.dir.join("client-addrs");
        let lines: String = (0..CLIENTS)
            .map(|i| format!("addr add {}/16 dev eth0\n", client_ip(i)))
            .collect();
        std::fs::write(&batch, lines).map_err(|e| e.to_string())?;
        ip([
            "-n".as_ref(),
            self.ns("c").as_ref(),
            "-batch".as_ref(),
            batch.as_os_str(),
        ])
    }

    /// The full name of namespace `short` (`c`, `lb`, `h1`, `h2`, `sw`).
    fn ns(&self, short: &str) -> String {
        format!("{}-{short}", self.prefix)
    }

    /// `ip netns exec <ns>`: a wrapper that execs its program in the namespace (the
    /// program keeps the pid).
    fn exec_in(&self, short: &str) -> [String; 4] {
        ["ip", "netns", "exec", &self.ns(short)].map(String::from)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = ip(["netns", "del", ns]) {
                eprintln!("cleanup: {e}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

// ---------------------------------------------------------------------------------
// HAProxy
// ---------------------------------------------------------------------------------

/// A `haproxy -db` (foreground, no daemon) in the balancer namespace. Dropping it
/// kills it.
struct Haproxy {
    child: Child,
}

impl Haproxy {
    /// HAProxy with `send-proxy-v2` to the hosts when `proxy`. `replacing`: the new
    /// process takes the listening socket over from the old one (`-x`, through the
    /// stats socket) and then tells it to finish (`-sf`): a restart of HAProxy with no
    /// moment without a listener.
    fn start(net: &Net, proxy: bool, replacing: Option<&Haproxy>) -> Haproxy {
        let cfg = net.dir.join("haproxy.cfg");
        let sock = net.dir.join("haproxy.sock");
        std::fs::write(&cfg, haproxy_cfg(&sock, proxy)).expect("write haproxy.cfg");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &net.ns("lb"), "haproxy", "-db", "-f"])
            .arg(&cfg);
        if let Some(old) = replacing {
            cmd.arg("-x")
                .arg(&sock)
                .arg("-sf")
                .arg(old.child.id().to_string());
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start haproxy");
        let pid = child.id();
        for out in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    eprintln!("[haproxy {pid}] {line}");
                }
            });
        }
        Haproxy { child }
    }

    /// Waits for this HAProxy to exit (after a successor's `-sf`).
    fn wait_exit(&mut self, timeout: Duration) {
        let pid = self.child.id();
        assert!(
            poll_until(timeout, || matches!(self.child.try_wait(), Ok(Some(_)))),
            "the old haproxy ({pid}) still runs {timeout:?} after its successor started"
        );
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

fn haproxy_cfg(stats_socket: &Path, proxy: bool) -> String {
    let send_proxy = if proxy { " send-proxy-v2" } else { "" };
    let servers: String = HOSTS
        .iter()
        .map(|(name, addr)| format!("    server {name} {addr}:{PORT}{send_proxy}\n"))
        .collect();
    format!(
        "global
    maxconn 4096
    stats socket {sock} mode 600 level admin expose-fd listeners

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend clients
    bind {LB}:{PORT}
    default_backend hosts

backend hosts
    balance source
    hash-type consistent
{servers}",
        sock = stats_socket.display()
    )
}

// ---------------------------------------------------------------------------------
// The hosts
// ---------------------------------------------------------------------------------

/// The master of host `short`: `recluster --balance sticky -w 2 --listen
/// 0.0.0.0:8080`, with `--proxy-protocol v2` (headers believed from HAProxy only) when
/// `proxy`, its workers labelled `short`; returned once both workers are ready.
fn start_host(net: &Net, short: &str, proxy: bool, worker: &[String]) -> Master {
    let mut cluster = Cluster::new()
        .wrapped_in(net.exec_in(short))
        .workers(2)
        .args([
            "--balance",
            "sticky",
            "--listen",
            &format!("0.0.0.0:{PORT}"),
        ])
        // Both masters listen on 0.0.0.0:8080, the default name of their control
        // sockets, which live in one directory: the namespace's name tells them apart.
        .args(["--name", &net.ns(short)])
        .env("HOST_LABEL", short)
        // A retiring worker serves every connection it has received before it exits
        // (its stop signal does not cut them off).
        .env("DRAIN", "1")
        .command(worker);
    if proxy {
        cluster = cluster.args([
            "--proxy-protocol",
            "v2",
            "--trusted-proxy",
            &format!("{LB}/32"),
        ]);
    }
    let master = cluster.spawn();
    master.wait_cluster_ready(2);
    master
}

// ---------------------------------------------------------------------------------
// The clients
// ---------------------------------------------------------------------------------

/// What the clients saw.
#[derive(Clone, Debug, Default)]
struct Seen {
    rounds: u64,
    ok: u64,
    /// `(client address, error)` of every failed request; the error says in which
    /// round it happened.
    failed: Vec<(String, String)>,
    /// What the test did, and the round then in progress (to place failures).
    phases: Vec<(u64, String)>,
    /// The (host, WORKER_ID) pairs that answered each client address.
    served: BTreeMap<String, BTreeSet<(String, usize)>>,
    /// The peer addresses the workers reported for each client address.
    peers: BTreeMap<String, BTreeSet<String>>,
    /// (host, generation) pairs that answered.
    generations: BTreeSet<(String, u32)>,
    /// Answer to `ready`: `Ok` or the last error.
    ready: Option<Result<(), String>>,
    stopped: bool,
    eof: bool,
}

impl Seen {
    fn record(&mut self, line: &str) {
        let mut words = line.splitn(3, ' ');
        let (kind, src, rest) = (
            words.next().unwrap_or(""),
            words.next().unwrap_or(""),
            words.next().unwrap_or(""),
        );
        match kind {
            "ok" => match Reply::parse(rest) {
                Some(reply) if reply.fields.contains_key("host") => {
                    let host = reply.fields["host"].clone();
                    self.ok += 1;
                    self.served
                        .entry(src.to_string())
                        .or_default()
                        .insert((host.clone(), reply.id));
                    self.peers
                        .entry(src.to_string())
                        .or_default()
                        .insert(reply.fields.get("peer").cloned().unwrap_or_default());
                    self.generations.insert((host, reply.gen));
                }
                _ => self
                    .failed
                    .push((src.to_string(), format!("unexpected answer {rest:?}"))),
            },
            "fail" => self.failed.push((
                src.to_string(),
                format!("{rest} (in round {})", self.rounds + 1),
            )),
            "round" => self.rounds = src.parse().unwrap_or(self.rounds),
            "ready" => self.ready = Some(Ok(())),
            "timeout" => self.ready = Some(Err(line.to_string())),
            "stopped" => self.stopped = true,
            _ => self
                .failed
                .push(("-".into(), format!("unexpected line {line:?}"))),
        }
    }

    /// Client addresses answered by exactly one host and one worker.
    fn kept(&self) -> usize {
        self.served.values().filter(|s| s.len() == 1).count()
    }

    /// Client addresses answered by exactly one host (whatever its workers).
    fn kept_host(&self) -> usize {
        self.served
            .values()
            .filter(|s| {
                s.iter()
                    .map(|(host, _)| host)
                    .collect::<BTreeSet<_>>()
                    .len()
                    == 1
            })
            .count()
    }

    /// How many client addresses each (host, worker) served.
    fn spread(&self) -> BTreeMap<(String, usize), usize> {
        let mut spread = BTreeMap::new();
        for pairs in self.served.values() {
            for pair in pairs {
                *spread.entry(pair.clone()).or_default() += 1;
            }
        }
        spread
    }

    fn summary(&self) -> String {
        format!(
            "rounds {}, ok {}, failed {} (first: {:?}), addresses that kept host and \
             worker {}/{}, clients per (host, worker) {:?}, (host, generation) {:?}, \
             (round, what the test did) {:?}",
            self.rounds,
            self.ok,
            self.failed.len(),
            self.failed.iter().take(5).collect::<Vec<_>>(),
            self.kept(),
            self.served.len(),
            self.spread(),
            self.generations,
            self.phases
        )
    }
}

/// The client helper, in the client namespace. Dropping it kills it.
struct Clients {
    child: Child,
    stdin: Option<ChildStdin>,
    seen: Arc<(Mutex<Seen>, Condvar)>,
}

impl Clients {
    fn start(net: &Net, python: &str) -> Clients {
        let script = manifest_dir().join("tests/multihost_client.py");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &net.ns("c"), python])
            .arg(script)
            .arg(LB)
            .arg(PORT.to_string())
            .args((0..CLIENTS).map(client_ip))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the client helper");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let seen = Arc::new((Mutex::new(Seen::default()), Condvar::new()));
        {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let (state, changed) = &*seen;
                    state
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .record(&line);
                    changed.notify_all();
                }
                let (state, changed) = &*seen;
                state.lock().unwrap_or_else(PoisonError::into_inner).eof = true;
                changed.notify_all();
            });
        }
        Clients { child, stdin, seen }
    }

    fn send(&mut self, command: &str) {
        let stdin = self.stdin.as_mut().expect("client helper's stdin");
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("client helper: cannot send {command:?}: {e}"));
    }

    fn state(&self) -> MutexGuard<'_, Seen> {
        self.seen.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Notes that the test does `what` now (in the round in progress).
    fn note(&self, what: &str) {
        let mut state = self.state();
        let round = state.rounds + 1;
        state.phases.push((round, what.to_string()));
    }

    /// Waits until `done(seen)`, at most `timeout`; panics with what was seen then.
    fn wait(&self, what: &str, timeout: Duration, done: impl Fn(&Seen) -> bool) -> Seen {
        let deadline = Instant::now() + timeout;
        let (_, changed) = &*self.seen;
        let mut state = self.state();
        loop {
            if done(&state) {
                return state.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline && !state.eof,
                "clients: not {what} within {timeout:?}{}: {}",
                if state.eof { " (helper exited)" } else { "" },
                state.summary()
            );
            state = changed
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Until a request through HAProxy succeeds (before the measured part).
    fn wait_ready(&mut self) {
        self.send(&format!("ready {}", DEADLINE.as_secs()));
        let seen = self.wait("ready", DEADLINE + Duration::from_secs(5), |s| {
            s.ready.is_some()
        });
        if let Some(Err(e)) = seen.ready {
            panic!("no request through haproxy succeeded: {e}");
        }
    }

    /// Waits for `n` more complete rounds (every address once per round).
    fn wait_rounds(&self, n: u64) {
        let target = self.state().rounds + n;
        self.wait(&format!("at round {target}"), DEADLINE, |s| {
            s.rounds >= target
        });
    }

    fn stop(&mut self) -> Seen {
        self.send("stop");
        self.wait("stopped", DEADLINE, |s| s.stopped)
    }
}

impl Drop for Clients {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

/// Root, `ip`, `haproxy`, and the Python worker; `None` (said, or failed under
/// `CI=true`) if one is missing.
fn prerequisites() -> Option<Vec<String>> {
    if !nix::unistd::Uid::effective().is_root() {
        skip("not root: network namespaces need root");
        return None;
    }
    require("ip")?;
    require("haproxy")?;
    channel_worker()
}

#[test]
fn with_proxy_v2_every_client_keeps_its_host_and_worker_through_reloads_and_a_haproxy_restart() {
    let Some(worker) = prerequisites() else {
        return;
    };
    let started = Instant::now();
    let Some(net) = Net::create() else {
        return;
    };
    let hosts: Vec<Master> = HOSTS
        .iter()
        .map(|(short, _)| start_host(&net, short, true, &worker))
        .collect();
    let mut lb = Haproxy::start(&net, true, None);
    let mut clients = Clients::start(&net, &worker[0]);
    clients.wait_ready();
    let measured = Instant::now();
    clients.send("start");
    clients.wait_rounds(2);
    // (a) Each host's master reloads, one after the other, under the load.
    for (host, (name, _)) in hosts.iter().zip(HOSTS) {
        clients.note(&format!("reload {name}"));
        host.reload_to(2);
        clients.note(&format!("{name} reloaded"));
        clients.wait_rounds(2);
    }
    // (b) HAProxy restarts: a new process with the same configuration takes the
    // listening socket over, and the old one finishes its connections and exits.
    clients.note("restart haproxy");
    let successor = Haproxy::start(&net, true, Some(&lb));
    let mut old = std::mem::replace(&mut lb, successor);
    old.wait_exit(DEADLINE);
    drop(old);
    clients.note("old haproxy exited");
    clients.wait_rounds(2);
    let seen = clients.stop();
    let measured = measured.elapsed();

    println!(
        "PROXY v2: {} of {CLIENTS} client addresses kept their host and worker ({} their \
         host); {} failed requests of {}; {} rounds in {measured:.1?} (whole test {:.1?})",
        seen.kept(),
        seen.kept_host(),
        seen.failed.len(),
        seen.ok + seen.failed.len() as u64,
        seen.rounds,
        started.elapsed()
    );
    println!(
        "clients per (host, worker): {:?}; (round, what the test did): {:?}",
        seen.spread(),
        seen.phases
    );
    assert!(
        seen.failed.is_empty(),
        "failed requests: {}",
        seen.summary()
    );
    assert_eq!(
        seen.served.len(),
        CLIENTS,
        "not every client address was served: {}",
        seen.summary()
    );
    let moved: Vec<_> = seen.served.iter().filter(|(_, s)| s.len() != 1).collect();
    assert!(
        moved.is_empty(),
        "client addresses served by more than one (host, worker): {moved:?}\n{}",
        seen.summary()
    );
    // Spread: both hosts, and both workers of each, have clients (without PROXY each
    // host's clients would all be on one worker).
    let spread = seen.spread();
    for (name, _) in HOSTS {
        for id in 0..2 {
            assert!(
                spread.contains_key(&(name.to_string(), id)),
                "worker {id} of {name} served no client: clients per (host, worker) \
                 {spread:?}"
            );
        }
        // And both generations answered: the reload happened under the load.
        for generation in [1, 2] {
            assert!(
                seen.generations.contains(&(name.to_string(), generation)),
                "{name} generation {generation} answered nothing: {}",
                seen.summary()
            );
        }
    }
    // The workers saw the clients themselves: sticky hashed their addresses.
    let wrong_peer: Vec<_> = seen
        .peers
        .iter()
        .filter(|(src, peers)| peers.len() != 1 || !peers.contains(*src))
        .collect();
    assert!(
        wrong_peer.is_empty(),
        "workers saw another peer than the client: {wrong_peer:?}"
    );
}

#[test]
fn without_proxy_protocol_sticky_puts_all_the_clients_of_a_host_on_one_worker() {
    let Some(worker) = prerequisites() else {
        return;
    };
    let started = Instant::now();
    let Some(net) = Net::create() else {
        return;
    };
    let _hosts: Vec<Master> = HOSTS
        .iter()
        .map(|(short, _)| start_host(&net, short, false, &worker))
        .collect();
    let _lb = Haproxy::start(&net, false, None);
    let mut clients = Clients::start(&net, &worker[0]);
    clients.wait_ready();
    clients.send("start");
    clients.wait_rounds(3);
    let seen = clients.stop();

    let spread = seen.spread();
    println!(
        "without PROXY: {} failed requests of {}, {} rounds in {:.1?}; clients per (host, \
         worker): {spread:?}",
        seen.failed.len(),
        seen.ok + seen.failed.len() as u64,
        seen.rounds,
        started.elapsed()
    );
    assert!(
        seen.failed.is_empty(),
        "failed requests: {}",
        seen.summary()
    );
    assert_eq!(seen.served.len(), CLIENTS, "{}", seen.summary());
    // HAProxy's `balance source` still spreads the clients over both hosts…
    let hosts: BTreeSet<&str> = spread.keys().map(|(host, _)| host.as_str()).collect();
    assert_eq!(hosts.len(), 2, "both hosts have clients: {spread:?}");
    // …but every connection a master gets comes from HAProxy, so sticky sends all of
    // a host's clients to one worker, and the workers see HAProxy, not the client.
    for host in hosts {
        let workers: BTreeSet<usize> = spread
            .keys()
            .filter(|(h, _)| h == host)
            .map(|&(_, id)| id)
            .collect();
        assert_eq!(
            workers.len(),
            1,
            "{host}: its clients should all be on one worker without PROXY: {spread:?}"
        );
    }
    let peers: BTreeSet<&String> = seen.peers.values().flatten().collect();
    assert_eq!(
        peers,
        BTreeSet::from([&LB.to_string()]),
        "the workers see only HAProxy's address"
    );
}
