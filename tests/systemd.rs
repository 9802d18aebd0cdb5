//! End to end: the master tells its own service manager (systemd's `NOTIFY_SOCKET`)
//! when it is ready, reloading, ready again and stopping, as `Type=notify-reload`
//! expects. The test plays systemd with a datagram socket of its own.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

/// `CLOCK_MONOTONIC` now, in microseconds.
fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the pointer given, valid for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

/// The next datagram, as text (the read timeout is the deadline).
fn next(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification before the deadline");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The value of `key=` in a notification.
fn value<'a>(message: &'a str, key: &str) -> Option<&'a str> {
    message
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn the_master_notifies_ready_reloading_ready_and_stopping() {
    let dir = std::env::temp_dir().join(format!("recluster-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let _ = std::fs::remove_file(&path);
    let systemd = UnixDatagram::bind(&path).unwrap();
    systemd.set_read_timeout(Some(DEADLINE)).unwrap();

    let m = Cluster::new()
        .workers(2)
        .args(["--balance", "rr", "--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &path)
        .command([echo()])
        .spawn();
    let ready = next(&systemd);
    assert_eq!(value(&ready, "READY"), Some("1"), "{ready:?}");
    assert_eq!(
        value(&ready, "STATUS"),
        Some("ready: generation 1, 2 workers"),
        "{ready:?}"
    );
    m.wait_cluster_ready(2);

    let before = monotonic_usec();
    m.reload_to(2);
    let after = monotonic_usec();
    let reloading = next(&systemd);
    assert_eq!(value(&reloading, "RELOADING"), Some("1"), "{reloading:?}");
    let at: u64 = value(&reloading, "MONOTONIC_USEC")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(
        (before..=after).contains(&at),
        "{before} <= {at} <= {after}"
    );
    assert_eq!(
        value(&reloading, "STATUS"),
        Some("reloading to generation 2")
    );
    let ready = next(&systemd);
    assert_eq!(value(&ready, "READY"), Some("1"), "{ready:?}");
    assert_eq!(
        value(&ready, "STATUS"),
        Some("ready: generation 2, 2 workers")
    );

    m.signal(Signal::SIGTERM);
    let stopping = next(&systemd);
    assert_eq!(value(&stopping, "STOPPING"), Some("1"), "{stopping:?}");
    assert!(m
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|e| e.success()));
    std::fs::remove_dir_all(&dir).unwrap();
}
