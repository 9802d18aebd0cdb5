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
