//! End to end: rolling reloads (`--reload-batch`) and reloads abandoned after failed
//! starts (`--reload-abort-after`).
//!
//! The number of workers serving or about to serve is read from the master's log:
//! `worker_spawned` adds one, `worker_retiring` (or an exit of a worker not told to
//! stop) takes one away. Every wait is for a log line or a reply, with a deadline.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// The most workers alive and not retiring at once in `lines`, starting from `live`.
fn most_not_retiring(lines: &[LogLine], mut live: BTreeSet<u32>) -> usize {
    let mut most = live.len();
    for l in lines {
        match l.event() {
            Some("worker_spawned") => {
                live.insert(l.pid());
            }
            Some("worker_retiring" | "worker_exited") => {
                live.remove(&l.pid());
            }
            _ => {}
        }
        most = most.max(live.len());
    }
    most
}

/// Requests (half-closed, for the echo worker) until every slot in `0..workers` has
/// answered: `slot → generations seen`.
fn serve_all(addr: SocketAddr, workers: usize) -> BTreeMap<usize, BTreeSet<u32>> {
    let mut seen = BTreeMap::<usize, BTreeSet<u32>>::new();
    let all = poll_until(DEADLINE, || {
        let r = request_from(addr, None, true, Duration::from_secs(15)).expect("request");
        seen.entry(r.id).or_default().insert(r.gen);
        seen.len() == workers
    });
    assert!(all, "slots served: {seen:?}");
    seen
}

#[test]
fn a_rolling_reload_of_four_workers_one_at_a_time_never_runs_more_than_five() {
    let m = Cluster::new()
        .workers(4)
        .args(["--balance", "rr", "--listen", "127.0.0.1:0"])
        .args(["--reload-batch", "1"])
        .command([echo()])
        .spawn();
    let addr = m.addr();
    let first: BTreeSet<u32> = m.wait_cluster_ready(4).into_values().collect();
    let from = m.mark();
    m.reload_to(2);
    let lines = &m.lines()[from..];
    let most = most_not_retiring(lines, first);
    eprintln!("at most {most} workers alive and not retiring during the reload of 4");
    assert!(
        most <= 5,
        "{most} workers alive and not retiring at once (4 + batch 1 at most)"
    );
    assert_eq!(most, 5, "each slot had its replacement");
    // One slot after the other, lowest first.
    let order: Vec<usize> = lines
        .iter()
        .filter(|l| l.matches("worker_spawned generation=2"))
        .map(LogLine::slot)
        .collect();
    assert_eq!(order, vec![0, 1, 2, 3]);
    let served = serve_all(addr, 4);
    assert!(
        served.values().all(|g| g == &BTreeSet::from([2])),
        "{served:?}"
    );
}

#[test]
fn a_reload_whose_new_workers_fail_to_start_is_aborted_and_the_old_workers_keep_serving() {
    // New workers exit 1 at once while the file `broken` exists.
    let broken = std::env::temp_dir().join(unique_tag("recluster-broken-deploy"));
    let echo = echo();
    let m = Cluster::new()
        .workers(4)
        .args([
            "--balance",
            "rr",
            "--listen",
            "127.0.0.1:0",
            "--respawn",
            "100ms",
        ])
        .args(["--reload-batch", "1", "--reload-abort-after", "2"])
        .env("BROKEN", &broken)
        .command([
            "sh",
            "-c",
            r#"[ -e "$BROKEN" ] && exit 1; exec "$0""#,
            echo.as_str(),
        ])
        .spawn();
    let addr = m.addr();
    let first = m.wait_cluster_ready(4);
    std::fs::write(&broken, b"").expect("create the broken file");
    let from = m.mark();
    m.signal(Signal::SIGUSR2);
    let aborted = m.wait_event_after(from, "reload_aborted generation=2 failures=2", DEADLINE);
    std::fs::remove_file(&broken).expect("remove the broken file");
    assert_eq!(aborted.level, "WARN", "{}", aborted.raw);
    let lines = &m.lines()[from..=aborted.index];
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.matches("worker_exited generation=2 code=1"))
            .count(),
        2,
        "two failed starts"
    );
    assert!(
        lines
            .iter()
            .all(|l| !l.matches("worker_spawned generation=2") || l.slot() == 0),
        "only slot 0 was tried (batch 1)"
    );
    assert!(m.events("worker_retiring generation=1").is_empty());
    assert!(m.events("reload_finished").is_empty());
    // The first generation serves on, every slot of it.
    let served = serve_all(addr, 4);
    assert!(
        served.values().all(|g| g == &BTreeSet::from([1])),
        "{served:?}"
    );
    assert_eq!(m.ready_workers(1), first);
    // A later reload starts afresh, and finishes.
    m.reload_to(3);
    let served = serve_all(addr, 4);
    assert!(
        served.values().all(|g| g == &BTreeSet::from([3])),
        "{served:?}"
    );
}
