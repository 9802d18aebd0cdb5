//! One cgroup v2 per worker, where the master may create them: what `setsid` cannot
//! escape.
//!
//! A worker leads its own process group, and the master kills that group when the
//! worker exits. A process that calls `setsid` (a daemonising server, a double fork)
//! leaves the group, and nothing the master can name reaches it any more. A cgroup is
//! inherited by every descendant and cannot be left without write access to a
//! `cgroup.procs` elsewhere in the tree, so `cgroup.kill` (Linux 5.14) ends a worker
//! and everything it started, daemons included, in one write, as systemd does for a
//! service.
//!
//! Layout: the master makes `<its own cgroup>/recluster-<pid>-<n>` (the *base*, one
//! per cluster) and in it one leaf `w<seq>` per worker. The child moves itself into
//! its leaf between `fork` and `exec` (writing `0` to the leaf's `cgroup.procs`, with
//! a path formatted before the fork, see `launch.rs`), so nothing the worker runs is
//! ever outside it. The master stays where it is: it needs no controller, so the "no
//! internal processes" rule (a cgroup with processes cannot *distribute controllers*
//! to its children) does not get in the way; only `cgroup.procs` and `cgroup.kill` are
//! used. When a worker has exited, its leaf is killed and removed once empty; when
//! the cluster ends, the base is killed and removed; when the master is killed, its
//! guard (`guard.rs`) kills and removes the base.
//!
//! Where cgroups can be used: a cgroup2 file system must be mounted (found in
//! `/proc/self/mountinfo`, since hybrid layouts mount it at `/sys/fs/cgroup/unified`
//! or elsewhere, not at `/sys/fs/cgroup`), the master's own cgroup (`0::/path` in
//! `/proc/self/cgroup`) must lie under that mount, and the master must be allowed to
//! create cgroups in it and to move processes between them: root, or a user owning
//! its subtree (a systemd unit with `Delegate=yes`). Anywhere else the master says
//! once why, and workers are contained by their process groups alone.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Tells clusters of one process apart (several may run in a library host).
static CLUSTERS: AtomicU64 = AtomicU64::new(0);

/// How long the master waits for killed processes to leave a cgroup before it gives up
/// removing it (each try is one `rmdir`).
const REMOVE_TRIES: u32 = 200;

/// Pause between two `rmdir` tries.
const REMOVE_PAUSE: Duration = Duration::from_millis(10);

/// The cluster's base cgroup and the counter naming its workers' leaves.
#[derive(Debug)]
pub(crate) struct Tree {
    /// `<mount>/<own cgroup>/recluster-<pid>-<n>`.
    base: PathBuf,
    /// The base as the kernel names it in `/proc/<pid>/cgroup` (`/own/recluster-…`).
    base_name: String,
    /// Sequence number of the next leaf.
    next: u64,
}

/// One worker's cgroup.
#[derive(Debug)]
pub(crate) struct Leaf {
    /// Its directory.
    path: PathBuf,
    /// Its name as `/proc/<pid>/cgroup` shows it.
    name: String,
    /// `<path>/cgroup.procs`, for the child to write to between fork and exec.
    pub procs: CString,
}

impl Tree {
    /// Creates the cluster's base cgroup, or says why cgroups cannot be used here.
    pub fn create() -> Result<Tree, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
        let mount = find_mount(&mountinfo).ok_or("no cgroup2 file system is mounted")?;
        let own_cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
        let own = own_path(&own_cgroup).ok_or("the master is in no cgroup v2 (no 0:: line)")?;
        let own_dir = dir_of(&mount, &own).ok_or_else(|| {
            format!(
                "the master's cgroup {own} is outside the cgroup2 mount at {} (root {})",
                mount.point.display(),
                mount.root
            )
        })?;
        // The pid alone does not make the name unique: masters that are PID 1 of their
        // own PID namespaces (containers) may share a cgroup tree, and one killed there
        // leaves its base behind (its guard dies with the namespace). Taken: the next.
        let mut attempts = 0;
        let (name, base) = loop {
            let name = format!(
                "recluster-{}-{}",
                std::process::id(),
                CLUSTERS.fetch_add(1, Ordering::Relaxed)
            );
            let base = own_dir.join(&name);
            match std::fs::create_dir(&base) {
                Ok(()) => break (name, base),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempts < 64 => {
                    attempts += 1;
                }
                Err(e) => return Err(format!("cannot create cgroup {}: {e}", base.display())),
            }
        };
        if !base.join("cgroup.kill").exists() {
            let _ = std::fs::remove_dir(&base);
            return Err("no cgroup.kill (Linux before 5.14)".into());
        }
        let base_name = format!("{}/{name}", own.trim_end_matches('/'));
        Ok(Tree {
            base,
            base_name,
            next: 0,
        })
    }

    /// The base cgroup's directory.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// Creates the next worker's leaf.
    pub fn leaf(&mut self) -> io::Result<Leaf> {
        let seq = self.next;
        self.next += 1;
        let path = self.base.join(format!("w{seq}"));
        std::fs::create_dir(&path)?;
        let procs = CString::new(path.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(Leaf {
            name: format!("{}/w{seq}", self.base_name),
            path,
            procs,
        })
    }
}

impl Leaf {
    /// Whether `pid` is in this leaf now (it moved itself in before exec).
    pub fn holds(&self, pid: u32) -> Option<bool> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        Some(own_path(&text).as_deref() == Some(self.name.as_str()))
    }

    /// SIGKILLs every process in the leaf (`cgroup.kill`).
    pub fn kill(&self) -> io::Result<()> {
        kill(&self.path)
    }

    /// The leaf's directory.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// SIGKILLs every process in the cgroup at `dir` and its descendants.
pub(crate) fn kill(dir: &Path) -> io::Result<()> {
    std::fs::write(dir.join("cgroup.kill"), b"1")
}

/// Removes the (killed) cgroup at `dir` and the cgroups in it, waiting a little for
/// killed processes to leave; gives up after about 2 s (`EBUSY` all along).
pub(crate) async fn remove(dir: PathBuf) -> io::Result<()> {
    let mut last = Ok(());
    for _ in 0..REMOVE_TRIES {
        last = remove_tree(&dir);
        match &last {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                tokio::time::sleep(REMOVE_PAUSE).await;
            }
            _ => break,
        }
    }
    last
}

/// One try at removing the cgroup at `dir`, its sub-cgroups first. A cgroup that is
/// already gone counts as removed.
fn remove_tree(dir: &Path) -> io::Result<()> {
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_tree(&e.path())?;
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    match std::fs::remove_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A cgroup2 mount: where it is, and which cgroup of the hierarchy it shows there.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Mount {
    /// The mount point.
    pub point: PathBuf,
    /// The cgroup shown at the mount point (`/` unless a subtree was bind-mounted).
    pub root: String,
}

/// The first cgroup2 mount in `/proc/self/mountinfo` text.
///
/// A line is `id parent major:minor root mount-point options [optional…] - fstype
/// source super-options`; the optional fields vary in number, so the file system type
/// is the field after the lone `-`. Spaces and other bytes in paths are written as
/// octal escapes (`\040`).
pub(crate) fn find_mount(mountinfo: &str) -> Option<Mount> {
    mountinfo.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().position(|&f| f == "-")?;
        if fields.get(dash + 1) != Some(&"cgroup2") || dash < 5 {
            return None;
        }
        Some(Mount {
            point: PathBuf::from(unescape(fields[4])),
            root: unescape(fields[3]),
        })
    })
}

/// The cgroup v2 path in `/proc/<pid>/cgroup` text (the `0::/path` line).
pub(crate) fn own_path(proc_cgroup: &str) -> Option<String> {
    proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().to_owned())
}

/// Where the cgroup `path` lies under `mount`, if it is visible there.
fn dir_of(mount: &Mount, path: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" {
        path.strip_prefix('/')?
    } else {
        let rest = path.strip_prefix(mount.root.as_str())?;
        if !rest.is_empty() && !rest.starts_with('/') {
            return None;
        }
        rest.trim_start_matches('/')
    };
    // "(deleted)" or a path leaving the mount cannot be written to.
    if rel.split('/').any(|c| c == "..") || path.ends_with(" (deleted)") {
        return None;
    }
    Some(mount.point.join(rel))
}

/// Decodes the octal escapes (`\040` for a space) of a mountinfo field.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_in_a_hybrid_layout() {
        let text = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_mount(text),
            Some(Mount {
                point: "/sys/fs/cgroup/unified".into(),
                root: "/".into()
            })
        );
        assert_eq!(find_mount("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"), None);
    }

    #[test]
    fn mount_points_with_spaces_are_unescaped() {
        let text = "41 31 0:38 /sub /mnt/c\\040g rw - cgroup2 cgroup2 rw\n";
        let m = find_mount(text).unwrap();
        assert_eq!(m.point, PathBuf::from("/mnt/c g"));
        assert_eq!(m.root, "/sub");
    }

    #[test]
    fn own_cgroup_is_the_0_line() {
        let text = "9:name=systemd:/\n4:memory:/x\n0::/system.slice/app.service\n";
        assert_eq!(own_path(text).as_deref(), Some("/system.slice/app.service"));
        assert_eq!(own_path("4:memory:/x\n"), None);
    }

    #[test]
    fn a_cgroup_maps_to_a_directory_under_the_mount() {
        let unified = Mount {
            point: "/sys/fs/cgroup/unified".into(),
            root: "/".into(),
        };
        assert_eq!(dir_of(&unified, "/"), Some("/sys/fs/cgroup/unified".into()));
        assert_eq!(
            dir_of(&unified, "/a/b"),
            Some("/sys/fs/cgroup/unified/a/b".into())
        );
        let sub = Mount {
            point: "/mnt".into(),
            root: "/a".into(),
        };
        assert_eq!(dir_of(&sub, "/a/b"), Some("/mnt/b".into()));
        assert_eq!(dir_of(&sub, "/a"), Some("/mnt".into()));
        assert_eq!(dir_of(&sub, "/ab"), None);
        assert_eq!(dir_of(&sub, "/c"), None);
    }
}
