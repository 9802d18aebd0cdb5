//! End to end: `examples/chat.rs`, the websocket chat worker, under `sticky` and `rr`.
//!
//! Clients are a minimal hand-written websocket client (RFC 6455: upgrade request,
//! accept-key check, masked text frames) connecting from source addresses 127.0.0.X,
//! so that each stands for one client IP. Every wait is a read with a deadline.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use socket2::{Domain, Socket, Type};

/// Sample keys and their `Sec-WebSocket-Accept` (RFC 6455 §1.3, and Wikipedia's).
const KEYS: [(&str, &str); 2] = [
    ("dGhlIHNhbXBsZSBub25jZQ==", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
    ("x3JJHMbDL1EzLkh9GBhXDw==", "HSmrc0sMlYUkAGmm5OPpG2HaGWk="),
];

/// Client IPs; chat clients of one test take consecutive ones from `first`.
fn ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, (10 + i) as u8)
}

fn chat_cluster(balance: &str, workers: usize) -> Master {
    let m = Cluster::new()
        .workers(workers)
        .args(["--balance", balance, "--listen", "127.0.0.1:0"])
        .command([example_bin("chat")])
        .spawn();
    m.wait_cluster_ready(workers);
    m
}

/// A websocket client connection.
struct Ws {
    stream: TcpStream,
    buf: Vec<u8>,
    mask: u32,
}

impl Ws {
    /// Connects from `src`, upgrades, and checks the `101` and the accept key.
    fn connect(addr: SocketAddr, src: Ipv4Addr) -> Ws {
        let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        sock.bind(&SocketAddr::from((src, 0)).into())
            .unwrap_or_else(|e| panic!("bind {src}: {e}"));
        sock.connect_timeout(&addr.into(), Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connect {addr} from {src}: {e}"));
        let mut stream: TcpStream = sock.into();
        let (key, accept) = KEYS[src.octets()[3] as usize % KEYS.len()];
        let request = format!(
            "GET /chat HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut ws = Ws {
            stream,
            buf: Vec::new(),
            mask: u32::from(src),
        };
        let deadline = Instant::now() + DEADLINE;
        let end = loop {
            if let Some(i) = ws.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(ws.fill(deadline), "no upgrade response from {src}");
        };
        let head = String::from_utf8_lossy(&ws.buf[..end]).to_string();
        ws.buf.drain(..end);
        assert!(
            head.starts_with("HTTP/1.1 101 "),
            "not switching protocols: {head}"
        );
        let got = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("sec-websocket-accept")
                .then(|| v.trim().to_string())
        });
        assert_eq!(got.as_deref(), Some(accept), "accept key in: {head}");
        ws
    }

    /// Reads more bytes before `deadline`; false on timeout or EOF.
    fn fill(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        self.stream.set_read_timeout(Some(left)).unwrap();
        let mut chunk = [0u8; 4096];
        match self.stream.read(&mut chunk) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
            Err(e) => panic!("read: {e}"),
        }
    }

    /// The next server frame (`opcode`, payload), or `None` on timeout or EOF.
    fn frame(&mut self, deadline: Instant) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                assert_eq!(self.buf[1] & 0x80, 0, "server frames are not masked");
                assert_ne!(self.buf[0] & 0x80, 0, "the server does not fragment");
                let (len, at) = match self.buf[1] & 0x7f {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => (
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                        10,
                    ),
                    126 | 127 => (usize::MAX - 10, 0),
                    n => (n as usize, 2),
                };
                if self.buf.len() >= at + len {
                    let opcode = self.buf[0] & 0x0f;
                    let payload = self.buf[at..at + len].to_vec();
                    self.buf.drain(..at + len);
                    return Some((opcode, payload));
                }
            }
            if !self.fill(deadline) {
                return None;
            }
        }
    }

    /// The next text message; panics after [`DEADLINE`].
    fn text(&mut self) -> String {
        match self.frame(Instant::now() + DEADLINE) {
            Some((0x1, p)) => String::from_utf8(p).expect("utf-8 text"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Text messages until one satisfies `want`; panics after [`DEADLINE`].
    fn text_until(&mut self, want: impl Fn(&str) -> bool) -> (String, Vec<String>) {
        let mut before = Vec::new();
        loop {
            let t = self.text();
            if want(&t) {
                return (t, before);
            }
            before.push(t);
        }
    }

    /// Sends one masked frame.
    fn send_frame(&mut self, opcode: u8, payload: &[u8]) {
        self.mask = self.mask.wrapping_mul(0x9E37_79B1).wrapping_add(1);
        let mask = self.mask.to_be_bytes();
        let mut f = vec![0x80 | opcode];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().zip(mask.iter().cycle()).map(|(b, m)| b ^ m));
        self.stream.write_all(&f).unwrap();
    }

    fn send(&mut self, text: &str) {
        self.send_frame(0x1, text.as_bytes());
    }

    /// Closes (1000) and waits for the server's close frame.
    fn close(mut self) {
        self.send_frame(0x8, &1000u16.to_be_bytes());
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.frame(deadline) {
                Some((0x8, p)) => {
                    assert_eq!(p, 1000u16.to_be_bytes(), "close code echoed");
                    return;
                }
                Some(_) => {}
                None => panic!("no close frame from the server"),
            }
        }
    }
}

/// `(worker, nick)` of a greeting: `welcome back NAME (worker K)` or
/// `hello stranger (worker K)` (nick `None`).
fn greeting(text: &str) -> (usize, Option<String>) {
    let (who, worker) = text
        .strip_suffix(')')
        .and_then(|t| t.rsplit_once(" (worker "))
        .unwrap_or_else(|| panic!("not a greeting: {text:?}"));
    let worker = worker.parse().expect("worker id");
    match who.strip_prefix("welcome back ") {
        Some(nick) => (worker, Some(nick.to_string())),
        None => {
            assert_eq!(who, "hello stranger", "greeting {text:?}");
            (worker, None)
        }
    }
}

/// 10 client IPs each connect, set `/nick`, disconnect, and reconnect 5 times. Returns
/// how many of the 50 reconnects were welcomed back, and the workers each IP reached.
fn reconnects(addr: SocketAddr) -> (usize, BTreeMap<Ipv4Addr, BTreeSet<usize>>) {
    let mut welcomed = 0;
    let mut workers: BTreeMap<Ipv4Addr, BTreeSet<usize>> = BTreeMap::new();
    for i in 0..10 {
        let (src, nick) = (ip(i), format!("user{i}"));
        let mut ws = Ws::connect(addr, src);
        let (worker, known) = greeting(&ws.text());
        assert_eq!(known, None, "{src} is new, yet: {known:?}");
        ws.send(&format!("/nick {nick}"));
        assert_eq!(ws.text(), format!("you are {nick} (worker {worker})"));
        ws.close();
        workers.entry(src).or_default().insert(worker);
        for _ in 0..5 {
            let mut ws = Ws::connect(addr, src);
            let (worker, known) = greeting(&ws.text());
            workers.entry(src).or_default().insert(worker);
            if let Some(known) = known {
                assert_eq!(known, nick, "{src} welcomed under another name");
                welcomed += 1;
            }
            ws.close();
        }
    }
    (welcomed, workers)
}

#[test]
fn sticky_keeps_every_session() {
    let m = chat_cluster("sticky", 3);
    let (welcomed, workers) = reconnects(m.addr());
    println!("sticky: welcome back on {welcomed} of 50 reconnects; workers per IP {workers:?}");
    assert_eq!(
        welcomed, 50,
        "sticky lost sessions; workers per IP {workers:?}"
    );
    assert!(
        workers.values().all(|w| w.len() == 1),
        "an IP reached several workers under sticky: {workers:?}"
    );
    let used: BTreeSet<usize> = workers.values().flatten().copied().collect();
    println!("sticky: the 10 client IPs spread over workers {used:?}");
}

#[test]
fn round_robin_loses_sessions() {
    let m = chat_cluster("rr", 3);
    let (welcomed, workers) = reconnects(m.addr());
    println!("rr: welcome back on only {welcomed} of 50 reconnects; workers per IP {workers:?}");
    assert!(
        welcomed < 50,
        "rr welcomed back every reconnect: {workers:?}"
    );
}

/// Two clients on the same worker chat; a third on another worker is in another room;
/// a newcomer gets the history; stop closes open websockets with `1001`.
#[test]
fn same_worker_clients_share_a_room() {
    let m = chat_cluster("sticky", 3);
    let addr = m.addr();
    // Client IPs until two share a worker and another is on another worker.
    let mut by_worker: BTreeMap<usize, Vec<(Ipv4Addr, Ws)>> = BTreeMap::new();
    for i in 20.. {
        if by_worker.len() >= 2 && by_worker.values().any(|c| c.len() >= 2) {
            break;
        }
        assert!(i < 60, "40 client IPs all on one worker under sticky");
        let mut ws = Ws::connect(addr, ip(i));
        let (worker, _) = greeting(&ws.text());
        by_worker.entry(worker).or_default().push((ip(i), ws));
    }
    let shown: BTreeMap<_, Vec<_>> = by_worker
        .iter()
        .map(|(w, c)| (w, c.iter().map(|(ip, _)| *ip).collect()))
        .collect();
    println!("room test: client IPs by worker {shown:?}");
    let room = *by_worker.iter().find(|(_, c)| c.len() >= 2).unwrap().0;
    let mut clients = by_worker.remove(&room).unwrap();
    let (ip_b, mut bob) = clients.pop().unwrap();
    let (ip_a, mut alice) = clients.pop().unwrap();
    let (ip_c, mut carol) = by_worker.into_values().flatten().next().unwrap();

    alice.send("/nick alice");
    assert_eq!(alice.text(), format!("you are alice (worker {room})"));
    bob.send("/nick bob");
    assert_eq!(bob.text(), format!("you are bob (worker {room})"));
    alice.send("hi bob");
    let (_, skipped) = bob.text_until(|t| t == "alice: hi bob");
    assert!(skipped.is_empty(), "bob got first: {skipped:?}");
    bob.send("hi alice");
    let (_, skipped) = alice.text_until(|t| t == "bob: hi alice");
    assert_eq!(skipped, ["alice: hi bob"], "alice sees her own line first");
    println!("room test: alice ({ip_a}) and bob ({ip_b}) on worker {room} see each other");

    // Another worker is another room: its client hears its own line, not theirs.
    carol.send("anyone?");
    let (_, skipped) = carol.text_until(|t| t == format!("stranger@{ip_c}: anyone?"));
    assert!(
        skipped.is_empty(),
        "another worker's room leaked: {skipped:?}"
    );
    println!("room test: {ip_c} on another worker hears only itself");

    // A newcomer from alice's IP: welcomed back, with the room's history.
    let mut again = Ws::connect(addr, ip_a);
    assert_eq!(again.text(), format!("welcome back alice (worker {room})"));
    assert_eq!(again.text(), "alice: hi bob");
    assert_eq!(again.text(), "bob: hi alice");
    again.close();

    // Stop: every open websocket gets a `1001 going away` close frame.
    m.signal(Signal::SIGTERM);
    let deadline = Instant::now() + DEADLINE;
    for ws in [&mut alice, &mut bob, &mut carol] {
        let code = loop {
            match ws.frame(deadline) {
                Some((0x8, p)) => break p,
                Some(_) => {}
                None => panic!("no close frame on stop"),
            }
        };
        assert_eq!(code, 1001u16.to_be_bytes(), "close code on stop");
        ws.send_frame(0x8, &code);
    }
    let exit = m.expect_exit(DEADLINE);
    assert!(exit.success(), "master exit {exit:?}");
}
