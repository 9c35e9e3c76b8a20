//! The real thing: `taper run` killed with SIGKILL at a random point of a train stage,
//! then run again, ends with an adapter byte-identical to an uninterrupted run's, and the
//! second run resumed from a checkpoint instead of starting over.

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
                    batch_size: 2\ngrad_accum: 2\nmax_steps: 150\neval_every: 50\n\
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

#[test]
#[ignore = "needs taper run"]
fn sigkill_at_a_random_step_then_rerun_gives_the_same_adapter() {
    let straight = workspace();
    let status = taper_run(straight.path()).status().unwrap();
    assert!(status.success(), "uninterrupted run failed: {status}");

    let killed = workspace();
    let mut child = taper_run(killed.path()).spawn().unwrap();
    // Wait for a first checkpoint, then a random extra 0..1.5 s, then SIGKILL.
    let started = Instant::now();
    while !find(&killed.path().join(".taper"), "step-000000", false) {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "taper run ended before a checkpoint"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    std::thread::sleep(Duration::from_millis(nanos as u64 % 1500));
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
        "the rerun did not resume from a checkpoint"
    );
    for f in ["adapter.safetensors", "adapter_config.json"] {
        assert_eq!(
            std::fs::read(killed.path().join("adapters/run").join(f)).unwrap(),
            std::fs::read(straight.path().join("adapters/run").join(f)).unwrap(),
            "{f} differs after SIGKILL + rerun"
        );
    }
}
