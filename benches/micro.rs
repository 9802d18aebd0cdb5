//! Micro-benchmarks of the balancer's per-connection work, with a plain timing loop.
//!
//! ```text
//! cargo bench --bench micro
//! ```
//!
//! * slot choice: `recluster::balance::Router::choose` in `rr` and `sticky` over 2,
//!   16 and 64 ready slots (sticky hashes a different client IP each time);
//! * the worker-channel records: `channel::encode_conn` of a batch of 64 connections
//!   (one full SCM_RIGHTS message), and `channel::lines` + `parse_master_line` of it.
//!
//! Each figure is the best (lowest) of several rounds of a timed loop, in ns per
//! operation; `std::hint::black_box` keeps the optimiser honest. No criterion: it is
//! too heavy for CI's compile time.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use recluster::balance::Router;
use recluster::channel::{self, MasterLine};
use recluster::Balance;

/// Rounds per figure; the best one is reported.
const ROUNDS: usize = 7;
/// Rough time budget per round.
const ROUND_TIME: Duration = Duration::from_millis(60);

/// Times `op` (which does `per_call` operations per call) and returns ns per operation.
fn bench(per_call: u64, mut op: impl FnMut(u64)) -> f64 {
    // Calibrate: how many calls fit one round.
    let mut calls = 1u64;
    loop {
        let t = Instant::now();
        for i in 0..calls {
            op(i);
        }
        if t.elapsed() >= ROUND_TIME / 4 || calls >= 1 << 30 {
            break;
        }
        calls *= 2;
    }
    calls *= 4;
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let t = Instant::now();
        for i in 0..calls {
            op(i);
        }
        let ns = t.elapsed().as_nanos() as f64 / (calls * per_call) as f64;
        best = best.min(ns);
    }
    best
}

fn report(name: &str, ns: f64) {
    println!("{name:<52} {ns:>10.1} ns/op  {:>12.0} op/s", 1e9 / ns);
}

fn main() {
    // `cargo bench` passes `--bench`; an optional filter selects benchmarks by name.
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with("--"));
    let wanted = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));

    for (mode, label) in [(Balance::RoundRobin, "rr"), (Balance::Sticky, "sticky")] {
        for slots in [2usize, 16, 64] {
            let name = format!("router choose {label} slots={slots}");
            if !wanted(&name) {
                continue;
            }
            let mut r = Router::new(mode);
            for s in 0..slots {
                r.set_ready(s, true);
            }
            let ns = bench(1, |i| {
                let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000u32.wrapping_add(i as u32)));
                black_box(r.choose(black_box(ip), |_| false));
            });
            report(&name, ns);
        }
    }

    // Not a timing: how `sticky` splits the load generator's 64 source IPs
    // (127.0.0.1..=64, `compare --sources 64`) over 2 slots. A closed-loop benchmark
    // is bounded by the busier worker, so this split explains sticky's figures.
    if wanted("sticky split") {
        let mut r = Router::new(Balance::Sticky);
        r.set_ready(0, true);
        r.set_ready(1, true);
        let mut counts = [0usize; 2];
        for i in 1..=64u8 {
            if let Some(s) = r.preferred(IpAddr::V4(Ipv4Addr::new(127, 0, 0, i))) {
                counts[s] += 1;
            }
        }
        println!(
            "sticky split of 127.0.0.1..=64 over 2 slots: {}/{}",
            counts[0], counts[1]
        );
    }

    const BATCH: usize = 64;
    let conns: Vec<(SocketAddr, SocketAddr)> = (0..BATCH)
        .map(|i| {
            (
                SocketAddr::from(([127, 0, 0, 1 + (i % 64) as u8], 40000 + i as u16)),
                SocketAddr::from(([127, 0, 0, 1], 8080)),
            )
        })
        .collect();
    let mut out = Vec::with_capacity(channel::MAX_MASTER_MESSAGE);
    let name = format!("encode_conn batch of {BATCH} (per record)");
    if wanted(&name) {
        let ns = bench(BATCH as u64, |_| {
            out.clear();
            for &(peer, local) in &conns {
                channel::encode_conn(&mut out, 0, black_box(peer), black_box(local));
            }
            black_box(&out);
        });
        report(&name, ns);
    }
    out.clear();
    for &(peer, local) in &conns {
        channel::encode_conn(&mut out, 0, peer, local);
    }
    let name = format!("lines+parse_master_line batch of {BATCH} (per record)");
    if wanted(&name) {
        let ns = bench(BATCH as u64, |_| {
            let mut n = 0usize;
            for line in channel::lines(black_box(&out)) {
                if let MasterLine::Conn { peer, .. } = channel::parse_master_line(line) {
                    n += peer.port() as usize;
                }
            }
            black_box(n);
        });
        report(&name, ns);
    }
}
