//! `recluster status|reload|stop`: the subcommands over the control socket, found in
//! the default directory without a flag.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

/// A private default directory for the control sockets of one test's masters.
fn control_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("recluster-ops-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Runs `recluster ARGS` as an operator would, with `dir` as the default directory.
fn recluster(dir: &Path, args: &[&str]) -> Output {
    operator(Some(dir), args)
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

/// `recluster reload --wait`, which must succeed with `generation` ready.
fn reload_wait_to(dir: &Path, generation: u64) {
    let out = recluster(dir, &["reload", "--wait"]);
    assert!(out.status.success(), "reload --wait: {}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(said.contains(&format!("generation {generation}")), "{said}");
}

fn status_json(dir: &Path) -> Value {
    let out = recluster(dir, &["status", "--json"]);
    assert!(
        out.status.success(),
        "status --json failed: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status --json prints JSON")
}

fn rr_master(dir: &Path, workers: usize, extra: &[&str]) -> Master {
    Cluster::new()
        .workers(workers)
        .args(["--balance", "rr", "--listen", "127.0.0.1:0"])
        .args(extra)
        .env("RECLUSTER_CONTROL_DIR", dir)
        .command([echo()])
        .spawn()
}

#[test]
fn status_reload_wait_and_stop_find_the_only_master_without_a_flag() {
    let dir = control_dir("one");
    let m = rr_master(&dir, 2, &[]);
    let ready = m.wait_cluster_ready(2);
    let addr = m.addr();
    let socket = m.wait_event("control_socket", DEADLINE);
    assert_eq!(
        socket.field("path").map(PathBuf::from),
        Some(dir.join(format!("127.0.0.1-{}.sock", addr.port()))),
        "named after the first listen address"
    );
    for _ in 0..20 {
        request_from(addr, None, true, DEADLINE).expect("served");
    }

    // The readable table: a header and one row per worker with its pid.
    let out = recluster(&dir, &["status"]);
    let table = text(&out.stdout);
    assert!(out.status.success(), "status: {}", text(&out.stderr));
    eprintln!("recluster status:\n{table}");
    assert!(table.contains("SLOT  PID"), "{table}");
    for (slot, pid) in &ready {
        let row = table
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(&pid.to_string()))
            .unwrap_or_else(|| panic!("no row for pid {pid}: {table}"));
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells[0], slot.to_string(), "{row}");
        assert_eq!(&cells[2..4], ["1", "ready"], "{row}");
    }

    // The JSON: versioned, the master's facts, and counters that add up. A connection
    // is counted as handed just after it is sent, which its reply can outrun: polled.
    let mut v = status_json(&dir);
    poll_until(DEADLINE, || {
        v = status_json(&dir);
        v["totals"]["handed"] == 20
    });
    eprintln!("recluster status --json:\n{v}");
    assert_eq!(v["version"], 1);
    assert_eq!(v["master"]["pid"], m.pid);
    assert_eq!(v["master"]["balance"], "rr");
    assert_eq!(v["master"]["via"], "channel");
    assert_eq!(v["master"]["listeners"][0], addr.to_string());
    assert_eq!(v["master"]["generation"], 1);
    assert_eq!(v["master"]["slots"], 2);
    let workers = v["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    let handed: u64 = workers.iter().map(|w| w["handed"].as_u64().unwrap()).sum();
    assert_eq!(
        handed, 20,
        "each connection counted on the worker it went to: {v}"
    );
    assert_eq!(v["totals"]["handed"], 20);
    assert_eq!(v["totals"]["accepted"], 20);
    assert!(workers
        .iter()
        .all(|w| w["restarts"] == 0 && w["state"] == "ready"));

    // reload --wait returns once generation 2 serves every slot.
    reload_wait_to(&dir, 2);
    let v = status_json(&dir);
    assert_eq!(v["master"]["ready_generation"], 2, "{v}");
    assert_eq!(v["reloads"]["started"], 1);
    assert_eq!(v["reloads"]["finished"], 1);
    let ready_gen2 = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["generation"] == 2 && w["state"] == "ready")
        .count();
    assert_eq!(ready_gen2, 2, "{v}");

    // A worker that dies is a restart of its slot.
    let victim = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["slot"] == 0 && w["state"] == "ready")
        .and_then(|w| w["pid"].as_u64())
        .unwrap() as i32;
    let from = m.mark();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    m.wait_event_after(from, "worker_ready slot=0", DEADLINE);
    let restarted = poll_until(DEADLINE, || {
        status_json(&dir)["workers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["slot"] == 0 && w["restarts"] == 1 && w["state"] == "ready")
    });
    assert!(restarted, "slot 0 shows one restart: {}", status_json(&dir));

    let out = recluster(&dir, &["stop"]);
    assert!(out.status.success(), "stop: {}", text(&out.stderr));
    assert!(m.expect_exit(DEADLINE).success());
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(
        left.is_empty(),
        "the socket file is removed at exit: {left:?}"
    );
    let out = recluster(&dir, &["status"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "no master: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("no running master"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn with_two_masters_a_name_picks_one_and_no_flag_lists_them() {
    let dir = control_dir("two");
    let a = rr_master(&dir, 1, &["--name", "alpha"]);
    let b = rr_master(&dir, 1, &[]);
    a.wait_cluster_ready(1);
    b.wait_cluster_ready(1);
    a.wait_event("control_socket", DEADLINE);
    b.wait_event("control_socket", DEADLINE);

    let out = recluster(&dir, &["status"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    let b_name = format!("127.0.0.1-{}", b.addr().port());
    assert!(err.contains("alpha") && err.contains(&b_name), "{err}");

    let out = recluster(&dir, &["status", "--json", "--name", "alpha"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["master"]["pid"], a.pid);
    // `--control` given before the subcommand works too.
    let path = dir.join(format!("{b_name}.sock"));
    let out = recluster(
        &dir,
        &["--control", path.to_str().unwrap(), "status", "--json"],
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["master"]["pid"], b.pid);

    // A third master under a name in use does not start, and says why.
    let (exit, stderr) = Cluster::new()
        .workers(1)
        .args(["--listen", "127.0.0.1:0", "--name", "alpha"])
        .env("RECLUSTER_CONTROL_DIR", &dir)
        .command([echo()])
        .run(DEADLINE)
        .expect("the third master exits");
    assert_eq!(exit.code, Some(1), "{stderr}");
    assert!(
        stderr.contains("another master runs under this name"),
        "{stderr}"
    );
    let out = recluster(&dir, &["status", "--json", "--name", "alpha"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["master"]["pid"], a.pid, "the first keeps its socket");

    for m in [&a, &b] {
        m.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(m.expect_exit(DEADLINE).success());
    }
}

#[test]
fn reload_wait_fails_with_the_reason_when_the_new_generation_never_gets_ready() {
    let dir = control_dir("fail");
    let flag = dir.with_extension("broken");
    let _ = std::fs::remove_file(&flag);
    // New workers exit at once while the flag file exists: a broken deploy.
    let script = format!("test -e {} && exit 1; exec {}", flag.display(), echo());
    let m = Cluster::new()
        .workers(2)
        .args(["--listen", "127.0.0.1:0", "--respawn", "100ms"])
        .env("RECLUSTER_CONTROL_DIR", &dir)
        .command(["sh", "-c", &script])
        .spawn();
    m.wait_cluster_ready(2);
    std::fs::write(&flag, b"").unwrap();
    let out = recluster(&dir, &["reload", "--wait", "--timeout", "3s"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("generation 2 is not ready after 3s"), "{err}");
    assert!(err.contains("0 of 2 slots ready"), "{err}");
    // The old generation still serves.
    let reply = request_from(m.addr(), None, true, DEADLINE).expect("old workers serve");
    assert_eq!(reply.gen, 1);
    let _ = std::fs::remove_file(&flag);
    m.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(m.expect_exit(DEADLINE).success());
}

#[test]
fn scale_adds_and_removes_workers_and_status_follows() {
    let dir = control_dir("scale");
    let m = rr_master(&dir, 2, &[]);
    m.wait_cluster_ready(2);
    m.wait_event("control_socket", DEADLINE);
    let ready_slots = |v: &Value| {
        v["slots"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["state"] == "ready")
            .count()
    };

    let out = recluster(&dir, &["scale", "4"]);
    assert!(out.status.success(), "scale 4: {}", text(&out.stderr));
    let grown = poll_until(DEADLINE, || {
        let v = status_json(&dir);
        v["master"]["slots"] == 4 && ready_slots(&v) == 4
    });
    assert!(grown, "4 ready slots: {}", status_json(&dir));
    // The new slots take connections.
    let served: std::collections::BTreeSet<usize> = (0..40)
        .map(|_| {
            request_from(m.addr(), None, true, DEADLINE)
                .expect("served")
                .id
        })
        .collect();
    assert_eq!(served.len(), 4, "{served:?}");

    let out = recluster(&dir, &["scale", "1"]);
    assert!(out.status.success(), "scale 1: {}", text(&out.stderr));
    let shrunk = poll_until(DEADLINE, || {
        let v = status_json(&dir);
        v["master"]["slots"] == 1 && v["workers"].as_array().unwrap().len() == 1
    });
    assert!(
        shrunk,
        "one slot, the others' workers gone: {}",
        status_json(&dir)
    );
    let reply = request_from(m.addr(), None, true, DEADLINE).expect("served");
    assert_eq!(reply.id, 0);

    for bad in ["0", "1025", "x"] {
        let out = recluster(&dir, &["scale", bad]);
        assert_ne!(out.status.code(), Some(0), "scale {bad} is refused");
    }
    let out = recluster(&dir, &["stop"]);
    assert!(out.status.success());
    assert!(m.expect_exit(DEADLINE).success());
}

#[test]
fn reload_wait_reports_an_aborted_reload_and_exits_1() {
    let dir = control_dir("abort");
    let flag = dir.with_extension("broken");
    let _ = std::fs::remove_file(&flag);
    let script = format!("test -e {} && exit 1; exec {}", flag.display(), echo());
    let m = Cluster::new()
        .workers(2)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--respawn",
            "50ms",
            "--reload-abort-after",
            "2",
        ])
        .env("RECLUSTER_CONTROL_DIR", &dir)
        .command(["sh", "-c", &script])
        .spawn();
    m.wait_cluster_ready(2);
    std::fs::write(&flag, b"").unwrap();
    let out = recluster(&dir, &["reload", "--wait"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("generation 2 was aborted"), "{err}");
    let v = status_json(&dir);
    assert_eq!(v["reloads"]["aborted"], 1, "{v}");
    assert_eq!(v["reloads"]["finished"], 0, "{v}");
    assert_eq!(v["master"]["ready_generation"], 1, "{v}");
    let reply = request_from(m.addr(), None, true, DEADLINE).expect("old workers serve");
    assert_eq!(reply.gen, 1);

    // Fixed: the next reload goes through.
    std::fs::remove_file(&flag).unwrap();
    reload_wait_to(&dir, 3);
    m.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(m.expect_exit(DEADLINE).success());
}

#[test]
fn a_reload_overtaken_by_a_newer_one_counts_as_superseded() {
    let dir = control_dir("superseded");
    let hold = dir.with_extension("hold");
    let held = dir.with_extension("held");
    let _ = std::fs::remove_file(&held);
    let _ = std::fs::remove_file(&hold);
    // While `hold` exists a new worker never gets ready (it says so in `held` first).
    let script = format!(
        "test -e {hold} && {{ touch {held}; exec sleep 300; }}; exec {}",
        echo(),
        hold = hold.display(),
        held = held.display()
    );
    let m = Cluster::new()
        .workers(1)
        .args(["--listen", "127.0.0.1:0"])
        .env("RECLUSTER_CONTROL_DIR", &dir)
        .command(["sh", "-c", &script])
        .spawn();
    m.wait_cluster_ready(1);
    std::fs::write(&hold, b"").unwrap();
    m.signal(nix::sys::signal::Signal::SIGUSR2);
    assert!(
        poll_until(DEADLINE, || held.exists()),
        "generation 2 never started"
    );
    std::fs::remove_file(&hold).unwrap();
    reload_wait_to(&dir, 3);
    let v = status_json(&dir);
    let r = &v["reloads"];
    assert_eq!(
        (
            &r["started"],
            &r["finished"],
            &r["aborted"],
            &r["superseded"]
        ),
        (&2.into(), &1.into(), &0.into(), &1.into()),
        "{v}"
    );
    let table = text(&recluster(&dir, &["status"]).stdout);
    assert!(
        table.contains("2 started, 1 finished, 0 aborted, 1 superseded"),
        "{table}"
    );
    m.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(m.expect_exit(DEADLINE).success());
    let _ = std::fs::remove_file(&held);
}

#[test]
fn the_client_believes_only_its_own_user_in_a_private_directory() {
    if require("setpriv").is_none() {
        return;
    }
    if !nix::unistd::Uid::effective().is_root() {
        skip("needs root to run a socket as another user");
        return;
    }
    // A directory others may write to is refused, socket or not.
    let open = control_dir("open");
    std::fs::create_dir_all(&open).unwrap();
    std::fs::set_permissions(&open, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let out = recluster(&open, &["status"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("only it can write to"),
        "{}",
        text(&out.stderr)
    );

    // A socket held by another user (nobody) is not a master of ours.
    let dir = control_dir("foreign");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o733)).unwrap();
    let path = dir.join("fake.sock");
    let fake = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen(8)\nprint('up',flush=True)\nwhile True:\n    c,_=s.accept()\n    c.sendall(b'ok generation=999\\nend\\n')\n    c.close()\n";
    // A python3 that nobody may run (pyenv's shims live under /root).
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("python3");
    let mut server = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            python,
            "-c",
            fake,
        ])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut up = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut up,
    )
    .unwrap();
    assert_eq!(up.trim(), "up");
    let out = recluster(
        &dir,
        &["reload", "--wait", "--control", path.to_str().unwrap()],
    );
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("refused: the socket belongs to uid 65534"),
        "{}",
        text(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&open);
}
