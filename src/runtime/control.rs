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
//! The socket file is created with mode 0600 (only the master's user may steer it)
//! and removed when the master exits.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

use crate::supervisor::WorkerState;
use crate::ClusterHandle;

/// A bound control socket; the file is removed on drop.
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
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
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Answers commands for `handle`'s cluster until the task is dropped.
    pub async fn serve(self, handle: ClusterHandle) {
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let handle = handle.clone();
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, &handle).await {
                            debug!(event = "control_connection_failed", error = %e, "control connection failed");
                        }
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
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads one command line and writes its answer.
async fn answer(stream: UnixStream, handle: &ClusterHandle) -> io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // A bounded read: a client that sends no newline within 256 bytes gets an error.
    let n = BufReader::new(read).take(256).read_line(&mut line).await?;
    let reply = match line.trim() {
        "status" => status(handle),
        "reload" => {
            handle.reload();
            "ok\n".to_string()
        }
        "terminate" => {
            handle.terminate();
            "ok\n".to_string()
        }
        _ if n == 0 => return Ok(()),
        other => format!("error unknown command `{other}`: use status, reload or terminate\n"),
    };
    write.write_all(reply.as_bytes()).await?;
    write.write_all(b"end\n").await?;
    write.shutdown().await
}

fn status(handle: &ClusterHandle) -> String {
    let workers = handle.workers();
    let mut out = format!(
        "generation={} workers={}\n",
        handle.generation(),
        handle.active_workers().len()
    );
    for w in workers {
        let state = match w.state {
            WorkerState::Starting => "starting",
            WorkerState::Ready => "ready",
            WorkerState::Retiring => "retiring",
        };
        let pid = w.pid.map_or_else(|| "-".to_string(), |p| p.to_string());
        out.push_str(&format!(
            "worker slot={} pid={pid} generation={} state={state}\n",
            w.slot, w.generation
        ));
    }
    out
}
