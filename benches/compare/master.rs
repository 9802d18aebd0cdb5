//! The master's own limits, measured in the `compare` run (issue 13): how long it holds
//! a connection during reloads, and how many connections one core of it can hand over.
//!
//! * **Reloads** ([`reload_latency`]): `rr` over 4 workers under the `conn` load, once
//!   quiet and once with `--reloads` SIGUSR2s spread over the run; the master's own
//!   accept-to-hand-over histogram (`handoff_p50_us`/`handoff_p99_us` of its
//!   `balancer_totals` line, buckets within 25 %) is read at the end of each.
//! * **Ceiling** ([`ceiling`]): the master pinned to CPU 0 (`taskset`), the workers and
//!   the load generator to CPU 1, `rr` with `--accept-threads` 1 then 2. On two CPUs
//!   the workers' side runs out first, so each run is made twice: once with the master
//!   held to a quarter of CPU 0 by a cgroup CPU quota, which makes it the bottleneck
//!   (the share of throttled periods shows it was), and once without. The master's CPU
//!   time per connection (all its threads, from /proc) in the saturated run gives the
//!   connections one whole core of master hands over per second; the unlimited run
//!   shows the cost when the master mostly waits (a wake-up per few connections).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::loadgen::{self, Load};
use crate::{cpu_secs, field, load_config, median, start_recluster_at, Env, Options};

/// The `balancer_totals` figures of a master that has ended.
struct Totals {
    p50_us: u64,
    p99_us: u64,
    handed: u64,
}

/// Reads the last `balancer_totals` line of a master's log.
fn totals(log: &std::path::Path) -> Option<Totals> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().rev().find(|l| l.contains("balancer_totals"))?;
    Some(Totals {
        p50_us: field(line, "handoff_p50_us")?,
        p99_us: field(line, "handoff_p99_us")?,
        handed: field(line, "handed")?,
    })
}

/// Counts the lines of a master's log naming `event`.
fn count_events(log: &std::path::Path, event: &str) -> usize {
    let pattern = format!("event=\"{event}\"");
    std::fs::read_to_string(log).map_or(0, |t| t.lines().filter(|l| l.contains(&pattern)).count())
}

/// One `rr` run over 4 workers with `reloads` reloads spread over it.
fn one_reload_run(o: &Options, env: &Env, reloads: u32) -> Result<(Totals, u64, usize), String> {
    let name = if reloads == 0 {
        "rr-quiet"
    } else {
        "rr-reloading"
    };
    let mut t = start_recluster_at(env, None, name, "rr", 4, &[], &[])?;
    let pid = t.master.ok_or("no master")?;
    let log = t.log.clone().ok_or("no log")?;
    let cfg = loadgen::Config {
        warmup: Duration::ZERO,
        duration: o.duration.max(Duration::from_secs(2)),
        ..load_config(o, t.addr, Load::Conn)
    };
    let load = std::thread::spawn(move || loadgen::run(&cfg));
    let start = Instant::now();
    // Reloads at even intervals over the run, none in its first or last tenth.
    let span = o.duration.max(Duration::from_secs(2)).mul_f64(0.8);
    for i in 0..reloads {
        let at = o.duration.max(Duration::from_secs(2)).mul_f64(0.1)
            + span.mul_f64(f64::from(i) / f64::from(reloads.max(1)));
        if let Some(wait) = at.checked_sub(start.elapsed()) {
            std::thread::sleep(wait);
        }
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGUSR2) };
    }
    let report = load
        .join()
        .map_err(|_| "load generator panicked")?
        .map_err(|e| e.to_string())?;
    let finished = count_events(&log, "reload_finished");
    t.stop();
    let totals = totals(&log).ok_or(format!("{name}: no balancer_totals line"))?;
    Ok((totals, report.errors.total(), finished))
}

/// Accept-to-hand-over p50/p99 with and without `o.reloads` reloads, `o.repeats` pairs.
pub fn reload_latency(o: &Options, env: &Env) -> Vec<String> {
    let mut failures = Vec::new();
    println!();
    println!(
        "## Accept-to-hand-over in the master during {} reloads of 4 workers vs none (rr, conn load, {} clients)",
        o.reloads, o.clients
    );
    println!();
    println!("| repeat | quiet p50 µs | quiet p99 µs | reloading p50 µs | reloading p99 µs | reloads finished | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for rep in 0..o.repeats {
        let pair =
            one_reload_run(o, env, 0).and_then(|q| Ok((q, one_reload_run(o, env, o.reloads)?)));
        match pair {
            Ok(((quiet, qe, _), (busy, be, finished))) => {
                println!(
                    "| {} | {} | {} | {} | {} | {finished} of {} | {} |",
                    rep + 1,
                    quiet.p50_us,
                    quiet.p99_us,
                    busy.p50_us,
                    busy.p99_us,
                    o.reloads,
                    qe + be
                );
                if quiet.handed > 0 && busy.handed > 0 {
                    ratios.push(busy.p99_us as f64 / quiet.p99_us.max(1) as f64);
                }
                if qe + be > 0 {
                    failures.push(format!("reload latency: {} failed requests", qe + be));
                }
            }
            Err(e) => failures.push(format!("reload latency: {e}")),
        }
    }
    let ratio = median(ratios);
    println!();
    println!(
        "p99 during reloads / p99 quiet: {ratio:.2} (median over repeats; equal within the histogram's 25 % buckets when ≤ 1.25)"
    );
    failures
}

/// A CPU quota for one process (cgroup v1 `cpu` or v2 `cpu.max`), removed on drop.
struct Quota {
    dir: PathBuf,
    v2: bool,
}

impl Quota {
    /// Limits process `pid` (all its threads) to `share` of one CPU, in 10 ms periods.
    fn limit(pid: u32, share: f64) -> Result<Quota, String> {
        let period = 10_000u64;
        let quota = ((period as f64) * share) as u64;
        let v1 = Path::new("/sys/fs/cgroup/cpu/cpu.cfs_quota_us");
        let (dir, v2) = if v1.exists() {
            (
                PathBuf::from(format!("/sys/fs/cgroup/cpu/recluster-ceiling-{pid}")),
                false,
            )
        } else if std::fs::read_to_string("/sys/fs/cgroup/cgroup.controllers")
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu"))
        {
            (
                PathBuf::from(format!("/sys/fs/cgroup/recluster-ceiling-{pid}")),
                true,
            )
        } else {
            return Err("no cgroup cpu controller to limit the master with".into());
        };
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let q = Quota { dir, v2 };
        let write = |file: &str, value: String| {
            std::fs::write(q.dir.join(file), value).map_err(|e| format!("{file}: {e}"))
        };
        if q.v2 {
            write("cpu.max", format!("{quota} {period}"))?;
        } else {
            write("cpu.cfs_period_us", period.to_string())?;
            write("cpu.cfs_quota_us", quota.to_string())?;
        }
        write("cgroup.procs", pid.to_string())?;
        Ok(q)
    }

    /// (periods, throttled periods) so far.
    fn throttled(&self) -> (u64, u64) {
        let stat = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        let get = |key: &str| {
            stat.lines()
                .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
                .unwrap_or(0)
        };
        (get("nr_periods "), get("nr_throttled "))
    }
}

impl Drop for Quota {
    fn drop(&mut self) {
        // The master has exited by now (or is killed with its target): the group is empty.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Busy and total jiffies of each CPU, from /proc/stat.
fn cpu_jiffies() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            // idle + iowait
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// Pins the calling thread (and the threads it starts from now on) to `cpus`.
fn pin_to(cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it; the call
    // reads it for the duration of the call only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The master's share of one CPU in the saturated runs of [`ceiling`].
const CEILING_SHARE: f64 = 0.1;

/// The master's CPU per connection and the resulting one-core ceiling, K = 1 and 2.
pub fn ceiling(o: &Options, env: &Env) -> Vec<String> {
    let mut failures = Vec::new();
    println!();
    println!(
        "## One-core master ceiling (rr, conn load; master on CPU 0, {} workers and the load generator on CPU 1)",
        o.workers
    );
    println!();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let taskset = Command::new("taskset")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success());
    if cpus < 2 || !taskset {
        println!("skipped: needs 2 CPUs and taskset (have {cpus} CPUs, taskset: {taskset})");
        return failures;
    }
    println!(
        "Saturated: the master limited to {:.0} % of CPU 0 (a cgroup CPU quota), so that it, not the workers' CPU, sets the pace; \
         its CPU per connection at saturation gives the connections one whole core of master hands over per second. \
         Unlimited: the same without the quota (the master mostly waits, one wake-up per few connections).",
        CEILING_SHARE * 100.0
    );
    println!();
    println!("| accept threads | master CPU | conns/s | periods throttled % | master CPU µs / conn | conns/s per master core | CPU 0 busy % | CPU 1 busy % |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    let all: Vec<usize> = (0..cpus).collect();
    // Saturated µs per connection, K = 1 and 2.
    let mut per_conn = [Vec::new(), Vec::new()];
    for _ in 0..o.repeats {
        for (ki, k) in [1usize, 2].into_iter().enumerate() {
            for limited in [true, false] {
                match ceiling_run(o, env, k, limited, &all) {
                    Ok(r) => {
                        println!(
                            "| {k} | {} | {:.0} | {} | {:.1} | {:.0} | {:.0} | {:.0} |",
                            if limited {
                                format!("{:.0} % of a core", CEILING_SHARE * 100.0)
                            } else {
                                "unlimited".into()
                            },
                            r.rps,
                            r.throttled_pct.map_or("-".into(), |t| format!("{t:.0}")),
                            r.us_per_conn,
                            1e6 / r.us_per_conn,
                            r.busy[0],
                            r.busy[1]
                        );
                        if limited {
                            per_conn[ki].push(r.us_per_conn);
                        }
                        if r.errors > 0 {
                            failures.push(format!("ceiling K={k}: {} errors", r.errors));
                        }
                    }
                    Err(e) => {
                        println!(
                            "| {k} | {} | skipped: {e} |",
                            if limited { "limited" } else { "unlimited" }
                        );
                        if !limited {
                            failures.push(format!("ceiling K={k}: {e}"));
                        }
                    }
                }
            }
        }
    }
    let (k1, k2) = (median(per_conn[0].clone()), median(per_conn[1].clone()));
    println!();
    println!(
        "one-core master ceiling (saturated, median): K=1 {k1:.1} µs per connection = {:.0} conns/s per core; K=2 {k2:.1} µs = {:.0} conns/s per core; K=2 / K=1 cost = {:.2}",
        1e6 / k1,
        1e6 / k2,
        k2 / k1
    );
    failures
}

/// What one ceiling run measured.
struct CeilingRun {
    rps: f64,
    us_per_conn: f64,
    throttled_pct: Option<f64>,
    busy: [f64; 2],
    errors: u64,
}

/// One run of [`ceiling`]: `k` accept threads, the master limited to
/// [`CEILING_SHARE`] of CPU 0 or not.
fn ceiling_run(
    o: &Options,
    env: &Env,
    k: usize,
    limited: bool,
    all: &[usize],
) -> Result<CeilingRun, String> {
    let name = match (k, limited) {
        (1, true) => "ceiling-k1-limited",
        (1, false) => "ceiling-k1",
        (_, true) => "ceiling-k2-limited",
        (_, false) => "ceiling-k2",
    };
    let threads = k.to_string();
    let mut t = start_recluster_at(
        env,
        None,
        name,
        "rr",
        o.workers,
        &["--accept-threads", &threads],
        &["taskset", "-c", "0"],
    )?;
    let pid = t.master.ok_or("no master")?;
    // The workers were forked by the master, on its CPU: move them to CPU 1.
    let _ = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for p in $(pgrep -P {pid}); do taskset -a -p -c 1 $p >/dev/null; done"
        ))
        .status();
    let quota = if limited {
        Some(Quota::limit(pid, CEILING_SHARE)?)
    } else {
        None
    };
    let cfg = loadgen::Config {
        threads: 1,
        ..load_config(o, t.addr, Load::Conn)
    };
    pin_to(&[1]);
    let (cpu0, jiffies0, throttled0, at0) = (
        cpu_secs(pid),
        cpu_jiffies(),
        quota.as_ref().map(Quota::throttled),
        Instant::now(),
    );
    let report = loadgen::run(&cfg);
    let (cpu1, jiffies1, throttled1, elapsed) = (
        cpu_secs(pid),
        cpu_jiffies(),
        quota.as_ref().map(Quota::throttled),
        at0.elapsed(),
    );
    pin_to(all);
    t.stop();
    drop(quota);
    let report = report.map_err(|e| format!("load generator: {e}"))?;
    let (Some(c0), Some(c1)) = (cpu0, cpu1) else {
        return Err("no CPU time for the master".into());
    };
    // The warm-up ran inside the window too: count its connections at the same rate.
    let conns =
        report.connections as f64 * elapsed.as_secs_f64() / report.elapsed.as_secs_f64().max(1e-9);
    let busy = |cpu: usize| {
        let (b0, t0) = jiffies0.get(cpu).copied().unwrap_or((0, 1));
        let (b1, t1) = jiffies1.get(cpu).copied().unwrap_or((0, 1));
        100.0 * (b1 - b0) as f64 / (t1 - t0).max(1) as f64
    };
    let throttled_pct = match (throttled0, throttled1) {
        (Some((p0, n0)), Some((p1, n1))) if p1 > p0 => {
            Some(100.0 * (n1 - n0) as f64 / (p1 - p0) as f64)
        }
        _ => None,
    };
    Ok(CeilingRun {
        rps: report.rps(),
        us_per_conn: (c1 - c0) * 1e6 / conns.max(1.0),
        throttled_pct,
        busy: [busy(0), busy(1)],
        errors: report.errors.total(),
    })
}
