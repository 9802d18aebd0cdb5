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

/// A datagram socket playing systemd's notify socket, in a directory of its own
/// (named after `name`, removed by the caller): the directory, the path, the socket.
fn service_manager(name: &str) -> (std::path::PathBuf, std::path::PathBuf, UnixDatagram) {
    let dir = std::env::temp_dir().join(format!("recluster-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let _ = std::fs::remove_file(&path);
    let socket = UnixDatagram::bind(&path).unwrap();
    (dir, path, socket)
}

#[test]
fn the_master_notifies_ready_reloading_ready_and_stopping() {
    let (dir, path, systemd) = service_manager("notify");
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

/// The master started as systemd starts a socket-activated service: `listener` at fd 3,
/// `LISTEN_FDS=1` and `LISTEN_PID` = the master's own pid (a shell sets it to its own
/// and execs the master), stderr to `log`.
fn start_activated(
    listener: &std::net::TcpListener,
    log: &std::path::Path,
    extra: &[&str],
) -> std::process::Child {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    let mut cmd = std::process::Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$@\"")
        .arg("sh")
        .arg(recluster_bin())
        .args(["--workers", "2", "--balance", "rr"])
        .args(extra)
        .arg("--")
        .arg(echo())
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "web")
        .env_remove("LISTEN_PID")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    // SAFETY: dup2 is async-signal-safe; it puts the listener at fd 3 in the child
    // only (without close-on-exec, as systemd passes it).
    unsafe {
        cmd.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: then clear it instead.
            let placed = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if placed < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("sh")
}

#[test]
fn a_socket_activated_master_serves_the_passed_socket_and_binds_nothing() {
    let dir = std::env::temp_dir().join(format!("recluster-activation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log = dir.join("master.log");
    let mut master = start_activated(&listener, &log, &[]);
    // Nobody but the master accepts on the passed socket: a reply means it serves it.
    let mut reply = None;
    let served = poll_until(DEADLINE, || {
        reply = request_from(addr, None, true, Duration::from_secs(2)).ok();
        reply.is_some()
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(served, "no answer on the passed socket {addr}:\n{text}");
    assert!(text.contains("event=\"socket_activated\""), "{text}");
    let listening: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("event=\"listening\""))
        .collect();
    assert_eq!(
        listening.len(),
        1,
        "it listens on the passed socket only:\n{text}"
    );
    assert!(listening[0].contains(&format!("addr={addr}")), "{text}");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(master.id() as libc::pid_t, libc::SIGTERM) };
    assert!(master.wait().unwrap().success());

    // A --listen address that is not the passed socket's is a clear error, not a bind.
    let mut wrong = start_activated(&listener, &log, &["--listen", "127.0.0.1:1"]);
    let status = wrong.wait().unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(
        text.contains("--listen 127.0.0.1:1 is not among the sockets"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_service_manager_that_never_reads_does_not_stop_the_master() {
    // Bound and never read: its queue fills after a few datagrams.
    let (dir, path, deaf) = service_manager("deaf");
    socket2::SockRef::from(&deaf)
        .set_recv_buffer_size(1)
        .unwrap();
    let m = Cluster::new()
        .workers(1)
        .args(["--balance", "rr", "--listen", "127.0.0.1:0"])
        .env("NOTIFY_SOCKET", &path)
        .command([echo()])
        .spawn();
    m.wait_cluster_ready(1);
    for generation in 2..=13 {
        m.reload_to(generation);
    }
    assert!(
        !m.events("service_notify_failed").is_empty(),
        "the full queue was noticed"
    );
    m.signal(Signal::SIGTERM);
    assert!(m
        .wait_exit(Duration::from_secs(20))
        .is_some_and(|e| e.success()));
    drop(deaf);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `ExecReload=recluster reload --wait` (with `Type=notify`): the command returns only
/// once the new generation serves every slot, after the master told systemd `READY=1`
/// for it, so `systemctl reload` ordering holds.
#[test]
fn exec_reload_with_reload_wait_returns_after_the_new_generation_is_ready() {
    let (dir, path, systemd) = service_manager("execreload");
    systemd.set_read_timeout(Some(DEADLINE)).unwrap();
    let control = dir.join("control.sock");
    let m = Cluster::new()
        .workers(2)
        .args(["--balance", "rr", "--listen", "127.0.0.1:0", "--control"])
        .arg(&control)
        .env("NOTIFY_SOCKET", &path)
        .command([echo()])
        .spawn();
    assert_eq!(value(&next(&systemd), "READY"), Some("1"));
    m.wait_cluster_ready(2);

    // What systemd runs for `systemctl reload` with this ExecReload=.
    operator_ok(
        None,
        &["reload", "--wait", "--control", control.to_str().unwrap()],
    );
    // Both notifications are in already: nothing to wait for.
    systemd.set_nonblocking(true).unwrap();
    let reloading = next(&systemd);
    assert_eq!(value(&reloading, "RELOADING"), Some("1"), "{reloading:?}");
    let ready = next(&systemd);
    assert_eq!(value(&ready, "READY"), Some("1"), "{ready:?}");
    assert_eq!(
        value(&ready, "STATUS"),
        Some("ready: generation 2, 2 workers")
    );
    let served = request_from(m.addr(), None, true, DEADLINE).expect("served");
    assert_eq!(
        served.gen, 2,
        "only generation 2 serves once reload --wait returned"
    );

    m.signal(Signal::SIGTERM);
    assert!(m.wait_exit(DEADLINE).is_some_and(|e| e.success()));
    std::fs::remove_dir_all(&dir).unwrap();
}
