//! The real thing: `taper run` killed with SIGKILL at a random point of a train stage,
//! then run again, ends with an adapter byte-identical to an uninterrupted run's, and the
//! second run resumed from a checkpoint instead of starting over.
//!
//! The kill point is chosen by progress, not by wall time, so the test holds on a fast
//! or a loaded machine: wait until a random checkpoint (step 10 to 100 of 300) has been
//! published, then wait a random fraction of a few steps' time, then SIGKILL.

mod train_util;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use train_util::{pipeline_yaml, Row, Workspace};

const WITH: &str = "base_model: models/base\n\
                    data: {train: tokens/train, valid: tokens/valid}\n\
                    lora: {r: 4, alpha: 8, dropout: 0.1, targets: [q_proj, v_proj]}\n\
                    optimizer: {lr: 5e-3}\n\
                    schedule: {warmup_steps: 5}\n\
                    batch_size: 2\ngrad_accum: 2\nmax_steps: 300\neval_every: 50\n\
                    checkpoint_every: 10\nkeep_checkpoints: 2\ndevice: cpu\n";

fn rows(n: usize, seed: u64) -> Vec<Row> {
    (0..n as u64)
        .map(|i| {
            let ids: Vec<u32> = (0..24)
                .map(|j| (10 + (i * 7 + seed + j) % 90) as u32)
                .collect();
            (ids, vec![true; 24])
        })
        .collect()
}

fn workspace() -> Workspace {
    let ws = Workspace::new(&rows(12, 1), &rows(4, 2));
    std::fs::write(ws.path().join("pipeline.yaml"), pipeline_yaml(WITH)).unwrap();
    ws
}

fn taper_run(ws: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_taper"));
    c.args(["run", "pipeline.yaml"])
        .current_dir(ws)
        .env("RAYON_NUM_THREADS", "2");
    c
}

/// Files under `dir` whose name or text contains `needle`.
fn find(dir: &Path, needle: &str, in_text: bool) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    entries.filter_map(|e| e.ok()).any(|e| {
        let p = e.path();
        let name_hit = e.file_name().to_string_lossy().contains(needle);
        if p.is_dir() {
            name_hit || find(&p, needle, in_text)
        } else {
            name_hit
                || (in_text
                    && std::fs::read(&p)
                        .map(|b| String::from_utf8_lossy(&b).contains(needle))
                        .unwrap_or(false))
        }
    })
}

/// The newest published checkpoint of the train stage (`step-NNNNNNNN`, renamed into
/// place only when complete; `.tmp-step-*` folders are still being written).
fn newest_checkpoint(ws: &Path) -> Option<u64> {
    std::fs::read_dir(ws.join(".taper/staging/train/checkpoints"))
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("step-")?
                .parse::<u64>()
                .ok()
        })
        .max()
}

/// A number from the clock's nanoseconds: the test need not be replayable, only vary.
fn random_below(n: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64;
    nanos.wrapping_mul(6364136223846793005) % n.max(1)
}

#[test]
fn sigkill_at_a_random_step_then_rerun_gives_the_same_adapter() {
    let straight = workspace();
    let started = Instant::now();
    let status = taper_run(straight.path()).status().unwrap();
    assert!(status.success(), "uninterrupted run failed: {status}");
    // An upper bound of one step's time (startup and evals included).
    let step_time = started.elapsed() / 300;

    let killed = workspace();
    let mut child = taper_run(killed.path()).spawn().unwrap();
    let kill_after = 10 * (1 + random_below(10));
    let started = Instant::now();
    while newest_checkpoint(killed.path()).is_none_or(|s| s < kill_after) {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no checkpoint of step {kill_after} appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "taper run ended before step {kill_after}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // Somewhere in the next few steps: before, during or after a step, an eval or a
    // checkpoint write.
    std::thread::sleep(step_time * random_below(500) as u32 / 100);
    let finished_anyway = child.try_wait().unwrap().is_some();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !finished_anyway,
        "the run finished before the kill; raise max_steps"
    );
    assert!(
        !killed.path().join("adapters/run").exists(),
        "nothing is published by a killed run"
    );

    let status = taper_run(killed.path()).status().unwrap();
    assert!(status.success(), "rerun after SIGKILL failed: {status}");
    assert!(
        find(&killed.path().join(".taper"), "resuming from step-", true),
        "the rerun did not resume from a checkpoint (killed after step {kill_after})"
    );
    for f in ["adapter.safetensors", "adapter_config.json"] {
        assert!(
            std::fs::read(killed.path().join("adapters/run").join(f)).unwrap()
                == std::fs::read(straight.path().join("adapters/run").join(f)).unwrap(),
            "{f} differs after SIGKILL after step {kill_after} + rerun"
        );
    }

    // The ledger knows the first run was killed and the second succeeded.
    let runs = Command::new(env!("CARGO_BIN_EXE_taper"))
        .args(["runs", "--json"])
        .current_dir(killed.path())
        .output()
        .unwrap();
    let runs: serde_json::Value = serde_json::from_slice(&runs.stdout).unwrap();
    let statuses: Vec<&str> = runs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["success", "killed"], "{runs}");
}

#[test]
fn metrics_can_be_read_from_the_ledger_while_training_runs() {
    let ws = workspace();
    let mut child = taper_run(ws.path()).spawn().unwrap();
    let ledger = taper::state::Ledger::new(&taper::state::Layout::new(ws.path()));
    let started = Instant::now();
    let steps = loop {
        let rows: Vec<taper::state::MetricRow> =
            ledger.read().expect("the ledger reads while a run writes");
        let steps: Vec<i64> = rows
            .iter()
            .filter(|m| m.stage == "train" && m.name == "train/loss")
            .map(|m| m.step)
            .collect();
        if !steps.is_empty() {
            break steps;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "no train/loss row reached the ledger"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // Read while the stage was still training: the run has not ended, and the loss of
    // its last step (300) is not among the rows yet.
    let still_running = child.try_wait().unwrap().is_none();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(still_running, "the run ended before its metrics were read");
    assert!(!steps.contains(&300), "{steps:?}");
}
