//! Fault tests: the real binary, real worker processes, real TCP on 127.0.0.0/8.
//!
//! Each test provokes one fault, measures what happened and asserts the figure; every
//! figure is printed (`cargo test --release --test faults -- --nocapture` shows them;
//! RELIABILITY.md collects them). Waits are for log events (by their `event=` field),
//! replies or process states, with deadlines. No figure is judged over a window this
//! test times on a machine that may be loaded: counts are compared with the master's
//! own (`balancer_totals`, its log's timestamps), or bounded by a window that running
//! late can only widen. The only fixed-length pauses, through [`hold`], pace what a test
//! sends (the reload storm's signals, the moment of a SIGKILL); they wait for nothing.
//!
//! Workers: `tests/workers/channel_worker.py` (the worker-channel protocol from
//! Python, with fault knobs), `examples/echo.rs` (the Rust worker library) and
//! `examples/test_worker.rs` (a socket-activation server for `--balance shared`).
//! Covered elsewhere, not repeated here: a worker that stops reading its channel
//! (tests/balance_modes.rs), a worker that ignores SIGTERM is SIGKILLed after
//! `--timeout` and a foreign process's `READY=1` is ignored (tests/shared_mode.rs).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Lets `d` pass: the pace of what a test sends, not a synchronisation.
fn hold(d: Duration) {
    let end = Instant::now() + d;
    while let Some(left) = end.checked_duration_since(Instant::now()) {
        std::thread::park_timeout(left);
    }
}

/// Descriptors of `pid` that point at /dev/null. A worker sends its stdin, /dev/null,
/// in fault messages: a master that kept them would show them here. The master has 3
/// of its own: stdin and stdout (the harness gives it /dev/null) and the one it
/// prepares for its workers' stdin.
fn dev_null_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|p| p.as_os_str() == "/dev/null")
                .count()
        })
        .unwrap_or(0)
}

/// Terminates the master with SIGTERM and checks it exits 0.
fn terminate(m: &Master, what: &str) {
    m.signal(Signal::SIGTERM);
    let exit = m.expect_exit(DEADLINE);
    assert!(exit.success(), "{what}: exit {exit:?}\n{}", m.stderr_text());
}

/// Waits until every process tagged `FAULTS_TAG=tag` but the master is gone; returns
/// how long that took, or panics with the survivors.
fn assert_no_tagged_process(m: &Master, tag: &str, timeout: Duration, what: &str) -> Duration {
    let started = Instant::now();
    let mut left = Vec::new();
    let gone = poll_until(timeout, || {
        left = pids_with_env("FAULTS_TAG", tag);
        left.retain(|&p| p != m.pid);
        left.is_empty()
    });
    if !gone {
        for &p in &left {
            let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
        }
        panic!(
            "{what}: processes {left:?} still alive after {timeout:?} (killed now)\n{}",
            m.stderr_text()
        );
    }
    started.elapsed()
}

// ---------------------------------------------------------------------------------
// A worker that crashes on every 10th connection
// ---------------------------------------------------------------------------------

fn crash_every_tenth(mode: &str) {
    let Some(worker) = channel_worker() else {
        return;
    };
    let m = Cluster::new()
        .workers(3)
        .args([
            "--balance",
            mode,
            "--listen",
            "127.0.0.1:0",
            "--respawn",
            "50ms",
        ])
        .env("CRASH_EVERY_0", "10")
        .command(&worker)
        .spawn();
    let addr = m.addr();
    m.wait_cluster_ready(3);
    let load = Load::start_with(
        addr,
        8,
        LoadOptions {
            sources: 32,
            half_close: false,
        },
    );
    // Until slot 0 has crashed 8 times (each crash is its 10th connection).
    let crashes = || m.events("worker_exited slot=0").len();
    let enough = poll_until(Duration::from_secs(40), || crashes() >= 8);
    let totals = load.stop();
    let crashed = crashes();
    terminate(&m, mode);
    let b = m.balancer_totals(DEADLINE);
    // What the crashed workers held and never served, by their own account.
    let lost: u64 = m
        .lines()
        .iter()
        .filter_map(|l| {
            let at = l.raw.find("channel_worker crash ")?;
            let lost = l.raw[at..]
                .split_whitespace()
                .find_map(|t| t.strip_prefix("lost="))?;
            lost.parse::<u64>().ok()
        })
        .sum();
    let reclaimed: u64 = m.events("reclaimed").iter().map(|l| l.num("count")).sum();
    println!(
        "{mode}: slot 0 crashes on every 10th connection: {crashed} crashes; clients: {} ok, {} \
         failed {:?}; the crashed workers held {lost} unserved; master: accepted {} handed {} \
         reclaimed {} (logged {reclaimed}) closed {}; served per slot {:?}",
        totals.ok,
        totals.failed(),
        totals.failures,
        b.accepted,
        b.handed,
        b.reclaimed,
        b.closed,
        totals.by_id
    );
    assert!(enough, "only {crashed} crashes of slot 0 in 40 s");
    // Every connection the master accepted was served, or was in a crashed worker's hands.
    assert_eq!(
        b.accepted,
        totals.ok + totals.failed(),
        "accepted vs the clients' connections"
    );
    assert_eq!(
        totals.failed(),
        lost,
        "failed connections vs those the crashed workers held: {:?}",
        totals.first_failures
    );
    assert_eq!(b.closed, 0, "connections closed by the master");
    assert_eq!(b.reclaimed, reclaimed);
    // The others kept serving, and slot 0 served between its crashes.
    for slot in 0..3 {
        assert!(
            totals.by_id.get(&slot).copied().unwrap_or(0) > 0,
            "slot {slot} served nothing: {:?}",
            totals.by_id
        );
    }
}

#[test]
fn rr_a_worker_crashing_on_every_10th_connection_loses_only_what_it_held() {
    crash_every_tenth("rr");
}

#[test]
fn sticky_a_worker_crashing_on_every_10th_connection_loses_only_what_it_held() {
    crash_every_tenth("sticky");
}

// ---------------------------------------------------------------------------------
// Garbage on the channel and on NOTIFY_SOCKET
// ---------------------------------------------------------------------------------

#[test]
fn a_worker_sending_garbage_on_its_channel_is_logged_then_killed_at_64_and_respawned() {
    let Some(worker) = channel_worker() else {
        return;
    };
    let mark = std::env::temp_dir().join(unique_tag("recluster-garbage"));
    let m = Cluster::new()
        .workers(2)
        .args([
            "--balance",
            "rr",
            "--listen",
            "127.0.0.1:0",
            "--respawn",
            "100ms",
        ])
        // Slot 0: 10 unknown lines (below the limit). Slot 1, its first worker only:
        // 22 unknown lines, 21 oversized messages, 21 messages with a descriptor = 64.
        .env("GARBAGE_0", "10")
        .env("GARBAGE_1", "22")
        .env("OVERSIZE_1", "21")
        .env("FDS_1", "21")
        .env("GARBAGE_ONCE_1", &mark)
        .command(&worker)
        .spawn();
    let addr = m.addr();
    let killing = m.wait_event("worker_garbage_killed slot=1", DEADLINE);
    let bad = killing.pid();
    let exited = m.wait_event(
        &format!("worker_exited slot=1 pid={bad} signal=9"),
        DEADLINE,
    );
    let respawned = m.wait_for("a new worker ready in slot 1", DEADLINE, |l| {
        l.matches("worker_ready slot=1") && l.pid() != bad
    });
    let counts = |slot: usize, pid: u32| -> Vec<u64> {
        m.events(&format!("worker_garbage slot={slot} pid={pid}"))
            .iter()
            .map(|l| l.num("count"))
            .collect()
    };
    // Slot 0's ten lines come before its `listening`: all are logged once it is ready,
    // which nothing above waited for (slot 1's respawn can be ready first).
    let slot0 = m.wait_event("worker_ready slot=0", DEADLINE).pid();
    let (logged0, logged1) = (counts(0, slot0), counts(1, bad));
    // The master serves both slots, slot 0's worker (below the limit) the same as before.
    let ids = collect_ids(addr, 2, DEADLINE);
    let fds = fd_count(m.pid);
    let null_fds = dev_null_fds(m.pid);
    let alive = pid_alive(m.pid);
    println!(
        "garbage: slot 1 sent 64 non-protocol messages (22 unknown, 21 oversized, 21 with a \
         descriptor): logged at counts {logged1:?}, killed, exited {:?} after the kill, \
         respawned (ready {:?} after); slot 0 sent 10: logged at {logged0:?}, not killed; \
         master: {fds} fds, {null_fds} of them /dev/null; served by {:?}",
        exited.since(&killing),
        respawned.since(&exited),
        ids.keys().collect::<Vec<_>>()
    );
    assert!(alive);
    assert_eq!(logged1, vec![1, 2, 4, 8, 16, 32, 64]);
    assert_eq!(logged0, vec![1, 2, 4, 8]);
    assert!(
        m.events("worker_garbage_killed slot=0").is_empty(),
        "slot 0 was killed below the limit"
    );
    assert!(m.events(&format!("worker_exited pid={slot0}")).is_empty());
    assert!(
        null_fds <= 3,
        "the master keeps {} of the 21 descriptors the worker sent it",
        null_fds - 3
    );
    assert_eq!(ids[&0].pid, slot0);
    assert_eq!(ids[&1].pid, respawned.pid());
    // The master's descriptors are those of any 2-worker cluster: same after a reload.
    let from = m.mark();
    m.signal(Signal::SIGUSR2);
    m.wait_event_after(from, "reload_finished generation=2", DEADLINE);
    let mut after = 0;
    let settled = poll_until(DEADLINE, || {
        after = fd_count(m.pid);
        after == fds
    });
    assert!(settled, "master fds {fds} before a reload, {after} after");
    terminate(&m, "garbage");
    let _ = std::fs::remove_file(&mark);
}

#[test]
fn a_flood_of_valid_messages_is_cut_off_and_costs_the_master_no_memory() {
    let Some(worker) = channel_worker() else {
        return;
    };
    let mark = std::env::temp_dir().join(unique_tag("recluster-flood"));
    let _ = std::fs::remove_file(&mark);
    // Slot 1's first worker stops reading its channel (so that nothing it holds is lost
    // when it is killed) and a child of it sends `listening` as fast as it can: 25 lines
    // a message, five million messages, which an unbounded queue would hold at once.
    let m = Cluster::new()
        .workers(3)
        .args([
            "--balance",
            "rr",
            "--listen",
            "127.0.0.1:0",
            "--respawn",
            "100ms",
        ])
        .env("FLOOD_1", "5000000")
        .env("FLOOD_ONCE_1", &mark)
        .env("STALL_SLOT", "1")
        .env("STALL_ONCE", mark.with_extension("stall"))
        .command(&worker)
        .spawn();
    let addr = m.addr();
    let before = rss_kib(m.pid).expect("master RSS");
    let load = Load::start(addr, 4);
    // The master cuts the flooder off (a rate budget, then the garbage limit), and the
    // slot gets a new worker; the master's memory is sampled all the while.
    let mut peak = before;
    let mut sample = || {
        peak = peak.max(rss_kib(m.pid).unwrap_or(0));
    };
    let killed = poll_until(DEADLINE, || {
        sample();
        !m.events("worker_garbage_killed slot=1").is_empty()
    });
    assert!(
        killed,
        "the flooder was never cut off (master RSS {before} KiB before, {} KiB now)",
        rss_kib(m.pid).unwrap_or(0)
    );
    let bad = m.events("worker_garbage_killed slot=1")[0].pid();
    let respawned = poll_until(DEADLINE, || {
        sample();
        m.lines()
            .iter()
            .any(|l| l.matches("worker_ready slot=1") && l.pid() != bad)
    });
    load.wait_more_ok(200, DEADLINE);
    sample();
    let totals = load.stop();
    let cpu = cpu_time(m.pid).unwrap_or_default();
    println!(
        "flood: master RSS {before} KiB before, peak {peak} KiB; flooder pid {bad} cut off; \
         load {} ok, {} failed; master CPU {cpu:?} in all",
        totals.ok,
        totals.failed()
    );
    assert!(respawned, "slot 1 got no new worker");
    assert!(peak < 16 * 1024, "master RSS reached {peak} KiB");
    assert_eq!(totals.failed(), 0, "{:?}", totals.first_failures);
    let _ = std::fs::remove_file(&mark);
    let _ = std::fs::remove_file(mark.with_extension("stall"));
    terminate(&m, "flood");
}

#[test]
fn the_notify_directory_of_a_killed_master_is_removed_by_the_next_one() {
    let base = std::env::temp_dir().join(unique_tag("notify-dirs"));
    std::fs::create_dir_all(&base).unwrap();
    let start = || {
        Cluster::new()
            .workers(1)
            .args(["--balance", "shared", "--listen", "127.0.0.1:0"])
            .env("TMPDIR", &base)
            .env("XDG_RUNTIME_DIR", &base)
            .spawn()
    };
    let dirs = || -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&base)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let first = start();
    first.wait_cluster_ready(1);
    let left = dirs();
    assert_eq!(left.len(), 1, "{left:?}");
    first.signal(Signal::SIGKILL);
    first
        .wait_exit(DEADLINE)
        .expect("the killed master is reaped");
    assert_eq!(dirs(), left, "a SIGKILLed master cannot clean up");
    let second = start();
    second.wait_cluster_ready(1);
    let now = dirs();
    println!("notify dirs: {left:?} after the kill, {now:?} once the next master runs");
    assert_eq!(now.len(), 1, "{now:?}");
    assert_ne!(now, left, "the dead master's directory is still there");
    assert!(now[0].starts_with(&format!("recluster-{}-", second.pid)));
    terminate(&second, "notify dirs");
    assert!(
        dirs().is_empty(),
        "a master that ends cleans up after itself"
    );
    std::fs::remove_dir_all(&base).unwrap();
}

/// Once terminate has started, a new client is refused (and retries elsewhere) rather
/// than left in the backlog until every worker has drained. (Not in `shared`: there the
/// workers hold the sockets and close them as they stop; see `close_listeners`.)
fn new_clients_refused_while_terminating(mode: &str) {
    let m = Cluster::new()
        .workers(1)
        .args([
            "--balance",
            mode,
            "--listen",
            "127.0.0.1:0",
            "--timeout",
            "20s",
        ])
        .command([echo()])
        .spawn();
    let addr = m.addr();
    m.wait_cluster_ready(1);
    // A client in the middle of a conversation (greeted: its worker has it) keeps the
    // echo worker draining.
    use std::io::{BufRead, Write};
    let held = std::net::TcpStream::connect(addr).expect("connect");
    let mut reader = std::io::BufReader::new(held.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    assert!(greeting.starts_with("id=0 "), "{greeting}");
    m.signal(Signal::SIGTERM);
    m.wait_event("terminating", DEADLINE);
    let mut accepted_after = 0;
    let refused = poll_until(DEADLINE, || {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            Ok(_) => {
                accepted_after += 1;
                false
            }
        }
    });
    let still_terminating = m.exit_status().is_none();
    println!(
        "{mode}: new clients refused once terminating: {refused} ({accepted_after} connected \
         before the sockets closed); master still draining: {still_terminating}"
    );
    assert!(
        refused,
        "{mode}: new clients still wait in the backlog while terminating"
    );
    assert!(
        still_terminating,
        "{mode}: the test proved nothing: the master had gone"
    );
    // The client in conversation is still served: it drains, then the master exits 0.
    (&held).write_all(b"still here\n").unwrap();
    let mut echoed = String::new();
    reader.read_line(&mut echoed).unwrap();
    assert_eq!(
        echoed, "still here\n",
        "{mode}: the draining worker stopped serving"
    );
    drop(reader);
    drop(held);
    assert!(m.expect_exit(DEADLINE).success());
}

#[test]
fn rr_new_clients_are_refused_once_terminate_starts() {
    new_clients_refused_while_terminating("rr");
}

#[test]
fn sticky_new_clients_are_refused_once_terminate_starts() {
    new_clients_refused_while_terminating("sticky");
}

#[test]
fn garbage_and_oversized_datagrams_on_notify_socket_are_ignored_and_do_not_make_a_worker_ready() {
    let Some(worker) = channel_worker() else {
        return;
    };
    let m = Cluster::new()
        .workers(2)
        .args([
            "--balance",
            "rr",
            "--listen",
            "127.0.0.1:0",
            "--ready-when",
            "ready",
            "--ready-timeout",
            "1500ms",
            "--respawn",
            "100ms",
        ])
        // Both send 800 datagrams that are not READY=1 (8 KiB ones starting with
        // `READY=1\n`, `READY=1x`, descriptors, …); only slot 0 then sends READY=1.
        .env("NOTIFY_GARBAGE", "800")
        .env("NOTIFY_READY_0", "1")
        .command(&worker)
        .spawn();
    let addr = m.addr();
    let ready0 = m.wait_event("worker_ready slot=0", DEADLINE);
    let late = m.wait_event("worker_not_ready_in_time slot=1", DEADLINE);
    let first1 = m.events("worker_spawned slot=1")[0].clone();
    // While slot 1 never becomes ready, slot 0 serves everything.
    let replies: Vec<Reply> = (0..50)
        .map(|i| {
            request_from(addr, None, false, Duration::from_secs(10))
                .unwrap_or_else(|f| panic!("request {i}: {f:?}"))
        })
        .collect();
    let ids: BTreeSet<usize> = replies.iter().map(|r| r.id).collect();
    let null_fds = dev_null_fds(m.pid);
    let spawned1 = m.events("worker_spawned slot=1").len();
    let cpu = cpu_time(m.pid).unwrap_or_default();
    println!(
        "notify garbage: 2 x 800 bad datagrams (100 of them with a descriptor); slot 0 ready after \
         its READY=1; slot 1 not ready in time ({:?} after spawn), spawned {spawned1} times so \
         far; 50 requests served by {ids:?}; master holds {null_fds} /dev/null fds, used {cpu:?} \
         CPU; not-protocol warnings: {}",
        late.since(&first1),
        m.events("worker_garbage").len()
    );
    assert_eq!(ready0.slot(), 0);
    assert!(
        m.events("worker_ready slot=1").is_empty(),
        "garbage made slot 1 ready"
    );
    assert_eq!(ids, BTreeSet::from([0]));
    assert!(
        null_fds <= 3,
        "the master keeps {} of the 200 descriptors sent to it",
        null_fds - 3
    );
    assert!(pid_alive(m.pid));
    terminate(&m, "notify garbage");
}

#[test]
fn ready_from_a_foreign_process_on_a_workers_notify_socket_is_ignored() {
    // The sender is this test process: another process group than any worker's.
    let m = shared_cluster(1)
        .args(["--ready-when", "ready", "--ready-timeout", "1s"])
        .spawn();
    let spawned = m.wait_event("worker_spawned slot=0 generation=1", DEADLINE);
    let pid = spawned.pid();
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("worker environ");
    let path = environ
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"NOTIFY_SOCKET="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .expect("NOTIFY_SOCKET in the worker's environment");
    let sock = std::os::unix::net::UnixDatagram::unbound().expect("socket");
    for _ in 0..10 {
        sock.send_to(b"READY=1", &path).expect("send READY=1");
    }
    let late = m.wait_event(
        &format!("worker_not_ready_in_time slot=0 pid={pid}"),
        DEADLINE,
    );
    println!(
        "10 x READY=1 from the test process (pid {}, group {:?}) to worker {pid}'s \
         NOTIFY_SOCKET: ignored, the worker was not ready in time ({:?} after spawn)",
        std::process::id(),
        process_group(std::process::id()),
        late.since(&spawned)
    );
    assert!(m.events(&format!("worker_ready pid={pid}")).is_empty());
    assert_ne!(process_group(std::process::id()), Some(pid));
}

// ---------------------------------------------------------------------------------
// A new generation that never becomes ready
// ---------------------------------------------------------------------------------

#[test]
fn a_generation_that_never_becomes_ready_is_retried_with_backoff_while_the_old_one_serves() {
    let Some(worker) = channel_worker() else {
        return;
    };
    let m = Cluster::new()
        .workers(2)
        .args([
            "--balance",
            "rr",
            "--listen",
            "127.0.0.1:0",
            "--ready-timeout",
            "1s",
            "--respawn",
            "100ms",
            "--backoff",
            "800ms",
            "--timeout",
            "1s",
        ])
        .env("NEVER_LISTEN_FROM_GEN", "2")
        .command(&worker)
        .spawn();
    let addr = m.addr();
    let old = m.wait_cluster_ready(2);
    let load = Load::start(addr, 4);
    load.wait_more_ok(50, DEADLINE);
    let from = m.mark();
    m.signal(Signal::SIGUSR2);
    // Four attempts per slot: 1 s each, respawned after 100, 200, 400, 800 ms (later in
    // the sequence if a first-generation worker was slow to start on a busy machine).
    let attempts = |slot: usize| {
        m.lines()[from..]
            .iter()
            .filter(|l| {
                l.matches(&format!(
                    "worker_not_ready_in_time slot={slot} generation=2"
                ))
            })
            .count()
    };
    let enough = poll_until(Duration::from_secs(20), || {
        attempts(0) >= 4 && attempts(1) >= 4
    });
    let during = load.ok_so_far();
    let totals = load.stop();
    let lines = m.lines()[from..].to_vec();
    let delays = |slot: usize| -> Vec<u64> {
        lines
            .iter()
            .filter(|l| l.matches(&format!("respawn_scheduled slot={slot}")))
            .map(|l| l.num("delay_ms"))
            .collect()
    };
    // From one ready timeout of slot 0 to the next: the respawn delay, then 1 s.
    let timeouts: Vec<&LogLine> = lines
        .iter()
        .filter(|l| l.matches("worker_not_ready_in_time slot=0 generation=2"))
        .collect();
    let gaps: Vec<Duration> = timeouts.windows(2).map(|w| w[1].since(w[0])).collect();
    // Gen-2 workers still alive: at most the pending one per slot (and retiring ones).
    let live_gen2 = lines
        .iter()
        .filter(|l| l.matches("worker_spawned generation=2"))
        .filter(|l| pid_alive(l.pid()))
        .count();
    println!(
        "never-ready generation 2: {} + {} attempts; respawn delays (ms) slot 0 {:?} slot 1 \
         {:?}; slot 0 from one ready timeout to the next {gaps:?}; old generation served {} \
         ok, {} failed, \
         generations seen {:?}; live gen-2 workers {live_gen2}",
        attempts(0),
        attempts(1),
        delays(0),
        delays(1),
        totals.ok,
        totals.failed(),
        totals.by_gen,
    );
    assert!(enough, "fewer than 4 attempts per slot in 20 s");
    assert!(during > 50);
    assert_eq!(totals.failed(), 0, "{:?}", totals.first_failures);
    assert_eq!(totals.by_gen.keys().copied().collect::<Vec<_>>(), vec![1]);
    for (gap, delay) in gaps.iter().zip(delays(0)) {
        let expected = Duration::from_millis(delay + 1000);
        assert!(
            *gap + Duration::from_millis(10) >= expected
                && *gap < expected + Duration::from_secs(1),
            "{gap:?} between ready timeouts, expected {expected:?} (respawn {delay} ms + 1 s)"
        );
    }
    for slot in 0..2 {
        let d = delays(slot);
        assert!(d.len() >= 4, "slot {slot} delays {d:?}");
        assert!(
            [100, 200, 400, 800].contains(&d[0])
                && d.windows(2).all(|w| w[1] == (w[0] * 2).min(800)),
            "slot {slot}: respawn delays {d:?}, not doubling from 100 ms up to --backoff 800 ms"
        );
    }
    assert!(live_gen2 <= 4, "{live_gen2} gen-2 workers alive");
    // The old workers are the ones serving, untouched.
    for (slot, pid) in &old {
        assert!(pid_alive(*pid), "old worker of slot {slot} died");
    }
    terminate(&m, "never ready");
}

// ---------------------------------------------------------------------------------
// A reload storm
// ---------------------------------------------------------------------------------

fn reload_storm(mode: &str) {
    let workers = 3;
    let tag = unique_tag("storm");
    let cluster = Cluster::new()
        .workers(workers)
        .args(["--balance", mode, "--listen", "127.0.0.1:0"])
        .env("FAULTS_TAG", &tag);
    let (m, half_close) = if mode == "shared" {
        (cluster.spawn(), false)
    } else {
        (cluster.command([echo()]).spawn(), true)
    };
    let addr = m.addr();
    m.wait_cluster_ready(workers);
    // Counted before the load: under load the master holds each connection it accepted
    // until the hand-off, so a count taken then includes a varying few of them.
    let fds_before = fd_count(m.pid);
    let load = Load::start_with(
        addr,
        4,
        LoadOptions {
            sources: 16,
            half_close,
        },
    );
    load.wait_more_ok(20, DEADLINE);
    let last_started = || {
        m.events("reload_started")
            .iter()
            .map(|l| l.generation())
            .max()
            .unwrap_or(1)
    };
    // 50 signals, one every 19 ms (the pace is the storm's, it synchronises nothing),
    // and more until the master has started two reloads at least: a master slower than
    // the storm merges pending signals, and the test waits for reloads, not for time.
    let started = Instant::now();
    let mut signals = 0;
    while signals < 50 || last_started() < 3 {
        assert!(
            started.elapsed() < DEADLINE,
            "{signals} SIGUSR2 in {DEADLINE:?} started {} reloads\n{}",
            last_started() - 1,
            m.stderr_text()
        );
        m.signal(Signal::SIGUSR2);
        signals += 1;
        hold(Duration::from_millis(19));
    }
    let storm = started.elapsed();
    let totals = load.stop();
    // Settled: the last generation started has finished, exactly N workers remain (the
    // processes of this cluster are the master's children), and they answer. A signal
    // sent last may still start one more reload after a settled look (the master takes
    // pending signals in its own time): then the cluster is looked at again.
    let mut last = 0;
    let mut children = Vec::new();
    let mut tagged = Vec::new();
    let mut replies: Vec<Reply> = Vec::new();
    let mut settled = false;
    for _look in 0..5 {
        settled = poll_until(Duration::from_secs(60), || {
            last = last_started();
            children = children_of(m.pid);
            children.sort_unstable();
            tagged = pids_with_env("FAULTS_TAG", &tag);
            tagged.retain(|&p| p != m.pid);
            tagged.sort_unstable();
            m.try_wait_event_after(
                0,
                &format!("reload_finished generation={last}"),
                Duration::ZERO,
            )
            .is_some()
                && children.len() == workers
                && tagged == children
        });
        replies = (0..3 * workers)
            .map(|_| {
                request_from(addr, None, half_close, Duration::from_secs(10)).expect("request")
            })
            .collect();
        if !settled || last_started() == last {
            break;
        }
    }
    let settle = started.elapsed();
    let mut fds_after = 0;
    let fds_flat = poll_until(DEADLINE, || {
        fds_after = fd_count(m.pid);
        fds_after == fds_before
    });
    let spawned = m.spawned_pids();
    let final_pids: BTreeSet<u32> = m.ready_workers(last).values().copied().collect();
    let leaked: Vec<u32> = spawned
        .iter()
        .copied()
        .filter(|p| !final_pids.contains(p) && pid_alive(*p))
        .collect();
    let gens: BTreeSet<u32> = replies.iter().map(|r| r.gen).collect();
    println!(
        "{mode}: {signals} SIGUSR2 in {storm:?} -> {} reloads started, last generation {last}; settled \
         {settle:?} after the first signal; {} workers spawned in all, {} alive: {children:?}; \
         master fds {fds_before} before, {fds_after} after; load {} ok, {} failed; replies \
         after from generations {gens:?}",
        m.events("reload_started").len(),
        spawned.len(),
        tagged.len(),
        totals.ok,
        totals.failed(),
    );
    assert!(settled, "not settled in 60 s\n{}", m.stderr_text());
    assert!(last > 2, "the storm made only {} reloads", last - 1);
    assert_eq!(
        tagged, children,
        "processes of this cluster vs the master's children"
    );
    assert_eq!(
        children.iter().copied().collect::<BTreeSet<_>>(),
        final_pids,
        "the live workers are the last generation's"
    );
    assert!(
        leaked.is_empty(),
        "workers of older generations alive: {leaked:?}"
    );
    assert_eq!(gens, BTreeSet::from([last]));
    assert!(
        fds_flat,
        "master fds {fds_before} before the storm, {fds_after} after"
    );
    assert_eq!(totals.failed(), 0, "{:?}", totals.first_failures);
    terminate(&m, mode);
    assert_no_tagged_process(&m, &tag, DEADLINE, mode);
}

#[test]
fn rr_50_reloads_within_a_second_end_with_n_workers_of_the_last_generation_and_no_leak() {
    reload_storm("rr");
}

#[test]
fn shared_50_reloads_within_a_second_end_with_n_workers_of_the_last_generation_and_no_leak() {
    reload_storm("shared");
}

// ---------------------------------------------------------------------------------
// SIGTERM during a reload; SIGKILL of the master at a random moment
// ---------------------------------------------------------------------------------

#[test]
fn sigterm_during_a_reload_exits_zero_and_leaves_no_worker() {
    let tag = unique_tag("term-reload");
    // Generation 2 boots for ten minutes: the reload is still in progress when SIGTERM
    // comes, however slowly this test runs. (Its workers sleep with SIGTERM's default
    // action, so the stop signal ends them.)
    let worker = test_worker();
    let m = shared_cluster(3)
        .env("FAULTS_TAG", &tag)
        .command([
            "sh".as_ref(),
            "-c".as_ref(),
            r#"[ "$RECLUSTER_GENERATION" = 1 ] || export TEST_WORKER_LISTEN_DELAY_MS=600000; exec "$0""#
                .as_ref(),
            worker.as_os_str(),
        ])
        .spawn();
    let addr = m.addr();
    m.wait_cluster_ready(3);
    let load = Load::start(addr, 4);
    load.wait_more_ok(20, DEADLINE);
    let from = m.mark();
    m.signal(Signal::SIGUSR2);
    for slot in 0..3 {
        m.wait_event_after(
            from,
            &format!("worker_spawned slot={slot} generation=2"),
            DEADLINE,
        );
    }
    m.signal(Signal::SIGTERM);
    let exit = m.expect_exit(DEADLINE);
    let totals = load.stop();
    let gone_after = assert_no_tagged_process(&m, &tag, Duration::from_secs(5), "SIGTERM");
    let terminating = m.wait_event_after(from, "terminating", DEADLINE);
    let terminated = m.wait_event_after(from, "terminated", DEADLINE);
    let took = terminated.since(&terminating);
    let spawned = m.spawned_pids().len();
    let finished = m.events("reload_finished generation=2").len();
    let killed = m.events("worker_killed_after_timeout").len();
    println!(
        "SIGTERM during a reload: exit {exit:?}, {took:?} from terminating to terminated by \
         the master's clock; {spawned} workers spawned, {killed} killed after the timeout, none \
         left ({gone_after:?} after exit); load before: {} ok",
        totals.ok
    );
    assert_eq!(finished, 0, "the reload finished before SIGTERM");
    assert!(
        m.events("worker_ready generation=2").is_empty(),
        "a generation-2 worker that never listened was ready"
    );
    assert!(exit.success(), "{exit:?}\n{}", m.stderr_text());
    assert_eq!(spawned, 6, "one worker per slot and generation");
    // Every worker, the serving and the booting ones, ended on the stop signal.
    assert_eq!(killed, 0, "{}", m.stderr_text());
    for slot in 0..3 {
        assert_eq!(
            m.events(&format!("worker_exited slot={slot} generation=2 signal=15"))
                .len(),
            1,
            "slot {slot}'s booting worker was not stopped by SIGTERM\n{}",
            m.stderr_text()
        );
    }
    assert!(took < Duration::from_secs(5), "terminating took {took:?}");
}

#[test]
fn sigkill_of_the_master_at_random_moments_leaves_no_worker() {
    let mut rng = Rng::from_env_or_clock();
    let seed = rng.seed();
    let mut figures = Vec::new();
    for round in 0..6 {
        let tag = unique_tag("kill-master");
        let mode = ["rr", "shared", "sticky"][round % 3];
        let cluster = Cluster::new()
            .workers(3)
            .args([
                "--balance",
                mode,
                "--listen",
                "127.0.0.1:0",
                "--respawn",
                "20ms",
            ])
            .env("FAULTS_TAG", &tag);
        let m = if mode == "shared" {
            cluster.spawn()
        } else {
            cluster.command([echo()]).spawn()
        };
        let start = Instant::now();
        // A random moment in the first 1.5 s: before, during or after the first
        // generation's start, with reloads going on (from the moment the master has its
        // signal handlers: see the next test for before).
        let moment = Duration::from_millis(rng.below(1500));
        let mut reloads = 0;
        let handlers = poll_until(moment, || {
            m.try_wait_event_after(0, "listening", Duration::ZERO)
                .is_some()
        });
        while handlers && start.elapsed() < moment {
            hold(Duration::from_millis(rng.below(100)).min(moment.saturating_sub(start.elapsed())));
            if start.elapsed() < moment && rng.below(3) == 0 {
                m.signal(Signal::SIGUSR2);
                reloads += 1;
            }
        }
        m.signal(Signal::SIGKILL);
        let exit = m.expect_exit(DEADLINE);
        let spawned = m.spawned_pids().len();
        let gone = assert_no_tagged_process(
            &m,
            &tag,
            Duration::from_secs(5),
            &format!("round {round} ({mode}, seed {seed})"),
        );
        assert_eq!(exit.signal, Some(libc::SIGKILL));
        figures.push(format!(
            "{mode} killed at {moment:?} ({reloads} reloads, {spawned} workers spawned): all gone {gone:?} after"
        ));
    }
    println!(
        "SIGKILL of the master (seed {seed}):\n  {}",
        figures.join("\n  ")
    );
}

/// Whether `signal` is in the `SigBlk` (blocked) or `SigCgt` (caught) mask of `pid`.
fn signal_state(pid: u32, signal: Signal) -> (bool, bool) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let bit = 1u64 << (signal as i32 - 1);
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|m| m & bit != 0)
    };
    (mask("SigBlk:"), mask("SigCgt:"))
}

/// A reload signal during the master's start-up, before its handlers exist, is held
/// pending (the master blocks it first thing in `main`) and acted on once they do.
/// The instant between exec and `main` (the dynamic loader) cannot be covered by any
/// program; the test sends its signal once /proc shows the signal blocked. Whether this
/// test sees that window depends on how the two processes are scheduled: it runs 10
/// rounds, and more (up to 100) until it has sent a signal in the window once.
#[test]
fn a_reload_signal_during_start_up_is_held_and_does_not_kill_the_master() {
    let mut figures = Vec::new();
    let mut caught_blocked = 0;
    let mut rounds = 0;
    while rounds < 10 || (caught_blocked == 0 && rounds < 100) {
        rounds += 1;
        let tag = unique_tag("early-usr2");
        let m = shared_cluster(1).env("FAULTS_TAG", &tag).spawn();
        // Watch the start-up: the moment SIGUSR2 shows as blocked, send it.
        // A tight loop, not a timed poll: the window is well under a millisecond.
        let mut sent_blocked = false;
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            let (blocked, caught) = signal_state(m.pid, Signal::SIGUSR2);
            if blocked && !caught {
                m.signal(Signal::SIGUSR2);
                sent_blocked = true;
            }
            if blocked || caught {
                break;
            }
        }
        if !sent_blocked {
            m.signal(Signal::SIGUSR2);
        }
        caught_blocked += sent_blocked as usize;
        let outcome = if m
            .try_wait_event_after(0, "reload_finished generation=2", DEADLINE)
            .is_some()
        {
            terminate(&m, "early SIGUSR2");
            "reloaded".to_string()
        } else {
            // Say what happened: the exit (or none), whether it was sent while blocked,
            // and the master's last lines.
            let exit = m.wait_exit(DEADLINE);
            let log = m.stderr_text();
            let tail: Vec<&str> = log.lines().rev().take(6).collect();
            format!("{exit:?} sent_blocked={sent_blocked} log tail: {tail:?}")
        };
        assert_no_tagged_process(&m, &tag, DEADLINE, "early SIGUSR2");
        figures.push(outcome);
    }
    println!(
        "SIGUSR2 during start-up, {rounds} rounds ({caught_blocked} sent while it was blocked): {figures:?}"
    );
    assert!(figures.iter().all(|o| o == "reloaded"), "{figures:?}");
    assert!(
        caught_blocked >= 1,
        "never saw the start-up block in {rounds} rounds: the test proved nothing"
    );
}

// ---------------------------------------------------------------------------------
// Clients that reset at once, or never send
// ---------------------------------------------------------------------------------

fn rude_clients(mode: &str) {
    let m = Cluster::new()
        .workers(2)
        .args(["--balance", mode, "--listen", "127.0.0.1:0"])
        .command([echo()])
        .spawn();
    let addr = m.addr();
    let workers = m.wait_cluster_ready(2);
    request_from(addr, None, true, DEADLINE).expect("warm-up");
    let fds_master = fd_count(m.pid);
    let fds_workers: BTreeMap<u32, usize> = workers.values().map(|&p| (p, fd_count(p))).collect();
    let load = Load::start_with(
        addr,
        4,
        LoadOptions {
            sources: 16,
            half_close: true,
        },
    );
    load.wait_more_ok(20, DEADLINE);
    // 300 clients that connect and never send, from 30 addresses, held open.
    let idle: Vec<TcpStream> = (0..300)
        .map(|i| {
            let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
                .expect("socket");
            sock.bind(&SocketAddr::from((source_ip(100 + i % 30), 0)).into())
                .expect("bind");
            sock.connect_timeout(&addr.into(), Duration::from_secs(5))
                .expect("idle connect");
            sock.into()
        })
        .collect();
    // 3000 at least that connect and reset at once; they go on until the others have
    // been served RESET_OK_DURING times since they began (a deadline after the 3000th):
    // the others are served while clients reset, however fast either side runs.
    const RESET_OK_DURING: u64 = 50;
    let ok_before = load.ok_so_far();
    let reset_started = Instant::now();
    let (mut attempts, mut resets) = (0usize, 0usize);
    let mut ok_during;
    let mut deadline = None;
    loop {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.bind(&SocketAddr::from((source_ip(150 + attempts % 30), 0)).into())
            .expect("bind");
        attempts += 1;
        if sock
            .connect_timeout(&addr.into(), Duration::from_secs(5))
            .is_ok()
        {
            let _ = sock.set_linger(Some(Duration::ZERO));
            resets += 1;
        }
        drop(sock);
        ok_during = load.ok_so_far() - ok_before;
        if attempts >= 3000 {
            if ok_during >= RESET_OK_DURING {
                break;
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + DEADLINE);
            assert!(
                Instant::now() < deadline,
                "{mode}: only {ok_during} served while {attempts} clients connected and reset"
            );
        }
    }
    let reset_time = reset_started.elapsed();
    // The others still are served.
    load.wait_more_ok(100, DEADLINE);
    let fds_workers_during: Vec<usize> = workers.values().map(|&p| fd_count(p)).collect();
    let totals = load.stop();
    // With the 300 idle clients still connected, the master holds none of them.
    let mut fds_master_during = 0;
    let master_holds_none = poll_until(DEADLINE, || {
        fds_master_during = fd_count(m.pid);
        fds_master_during == fds_master
    });
    drop(idle);
    let mut now_master = 0;
    let master_flat = poll_until(DEADLINE, || {
        now_master = fd_count(m.pid);
        now_master == fds_master
    });
    let mut now_workers = BTreeMap::new();
    let workers_flat = poll_until(DEADLINE, || {
        now_workers = fds_workers.keys().map(|&p| (p, fd_count(p))).collect();
        now_workers == fds_workers
    });
    println!(
        "{mode}: 300 idle clients held + {resets} connect-and-reset in {reset_time:?}: others \
         served {ok_during} meanwhile, {} ok / {} failed in all; master fds {fds_master} -> \
         {fds_master_during} (during) -> {now_master}; worker fds {:?} -> {fds_workers_during:?} \
         -> {:?}",
        totals.ok,
        totals.failed(),
        fds_workers.values().collect::<Vec<_>>(),
        now_workers.values().collect::<Vec<_>>(),
    );
    assert!(attempts >= 3000);
    assert_eq!(resets, attempts, "connects that failed");
    assert_eq!(totals.failed(), 0, "{:?}", totals.first_failures);
    assert!(
        ok_during >= RESET_OK_DURING,
        "nobody was served while clients reset"
    );
    assert!(
        master_holds_none,
        "the master holds idle clients: {fds_master_during} fds, {fds_master} before"
    );
    assert!(
        master_flat,
        "master fds {fds_master} before, {now_master} after"
    );
    assert!(
        workers_flat,
        "worker fds {fds_workers:?} before, {now_workers:?} after"
    );
    terminate(&m, mode);
}

#[test]
fn rr_clients_that_reset_at_once_or_never_send_affect_no_one_and_leak_nothing() {
    rude_clients("rr");
}

#[test]
fn sticky_clients_that_reset_at_once_or_never_send_affect_no_one_and_leak_nothing() {
    rude_clients("sticky");
}

// ---------------------------------------------------------------------------------
// A stuck worker
// ---------------------------------------------------------------------------------

#[test]
fn a_stopped_worker_under_sticky_load_is_found_stuck_its_clients_served_elsewhere() {
    // SIGSTOP: alive, reading nothing. Its sticky clients used to wait in its queue for
    // as long as it stayed stopped (here: every load thread, blocked on one of them).
    let m = Cluster::new()
        .workers(3)
        .args([
            "--balance",
            "sticky",
            "--listen",
            "127.0.0.1:0",
            "--stuck-timeout",
            "1s",
            "--timeout",
            "60s",
            "--respawn",
            "100ms",
        ])
        .command([echo()])
        .spawn();
    let addr = m.addr();
    let ready = m.wait_cluster_ready(3);
    let load = Load::start_with(
        addr,
        8,
        LoadOptions {
            sources: 16,
            half_close: true,
        },
    );
    load.wait_more_ok(300, DEADLINE);
    let stopped = ready[&1];
    let from = m.mark();
    kill(Pid::from_raw(stopped as i32), Signal::SIGSTOP).unwrap();
    let stopped_at = Instant::now();
    let stuck = m.wait_event_after(from, "worker_stuck slot=1", DEADLINE);
    let found_after = stopped_at.elapsed();
    let reclaimed = m
        .try_wait_event_after(from, &format!("reclaimed pid={stopped}"), DEADLINE)
        .map_or(0, |l| l.num("count"));
    let replaced = m.wait_for_after(from, "a new worker ready in slot 1", DEADLINE, |l| {
        l.matches("worker_ready slot=1") && l.pid() != stopped
    });
    // Still stopped: everyone, its clients included, is served by the others.
    let ok = load.ok_so_far();
    load.wait_more_ok(300, DEADLINE);
    let served_while_stopped = load.ok_so_far() - ok;
    let still_stopped = pid_alive(stopped);
    // It wakes up: it reads `stop`, finishes what it had read and exits by itself.
    kill(Pid::from_raw(stopped as i32), Signal::SIGCONT).unwrap();
    let exited = m.wait_event_after(from, &format!("worker_exited pid={stopped}"), DEADLINE);
    let totals = load.stop();
    println!(
        "stuck: slot 1 (pid {stopped}) SIGSTOPped under sticky load (8 clients, 16 source \
         addresses): found stuck {found_after:?} later (unread {} ms, --stuck-timeout 1s), \
         {reclaimed} connections reclaimed, replaced by pid {} ({:?} after), {served_while_stopped} \
         served while it stayed stopped; after SIGCONT it exited {}; load {} ok, {} failed, by \
         slot {:?}",
        stuck.num("unread_ms"),
        replaced.pid(),
        replaced.since(&stuck),
        exited.field("code").map_or_else(|| exited.raw.clone(), |c| format!("code={c}")),
        totals.ok,
        totals.failed(),
        totals.by_id,
    );
    assert!(still_stopped);
    assert!(
        stuck.num("unread_ms") >= 1000,
        "reported stuck after {} ms unread, before --stuck-timeout",
        stuck.num("unread_ms")
    );
    assert!(reclaimed >= 1, "nothing reclaimed from the stopped worker");
    assert_eq!(exited.field("code"), Some("0"), "{}", exited.raw);
    assert_eq!(totals.failed(), 0, "{:?}", totals.first_failures);
    terminate(&m, "stuck");
}

// ---------------------------------------------------------------------------------
// Out of file descriptors
// ---------------------------------------------------------------------------------

/// Warnings of accept errors for want of descriptors the master logs in a run of them.
const FD_WARNINGS: usize = 3;

#[test]
fn out_of_descriptors_the_master_neither_spins_nor_dies_and_serves_again_when_fds_free_up() {
    let m = Cluster::new()
        .workers(2)
        .nofile(64)
        .args(["--balance", "rr", "--listen", "127.0.0.1:0"])
        .command([echo()])
        .spawn();
    let addr = m.addr();
    m.wait_cluster_ready(2);
    request_from(addr, None, true, DEADLINE).expect("warm-up");
    let fds_before = fd_count(m.pid);
    // No descriptor left: the lowest free number is the limit. From here until the
    // limit is raised again (`exhausted`, as timed by this test: it holds the master's
    // whole shortage, however late the test runs), every accept fails.
    let limit = lowest_free_fd(m.pid);
    let from = m.mark();
    let exhausted_from = Instant::now();
    let original = set_nofile(m.pid, limit);
    let load = Load::start_with(
        addr,
        8,
        LoadOptions {
            sources: 0,
            half_close: true,
        },
    );
    // The master warns at most once a second while accepts fail: wait for a run of
    // FD_WARNINGS warnings, two seconds at least by the master's own clock.
    let first = m.wait_event_after(from, "accept_paused_fds", DEADLINE);
    let ok0 = load.ok_so_far();
    let cpu0 = cpu_time(m.pid).expect("master cpu");
    let t0 = Instant::now();
    let mut last = first.clone();
    for _ in 1..FD_WARNINGS {
        last = m.wait_event_after(last.index + 1, "accept_paused_fds", DEADLINE);
    }
    let window = t0.elapsed();
    let cpu = cpu_time(m.pid).expect("master cpu") - cpu0;
    let served_exhausted = load.ok_so_far() - ok0;
    let alive = pid_alive(m.pid);
    // Descriptors free up.
    set_nofile(m.pid, original);
    let exhausted = exhausted_from.elapsed();
    let freed = Instant::now();
    let ok1 = load.ok_so_far();
    let recovered = poll_until(DEADLINE, || load.ok_so_far() > ok1);
    let recovery = freed.elapsed();
    // On the clock the master stamps its lines with.
    let recovered_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970");
    load.wait_more_ok(500, DEADLINE);
    let totals = load.stop();
    // Polled: a connection the load closed may still be on its way to a worker.
    let mut fds_after = 0;
    poll_until(DEADLINE, || {
        fds_after = fd_count(m.pid);
        fds_after == fds_before
    });
    terminate(&m, "fd exhaustion");
    let b = m.balancer_totals(DEADLINE);
    let warnings: Vec<LogLine> = m.lines()[from..]
        .iter()
        .filter(|l| l.matches("accept_paused_fds"))
        .cloned()
        .collect();
    let gaps: Vec<Duration> = warnings.windows(2).map(|w| w[1].since(&w[0])).collect();
    // Warnings stamped after a client was served again with the limit raised.
    let late_warnings = warnings
        .iter()
        .filter(|l| l.time.expect("timestamped") > recovered_at)
        .count();
    // The pause after each failed accept, as the master states it.
    let pause = Duration::from_millis(first.num("pause_ms"));
    // One failed accept per pause at most, over the time the limit was low.
    let max_errors = (exhausted.as_millis() / pause.as_millis().max(1)) as u64 + 2;
    println!(
        "out of fds (limit {limit} = lowest free fd, was {original}): master CPU {cpu:?} over \
         {window:?} ({:.1} %) between its first and last of {FD_WARNINGS} warnings, \
         {served_exhausted} served meanwhile; {} warnings in all, {gaps:?} apart; accept \
         errors {} (at most {max_errors}: one per {pause:?} in the {exhausted:?} the limit was \
         low); alive {alive}; served again {recovery:?} after the limit was raised; load {} \
         ok {} failed; master fds {fds_before} before, {fds_after} after",
        cpu.as_secs_f64() * 100.0 / window.as_secs_f64(),
        warnings.len(),
        b.accept_errors,
        totals.ok,
        totals.failed(),
    );
    assert!(alive, "the master died");
    assert!(
        cpu < window / 10,
        "the master used {cpu:?} of CPU in {window:?} without descriptors: spinning"
    );
    assert_eq!(served_exhausted, 0, "served without a free descriptor?");
    assert_eq!(pause, Duration::from_millis(100), "{}", first.raw);
    // At most one warning a second: they are a second apart by the master's clock (it
    // times its limit a moment before it stamps the line, hence the margin), and no more
    // of them than seconds in the time the limit was low.
    assert!(
        gaps.iter().all(|g| *g >= Duration::from_millis(500)),
        "warnings {gaps:?} apart: more than one a second"
    );
    assert!(
        warnings.len() as u64 <= exhausted.as_secs() + 1,
        "{} warnings in {exhausted:?}: more than one a second",
        warnings.len()
    );
    assert_eq!(
        late_warnings, 0,
        "accepts failed after the limit was raised"
    );
    // Each warning is an accept error; and a pause after each one, not thousands.
    assert!(
        b.accept_errors >= warnings.len() as u64 && b.accept_errors <= max_errors,
        "accept errors {}: {} warnings, at most {max_errors} in {exhausted:?}",
        b.accept_errors,
        warnings.len()
    );
    assert!(recovered, "not served again once descriptors were free");
    assert_eq!(totals.failed(), 0, "{:?}", totals.first_failures);
    assert_eq!(fds_after, fds_before);
}

#[test]
fn at_its_fd_limit_the_master_hands_off_before_it_pauses() {
    // One descriptor free: every accept after the first fails with EMFILE until the
    // connection in hand has gone to a worker. Handing it over frees the descriptor,
    // so the master must go on accepting, never pause: a pause would only make the
    // clients in the backlog wait (it used to pause 100 ms each time).
    let m = Cluster::new()
        .workers(2)
        .nofile(64)
        .args(["--balance", "rr", "--listen", "127.0.0.1:0"])
        .command([echo()])
        .spawn();
    let addr = m.addr();
    m.wait_cluster_ready(2);
    request_from(addr, None, true, DEADLINE).expect("warm-up");
    let limit = lowest_free_fd(m.pid) + 1;
    let from = m.mark();
    set_nofile(m.pid, limit);
    let load = Load::start_with(
        addr,
        16,
        LoadOptions {
            sources: 0,
            half_close: true,
        },
    );
    load.wait_more_ok(1000, DEADLINE);
    let totals = load.stop();
    let pauses = m.lines()[from..]
        .iter()
        .filter(|l| l.matches("accept_paused_fds"))
        .count();
    terminate(&m, "fd limit");
    let b = m.balancer_totals(DEADLINE);
    println!(
        "one free fd (limit {limit}), 16 clients: {} served in {:?}, {} failed; accept errors \
         (EMFILE) {}, accept pauses logged {pauses}",
        totals.ok,
        totals.elapsed,
        totals.failed(),
        b.accept_errors,
    );
    assert!(
        b.accept_errors > 0,
        "the master never ran out of descriptors: the test proves nothing"
    );
    assert_eq!(
        pauses, 0,
        "the master paused accepting while it could hand connections off"
    );
    assert_eq!(totals.failed(), 0, "{:?}", totals.first_failures);
}

#[test]
fn a_worker_with_a_low_soft_fd_limit_loses_no_connection() {
    // The worker starts with `ulimit -S -n 64` (the hard limit is left high): the worker
    // library raises it, as servers do, and never reads more descriptors than it can
    // take. 300 clients hold their connections open.
    let echo = echo();
    let m = Cluster::new()
        .workers(1)
        .args(["--listen", "127.0.0.1:0"])
        .command(["sh", "-c", &format!("ulimit -S -n 64 && exec '{echo}'")])
        .spawn();
    let addr = m.addr();
    m.wait_cluster_ready(1);
    use std::io::{BufRead, BufReader};
    let mut held = Vec::new();
    let mut lost = 0;
    for _ in 0..300 {
        let s = std::net::TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut greeting = String::new();
        match BufReader::new(&s).read_line(&mut greeting) {
            Ok(n) if n > 0 && greeting.starts_with("id=0 ") => held.push(s),
            _ => lost += 1,
        }
    }
    println!(
        "low fd limit: {} of 300 held connections greeted, {lost} lost",
        held.len()
    );
    assert_eq!(lost, 0, "connections lost at the worker's descriptor limit");
    let t = {
        drop(held);
        m.signal(Signal::SIGTERM);
        m.balancer_totals(DEADLINE)
    };
    assert_eq!((t.accepted, t.handed, t.closed), (300, 300, 0));
}
