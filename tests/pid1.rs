//! `recluster` as PID 1 of a PID namespace, as it runs as a container's entrypoint
//! (issue 14, item 8; docs/DEPLOYMENT.md).
//!
//! Each test runs the real master under `unshare --pid --fork --mount-proc
//! --kill-child`, so that it is PID 1 of a new PID namespace, and looks at it from
//! outside, through the host's /proc (`NSpid:` maps the namespace's pids, which the
//! master logs, to the host's):
//!
//! * PID 1 is every orphan's parent: the master (a subreaper by default when it is
//!   PID 1) must reap them, or they stay zombies for the container's whole life;
//! * PID 1 gets no signal it has no handler for, even from the host (`docker stop`
//!   sends SIGTERM from outside the namespace): SIGTERM and SIGINT stop it gracefully,
//!   and exit 0, only because it installs handlers; a second SIGINT kills at once;
//! * every PID-1 master has pid 1: where masters of several namespaces share a
//!   directory or a cgroup tree, names made of the pid collide, and a pid says nothing
//!   about a process of another namespace (notify directories, cgroups).
//!
//! Each master gets a temporary directory (`TMPDIR`) of its own, as a container has,
//! but the test that shares one on purpose.
//!
//! Needs root (a new PID namespace) and util-linux `unshare`: skipped without them on a
//! developer's machine, failed under `CI=true`.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// `unshare`, if this test can make a PID namespace with it (root, and a kernel or
/// container that allows it); `None` (skipped, failed under CI) otherwise.
fn unshare() -> Option<PathBuf> {
    let unshare = require("unshare")?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        skip("a new PID namespace (unshare --pid) needs root");
        return None;
    }
    let probe = std::process::Command::new(&unshare)
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .output();
    match probe {
        Ok(out) if out.status.success() => Some(unshare),
        Ok(out) => {
            skip(&format!(
                "unshare --pid --fork --mount-proc fails here ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            None
        }
        Err(e) => {
            skip(&format!("cannot run {}: {e}", unshare.display()));
            None
        }
    }
}

/// The `NSpid:` line of a process: its pid in each PID namespace it is in, the host's
/// first, its own namespace's last.
fn ns_pids(host_pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{host_pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("NSpid:").map(|v| {
                    v.split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}

/// `State:` of a process: `R`, `S`, `Z`, …; `None` once it is gone (reaped).
fn state(host_pid: u32) -> Option<char> {
    let status = std::fs::read_to_string(format!("/proc/{host_pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))?
        .trim()
        .chars()
        .next()
}

fn pid_namespace(host_pid: u32) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{host_pid}/ns/pid")).ok()
}

fn host_processes() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A master running as PID 1 of its own PID namespace.
struct Pid1 {
    /// The harness's handle: its pid is `unshare`'s, whose exit status is the master's.
    m: Master,
    /// The master's pid on the host (1 in its namespace).
    host: u32,
    /// Its PID namespace (`pid:[…]`).
    ns: PathBuf,
}

impl Pid1 {
    /// Starts `cluster` as PID 1 of a new PID namespace; waits until it listens.
    fn start(unshare: &Path, cluster: Cluster) -> Pid1 {
        let m = cluster
            .wrapped_in([
                unshare.as_os_str(),
                "--pid".as_ref(),
                "--fork".as_ref(),
                "--mount-proc".as_ref(),
                // unshare killed (the harness drops its `Master`): the namespace goes too.
                "--kill-child".as_ref(),
            ])
            .spawn();
        // The master's first log line: unshare's child has exec'd it.
        m.addr();
        let children = children_of(m.pid);
        assert_eq!(
            children.len(),
            1,
            "unshare --fork has one child, the master: {children:?}"
        );
        let host = children[0];
        assert!(
            std::fs::read_link(format!("/proc/{host}/exe")).is_ok_and(|exe| exe == recluster_bin()),
            "unshare's child {host} is the recluster binary"
        );
        let pids = ns_pids(host);
        assert_eq!(
            pids,
            vec![host, 1],
            "the master is PID 1 of a namespace of its own (NSpid of host pid {host})"
        );
        let ns = pid_namespace(host).expect("the master's ns/pid");
        assert_ne!(Some(&ns), pid_namespace(std::process::id()).as_ref());
        Pid1 { m, host, ns }
    }

    /// Whether host process `pid` is in the master's namespace. A zombie's ns/pid
    /// cannot be read: it is there if its parent is (a child in a namespace below
    /// would have one more `NSpid`).
    fn holds(&self, pid: u32) -> bool {
        match pid_namespace(pid) {
            Some(ns) => ns == self.ns,
            None => parent_pid(pid).and_then(pid_namespace).as_ref() == Some(&self.ns),
        }
    }

    /// The host pid of the namespace's process `ns_pid` (as the master logs it).
    fn host_pid(&self, ns_pid: u32) -> Option<u32> {
        host_processes().into_iter().find(|&p| {
            let pids = ns_pids(p);
            pids.len() == 2 && pids[1] == ns_pid && self.holds(p)
        })
    }

    /// Like [`Pid1::host_pid`], waiting for the process to be seen.
    fn expect_host_pid(&self, ns_pid: u32, what: &str) -> u32 {
        let mut host = None;
        assert!(
            poll_until(DEADLINE, || {
                host = self.host_pid(ns_pid);
                host.is_some()
            }),
            "{what} (pid {ns_pid} in the namespace) not found in /proc"
        );
        host.unwrap()
    }

    /// The master's zombie children: exited, not reaped.
    fn zombies(&self) -> Vec<u32> {
        host_processes()
            .into_iter()
            .filter(|&p| parent_pid(p) == Some(self.host) && state(p) == Some('Z'))
            .collect()
    }

    /// Every process of the namespace but the master (host pids).
    fn others(&self) -> Vec<u32> {
        host_processes()
            .into_iter()
            .filter(|&p| p != self.host && self.holds(p))
            .collect()
    }

    /// Sends `signal` to the master itself (unshare forwards none).
    fn signal(&self, signal: Signal) {
        assert!(
            self.m.exit_status().is_none(),
            "the master has already exited"
        );
        kill(Pid::from_raw(self.host as i32), signal)
            .unwrap_or_else(|e| panic!("kill({}, {signal:?}): {e}", self.host));
    }
}

/// The quick-start echo worker (`rr`: connections come from the master's balancer).
/// With `prelude`, `sh -c '<prelude>; exec "$0"' echo`.
fn echo_cluster(workers: usize, prelude: Option<&str>) -> Cluster {
    let cluster =
        Cluster::new()
            .workers(workers)
            .args(["--listen", "127.0.0.1:0", "--timeout", "30s"]);
    match prelude {
        Some(p) => cluster.command([
            "/bin/sh".to_string(),
            "-c".into(),
            format!("{p}; exec \"$0\""),
            echo(),
        ]),
        None => cluster.command([echo()]),
    }
}

/// One request to the echo worker: its greeting (`id= pid= gen= peer=`), after
/// half-closing.
fn served(addr: SocketAddr) -> Reply {
    request_from(addr, None, true, Duration::from_secs(10))
        .unwrap_or_else(|f| panic!("request to {addr} (master as PID 1) failed: {f:?}"))
}

/// Requests until each of the `workers` slots has answered; `slot → worker pid` (the
/// namespace's pids).
fn every_slot_serves(addr: SocketAddr, workers: usize) -> std::collections::BTreeMap<usize, u32> {
    let mut seen = std::collections::BTreeMap::new();
    let mut n = 0;
    assert!(
        poll_until(DEADLINE, || {
            let r = served(addr);
            n += 1;
            seen.insert(r.id, r.pid);
            seen.len() == workers
        }),
        "not every slot answered in {n} requests: {seen:?}"
    );
    seen
}

fn read_ns_pid(path: &Path) -> u32 {
    let mut pid = None;
    assert!(
        poll_until(DEADLINE, || {
            pid = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            pid.is_some()
        }),
        "{} never written",
        path.display()
    );
    pid.unwrap()
}

/// A directory of the test's own, removed when dropped: the master's temporary
/// directory (`TMPDIR`, where its notify socket goes), as a container has its own.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let dir = std::env::temp_dir().join(unique_tag(&format!("recluster-pid1-{what}")));
        std::fs::create_dir(&dir).expect("create the test's directory");
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    /// The notify directories in it whose names start with `recluster-<pid>-`.
    fn notify_dirs_of(&self, pid: u32) -> Vec<String> {
        let prefix = format!("recluster-{pid}-");
        std::fs::read_dir(&self.0)
            .map(|d| {
                d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .filter(|n| n.starts_with(&prefix))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `cluster` with `dir` as its temporary directory.
fn in_dir(cluster: Cluster, dir: &TempDir) -> Cluster {
    cluster
        .env("TMPDIR", dir.path())
        .env("XDG_RUNTIME_DIR", dir.path())
}

#[test]
fn as_pid_1_the_master_adopts_and_reaps_orphans_a_worker_leaves() {
    let Some(unshare) = unshare() else { return };
    let tmp = TempDir::new("orphans");
    let parent_file = tmp.path().join("parent");
    let child_file = tmp.path().join("child");
    // The worker, before it execs the server, leaves an orphan: a subshell that exits
    // at once after starting `parent` (an `exec sleep 300`, which never waits for
    // anything), so `parent` is re-parented to PID 1, the master. `parent` started
    // `child` (another sleep) before it exec'd: when `child` is killed it stays a
    // zombie of `parent`, which never reaps it. (A child that exited by itself could
    // be reaped by the shell before it execs `sleep`.)
    let prelude = format!(
        "( ( sleep 301 & echo $! > {child}; exec sleep 300 ) & echo $! > {parent} )",
        child = child_file.display(),
        parent = parent_file.display()
    );
    // Debug: the master logs each orphan it reaps (`orphan_reaped`).
    let p = Pid1::start(
        &unshare,
        in_dir(echo_cluster(1, Some(&prelude)), &tmp).args(["--log-level", "debug"]),
    );
    let addr = p.m.addr();
    let worker = p.m.wait_cluster_ready(1)[&0];
    let reply = served(addr);
    assert_eq!((reply.id, reply.pid), (0, worker), "served by the worker");
    let worker_host = p.expect_host_pid(worker, "the worker");
    assert_eq!(parent_pid(worker_host), Some(p.host));

    let parent_ns = read_ns_pid(&parent_file);
    let child_ns = read_ns_pid(&child_file);
    let parent = p.expect_host_pid(parent_ns, "the orphan");
    let child = p.expect_host_pid(child_ns, "the orphan's child");
    assert!(
        poll_until(DEADLINE, || parent_pid(parent) == Some(p.host)),
        "the orphan {parent} was not adopted by the master {} (its parent is {:?})",
        p.host,
        parent_pid(parent)
    );
    assert_eq!(parent_pid(child), Some(parent), "the orphan's child");
    // `$!` is written before the subshell execs `sleep 300`: until it has, a shell would
    // reap its killed child, which would then never be the orphan's zombie.
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert!(
        poll_until(DEADLINE, || comm(parent).trim() == "sleep"),
        "the orphan {parent} never exec'd sleep (comm {:?})",
        comm(parent)
    );
    kill(Pid::from_raw(child as i32), Signal::SIGKILL).unwrap();
    assert!(
        poll_until(DEADLINE, || state(child) == Some('Z')),
        "the orphan's child {child} is not a zombie once killed (state {:?})",
        state(child)
    );
    assert_eq!(parent_pid(child), Some(parent), "a zombie of the orphan");

    // The orphan dies: it is the master's zombie now, and its zombie child is
    // re-parented to the master too. Both must be reaped.
    let killed = Instant::now();
    kill(Pid::from_raw(parent as i32), Signal::SIGKILL).unwrap();
    let mut left = Vec::new();
    let reaped = poll_until(DEADLINE, || {
        left = [parent, child]
            .into_iter()
            .filter(|&p| state(p).is_some())
            .collect();
        left.is_empty()
    });
    let took = killed.elapsed();
    assert!(
        reaped,
        "orphans not reaped by the master (PID 1): {:?}\n--- master log ---\n{}",
        left.iter()
            .map(|&p| (p, state(p), parent_pid(p)))
            .collect::<Vec<_>>(),
        p.m.stderr_text()
    );
    p.m.wait_event(
        &format!("orphan_reaped pid={parent_ns} status=signal=9"),
        DEADLINE,
    );
    p.m.wait_event(
        &format!("orphan_reaped pid={child_ns} status=signal=9"),
        DEADLINE,
    );
    assert_eq!(
        p.zombies(),
        Vec::<u32>::new(),
        "zombies left under the master"
    );
    // Orphans are not workers: the worker still serves, nothing was respawned.
    assert_eq!(served(addr).pid, worker);
    assert_eq!(p.m.events("worker_spawned").len(), 1);
    println!(
        "PID 1 (host pid {}): orphan {parent_ns} (host {parent}) and its zombie child \
         {child_ns} (host {child}) reaped {took:?} after the kill",
        p.host
    );

    p.signal(Signal::SIGTERM);
    let exit = p.m.expect_exit(DEADLINE);
    assert!(exit.success(), "{exit:?}\n{}", p.m.stderr_text());
}

/// Serves on every slot, keeps one connection open across the signal, sends
/// `signal` to the master (from the host, as `docker stop` does), and checks that the
/// open connection is finished, every worker exits by itself (code 0, not killed) and
/// the master exits 0.
fn stops_gracefully_on(signal: Signal) {
    let Some(unshare) = unshare() else { return };
    let tmp = TempDir::new("stop");
    let workers = 2;
    let p = Pid1::start(&unshare, in_dir(echo_cluster(workers, None), &tmp));
    let addr = p.m.addr();
    let ready = p.m.wait_cluster_ready(workers);
    let serving = every_slot_serves(addr, workers);
    assert_eq!(serving, ready, "each slot served by its ready worker");
    let hosts: Vec<u32> = ready
        .values()
        .map(|&w| p.expect_host_pid(w, "a worker"))
        .collect();

    // A connection open while the master is told to stop: drained, not cut.
    let mut open = TcpStream::connect(addr).expect("connect");
    open.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut greeting = [0u8; 64];
    let n = open.read(&mut greeting).expect("greeting");
    assert!(
        n > 0 && greeting[..n].starts_with(b"id="),
        "{:?}",
        &greeting[..n]
    );

    let mark = p.m.mark();
    let sent = Instant::now();
    p.signal(signal);
    p.m.wait_event_after(mark, "terminating", DEADLINE);
    open.write_all(b"still here\n")
        .expect("write after the stop signal");
    open.shutdown(Shutdown::Write).unwrap();
    let mut echoed = Vec::new();
    open.read_to_end(&mut echoed)
        .expect("the echo after the stop signal");
    assert_eq!(echoed, b"still here\n", "the open connection was finished");

    let exit = p.m.expect_exit(DEADLINE);
    let took = sent.elapsed();
    assert!(
        exit.success(),
        "{signal:?} to the master as PID 1: {exit:?}\n--- master log ---\n{}",
        p.m.stderr_text()
    );
    // The exit is seen before the harness has read the master's last lines: wait for
    // its last one, `terminated`, before counting the ones that precede it.
    p.m.wait_event_after(mark, "terminated", DEADLINE);
    for (slot, pid) in &ready {
        let exited = p.m.events(&format!("worker_exited slot={slot} pid={pid}"));
        assert!(
            exited.len() == 1 && exited[0].field("code") == Some("0"),
            "worker {pid} of slot {slot} did not stop by itself: {exited:?}"
        );
    }
    assert!(
        hosts.iter().all(|&h| state(h).is_none()),
        "workers left: {hosts:?}"
    );
    assert_eq!(p.others(), Vec::<u32>::new(), "the namespace is empty");
    println!(
        "{signal:?} to PID 1 (host pid {}): exit 0 after {took:?}, {workers} workers code 0",
        p.host
    );
}

#[test]
fn sigterm_from_the_host_stops_the_master_as_pid_1_gracefully() {
    stops_gracefully_on(Signal::SIGTERM);
}

#[test]
fn sigint_from_the_host_stops_the_master_as_pid_1_gracefully() {
    stops_gracefully_on(Signal::SIGINT);
}

#[test]
fn a_second_sigint_kills_the_workers_at_once_as_pid_1() {
    let Some(unshare) = unshare() else { return };
    let tmp = TempDir::new("kill");
    // A worker that ignores the stop signal would hold the stop for all of --timeout.
    let p = Pid1::start(
        &unshare,
        in_dir(shared_cluster(1), &tmp)
            .args(["--timeout", "1h"])
            .env("TEST_WORKER_IGNORE_TERM", "1"),
    );
    let addr = p.m.addr();
    let worker = p.m.wait_cluster_ready(1)[&0];
    assert_eq!(request(addr).expect("served").pid, worker);
    let mark = p.m.mark();
    p.signal(Signal::SIGINT);
    p.m.wait_event_after(mark, "worker_retiring", DEADLINE);
    assert!(
        p.m.exit_status().is_none(),
        "the worker ignores SIGTERM: the master waits"
    );
    let second = Instant::now();
    p.signal(Signal::SIGINT);
    let exit = p.m.expect_exit(DEADLINE);
    let took = second.elapsed();
    let exited =
        p.m.wait_event_after(mark, &format!("worker_exited pid={worker}"), DEADLINE);
    assert_eq!(exited.field("signal"), Some("9"), "killed: {}", exited.raw);
    assert!(exit.success(), "{exit:?}\n{}", p.m.stderr_text());
    println!("second SIGINT to PID 1: exit {exit:?} {took:?} after it");
}

/// The cgroup a PID-1 master killed with its namespace left (its guard died with it),
/// removed: the test's own leftovers, empty now.
fn remove_cgroup_left_by(p: &Pid1) {
    let Some(base) =
        p.m.events("guard_started")
            .first()
            .and_then(|l| l.field("cgroup").map(PathBuf::from))
            .filter(|b| b.is_absolute())
    else {
        return; // cgroup=none
    };
    let Ok(leaves) = std::fs::read_dir(&base) else {
        return;
    };
    for leaf in leaves.flatten().filter(|e| e.path().is_dir()) {
        let path = leaf.path();
        assert!(
            poll_until(DEADLINE, || std::fs::remove_dir(&path).is_ok()
                || !path.exists()),
            "cannot remove {}",
            path.display()
        );
    }
    let _ = std::fs::remove_dir(&base);
}

/// A PID-1 master and the host's masters sharing a temporary directory (a container
/// given the host's /tmp) tell live notify directories from stale ones by their
/// sockets, not their pids: the container's master leaves the host master's alone,
/// though that pid means nothing in its namespace, and a host master removes what a
/// killed PID-1 master left, though pid 1 lives on the host.
#[test]
fn a_pid_1_master_and_the_hosts_leave_each_others_notify_directories_alone() {
    let Some(unshare) = unshare() else { return };
    let tmp = TempDir::new("shared-tmp");
    // Readiness by READY=1 on the notify socket: the host master needs its directory.
    let host = in_dir(shared_cluster(1), &tmp)
        .args(["--ready-when", "ready"])
        .env("TEST_WORKER_NOTIFY", "1")
        .spawn();
    host.wait_cluster_ready(1);
    let host_dirs = tmp.notify_dirs_of(host.pid);
    assert_eq!(host_dirs.len(), 1, "the host master's notify directory");

    let p = Pid1::start(&unshare, in_dir(shared_cluster(1), &tmp));
    p.m.wait_cluster_ready(1);
    assert_eq!(
        tmp.notify_dirs_of(host.pid),
        host_dirs,
        "the PID-1 master removed the live host master's notify directory"
    );
    let pid1_dirs = tmp.notify_dirs_of(1);
    assert_eq!(pid1_dirs.len(), 1, "the PID-1 master's notify directory");
    // Killed: unshare and with it (--kill-child) the namespace. Nothing cleans up.
    p.m.signal(Signal::SIGKILL);
    p.m.expect_exit(DEADLINE);
    assert!(
        poll_until(DEADLINE, || !pid_alive(p.host)),
        "the PID-1 master outlived unshare"
    );
    remove_cgroup_left_by(&p);
    assert_eq!(tmp.notify_dirs_of(1), pid1_dirs, "left behind");

    let next = in_dir(shared_cluster(1), &tmp).spawn();
    next.wait_cluster_ready(1);
    assert_eq!(
        tmp.notify_dirs_of(1),
        Vec::<String>::new(),
        "a host master kept the stale directory of a killed PID-1 master"
    );
    assert_eq!(tmp.notify_dirs_of(host.pid), host_dirs);
    // The host master still hears its workers: the reload needs READY=1.
    host.reload_to(2);
}
