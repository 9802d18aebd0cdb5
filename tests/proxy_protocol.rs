//! `--proxy-protocol`: a real master behind a (simulated) proxy. The client named by a
//! v1 or v2 header is the worker's peer and what `sticky` hashes; the worker reads
//! exactly what follows the header; bad headers and untrusted peers are closed and
//! counted; and silent senders never delay anyone else.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use recluster::balance::slot_for;
use recluster::proxy;

/// A master in `sticky` with `workers` echo workers, PROXY headers and metrics on.
fn master(workers: usize, extra: &[&str]) -> (Master, SocketAddr, SocketAddr) {
    let m = Cluster::new()
        .workers(workers)
        .args([
            "--balance",
            "sticky",
            "--via",
            "channel",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--metrics", "127.0.0.1:0"])
        .args(extra)
        .command([echo()])
        .spawn();
    m.wait_cluster_ready(workers);
    let metrics: SocketAddr = m
        .wait_event("metrics_listening", DEADLINE)
        .field("addr")
        .unwrap()
        .parse()
        .unwrap();
    let addr = m.addr();
    (m, addr, metrics)
}

/// The value of counter `name` at the metrics endpoint.
fn counter(metrics: SocketAddr, name: &str) -> u64 {
    let mut s = TcpStream::connect(metrics).expect("connect to the metrics endpoint");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// Connects from `src` (any when `None`), sends `header` then `hello`, half-closes, and
/// reads everything until EOF: the worker's greeting line and the echo, or nothing
/// when the master closed the connection.
fn exchange(addr: SocketAddr, src: Option<Ipv4Addr>, header: &[u8]) -> String {
    let mut s = connect_from(addr, src);
    let mut out = header.to_vec();
    out.extend_from_slice(b"hello");
    // The master may have closed it already (an untrusted peer): that is an answer too.
    let _ = s.write_all(&out);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn connect_from(addr: SocketAddr, src: Option<Ipv4Addr>) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    if let Some(ip) = src {
        sock.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
    }
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))
        .expect("connect");
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

fn v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = Vec::new();
    proxy::encode_v1(&mut h, src, dst);
    h
}

fn v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut h = Vec::new();
    // A TLV (PP2_TYPE_AUTHORITY) as HAProxy may send: skipped with the header.
    proxy::encode_v2(&mut h, src, dst, &[0x02, 0x00, 0x03, b'a', b'.', b'b']);
    h
}

#[test]
fn the_client_a_header_names_is_the_peer_and_sticky_follows_it() {
    let (m, addr, metrics) = master(4, &["--proxy-protocol", "any"]);
    let claimed: Vec<SocketAddr> = [
        "10.1.2.3:5000",
        "10.0.0.1:1",
        "192.168.1.20:443",
        "203.0.113.7:65535",
        "[2001:db8::1]:80",
        "[2001:db8::7]:8080",
    ]
    .iter()
    .map(|a| a.parse().unwrap())
    .collect();
    for &client in &claimed {
        let want = slot_for(client.ip(), 0..4).unwrap();
        for (version, header) in [("v1", v1(client, addr)), ("v2", v2(client, addr))] {
            // Three times each, from three source addresses: the claim alone decides.
            for src in 1..=3 {
                let text = exchange(addr, Some(Ipv4Addr::new(127, 0, 0, src)), &header);
                let (line, rest) = text
                    .split_once('\n')
                    .unwrap_or_else(|| panic!("{version} {client}: no reply in {text:?}"));
                let reply = Reply::parse(line).expect("a greeting");
                assert_eq!(
                    reply.fields["peer"],
                    client.ip().to_string(),
                    "{version}: the worker's peer"
                );
                assert_eq!(
                    reply.id, want,
                    "{version} {client}: the slot slot_for predicts"
                );
                assert_eq!(
                    rest, "hello",
                    "the worker reads exactly what follows the header"
                );
            }
        }
    }
    // A proxy's health check (LOCAL) and v1 UNKNOWN: the connection's own peer.
    let mut local = Vec::new();
    proxy::encode_v2_local(&mut local);
    for header in [local, b"PROXY UNKNOWN\r\n".to_vec()] {
        let text = exchange(addr, Some(Ipv4Addr::new(127, 0, 0, 9)), &header);
        let reply = Reply::parse(text.lines().next().unwrap_or("")).expect("a greeting");
        assert_eq!(reply.fields["peer"], "127.0.0.9");
        assert!(text.ends_with("\nhello"), "{text:?}");
    }
    assert_eq!(counter(metrics, "recluster_proxy_header_errors_total"), 0);
    drop(m);
}

#[test]
fn bad_headers_are_closed_and_counted_and_untrusted_peers_refused() {
    let (m, addr, metrics) = master(
        2,
        &["--proxy-protocol", "v2", "--trusted-proxy", "127.0.0.0/30"],
    );
    let client: SocketAddr = "10.1.2.3:4000".parse().unwrap();
    let bad: [Vec<u8>; 4] = [
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        // v1 where only v2 is accepted.
        v1(client, addr),
        // A v2 header cut short, then EOF.
        v2(client, addr)[..20].to_vec(),
        // A v2 header claiming more than the 4 KiB bound.
        {
            let mut h = proxy::V2_SIGNATURE.to_vec();
            h.extend_from_slice(&[0x21, 0x11, 0x20, 0x00]);
            h
        },
    ];
    for header in &bad {
        let text = exchange(addr, Some(Ipv4Addr::new(127, 0, 0, 1)), header);
        assert_eq!(text, "", "closed without a reply");
    }
    assert!(
        poll_until(DEADLINE, || counter(
            metrics,
            "recluster_proxy_header_errors_total"
        ) == 4),
        "4 header errors counted"
    );
    // 127.0.0.5 is outside 127.0.0.0/30: closed even with a valid header.
    let text = exchange(addr, Some(Ipv4Addr::new(127, 0, 0, 5)), &v2(client, addr));
    assert_eq!(text, "", "an untrusted peer gets nothing");
    assert!(poll_until(DEADLINE, || counter(
        metrics,
        "recluster_proxy_untrusted_total"
    ) == 1));
    // A trusted one still gets its client's worker.
    let text = exchange(addr, Some(Ipv4Addr::new(127, 0, 0, 2)), &v2(client, addr));
    assert!(text.contains("peer=10.1.2.3"), "{text:?}");
    drop(m);
}

#[test]
fn silent_senders_delay_no_one_and_are_closed_at_the_deadline() {
    let timeout = Duration::from_secs(3);
    let (m, addr, metrics) = master(2, &["--proxy-protocol", "v2", "--proxy-timeout", "3s"]);
    let client: SocketAddr = "10.9.9.9:1234".parse().unwrap();
    let opened = Instant::now();
    // 200 connections that send nothing, and 20 that send half a header.
    let mut silent: Vec<TcpStream> = (0..220)
        .map(|i| {
            let mut s = connect_from(addr, Some(source_ip(i)));
            if i >= 200 {
                s.write_all(&v2(client, addr)[..10]).unwrap();
            }
            s
        })
        .collect();
    // A well-behaved client is served at once, while all of them are still open.
    let started = Instant::now();
    let text = exchange(addr, None, &v2(client, addr));
    let took = started.elapsed();
    assert!(text.contains("peer=10.9.9.9"), "{text:?}");
    assert!(
        opened.elapsed() < timeout,
        "the slow ones were still within their deadline when the client was served"
    );
    assert!(took < Duration::from_secs(1), "served in {took:?}");
    for s in &silent {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let r = (&*s).read(&mut b);
        assert!(
            matches!(&r, Err(e) if e.kind() == ErrorKind::WouldBlock),
            "a slow sender is still open (no EOF, no reset): {r:?}"
        );
    }
    // At the deadline each one is closed, and counted.
    for s in &mut silent {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut b = [0u8; 1];
        let r = s.read(&mut b);
        assert!(
            matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
            "closed by the master: {r:?}"
        );
    }
    let closed_after = opened.elapsed();
    assert!(
        closed_after >= timeout - Duration::from_millis(100),
        "not before the deadline: {closed_after:?}"
    );
    assert!(poll_until(DEADLINE, || counter(
        metrics,
        "recluster_proxy_header_errors_total"
    ) == 220));
    // And the master still serves.
    let text = exchange(addr, None, &v2(client, addr));
    assert!(text.contains("peer=10.9.9.9"), "{text:?}");
    drop(m);
}
