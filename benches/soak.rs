//! Soak: conn load for a long time with a reload every 5 s and a `kill -9` of a random
//! worker every 7 s, in `rr` and `sticky`. Not run by CI; figures go to RELIABILITY.md.
//!
//! ```text
//! cargo bench --bench soak                          # 10 minutes per mode
//! SOAK_SECS=180 cargo bench --bench soak            # shorter
//! SOAK_MODES=sticky SOAK_CLIENTS=32 cargo bench --bench soak
//! ```
//!
//! The workers are `examples/echo` (the worker library), 4 of them; 16 clients make
//! new-connection requests from 64 source addresses (127.0.0.1..=64), half-closing so
//! the echo worker answers and closes.
//!
//! Passes when:
//! * every failed connection happened within [`KILL_WINDOW`] after a `kill -9` of a
//!   worker (connections a killed worker had read but not answered are lost with it;
//!   those it had not read are reclaimed by the master and served by others), so
//!   *unexplained* failures are zero;
//! * the master's RSS and descriptor count are flat: the last minute's maximum RSS is
//!   not above the first minute's (+ 25 %), and the last minute's lowest descriptor
//!   count is not above the first minute's (reloads hold a few more for a moment).
//!
//! The seed of the random kills is printed; `FAULTS_SEED=<seed>` repeats a run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A failure this long after a kill is attributed to it.
const KILL_WINDOW: Duration = Duration::from_secs(2);
const RELOAD_EVERY: Duration = Duration::from_secs(5);
const KILL_EVERY: Duration = Duration::from_secs(7);
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
}

struct Outcome {
    ok: bool,
    report: String,
}

fn soak(mode: &str, secs: u64, clients: usize, workers: usize, rng: &mut Rng) -> Outcome {
    let echo = example_bin("echo");
    let tag = unique_tag("soak");
    let m = Cluster::new()
        .workers(workers)
        .args([
            "--balance",
            mode,
            "--listen",
            "127.0.0.1:0",
            "--respawn",
            "100ms",
            "--timeout",
            "5s",
        ])
        .env("FAULTS_TAG", &tag)
        .command([echo])
        .spawn();
    let addr = m.addr();
    m.wait_cluster_ready(workers);
    let load = Load::start_with(
        addr,
        clients,
        LoadOptions {
            sources: 64,
            half_close: true,
        },
    );
    let started = load.started();
    let duration = Duration::from_secs(secs);
    let mut next_reload = RELOAD_EVERY;
    let mut next_kill = KILL_EVERY;
    let mut next_sample = Duration::ZERO;
    let mut kills: Vec<Duration> = Vec::new();
    let mut reloads = 0u32;
    let mut samples: Vec<Sample> = Vec::new();
    loop {
        let now = started.elapsed();
        if now >= duration {
            break;
        }
        if now >= next_sample {
            samples.push(Sample {
                at: now,
                rss_kib: rss_kib(m.pid).unwrap_or(0),
                fds: fd_count(m.pid),
            });
            next_sample += SAMPLE_EVERY;
        }
        if now >= next_reload {
            m.signal(Signal::SIGUSR2);
            reloads += 1;
            next_reload += RELOAD_EVERY;
        }
        if now >= next_kill {
            let children = children_of(m.pid);
            if !children.is_empty() {
                let victim = children[rng.below(children.len() as u64) as usize];
                if kill(Pid::from_raw(victim as i32), Signal::SIGKILL).is_ok() {
                    kills.push(started.elapsed());
                }
            }
            next_kill += KILL_EVERY;
        }
        let wake = next_sample.min(next_reload).min(next_kill).min(duration);
        std::thread::park_timeout(wake.saturating_sub(started.elapsed()));
        assert!(
            m.exit_status().is_none(),
            "the master died\n{}",
            m.stderr_text()
        );
    }
    let totals = load.stop();
    let live_workers = children_of(m.pid).len();
    m.signal(Signal::SIGTERM);
    let exit = m.expect_exit(Duration::from_secs(30));
    let balancer = m.balancer_totals(Duration::from_secs(5));
    let leaked = pids_with_env("FAULTS_TAG", &tag);

    let explained = |t: &Duration| kills.iter().any(|k| *k <= *t && *t <= *k + KILL_WINDOW);
    let unexplained: Vec<Duration> = totals
        .failure_times
        .iter()
        .filter(|t| !explained(t))
        .copied()
        .collect();
    let minute = Duration::from_secs(60.min(secs / 3).max(1));
    let first: Vec<&Sample> = samples.iter().filter(|s| s.at < minute).collect();
    let last: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at + minute >= duration)
        .collect();
    let max_rss = |v: &[&Sample]| v.iter().map(|s| s.rss_kib).max().unwrap_or(0);
    // Descriptors by the window's minimum: a reload or a batch in flight holds a few
    // more for a moment (each pending worker's channel is two), which a maximum catches
    // by chance of sampling; a leak raises the floor.
    let min_fds = |v: &[&Sample]| v.iter().map(|s| s.fds).min().unwrap_or(0);
    let (rss_first, rss_last) = (max_rss(&first), max_rss(&last));
    let (fds_first, fds_last) = (min_fds(&first), min_fds(&last));
    let rss_flat = rss_last <= rss_first + rss_first / 4;
    let fds_flat = fds_last <= fds_first;
    let finished = m.events("reload finished").len();
    let ok = unexplained.is_empty()
        && rss_flat
        && fds_flat
        && exit.success()
        && leaked.is_empty()
        && balancer.closed == 0;
    let report = format!(
        "soak {mode}: {secs} s, {workers} echo workers, {clients} clients (conn load, 64 sources)\n\
         \x20 requests ok {} ({:.0}/s), failed {} {:?}\n\
         \x20 reloads sent {reloads}, finished {finished}; kill -9 of a worker: {}\n\
         \x20 failures within {KILL_WINDOW:?} after a kill: {}, unexplained: {} {:?}\n\
         \x20 balancer: accepted {} handed {} reclaimed {} closed {} full {} fallbacks {} accept_errors {}\n\
         \x20 master RSS KiB: max first {:?} {rss_first}, max last {:?} {rss_last} (flat: {rss_flat})\n\
         \x20 master fds: min first {:?} {fds_first}, min last {:?} {fds_last} (flat: {fds_flat})\n\
         \x20 workers at the end {live_workers}; exit {exit:?}; processes left after exit {}\n\
         \x20 verdict: {}",
        totals.ok,
        totals.ok as f64 / totals.elapsed.as_secs_f64(),
        totals.failed(),
        totals.failures,
        kills.len(),
        totals.failure_times.len() - unexplained.len(),
        unexplained.len(),
        &unexplained[..unexplained.len().min(10)],
        balancer.accepted,
        balancer.handed,
        balancer.reclaimed,
        balancer.closed,
        balancer.full,
        balancer.fallbacks,
        balancer.accept_errors,
        minute,
        minute,
        minute,
        minute,
        leaked.len(),
        if ok { "PASS" } else { "FAIL" },
    );
    Outcome { ok, report }
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is taken from the command line.
    let secs: u64 = env_or("SOAK_SECS", 600);
    let clients: usize = env_or("SOAK_CLIENTS", 16);
    let workers: usize = env_or("SOAK_WORKERS", 4);
    let modes: String = env_or("SOAK_MODES", "rr,sticky".to_string());
    let mut rng = Rng::from_env_or_clock();
    println!("soak: seed {} (FAULTS_SEED to repeat)", rng.seed());
    let mut all_ok = true;
    let started = Instant::now();
    for mode in modes.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let outcome = soak(mode, secs, clients, workers, &mut rng);
        println!("{}", outcome.report);
        all_ok &= outcome.ok;
    }
    println!("soak: done in {:?}", started.elapsed());
    if !all_ok {
        std::process::exit(1);
    }
}
