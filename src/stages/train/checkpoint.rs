//! Checkpoints inside the stage's staging folder, written atomically and pruned to the
//! newest K:
//!
//! ```text
//! checkpoints/step-00000050/
//!   state.json          step, optimizer step, rng state, data cursor (epoch, position),
//!                       tokens seen, last loss, config fingerprint
//!   tensors.safetensors lora.<var name> (A/B), adamw.m.<var name>, adamw.v.<var name>,
//!                       data.order (u32, the epoch's shuffle order)
//! ```
//!
//! A checkpoint is written into `checkpoints/.tmp-step-NNNNNNNN`, every file and the
//! folder fsynced, then renamed into place; a folder named `step-*` is therefore complete.
//! A checkpoint made under another configuration (fingerprint) is never resumed from.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// The folder inside the staging area.
pub const DIR: &str = "checkpoints";
const STATE: &str = "state.json";
const TENSORS: &str = "tensors.safetensors";
const ORDER_KEY: &str = "data.order";

/// The scalar part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps done.
    pub step: u64,
    /// AdamW's update count.
    pub adam_step: u64,
    /// The dropout RNG's state.
    pub rng_state: u64,
    pub epoch: u64,
    pub position: u64,
    /// Real tokens trained on so far.
    pub tokens_seen: u64,
    /// The loss of the last step.
    pub loss: f64,
    /// [`super::config::TrainConfig::fingerprint`] of the run that wrote it.
    pub config: String,
}

/// A loaded checkpoint.
pub struct Loaded {
    pub state: TrainState,
    /// `lora.*` and `adamw.*` tensors, on the CPU.
    pub tensors: HashMap<String, Tensor>,
    pub order: Vec<u32>,
    pub dir: PathBuf,
}

/// `step-NNNNNNNN`.
pub fn name(step: u64) -> String {
    format!("step-{step:08}")
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

fn fsync(path: &Path) -> Result<(), String> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io(path))
}

/// Writes a checkpoint into `root` (the `checkpoints` folder) and keeps the newest `keep`.
pub fn save(
    root: &Path,
    state: &TrainState,
    tensors: Vec<(String, Tensor)>,
    order: &[u32],
    keep: usize,
) -> Result<PathBuf, String> {
    fs::create_dir_all(root).map_err(io(root))?;
    let final_dir = root.join(name(state.step));
    let tmp = root.join(format!(".tmp-{}", name(state.step)));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io(&tmp))?;

    let mut map: HashMap<String, Tensor> = HashMap::new();
    for (k, t) in tensors {
        let t = t.to_device(&Device::Cpu).map_err(|e| format!("{k}: {e}"))?;
        map.insert(k, t);
    }
    let order =
        Tensor::from_vec(order.to_vec(), order.len(), &Device::Cpu).map_err(|e| e.to_string())?;
    map.insert(ORDER_KEY.into(), order);
    let tensors_path = tmp.join(TENSORS);
    candle_core::safetensors::save(&map, &tensors_path)
        .map_err(|e| format!("{}: {e}", tensors_path.display()))?;
    fsync(&tensors_path)?;
    let state_path = tmp.join(STATE);
    let json = serde_json::to_vec_pretty(state).map_err(|e| e.to_string())?;
    fs::write(&state_path, json).map_err(io(&state_path))?;
    fsync(&state_path)?;
    fsync(&tmp)?;
    if final_dir.exists() {
        fs::remove_dir_all(&final_dir).map_err(io(&final_dir))?;
    }
    fs::rename(&tmp, &final_dir).map_err(io(&final_dir))?;
    fsync(root)?;
    prune(root, keep)?;
    Ok(final_dir)
}

/// The complete checkpoints in `root`, oldest first.
pub fn list(root: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = fs::read_dir(root) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn prune(root: &Path, keep: usize) -> Result<(), String> {
    let all = list(root);
    for (_, dir) in all.iter().take(all.len().saturating_sub(keep)) {
        fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    Ok(())
}

/// Reads one checkpoint folder.
pub fn load(dir: &Path) -> Result<Loaded, String> {
    let state_path = dir.join(STATE);
    let text = fs::read(&state_path).map_err(io(&state_path))?;
    let state: TrainState =
        serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", state_path.display()))?;
    let tensors_path = dir.join(TENSORS);
    let mut tensors = candle_core::safetensors::load(&tensors_path, &Device::Cpu)
        .map_err(|e| format!("{}: {e}", tensors_path.display()))?;
    let order = tensors
        .remove(ORDER_KEY)
        .filter(|t| t.dtype() == DType::U32)
        .ok_or_else(|| format!("{}: no u32 tensor {ORDER_KEY}", tensors_path.display()))?
        .to_vec1::<u32>()
        .map_err(|e| e.to_string())?;
    Ok(Loaded {
        state,
        tensors,
        order,
        dir: dir.to_path_buf(),
    })
}

/// The newest checkpoint in `root` that loads and was written under `fingerprint`, with
/// a note for each one skipped.
pub fn latest(root: &Path, fingerprint: &str) -> (Option<Loaded>, Vec<String>) {
    let mut notes = Vec::new();
    for (_, dir) in list(root).into_iter().rev() {
        match load(&dir) {
            Ok(l) if l.state.config == fingerprint => return (Some(l), notes),
            Ok(_) => notes.push(format!(
                "{}: written under another configuration; not resumed from",
                dir.display()
            )),
            Err(e) => notes.push(format!("skipping unreadable checkpoint {e}")),
        }
    }
    (None, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> TrainState {
        TrainState {
            step,
            adam_step: step,
            rng_state: 99,
            epoch: 1,
            position: 3,
            tokens_seen: 10,
            loss: 1.5,
            config: "cfg".into(),
        }
    }

    #[test]
    fn saves_atomically_keeps_the_newest_and_loads_back() {
        let root = tempfile::tempdir().unwrap();
        let t = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        for step in [10, 20, 30] {
            save(
                root.path(),
                &state(step),
                vec![("lora.x".into(), t.clone())],
                &[2, 0, 1],
                2,
            )
            .unwrap();
        }
        let steps: Vec<u64> = list(root.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![20, 30]);
        // A half-written temp folder is not a checkpoint.
        fs::create_dir(root.path().join(".tmp-step-00000040")).unwrap();
        let (loaded, notes) = latest(root.path(), "cfg");
        let loaded = loaded.unwrap();
        assert!(notes.is_empty());
        assert_eq!(loaded.state, state(30));
        assert_eq!(loaded.order, vec![2, 0, 1]);
        assert_eq!(
            loaded.tensors["lora.x"].to_vec1::<f32>().unwrap(),
            vec![1.0, 2.0]
        );
        let (none, notes) = latest(root.path(), "other");
        assert!(none.is_none() && notes.len() == 2);
        // A damaged newest checkpoint falls back to the one before.
        fs::write(root.path().join("step-00000030").join(STATE), "{").unwrap();
        let (older, notes) = latest(root.path(), "cfg");
        assert_eq!(older.unwrap().state.step, 20);
        assert_eq!(notes.len(), 1);
    }
}
