//! `kill -9` of the master leaves nothing behind (issue 10, item 3).
//!
//! `PR_SET_PDEATHSIG` reaches only a worker itself: a server behind `sh -c` (not
//! exec'd), or a daemon that left the worker's process group with `setsid`, would live
//! on after the master, keep the listening socket and answer on it, and the next master
//! would fail with "Address already in use". The master's guard (`src/runtime/guard.rs`)
//! kills the workers' process groups, and their cgroups where cgroup v2 is writable
//! (`src/runtime/cgroup.rs`), once the master is gone.
//!
//! Each test tags its masters with a unique environment variable and looks for every
//! process carrying it, so workers the log never named are found too.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How long everything a killed master started may take to go.
const GONE_WITHIN: Duration = Duration::from_secs(5);

/// The environment variable tagging a test's masters.
const TAG: &str = "MASTER_DEATH_TAG";

/// What was left after a master was killed, and what a new master on its port did.
#[derive(Debug)]
struct Aftermath {
    /// Tagged processes still alive `GONE_WITHIN` after the kill (killed then).
    left: Vec<String>,
    /// How long until none was left, when none was.
    gone_after: Option<Duration>,
    /// Whether the port could be bound right after.
    port_free: Result<(), String>,
    /// The new master served on the same port, or why not.
    new_master: Result<(), String>,
}

impl Aftermath {
    fn assert_clean(&self, what: &str) {
        assert!(
            self.left.is_empty() && self.port_free.is_ok() && self.new_master.is_ok(),
            "{what}: {self:#?}"
        );
    }
}

/// One line per process: pid, name, command line (for the failure message).
fn describe(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default();
    format!("{pid}: {}", cmdline.trim())
}

/// Kills `m` with SIGKILL, then: waits for every process tagged `tag` to go, checks
/// the port is free, and starts a new master on the same address.
fn kill_master_and_look(m: &Master, tag: &str, addr: SocketAddr) -> Aftermath {
    m.signal(Signal::SIGKILL);
    let exit = m.expect_exit(DEADLINE);
    assert_eq!(exit.signal, Some(libc::SIGKILL));
    let killed = Instant::now();
    let mut left = Vec::new();
    let gone = poll_until(GONE_WITHIN, || {
        left = pids_with_env(TAG, tag);
        left.retain(|&p| p != m.pid);
        left.is_empty()
    });
    let gone_after = gone.then(|| killed.elapsed());
    let described: Vec<String> = left.iter().map(|&p| describe(p)).collect();
    // The last close of a listening socket can finish a moment after its holders are
    // gone (CI saw EADDRINUSE once with every process reaped; an exiting process's
    // environment is unreadable before its descriptors are closed): allow it the deadline.
    let mut port_free = Err(String::new());
    poll_until(DEADLINE, || {
        port_free = TcpListener::bind(addr).map(drop).map_err(|e| e.to_string());
        port_free.is_ok()
    });
    let new_tag = unique_tag("master-death-next");
    let next = Cluster::new()
        .workers(1)
        .args(["--balance", "shared", "--listen", &addr.to_string()])
        .env(TAG, &new_tag)
        .spawn();
    let started = poll_until(DEADLINE, || {
        next.exit_status().is_some()
            || next
                .try_wait_event_after(0, "cluster_ready", Duration::ZERO)
                .is_some()
    });
    if next.exit_status().is_some() {
        // Its last words may still be on their way through the harness.
        poll_until(Duration::from_secs(2), || !next.stderr_text().is_empty());
    }
    let new_master = if next.exit_status().is_some() || !started {
        Err(next
            .stderr_text()
            .lines()
            .last()
            .unwrap_or("no output")
            .to_owned())
    } else {
        match request(addr) {
            Ok(r) if pids_with_env(TAG, &new_tag).contains(&r.pid) => Ok(()),
            Ok(r) => Err(format!(
                "answered by pid {}, not the new master's worker",
                r.pid
            )),
            Err(e) => Err(format!("request failed: {e:?}")),
        }
    };
    // Leave nothing behind, whatever the outcome.
    for &p in &left {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
    }
    if next.exit_status().is_none() {
        next.signal(Signal::SIGTERM);
        next.expect_exit(DEADLINE);
    }
    Aftermath {
        left: described,
        gone_after,
        port_free,
        new_master,
    }
}

/// A `mode` cluster of 2 workers whose worker is `sh -c '"$0" & wait' <server>`: the
/// server is the shell's child, not the worker. With `cgroups` off, the guard has
/// nothing but the process groups.
fn sh_wrapped(mode: &str, cgroups: bool, tag: &str) -> Master {
    let server = if mode == "shared" {
        test_worker().display().to_string()
    } else {
        echo()
    };
    Cluster::new()
        .workers(2)
        .args(["--balance", mode, "--listen", "127.0.0.1:0"])
        .env("RECLUSTER_CGROUPS", cgroups.to_string())
        .command(["/bin/sh", "-c", "\"$0\" & wait", &server])
        .env(TAG, tag)
        .spawn()
}

#[test]
fn sigkill_of_the_master_leaves_no_server_behind_sh_c_and_the_port_to_a_new_master() {
    let mut figures = Vec::new();
    // Process groups alone (as where no cgroup v2 is writable), then with cgroups where
    // they are.
    for (mode, cgroups) in [("shared", false), ("rr", false), ("shared", true)] {
        let mode_text = format!("{mode}, cgroups={cgroups}");
        let tag = unique_tag("master-death-sh");
        let m = sh_wrapped(mode, cgroups, &tag);
        let addr = m.addr();
        let workers = m.wait_cluster_ready(2);
        // The server that answers is the shell's child, in the worker's group.
        let mut reply = None;
        assert!(
            poll_until(DEADLINE, || {
                // Half-closed: the echo worker answers once its client has sent all.
                reply = request_from(addr, None, true, Duration::from_secs(10)).ok();
                reply.is_some()
            }),
            "{mode}: not served\n{}",
            m.stderr_text()
        );
        let server = reply.unwrap().pid;
        assert!(
            !workers.values().any(|&w| w == server),
            "{mode}: the server {server} should be a grandchild, not a worker {workers:?}"
        );
        let after = kill_master_and_look(&m, &tag, addr);
        println!("{mode_text}, sh -c workers, kill -9 of the master: {after:?}");
        after.assert_clean(&format!("{mode_text} with sh -c workers"));
        figures.push(format!(
            "{mode_text}: gone {:?} after",
            after.gone_after.unwrap()
        ));
    }
    println!("sh -c workers: {}", figures.join("; "));
}

/// Whether this test process could create a cgroup v2 under its own, as the master
/// will try to (the same conditions: a cgroup2 mount found in mountinfo, the own
/// cgroup under it, a directory created there); the reason when not.
fn cgroup_v2_writable() -> Result<PathBuf, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let (root, point) = mountinfo
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let dash = f.iter().position(|&x| x == "-")?;
            (f.get(dash + 1) == Some(&"cgroup2")).then(|| (f[3].to_owned(), f[4].to_owned()))
        })
        .ok_or("no cgroup2 file system is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| e.to_string())?
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .ok_or("no cgroup v2 line in /proc/self/cgroup")?;
    let rel = own
        .strip_prefix(root.trim_end_matches('/'))
        .ok_or_else(|| format!("own cgroup {own} is outside the mount's root {root}"))?;
    let dir = Path::new(&point).join(rel.trim_start_matches('/'));
    let probe = dir.join(format!("recluster-test-probe-{}", std::process::id()));
    std::fs::create_dir(&probe)
        .map_err(|e| format!("cannot create a cgroup in {}: {e}", dir.display()))?;
    let _ = std::fs::remove_dir(&probe);
    Ok(dir)
}

/// A `shared` cluster whose worker, a shell, stays while its server runs in a session
/// of its own, out of the worker's process group, as a daemon does.
fn daemonising(workers: usize, setsid: &Path, tag: &str) -> Master {
    shared_cluster(workers)
        .command([
            "/bin/sh".as_ref(),
            "-c".as_ref(),
            "\"$1\" \"$0\" & wait".as_ref(),
            test_worker().as_os_str(),
            setsid.as_os_str(),
        ])
        .env(TAG, tag)
        .spawn()
}

#[test]
fn sigkill_of_the_master_leaves_no_setsid_daemon_where_cgroup_v2_is_writable() {
    let Some(setsid) = require("setsid") else {
        return;
    };
    if let Err(reason) = cgroup_v2_writable() {
        skip(&format!("no writable cgroup v2 here: {reason}"));
        return;
    }
    let tag = unique_tag("master-death-daemon");
    let m = daemonising(2, &setsid, &tag);
    let addr = m.addr();
    let workers = m.wait_cluster_ready(2);
    let mut reply = None;
    assert!(poll_until(DEADLINE, || {
        reply = request(addr).ok();
        reply.is_some()
    }));
    let daemon = reply.unwrap().pid;
    assert!(
        !workers.values().any(|&w| Some(w) == process_group(daemon)),
        "the daemon {daemon} should have left its worker's group ({workers:?})"
    );
    // The guard logs its start before the first worker is spawned.
    let base = m
        .events("guard_started")
        .first()
        .and_then(|l| l.field("cgroup").map(str::to_owned))
        .filter(|c| c != "none");
    let log = m.stderr_text();
    let after = kill_master_and_look(&m, &tag, addr);
    println!("setsid daemons, kill -9 of the master: {after:?}");
    after.assert_clean("setsid daemons");
    let base = base.unwrap_or_else(|| {
        panic!("cgroup v2 is writable here, but the master does not use it\n{log}")
    });
    assert!(
        poll_until(GONE_WITHIN, || !Path::new(&base).exists()),
        "the guard left the cluster's cgroup {base}"
    );
}

#[test]
fn with_cgroups_a_setsid_daemon_goes_with_its_worker_on_reload_and_on_terminate() {
    let Some(setsid) = require("setsid") else {
        return;
    };
    if let Err(reason) = cgroup_v2_writable() {
        skip(&format!("no writable cgroup v2 here: {reason}"));
        return;
    }
    let tag = unique_tag("master-death-reload");
    let m = daemonising(1, &setsid, &tag);
    let addr = m.addr();
    let old = m.wait_cluster_ready(1)[&0];
    let daemon = request(addr).expect("served").pid;
    assert_ne!(daemon, old, "the server is the daemon, not the worker");
    let from = m.mark();
    m.signal(Signal::SIGUSR2);
    m.wait_event_after(from, "reload_finished generation=2", DEADLINE);
    m.wait_event_after(from, &format!("worker_exited slot=0 pid={old}"), DEADLINE);
    let gone = poll_until(GONE_WITHIN, || !pid_alive(daemon));
    let mut gens = Vec::new();
    for _ in 0..5 {
        gens.push(request(addr).expect("served").gen);
    }
    println!(
        "reload: the old worker's daemon {} {GONE_WITHIN:?} of its worker's exit; \
         generations answering after: {gens:?}",
        if gone {
            "gone within"
        } else {
            "still alive after"
        }
    );
    if !gone {
        let _ = kill(Pid::from_raw(daemon as i32), Signal::SIGKILL);
    }
    assert!(gone, "the old generation's daemon survived the reload");
    assert!(gens.iter().all(|&g| g == 2), "answered by {gens:?}");

    m.signal(Signal::SIGTERM);
    let exit = m.expect_exit(DEADLINE);
    assert!(exit.success(), "{exit:?}");
    let mut left = Vec::new();
    let clean = poll_until(GONE_WITHIN, || {
        left = pids_with_env(TAG, &tag);
        left.is_empty()
    });
    for &p in &left {
        let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
    }
    assert!(clean, "left after SIGTERM: {left:?}");
}

/// Field `index` of /proc/<pid>/stat counted from the state (0: state, 3: session).
fn stat_field(pid: u32, index: usize) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .nth(index)
        .map(str::to_owned)
}

/// Whether `signal` is blocked in `pid` (its `SigBlk` mask).
fn blocked(pid: u32, signal: Signal) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("SigBlk:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|m| m & (1 << (signal as i32 - 1)) != 0)
}

#[test]
fn the_guard_holds_nothing_of_the_master_shrugs_off_terminal_signals_and_leaves_with_it() {
    let tag = unique_tag("master-death-guard");
    let m = shared_cluster(2).env(TAG, &tag).spawn();
    let addr = m.addr();
    let guard = m.wait_event("guard_started", DEADLINE).pid();
    m.wait_cluster_ready(2);

    // One descriptor: its socket to the master. No listening socket, no stdio.
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{guard}/fd"))
        .expect("the guard's fds")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.display().to_string())
        .collect();
    assert_eq!(fds.len(), 1, "guard fds: {fds:?}");
    assert!(fds[0].starts_with("socket:"), "guard fds: {fds:?}");
    // Neither the master's process group nor its session (no terminal signal).
    assert_ne!(process_group(guard), process_group(m.pid));
    assert_ne!(stat_field(guard, 3), stat_field(m.pid, 3));
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{guard}/comm"))
            .unwrap()
            .trim(),
        "recluster-guard"
    );
    // Not taken for a process of the cluster by its environment.
    assert!(!pids_with_env(TAG, &tag).contains(&guard));
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        assert!(blocked(guard, sig), "{sig:?} is not blocked in the guard");
        kill(Pid::from_raw(guard as i32), sig).unwrap();
    }
    assert!(pid_alive(guard), "the guard died of a terminal signal");
    request(addr).expect("the cluster serves");

    // A clean exit takes the guard along, and kills nothing on the way.
    m.signal(Signal::SIGTERM);
    let exit = m.expect_exit(DEADLINE);
    assert!(exit.success(), "{exit:?}\n{}", m.stderr_text());
    assert!(
        poll_until(GONE_WITHIN, || !pid_alive(guard)),
        "the guard outlived a clean exit"
    );
    assert!(
        poll_until(GONE_WITHIN, || pids_with_env(TAG, &tag).is_empty()),
        "left: {:?}",
        pids_with_env(TAG, &tag)
    );
}
