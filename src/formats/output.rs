//! Where conversions and merges write: a temporary folder beside the requested output,
//! renamed into place only when everything is written, so a failure leaves no output.
//! Also the base-identity check shared by both.

use std::path::{Path, PathBuf};

use super::checkpoint::Checkpoint;
use super::error::FormatError;
use super::raw_adapter::RawAdapter;

/// An output directory being written.
pub struct OutputDir {
    target: PathBuf,
    tmp: tempfile::TempDir,
}

impl OutputDir {
    /// Prepares to write `target`, which must not exist or be an empty directory.
    pub fn create(target: &Path) -> Result<Self, FormatError> {
        let fail = |message: String| FormatError::Output {
            path: target.to_path_buf(),
            message,
        };
        if target.exists() {
            let empty = std::fs::read_dir(target)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(fail("already exists and is not an empty directory".into()));
            }
        }
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| fail(format!("cannot create parent: {e}")))?;
        let tmp = tempfile::Builder::new()
            .prefix(".taper-partial-")
            .tempdir_in(&parent)
            .map_err(|e| fail(format!("cannot create a temporary directory: {e}")))?;
        Ok(Self {
            target: target.to_path_buf(),
            tmp,
        })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        self.tmp.path()
    }

    /// Moves the finished directory into place.
    pub fn publish(self) -> Result<(), FormatError> {
        let fail = |e: std::io::Error| FormatError::Output {
            path: self.target.clone(),
            message: format!("cannot move the finished output into place: {e}"),
        };
        if self.target.exists() {
            std::fs::remove_dir(&self.target).map_err(fail)?;
        }
        let tmp = self.tmp.keep();
        std::fs::rename(&tmp, &self.target).map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            fail(e)
        })
    }
}

/// Checks the base identity an adapter records (taper's format) against `base`.
pub fn check_identity(adapter: &RawAdapter, base: &Checkpoint) -> Result<(), FormatError> {
    let Some(recorded) = &adapter.base else {
        return Ok(());
    };
    let actual = base.identity()?;
    let incompatible = |what: &str, want: &str, got: &str| FormatError::Incompatible {
        base: base.dir.clone(),
        module: "base_model".into(),
        message: format!(
            "the adapter was trained on a base whose {what} hash is {want}, this base's is {got}"
        ),
    };
    if recorded.config_hash != actual.config_hash {
        return Err(incompatible(
            "config.json",
            &recorded.config_hash,
            &actual.config_hash,
        ));
    }
    if recorded.weights_hash != actual.weights_hash {
        return Err(incompatible(
            "weights",
            &recorded.weights_hash,
            &actual.weights_hash,
        ));
    }
    Ok(())
}
