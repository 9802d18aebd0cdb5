//! End to end: `--via socket`, where the master never accepts. For each listen address
//! it binds one socket per slot in one SO_REUSEPORT group, slot `k`'s worker inherits
//! only slot `k`'s sockets at fds 3.. (socket activation), and a classic BPF program the
//! master attaches to the group makes the kernel pick the slot of each connection.
//!
//! What these tests prove, with the real binary, real workers and real TCP:
//!
//! * `sticky`: every client address lands on `recluster::balance::slot_for(ip, ready)`
//!   (200 of 200 IPv4 sources; `::1` over IPv6), the spread is even, a slot whose
//!   worker was killed loses its clients to their second choice until its replacement
//!   is ready, and the program is attached once per change of the ready set, not per
//!   connection nor per reload;
//! * ten reloads under load from 200 addresses fail no connection and move no address
//!   to another worker id, and attach no new program;
//! * unmodified servers work unchanged: the fd-3 test worker, a Python
//!   `socket.fromfd(3, …)` loop and a Node `http` server `listen({fd: 3})`;
//! * `rr`: the kernel's own flow hash spreads one source's connections over every slot;
//! * `--balance shared --via socket` is refused (exit 2), and with two listen addresses
//!   each worker gets exactly its own slot's two sockets (`LISTEN_FDS=2`, distinct
//!   socket inodes per slot, all held by the master).
//!
//! Every wait is for a log event or a reply, with a deadline.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use recluster::balance::slot_for;

/// `recluster --balance <balance> --via socket --workers <n> --listen 127.0.0.1:0`.
fn socket_cluster(balance: &str, workers: usize) -> Cluster {
    Cluster::new().workers(workers).args([
        "--balance",
        balance,
        "--via",
        "socket",
        "--listen",
        "127.0.0.1:0",
    ])
}

/// Waits, from log line `from`, for the steering program over exactly `ready` to be
/// attached to each of `groups` listen addresses (one line per address).
fn wait_steered(m: &Master, from: usize, ready: &[usize], groups: usize) -> Vec<LogLine> {
    let pattern = format!("steering_attached ready={ready:?}");
    let mut lines = Vec::new();
    let mut at = from;
    for _ in 0..groups {
        let line = m.wait_event_after(at, &pattern, DEADLINE);
        at = line.index + 1;
        lines.push(line);
    }
    lines
}

/// One request from `src` (the kernel's choice when `None`); panics if it fails.
fn ask(addr: SocketAddr, src: Option<Ipv4Addr>) -> Reply {
    request_from(addr, src, false, Duration::from_secs(10))
        .unwrap_or_else(|f| panic!("request to {addr} from {src:?}: {f:?}"))
}

/// The slot `sticky` gives `ip` among `ready`.
fn predicted(ip: Ipv4Addr, ready: &[usize]) -> usize {
    slot_for(IpAddr::V4(ip), ready.iter().copied()).expect("some slot is ready")
}

/// 200 client addresses: 127.0.0.1..=100 and 100 spread over 127.1.1.0/24..127.1.4.0/24.
fn sources() -> Vec<Ipv4Addr> {
    let low = (1..=100).map(|i| Ipv4Addr::new(127, 0, 0, i));
    let high = (0..100u8).map(|i| Ipv4Addr::new(127, 1, 1 + i / 25, 1 + (i % 25) * 10));
    low.chain(high).collect()
}

/// What one connection from each address saw, against `slot_for(ip, ready)`.
struct Mapping {
    /// Addresses served by their predicted slot's current worker (`pids`).
    agree: usize,
    /// The others: `ip: got id (pid), wanted slot`.
    wrong: Vec<String>,
    /// Addresses per serving worker id.
    share: BTreeMap<usize, usize>,
}

fn map_sources(
    addr: SocketAddr,
    ips: &[Ipv4Addr],
    ready: &[usize],
    pids: &BTreeMap<usize, u32>,
) -> Mapping {
    let mut m = Mapping {
        agree: 0,
        wrong: Vec::new(),
        share: BTreeMap::new(),
    };
    for &ip in ips {
        let r = ask(addr, Some(ip));
        let want = predicted(ip, ready);
        *m.share.entry(r.id).or_default() += 1;
        if r.id == want && pids.get(&want) == Some(&r.pid) {
            m.agree += 1;
        } else {
            m.wrong.push(format!(
                "{ip}: id {} (pid {}), want slot {want} (pid {:?})",
                r.id,
                r.pid,
                pids.get(&want)
            ));
        }
    }
    m
}

/// The target of `/proc/<pid>/fd/<fd>` (`socket:[inode]`).
fn fd_link(pid: u32, fd: i32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/{fd}"))
        .unwrap_or_else(|e| panic!("readlink /proc/{pid}/fd/{fd}: {e}"))
        .display()
        .to_string()
}

#[test]
fn sticky_sends_200_addresses_to_slot_for_and_a_dead_slots_clients_to_their_second_choice() {
    // A long respawn delay keeps slot 2 down while its clients are checked.
    let m = socket_cluster("sticky", 4)
        .args(["--respawn", "5s"])
        .spawn();
    let addr = m.addr();
    let mut pids = m.wait_cluster_ready(4);
    wait_steered(&m, 0, &[0, 1, 2, 3], 1);
    let ips = sources();
    assert_eq!(ips.iter().collect::<BTreeSet<_>>().len(), 200);

    let all = map_sources(addr, &ips, &[0, 1, 2, 3], &pids);
    println!(
        "sticky --via socket, 4 ready: {} of {} addresses on slot_for(ip, 0..4); addresses per worker {:?}",
        all.agree,
        ips.len(),
        all.share
    );
    assert_eq!(all.agree, 200, "mismatches: {:#?}", all.wrong);
    assert_eq!(all.share.len(), 4, "{:?}", all.share);
    for (id, n) in &all.share {
        assert!(
            (35..=65).contains(n),
            "worker {id} owns {n} of 200 addresses (mean 50, ±30 %): {:?}",
            all.share
        );
    }

    // Slot 2's worker dies: its clients go to their second choice, nobody else moves.
    let from = m.mark();
    let victim = pids[&2];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    m.wait_event_after(
        from,
        &format!("worker_exited slot=2 pid={victim}"),
        DEADLINE,
    );
    wait_steered(&m, from, &[0, 1, 3], 1);
    let down = map_sources(addr, &ips, &[0, 1, 3], &pids);
    let early_respawn = m.try_wait_event_after(from, "worker_ready slot=2", Duration::ZERO);
    assert!(
        early_respawn.is_none(),
        "slot 2 came back during the check (respawn 5s): the check proved nothing"
    );
    let moved = ips
        .iter()
        .filter(|&&ip| predicted(ip, &[0, 1, 2, 3]) != predicted(ip, &[0, 1, 3]))
        .count();
    let of_slot_2 = all.share[&2];
    println!(
        "slot 2 (pid {victim}) killed: {} of {} addresses on slot_for(ip, [0, 1, 3]); {moved} moved \
         (slot 2 had {of_slot_2}); addresses per worker {:?}",
        down.agree,
        ips.len(),
        down.share
    );
    assert_eq!(down.agree, 200, "mismatches: {:#?}", down.wrong);
    assert_eq!(moved, of_slot_2, "only slot 2's clients move");
    assert!(!down.share.contains_key(&2));

    // Its replacement is ready: every address is back on its first choice.
    let back = m.wait_event_after(from, "worker_ready slot=2", DEADLINE);
    pids.insert(2, back.pid());
    // (Logged just before `worker_ready`: looked for from the kill on.)
    wait_steered(&m, from, &[0, 1, 2, 3], 1);
    let again = map_sources(addr, &ips, &[0, 1, 2, 3], &pids);
    println!(
        "slot 2 back (pid {}): {} of {} addresses on slot_for(ip, 0..4)",
        back.pid(),
        again.agree,
        ips.len()
    );
    assert_eq!(again.agree, 200, "mismatches: {:#?}", again.wrong);
    assert_eq!(again.share, all.share);

    // One program per change of the ready set: 4 at start, the kill, the return;
    // not one per connection (600 were made).
    let attached = m.events("steering_attached");
    let sets: Vec<String> = attached
        .iter()
        .map(|l| l.field("ready").unwrap_or("?").to_string())
        .collect();
    println!(
        "steering_attached: {} lines for 600 connections, ready sets {sets:?}",
        attached.len()
    );
    assert_eq!(attached.len(), 6, "{sets:?}\n{}", m.stderr_text());
    let numbers: Vec<u64> = attached.iter().map(|l| l.num("attached")).collect();
    assert_eq!(numbers, [1, 2, 3, 4, 5, 6]);
    assert_eq!(&sets[3..], ["[0, 1, 2, 3]", "[0, 1, 3]", "[0, 1, 2, 3]"]);
    for (k, set) in sets[..4].iter().enumerate() {
        assert_eq!(
            set.split(',').count(),
            k + 1,
            "start: one slot more each time: {sets:?}"
        );
    }
}

#[test]
fn sticky_ten_reloads_under_load_from_200_addresses_fail_nothing_and_move_nobody() {
    let m = socket_cluster("sticky", 4).spawn();
    let addr = m.addr();
    m.wait_cluster_ready(4);
    wait_steered(&m, 0, &[0, 1, 2, 3], 1);
    let attached_before = m.events("steering_attached").len();
    let load = Load::start_with(
        addr,
        32,
        LoadOptions {
            sources: 200,
            half_close: false,
        },
    );
    load.wait_more_ok(500, DEADLINE);
    for generation in 2..=11 {
        m.reload_to(generation);
        load.wait_more_ok(200, DEADLINE);
    }
    let totals = load.stop();
    // Every retired worker has exited: a late change of the ready set would show now.
    let retired: Vec<u32> = m
        .events("worker_retiring")
        .iter()
        .map(LogLine::pid)
        .collect();
    for pid in &retired {
        m.wait_event(&format!("worker_exited pid={pid}"), DEADLINE);
    }
    let split: Vec<_> = totals
        .by_source
        .iter()
        .filter(|(_, ids)| ids.len() != 1)
        .collect();
    let misplaced: Vec<_> = totals
        .by_source
        .iter()
        .filter(|(ip, ids)| ids.iter().any(|&id| id != predicted(**ip, &[0, 1, 2, 3])))
        .collect();
    let attached = m.events("steering_attached");
    println!(
        "sticky --via socket, 10 reloads under 32 clients: {} ok, {} failed {:?}; {} addresses, \
         {} on more than one worker id, {} off their slot_for; generations served {:?}; {} worker \
         pids, {} retired; steering_attached {} (before the reloads {attached_before})",
        totals.ok,
        totals.failed(),
        totals.failures,
        totals.by_source.len(),
        split.len(),
        misplaced.len(),
        totals.by_gen,
        totals.pids.len(),
        retired.len(),
        attached.len()
    );
    assert_eq!(
        totals.failed(),
        0,
        "failed connections {:?}, first ones {:?}",
        totals.failures,
        totals.first_failures
    );
    assert_eq!(totals.by_source.len(), 200);
    assert!(
        split.is_empty(),
        "addresses served by several ids: {split:?}"
    );
    assert!(
        misplaced.is_empty(),
        "addresses off their slot: {misplaced:?}"
    );
    assert_eq!(
        totals.by_gen.keys().copied().collect::<Vec<_>>(),
        (1..=11).collect::<Vec<u32>>(),
        "every generation served"
    );
    assert_eq!(retired.len(), 40, "10 reloads retire 4 workers each");
    assert_eq!(attached_before, 4);
    assert_eq!(
        attached.len(),
        4,
        "a reload changes no ready set: {:#?}",
        attached.iter().map(|l| &l.raw).collect::<Vec<_>>()
    );
}

/// A Python server as people write it for socket activation: `socket.fromfd(3, …)`.
const PYTHON_FD3: &str = r#"
import os, socket
s = socket.fromfd(3, socket.AF_INET, socket.SOCK_STREAM)
while True:
    c, _ = s.accept()
    c.sendall(f"id={os.environ['WORKER_ID']} pid={os.getpid()} gen={os.environ['RECLUSTER_GENERATION']} python=1\n".encode())
    c.close()
"#;

/// An unmodified Node `http` server on the inherited socket.
const NODE_FD3: &str = r#"
require('http').createServer((req, res) => {
  res.end(`id=${process.env.WORKER_ID} pid=${process.pid} gen=${process.env.RECLUSTER_GENERATION} node=1\n`);
}).listen({ fd: 3 });
"#;

/// `GET /` over HTTP/1.0 from `src`: the reply line in the body.
fn http_get_from(addr: SocketAddr, src: Ipv4Addr) -> Result<Reply, String> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).map_err(|e| e.to_string())?;
    sock.bind(&SocketAddr::from((src, 0)).into())
        .map_err(|e| format!("bind: {e}"))?;
    sock.connect_timeout(&addr.into(), Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    let mut stream: TcpStream = sock.into();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.0\r\nHost: socket-mode\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut text = String::new();
    stream
        .read_to_string(&mut text)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP response: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("not 200: {head:?}"));
    }
    Reply::parse(body.lines().next().unwrap_or("")).ok_or_else(|| format!("body {body:?}"))
}

/// Starts `command` under sticky `--via socket` with `workers` and checks that
/// 127.0.0.1..=24 each land on their predicted slot, served by that slot's worker,
/// with the reply field `marker=1`.
fn unmodified_server_lands_on_predicted_slots(
    what: &str,
    workers: usize,
    command: &[&str],
    marker: &str,
    get: impl Fn(SocketAddr, Ipv4Addr) -> Result<Reply, String>,
) {
    let m = socket_cluster("sticky", workers).command(command).spawn();
    let addr = m.addr();
    let pids = m.wait_cluster_ready(workers);
    let ready: Vec<usize> = (0..workers).collect();
    wait_steered(&m, 0, &ready, 1);
    let ips: Vec<Ipv4Addr> = (1..=24).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let mut agree = 0;
    let mut per_id = BTreeMap::<usize, usize>::new();
    for &ip in &ips {
        let r = get(addr, ip).unwrap_or_else(|e| panic!("{what}: from {ip}: {e}"));
        assert_eq!(
            r.fields.get(marker).map(String::as_str),
            Some("1"),
            "{}",
            r.raw
        );
        let want = predicted(ip, &ready);
        assert_eq!(
            r.id, want,
            "{what}: {ip} served by the wrong slot: {}",
            r.raw
        );
        assert_eq!(r.pid, pids[&want], "{what}: {ip}: not slot {want}'s worker");
        agree += 1;
        *per_id.entry(r.id).or_default() += 1;
    }
    println!(
        "{what}, sticky --via socket, {workers} workers: {agree} of {} addresses on slot_for; per worker {per_id:?}",
        ips.len()
    );
    assert_eq!(per_id.len(), workers, "every worker served: {per_id:?}");
}

#[test]
fn an_unmodified_python_fromfd_server_lands_each_address_on_its_slot() {
    let Some(python) = require("python3") else {
        return;
    };
    let python = python.display().to_string();
    unmodified_server_lands_on_predicted_slots(
        "python socket.fromfd(3)",
        3,
        &[&python, "-c", PYTHON_FD3],
        "python",
        |addr, ip| request_from(addr, Some(ip), false, Duration::from_secs(10)).map_err(|f| f.0),
    );
}

#[test]
fn an_unmodified_node_http_server_on_fd_3_lands_each_address_on_its_slot() {
    let Some(node) = require("node") else {
        return;
    };
    let node = node.display().to_string();
    unmodified_server_lands_on_predicted_slots(
        "node http listen({fd: 3})",
        2,
        &[&node, "-e", NODE_FD3],
        "node",
        http_get_from,
    );
}

#[test]
fn rr_spreads_one_source_over_all_four_workers_by_the_kernels_flow_hash() {
    let m = socket_cluster("rr", 4).spawn();
    let addr = m.addr();
    let pids = m.wait_cluster_ready(4);
    let last = wait_steered(&m, 0, &[0, 1, 2, 3], 1).remove(0);
    // Every slot ready: the program only hands the choice back to the kernel.
    assert_eq!(last.num("instructions"), 1, "{}", last.raw);
    let src = Ipv4Addr::new(127, 0, 0, 7);
    let mut per_id = BTreeMap::<usize, u32>::new();
    for _ in 0..400 {
        let r = ask(addr, Some(src));
        assert_eq!(r.pid, pids[&r.id], "{}", r.raw);
        *per_id.entry(r.id).or_default() += 1;
    }
    println!("rr --via socket, 400 sequential connections from {src}: per worker {per_id:?}");
    assert_eq!(per_id.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 3]);
    for (id, n) in &per_id {
        assert!(*n >= 40, "worker {id} got {n} of 400: {per_id:?}");
    }
}

#[test]
fn sticky_over_ipv6_sends_loopback_to_slot_for_over_the_ready_slots() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        skip("no IPv6 loopback here");
        return;
    }
    let m = Cluster::new()
        .workers(3)
        .args([
            "--balance",
            "sticky",
            "--via",
            "socket",
            "--listen",
            "[::1]:0",
            "--respawn",
            "5s",
        ])
        .spawn();
    let addr = m.addr();
    assert!(addr.is_ipv6(), "{addr}");
    let pids = m.wait_cluster_ready(3);
    wait_steered(&m, 0, &[0, 1, 2], 1);
    let client: IpAddr = "::1".parse().unwrap();
    let served = |ready: &[usize]| -> (usize, BTreeMap<usize, u32>) {
        let want = slot_for(client, ready.iter().copied()).unwrap();
        let mut per_id = BTreeMap::new();
        for _ in 0..20 {
            // From ::1, the kernel's source address for [::1].
            let r = ask(addr, None);
            *per_id.entry(r.id).or_default() += 1;
            if r.id == want {
                assert_eq!(r.pid, pids[&want], "{}", r.raw);
            }
        }
        (want, per_id)
    };
    let (first, per_id) = served(&[0, 1, 2]);
    println!(
        "IPv6 sticky, ready [0, 1, 2]: ::1 wants {first}, 20 connections served by {per_id:?}"
    );
    assert_eq!(per_id, BTreeMap::from([(first, 20)]));

    // Without its slot, ::1 goes to its second choice.
    let from = m.mark();
    kill(Pid::from_raw(pids[&first] as i32), Signal::SIGKILL).unwrap();
    let rest: Vec<usize> = (0..3).filter(|&s| s != first).collect();
    wait_steered(&m, from, &rest, 1);
    let (second, per_id) = served(&rest);
    assert!(
        m.try_wait_event_after(from, &format!("worker_ready slot={first}"), Duration::ZERO)
            .is_none(),
        "slot {first} came back during the check"
    );
    println!(
        "IPv6 sticky, ready {rest:?}: ::1 wants {second}, 20 connections served by {per_id:?}"
    );
    assert_ne!(second, first);
    assert_eq!(per_id, BTreeMap::from([(second, 20)]));
}

#[test]
fn shared_with_via_socket_is_refused_and_each_slot_gets_its_own_sockets() {
    let (exit, stderr) = Cluster::new()
        .workers(2)
        .args([
            "--balance",
            "shared",
            "--via",
            "socket",
            "--listen",
            "127.0.0.1:0",
        ])
        .run(DEADLINE)
        .expect("the master exits");
    println!("--balance shared --via socket: {exit:?}, {}", stderr.trim());
    assert_eq!(exit.code, Some(2), "stderr:\n{stderr}");
    assert!(
        stderr.contains("--via socket"),
        "names --via socket: {stderr}"
    );

    // Two listen addresses, three slots: each worker holds its slot's two sockets.
    let m = Cluster::new()
        .workers(3)
        .args([
            "--balance",
            "sticky",
            "--via",
            "socket",
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "127.0.0.1:0",
        ])
        .spawn();
    let addrs = m.listen_addrs(2);
    assert_ne!(addrs[0], addrs[1]);
    let pids = m.wait_cluster_ready(3);
    let lines = wait_steered(&m, 0, &[0, 1, 2], 2);
    let steered: BTreeSet<String> = lines
        .iter()
        .map(|l| l.field("addr").unwrap_or("?").to_string())
        .collect();
    for addr in &addrs {
        assert!(
            steered.iter().any(|a| a.contains(&addr.to_string())),
            "no steering_attached for {addr}: {steered:?}"
        );
    }
    let mut seen = BTreeMap::<usize, Reply>::new();
    for (index, &addr) in addrs.iter().enumerate() {
        for i in 1..=16 {
            let ip = Ipv4Addr::new(127, 0, 0, i);
            let r = ask(addr, Some(ip));
            assert_eq!(
                r.id,
                predicted(ip, &[0, 1, 2]),
                "{addr} from {ip}: {}",
                r.raw
            );
            assert_eq!(r.pid, pids[&r.id], "{}", r.raw);
            assert_eq!(r.fields["listen_fds"], "2", "{}", r.raw);
            assert_eq!(r.fields["fdnames"].split(':').count(), 2, "{}", r.raw);
            assert_eq!(r.fds.as_deref(), Some(&[0, 1, 2, 3, 4][..]), "{}", r.raw);
            assert_eq!(
                r.fields["index"],
                index.to_string(),
                "{addr} is fd {}",
                3 + index
            );
            assert_eq!(r.listen_pid_ok, Some(true), "{}", r.raw);
            seen.insert(r.id, r);
        }
    }
    assert_eq!(seen.len(), 3, "every slot answered");

    // By /proc: six different sockets, two per slot, all of them the master's too.
    let mut links = BTreeMap::<(usize, i32), String>::new();
    for (&slot, &pid) in &pids {
        for fd in [3, 4] {
            links.insert((slot, fd), fd_link(pid, fd));
        }
    }
    let distinct: BTreeSet<&String> = links.values().collect();
    let master_fds: BTreeSet<String> = fd_numbers(m.pid)
        .into_iter()
        .filter_map(|fd| std::fs::read_link(format!("/proc/{}/fd/{fd}", m.pid)).ok())
        .map(|p| p.display().to_string())
        .collect();
    println!(
        "--via socket, 2 addresses x 3 slots: LISTEN_FDS={} fdnames={} per worker; fds 3/4 per slot {links:?}; \
         {} distinct sockets, {} held by the master",
        seen[&0].fields["listen_fds"],
        seen[&0].fields["fdnames"],
        distinct.len(),
        distinct.iter().filter(|l| master_fds.contains(**l)).count(),
    );
    assert!(
        distinct.iter().all(|l| l.starts_with("socket:[")),
        "{links:?}"
    );
    assert_eq!(
        distinct.len(),
        6,
        "fd 3 and fd 4 differ between slots: {links:?}"
    );
    assert!(
        distinct.iter().all(|l| master_fds.contains(*l)),
        "the master holds every slot's sockets: {links:?}"
    );
}

/// A worker that shuts its inherited listening socket down (some servers do, to wake
/// their accept threads) takes the master's copy out of the group with it. The master
/// finds it when the worker exits, makes it listen again, and steers by where the
/// kernel now has it: every address still reaches its predicted slot.
#[test]
fn a_slot_socket_a_worker_shut_down_listens_again_and_keeps_its_clients() {
    let Some(python) = require("python3") else {
        return;
    };
    let marker = std::env::temp_dir().join(unique_tag("recluster-shutdown"));
    let script = format!(
        r#"
import os, socket, sys
s = socket.fromfd(3, socket.AF_INET, socket.SOCK_STREAM)
if os.environ['WORKER_ID'] == '1' and not os.path.exists({marker:?}):
    open({marker:?}, 'w').close()
    s.shutdown(socket.SHUT_RDWR)
    sys.exit(1)
while True:
    c, _ = s.accept()
    c.sendall(f"id={{os.environ['WORKER_ID']}} pid={{os.getpid()}} gen={{os.environ['RECLUSTER_GENERATION']}}\n".encode())
    c.close()
"#,
        marker = marker.display().to_string()
    );
    let m = socket_cluster("sticky", 4)
        .args(["--respawn", "100ms"])
        .command([python.display().to_string(), "-c".into(), script])
        .spawn();
    let ready = m.wait_cluster_ready(4);
    m.wait_event("slot_socket_restored slot=1", DEADLINE);
    let pids: BTreeMap<usize, u32> = ready.iter().map(|(&s, &p)| (s, p)).collect();
    let ips = sources();
    let map = map_sources(m.addr(), &ips, &[0, 1, 2, 3], &pids);
    let _ = std::fs::remove_file(&marker);
    println!(
        "slot 1's socket shut down by its first worker, listening again: {} of {} addresses on their predicted slot; per worker {:?}",
        map.agree,
        ips.len(),
        map.share
    );
    assert_eq!(map.agree, ips.len(), "off their slot: {:?}", map.wrong);
}
