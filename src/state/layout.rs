//! Where taper keeps its state inside a workspace (`.taper/`).

use std::path::{Path, PathBuf};

/// The workspace root and the paths of its `.taper/` state folder.
#[derive(Clone, Debug)]
pub struct Layout {
    /// The workspace root: inputs and outputs are relative to it.
    pub root: PathBuf,
}

impl Layout {
    /// The layout of the workspace at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }
    /// `.taper/`
    pub fn state_dir(&self) -> PathBuf {
        self.root.join(".taper")
    }
    /// `.taper/ledger/<table>/`
    pub fn table_dir(&self, table: &str) -> PathBuf {
        self.state_dir().join("ledger").join(table)
    }
    /// `.taper/lock`
    pub fn lock_file(&self) -> PathBuf {
        self.state_dir().join("lock")
    }
    /// `.taper/locks/` — per-stage locks of `taper run --only` runs.
    pub fn locks_dir(&self) -> PathBuf {
        self.state_dir().join("locks")
    }
    /// `.taper/locks/<stage>`
    pub fn stage_lock(&self, stage: &str) -> PathBuf {
        self.locks_dir().join(stage.replace('/', "_"))
    }
    /// `.taper/cache/hashes.json`
    pub fn hash_cache(&self) -> PathBuf {
        self.state_dir().join("cache").join("hashes.json")
    }
    /// `.taper/staging/<stage>/` — a stage's private output folder.
    pub fn staging(&self, stage: &str) -> PathBuf {
        self.state_dir().join("staging").join(stage)
    }
    /// `.taper/trash/` — where replaced outputs go before they are deleted.
    pub fn trash(&self) -> PathBuf {
        self.state_dir().join("trash")
    }
    /// `.taper/runs/<run_id>/` — logs of one run.
    pub fn run_dir(&self, run_id: &str) -> PathBuf {
        self.state_dir().join("runs").join(run_id)
    }
    /// A workspace-relative path made absolute.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }
    /// Whether `.taper/` exists.
    pub fn exists(&self) -> bool {
        self.state_dir().is_dir()
    }
}

/// Writes `bytes` to `path` atomically: temp file in the same folder, fsync, rename,
/// fsync of the folder.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    sync_dir(dir);
    Ok(())
}

/// fsyncs a folder so that a rename inside it is durable. Best effort.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}
