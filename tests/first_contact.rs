//! What a new user meets first (issue 8): a server that binds its own port is told,
//! once, what a worker must do in the current mode; a pid file names this master;
//! workers get only the variables documented for them.

mod common;

use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// The one warning that carries the advice: event `starts_failing`. Its words are
/// what these tests check; the line itself is found by its event.
fn is_advice(l: &LogLine) -> bool {
    l.matches("starts_failing") && l.level == "WARN"
}

/// Waits for the advice, then for `more` further exits of workers, and returns the
/// advice once it is sure it was said exactly once.
fn advice_said_once(m: &Master, more: usize) -> LogLine {
    let advice = m.wait_for(
        "the advice to a worker that fails to start",
        DEADLINE,
        is_advice,
    );
    let mut from = advice.index + 1;
    for _ in 0..more {
        from = m
            .wait_for_after(from, "one more worker exit", DEADLINE, |l| {
                l.matches("worker_exited")
            })
            .index
            + 1;
    }
    let said: Vec<LogLine> = m.lines().into_iter().filter(is_advice).collect();
    assert_eq!(said.len(), 1, "said more than once:\n{}", m.stderr_text());
    assert!(m.exit_status().is_none(), "the master must keep running");
    advice
}

#[test]
fn a_node_server_that_binds_the_port_itself_is_told_what_to_do_once() {
    let Some(node) = require("node") else {
        return;
    };
    let port = free_port();
    let script =
        format!("require('http').createServer((q, r) => r.end('hi')).listen({port}, '127.0.0.1')");
    let m = Cluster::new()
        .workers(2)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--respawn",
            "100ms",
            // The worker channel, as chosen by hand: Node's own IPC (the default for
            // node) would serve this server unchanged, were it run from a script.
            "--via",
            "channel",
        ])
        .command([node.to_str().unwrap(), "-e", &script])
        .spawn();
    let advice = advice_said_once(&m, 6);
    println!("rr, node binding its own port:\n{}", advice.raw);
    assert_eq!(advice.field("balance"), Some("rr"));
    assert!(advice.num("failures") >= 3);
    for needed in [
        "EADDRINUSE",
        &format!("127.0.0.1:{port}"),
        "RECLUSTER_FD",
        "--balance shared",
        "listen({fd: 3})",
        "--via node",
        "Will my server work?",
    ] {
        assert!(
            advice.message.contains(needed),
            "no {needed:?} in {}",
            advice.raw
        );
    }
}

#[test]
fn python_http_server_on_its_own_port_under_shared_is_told_to_accept_on_fd_3_once() {
    let Some(python) = require("python3") else {
        return;
    };
    let port = free_port();
    let m = Cluster::new()
        .workers(2)
        .args([
            "--balance",
            "shared",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--respawn",
            "100ms",
        ])
        .command([
            python.to_str().unwrap(),
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .spawn();
    let advice = advice_said_once(&m, 6);
    println!(
        "shared, python3 -m http.server binding its own port:\n{}",
        advice.raw
    );
    assert_eq!(advice.field("balance"), Some("shared"));
    for needed in ["LISTEN_FDS", "fd 3", "socket.fromfd(3", "uvicorn --fd 3"] {
        assert!(
            advice.message.contains(needed),
            "no {needed:?} in {}",
            advice.raw
        );
    }
    assert!(!advice.message.contains("RECLUSTER_FD"), "{}", advice.raw);
}

#[test]
fn a_worker_of_a_healthy_cluster_is_never_given_advice() {
    let m = Cluster::new()
        .workers(2)
        .args(["--listen", "127.0.0.1:0"])
        .command([echo()])
        .spawn();
    let old = m.wait_cluster_ready(2);
    // Replace both workers twice: each old worker exits at once when told to stop.
    for generation in 2..=3 {
        m.signal(Signal::SIGUSR2);
        m.wait_event(
            &format!("reload_finished generation={generation}"),
            DEADLINE,
        );
    }
    for pid in old.values() {
        m.wait_event(&format!("worker_exited pid={pid}"), DEADLINE);
    }
    assert!(
        m.lines().iter().all(|l| !is_advice(l)),
        "{}",
        m.stderr_text()
    );
}

/// One echo worker on a free port, the master's pid written to `path`.
fn with_pid_file(path: &std::path::Path) -> Cluster {
    Cluster::new()
        .workers(1)
        .args(["--listen", "127.0.0.1:0", "--pid-file"])
        .arg(path)
        .command([echo()])
}

#[test]
fn the_pid_file_names_this_master_reloads_through_it_and_goes_at_exit() {
    let dir = std::env::temp_dir().join(unique_tag("pidfile"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("app.pid");
    let m = with_pid_file(&path).spawn();
    m.wait_cluster_ready(1);
    let text = std::fs::read_to_string(&path).expect("the pid file");
    assert_eq!(text, format!("{}\n", m.pid));
    // `kill -USR2 $(cat app.pid)`, as the README says.
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("kill -USR2 $(cat '{}')", path.display()))
        .status()
        .unwrap();
    assert!(status.success());
    m.wait_event("reload_finished generation=2", DEADLINE);
    // A second master given the same pid file refuses to start, and leaves the file
    // naming the first.
    let (exit, stderr) = with_pid_file(&path)
        .run(DEADLINE)
        .expect("the second master should exit");
    assert_eq!(exit.code, Some(1), "{stderr}");
    assert!(
        stderr.contains("--pid-file") && stderr.contains(&m.pid.to_string()),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("{}\n", m.pid)
    );
    m.signal(Signal::SIGTERM);
    assert!(m.expect_exit(DEADLINE).success());
    assert!(!path.exists(), "the pid file outlived the master");
    // A stale file (its master was SIGKILLed) is replaced.
    std::fs::write(&path, format!("{}\n", m.pid)).unwrap();
    let again = with_pid_file(&path).spawn();
    again.wait_cluster_ready(1);
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        format!("{}\n", again.pid)
    );
    again.signal(Signal::SIGTERM);
    assert!(again.expect_exit(DEADLINE).success());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unwritable_pid_file_is_an_error_before_any_worker_starts() {
    let (exit, stderr) = Cluster::new()
        .workers(1)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--pid-file",
            "/nonexistent/dir/app.pid",
        ])
        .command([echo()])
        .run(DEADLINE)
        .expect("the master should exit");
    assert_eq!(exit.code, Some(1), "{stderr}");
    assert!(stderr.contains("--pid-file"), "{stderr}");
    assert!(events_in(&stderr, "worker_spawned").is_empty(), "{stderr}");
}

#[test]
fn workers_get_only_the_variables_documented_for_them() {
    let dir = std::env::temp_dir().join(unique_tag("worker-env"));
    std::fs::create_dir_all(&dir).unwrap();
    let dump = dir.join("env");
    let m = Cluster::new()
        .args(["--ready-when", "started"])
        .env("RECLUSTER_WORKERS", "1")
        .env("RECLUSTER_BALANCE", "shared")
        .env("RECLUSTER_LISTEN", "127.0.0.1:0")
        .env("RECLUSTER_LOG_LEVEL", "info")
        .env("RECLUSTER_ENV", "production")
        .env("RECLUSTER_SOMETHING_ELSE", "x")
        .env("APP_SETTING", "kept")
        .command([
            "sh",
            "-c",
            &format!(
                "env > '{}.tmp' && mv '{0}.tmp' '{0}' && exec sleep 60",
                dump.display()
            ),
        ])
        .spawn();
    m.wait_cluster_ready(1);
    assert!(
        poll_until(DEADLINE, || dump.exists()),
        "the worker wrote no environment"
    );
    let env = std::fs::read_to_string(&dump).unwrap();
    let names: Vec<&str> = env
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, _)| k)
        .collect();
    let mut recluster: Vec<&str> = names
        .iter()
        .copied()
        .filter(|k| k.starts_with("RECLUSTER_"))
        .collect();
    recluster.sort_unstable();
    assert_eq!(
        recluster,
        [
            "RECLUSTER_BALANCE",
            "RECLUSTER_GENERATION",
            "RECLUSTER_WORKERS"
        ],
        "{env}"
    );
    assert!(
        env.contains("\nRECLUSTER_BALANCE=shared\n")
            || env.starts_with("RECLUSTER_BALANCE=shared\n")
    );
    for documented in [
        "WORKER_ID",
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
        "APP_SETTING",
    ] {
        assert!(names.contains(&documented), "no {documented} in\n{env}");
    }
    m.signal(Signal::SIGTERM);
    assert!(m.wait_exit(Duration::from_secs(20)).is_some());
    std::fs::remove_dir_all(&dir).unwrap();
}
