//! `recluster status|reload|scale|stop`: the operator's side of the control socket.
//!
//! Each subcommand is one line sent to a running master's control socket
//! (`runtime::control`) and the answer printed. Which master: `--control PATH`, or
//! `--name NAME` in the default directory, or else the only master that answers there,
//! so that on a machine with one cluster `recluster status` needs no flag at all.
//!
//! The default directory is `$RECLUSTER_CONTROL_DIR` when set, else `/run/recluster`
//! for root, `$XDG_RUNTIME_DIR/recluster` otherwise (systemd's per-user runtime
//! directory), and `$TMPDIR/recluster-UID` when that is unset. A master names its socket after `--name`, or after its first listen
//! address (`127.0.0.1-8080.sock`, `__1-8080.sock` for `[::1]:8080`).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// The directory where masters put their control sockets by default
/// (`RECLUSTER_CONTROL_DIR` when set).
pub fn default_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RECLUSTER_CONTROL_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        return PathBuf::from("/run/recluster");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("recluster"),
        None => std::env::temp_dir().join(format!("recluster-{uid}")),
    }
}

/// The socket name a master without `--name` takes from its first listen address.
pub fn name_for(addr: Option<SocketAddr>) -> String {
    match addr {
        Some(SocketAddr::V4(a)) => format!("{}-{}", a.ip(), a.port()),
        Some(SocketAddr::V6(a)) => format!("{}-{}", a.ip().to_string().replace(':', "_"), a.port()),
        None => format!("recluster-{}", std::process::id()),
    }
}

/// Checks a `--name`: letters, digits, `.`, `_`, `-`; at most 64 bytes; not `.` or `..`.
pub fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s != "."
        && s != ".."
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "expected a name of letters, digits, `.`, `_` and `-` (at most 64), got `{s}`"
        ))
    }
}

/// Creates the default directory (mode 0700) if it is missing, and returns the path
/// of the socket called `name` in it. The directory must belong to this user: a
/// directory another user made could be theirs to swap sockets in.
pub fn prepare_default(name: &str) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = default_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    check_private(&dir)?;
    Ok(dir.join(format!("{name}.sock")))
}

/// Fails unless `dir` is a directory (not a symlink) of this user that no one else
/// can write to: in any other, someone else could plant a socket of their own.
fn check_private(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not a directory of this user that only it can write to (use a directory of your own in RECLUSTER_CONTROL_DIR, or --control PATH)",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// Which master a subcommand talks to.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Target {
    /// The master's control socket [default: the only master in the default directory]
    #[arg(long, env = "RECLUSTER_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,

    /// The master's --name (or first listen address, as in `127.0.0.1-8080`) in the default directory
    #[arg(long, env = "RECLUSTER_NAME", value_name = "NAME", value_parser = parse_name, conflicts_with = "control")]
    pub name: Option<String>,
}

/// The subcommands that steer a running master.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Subcommand {
    /// Show the running cluster: master, counters, one row per worker
    Status {
        /// Print the versioned JSON (see README) instead of the table
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Reload every worker with zero downtime
    Reload {
        /// Wait until every slot is served by the new generation; exit 1 with the
        /// reason if the reload fails or the time runs out
        #[arg(long)]
        wait: bool,
        /// Longest --wait waits (the reload itself goes on after it)
        #[arg(long, default_value = "5m", value_parser = crate::config::parse_duration, requires = "wait")]
        timeout: Duration,
        #[command(flatten)]
        target: Target,
    },
    /// Set the number of workers: added slots start and join when ready, removed ones
    /// (the highest) retire gracefully; as SIGTTIN/SIGTTOU do one at a time
    Scale {
        /// The number of workers to run, 1 to 1024
        #[arg(value_name = "N")]
        workers: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Stop the cluster gracefully (as SIGTERM does)
    Stop {
        #[command(flatten)]
        target: Target,
    },
}

impl Subcommand {
    /// The subcommand with `--control`/`--name` given before it (`recluster --control
    /// PATH status`) filled in where it has none of its own.
    pub fn aimed(mut self, control: Option<PathBuf>, name: Option<String>) -> Subcommand {
        let target = match &mut self {
            Subcommand::Status { target, .. }
            | Subcommand::Reload { target, .. }
            | Subcommand::Scale { target, .. }
            | Subcommand::Stop { target } => target,
        };
        if target.control.is_none() && target.name.is_none() {
            target.control = control;
            target.name = name;
        }
        self
    }
}

/// Runs a subcommand; returns the exit code: 0 done, 1 the master said no or cannot
/// be reached, 2 no master could be found.
pub fn run(sub: Subcommand) -> i32 {
    let (target, line, read_for) = match &sub {
        Subcommand::Status { json: _, target } => (target, "status json".to_string(), Duration::from_secs(10)),
        Subcommand::Reload {
            wait: true,
            timeout,
            target,
        } => (
            target,
            // Whole seconds on the wire, rounded up (at least 1).
            format!("reload wait {}", timeout.as_secs_f64().ceil().max(1.0) as u64),
            *timeout + Duration::from_secs(10),
        ),
        Subcommand::Reload { target, .. } => (target, "reload".to_string(), Duration::from_secs(10)),
        Subcommand::Scale { workers, target } => (target, format!("scale {workers}"), Duration::from_secs(10)),
        Subcommand::Stop { target } => (target, "stop".to_string(), Duration::from_secs(10)),
    };
    let path = match resolve(target) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("recluster: {e}");
            return 2;
        }
    };
    let reply = match request(&path, &line, read_for) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("recluster: {}: {e}", path.display());
            return 1;
        }
    };
    if let Some(error) = reply.first().and_then(|l| l.strip_prefix("error ")) {
        eprintln!("recluster: {error}");
        return 1;
    }
    match sub {
        Subcommand::Status { json, .. } => {
            let text = reply.first().map(String::as_str).unwrap_or("");
            if json {
                println!("{text}");
                return 0;
            }
            match serde_json::from_str::<Value>(text) {
                Ok(v) => {
                    print!("{}", table(&v));
                    0
                }
                Err(e) => {
                    eprintln!("recluster: the master's status is not JSON ({e}): {text}");
                    1
                }
            }
        }
        Subcommand::Reload { wait: true, .. } => {
            let generation = reply
                .first()
                .and_then(|l| l.strip_prefix("ok generation="))
                .unwrap_or("?");
            println!("reloaded: generation {generation} serves every slot");
            0
        }
        Subcommand::Reload { .. } => {
            println!("reload started");
            0
        }
        Subcommand::Scale { workers, .. } => {
            println!("scaling to {workers} workers: added slots join once ready, removed ones drain");
            0
        }
        Subcommand::Stop { .. } => {
            println!("stopping: workers are draining");
            0
        }
    }
}

/// The control socket a subcommand should use.
fn resolve(target: &Target) -> Result<PathBuf, String> {
    if let Some(path) = &target.control {
        return Ok(path.clone());
    }
    let dir = default_dir();
    // The same directory the master would accept: in another, anyone could have put a
    // socket that answers as a master.
    check_private(&dir).map_err(|e| format!("no running master found: {e}"))?;
    if let Some(name) = &target.name {
        let path = dir.join(format!("{name}.sock"));
        if !path.exists() {
            return Err(format!("no master named {name} runs here ({} does not exist)", path.display()));
        }
        return Ok(path);
    }
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        format!(
            "no running master found: cannot read {} ({e}); pass --control PATH",
            dir.display()
        )
    })?;
    let mut live: Vec<PathBuf> = entries
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .filter(|p| UnixStream::connect(p).is_ok())
        .collect();
    live.sort();
    match live.len() {
        0 => Err(format!(
            "no running master found in {}; pass --control PATH or --name NAME",
            dir.display()
        )),
        1 => Ok(live.remove(0)),
        _ => {
            let names: Vec<String> = live
                .iter()
                .filter_map(|p| Some(p.file_stem()?.to_string_lossy().into_owned()))
                .collect();
            Err(format!(
                "{} masters run here ({}); pick one with --name NAME",
                names.len(),
                names.join(", ")
            ))
        }
    }
}

/// Sends one command line and returns the answer's lines before `end`.
fn request(path: &Path, line: &str, read_for: Duration) -> Result<Vec<String>, String> {
    let mut stream = UnixStream::connect(path).map_err(|e| format!("cannot connect: {e}"))?;
    // Only a master of this user (or root) is believed, as the master answers only them.
    let peer = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(|e| format!("cannot tell who listens there: {e}"))?;
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if peer.uid() != uid && peer.uid() != 0 {
        return Err(format!(
            "refused: the socket belongs to uid {}, not to this user or root; not a master of yours",
            peer.uid()
        ));
    }
    let io = |e: std::io::Error| e.to_string();
    stream.set_read_timeout(Some(read_for)).map_err(io)?;
    stream.set_write_timeout(Some(Duration::from_secs(10))).map_err(io)?;
    stream.write_all(format!("{line}\n").as_bytes()).map_err(io)?;
    // The answer is small; bound it anyway (a status of many workers is a few KiB each).
    let mut text = String::new();
    (&mut stream)
        .take(64 << 20)
        .read_to_string(&mut text)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => format!(
                "no answer within {}s: the master does not respond (stopped, or overloaded?)",
                read_for.as_secs()
            ),
            std::io::ErrorKind::ConnectionReset => {
                "the master closed the connection (busy with 16 others?): try again".to_string()
            }
            _ => format!("no answer: {e}"),
        })?;
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    if lines.last().map(String::as_str) != Some("end") {
        return Err(format!("the answer ended early: {text:?}"));
    }
    lines.pop();
    Ok(lines)
}

/// The readable form of a `status json` answer.
fn table(v: &Value) -> String {
    use std::fmt::Write as _;
    let m = &v["master"];
    let t = &v["totals"];
    let r = &v["reloads"];
    let listeners: Vec<&str> = m["listeners"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let via = m["via"]
        .as_str()
        .map_or_else(String::new, |v| format!(" via {v}"));
    let mut out = String::new();
    let _ = writeln!(
        out,
        "master {} up {}: {}{via} on {}",
        m["pid"],
        human(m["uptime_seconds"].as_f64().unwrap_or(0.0)),
        m["balance"].as_str().unwrap_or("?"),
        if listeners.is_empty() { "-".to_string() } else { listeners.join(", ") }
    );
    let state = if m["terminating"].as_bool() == Some(true) {
        "terminating"
    } else if m["reloading"].as_bool() == Some(true) {
        "reloading"
    } else {
        "steady"
    };
    let _ = writeln!(
        out,
        "generation {} ({state}; ready generation {}), {} slots; reloads: {} started, {} finished, {} aborted, {} superseded",
        m["generation"], m["ready_generation"], m["slots"], r["started"], r["finished"], r["aborted"], r["superseded"]
    );
    let _ = writeln!(
        out,
        "connections: {} accepted, {} handed, {} closed, {} fallbacks, {} reclaimed, {} full, {} accept errors",
        t["accepted"], t["handed"], t["closed"], t["fallbacks"], t["reclaimed"], t["full"], t["accept_errors"]
    );
    if t["proxy_header_errors"].as_u64().unwrap_or(0) + t["proxy_untrusted"].as_u64().unwrap_or(0) > 0 {
        let _ = writeln!(
            out,
            "PROXY protocol: {} header errors, {} untrusted peers",
            t["proxy_header_errors"], t["proxy_untrusted"]
        );
    }
    out.push('\n');
    let mut rows = vec![[
        "SLOT", "PID", "GEN", "STATE", "UPTIME", "RESTARTS", "HANDED",
    ]
    .map(String::from)];
    for w in v["workers"].as_array().into_iter().flatten() {
        let num = |k: &str| w[k].as_u64().map_or_else(|| "-".to_string(), |n| n.to_string());
        rows.push([
            num("slot"),
            num("pid"),
            num("generation"),
            w["state"].as_str().unwrap_or("?").to_string(),
            human(w["uptime_seconds"].as_f64().unwrap_or(0.0)),
            num("restarts"),
            num("handed"),
        ]);
    }
    let widths: Vec<usize> = (0..7)
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    }
    out
}

/// `3d4h`, `2h05m`, `4m07s`, `12.3s`: a duration at a glance.
fn human(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..60 => format!("{seconds:.1}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_the_first_address_and_are_checked() {
        assert_eq!(name_for(Some("127.0.0.1:8080".parse().unwrap())), "127.0.0.1-8080");
        assert_eq!(name_for(Some("[::1]:80".parse().unwrap())), "__1-80");
        assert!(parse_name("web-1.prod_a").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(parse_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn durations_read_at_a_glance() {
        assert_eq!(human(12.34), "12.3s");
        assert_eq!(human(247.0), "4m07s");
        assert_eq!(human(7500.0), "2h05m");
        assert_eq!(human(3.0 * 86400.0 + 4.0 * 3600.0), "3d4h");
    }
}
