//! End-to-end tests of `--via node`: the master speaks Node's own cluster IPC, so an
//! unmodified Node.js server (`http.createServer(...).listen(PORT)`, `tests/node/`)
//! runs as a worker under `rr` and `sticky`. The real binary, real `node` workers,
//! real TCP clients on 127.0.0.0/8 (source addresses 127.0.0.X for `sticky`).
//!
//! Clients speak HTTP/1.1 with `Connection: close`, a new connection per request,
//! except where a test is about keep-alive. Why: when a worker retires, Node's
//! `server.close()` closes the connections that are idle at that moment; a keep-alive
//! client that sends its next request on such a connection just as it closes sees EOF.
//! That race belongs to HTTP keep-alive with any server that closes idle connections
//! (clients retry idempotent requests on a reused connection), not to recluster, so
//! the zero-failure tests count one request per connection, where every failure is
//! one the master or the protocol caused. The keep-alive path is tested on its own:
//! a request in flight on a keep-alive connection completes through a reload.
//!
//! The socket.io test installs `socket.io` and `socket.io-client` with npm into
//! `target/node-deps/` when they are not there (`.ci/run` does it beforehand).
//! Without `node` (or npm, for socket.io) a test is skipped on a developer's machine
//! and fails under `CI=true`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

// ---------------------------------------------------------------------------------
// The Node apps and their clusters
// ---------------------------------------------------------------------------------

/// A file of `tests/node/`.
fn app(name: &str) -> String {
    manifest_dir()
        .join("tests/node")
        .join(name)
        .display()
        .to_string()
}

/// A master running `node <script>` in `workers` slots, listening on a free
/// 127.0.0.1 port that the app is told as `PORT` (the port it `listen`s on matches the
/// `--listen` port, so the master hands it that listener).
struct NodeCluster {
    master: Master,
    addr: SocketAddr,
}

fn node_cluster(
    workers: usize,
    args: &[&str],
    script: &str,
    envs: &[(&str, &str)],
) -> Option<NodeCluster> {
    let node = require("node")?;
    let port = free_port();
    let mut cluster = Cluster::new()
        .workers(workers)
        .args(args)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .command([node.display().to_string(), app(script)])
        .env("PORT", port.to_string());
    for (k, v) in envs {
        cluster = cluster.env(k, v);
    }
    Some(NodeCluster {
        master: cluster.spawn(),
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    })
}

/// The lines the Node apps wrote (`node_app <what> … pid=<pid> …`) about `pid`.
fn app_lines(master: &Master, what: &str, pid: u32) -> Vec<LogLine> {
    let tag = format!("node_app {what} ");
    let pid = format!("pid={pid}");
    master
        .lines()
        .into_iter()
        .filter(|l| l.raw.contains(&tag) && l.raw.split_whitespace().any(|t| t == pid))
        .collect()
}

/// The value of `key=` in a line that is not a log event (a worker's output).
fn raw_field<'a>(line: &'a LogLine, key: &str) -> Option<&'a str> {
    line.raw
        .split_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
}

// ---------------------------------------------------------------------------------
// An HTTP/1.1 client
// ---------------------------------------------------------------------------------

/// The body of `tests/node/http_server.js`: `worker=<id> pid=<pid> gen=<generation>`.
#[derive(Clone, Debug)]
struct Answer {
    worker: usize,
    pid: u32,
    gen: u32,
}

fn answer_of(status: u16, body: &str) -> Result<Answer, Failure> {
    if status != 200 {
        return Err(Failure(format!("status {status}")));
    }
    let field = |k: &str| {
        body.split_whitespace()
            .find_map(|t| t.strip_prefix(k)?.strip_prefix('='))
            .and_then(|v| v.parse::<u64>().ok())
    };
    match (field("worker"), field("pid"), field("gen")) {
        (Some(w), Some(p), Some(g)) => Ok(Answer {
            worker: w as usize,
            pid: p as u32,
            gen: g as u32,
        }),
        _ => Err(Failure(format!("malformed body {body:?}"))),
    }
}

/// Connects to `addr` from `src` (the kernel's choice when `None`).
fn connect(addr: SocketAddr, src: Option<Ipv4Addr>) -> Result<TcpStream, Failure> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)
        .map_err(|e| Failure(format!("socket: {:?}", e.kind())))?;
    if let Some(ip) = src {
        sock.bind(&SocketAddr::from((ip, 0)).into())
            .map_err(|e| Failure(format!("bind: {:?}", e.kind())))?;
    }
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))
        .map_err(|e| Failure(format!("connect: {:?}", e.kind())))?;
    Ok(sock.into())
}

/// Reads one response (its head and `Content-Length` bytes of body) from `stream`.
fn read_response(stream: &mut TcpStream) -> Result<(u16, String), Failure> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(Failure("eof without reply".into())),
            Ok(0) => return Err(Failure("eof in head".into())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => {
                return Err(Failure(format!(
                    "read: {:?}{}",
                    e.kind(),
                    if buf.is_empty() { "" } else { " (partial)" }
                )))
            }
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Failure(format!("malformed head {head:?}")))?;
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .ok_or_else(|| Failure(format!("no Content-Length in {head:?}")))?;
    while buf.len() < head_end + length {
        match stream.read(&mut chunk) {
            Ok(0) => return Err(Failure("eof in body".into())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(Failure(format!("read: {:?} (partial)", e.kind()))),
        }
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + length]).to_string();
    Ok((status, body))
}

/// One `GET path` on a new connection with `Connection: close`. `connected` counts
/// the connections that were established (the master accepts each of them).
fn get(
    addr: SocketAddr,
    src: Option<Ipv4Addr>,
    path: &str,
    timeout: Duration,
    connected: &AtomicU64,
) -> Result<Answer, Failure> {
    let mut stream = connect(addr, src)?;
    connected.fetch_add(1, Ordering::Relaxed);
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    let result = stream
        .write_all(request.as_bytes())
        .map_err(|e| Failure(format!("write: {:?}", e.kind())))
        .and_then(|()| read_response(&mut stream))
        .and_then(|(status, body)| answer_of(status, &body));
    // A reset instead of TIME_WAIT: thousands of connections must not use up ports.
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    result
}

// ---------------------------------------------------------------------------------
// An HTTP load
// ---------------------------------------------------------------------------------

/// What an [`HttpLoad`]'s clients saw.
#[derive(Debug, Default)]
struct HttpTotals {
    ok: u64,
    failures: BTreeMap<String, u64>,
    first_failures: Vec<(Duration, String)>,
    by_gen: BTreeMap<u32, u64>,
    by_worker: BTreeMap<usize, u64>,
    /// Connections established (each one the master accepted).
    connected: u64,
    /// The WORKER_IDs that answered each source address.
    workers_by_source: BTreeMap<Ipv4Addr, BTreeSet<usize>>,
    elapsed: Duration,
}

impl HttpTotals {
    fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    fn merge(&mut self, other: HttpTotals) {
        self.ok += other.ok;
        for (k, v) in other.failures {
            *self.failures.entry(k).or_default() += v;
        }
        self.first_failures.extend(other.first_failures);
        self.first_failures.sort();
        self.first_failures.truncate(10);
        for (k, v) in other.by_gen {
            *self.by_gen.entry(k).or_default() += v;
        }
        for (k, v) in other.by_worker {
            *self.by_worker.entry(k).or_default() += v;
        }
        for (k, v) in other.workers_by_source {
            self.workers_by_source.entry(k).or_default().extend(v);
        }
    }

    fn print(&self, test: &str) {
        println!(
            "{test}: {} ok, {} failed {:?} in {:.1?} ({:.0} req/s); by generation {:?}; by worker {:?}",
            self.ok,
            self.failed(),
            self.failures,
            self.elapsed,
            self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.by_gen,
            self.by_worker
        );
        if !self.first_failures.is_empty() {
            println!("{test}: first failures: {:?}", self.first_failures);
        }
    }
}

/// `clients` threads, each making `GET /` requests (one per connection) in a loop
/// until stopped, from source addresses 127.0.0.1..=`sources` in turn (the kernel's
/// choice when 0). Bounded by itself: a client stops after [`Load::MAX_DURATION`].
struct HttpLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    connected: Arc<AtomicU64>,
    started: Instant,
    threads: Vec<JoinHandle<HttpTotals>>,
}

impl HttpLoad {
    fn start(addr: SocketAddr, clients: usize, sources: usize) -> HttpLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let connected = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let threads = (0..clients)
            .map(|t| {
                let (stop, ok, failed, connected) =
                    (stop.clone(), ok.clone(), failed.clone(), connected.clone());
                std::thread::spawn(move || {
                    let mut totals = HttpTotals::default();
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) && started.elapsed() < Load::MAX_DURATION {
                        let src = (sources > 0).then(|| source_ip(i % sources));
                        i += clients;
                        match get(addr, src, "/", Duration::from_secs(10), &connected) {
                            Ok(a) => {
                                totals.ok += 1;
                                ok.fetch_add(1, Ordering::Relaxed);
                                *totals.by_gen.entry(a.gen).or_default() += 1;
                                *totals.by_worker.entry(a.worker).or_default() += 1;
                                if let Some(src) = src {
                                    totals
                                        .workers_by_source
                                        .entry(src)
                                        .or_default()
                                        .insert(a.worker);
                                }
                            }
                            Err(Failure(kind)) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                                if totals.first_failures.len() < 10 {
                                    totals
                                        .first_failures
                                        .push((started.elapsed(), kind.clone()));
                                }
                                *totals.failures.entry(kind).or_default() += 1;
                            }
                        }
                    }
                    totals
                })
            })
            .collect();
        HttpLoad {
            stop,
            ok,
            failed,
            connected,
            started,
            threads,
        }
    }

    fn ok_so_far(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` more requests than now have succeeded; panics after `timeout`.
    fn wait_more_ok(&self, n: u64, timeout: Duration) {
        let target = self.ok_so_far() + n;
        assert!(
            poll_until(timeout, || self.ok_so_far() >= target),
            "load: fewer than {n} more successful requests in {timeout:?} (ok {}, failed {})",
            self.ok_so_far(),
            self.failed.load(Ordering::Relaxed)
        );
    }

    fn stop(mut self) -> HttpTotals {
        self.stop.store(true, Ordering::Relaxed);
        let mut totals = HttpTotals::default();
        for t in std::mem::take(&mut self.threads) {
            totals.merge(t.join().expect("load thread panicked"));
        }
        totals.elapsed = self.started.elapsed();
        totals.connected = self.connected.load(Ordering::Relaxed);
        totals
    }
}

impl Drop for HttpLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Stops the master gracefully and returns its `balancer_totals`.
fn terminate(master: &Master) -> BalancerTotals {
    master.signal(Signal::SIGTERM);
    let exit = master.expect_exit(DEADLINE);
    let totals = master.balancer_totals(Duration::from_secs(5));
    println!("master exit {exit:?}, {totals:?}");
    totals
}

// ---------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------

#[test]
fn an_unmodified_http_server_answers_its_worker_id_and_rr_spreads_over_4_workers() {
    let Some(c) = node_cluster(
        4,
        &["--via", "node", "--balance", "rr"],
        "http_server.js",
        &[],
    ) else {
        return;
    };
    let ready = c.master.wait_cluster_ready(4);
    let connected = AtomicU64::new(0);
    const REQUESTS: u64 = 400;
    let mut by_worker: BTreeMap<usize, u64> = BTreeMap::new();
    for i in 0..REQUESTS {
        let a = get(c.addr, None, "/", Duration::from_secs(10), &connected)
            .unwrap_or_else(|f| panic!("request {i} failed: {f:?}"));
        assert_eq!(
            ready.get(&a.worker),
            Some(&a.pid),
            "answer {a:?} is not from the ready worker of its slot ({ready:?})"
        );
        assert_eq!(a.gen, 1, "{a:?}");
        *by_worker.entry(a.worker).or_default() += 1;
    }
    let fair = REQUESTS / 4;
    let (min, max) = (
        by_worker.values().min().copied().unwrap_or(0),
        by_worker.values().max().copied().unwrap_or(0),
    );
    println!("rr, 4 node workers, {REQUESTS} sequential requests: by WORKER_ID {by_worker:?}");
    assert_eq!(
        by_worker.keys().copied().collect::<Vec<_>>(),
        vec![0, 1, 2, 3],
        "every WORKER_ID answers"
    );
    assert!(
        min * 10 >= fair * 6 && max * 10 <= fair * 14,
        "rr is not roughly even (each within 40% of {fair}): {by_worker:?}"
    );
}

/// 200 source addresses under load through `reloads` reloads of a sticky cluster run
/// with `args`: no request fails and every source stays on one WORKER_ID (and, when
/// `predicted`, on the slot `recluster::balance::slot_for` names).
fn sticky_sources_through_reloads(what: &str, args: &[&str], reloads: u32, predicted: bool) {
    let Some(c) = node_cluster(4, args, "http_server.js", &[]) else {
        return;
    };
    c.master.wait_cluster_ready(4);
    const SOURCES: usize = 200;
    let load = HttpLoad::start(c.addr, 20, SOURCES);
    load.wait_more_ok(SOURCES as u64, DEADLINE);
    let started = Instant::now();
    for generation in 2..=reloads + 1 {
        c.master.reload_to(generation);
        load.wait_more_ok(50, DEADLINE);
    }
    let reloads_took = started.elapsed();
    // Every source again, on the last generation.
    load.wait_more_ok(2 * SOURCES as u64, DEADLINE);
    let totals = load.stop();
    totals.print(what);
    let moved: BTreeMap<_, _> = totals
        .workers_by_source
        .iter()
        .filter(|(ip, w)| {
            w.len() != 1
                || (predicted
                    && w.iter().next().copied()
                        != recluster::balance::slot_for(IpAddr::V4(**ip), 0..4))
        })
        .collect();
    let used: BTreeSet<usize> = totals
        .workers_by_source
        .values()
        .flatten()
        .copied()
        .collect();
    println!(
        "{what}: {reloads} reloads in {reloads_took:.1?}; {} sources seen, {} on more than one WORKER_ID{}; WORKER_IDs used {used:?}",
        totals.workers_by_source.len(),
        moved.len(),
        if predicted { " or off their predicted slot" } else { "" }
    );
    assert_eq!(
        totals.failed(),
        0,
        "failed requests: {:?}",
        totals.first_failures
    );
    assert_eq!(
        totals.workers_by_source.len(),
        SOURCES,
        "every source was served"
    );
    assert!(
        moved.is_empty(),
        "sources answered by several WORKER_IDs or off their slot: {moved:?}"
    );
    assert_eq!(
        used.len(),
        4,
        "the sources spread over all 4 slots: {used:?}"
    );
    assert!(
        totals.by_gen.contains_key(&(reloads + 1)),
        "the last generation served: {:?}",
        totals.by_gen
    );
}

#[test]
fn sticky_keeps_each_of_200_sources_on_one_worker_id_through_10_reloads() {
    sticky_sources_through_reloads(
        "sticky, 200 sources, 10 reloads",
        &["--via", "node", "--balance", "sticky", "--timeout", "10"],
        10,
        false,
    );
}

#[test]
fn twenty_reloads_under_64_clients_fail_no_request() {
    let Some(c) = node_cluster(
        2,
        &["--via", "node", "--balance", "rr", "--timeout", "10"],
        "http_server.js",
        &[],
    ) else {
        return;
    };
    c.master.wait_cluster_ready(2);
    let load = HttpLoad::start(c.addr, 64, 0);
    load.wait_more_ok(200, DEADLINE);
    let started = Instant::now();
    for generation in 2..=21 {
        c.master.reload_to(generation);
        load.wait_more_ok(20, DEADLINE);
    }
    let reloads_took = started.elapsed();
    load.wait_more_ok(200, DEADLINE);
    let totals = load.stop();
    totals.print("rr, 64 clients, 20 reloads");
    println!("20 reloads in {reloads_took:.1?}");
    assert!(totals.ok > 0);
    assert_eq!(
        totals.failed(),
        0,
        "failed requests {:?}; first ones {:?}\n--- master log ---\n{}",
        totals.failures,
        totals.first_failures,
        c.master.stderr_text()
    );
    assert!(
        totals.by_gen.contains_key(&21) && totals.by_gen.len() >= 10,
        "served by the last generation and by at least 10 of the 21: {:?}",
        totals.by_gen
    );
}

#[test]
fn ready_when_ready_waits_for_process_send_ready() {
    const DELAY_MS: u64 = 1500;
    let delay = DELAY_MS.to_string();
    let Some(c) = node_cluster(
        2,
        &["--via", "node", "--balance", "rr", "--ready-when", "ready"],
        "http_ready.js",
        &[("SEND_READY_AFTER_MS", &delay)],
    ) else {
        return;
    };
    let ready = c.master.wait_cluster_ready(2);
    for (&slot, &pid) in &ready {
        let spawned = c
            .master
            .wait_event(&format!("worker_spawned slot={slot} pid={pid}"), DEADLINE);
        let ready_line = c
            .master
            .wait_event(&format!("worker_ready slot={slot} pid={pid}"), DEADLINE);
        // Waited for: a master that took the worker as ready before this line
        // should fail on the times below, not here.
        poll_until(DEADLINE, || {
            !app_lines(&c.master, "ready_sent", pid).is_empty()
        });
        let sent = app_lines(&c.master, "ready_sent", pid);
        let sent_ms: u64 = sent
            .first()
            .and_then(|l| raw_field(l, "at_ms")?.parse().ok())
            .unwrap_or_else(|| panic!("no `node_app ready_sent pid={pid}` line from the app"));
        let ready_at = ready_line
            .time
            .unwrap_or_else(|| panic!("no timestamp in {}", ready_line.raw));
        let gap = ready_line.since(&spawned);
        println!(
            "slot {slot} pid {pid}: spawned → ready {gap:.3?}; the app sent ready at {sent_ms} ms, the master logged it ready at {} ms",
            ready_at.as_millis()
        );
        assert!(
            gap >= Duration::from_millis(DELAY_MS),
            "worker {pid} ready {gap:?} after spawn, before its process.send({{cmd: 'ready'}}) ({DELAY_MS} ms after listening)"
        );
        assert!(
            ready_at.as_millis() as u64 >= sent_ms,
            "worker {pid} logged ready at {} ms, before the app sent ready at {sent_ms} ms",
            ready_at.as_millis()
        );
    }
    let connected = AtomicU64::new(0);
    let a = get(c.addr, None, "/", Duration::from_secs(10), &connected).expect("served once ready");
    assert!(ready.values().any(|&p| p == a.pid), "{a:?} from {ready:?}");
}

#[test]
fn a_node_program_is_detected_without_via_and_served_in_rr() {
    let Some(c) = node_cluster(2, &["--balance", "rr"], "http_server.js", &[]) else {
        return;
    };
    let ready = c.master.wait_cluster_ready(2);
    let connected = AtomicU64::new(0);
    let mut seen = BTreeMap::new();
    for i in 0..20 {
        let a = get(c.addr, None, "/", Duration::from_secs(10), &connected)
            .unwrap_or_else(|f| panic!("request {i} failed: {f:?}"));
        seen.insert(a.worker, a.pid);
    }
    c.master.reload_to(2);
    let chosen = c.master.events("via_chosen via=node");
    println!(
        "no --via, program node: answers by WORKER_ID {seen:?}; via_chosen lines: {:?}",
        chosen.iter().map(|l| &l.raw).collect::<Vec<_>>()
    );
    assert_eq!(seen, ready, "both workers answered (rr)");
    assert_eq!(
        chosen.len(),
        1,
        "the master logs `via_chosen via=node` once"
    );
}

#[test]
fn shared_balance_with_via_node_is_refused() {
    // `--via` is a known option (so that the refusal below is not merely clap's
    // "unexpected argument", which also exits 2 and names it).
    let help = Command::new(recluster_bin())
        .arg("--help")
        .output()
        .expect("recluster --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("--via"), "--help lists --via:\n{help}");
    let (exit, stderr) = Cluster::new()
        .args([
            "--balance",
            "shared",
            "--via",
            "node",
            "--listen",
            "127.0.0.1:0",
        ])
        .command(["node", &app("http_server.js")])
        .run(DEADLINE)
        .expect("the master exits");
    println!("--balance shared --via node: {exit:?}\n{stderr}");
    assert_eq!(exit.code, Some(2), "exit status");
    assert!(
        stderr.contains("--via"),
        "the message names --via: {stderr}"
    );
}

#[test]
fn a_killed_worker_loses_only_connections_it_had_accepted() {
    let Some(c) = node_cluster(
        4,
        // Debug: the master logs each connection a worker accepted (`node_accepted`).
        &[
            "--via",
            "node",
            "--balance",
            "rr",
            "--respawn",
            "100ms",
            "--log-level",
            "debug",
        ],
        "http_server.js",
        &[("LOG_CONNECTIONS", "1")],
    ) else {
        return;
    };
    let ready = c.master.wait_cluster_ready(4);
    let connected = Arc::new(AtomicU64::new(0));
    // Slow requests spread over the workers, so the victim holds some when it dies.
    const SLOW: usize = 8;
    let slow: Vec<JoinHandle<Result<Answer, Failure>>> = (0..SLOW)
        .map(|_| {
            let (addr, connected) = (c.addr, connected.clone());
            std::thread::spawn(move || {
                get(
                    addr,
                    None,
                    "/slow?ms=3000",
                    Duration::from_secs(15),
                    &connected,
                )
            })
        })
        .collect();
    let slow_on = |pid: u32| app_lines(&c.master, "slow_start", pid).len();
    assert!(
        poll_until(DEADLINE, || ready
            .values()
            .map(|&p| slow_on(p))
            .sum::<usize>()
            == SLOW),
        "the {SLOW} slow requests did not all start"
    );
    let (&victim_slot, &victim) = ready
        .iter()
        .max_by_key(|(_, &p)| slow_on(p))
        .expect("a worker");
    let victim_slow = slow_on(victim);
    let load = HttpLoad::start(c.addr, 8, 0);
    load.wait_more_ok(300, DEADLINE);
    let mark = c.master.mark();
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).expect("kill the victim");
    c.master.wait_event_after(
        mark,
        &format!("worker_exited slot={victim_slot} pid={victim}"),
        DEADLINE,
    );
    // The victim's stderr is a pipe, written synchronously: every connection it
    // finished is logged before it died, and read by now (its exit is logged after).
    // What it held is what it told the master it accepted (Node answers `accepted`
    // just before its server sees the connection, so a kill can fall between that
    // answer and the app's own `conn_open`) less what it finished.
    c.master
        .wait_event_after(mark, &format!("worker_ready slot={victim_slot}"), DEADLINE);
    let opened = app_lines(&c.master, "conn_open", victim).len();
    let accepted = c
        .master
        .lines()
        .iter()
        .filter(|l| l.matches(&format!("node_accepted pid={victim}")))
        .count();
    let closed = app_lines(&c.master, "conn_close", victim).len();
    assert!(
        accepted >= opened,
        "the master saw every connection the app opened accepted: {accepted} < {opened}"
    );
    let held = accepted.saturating_sub(closed) as u64;
    load.wait_more_ok(300, DEADLINE);
    let totals = load.stop();
    let slow: Vec<Result<Answer, Failure>> = slow
        .into_iter()
        .map(|t| t.join().expect("slow client panicked"))
        .collect();
    let slow_failed = slow.iter().filter(|r| r.is_err()).count();
    let b = terminate(&c.master);
    totals.print("rr, a worker SIGKILLed under load");
    let all_connected = totals.connected + connected.load(Ordering::Relaxed);
    println!(
        "victim slot {victim_slot} pid {victim}: accepted {accepted} connections (the app saw {opened}), finished {closed}, held {held} when killed ({victim_slow} slow); \
         slow requests failed {slow_failed} of {SLOW}; load failed {}; clients connected {all_connected}; master {b:?}",
        totals.failed()
    );
    assert!(
        held >= victim_slow as u64,
        "the victim held its slow requests"
    );
    assert!(
        totals.failed() + slow_failed as u64 <= held,
        "{} failures, but the victim had accepted only {held} connections it had not finished: {:?} {:?}",
        totals.failed() + slow_failed as u64,
        totals.first_failures,
        slow
    );
    assert_eq!(
        slow_failed, victim_slow,
        "the slow requests of the other workers were served: {slow:?}"
    );
    // Every accepted connection was handed or closed; one taken back from the dead
    // worker (offered, never accepted) was handed a second time, and counts in
    // `reclaimed` (so `accepted == handed + closed` when nothing was reclaimed).
    assert_eq!(
        b.accepted + b.reclaimed,
        b.handed + b.closed,
        "every accepted connection handed or closed"
    );
    assert_eq!(
        b.accepted, all_connected,
        "the master accepted every connection the clients made"
    );
}

#[test]
fn a_reload_lets_a_slow_request_on_a_keep_alive_connection_finish() {
    let Some(c) = node_cluster(
        1,
        &["--via", "node", "--balance", "rr", "--timeout", "30"],
        "http_server.js",
        &[],
    ) else {
        return;
    };
    let ready = c.master.wait_cluster_ready(1);
    let old = ready[&0];
    let mut stream = connect(c.addr, None).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let keep_alive = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    stream.write_all(keep_alive("/").as_bytes()).unwrap();
    let (status, body) = read_response(&mut stream).expect("first response");
    let first = answer_of(status, &body).expect("first answer");
    assert_eq!(first.pid, old);
    // A slow request on the same connection, in flight through the reload.
    const SLOW_MS: u64 = 4000;
    let sent = Instant::now();
    stream
        .write_all(keep_alive(&format!("/slow?ms={SLOW_MS}")).as_bytes())
        .unwrap();
    assert!(
        poll_until(DEADLINE, || !app_lines(&c.master, "slow_start", old)
            .is_empty()),
        "the slow request did not reach the worker"
    );
    let mark = c.master.mark();
    c.master.signal(Signal::SIGUSR2);
    let retiring = c
        .master
        .wait_event_after(mark, &format!("worker_retiring pid={old}"), DEADLINE);
    let retiring_after = retiring.at.saturating_duration_since(sent);
    assert!(
        retiring_after < Duration::from_millis(SLOW_MS),
        "the old worker retired {retiring_after:?} after the slow request was sent: not while it was in flight"
    );
    let response = read_response(&mut stream);
    let took = sent.elapsed();
    let finished = c
        .master
        .wait_event_after(mark, "reload_finished generation=2", DEADLINE);
    println!(
        "keep-alive slow request: old worker {old} retiring {retiring_after:.3?} after it was sent; \
         answer {response:?} after {took:.3?}; {}",
        finished.raw
    );
    let (status, body) = response.expect("the slow request completes through the reload");
    let slow = answer_of(status, &body).expect("a 200 answer");
    assert_eq!((slow.pid, slow.gen), (old, 1), "answered by the old worker");
    assert!(took >= Duration::from_millis(SLOW_MS));
    // The client is done with the connection; the old worker then has nothing left
    // and leaves by itself, long before --timeout (30 s) would kill it.
    drop(stream);
    let closed = Instant::now();
    let exited = c
        .master
        .wait_event_after(mark, &format!("worker_exited pid={old}"), DEADLINE);
    println!(
        "old worker exited {:.3?} after the client closed: {}",
        closed.elapsed(),
        exited.raw
    );
    assert_ne!(
        exited.field("signal"),
        Some("9"),
        "the old worker was killed"
    );
}

// ---------------------------------------------------------------------------------
// socket.io
// ---------------------------------------------------------------------------------

/// `target/node-deps/node_modules` with socket.io and socket.io-client, installed with
/// npm when missing (`None`, skipped, when that fails; a failure under `CI=true`).
fn node_deps() -> Option<PathBuf> {
    let dir = manifest_dir().join("target/node-deps");
    let modules = dir.join("node_modules");
    let installed = || {
        ["socket.io", "socket.io-client"]
            .iter()
            .all(|p| modules.join(p).join("package.json").is_file())
    };
    if installed() {
        return Some(modules);
    }
    let npm = require("npm")?;
    println!(
        "installing socket.io and socket.io-client into {}",
        dir.display()
    );
    let mut child = Command::new(npm)
        .arg("install")
        .arg("--prefix")
        .arg(&dir)
        .args(["--no-audit", "--no-fund", "--loglevel=error"])
        .args(["socket.io", "socket.io-client"])
        .stdin(Stdio::null())
        .spawn()
        .expect("run npm");
    let done = poll_until(Duration::from_secs(300), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !done {
        let _ = child.kill();
    }
    let ok = done && child.wait().is_ok_and(|s| s.success()) && installed();
    if !ok {
        skip("npm install --prefix target/node-deps socket.io socket.io-client failed");
        return None;
    }
    Some(modules)
}

/// Runs `tests/node/sio_clients.js` against `addr` and returns its `sio_results`
/// figures.
fn sio_clients(node: &str, modules: &PathBuf, addr: SocketAddr) -> BTreeMap<String, u64> {
    let mut child = Command::new(node)
        .arg(app("sio_clients.js"))
        .env("NODE_PATH", modules)
        .env("URL", format!("http://{addr}"))
        .env("COUNT", "100")
        .env("FIRST_SOURCE", "2")
        .env("TIMEOUT_MS", "8000")
        .env("UPGRADE_WAIT_MS", "3000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sio_clients.js");
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    // The script bounds itself (timeouts + 5 s); this bounds the script.
    if !poll_until(Duration::from_secs(40), || {
        matches!(child.try_wait(), Ok(Some(_)))
    }) {
        let _ = child.kill();
        let _ = child.wait();
        panic!("sio_clients.js did not finish in 40 s");
    }
    let out = reader.join().unwrap();
    print!("{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("sio_results "))
        .unwrap_or_else(|| panic!("no sio_results line from sio_clients.js: {out}"));
    line.split_whitespace()
        .filter_map(|t| {
            let (k, v) = t.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[test]
fn socket_io_sessions_survive_sticky_and_via_socket_and_break_under_rr() {
    let Some(node) = require("node") else {
        return;
    };
    let Some(modules) = node_deps() else {
        return;
    };
    let node = node.display().to_string();
    let node_path = modules.display().to_string();
    let mut results = BTreeMap::new();
    for (front, via, balance) in [
        ("sticky", "node", "sticky"),
        ("rr", "node", "rr"),
        // The same sessions with the kernel choosing the slot (`--via socket`).
        ("socket", "socket", "sticky"),
    ] {
        let c = node_cluster(
            4,
            &["--via", via, "--balance", balance],
            "sio_server.js",
            &[("NODE_PATH", &node_path)],
        )
        .expect("node is there");
        c.master.wait_cluster_ready(4);
        let r = sio_clients(&node, &modules, c.addr);
        println!(
            "socket.io, 100 clients from 100 addresses, --balance {balance} --via {via}: {r:?}"
        );
        results.insert(front, r);
    }
    let rr = &results["rr"];
    for front in ["sticky", "socket"] {
        let r = &results[front];
        for key in ["connected", "acked", "upgraded", "sources"] {
            assert_eq!(r[key], 100, "{front}: {key} of 100: {r:?}");
        }
        assert_eq!(r["failed"], 0, "{front}: {r:?}");
        assert!(
            r["workers"] >= 2,
            "{front} spread the sessions over several workers: {r:?}"
        );
    }
    assert!(
        rr["acked"] < 50 && rr["failed"] > 50,
        "rr breaks most polling sessions (as Node's cluster does): {rr:?}"
    );
}

/// `--via socket` with an unmodified `listen(PORT)` server: the master answers its
/// `queryServer` with the worker's own slot's SO_REUSEPORT socket, Node accepts by
/// itself, and the kernel's program keeps each client IP on the slot that
/// `recluster::balance::slot_for` names, through reloads.
#[test]
fn via_socket_serves_an_unmodified_listen_port_server_on_the_predicted_slot_through_reloads() {
    sticky_sources_through_reloads(
        "--via socket, sticky, 200 sources, 5 reloads",
        &["--via", "socket", "--balance", "sticky", "--timeout", "10"],
        5,
        true,
    );
}
