//! End-to-end tests of `--balance shared`: the real binary, real worker processes
//! (`examples/test_worker.rs`, and `examples/fd3.js` where `node` is installed), real
//! TCP clients on 127.0.0.1.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Concurrent clients of the load tests.
const CLIENTS: usize = 64;

fn pids(map: &BTreeMap<usize, u32>) -> BTreeSet<u32> {
    map.values().copied().collect()
}

/// Waits until every pid is gone (exited and reaped, or a zombie).
fn assert_all_gone(pids: &BTreeSet<u32>, timeout: Duration, what: &str) {
    if !poll_until(timeout, || pids.iter().all(|&p| !pid_alive(p))) {
        let alive: Vec<u32> = pids.iter().copied().filter(|&p| pid_alive(p)).collect();
        for &p in &alive {
            let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
        }
        panic!("{what}: workers {alive:?} still alive after {timeout:?} (killed now)");
    }
}

fn print_totals(test: &str, totals: &LoadTotals) {
    println!(
        "{test}: {} ok, {} failed {:?} in {:.1?} ({:.0} req/s) by generation {:?}, by id {:?}, {} worker pids",
        totals.ok,
        totals.failed(),
        totals.failures,
        totals.elapsed,
        totals.ok as f64 / totals.elapsed.as_secs_f64(),
        totals.by_gen,
        totals.by_id,
        totals.pids.len()
    );
}

fn assert_no_failures(test: &str, totals: &LoadTotals, master: &Master) {
    print_totals(test, totals);
    assert!(totals.ok > 0, "{test}: no request succeeded");
    assert_eq!(
        totals.failed(),
        0,
        "{test}: failed connections {:?}; first ones (time since load start, kind): {:?}\n--- master log ---\n{}",
        totals.failures,
        totals.first_failures,
        master.stderr_text()
    );
}

/// Sends `signal` and waits for the reload to `generation` to finish and every worker
/// in `old` to exit; checks that no old worker retired before its slot's replacement
/// was ready. Returns the new `slot → pid`.
fn reload(
    master: &Master,
    signal: Signal,
    generation: u32,
    old: &BTreeMap<usize, u32>,
) -> BTreeMap<usize, u32> {
    let mark = master.mark();
    master.signal(signal);
    master.wait_event_after(
        mark,
        &format!("reload_started generation={generation}"),
        DEADLINE,
    );
    master.wait_event_after(
        mark,
        &format!("reload_finished generation={generation}"),
        DEADLINE,
    );
    for (slot, pid) in old {
        master.wait_event_after(
            mark,
            &format!("worker_exited slot={slot} pid={pid}"),
            DEADLINE,
        );
    }
    let new = master.ready_workers(generation);
    assert_eq!(
        new.len(),
        old.len(),
        "ready workers of generation {generation}: {new:?}"
    );
    assert!(
        pids(&new).is_disjoint(&pids(old)),
        "reload kept a pid: old {old:?}, new {new:?}"
    );
    assert_replaced_in_order(master, mark, generation, old);
    new
}

/// Slot by slot: the new worker was ready before the old one retired.
fn assert_replaced_in_order(
    master: &Master,
    from: usize,
    generation: u32,
    old: &BTreeMap<usize, u32>,
) {
    for (slot, pid) in old {
        let ready = master.wait_event_after(
            from,
            &format!("worker_ready slot={slot} generation={generation}"),
            DEADLINE,
        );
        let retiring = master.wait_event_after(
            from,
            &format!("worker_retiring slot={slot} pid={pid}"),
            DEADLINE,
        );
        assert!(
            retiring.index > ready.index,
            "slot {slot}: `{}` logged before `{}`",
            retiring.raw,
            ready.raw
        );
    }
}

/// Requests until slots `0..n` have all answered with `generation`; checks the pids.
/// Each worker of `workers` became ready no sooner than `min` after it was spawned.
fn assert_ready_no_sooner_than(m: &Master, workers: &BTreeMap<usize, u32>, min: Duration) {
    for (slot, pid) in workers {
        let spawned = m.wait_event(&format!("worker_spawned slot={slot} pid={pid}"), DEADLINE);
        let ready = m.wait_event(&format!("worker_ready slot={slot} pid={pid}"), DEADLINE);
        let waited = ready.since(&spawned);
        assert!(waited >= min, "slot {slot} ready {waited:?} after spawn");
    }
}

fn assert_served_by(addr: SocketAddr, workers: &BTreeMap<usize, u32>, generation: u32) {
    let mut seen = BTreeMap::new();
    requests_until(
        addr,
        DEADLINE,
        &format!("served by every worker of generation {generation}"),
        |replies| {
            let r = replies.last().unwrap();
            if r.gen == generation {
                seen.insert(r.id, r.pid);
            }
            seen.len() == workers.len()
        },
    );
    assert_eq!(&seen, workers, "slot → pid of the replies vs. the log");
}

#[test]
fn workers_get_distinct_ids_and_socket_activation_env() {
    let m = shared_cluster(3).spawn();
    let addr = m.addr();
    assert!(
        addr.ip().is_loopback() && addr.port() != 0,
        "logged address {addr}"
    );
    let ready = m.wait_cluster_ready(3);

    let seen = collect_ids(addr, 3, DEADLINE);
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
    for (slot, r) in &seen {
        assert_eq!(r.pid, ready[slot], "slot {slot}: reply {} vs. log", r.raw);
        assert_eq!(r.gen, 1, "{}", r.raw);
        assert_eq!(r.listen_pid_ok, Some(true), "LISTEN_PID: {}", r.raw);
        assert_eq!(r.fields["listen_fds"], "1", "{}", r.raw);
        assert_ne!(r.fields["fdnames"], "-", "LISTEN_FDNAMES unset: {}", r.raw);
        assert_eq!(r.fields["workers"], "3", "RECLUSTER_WORKERS: {}", r.raw);
        assert_eq!(
            r.fields["balance"], "shared",
            "RECLUSTER_BALANCE: {}",
            r.raw
        );
        assert_eq!(
            r.fds.as_deref(),
            Some(&[0, 1, 2, 3][..]),
            "inherited fds: {}",
            r.raw
        );
        assert_eq!(
            process_group(r.pid),
            Some(r.pid),
            "worker {} leads its process group",
            r.pid
        );
        assert_eq!(
            parent_pid(r.pid),
            Some(m.pid),
            "worker {} is the master's child",
            r.pid
        );
    }

    // Clients are served, by these workers only.
    let replies = requests_until(addr, DEADLINE, "200 replies", |r| r.len() >= 200);
    let served: BTreeSet<u32> = replies.iter().map(|r| r.pid).collect();
    assert!(
        served.is_subset(&pids(&ready)),
        "served by {served:?}, workers {ready:?}"
    );
    assert_eq!(m.spawned_pids().len(), 3, "no respawn expected");
}

#[test]
fn reload_under_load_replaces_every_worker_without_failed_connections() {
    let m = shared_cluster(3).spawn();
    let addr = m.addr();
    let old = m.wait_cluster_ready(3);

    let load = Load::start(addr, CLIENTS);
    load.wait_more_ok(2000, DEADLINE);
    let mark = m.mark();
    let new = reload(&m, Signal::SIGUSR2, 2, &old);
    for (slot, pid) in &old {
        m.wait_event_after(
            mark,
            &format!("worker_retiring slot={slot} pid={pid} generation=1"),
            DEADLINE,
        );
        // Retired gracefully: the stop signal, not the timeout.
        m.wait_event_after(
            mark,
            &format!("worker_exited slot={slot} pid={pid} code=0"),
            DEADLINE,
        );
    }
    load.wait_more_ok(300, DEADLINE);
    let totals = load.stop();
    assert_no_failures("reload under load", &totals, &m);
    assert!(
        totals.by_gen.contains_key(&1) && totals.by_gen.contains_key(&2),
        "{:?}",
        totals.by_gen
    );

    assert_served_by(addr, &new, 2);
    assert!(
        old.values().all(|&p| !pid_alive(p)),
        "an old worker is alive: {old:?}"
    );
}

#[test]
fn twenty_reloads_in_a_row_under_load_without_failed_connections() {
    let m = shared_cluster(3).spawn();
    let addr = m.addr();
    let mut workers = m.wait_cluster_ready(3);

    let load = Load::start(addr, CLIENTS);
    load.wait_more_ok(300, DEADLINE);
    let first = workers.clone();
    for generation in 2..=21 {
        m.reload_to(generation);
        workers = m.ready_workers(generation);
        assert_eq!(workers.len(), 3, "generation {generation}: {workers:?}");
    }
    // Every worker but the last generation's retires.
    let last = pids(&workers);
    let all: BTreeSet<u32> = m.spawned_pids().into_iter().collect();
    let retired: BTreeSet<u32> = all.difference(&last).copied().collect();
    assert_eq!(
        all.len(),
        3 * 21,
        "spawned pids: one per slot and generation"
    );
    assert_all_gone(&retired, DEADLINE, "after 20 reloads");
    load.wait_more_ok(300, DEADLINE);
    let totals = load.stop();
    println!(
        "20 reloads: {} workers killed after timeout",
        m.events("worker_killed_after_timeout").len()
    );
    assert_no_failures("20 reloads under load", &totals, &m);
    assert!(pids(&first).is_disjoint(&last));
    assert_served_by(addr, &workers, 21);
}

#[test]
fn sighup_reloads_too() {
    let m = shared_cluster(2).spawn();
    let addr = m.addr();
    let old = m.wait_cluster_ready(2);
    let new = reload(&m, Signal::SIGHUP, 2, &old);
    assert_served_by(addr, &new, 2);
}

#[test]
fn killed_worker_is_respawned_in_its_slot() {
    let m = shared_cluster(3).args(["--respawn", "100ms"]).spawn();
    let addr = m.addr();
    let ready = m.wait_cluster_ready(3);
    let victim = ready[&1];

    let mark = m.mark();
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();
    let exited = m.wait_event_after(
        mark,
        &format!("worker_exited slot=1 pid={victim} signal=9"),
        DEADLINE,
    );
    let scheduled = m.wait_event_after(mark, "respawn_scheduled slot=1", DEADLINE);
    assert_eq!(scheduled.num("delay_ms"), 100, "{}", scheduled.raw);
    let spawned = m.wait_for_after(
        mark,
        "`worker spawned slot=1` with a new pid",
        DEADLINE,
        |l| l.matches("worker_spawned slot=1") && l.pid() != victim,
    );
    let new = spawned.pid();
    assert_eq!(
        spawned.generation(),
        1,
        "a respawn keeps the generation: {}",
        spawned.raw
    );
    let waited = spawned.since(&exited);
    assert!(
        waited >= Duration::from_millis(80),
        "respawned {waited:?} after the exit, --respawn 100ms"
    );
    m.wait_event_after(
        mark,
        &format!("worker_ready slot=1 pid={new} generation=1"),
        DEADLINE,
    );

    let mut expected = ready.clone();
    expected.insert(1, new);
    assert_served_by(addr, &expected, 1);
    // The other slots were not touched.
    assert_eq!(m.spawned_pids().len(), 4, "{:?}", m.spawned_pids());
    assert!(pid_alive(ready[&0]) && pid_alive(ready[&2]));
}

#[test]
fn crash_looping_slot_backs_off_while_the_others_serve() {
    let worker = test_worker();
    let m = shared_cluster(3)
        .args(["--respawn", "50ms", "--backoff", "400ms"])
        .command([
            "sh".as_ref(),
            "-c".as_ref(),
            r#"if [ "$WORKER_ID" = 1 ]; then exit 1; fi; exec "$0""#.as_ref(),
            worker.as_os_str(),
        ])
        .spawn();
    let addr = m.addr();
    let slot0 = m.wait_event("worker_ready slot=0", DEADLINE).pid();
    let slot2 = m.wait_event("worker_ready slot=2", DEADLINE).pid();

    let load = Load::start(addr, 4);
    let mut delays = Vec::new();
    let mut from = 0;
    while delays.len() < 7 {
        let line = m.wait_event_after(from, "respawn_scheduled slot=1", DEADLINE);
        delays.push(line.num("delay_ms"));
        from = line.index + 1;
    }
    let expected: Vec<u64> = (0..7).map(|i| (50u64 << i).min(400)).collect();
    assert_eq!(delays, expected, "respawn delays of the crash-looping slot");
    assert!(!m.events("worker_exited slot=1 code=1").is_empty());
    load.wait_more_ok(100, DEADLINE);
    let totals = load.stop();
    assert_no_failures("crash-looping slot 1", &totals, &m);
    assert_eq!(
        totals.by_id.keys().copied().collect::<Vec<_>>(),
        vec![0, 2],
        "only slots 0 and 2 serve"
    );
    assert_eq!(totals.pids, BTreeSet::from([slot0, slot2]));
    assert!(
        m.events("cluster_ready").is_empty(),
        "slot 1 is never ready"
    );
    assert_eq!(m.events("worker_spawned slot=0").len(), 1);
    assert_eq!(m.events("worker_spawned slot=2").len(), 1);
}

#[test]
fn sigterm_exits_zero_and_leaves_no_worker() {
    let m = shared_cluster(3).spawn();
    let addr = m.addr();
    let ready = m.wait_cluster_ready(3);
    collect_ids(addr, 3, DEADLINE);

    let mark = m.mark();
    m.signal(Signal::SIGTERM);
    let exit = m.expect_exit(DEADLINE);
    assert_eq!(
        exit,
        Exit {
            code: Some(0),
            signal: None
        },
        "\n{}",
        m.stderr_text()
    );
    m.wait_event_after(mark, "terminating", DEADLINE);
    m.wait_event_after(mark, "terminated", DEADLINE);
    for (slot, pid) in &ready {
        m.wait_event_after(
            mark,
            &format!("worker_exited slot={slot} pid={pid} code=0"),
            DEADLINE,
        );
        // The master reaped them all before exiting.
        assert!(!pid_alive(*pid), "worker {pid} outlived the master");
    }
    assert_eq!(m.live_worker_pids(), Vec::<u32>::new());
    assert!(request(addr).is_err(), "the listening socket is still open");
}

#[test]
fn sigint_terminates_gracefully_and_a_second_sigint_kills_at_once() {
    // Workers that ignore the stop signal and a timeout of one hour: only the second
    // SIGINT can end this quickly.
    let m = shared_cluster(2)
        .args(["--timeout", "1h"])
        .env("TEST_WORKER_IGNORE_TERM", "1")
        .spawn();
    let ready = m.wait_cluster_ready(2);
    let mark = m.mark();
    m.signal(Signal::SIGINT);
    m.wait_event_after(mark, "terminating", DEADLINE);
    for pid in ready.values() {
        m.wait_event_after(mark, &format!("worker_retiring pid={pid}"), DEADLINE);
    }
    // The workers ignore the stop signal: the master waits for them (a window that
    // running late can only lengthen, never fail).
    assert!(
        m.wait_exit(Duration::from_millis(300)).is_none(),
        "exited before its workers"
    );
    assert!(
        ready.values().all(|&p| pid_alive(p)),
        "a worker died of SIGTERM"
    );
    m.signal(Signal::SIGINT);
    m.expect_exit(DEADLINE);
    assert_all_gone(
        &pids(&ready),
        Duration::from_secs(5),
        "after the second SIGINT",
    );
}

#[test]
fn sigint_alone_is_graceful() {
    let m = shared_cluster(2).spawn();
    let ready = m.wait_cluster_ready(2);
    m.signal(Signal::SIGINT);
    let exit = m.expect_exit(DEADLINE);
    assert_eq!(exit.code, Some(0), "\n{}", m.stderr_text());
    for pid in ready.values() {
        m.wait_event(&format!("worker_exited pid={pid} code=0"), DEADLINE);
    }
}

#[test]
fn sigkill_of_the_master_takes_every_worker_down() {
    let m = shared_cluster(3).spawn();
    let addr = m.addr();
    let ready = m.wait_cluster_ready(3);
    m.signal(Signal::SIGKILL);
    m.expect_exit(DEADLINE);
    assert_all_gone(&pids(&ready), Duration::from_secs(5), "PR_SET_PDEATHSIG");
    // Nobody holds the listening socket any more.
    let mut last = None;
    let refused = poll_until(Duration::from_secs(5), || {
        last = Some(request(addr));
        matches!(&last, Some(Err(Failure(kind))) if kind == "connect: ConnectionRefused")
    });
    assert!(
        refused,
        "{addr} still accepts after the master died: {last:?}"
    );
}

#[test]
fn worker_fds_are_exactly_stdio_and_the_listening_sockets() {
    let m = shared_cluster(2).args(["--listen", "127.0.0.1:0"]).spawn();
    let addrs = m.listen_addrs(2);
    assert_ne!(addrs[0], addrs[1]);
    let ready = m.wait_cluster_ready(2);
    for (index, &addr) in addrs.iter().enumerate() {
        let seen = collect_ids(addr, 2, DEADLINE);
        for (slot, r) in &seen {
            assert_eq!(r.pid, ready[slot]);
            assert_eq!(
                r.fds.as_deref(),
                Some(&[0, 1, 2, 3, 4][..]),
                "inherited fds: {}",
                r.raw
            );
            assert_eq!(r.fields["listen_fds"], "2", "{}", r.raw);
            assert_eq!(
                r.fields["fdnames"].split(':').count(),
                2,
                "LISTEN_FDNAMES: {}",
                r.raw
            );
            assert_eq!(
                r.fields["index"],
                index.to_string(),
                "listener {addr} is fd {}",
                3 + index
            );
            assert_eq!(r.listen_pid_ok, Some(true));
        }
    }
}

#[test]
fn ipv6_listen_address() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        skip("no IPv6 loopback here");
        return;
    }
    let m = Cluster::new()
        .workers(2)
        .args(["--balance", "shared", "--listen", "[::1]:0"])
        .spawn();
    let addr = m.addr();
    assert!(addr.is_ipv6(), "{addr}");
    m.wait_cluster_ready(2);
    collect_ids(addr, 2, DEADLINE);
}

#[test]
fn options_from_the_environment() {
    let m = Cluster::new()
        .env("RECLUSTER_WORKERS", "2")
        .env("RECLUSTER_BALANCE", "shared")
        .env("RECLUSTER_LISTEN", "127.0.0.1:0")
        .spawn();
    let addr = m.addr();
    m.wait_cluster_ready(2);
    let seen = collect_ids(addr, 2, DEADLINE);
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
}

#[test]
fn ready_when_ready_waits_for_sd_notify() {
    let m = shared_cluster(2)
        .args(["--ready-when", "ready"])
        .env("TEST_WORKER_NOTIFY", "1")
        .env("TEST_WORKER_NOTIFY_DELAY_MS", "400")
        .spawn();
    let addr = m.addr();
    let ready = m.wait_cluster_ready(2);
    // The worker accepts at once but says READY=1 only 400 ms later.
    assert_ready_no_sooner_than(&m, &ready, Duration::from_millis(350));
    assert_served_by(addr, &ready, 1);
    // The next generation is ready the same way.
    let new = reload(&m, Signal::SIGUSR2, 2, &ready);
    assert_served_by(addr, &new, 2);
}

#[test]
fn ready_when_ready_without_notify_times_out() {
    let m = shared_cluster(1)
        .args(["--ready-when", "ready", "--ready-timeout", "500ms"])
        .spawn();
    let spawned = m.wait_event("worker_spawned slot=0 generation=1", DEADLINE);
    let pid = spawned.pid();
    let late = m.wait_event(
        &format!("worker_not_ready_in_time slot=0 pid={pid} generation=1"),
        DEADLINE,
    );
    // The timer starts when the master decides to spawn, before the fork and exec that
    // precede `worker_spawned` (long on a loaded machine): measured from the line the
    // master logs just before it decides, `guard_started`.
    let before = m.wait_event("guard_started", DEADLINE);
    let waited = late.since(&before);
    assert!(
        waited >= Duration::from_millis(490),
        "declared late after {waited:?} ({:?} after the spawn was logged)",
        late.since(&spawned)
    );
    assert!(m.events(&format!("worker_ready pid={pid}")).is_empty());
}

#[test]
fn notify_from_another_pid_is_ignored() {
    let Some(python) = require("python3") else {
        return;
    };
    // A child of the worker's shell sends READY=1: not the worker's pid.
    let script = r#"import os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])"#;
    let worker = test_worker();
    let m = shared_cluster(1)
        .args(["--ready-when", "ready", "--ready-timeout", "1s"])
        .command([
            "sh".as_ref(),
            "-c".as_ref(),
            r#""$1" -c "$2" || exit 7; exec "$0""#.as_ref(),
            worker.as_os_str(),
            python.as_os_str(),
            script.as_ref(),
        ])
        .spawn();
    let pid = m
        .wait_event("worker_spawned slot=0 generation=1", DEADLINE)
        .pid();
    m.wait_event(
        &format!("worker_not_ready_in_time slot=0 pid={pid}"),
        DEADLINE,
    );
    assert!(m.events(&format!("worker_ready pid={pid}")).is_empty());
    assert!(
        m.events("worker_exited code=7").is_empty(),
        "the python sender failed"
    );
}

#[test]
fn ready_when_listening_times_out_for_a_worker_that_never_listens() {
    let m = shared_cluster(1)
        .args(["--ready-timeout", "500ms"])
        .env("TEST_WORKER_NO_LISTEN", "1")
        .spawn();
    let pid = m
        .wait_event("worker_spawned slot=0 generation=1", DEADLINE)
        .pid();
    m.wait_event(
        &format!("worker_not_ready_in_time slot=0 pid={pid}"),
        DEADLINE,
    );
    assert!(m.events(&format!("worker_ready pid={pid}")).is_empty());
}

#[test]
fn ready_when_listening_waits_for_a_slow_worker_to_listen() {
    // Workers boot for 400 ms before they listen; the old ones serve meanwhile.
    let m = shared_cluster(2)
        .env("TEST_WORKER_LISTEN_DELAY_MS", "400")
        .spawn();
    let addr = m.addr();
    let old = m.wait_cluster_ready(2);
    assert_ready_no_sooner_than(&m, &old, Duration::from_millis(350));
    let load = Load::start(addr, 16);
    load.wait_more_ok(200, DEADLINE);
    let mark = m.mark();
    let new = reload(&m, Signal::SIGUSR2, 2, &old);
    for (slot, pid) in &old {
        let spawned = m.wait_event_after(
            mark,
            &format!("worker_spawned slot={slot} generation=2"),
            DEADLINE,
        );
        let retiring = m.wait_event_after(
            mark,
            &format!("worker_retiring slot={slot} pid={pid}"),
            DEADLINE,
        );
        let waited = retiring.since(&spawned);
        assert!(
            waited >= Duration::from_millis(350),
            "slot {slot}: old worker retired {waited:?} after the new one was spawned"
        );
    }
    load.wait_more_ok(200, DEADLINE);
    let totals = load.stop();
    assert_no_failures("slow-booting workers, reload under load", &totals, &m);
    assert_served_by(addr, &new, 2);
}

#[test]
fn listening_is_detected_from_a_blocked_accept() {
    // The worker accepts on fd 3 but has no epoll instance watching it.
    let m = shared_cluster(2).env("TEST_WORKER_NO_EPOLL", "1").spawn();
    let addr = m.addr();
    let ready = m.wait_cluster_ready(2);
    assert_served_by(addr, &ready, 1);
}

#[test]
fn retiring_worker_that_ignores_sigterm_is_killed_after_timeout() {
    let m = shared_cluster(1)
        .args(["--timeout", "500ms"])
        .env("TEST_WORKER_IGNORE_TERM", "1")
        .spawn();
    let addr = m.addr();
    let old = m.wait_cluster_ready(1)[&0];
    let mark = m.mark();
    m.signal(Signal::SIGUSR2);
    let retiring = m.wait_event_after(
        mark,
        &format!("worker_retiring slot=0 pid={old} generation=1"),
        DEADLINE,
    );
    let killed = m.wait_event_after(
        mark,
        &format!("worker_killed_after_timeout slot=0 pid={old} generation=1"),
        DEADLINE,
    );
    let waited = killed.since(&retiring);
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "killed {waited:?} after retiring, --timeout 500ms"
    );
    m.wait_event_after(
        mark,
        &format!("worker_exited slot=0 pid={old} generation=1 signal=9"),
        DEADLINE,
    );
    let new = m.ready_workers(2);
    assert_served_by(addr, &new, 2);
}

#[test]
fn default_timeout_is_one_second_and_one_hour_in_production() {
    let dev = shared_cluster(1)
        .env("TEST_WORKER_IGNORE_TERM", "1")
        .spawn();
    let node_env = shared_cluster(1)
        .env("TEST_WORKER_IGNORE_TERM", "1")
        .env("NODE_ENV", "production")
        .spawn();
    let recluster_env = shared_cluster(1)
        .env("TEST_WORKER_IGNORE_TERM", "1")
        .env("RECLUSTER_ENV", "production")
        .spawn();
    let masters = [&dev, &node_env, &recluster_env];
    let mut retiring = Vec::new();
    for m in masters {
        let old = m.wait_cluster_ready(1)[&0];
        let mark = m.mark();
        m.signal(Signal::SIGUSR2);
        retiring.push(m.wait_event_after(mark, &format!("worker_retiring pid={old}"), DEADLINE));
    }
    let killed = dev.wait_event_after(
        retiring[0].index,
        &format!("worker_killed_after_timeout pid={}", retiring[0].pid()),
        DEADLINE,
    );
    // By the master's own timestamps, not by when this test read the lines.
    let waited = killed.since(&retiring[0]);
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "development default: killed {waited:?} after retiring"
    );
    // Production: still not killed a good while after the development timeout.
    for (m, line) in [(&node_env, &retiring[1]), (&recluster_env, &retiring[2])] {
        let patient = m.try_wait_event_after(
            line.index,
            "worker_killed_after_timeout",
            Duration::from_secs(2),
        );
        assert!(patient.is_none(), "production default timeout: {patient:?}");
        assert!(pid_alive(line.pid()));
    }
}

#[test]
fn stop_signal_option_is_used_to_retire_workers() {
    // The workers ignore SIGTERM but stop on SIGINT.
    let m = shared_cluster(1)
        .args(["--stop-signal", "INT", "--timeout", "5s"])
        .env("TEST_WORKER_IGNORE_TERM", "1")
        .spawn();
    let old = m.wait_cluster_ready(1);
    let mark = m.mark();
    reload(&m, Signal::SIGUSR2, 2, &old);
    m.wait_event_after(
        mark,
        &format!("worker_exited pid={} code=0", old[&0]),
        DEADLINE,
    );
    assert!(m.events("worker_killed_after_timeout").is_empty());
}

#[test]
fn in_flight_requests_finish_when_their_worker_retires() {
    let m = shared_cluster(2)
        .args(["--timeout", "10s"])
        .env("TEST_WORKER_REPLY_DELAY_MS", "300")
        .spawn();
    let addr = m.addr();
    let old = m.wait_cluster_ready(2);
    let load = Load::start(addr, 16);
    load.wait_more_ok(16, DEADLINE);
    let mark = m.mark();
    let new = reload(&m, Signal::SIGUSR2, 2, &old);
    for pid in old.values() {
        m.wait_event_after(mark, &format!("worker_exited pid={pid} code=0"), DEADLINE);
    }
    load.wait_more_ok(16, DEADLINE);
    let totals = load.stop();
    assert_no_failures("slow requests across a reload", &totals, &m);
    assert_served_by(addr, &new, 2);
}

#[test]
fn node_worker_on_fd3_distinct_ids_and_reload_without_failures() {
    let Some(node) = require("node") else {
        return;
    };
    let script = example_source("fd3.js");
    let m = shared_cluster(3)
        .command([node.as_os_str(), script.as_os_str()])
        .spawn();
    let addr = m.addr();
    let old = m.wait_cluster_ready(3);
    let seen = collect_ids(addr, 3, DEADLINE);
    assert_eq!(seen.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
    for (slot, r) in &seen {
        assert_eq!(r.pid, old[slot], "{}", r.raw);
    }

    let load = Load::start(addr, CLIENTS);
    load.wait_more_ok(1000, DEADLINE);
    let new = reload(&m, Signal::SIGUSR2, 2, &old);
    load.wait_more_ok(1000, DEADLINE);
    let totals = load.stop();
    assert_no_failures("node workers, reload under load", &totals, &m);
    assert_served_by(addr, &new, 2);
}

#[test]
fn harness_parses_log_lines() {
    let at = std::time::Instant::now();
    let a = parse_log_line(
        0,
        at,
        "2026-11-25T14:50:00.123456Z  INFO recluster::runtime::journal: worker ready event=\"worker_ready\" slot=0 pid=123 generation=1",
    );
    assert_eq!(
        (a.level.as_str(), a.target.as_str()),
        ("INFO", "recluster::runtime::journal")
    );
    assert_eq!(a.message, "worker ready");
    assert_eq!(a.event(), Some("worker_ready"));
    // Matched by its event and fields, whatever the message says.
    assert!(a.matches("worker_ready") && a.matches("worker_ready slot=0 generation=1"));
    assert!(!a.matches("worker_ready slot=1") && !a.matches("worker_spawned slot=0"));
    assert_eq!(a.pid(), 123);
    // 2026-11-25 is day 20 782 of the Unix epoch.
    assert_eq!(
        a.time,
        Some(Duration::from_micros(
            (20_782 * 86_400 + 14 * 3600 + 50 * 60) * 1_000_000 + 123_456
        ))
    );
    let b = parse_log_line(
        1,
        at,
        "2026-11-26T00:00:01.5Z ERROR recluster::runtime::journal: spawn failed event=\"spawn_failed\" slot=2 generation=1 suppressed=0 error=No such file or directory (os error 2)",
    );
    assert!(b.matches("spawn_failed slot=2"));
    assert_eq!(
        b.field("error"),
        Some("No such file or directory (os error 2)")
    );
    assert_eq!(b.since(&a), Duration::from_micros(33_001_376_544));
    // The same words without an event field are no event.
    let unnamed = parse_log_line(
        2,
        at,
        "2026-11-26T00:00:02Z  INFO recluster::runtime::journal: worker ready slot=0 pid=123 generation=1",
    );
    assert!(unnamed.event().is_none() && !unnamed.matches("worker_ready"));
    // A pattern in words, not an event name, is refused loudly.
    let phrased = std::panic::catch_unwind(|| a.matches("worker ready slot=0"));
    assert!(phrased.is_err(), "a phrase was accepted as a log pattern");
    let worker_output = parse_log_line(3, at, "test_worker[12]: fd 3 is not a listening socket");
    assert_eq!(worker_output.level, "");
    assert!(worker_output.event().is_none());
    let text = format!("{}\n{}\n{}", a.raw, unnamed.raw, worker_output.raw);
    assert_eq!(events_in(&text, "worker_ready").len(), 1);
}

/// What the tests match on is there: every line the master logs (not its workers'
/// output) carries an `event=` field, through start, a crash and its respawn, a reload
/// and termination, in `shared` and in `rr`.
#[test]
fn every_line_the_master_logs_names_its_event() {
    for mode in ["shared", "rr"] {
        let cluster = Cluster::new().workers(2).args([
            "--balance",
            mode,
            "--listen",
            "127.0.0.1:0",
            "--respawn",
            "50ms",
        ]);
        let m = if mode == "shared" {
            cluster.spawn()
        } else {
            cluster.command([echo()]).spawn()
        };
        let ready = m.wait_cluster_ready(2);
        let mark = m.mark();
        kill(Pid::from_raw(ready[&0] as i32), Signal::SIGKILL).unwrap();
        m.wait_for_after(mark, "slot 0 ready again", DEADLINE, |l| {
            l.matches("worker_ready slot=0") && l.pid() != ready[&0]
        });
        let mark = m.mark();
        m.signal(Signal::SIGUSR2);
        m.wait_event_after(mark, "reload_finished generation=2", DEADLINE);
        m.signal(Signal::SIGTERM);
        assert!(m.expect_exit(DEADLINE).success(), "{mode}");
        m.wait_event("terminated", DEADLINE);
        let lines = m.lines();
        let unnamed: Vec<&str> = lines
            .iter()
            .filter(|l| !l.level.is_empty() && l.event().is_none())
            .map(|l| l.raw.as_str())
            .collect();
        assert!(
            unnamed.is_empty(),
            "{mode}: log lines without an event field: {unnamed:#?}"
        );
        let events: BTreeSet<&str> = lines.iter().filter_map(LogLine::event).collect();
        println!("{mode}: every master log line names its event: {events:?}");
        for needed in [
            "listening",
            "worker_spawned",
            "worker_ready",
            "cluster_ready",
            "worker_exited",
            "respawn_scheduled",
            "reload_started",
            "worker_retiring",
            "reload_finished",
            "terminating",
            "terminated",
        ] {
            assert!(events.contains(needed), "{mode}: no {needed} in {events:?}");
        }
        if mode == "rr" {
            assert!(events.contains("balancer_totals"), "{events:?}");
        }
    }
}
