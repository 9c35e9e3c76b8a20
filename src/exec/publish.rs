//! Staging folders and publishing: a stage's outputs become visible in the workspace only
//! by rename, after the stage succeeded.

use crate::state::{layout::sync_dir, Layout};
use std::fs;
use std::io;
use std::path::Path;

const MARKER: &str = ".taper-fingerprint";

/// Makes the stage's staging folder ready. A resumable kind keeps what an earlier,
/// unfinished attempt with the same fingerprint left there (checkpoints); anything else
/// starts from an empty folder.
pub fn prepare_staging(staging: &Path, fingerprint: &str, resumable: bool) -> io::Result<()> {
    let marker = staging.join(MARKER);
    let keep = resumable
        && fs::read_to_string(&marker)
            .map(|m| m == fingerprint)
            .unwrap_or(false);
    if !keep {
        match fs::remove_dir_all(staging) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        fs::create_dir_all(staging)?;
        fs::write(&marker, fingerprint)?;
    }
    Ok(())
}

/// Clears the outputs an earlier attempt left in staging, keeping everything else
/// (checkpoints of resumable kinds).
pub fn clear_staged_outputs(staging: &Path, outputs: &[String]) -> io::Result<()> {
    for o in outputs {
        let p = staging.join(o);
        match p.symlink_metadata() {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&p)?,
            Ok(_) => fs::remove_file(&p)?,
            Err(_) => {}
        }
    }
    Ok(())
}

/// Moves each declared output from staging into the workspace by rename. An output
/// already in the workspace is first renamed into `.taper/trash` and deleted after.
pub fn publish(
    layout: &Layout,
    staging: &Path,
    outputs: &[String],
    run_id: &str,
) -> Result<(), String> {
    for o in outputs {
        let src = staging.join(o);
        if src.symlink_metadata().is_err() {
            return Err(format!(
                "the stage did not write its declared output \"{o}\""
            ));
        }
    }
    let trash = layout.trash();
    for (n, o) in outputs.iter().enumerate() {
        let src = staging.join(o);
        let dst = layout.path(o);
        let io = |what: &str, e: io::Error| format!("cannot publish output \"{o}\" ({what}): {e}");
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(|e| io("create its folder", e))?;
        }
        let old = trash.join(format!("{run_id}-{n}"));
        let had_old = dst.symlink_metadata().is_ok();
        if had_old {
            fs::create_dir_all(&trash).map_err(|e| io("create .taper/trash", e))?;
            fs::rename(&dst, &old).map_err(|e| io("move the old version aside", e))?;
        }
        fs::rename(&src, &dst).map_err(|e| io("rename into the workspace", e))?;
        if let Some(parent) = dst.parent() {
            sync_dir(parent);
        }
        if had_old {
            let _ = if old.is_dir() {
                fs::remove_dir_all(&old)
            } else {
                fs::remove_file(&old)
            };
        }
    }
    Ok(())
}

/// Removes a staging folder after its outputs were published.
pub fn remove_staging(staging: &Path) {
    let _ = fs::remove_dir_all(staging);
}
