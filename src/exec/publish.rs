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
    for o in outputs {
        let src = staging.join(o);
        let dst = layout.path(o);
        let io = |what: &str, e: io::Error| format!("cannot publish output \"{o}\" ({what}): {e}");
        if let Some(parent) = dst.parent() {
            fs::create_dir_all(parent).map_err(|e| io("create its folder", e))?;
        }
        // A private slot per replaced output: stages publishing at the same time never
        // share a name in the trash.
        let slot = if dst.symlink_metadata().is_ok() {
            fs::create_dir_all(&trash).map_err(|e| io("create .taper/trash", e))?;
            let slot = tempfile::Builder::new()
                .prefix(&format!(".{run_id}-"))
                .tempdir_in(&trash)
                .map_err(|e| io("create a slot in .taper/trash", e))?
                .keep();
            fs::rename(&dst, slot.join("old")).map_err(|e| io("move the old version aside", e))?;
            Some(slot)
        } else {
            None
        };
        fs::rename(&src, &dst).map_err(|e| io("rename into the workspace", e))?;
        if let Some(parent) = dst.parent() {
            sync_dir(parent);
        }
        if let Some(slot) = slot {
            let _ = fs::remove_dir_all(&slot);
        }
    }
    Ok(())
}

/// Removes a staging folder after its outputs were published.
pub fn remove_staging(staging: &Path) {
    let _ = fs::remove_dir_all(staging);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two stages of one run publishing at the same time each move an old output into the
    /// trash; neither may collide with what the other put there.
    #[test]
    fn replacing_outputs_never_collides_in_the_trash() {
        let ws = tempfile::tempdir().unwrap();
        let layout = Layout::new(ws.path());
        fs::create_dir_all(ws.path().join("b")).unwrap();
        fs::write(ws.path().join("b/old"), "old").unwrap();
        // What another stage of the same run is moving aside right now.
        fs::create_dir_all(layout.trash()).unwrap();
        fs::write(layout.trash().join("run-0"), "another stage's old a.txt").unwrap();
        fs::write(layout.trash().join(".run-0"), "and under a dotted name").unwrap();
        let staging = ws.path().join(".taper/staging/b");
        fs::create_dir_all(staging.join("b")).unwrap();
        fs::write(staging.join("b/new"), "new").unwrap();
        publish(&layout, &staging, &["b".to_string()], "run").unwrap();
        assert_eq!(fs::read_to_string(ws.path().join("b/new")).unwrap(), "new");
        assert!(!ws.path().join("b/old").exists());
        assert!(
            layout.trash().join("run-0").exists(),
            "the other stage's file is left alone"
        );
    }
}
