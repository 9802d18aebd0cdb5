//! `--proxy-protocol`: a real master behind a (simulated) proxy. The client named by a
//! v1 or v2 header is the worker's peer and what `sticky` hashes; the worker reads
//! exactly what follows the header; bad headers and untrusted peers are closed and
//! counted; and silent senders never delay anyone else.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use recluster::balance::slot_for;
use recluster::proxy;

/// A master in `sticky` with `workers` echo workers and metrics on, and `extra`.
fn cluster(workers: usize, extra: &[&str]) -> Cluster {
    Cluster::new()
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
}

/// `cluster` started and ready: the master, its balanced address and its metrics'.
fn started(cluster: Cluster, workers: usize) -> (Master, SocketAddr, SocketAddr) {
    let m = cluster.spawn();
    m.wait_cluster_ready(workers);
    let metrics: SocketAddr = m.metrics_addr();
    let addr = m.addr();
    (m, addr, metrics)
}

/// A master in `sticky` with `workers` echo workers, PROXY headers and metrics on.
fn master(workers: usize, extra: &[&str]) -> (Master, SocketAddr, SocketAddr) {
    started(cluster(workers, extra), workers)
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
    // Logged too (a warning, at most once a second).
    let line = m.wait_event("proxy_header_error", DEADLINE);
    assert!(line.field("reason").is_some(), "{}", line.raw);
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
    // By the end the log has said every failure: a line each, or in a later line's
    // `more` (the last ones when the accept thread ends).
    m.signal(Signal::SIGTERM);
    assert!(m.expect_exit(DEADLINE).success());
    let lines = m.events("proxy_header_error");
    let said: u64 = lines
        .iter()
        .map(|l| {
            let more = l.field("more").and_then(|n| n.parse::<u64>().ok());
            u64::from(l.field("reason").is_some()) + more.unwrap_or(0)
        })
        .sum();
    assert_eq!(said, 4, "{lines:#?}");
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

/// `--via node`: `sticky` follows the header's client too, and the worker reads what
/// follows the header; Node's `remoteAddress` is the socket's own peer (from
/// `getpeername`, which the master cannot change), as README.md says.
#[test]
fn node_workers_get_the_claimed_clients_slot_and_their_own_remote_address() {
    let Some(node) = require("node") else {
        return;
    };
    let port = free_port();
    let m = Cluster::new()
        .workers(3)
        .args([
            "--balance",
            "sticky",
            "--via",
            "node",
            "--proxy-protocol",
            "v1",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .command([
            node.display().to_string(),
            manifest_dir()
                .join("tests/node/net_echo.js")
                .display()
                .to_string(),
        ])
        .env("PORT", port.to_string())
        .spawn();
    m.wait_cluster_ready(3);
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for claimed in ["10.1.2.3:1000", "10.0.0.1:2000", "203.0.113.7:3000"] {
        let client: SocketAddr = claimed.parse().unwrap();
        let text = exchange(addr, Some(Ipv4Addr::new(127, 0, 0, 4)), &v1(client, addr));
        let (line, rest) = text
            .split_once('\n')
            .unwrap_or_else(|| panic!("no reply: {text:?}"));
        let reply = Reply::parse(line).expect("a greeting");
        assert_eq!(reply.id, slot_for(client.ip(), 0..3).unwrap(), "{claimed}");
        assert!(reply.fields["remote"].ends_with("127.0.0.4"), "{line}");
        assert_eq!(rest, "hello");
    }
    drop(m);
}

/// `--proxy-protocol ADDR=VERSION`: only that listener reads headers; the others serve
/// clients as they come.
#[test]
fn a_header_is_read_only_on_the_listener_named() {
    let (a, b) = (free_port(), free_port());
    let (pa, pb) = (format!("127.0.0.1:{a}"), format!("127.0.0.1:{b}"));
    let m = Cluster::new()
        .workers(2)
        .args(["--balance", "sticky", "--listen", &pa, "--listen", &pb])
        .args(["--proxy-protocol", &format!("{pa}=v2")])
        .command([echo()])
        .spawn();
    m.wait_cluster_ready(2);
    let (pa, pb): (SocketAddr, SocketAddr) = (pa.parse().unwrap(), pb.parse().unwrap());
    let client: SocketAddr = "10.1.2.3:9".parse().unwrap();
    let text = exchange(pa, Some(Ipv4Addr::new(127, 0, 0, 7)), &v2(client, pa));
    assert!(
        text.starts_with("id=") && text.contains("peer=10.1.2.3\n"),
        "{text:?}"
    );
    let text = exchange(pb, Some(Ipv4Addr::new(127, 0, 0, 7)), b"");
    assert!(text.contains("peer=127.0.0.7\nhello"), "{text:?}");
    drop(m);
}

/// At the cap of headers awaited (a quarter of the master's descriptor limit per
/// accept thread: 100 at 400), the oldest awaited header is given up for the newest:
/// silent senders only push each other out, and a client with a header is served.
#[test]
fn at_the_cap_the_oldest_header_awaited_makes_room_and_clients_are_still_served() {
    let extra = [
        "--proxy-protocol",
        "v2",
        "--proxy-timeout",
        "20s",
        "--accept-threads",
        "1",
    ];
    let (m, addr, metrics) = started(cluster(1, &extra).nofile(400), 1);
    let errors = || counter(metrics, "recluster_proxy_header_errors_total");
    let cap = 100;
    let mut silent: Vec<TcpStream> = (0..cap)
        .map(|i| connect_from(addr, Some(source_ip(i))))
        .collect();
    assert_eq!(errors(), 0, "the cap is not reached yet");
    // One more: the oldest (the first, accepted first) makes room, long before the
    // 20 s deadline.
    let started = Instant::now();
    silent.push(connect_from(addr, Some(source_ip(cap))));
    assert!(
        poll_until(DEADLINE, || errors() == 1),
        "one given up: {}",
        errors()
    );
    silent[0]
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let r = silent[0].read(&mut [0u8; 1]);
    assert!(
        matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the oldest is closed: {r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "long before the deadline"
    );
    // A client with a header is served while the silent ones hold the cap.
    let claimed: SocketAddr = "10.9.9.9:4000".parse().unwrap();
    let text = exchange(addr, None, &v2(claimed, addr));
    assert!(
        text.contains("10.9.9.9"),
        "served with the claimed peer: {text:?}"
    );
    assert!(errors() <= 2, "{}", errors());
    drop(silent);
    drop(m);
}

/// Settings that cannot work are refused at start (exit 2) with a message that says why.
#[test]
fn impossible_proxy_settings_are_refused_at_start() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--balance", "shared", "--proxy-protocol", "v2"],
            "--proxy-protocol needs the master to accept",
        ),
        (
            &["--via", "socket", "--proxy-protocol", "v2"],
            "--proxy-protocol needs the master to accept",
        ),
        (
            &["--proxy-protocol", "127.0.0.1:1=v2"],
            "is not one of the --listen addresses",
        ),
        (&["--proxy-protocol", "v3"], "--proxy-protocol"),
    ];
    for (args, says) in cases {
        let (exit, stderr) = Cluster::new()
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .args(["--", "true"])
            .raw()
            .run(DEADLINE)
            .expect("exits");
        assert_eq!(exit.code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let (exit, stderr) = Cluster::new()
        .args(["--listen", "127.0.0.1:0", "--trusted-proxy", "10.0.0.0/8"])
        .args(["--", "true"])
        .raw()
        .run(DEADLINE)
        .expect("exits");
    assert_eq!(exit.code, Some(2), "--trusted-proxy alone: {stderr}");
}

/// A header that arrives in pieces, after the master has accepted the connection, is
/// awaited off the accept path and still consumed exactly.
#[test]
fn a_header_in_pieces_is_awaited_and_consumed_exactly() {
    let (m, addr, metrics) = master(2, &["--proxy-protocol", "any"]);
    let client: SocketAddr = "[2001:db8::42]:7".parse().unwrap();
    for header in [v1(client, addr), v2(client, addr)] {
        let t0 = Instant::now();
        let accepted = counter(metrics, "recluster_connections_accepted_total");
        let mut s = connect_from(addr, None);
        s.write_all(&header[..3]).unwrap();
        // Accepted, and its header is waited for: send the rest then.
        assert!(poll_until(DEADLINE, || counter(
            metrics,
            "recluster_connections_accepted_total"
        ) > accepted));
        s.write_all(&header[3..header.len() - 1]).unwrap();
        s.write_all(&header[header.len() - 1..]).unwrap();
        s.write_all(b"hello").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        assert!(text.contains("peer=2001:db8::42\nhello"), "{text:?}");
        let took = t0.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "served as the header completed, not at the 3 s deadline: {took:?}"
        );
    }
    assert_eq!(counter(metrics, "recluster_proxy_header_errors_total"), 0);
    drop(m);
}
