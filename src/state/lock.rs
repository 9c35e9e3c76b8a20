//! One writer per workspace: `.taper/lock`, held with an OS file lock.
//!
//! The lock file also names its holder (pid, host, start time, run). The OS releases the
//! lock when the holder dies, however it dies; a file that still names a holder when we
//! take the lock therefore tells of a run that did not exit cleanly, and we say so.

use super::layout::Layout;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};

/// The holder of the workspace lock, as written in the lock file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    /// Process id.
    pub pid: u32,
    /// Host name.
    pub host: String,
    /// When the holder started (RFC 3339).
    pub started: String,
    /// The holder's run id.
    pub run_id: String,
}

impl Holder {
    fn parse(text: &str) -> Option<Holder> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        Some(Holder {
            pid: v.get("pid")?.as_u64()? as u32,
            host: v.get("host")?.as_str()?.to_string(),
            started: v.get("started")?.as_str()?.to_string(),
            run_id: v.get("run_id")?.as_str()?.to_string(),
        })
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "run {} (pid {} on {}, started {})",
            self.run_id, self.pid, self.host, self.started
        )
    }
}

/// Why the lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("the workspace is locked by {0}; wait for it to finish or stop it")]
    Held(Holder),
    /// Another process holds it and its file could not be read.
    #[error("the workspace is locked by another taper process")]
    HeldUnknown,
    /// I/O.
    #[error("cannot use the lock file {path}: {source}")]
    Io {
        /// The lock file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// The held lock; released on drop.
#[derive(Debug)]
pub struct WorkspaceLock {
    file: File,
    /// A holder that had died without releasing the file, if we found one.
    pub recovered: Option<Holder>,
}

/// The current holder, if any process holds the lock now.
pub fn current_holder(layout: &Layout) -> Option<Holder> {
    let mut file = File::open(layout.lock_file()).ok()?;
    match file.try_lock_shared() {
        Ok(()) => {
            let _ = file.unlock();
            None
        }
        Err(_) => {
            let mut text = String::new();
            file.read_to_string(&mut text).ok()?;
            Holder::parse(&text)
        }
    }
}

impl WorkspaceLock {
    /// Takes the lock for `run_id`, or says who has it.
    pub fn acquire(layout: &Layout, run_id: &str) -> Result<WorkspaceLock, LockError> {
        let path = layout.lock_file();
        let io = |source| LockError::Io {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(layout.state_dir()).map_err(io)?;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(Holder::parse(&text)
                    .map(LockError::Held)
                    .unwrap_or(LockError::HeldUnknown));
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        let recovered = Holder::parse(&previous);
        let me = serde_json::json!({
            "pid": std::process::id(),
            "host": hostname(),
            "started": crate::state::time::now_rfc3339(),
            "run_id": run_id,
        });
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        file.write_all(me.to_string().as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(WorkspaceLock { file, recovered })
    }
}

impl Drop for WorkspaceLock {
    fn drop(&mut self) {
        let _ = self.file.set_len(0);
        let _ = self.file.sync_all();
        let _ = self.file.unlock();
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return "unknown".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let first = WorkspaceLock::acquire(&layout, "run-a").unwrap();
        assert!(first.recovered.is_none());
        match WorkspaceLock::acquire(&layout, "run-b") {
            Err(LockError::Held(h)) => {
                assert_eq!(h.run_id, "run-a");
                assert_eq!(h.pid, std::process::id());
            }
            other => panic!("expected Held, got {other:?}"),
        }
        assert_eq!(
            current_holder(&layout).map(|h| h.run_id),
            Some("run-a".to_string())
        );
        drop(first);
        assert!(current_holder(&layout).is_none());
        let again = WorkspaceLock::acquire(&layout, "run-c").unwrap();
        assert!(
            again.recovered.is_none(),
            "a clean release leaves no holder behind"
        );
    }

    #[test]
    fn a_dead_holders_file_is_recovered() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        std::fs::create_dir_all(layout.state_dir()).unwrap();
        let stale = r#"{"pid":999999,"host":"h","started":"2026-01-01T00:00:00Z","run_id":"old"}"#;
        std::fs::write(layout.lock_file(), stale).unwrap();
        let lock = WorkspaceLock::acquire(&layout, "new").unwrap();
        assert_eq!(
            lock.recovered.as_ref().map(|h| h.run_id.clone()),
            Some("old".to_string())
        );
    }
}
