//! The control socket: reload, terminate and status over a unix socket (`--control PATH`).
//!
//! For operators and scripts that would rather not find the master's pid to signal
//! it, and for anything that wants the cluster's state as text. One command per
//! connection, one line, answered with lines and a final `end`:
//!
//! ```text
//! status     -> generation=2 workers=4
//!               worker slot=0 pid=4242 generation=2 state=ready
//!               …
//!               end
//! reload     -> ok / end
//! terminate  -> ok / end
//! ```
//!
//! The socket file is created with mode 0600 (under a umask that never lets it exist
//! more open than that) and removed when the master exits. A peer must be the master's
//! user or root (`SO_PEERCRED`). Whoever connects cannot starve the master: at most
//! [`MAX_CONNECTIONS`] are served at once (more are answered `error busy` and closed at
//! once, so they hold no descriptor), and each has [`READ_DEADLINE`] to send its line.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

use crate::supervisor::WorkerState;
use crate::ClusterHandle;

/// Control connections served at once.
pub const MAX_CONNECTIONS: usize = 16;

/// Time a control client has to send its command line.
pub const READ_DEADLINE: std::time::Duration = std::time::Duration::from_secs(2);

/// `reload wait` connections served at once: fewer than [`MAX_CONNECTIONS`], so that
/// waiting clients never take every place from `status` and `stop`.
pub const MAX_WAITS: usize = 8;

/// A bound control socket; the file is removed on drop (if it is still this socket's).
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file bound, so that drop never removes the
    /// socket of another master that took the path since.
    file: Option<(u64, u64)>,
}

impl ControlSocket {
    /// Binds `path` (replacing a stale socket file left by a dead master) with mode 0600.
    pub fn bind(path: &Path) -> io::Result<ControlSocket> {
        if std::fs::symlink_metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        }) {
            // A live master still answering there is an error; a dead one's file is not.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running master", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        // The socket is created with the umask applied: 0177 makes it 0600 from the
        // start, never reachable by others between bind and chmod. (The umask is the
        // process's; nothing else in the master creates files while it is changed.)
        // SAFETY: umask has no preconditions and cannot fail.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let listener = bound?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let file = file_id(path);
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            file,
        })
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Answers commands for `handle`'s cluster until the task is dropped.
    pub async fn serve(self, handle: ClusterHandle) {
        let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let waits = Arc::new(Semaphore::new(MAX_WAITS));
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        // Busy: say so if the peer can take it now, and close at once.
                        let _ = stream.try_write(b"error busy: try again\nend\n");
                        continue;
                    };
                    let (handle, waits) = (handle.clone(), waits.clone());
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &handle, &waits).await {
                            debug!(event = "control_connection_failed", error = %e, "control connection failed");
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    warn!(event = "control_failed", error = %e, "control socket accept failed");
                    // Out of descriptors, most likely: let some free up.
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if self.file.is_some() && file_id(&self.path) == self.file {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Device and inode of the file at `path` (not following a symlink).
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Reads one command line and writes its answer.
async fn answer(stream: UnixStream, handle: &ClusterHandle, waits: &Semaphore) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    let allowed = stream
        .peer_cred()
        .is_ok_and(|c| c.uid() == uid || c.uid() == 0);
    let (read, mut write) = stream.into_split();
    // A bounded read: a client that sends no newline within 256 bytes, or nothing
    // within READ_DEADLINE, gets an error.
    let mut reader = BufReader::new(read).take(256);
    let reply = if allowed {
        let mut bytes = Vec::new();
        match tokio::time::timeout(READ_DEADLINE, reader.read_until(b'\n', &mut bytes)).await {
            Ok(r) => match (r?, std::str::from_utf8(&bytes)) {
                (0, _) => return Ok(()),
                (_, Ok(line)) => {
                    // A client that hangs up (or shuts down its writing) cancels what
                    // it waits for (`reload wait`); a command that answers at once
                    // answers first, as `biased` polls it first.
                    let hangup = async {
                        let mut rest = [0u8; 64];
                        while let Ok(1..) = reader.read(&mut rest).await {}
                    };
                    tokio::select! {
                        biased;
                        reply = command(line.trim(), handle, waits) => reply,
                        () = hangup => return Ok(()),
                    }
                }
                (_, Err(_)) => {
                    format!("error the command is not UTF-8: use {COMMANDS}\n")
                }
            },
            Err(_) => "error no command within the read deadline\n".into(),
        }
    } else {
        "error permission denied: not the master's user\n".into()
    };
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"end\n").await?;
    write.shutdown().await?;
    // Close only once the client has closed too (or after the deadline): closing with
    // bytes of the client still unread would reset the connection, and the client
    // could lose the answer it has not read yet (a refused client's command, say).
    reader.set_limit(DRAIN_LIMIT);
    let _ = tokio::time::timeout(
        READ_DEADLINE,
        tokio::io::copy(&mut reader, &mut tokio::io::sink()),
    )
    .await;
    Ok(())
}

/// Most bytes read and thrown away after the answer, while waiting for the client to close.
const DRAIN_LIMIT: u64 = 4096;

/// The answer to one command line.
async fn command(line: &str, handle: &ClusterHandle, waits: &Semaphore) -> String {
    let mut words = line.split_ascii_whitespace();
    match (words.next().unwrap_or(""), words.next(), words.next()) {
        ("status", None, _) => status(handle),
        ("status", Some("json"), None) => format!("{}\n", handle.status().to_json()),
        ("reload", None, _) => {
            handle.reload();
            "ok\n".to_string()
        }
        ("reload", Some("wait"), seconds) => {
            let limit = match seconds.map(str::parse::<u64>) {
                None => MAX_RELOAD_WAIT,
                Some(Ok(s)) => std::time::Duration::from_secs(s).min(MAX_RELOAD_WAIT),
                Some(Err(_)) => return "error expected `reload wait [SECONDS]`\n".into(),
            };
            let Ok(_place) = waits.try_acquire() else {
                return format!("error busy: {MAX_WAITS} reload waits already; try again or reload without waiting\n");
            };
            reload_and_wait(handle, limit).await
        }
        ("scale", Some(n), None) => match n.parse::<usize>() {
            Ok(n) if (1..=crate::supervisor::MAX_SLOTS).contains(&n) => {
                let status = handle.status();
                if status.terminating {
                    return "error the cluster is terminating\n".into();
                }
                if status.via == Some(crate::Via::Socket) {
                    return "error cannot scale under --via socket: each slot's sockets are bound at start\n".into();
                }
                handle.scale(n);
                format!("ok workers={n}\n")
            }
            _ => format!("error expected `scale N` with N from 1 to {}\n", crate::supervisor::MAX_SLOTS),
        },
        ("terminate" | "stop", None, _) => {
            handle.terminate();
            "ok\n".to_string()
        }
        _ => format!("error unknown command `{line}`: use {COMMANDS}\n"),
    }
}

/// The commands, as the error for an unknown one lists them.
const COMMANDS: &str = "status, status json, reload, reload wait [SECONDS], scale N, stop (or terminate)";

/// Longest a `reload wait` waits, whatever the client asks.
pub const MAX_RELOAD_WAIT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Reloads and answers once the new generation serves every slot, the reload is
/// given up, or `limit` has passed.
async fn reload_and_wait(handle: &ClusterHandle, limit: std::time::Duration) -> String {
    match tokio::time::timeout(limit, handle.reload_and_wait()).await {
        Ok(Ok(generation)) => format!("ok generation={generation}\n"),
        Ok(Err(e)) => format!("error {e}\n"),
        Err(_) => {
            let s = handle.status();
            let ready = s
                .workers
                .iter()
                .filter(|w| w.generation == s.generation && w.state == WorkerState::Ready)
                .count();
            format!(
                "error generation {} is not ready after {}s ({ready} of {} slots ready); the old workers keep serving: see the master's log\n",
                s.generation,
                limit.as_secs(),
                s.slots.len()
            )
        }
    }
}

fn status(handle: &ClusterHandle) -> String {
    let workers = handle.workers();
    let mut out = format!(
        "generation={} workers={}\n",
        handle.generation(),
        handle.active_workers().len()
    );
    for w in workers {
        let state = crate::runtime::status::state_name(w.state);
        let pid = w.pid.map_or_else(|| "-".to_string(), |p| p.to_string());
        out.push_str(&format!(
            "worker slot={} pid={pid} generation={} state={state}\n",
            w.slot, w.generation
        ));
    }
    out
}
