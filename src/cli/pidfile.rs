//! The master's pid file (`--pid-file`), so scripts signal *this* master.
//!
//! `kill -USR2 $(pgrep -o recluster)` signals whichever recluster is oldest on the
//! machine; `kill -USR2 $(cat app.pid)` signals the one that wrote `app.pid`. The file
//! is written whole or not at all (a temporary file renamed over it), as nginx and
//! gunicorn do, once the listening sockets are bound; it is removed when the master
//! exits, unless another process has written its own pid there since.
//!
//! Like gunicorn, a master refuses a pid file that names another running recluster:
//! two masters sharing one file would signal each other's clusters. A file naming a
//! dead process (a master that was SIGKILLed) is stale and replaced. The temporary
//! file is created exclusively (`O_EXCL`, which never follows a symbolic link), so a
//! link planted at its name cannot make the master write through it.

use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A pid file holding this process's pid, removed when dropped.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
    pid: u32,
}

impl PidFile {
    /// Writes this process's pid (and a newline) to `path`, replacing a stale file;
    /// fails if the file names another recluster that is running.
    pub fn create(path: &Path) -> io::Result<PidFile> {
        let pid = std::process::id();
        if let Some(other) = running_master(path).filter(|&p| p != pid) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "it names recluster {other}, which is running: stop that master, or give \
                     this one another --pid-file"
                ),
            ));
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".{pid}.tmp"));
        let tmp = PathBuf::from(tmp);
        // A leftover (or planted) entry at the temporary name is removed, not followed.
        let _ = std::fs::remove_file(&tmp);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .and_then(|mut f| writeln!(f, "{pid}").and_then(|()| f.sync_all()))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(PidFile {
            path: path.to_owned(),
            pid,
        })
    }
}

/// The pid in the file at `path`, if it names a running recluster.
fn running_master(path: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|&b| b == 0).next()?;
    let name = Path::new(std::ffi::OsStr::from_bytes(argv0)).file_name()?;
    name.as_bytes().starts_with(b"recluster").then_some(pid)
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let ours = std::fs::read_to_string(&self.path)
            .is_ok_and(|s| s.trim().parse::<u32>() == Ok(self.pid));
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_our_pid_and_is_removed_only_while_it_does() {
        let dir = std::env::temp_dir().join(format!("recluster-pidfile-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("app.pid");
        std::fs::write(&path, "1\n").unwrap();
        let file = PidFile::create(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, format!("{}\n", std::process::id()));
        drop(file);
        assert!(!path.exists());
        // Another master took the path over: its file stays.
        let file = PidFile::create(&path).unwrap();
        std::fs::write(&path, "4242\n").unwrap();
        drop(file);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "4242\n");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(PidFile::create(&dir.join("missing/app.pid")).is_err());
    }
}
