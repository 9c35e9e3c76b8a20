//! Is one stage up to date? Compares its fingerprint and outputs with the ledger.

use super::fingerprint::{config_hash, fingerprint};
use super::history::History;
use crate::spec::Stage;
use crate::state::{FileHash, HashCache};
use std::path::Path;

/// The result of checking one stage against its history.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    /// Hash of kind, version and configuration.
    pub config_hash: String,
    /// The inputs with their current content hashes.
    pub inputs: Vec<FileHash>,
    /// The current fingerprint.
    pub fingerprint: String,
    /// `None` when up to date; else why the stage must run.
    pub stale: Option<String>,
}

/// Hashes the stage's inputs and compares with the last success. An input that does not
/// exist makes the stage stale (and fails it when it runs).
pub fn check_stage(
    stage: &Stage,
    kind_version: u32,
    history: &History,
    cache: &mut HashCache,
    root: &Path,
) -> Check {
    let config = config_hash(stage, kind_version);
    let mut inputs = Vec::with_capacity(stage.inputs.len());
    let mut missing = None;
    for i in &stage.inputs {
        match cache.hash_path(&root.join(&i.path)) {
            Ok(h) => inputs.push(FileHash {
                path: i.path.clone(),
                hash: h.hash,
                bytes: h.bytes,
            }),
            Err(_) => {
                missing.get_or_insert_with(|| format!("input \"{}\" is missing", i.path));
                inputs.push(FileHash {
                    path: i.path.clone(),
                    hash: String::new(),
                    bytes: 0,
                });
            }
        }
    }
    let fp = fingerprint(&config, &inputs);
    let stale =
        missing.or_else(|| stale_reason(stage, &config, &inputs, &fp, history, cache, root));
    Check {
        config_hash: config,
        inputs,
        fingerprint: fp,
        stale,
    }
}

fn stale_reason(
    stage: &Stage,
    config: &str,
    inputs: &[FileHash],
    fp: &str,
    history: &History,
    cache: &mut HashCache,
    root: &Path,
) -> Option<String> {
    let Some(last) = history.last_success.get(&stage.name) else {
        return Some(
            match history.last.get(&stage.name).map(|r| r.status.as_str()) {
                Some("failed") | Some("timed_out") => "last attempt failed".to_string(),
                Some("interrupted") => "last attempt was interrupted".to_string(),
                _ => "never run".to_string(),
            },
        );
    };
    if last.config_hash != config {
        return Some("configuration changed".to_string());
    }
    if last.fingerprint != fp {
        for i in inputs {
            match last.inputs.iter().find(|r| r.path == i.path) {
                Some(r) if r.hash == i.hash => {}
                Some(_) => return Some(format!("input \"{}\" changed", i.path)),
                None => return Some(format!("input \"{}\" is new", i.path)),
            }
        }
        return Some("inputs changed".to_string());
    }
    for o in &last.outputs {
        match cache.hash_path(&root.join(&o.path)) {
            Err(_) => return Some(format!("output \"{}\" is missing", o.path)),
            Ok(h) if h.hash != o.hash => {
                return Some(format!("output \"{}\" was modified", o.path))
            }
            Ok(_) => {}
        }
    }
    None
}
