//! The load generator: HTTP/1.1 GETs at fixed concurrency for a fixed time.
//!
//! ```text
//! cargo bench --bench loadgen -- --addr 127.0.0.1:8080 --load conn --clients 64 --duration 5 --sources 64
//! ```
//!
//! * `--load conn`: a new TCP connection per request; the client closes it once the
//!   response is in, as browsers and proxies do, so TIME_WAIT stays on the client side
//!   (with `Connection: close` the server closes first, and a server-side TIME_WAIT
//!   that meets a reused client port costs the next SYN a 1 s retransmission, which
//!   then dominates p99 and measures the TCP stack, not the balancer);
//!   `--load keepalive`: each client keeps its connection for many requests (and
//!   reconnects after an error).
//! * `--clients C` concurrent clients, `--duration S` seconds measured after
//!   `--warmup S` seconds not counted; `--requests N` stops after N successful
//!   requests instead (then `--duration` is only an upper bound, 600 s by default).
//! * `--sources K`: client `i` binds 127.0.0.(1 + i mod K) before connecting (with
//!   `IP_BIND_ADDRESS_NO_PORT`, so each source has the whole ephemeral port range per
//!   destination). Needed for `sticky` and `balance source`, which hash the client IP.
//! * `--slow-every K --slow-ms N` (both off by default; either at 0 turns it off):
//!   every K-th request of each client asks `GET /work?ms=N` instead of `GET /`, which
//!   `examples/http.rs` answers after burning N ms of CPU (N ≤ 1000). Each client
//!   counts its requests (attempts, successful or not, warm-up included) from a
//!   random offset in `0..K` of its own, so the clients' slow requests are spread out
//!   rather than in lockstep. The latency percentiles stay over all requests, slow
//!   and fast together (the report also gives how many slow ones succeeded). With
//!   `--load conn` and K = 20, N = 5 this is the `uneven` load of `compare`.
//!
//! * `--proxy-v2`: each new connection starts with a PROXY protocol v2 header (sent
//!   with the request, in one write, as HAProxy's `send-proxy-v2` does) claiming
//!   client `i` is 10.1.(i / 256).(i % 256), for a master run with
//!   `--proxy-protocol v2`.
//!
//! It reports requests/s, latency percentiles (p50/p99/p99.9, from an HDR histogram
//! in µs, connect included in `conn`), and errors by kind: refused, reset, timeout,
//! short read (EOF before the whole response), bad response (not `200` or
//! unparsable), other. A request counts as a success only when the whole `200`
//! response with its full `Content-Length` body has arrived; nothing else is counted
//! as a success, and requests still in flight at the end count as neither.
//!
//! `compare.rs` includes this file as a module and calls [`run`].

#![allow(dead_code)] // parts are used only by the standalone binary or only by compare

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// New connection per request, or many requests per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Load {
    /// A new TCP connection per request.
    Conn,
    /// Requests back to back on one connection per client.
    Keepalive,
}

impl Load {
    pub fn as_str(self) -> &'static str {
        match self {
            Load::Conn => "conn",
            Load::Keepalive => "keepalive",
        }
    }

    pub fn parse(s: &str) -> Option<Load> {
        match s {
            "conn" => Some(Load::Conn),
            "keepalive" | "keep-alive" => Some(Load::Keepalive),
            _ => None,
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    pub addr: SocketAddr,
    pub load: Load,
    pub clients: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Stop after this many successful requests (then `duration` is only an upper bound).
    pub requests: Option<u64>,
    /// Spread client source addresses over 127.0.0.1..=127.0.0.K (0: let the kernel pick).
    pub sources: u8,
    /// A request (connect included) that takes longer than this is a timeout error.
    pub timeout: Duration,
    /// Threads of the load generator's runtime.
    pub threads: usize,
    /// Every this many requests of each client, one is slow (`/work?ms=slow_ms`);
    /// 0: none.
    pub slow_every: u32,
    /// CPU milliseconds a slow request costs the worker; 0: no slow requests.
    pub slow_ms: u32,
    /// Start each new connection with a PROXY v2 header (see the module docs).
    pub proxy_v2: bool,
}

impl Config {
    /// `(every, ms)` when slow requests are on.
    pub fn slow(&self) -> Option<(u32, u32)> {
        (self.slow_every > 0 && self.slow_ms > 0).then_some((self.slow_every, self.slow_ms))
    }
}

impl Default for Config {
    fn default() -> Config {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            load: Load::Conn,
            clients: 64,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(5),
            requests: None,
            sources: 0,
            timeout: Duration::from_secs(2),
            threads: 2,
            slow_every: 0,
            slow_ms: 0,
            proxy_v2: false,
        }
    }
}

/// Errors by kind. None of them is ever counted as a success.
#[derive(Debug, Default, Clone)]
pub struct Errors {
    pub refused: u64,
    pub reset: u64,
    pub timeout: u64,
    pub short_read: u64,
    pub bad_response: u64,
    pub other: u64,
    /// The first `other` error seen, to say what it was.
    pub first_other: Option<String>,
}

impl Errors {
    pub fn total(&self) -> u64 {
        self.refused + self.reset + self.timeout + self.short_read + self.bad_response + self.other
    }

    fn add(&mut self, e: &Errors) {
        self.refused += e.refused;
        self.reset += e.reset;
        self.timeout += e.timeout;
        self.short_read += e.short_read;
        self.bad_response += e.bad_response;
        self.other += e.other;
        if self.first_other.is_none() {
            self.first_other.clone_from(&e.first_other);
        }
    }

    fn count(&mut self, e: &Failure) {
        match e {
            Failure::Timeout => self.timeout += 1,
            Failure::ShortRead => self.short_read += 1,
            Failure::BadResponse => self.bad_response += 1,
            Failure::Io(e) => match e.kind() {
                io::ErrorKind::ConnectionRefused => self.refused += 1,
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => self.reset += 1,
                io::ErrorKind::TimedOut => self.timeout += 1,
                io::ErrorKind::UnexpectedEof => self.short_read += 1,
                _ => {
                    self.other += 1;
                    if self.first_other.is_none() {
                        self.first_other = Some(e.to_string());
                    }
                }
            },
        }
    }
}

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refused={} reset={} timeout={} short_read={} bad_response={} other={}",
            self.refused, self.reset, self.timeout, self.short_read, self.bad_response, self.other
        )?;
        if let Some(o) = &self.first_other {
            write!(f, " (first other: {o})")?;
        }
        Ok(())
    }
}

/// What a run measured (over the measured window only).
#[derive(Debug, Clone)]
pub struct Report {
    pub load: Load,
    /// Complete `200` responses.
    pub ok: u64,
    /// `(every, ms)` of the slow requests, when on (see [`Config::slow`]).
    pub slow: Option<(u32, u32)>,
    /// Of `ok`, the responses to slow requests.
    pub slow_ok: u64,
    /// TCP connections established.
    pub connections: u64,
    pub errors: Errors,
    pub elapsed: Duration,
    /// Successful responses per `worker=N` body (N < 64), to see how evenly a
    /// balancer spreads the load.
    pub per_worker: Vec<u64>,
    /// Latency of successful requests, µs.
    pub hist: Histogram<u64>,
}

impl Report {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    /// A latency percentile in ms.
    pub fn pct_ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<9} {:>9.0} req/s  ok={} conns={} in {:.2}s  p50={:.3}ms p99={:.3}ms p99.9={:.3}ms max={:.3}ms  errors={} [{}]",
            self.load.as_str(),
            self.rps(),
            self.ok,
            self.connections,
            self.elapsed.as_secs_f64(),
            self.pct_ms(0.5),
            self.pct_ms(0.99),
            self.pct_ms(0.999),
            self.hist.max() as f64 / 1000.0,
            self.errors.total(),
            self.errors
        )?;
        if let Some((every, ms)) = self.slow {
            write!(f, "  slow 1/{every} × {ms} ms: ok={}", self.slow_ok)?;
        }
        let spread: Vec<String> = self.per_worker.iter().map(u64::to_string).collect();
        write!(f, "  per worker [{}]", spread.join(" "))
    }
}

enum Failure {
    Io(io::Error),
    Timeout,
    ShortRead,
    BadResponse,
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Failure {
        Failure::Io(e)
    }
}

/// Shared state of a run.
struct Shared {
    cfg: Config,
    /// When counting starts (end of warmup).
    measure_from: Instant,
    /// Hard end of the run.
    deadline: Instant,
    stop: AtomicBool,
    ok: AtomicU64,
}

impl Shared {
    /// Whether a request started at `started` is in the measured window.
    fn counting(&self, started: Instant) -> bool {
        started >= self.measure_from
            && started < self.deadline
            && !self.stop.load(Ordering::Relaxed)
    }

    /// Counts one success; returns false once the run should stop.
    fn succeeded(&self) -> bool {
        let n = self.ok.fetch_add(1, Ordering::Relaxed) + 1;
        if self.cfg.requests.is_some_and(|max| n >= max) {
            self.stop.store(true, Ordering::Relaxed);
        }
        !self.stop.load(Ordering::Relaxed)
    }
}

struct ClientResult {
    ok: u64,
    slow_ok: u64,
    per_worker: Vec<u64>,
    connections: u64,
    errors: Errors,
    hist: Histogram<u64>,
}

fn new_hist() -> Histogram<u64> {
    // 1 µs .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Runs the load described by `cfg` on a runtime of its own and reports it.
pub fn run(cfg: &Config) -> io::Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.threads.max(1))
        .enable_all()
        .build()?;
    let report = rt.block_on(run_async(cfg.clone()));
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(report)
}

async fn run_async(cfg: Config) -> Report {
    let start = Instant::now();
    let measure_from = start + cfg.warmup;
    let deadline = measure_from + cfg.duration;
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        measure_from,
        deadline,
        stop: AtomicBool::new(false),
        ok: AtomicU64::new(0),
    });
    let mut set = tokio::task::JoinSet::new();
    for i in 0..cfg.clients {
        set.spawn(client(shared.clone(), i));
    }
    let mut hist = new_hist();
    let mut errors = Errors::default();
    let (mut ok, mut slow_ok, mut connections) = (0, 0, 0);
    let mut per_worker = vec![0u64; MAX_WORKERS];
    while let Some(r) = set.join_next().await {
        let r = r.expect("load generator client panicked");
        ok += r.ok;
        slow_ok += r.slow_ok;
        per_worker
            .iter_mut()
            .zip(&r.per_worker)
            .for_each(|(a, b)| *a += b);
        connections += r.connections;
        errors.add(&r.errors);
        hist.add(&r.hist).expect("histograms of equal bounds");
    }
    // The window is [measure_from, deadline) unless the run stopped early (--requests).
    let end = if cfg.requests.is_some() {
        Instant::now().min(deadline)
    } else {
        deadline
    };
    Report {
        load: cfg.load,
        ok,
        slow: cfg.slow(),
        slow_ok,
        connections,
        errors,
        per_worker: {
            let used = per_worker.iter().rposition(|&n| n > 0).map_or(0, |i| i + 1);
            per_worker.truncate(used);
            per_worker
        },
        elapsed: end.saturating_duration_since(measure_from),
        hist,
    }
}

/// The source address of client `i`, if sources are spread.
fn source(cfg: &Config, i: usize) -> Option<IpAddr> {
    (cfg.sources > 0).then(|| {
        IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            0,
            1 + (i % cfg.sources as usize) as u8,
        ))
    })
}

async fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let sock = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on a socket we own, with a valid c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The request, in both loads: in `conn` the client closes after the response.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";

/// The slow request: the worker burns `ms` of CPU before answering.
fn slow_request(ms: u32) -> Vec<u8> {
    format!("GET /work?ms={ms} HTTP/1.1\r\nHost: bench\r\n\r\n").into_bytes()
}

/// Where client `i` starts counting towards its first slow request: a random offset
/// in `0..every`, different per client and per run, so that clients are not in lockstep.
fn slow_offset(i: usize, every: u32) -> u64 {
    use std::hash::BuildHasher;
    // RandomState is randomly keyed per process (and per instance): hashing the
    // client's index with it is a random number without a dependency.
    std::collections::hash_map::RandomState::new().hash_one(i) % u64::from(every.max(1))
}

/// Sends one request and reads its whole response; `buf` is reused.
async fn request(stream: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> Result<(), Failure> {
    stream.write_all(req).await?;
    buf.clear();
    let mut need: Option<usize> = None;
    loop {
        if buf.len() == buf.capacity() {
            if buf.len() >= 64 * 1024 {
                return Err(Failure::BadResponse);
            }
            buf.reserve(4096);
        }
        let n = stream.read_buf(buf).await?;
        if n == 0 {
            return Err(Failure::ShortRead);
        }
        if need.is_none() {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                need = Some(end + 4 + parse_head(&buf[..end + 4]).ok_or(Failure::BadResponse)?);
            }
        }
        if let Some(need) = need {
            match buf.len().cmp(&need) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => return Ok(()),
                // One request in flight: anything more is not a valid answer.
                std::cmp::Ordering::Greater => return Err(Failure::BadResponse),
            }
        }
    }
}

/// Workers told apart in [`Report::per_worker`].
const MAX_WORKERS: usize = 64;

/// The `N` of a `worker=N` body in a whole response.
fn worker_of(response: &[u8]) -> Option<usize> {
    let body = &response[response.windows(4).position(|w| w == b"\r\n\r\n")? + 4..];
    let digits = body.strip_prefix(b"worker=")?;
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// Checks a response head is `200` and returns its `Content-Length` (0 when absent).
fn parse_head(head: &[u8]) -> Option<usize> {
    if !(head.starts_with(b"HTTP/1.1 200 ") || head.starts_with(b"HTTP/1.0 200 ")) {
        return None;
    }
    for line in head.split(|&b| b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            if line[..colon].eq_ignore_ascii_case(b"content-length") {
                return std::str::from_utf8(line[colon + 1..].trim_ascii())
                    .ok()?
                    .parse()
                    .ok();
            }
        }
    }
    Some(0)
}

async fn client(shared: Arc<Shared>, i: usize) -> ClientResult {
    let cfg = &shared.cfg;
    let src = source(cfg, i);
    let mut res = ClientResult {
        ok: 0,
        slow_ok: 0,
        per_worker: vec![0; MAX_WORKERS],
        connections: 0,
        errors: Errors::default(),
        hist: new_hist(),
    };
    let mut buf = Vec::with_capacity(4096);
    let mut conn: Option<TcpStream> = None;
    let slow = cfg.slow();
    let slow_req = slow.map(|(_, ms)| slow_request(ms));
    // `--proxy-v2`: what a new connection sends first, header and request in one write.
    let header = cfg.proxy_v2.then(|| {
        let claimed = SocketAddr::from(([10, 1, (i / 256) as u8, i as u8], 40000));
        let mut h = Vec::new();
        recluster::proxy::encode_v2(&mut h, claimed, cfg.addr, &[]);
        h
    });
    let with_header = |req: &[u8]| header.as_ref().map(|h| [h.as_slice(), req].concat());
    let (fast_proxied, slow_proxied) = (
        with_header(REQUEST),
        slow_req.as_deref().and_then(with_header),
    );
    // Requests sent so far by this client, counted from a random offset.
    let mut sent = slow.map_or(0, |(every, _)| slow_offset(i, every));
    while !shared.stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        if started >= shared.deadline {
            break;
        }
        let is_slow = slow.is_some_and(|(every, _)| sent % u64::from(every) == 0);
        sent += 1;
        let req = match &slow_req {
            Some(r) if is_slow => r.as_slice(),
            _ => REQUEST,
        };
        // Each request, connect included, is bounded by the timeout only: a request
        // started in the window counts (success or error) even if it ends after it,
        // so that a stall at the end is not lost; the run overruns by at most that.
        let bound = started + cfg.timeout;
        let mut connected = false;
        let attempt = tokio::time::timeout_at(bound.into(), async {
            let mut stream = match conn.take() {
                Some(s) => s,
                None => {
                    let s = connect(cfg.addr, src).await?;
                    connected = true;
                    s
                }
            };
            let proxied = match (connected, is_slow && slow_req.is_some()) {
                (false, _) => None,
                (true, false) => fast_proxied.as_deref(),
                (true, true) => slow_proxied.as_deref(),
            };
            request(&mut stream, proxied.unwrap_or(req), &mut buf).await?;
            Ok::<_, Failure>(stream)
        })
        .await;
        let now = Instant::now();
        let counting = shared.counting(started);
        if connected && counting {
            res.connections += 1;
        }
        match attempt {
            Ok(Ok(stream)) => {
                if counting {
                    res.ok += 1;
                    res.slow_ok += u64::from(is_slow);
                    if let Some(w) = worker_of(&buf).filter(|&w| w < MAX_WORKERS) {
                        res.per_worker[w] += 1;
                    }
                    let us = now.duration_since(started).as_micros().max(1) as u64;
                    res.hist.saturating_record(us);
                    if !shared.succeeded() {
                        break;
                    }
                }
                if cfg.load == Load::Keepalive {
                    conn = Some(stream);
                }
            }
            Ok(Err(e)) => {
                if counting {
                    res.errors.count(&e);
                }
                // Do not spin on a refused or exhausted address.
                if matches!(&e, Failure::Io(io) if io.kind() != io::ErrorKind::ConnectionReset) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            Err(_elapsed) => {
                if counting {
                    res.errors.count(&Failure::Timeout);
                }
            }
        }
    }
    res
}

/// Parses the standalone binary's arguments.
pub fn parse_args(args: &[String]) -> Result<Config, String> {
    let mut cfg = Config::default();
    let mut it = args.iter();
    let secs = |v: &str| -> Result<Duration, String> {
        v.parse::<f64>()
            .map(Duration::from_secs_f64)
            .map_err(|e| format!("{v}: {e}"))
    };
    while let Some(a) = it.next() {
        if a == "--bench" {
            continue; // added by `cargo bench`
        }
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--addr" => cfg.addr = val()?.parse().map_err(|e| format!("--addr: {e}"))?,
            "--load" => cfg.load = Load::parse(&val()?).ok_or("--load conn|keepalive")?,
            "--clients" => cfg.clients = val()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "--warmup" => cfg.warmup = secs(&val()?)?,
            "--duration" => cfg.duration = secs(&val()?)?,
            "--requests" => {
                cfg.requests = Some(val()?.parse().map_err(|e| format!("--requests: {e}"))?)
            }
            "--sources" => cfg.sources = val()?.parse().map_err(|e| format!("--sources: {e}"))?,
            "--timeout" => cfg.timeout = secs(&val()?)?,
            "--threads" => cfg.threads = val()?.parse().map_err(|e| format!("--threads: {e}"))?,
            "--slow-every" => {
                cfg.slow_every = val()?.parse().map_err(|e| format!("--slow-every: {e}"))?
            }
            "--slow-ms" => cfg.slow_ms = val()?.parse().map_err(|e| format!("--slow-ms: {e}"))?,
            "--proxy-v2" => cfg.proxy_v2 = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if cfg.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    if cfg.slow_ms > 1000 {
        return Err("--slow-ms is at most 1000 (what examples/http.rs burns at most)".into());
    }
    Ok(cfg)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match parse_args(&args) {
        Ok(c) => c,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("loadgen: {e}");
            }
            eprintln!(
                "usage: cargo bench --bench loadgen -- --addr HOST:PORT [--load conn|keepalive] [--clients 64] \
                 [--duration 5] [--warmup 1] [--requests N] [--sources K] [--timeout 2] [--threads 2] \
                 [--slow-every K --slow-ms N] [--proxy-v2]"
            );
            std::process::exit(2);
        }
    };
    if cfg.requests.is_some() && args.iter().all(|a| a != "--duration") {
        // --requests alone: the duration is only a safety bound.
        let mut c = cfg.clone();
        c.duration = Duration::from_secs(600);
        return finish(run(&c));
    }
    finish(run(&cfg));
}

fn finish(r: io::Result<Report>) {
    match r {
        Ok(r) => {
            println!("{r}");
            if r.ok == 0 {
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            std::process::exit(1);
        }
    }
}
