//! One writer per workspace: `.taper/lock`, held with an OS file lock.
//!
//! The lock file also names its holder (pid, host, start time, run). The OS releases the
//! lock when the holder dies, however it dies; a file that still names a holder when we
//! take the lock therefore tells of a run that did not exit cleanly, and we say so.
//!
//! Two modes. A full `taper run` and `taper gc` take `.taper/lock` exclusive. `taper run
//! --only STAGE` (what each task of an exported Argo workflow runs, in parallel on one
//! shared volume) takes `.taper/lock` shared plus `.taper/locks/<stage>` exclusive, which
//! names it: `--only` runs of different stages go together, two of one stage do not, and
//! none goes with a full run.

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
    /// `taper run --only` processes hold it shared.
    #[error("the workspace is used by {}; wait for them to finish or stop them", list(.0))]
    HeldShared(Vec<Holder>),
    /// Another `--only` run of the same stage holds the stage's lock.
    #[error("stage \"{stage}\" is already being run by {holder}")]
    StageHeld {
        /// The stage.
        stage: String,
        /// Who runs it.
        holder: Holder,
    },
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

fn list(holders: &[Holder]) -> String {
    let names: Vec<String> = holders.iter().map(|h| h.to_string()).collect();
    names.join(", ")
}

/// The held lock; released on drop.
#[derive(Debug)]
pub struct WorkspaceLock {
    file: File,
    /// The stage lock of a shared (`--only`) holder.
    stage: Option<File>,
    /// A holder that had died without releasing the file, if we found one.
    pub recovered: Option<Holder>,
}

/// The exclusive holder, if a process holds the lock exclusively now.
fn exclusive_holder(layout: &Layout) -> Option<Holder> {
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

/// The `--only` runs holding stage locks now.
fn stage_holders(layout: &Layout) -> Vec<Holder> {
    let Ok(entries) = std::fs::read_dir(layout.locks_dir()) else {
        return Vec::new();
    };
    let mut paths: Vec<_> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    let mut holders = Vec::new();
    for p in paths {
        let Ok(mut file) = File::open(&p) else {
            continue;
        };
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
            }
            Err(_) => {
                let mut text = String::new();
                if file.read_to_string(&mut text).is_ok() {
                    holders.extend(Holder::parse(&text));
                }
            }
        }
    }
    holders
}

/// The current holder, if any process holds the lock now (the first `--only` run when
/// several share it).
pub fn current_holder(layout: &Layout) -> Option<Holder> {
    current_holders(layout).into_iter().next()
}

/// Every current holder: the exclusive one, or the `--only` runs sharing the lock.
pub fn current_holders(layout: &Layout) -> Vec<Holder> {
    match exclusive_holder(layout) {
        Some(h) => vec![h],
        None => stage_holders(layout),
    }
}

fn holder_json(run_id: &str) -> String {
    serde_json::json!({
        "pid": std::process::id(),
        "host": hostname(),
        "started": crate::state::time::now_rfc3339(),
        "run_id": run_id,
    })
    .to_string()
}

fn open_rw(path: &std::path::Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

fn write_holder(file: &mut File, run_id: &str) -> std::io::Result<()> {
    file.set_len(0)?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(holder_json(run_id).as_bytes())?;
    file.sync_all()
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
        let mut file = open_rw(&path).map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                if let Some(h) = Holder::parse(&text) {
                    return Err(LockError::Held(h));
                }
                let shared = stage_holders(layout);
                return Err(if shared.is_empty() {
                    LockError::HeldUnknown
                } else {
                    LockError::HeldShared(shared)
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        let recovered = Holder::parse(&previous);
        write_holder(&mut file, run_id).map_err(io)?;
        Ok(WorkspaceLock {
            file,
            stage: None,
            recovered,
        })
    }

    /// Takes the lock shared for a `taper run --only stage`, plus the stage's own lock
    /// exclusive. Refused while a full run holds the workspace or another process runs
    /// the same stage.
    pub fn acquire_shared(
        layout: &Layout,
        run_id: &str,
        stage: &str,
    ) -> Result<WorkspaceLock, LockError> {
        let path = layout.lock_file();
        let io = |path: &std::path::Path| {
            let path = path.display().to_string();
            move |source| LockError::Io { path, source }
        };
        std::fs::create_dir_all(layout.locks_dir()).map_err(io(&layout.locks_dir()))?;
        let mut file = open_rw(&path).map_err(io(&path))?;
        match file.try_lock_shared() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(Holder::parse(&text)
                    .map(LockError::Held)
                    .unwrap_or(LockError::HeldUnknown));
            }
            Err(TryLockError::Error(e)) => return Err(io(&path)(e)),
        }
        // While we hold it shared nobody holds it exclusive: a holder named in the file
        // died without releasing it. Clearing it is safe, whoever else shares the lock.
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        let recovered = Holder::parse(&previous);
        if recovered.is_some() {
            let _ = file.set_len(0);
        }
        let stage_path = layout.stage_lock(stage);
        let mut stage_file = open_rw(&stage_path).map_err(io(&stage_path))?;
        match stage_file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = stage_file.read_to_string(&mut text);
                return Err(match Holder::parse(&text) {
                    Some(holder) => LockError::StageHeld {
                        stage: stage.to_string(),
                        holder,
                    },
                    None => LockError::HeldUnknown,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(&stage_path)(e)),
        }
        write_holder(&mut stage_file, run_id).map_err(io(&stage_path))?;
        Ok(WorkspaceLock {
            file,
            stage: Some(stage_file),
            recovered,
        })
    }

    /// Whether this is a shared (`--only`) hold.
    pub fn is_shared(&self) -> bool {
        self.stage.is_some()
    }
}

impl Drop for WorkspaceLock {
    fn drop(&mut self) {
        match &mut self.stage {
            Some(stage) => {
                let _ = stage.set_len(0);
                let _ = stage.unlock();
            }
            None => {
                let _ = self.file.set_len(0);
                let _ = self.file.sync_all();
            }
        }
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
    fn only_runs_share_the_workspace_but_not_a_stage() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(dir.path());
        let a = WorkspaceLock::acquire_shared(&layout, "run-a", "sweep@lr=3e-4,r=8").unwrap();
        let b = WorkspaceLock::acquire_shared(&layout, "run-b", "other").unwrap();
        assert!(a.is_shared() && b.is_shared());
        match WorkspaceLock::acquire_shared(&layout, "run-c", "other") {
            Err(LockError::StageHeld { stage, holder }) => {
                assert_eq!(stage, "other");
                assert_eq!(holder.run_id, "run-b");
            }
            other => panic!("expected StageHeld, got {other:?}"),
        }
        match WorkspaceLock::acquire(&layout, "full") {
            Err(e @ LockError::HeldShared(_)) => {
                let text = e.to_string();
                assert!(
                    text.contains("run run-a") && text.contains("run run-b"),
                    "{text}"
                );
            }
            other => panic!("expected HeldShared, got {other:?}"),
        }
        let ids: Vec<String> = current_holders(&layout)
            .into_iter()
            .map(|h| h.run_id)
            .collect();
        assert_eq!(ids, ["run-b", "run-a"], "sorted by stage lock file name");
        drop(a);
        drop(b);
        assert!(current_holder(&layout).is_none());
        let full = WorkspaceLock::acquire(&layout, "full").unwrap();
        match WorkspaceLock::acquire_shared(&layout, "run-d", "other") {
            Err(LockError::Held(h)) => assert_eq!(h.run_id, "full"),
            other => panic!("expected Held, got {other:?}"),
        }
        drop(full);
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
