//! End to end: `--user`/`--group` run workers unprivileged while the master stays root
//! (it binds the ports; CI runs as root).

mod common;

use common::*;
use nix::sys::signal::Signal;
use nix::unistd::User;

/// The `Uid:`, `Gid:` and `Groups:` lines of a process's status, as numbers.
fn credentials(pid: u32) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or("")
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect()
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

/// Whether this test can switch users (it runs as root); skipped (failed under CI) if not.
fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        skip("switching workers to another user needs root");
    }
    root
}

#[test]
fn workers_run_as_the_given_user_with_no_supplementary_groups_while_the_master_stays_root() {
    if !root() {
        return;
    }
    let nobody = User::from_name("nobody").unwrap().expect("a nobody user");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let m = Cluster::new()
        .workers(2)
        .args([
            "--balance",
            "rr",
            "--listen",
            "127.0.0.1:0",
            "--user",
            "nobody",
        ])
        .command([echo()])
        .spawn();
    let addr = m.addr();
    let pids = m.wait_cluster_ready(2);
    for &pid in pids.values() {
        let (uids, gids, groups) = credentials(pid);
        assert_eq!(
            uids,
            vec![uid; 4],
            "worker {pid}: real, effective, saved, fs uid"
        );
        assert_eq!(gids, vec![gid; 4], "worker {pid}");
        assert!(
            groups.is_empty(),
            "worker {pid}: supplementary groups {groups:?}"
        );
    }
    // The user's own home and name, not the master's.
    let environ = std::fs::read(format!("/proc/{}/environ", pids[&0])).unwrap();
    let var = |key: &str| {
        environ
            .split(|&b| b == 0)
            .find_map(|v| v.strip_prefix(format!("{key}=").as_bytes()))
            .map(|v| String::from_utf8_lossy(v).into_owned())
    };
    assert_eq!(var("HOME").as_deref(), nobody.dir.to_str());
    assert_eq!(var("USER").as_deref(), Some("nobody"));
    assert_eq!(var("LOGNAME").as_deref(), Some("nobody"));
    let (master_uids, _, _) = credentials(m.pid);
    assert_eq!(master_uids, vec![0; 4], "the master stays root");
    let reply = request_from(addr, None, true, DEADLINE).expect("a worker answers");
    assert!(pids.values().any(|&p| p == reply.pid));
    // A reload starts the new generation as the same user.
    m.reload_to(2);
    let new = m.ready_workers(2);
    assert!(
        new.values().all(|&p| credentials(p).0 == vec![uid; 4]),
        "{new:?}"
    );
    m.signal(Signal::SIGTERM);
    assert!(m.wait_exit(DEADLINE).is_some_and(|e| e.success()));
}

#[test]
fn an_unprivileged_worker_can_still_say_ready_on_the_notify_socket() {
    if !root() {
        return;
    }
    // Ready only by READY=1 on NOTIFY_SOCKET: the master's private directory must let
    // the worker's user in, or the cluster never gets ready.
    let m = Cluster::new()
        .workers(1)
        .args([
            "--balance",
            "shared",
            "--listen",
            "127.0.0.1:0",
            "--ready-when",
            "ready",
        ])
        .args([
            "--ready-timeout",
            "10s",
            "--user",
            "nobody",
            "--group",
            "nogroup",
        ])
        .env("TEST_WORKER_NOTIFY", "1")
        .command([test_worker()])
        .spawn();
    let pids = m.wait_cluster_ready(1);
    let nobody = User::from_name("nobody").unwrap().expect("a nobody user");
    assert_eq!(credentials(pids[&0]).0[1], nobody.uid.as_raw());
    // ... and nothing more: the directory stays the master's (root's), searchable by
    // the workers' group only, so a worker cannot delete, replace or fill it.
    use std::os::unix::fs::MetadataExt;
    let environ = std::fs::read(format!("/proc/{}/environ", pids[&0])).unwrap();
    let socket = environ
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"NOTIFY_SOCKET="))
        .map(|v| std::path::PathBuf::from(String::from_utf8_lossy(v).into_owned()))
        .expect("NOTIFY_SOCKET in the worker's environment");
    let dir = std::fs::metadata(socket.parent().unwrap()).unwrap();
    assert_eq!(
        (dir.uid(), dir.mode() & 0o777),
        (0, 0o710),
        "the notify directory"
    );
    m.signal(Signal::SIGTERM);
    assert!(m.wait_exit(DEADLINE).is_some());
}
