//! Per-run folders: `${run.folder}` = `<folder>/<stamp>`, the `<folder>/latest` symlink,
//! and `keep_runs` retention.
//!
//! The stamp of a run is its fire time in the schedule's time zone (`2026-11-27T02:00`),
//! taken from `TAPER_SCHEDULED_FOR` (set by `taper schedule` and exported CronWorkflows),
//! else from `TAPER_RUN_TIME` (set by exported Workflows, so that every task of one
//! workflow shares a folder), else `manual`. The caller reads the environment; this file
//! only computes.

use super::config::ScheduleConfig;
use super::fire::{is_stamp, stamp};
use crate::spec::node::{Key, Node, Pos, Value};
use jiff::Timestamp;
use std::io;
use std::path::Path;

/// The folder name of a run that no schedule started.
pub const MANUAL: &str = "manual";
/// The name of the symlink to the latest successful run's folder.
pub const LATEST: &str = "latest";

/// The run folder (workspace-relative) for a run at `time` (`None`: a manual run).
pub fn run_folder(cfg: &ScheduleConfig, time: Option<Timestamp>) -> Option<(String, String)> {
    let folder = cfg.folder.as_ref()?;
    let name = match time {
        Some(t) => stamp(&t.to_zoned(cfg.timezone.clone())),
        None => MANUAL.to_string(),
    };
    Some((format!("{folder}/{name}"), name))
}

/// The `run` root of `${...}` references: `${run.folder}` and `${run.stamp}`.
pub fn run_root(folder: &str, name: &str) -> Node {
    let entry = |k: &str, v: &str| {
        (
            Key {
                name: k.to_string(),
                pos: Pos::default(),
            },
            Node::synthetic(Value::Str(v.to_string()), Pos::default()),
        )
    };
    Node::synthetic(
        Value::Map(vec![entry("folder", folder), entry("stamp", name)]),
        Pos::default(),
    )
}

/// Points `<root>/<folder>/latest` at `<name>` atomically: a relative symlink made under
/// a temporary name, then renamed over the old one.
pub fn point_latest(root: &Path, folder: &str, name: &str) -> io::Result<()> {
    let dir = root.join(folder);
    let tmp = dir.join(format!(".latest-tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(name, &tmp)?;
    std::fs::rename(&tmp, dir.join(LATEST))?;
    crate::state::layout::sync_dir(&dir);
    Ok(())
}

/// Removes run folders under `<root>/<folder>` beyond the newest `keep`, never the one
/// `latest` points at and never a folder whose name is not a stamp. Returns the names
/// removed.
pub fn prune(root: &Path, folder: &str, keep: usize) -> io::Result<Vec<String>> {
    let dir = root.join(folder);
    let latest = std::fs::read_link(dir.join(LATEST))
        .ok()
        .and_then(|p| p.to_str().map(str::to_string));
    let mut names: Vec<String> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| is_stamp(n))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for n in names.into_iter().take(excess) {
        if latest.as_deref() == Some(n.as_str()) {
            continue;
        }
        std::fs::remove_dir_all(dir.join(&n))?;
        removed.push(n);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latest_is_replaced_and_old_runs_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for n in [
            "2026-11-25T02:00",
            "2026-11-26T02:00",
            "2026-11-27T02:00",
            "manual",
            "notes",
        ] {
            std::fs::create_dir_all(root.join("nightly").join(n)).unwrap();
        }
        point_latest(root, "nightly", "2026-11-26T02:00").unwrap();
        point_latest(root, "nightly", "2026-11-25T02:00").unwrap();
        assert_eq!(
            std::fs::read_link(root.join("nightly/latest")).unwrap(),
            Path::new("2026-11-25T02:00")
        );
        // Keep one: the newest stays, and so does the one `latest` points at.
        let removed = prune(root, "nightly", 1).unwrap();
        assert_eq!(removed, ["2026-11-26T02:00"]);
        for n in ["2026-11-25T02:00", "2026-11-27T02:00", "manual", "notes"] {
            assert!(root.join("nightly").join(n).is_dir(), "{n}");
        }
    }
}
