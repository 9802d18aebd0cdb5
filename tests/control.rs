//! The control socket: status, reload and terminate without signals.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use common::*;

fn command(path: &Path, cmd: &str) -> Vec<String> {
    let mut s = UnixStream::connect(path).expect("connect to the control socket");
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(format!("{cmd}\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).expect("reply");
    let lines: Vec<String> = out.lines().map(String::from).collect();
    assert_eq!(lines.last().map(String::as_str), Some("end"), "{out}");
    lines
}

#[test]
fn status_reload_and_terminate_over_the_control_socket() {
    let path = std::env::temp_dir().join(format!("recluster-ctl-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let m = shared_cluster(2).arg("--control").arg(&path).spawn();
    let ready = m.wait_cluster_ready(2);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "only the master's user may steer it");

    let status = command(&path, "status");
    assert_eq!(status[0], "generation=1 workers=2");
    for (slot, pid) in &ready {
        let line = format!("worker slot={slot} pid={pid} generation=1 state=ready");
        assert!(status.contains(&line), "{line} missing in {status:?}");
    }

    let from = m.mark();
    assert_eq!(command(&path, "reload"), ["ok", "end"]);
    m.wait_event_after(from, "reload_finished generation=2", DEADLINE);
    let ready_after = poll_until(DEADLINE, || {
        let s = command(&path, "status");
        s[0] == "generation=2 workers=2"
            && s.iter()
                .filter(|l| l.ends_with("generation=2 state=ready"))
                .count()
                == 2
    });
    assert!(
        ready_after,
        "status never showed two ready generation-2 workers"
    );

    let bad = command(&path, "explode");
    assert!(bad[0].starts_with("error unknown command"), "{bad:?}");

    assert_eq!(command(&path, "terminate"), ["ok", "end"]);
    assert!(m.expect_exit(DEADLINE).success());
    assert!(!path.exists(), "the socket file is removed at exit");
}

#[test]
fn a_control_path_held_by_a_running_master_is_refused() {
    let path = std::env::temp_dir().join(format!("recluster-ctl2-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let first = shared_cluster(1).arg("--control").arg(&path).spawn();
    first.wait_cluster_ready(1);
    let (exit, stderr) = shared_cluster(1)
        .arg("--control")
        .arg(&path)
        .run(DEADLINE)
        .expect("the second master exits");
    assert_eq!(exit.code, Some(1), "{stderr}");
    assert!(stderr.contains("in use by a running master"), "{stderr}");
    assert!(path.exists(), "the first master's socket is left alone");
}

#[test]
fn idle_and_hostile_control_clients_cannot_starve_the_master() {
    let dir = std::env::temp_dir().join(unique_tag("ctl-starve"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("app.sock");
    // A master with few descriptors: 1,020 idle connections would take them all.
    let m = shared_cluster(1)
        .arg("--control")
        .arg(&path)
        .nofile(256)
        .spawn();
    m.wait_cluster_ready(1);
    let fds_before = fd_count(m.pid);
    let idle: Vec<UnixStream> = (0..1020)
        .filter_map(|_| UnixStream::connect(&path).ok())
        .collect();
    // Status is answered again (the idle ones beyond the bound were closed at once,
    // the rest run out of time), and the master holds few descriptors meanwhile.
    let mut peak = fds_before;
    let mut answered = Vec::new();
    let ok = poll_until(DEADLINE, || {
        peak = peak.max(fd_count(m.pid));
        let Ok(mut s) = UnixStream::connect(&path) else {
            return false;
        };
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let _ = s.write_all(b"status\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        answered = out.lines().map(String::from).collect();
        answered
            .first()
            .is_some_and(|l| l.starts_with("generation=1 "))
    });
    println!(
        "control: {} idle connections; master fds {fds_before} before, peak {peak}; status: {answered:?}",
        idle.len()
    );
    assert!(ok, "status never answered: {answered:?}");
    assert!(peak < fds_before + 40, "the master held {peak} descriptors");
    drop(idle);

    // A line that is not UTF-8 is answered with an error.
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"\xff\xfe status\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("error") && out.ends_with("end\n"), "{out}");

    // Another user is refused even if the file's mode lets it connect.
    if let Some(python) = require("python3") {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        let script = "import os, socket, sys\n\
                      os.setgid(65534); os.setuid(65534)\n\
                      s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n\
                      try: s.sendall(b'terminate\\n')\n\
                      except OSError: pass\n\
                      print(s.makefile().read(), end='')";
        let out = std::process::Command::new(python)
            .args(["-c", script])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("error permission denied"),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            m.exit_status().is_none(),
            "another user terminated the master"
        );
    }
    m.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(m.expect_exit(DEADLINE).success());
    std::fs::remove_dir_all(&dir).unwrap();
}
