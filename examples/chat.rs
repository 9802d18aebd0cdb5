//! A websocket chat worker that shows why client-IP affinity matters.
//!
//! Each worker keeps its chat state in its own memory, keyed by client IP: the nickname
//! a client set with `/nick NAME`, and the room's last 20 messages. A new websocket
//! connection is greeted with `welcome back NAME (worker K)` when the worker knows the
//! client's IP, else `hello stranger (worker K)`, then gets the room's history. Every
//! other message is broadcast to the connections of *that worker*.
//!
//! Under `--balance rr` (the default) a reconnecting client usually lands on another
//! worker, which has never heard of it: the session is lost, and the clients of one
//! "room" are split over N rooms that never see each other's messages. That is what
//! socket.io and other sticky-session users hit behind a plain round-robin balancer.
//! `--balance sticky` picks the worker from a hash of the client IP, so the same client
//! always reaches the same worker, also across reloads:
//!
//! ```text
//! cargo build --release --bin recluster --example chat
//! target/release/recluster --balance sticky --listen 127.0.0.1:8080 -- target/release/examples/chat
//! websocat ws://127.0.0.1:8080        # or, in a browser's devtools console:
//! //   ws = new WebSocket('ws://127.0.0.1:8080'); ws.onmessage = e => console.log(e.data)
//! //   ws.send('/nick ada'); ws.send('hello')
//! ```
//!
//! Run it again without `--balance sticky` and reconnect a few times: the greeting
//! forgets you every time you land on another worker.
//!
//! The WebSocket side (RFC 6455) is written by hand to stay dependency-free: the HTTP
//! upgrade handshake (with its own SHA-1 and base64, checked against the RFC's example
//! at startup), text frames (masked from the client, unmasked from the server, 7/16/64
//! bit lengths, fragmented messages), ping/pong and close; no extensions, no binary
//! messages. On stop the worker accepts no more and closes its open websockets with a
//! `1001 going away` close frame, which a client takes as the cue to reconnect.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;

const HISTORY: usize = 20;
const MAX_HEAD: usize = 8192;
const MAX_MESSAGE: usize = 64 * 1024;
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What this worker remembers; another worker has its own, and knows nothing of this.
struct Room {
    worker: usize,
    tx: broadcast::Sender<String>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    nicks: HashMap<IpAddr, String>,
    history: VecDeque<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> io::Result<()> {
    // The RFC 6455 example handshake, as a self-check of sha1 and base64.
    let sample = accept_key("dGhlIHNhbXBsZSBub25jZQ==");
    assert_eq!(
        sample, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
        "SHA-1/base64 self-check"
    );
    let mut listener = recluster::worker::Listener::from_env()?;
    recluster::worker::ready()?;
    let room = Arc::new(Room {
        worker: recluster::worker::id(),
        tx: broadcast::channel(256).0,
        state: Mutex::default(),
    });
    let mut tasks = tokio::task::JoinSet::new();
    while let Some((stream, peer)) = listener.accept().await? {
        let (room, stop) = (room.clone(), listener.shutdown());
        tasks.spawn(serve(stream, peer.ip().to_canonical(), room, stop));
        while tasks.try_join_next().is_some() {}
    }
    // Stop: every open websocket gets a close frame (see `serve`); wait for them.
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// How a websocket ends: the client closed (echo its close), or we close with a code.
enum End {
    Peer(Vec<u8>),
    Us(u16),
}

async fn serve(mut s: TcpStream, ip: IpAddr, room: Arc<Room>, stop: impl Future<Output = ()>) {
    let handshake = tokio::time::timeout(Duration::from_secs(10), handshake(&mut s));
    let Ok(Ok(Some(mut buf))) = handshake.await else {
        return;
    };
    let mut rx = room.tx.subscribe(); // before the greeting: nothing said after it is missed
    let greeting = {
        let state = room.state.lock().unwrap();
        let hello = match state.nicks.get(&ip) {
            Some(nick) => format!("welcome back {nick} (worker {})", room.worker),
            None => format!("hello stranger (worker {})", room.worker),
        };
        let mut out = frame(0x1, hello.as_bytes());
        for line in &state.history {
            out.extend(frame(0x1, line.as_bytes()));
        }
        out
    };
    if s.write_all(&greeting).await.is_err() {
        return;
    }
    tokio::pin!(stop);
    let (mut chunk, mut partial) = ([0u8; 4096], None::<Vec<u8>>);
    let end = 'conn: loop {
        tokio::select! {
            _ = &mut stop => break End::Us(1001),
            line = rx.recv() => match line {
                Ok(line) => {
                    if s.write_all(&frame(0x1, line.as_bytes())).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {} // a slow reader skips
                Err(broadcast::error::RecvError::Closed) => break End::Us(1001),
            },
            n = s.read(&mut chunk) => {
                match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                loop {
                    let f = match parse_frame(&mut buf) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(code) => break 'conn End::Us(code),
                    };
                    let reply = match on_frame(f, &mut partial, ip, &room) {
                        Ok(reply) => reply,
                        Err(end) => break 'conn end,
                    };
                    if let Some(r) = reply {
                        if s.write_all(&r).await.is_err() {
                            return;
                        }
                    }
                }
            }
        }
    };
    match end {
        End::Peer(payload) => {
            let _ = s
                .write_all(&frame(0x8, &payload[..payload.len().min(2)]))
                .await;
        }
        End::Us(code) => {
            // Say why, then give the client a moment to answer with its own close.
            if s.write_all(&frame(0x8, &code.to_be_bytes())).await.is_err() {
                return;
            }
            let closed = async {
                while !matches!(
                    parse_frame(&mut buf),
                    Ok(Some(Frame { opcode: 0x8, .. })) | Err(_)
                ) {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
            };
            let _ = tokio::time::timeout(Duration::from_secs(2), closed).await;
        }
    }
}

/// Handles one client frame; `Ok(Some(bytes))` is a direct reply to this client.
fn on_frame(
    f: Frame,
    partial: &mut Option<Vec<u8>>,
    ip: IpAddr,
    room: &Room,
) -> Result<Option<Vec<u8>>, End> {
    match f.opcode {
        0x8 => return Err(End::Peer(f.payload)),
        0x9 => return Ok(Some(frame(0xA, &f.payload))),
        0xA => return Ok(None),
        0x0 | 0x1 if (f.opcode == 0x1) == partial.is_some() => return Err(End::Us(1002)),
        0x0 | 0x1 => {}
        _ => return Err(End::Us(1003)), // binary, or reserved opcodes
    }
    let mut data = partial.take().unwrap_or_default();
    data.extend_from_slice(&f.payload);
    if data.len() > MAX_MESSAGE {
        return Err(End::Us(1009));
    }
    if !f.fin {
        *partial = Some(data);
        return Ok(None);
    }
    let text = String::from_utf8(data).map_err(|_| End::Us(1007))?;
    let mut state = room.state.lock().unwrap();
    if let Some(nick) = text.strip_prefix("/nick ") {
        let nick: String = nick.trim().chars().take(32).collect();
        if nick.is_empty() {
            return Ok(Some(frame(0x1, b"usage: /nick NAME")));
        }
        let reply = format!("you are {nick} (worker {})", room.worker);
        state.nicks.insert(ip, nick);
        return Ok(Some(frame(0x1, reply.as_bytes())));
    }
    let line = match state.nicks.get(&ip) {
        Some(nick) => format!("{nick}: {text}"),
        None => format!("stranger@{ip}: {text}"),
    };
    if state.history.len() == HISTORY {
        state.history.pop_front();
    }
    state.history.push_back(line.clone());
    let _ = room.tx.send(line); // every connection of this worker, the sender included
    Ok(None)
}

/// Reads the HTTP upgrade request and answers it. `Some(bytes read past the request)`
/// once the connection is a websocket; `None` if it was not an upgrade (answered 426).
async fn handshake(s: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 1024];
        match s.read(&mut chunk).await? {
            0 => return Ok(None),
            n if buf.len() + n > MAX_HEAD => return Ok(None),
            n => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    let upgrade = header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let (true, Some(key)) = (upgrade, header("sec-websocket-key")) else {
        let body = "a websocket chat: new WebSocket('ws://host:port')\n";
        let reply = format!(
            "HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nConnection: close\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(reply.as_bytes()).await?;
        return Ok(None);
    };
    let reply = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Accept: {}\r\n\r\n",
        accept_key(&key)
    );
    s.write_all(reply.as_bytes()).await?;
    Ok(Some(buf.split_off(end)))
}

struct Frame {
    fin: bool,
    opcode: u8,
    payload: Vec<u8>,
}

/// Takes one complete client frame off the front of `buf`; `Err(close code)` on a
/// protocol violation.
fn parse_frame(buf: &mut Vec<u8>) -> Result<Option<Frame>, u16> {
    let [b0, b1, ..] = buf[..] else {
        return Ok(None);
    };
    if b0 & 0x70 != 0 || b1 & 0x80 == 0 {
        return Err(1002); // reserved bits (no extensions), or an unmasked client frame
    }
    let (len, at) = match b1 & 0x7f {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
        127 if buf.len() >= 10 => (u64::from_be_bytes(buf[2..10].try_into().unwrap()), 10),
        126 | 127 => return Ok(None),
        n => (n as u64, 2),
    };
    let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
    if opcode >= 0x8 && (!fin || len > 125) {
        return Err(1002); // control frames are short and never fragmented
    }
    if len > MAX_MESSAGE as u64 {
        return Err(1009);
    }
    let len = len as usize;
    if buf.len() < at + 4 + len {
        return Ok(None);
    }
    let mask: [u8; 4] = buf[at..at + 4].try_into().unwrap();
    let body = &buf[at + 4..at + 4 + len];
    let payload = body
        .iter()
        .zip(mask.iter().cycle())
        .map(|(b, m)| b ^ m)
        .collect();
    buf.drain(..at + 4 + len);
    Ok(Some(Frame {
        fin,
        opcode,
        payload,
    }))
}

/// One unmasked, unfragmented server frame.
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    match payload.len() {
        n if n < 126 => f.push(n as u8),
        n if n <= 0xffff => {
            f.push(126);
            f.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            f.push(127);
            f.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// `Sec-WebSocket-Accept` for a `Sec-WebSocket-Key`.
fn accept_key(key: &str) -> String {
    base64(&sha1(format!("{key}{WS_GUID}").as_bytes()))
}

fn sha1(data: &[u8]) -> [u8; 20] {
    let mut h: [u32; 5] = [0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0];
    let mut msg = data.to_vec();
    msg.push(0x80);
    while msg.len() % 64 != 56 {
        msg.push(0);
    }
    msg.extend_from_slice(&(data.len() as u64 * 8).to_be_bytes());
    for block in msg.chunks_exact(64) {
        let mut w = [0u32; 80];
        for (w, b) in w.iter_mut().zip(block.chunks_exact(4)) {
            *w = u32::from_be_bytes(b.try_into().unwrap());
        }
        for i in 16..80 {
            w[i] = (w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16]).rotate_left(1);
        }
        let [mut a, mut b, mut c, mut d, mut e] = h;
        for (i, wi) in w.iter().enumerate() {
            let (f, k) = match i {
                0..=19 => ((b & c) | (!b & d), 0x5A827999),
                20..=39 => (b ^ c ^ d, 0x6ED9EBA1),
                40..=59 => ((b & c) | (b & d) | (c & d), 0x8F1BBCDC),
                _ => (b ^ c ^ d, 0xCA62C1D6),
            };
            let t = a
                .rotate_left(5)
                .wrapping_add(f)
                .wrapping_add(e)
                .wrapping_add(k)
                .wrapping_add(*wi);
            (e, d, c, b, a) = (d, c, b.rotate_left(30), a, t);
        }
        for (h, x) in h.iter_mut().zip([a, b, c, d, e]) {
            *h = h.wrapping_add(x);
        }
    }
    let mut out = [0u8; 20];
    for (o, h) in out.chunks_exact_mut(4).zip(h) {
        o.copy_from_slice(&h.to_be_bytes());
    }
    out
}

fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
        for i in 0..4 {
            let c = if i <= chunk.len() {
                ABC[(n >> (18 - 6 * i) & 63) as usize]
            } else {
                b'='
            };
            out.push(c as char);
        }
    }
    out
}
