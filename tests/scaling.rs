//! End to end: scaling a running cluster with SIGTTIN (one worker more) and SIGTTOU
//! (one fewer), as gunicorn does.
//!
//! In `sticky`, a slot added moves only the clients whose heaviest slot is the new one
//! (rendezvous hashing: about 1/N of them, and all to the new slot), and removing it
//! again sends them back. Every wait is for a log line or a reply, with a deadline.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// Source addresses 127.0.0.1 ..= 127.0.0.200.
const ADDRESSES: usize = 200;

fn source(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 1 + i as u8)
}

/// The slot (WORKER_ID) that serves each source address now.
fn slots_by_address(addr: SocketAddr) -> BTreeMap<Ipv4Addr, usize> {
    (0..ADDRESSES)
        .map(|i| {
            let ip = source(i);
            let r = request_from(addr, Some(ip), true, Duration::from_secs(15))
                .unwrap_or_else(|f| panic!("from {ip}: {f:?}"));
            (ip, r.id)
        })
        .collect()
}

#[test]
fn sigttin_adds_a_sticky_slot_that_takes_only_its_own_share_and_sigttou_gives_it_back() {
    let m = Cluster::new()
        .workers(4)
        .args(["--balance", "sticky", "--listen", "127.0.0.1:0"])
        .command([echo()])
        .spawn();
    let addr = m.addr();
    m.wait_cluster_ready(4);
    let before = slots_by_address(addr);

    let from = m.mark();
    m.signal(Signal::SIGTTIN);
    m.wait_event_after(from, "scaled from=4 to=5", DEADLINE);
    let ready = m.wait_event_after(from, "worker_ready slot=4 generation=1", DEADLINE);
    let grown = slots_by_address(addr);
    let moved: Vec<(Ipv4Addr, usize, usize)> = before
        .iter()
        .filter(|(ip, slot)| grown[ip] != **slot)
        .map(|(ip, slot)| (*ip, *slot, grown[ip]))
        .collect();
    let k = moved.len();
    eprintln!("moved {k}/{ADDRESSES} addresses when scaling sticky 4 -> 5");
    assert!(
        moved.iter().all(|&(_, _, to)| to == 4),
        "an address moved to another slot than the new one: {moved:?}"
    );
    assert!(
        (ADDRESSES / 10..=ADDRESSES * 35 / 100).contains(&k),
        "{k} of {ADDRESSES} addresses moved (about 1/5 expected)"
    );

    let from = m.mark();
    m.signal(Signal::SIGTTOU);
    m.wait_event_after(from, "scaled from=5 to=4", DEADLINE);
    let pid = ready.pid();
    m.wait_event_after(from, &format!("worker_retiring slot=4 pid={pid}"), DEADLINE);
    let exited = m.wait_event_after(from, &format!("worker_exited slot=4 pid={pid}"), DEADLINE);
    assert!(
        m.try_wait_event_after(from, "worker_killed_after_timeout", Duration::ZERO)
            .is_none(),
        "slot 4's worker was killed, not retired gracefully: {}",
        exited.raw
    );
    let shrunk = slots_by_address(addr);
    assert_eq!(shrunk, before, "every address back on its slot of before");
    assert!(
        m.events("worker_spawned slot=4").len() == 1,
        "slot 4 never respawned"
    );
}

#[test]
fn sigttin_adds_an_rr_slot_that_gets_connections() {
    let m = Cluster::new()
        .workers(2)
        .args(["--balance", "rr", "--listen", "127.0.0.1:0"])
        .command([echo()])
        .spawn();
    let addr = m.addr();
    m.wait_cluster_ready(2);
    let from = m.mark();
    m.signal(Signal::SIGTTIN);
    m.wait_event_after(from, "scaled from=2 to=3", DEADLINE);
    m.wait_event_after(from, "worker_ready slot=2 generation=1", DEADLINE);
    let mut seen = BTreeMap::<usize, u64>::new();
    let all = poll_until(DEADLINE, || {
        let r = request_from(addr, None, true, Duration::from_secs(15)).expect("request");
        *seen.entry(r.id).or_default() += 1;
        seen.len() == 3
    });
    assert!(all, "slots served: {seen:?}");
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
}

#[test]
fn in_shared_sigttin_and_sigttou_add_and_remove_a_worker_process() {
    let m = shared_cluster(2).spawn();
    let addr = m.addr();
    m.wait_cluster_ready(2);
    let from = m.mark();
    m.signal(Signal::SIGTTIN);
    m.wait_event_after(from, "scaled from=2 to=3", DEADLINE);
    let ready = m.wait_event_after(from, "worker_ready slot=2 generation=1", DEADLINE);
    let seen = collect_ids(addr, 3, DEADLINE);
    // The new worker is told the new size (RECLUSTER_WORKERS).
    assert_eq!(
        seen[&2].fields.get("workers").map(String::as_str),
        Some("3")
    );
    let from = m.mark();
    m.signal(Signal::SIGTTOU);
    m.wait_event_after(from, "scaled from=3 to=2", DEADLINE);
    let pid = ready.pid();
    m.wait_event_after(
        from,
        &format!("worker_exited slot=2 pid={pid} code=0"),
        DEADLINE,
    );
    assert!(!pid_alive(pid));
}

#[test]
fn scaling_below_one_worker_is_refused_and_changes_nothing() {
    let m = Cluster::new()
        .workers(1)
        .args(["--balance", "rr", "--listen", "127.0.0.1:0"])
        .command([echo()])
        .spawn();
    let addr = m.addr();
    let ready = m.wait_cluster_ready(1);
    let from = m.mark();
    m.signal(Signal::SIGTTOU);
    let refused = m.wait_event_after(from, "scale_refused from=1 to=0", DEADLINE);
    assert_eq!(refused.level, "WARN", "{}", refused.raw);
    assert!(m.events("scaled").is_empty());
    let r = request_from(addr, None, true, Duration::from_secs(15)).expect("still served");
    assert_eq!((r.id, r.pid), (0, ready[&0]));
}

#[test]
fn scaling_under_via_socket_is_refused_and_changes_nothing() {
    let m = Cluster::new()
        .workers(2)
        .args([
            "--balance",
            "rr",
            "--via",
            "socket",
            "--listen",
            "127.0.0.1:0",
        ])
        .spawn();
    m.wait_cluster_ready(2);
    let from = m.mark();
    m.signal(Signal::SIGTTIN);
    let refused = m.wait_event_after(from, "scale_refused from=2 to=3", DEADLINE);
    assert_eq!(refused.level, "WARN", "{}", refused.raw);
    assert!(m.events("scaled").is_empty());
    assert!(m.events("worker_spawned slot=2").is_empty());
}
