//! Workers that do not exec: wrapper shells, forked helpers, escaped grandchildren.
//!
//! Each worker leads its own process group; the stop signal and SIGKILL go to the
//! group, and whatever is left in the group when the worker exits is killed. With
//! `--subreaper` the master also adopts and reaps orphans that left the group.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn pid_file(what: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("recluster-{what}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn read_pid(path: &Path) -> u32 {
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

/// A `shared` cluster of one worker, `/bin/sh -c script test_worker`, with `args`.
fn wrapped(script: &str, args: &[&str]) -> Master {
    let worker = test_worker();
    shared_cluster(1)
        .args(args)
        .command([
            "/bin/sh".as_ref(),
            "-c".as_ref(),
            script.as_ref(),
            worker.as_os_str(),
        ])
        .spawn()
}

/// sh stays the worker, the server is its child, and a helper that ignores SIGTERM
/// (its pid appended to `helper`) is another.
fn wrapper_with_helper(helper: &Path) -> String {
    format!(
        "trap '' TERM; sleep 300 & echo $! >> {}; trap - TERM; \"$0\" & wait",
        helper.display()
    )
}

#[test]
fn a_shell_wrapper_that_does_not_exec_stops_cleanly_and_leaves_no_grandchild() {
    let helper = pid_file("helper");
    let m = wrapped(&wrapper_with_helper(&helper), &[]);
    let addr = m.addr();
    let shell = m.wait_cluster_ready(1)[&0];
    let server = request(addr).expect("served").pid;
    let sleeper = read_pid(&helper);
    assert_ne!(
        server, shell,
        "the server is the shell's child, not the worker itself"
    );
    assert_eq!(
        process_group(server),
        Some(shell),
        "the server is in the worker's group"
    );
    assert_eq!(process_group(sleeper), Some(shell));

    m.signal(Signal::SIGTERM);
    let exit = m.expect_exit(DEADLINE);
    assert!(exit.success(), "{exit:?}");
    let gone = |pid| poll_until(DEADLINE, || !pid_alive(pid));
    assert!(gone(server), "the server (grandchild) outlived the master");
    assert!(
        gone(sleeper),
        "the helper that ignores SIGTERM outlived the master"
    );
    println!("sh wrapper: shell {shell}, server {server}, helper {sleeper}: all gone, exit 0");
    let _ = std::fs::remove_file(&helper);
}

#[test]
fn a_reload_takes_down_the_old_wrappers_children_too() {
    let helper = pid_file("reload-helper");
    let m = wrapped(&wrapper_with_helper(&helper), &[]);
    m.addr();
    let old = m.wait_cluster_ready(1)[&0];
    let old_helper = read_pid(&helper);
    let from = m.mark();
    m.signal(Signal::SIGUSR2);
    m.wait_event_after(from, "reload_finished generation=2", DEADLINE);
    m.wait_event_after(from, &format!("worker_exited slot=0 pid={old}"), DEADLINE);
    assert!(
        poll_until(DEADLINE, || !pid_alive(old_helper)),
        "the old generation's helper (SIGTERM ignored) survived the reload"
    );
    let _ = std::fs::remove_file(&helper);
}

#[test]
fn a_subreaper_master_adopts_and_reaps_a_grandchild_that_escaped_the_group() {
    let helper = pid_file("escaped");
    // `setsid` puts the helper in a session (and group) of its own: killpg misses it.
    let script = format!(
        "setsid sleep 300 & echo $! > {helper}; exec \"$0\"",
        helper = helper.display()
    );
    // Without cgroups: in its worker's cgroup the escaped grandchild would be killed with
    // the worker (`master_death.rs`) before it could be seen adopted.
    let m = wrapped(&script, &["--subreaper", "--cgroups=false"]);
    m.addr();
    let worker_pid = m.wait_cluster_ready(1)[&0];
    let escaped = read_pid(&helper);
    // `$!` is written as soon as sh forks; the child calls setsid(2) a moment later.
    assert!(
        poll_until(DEADLINE, || process_group(escaped)
            .is_some_and(|group| group != worker_pid)),
        "it never left the worker's group (group {:?})",
        process_group(escaped)
    );
    // Kill the worker: its orphan is re-parented to the master, not to init.
    kill(Pid::from_raw(worker_pid as i32), Signal::SIGKILL).unwrap();
    assert!(
        poll_until(DEADLINE, || parent_pid(escaped) == Some(m.pid)),
        "the orphan was not adopted by the master (parent {:?})",
        parent_pid(escaped)
    );
    // When it dies the master reaps it: no zombie is left behind.
    kill(Pid::from_raw(escaped as i32), Signal::SIGKILL).unwrap();
    assert!(
        poll_until(DEADLINE, || !std::path::Path::new(&format!(
            "/proc/{escaped}"
        ))
        .exists()),
        "the adopted orphan stayed a zombie"
    );
    assert!(m.exit_status().is_none(), "the master is still running");
    let _ = std::fs::remove_file(&helper);
}
