//! Crash safety: `taper run` is SIGKILLed at many points (while stages write, right around
//! stage completion and the ledger appends that follow) and after each kill:
//!
//! - every ledger table still loads;
//! - a stage recorded `success` recorded the same output hashes as an uninterrupted run;
//! - every declared output present in the workspace is complete (byte-identical to an
//!   uninterrupted run's), never half written;
//! - the next `taper run` finishes and produces the same bytes as an uninterrupted run.

mod util;

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::time::Duration;
use taper::state::{EventRow, MetricRow, RunRow, StageRunRow};
use util::{command_stage, Dir};

/// Each command first notes its process group (its `sh` leads one), so that the test can
/// stop what a killed taper leaves running.
const NOTE_PGID: &str = "echo $$ >> \"$TAPER_WORKSPACE/pgids\"; ";

const OUTPUTS: &[&str] = &["data/gen.txt", "a.txt", "b", "final.txt", "d.txt"];

fn pipeline(dir: &Dir) {
    let mut p = String::from("version: 1\nname: crash\nstages:\n");
    let mut stage = |name: &str, inputs: &[&str], outputs: &[&str], run: &str| {
        p += &command_stage(name, inputs, outputs, &format!("{NOTE_PGID}{run}"));
    };
    stage(
        "gen",
        &[],
        &["data/gen.txt"],
        "for i in 1 2 3 4 5; do echo line $i >> data/gen.txt; sleep 0.04; done",
    );
    stage(
        "a",
        &["data/gen.txt"],
        &["a.txt"],
        "while read l; do echo \"a $l\" >> a.txt; sleep 0.03; done < data/gen.txt",
    );
    stage(
        "b",
        &["data/gen.txt"],
        &["b"],
        "mkdir -p b; for i in 1 2 3; do sed \"s/^/b$i /\" data/gen.txt > b/part$i; sleep 0.05; done",
    );
    stage(
        "final",
        &["a.txt", "b"],
        &["final.txt"],
        "cat a.txt > final.txt; sleep 0.05; cat b/part1 b/part2 b/part3 >> final.txt",
    );
    stage("d", &[], &["d.txt"], "sleep 0.1; echo d > d.txt");
    dir.create("p.yaml", p);
}

/// The bytes of a file output, or of every file of a folder output, by relative path.
type Snapshot = BTreeMap<String, Vec<u8>>;

fn snapshot(path: &Path) -> Option<Snapshot> {
    let meta = path.symlink_metadata().ok()?;
    let mut out = BTreeMap::new();
    if meta.is_dir() {
        fn walk(root: &Path, dir: &Path, out: &mut Snapshot) {
            for e in fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else {
                    let rel = p.strip_prefix(root).unwrap().display().to_string();
                    out.insert(rel, fs::read(&p).unwrap());
                }
            }
        }
        walk(path, path, &mut out);
    } else {
        out.insert(String::new(), fs::read(path).unwrap());
    }
    Some(out)
}

fn outputs(dir: &Dir) -> BTreeMap<&'static str, Option<Snapshot>> {
    OUTPUTS
        .iter()
        .map(|o| (*o, snapshot(&dir.path(o))))
        .collect()
}

/// Stops the process groups that the stages of a killed taper left running.
fn stop_leftovers(dir: &Dir) {
    std::thread::sleep(Duration::from_millis(100));
    let text = fs::read_to_string(dir.path("pgids")).unwrap_or_default();
    for pgid in text.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
        // SAFETY: kill(2) on process groups our own stages created.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    std::thread::sleep(Duration::from_millis(50));
}

struct Reference {
    outputs: BTreeMap<&'static str, Option<Snapshot>>,
    /// Output hashes recorded by the uninterrupted run, per (stage, path).
    hashes: BTreeMap<(String, String), String>,
    /// When each stage ended, in ms after the run started.
    ends_ms: Vec<u64>,
}

fn reference() -> Reference {
    let dir = Dir::new("crash-ref");
    pipeline(&dir);
    dir.taper().args(["run", "p.yaml", "--jobs", "2"]).ok();
    let outputs = outputs(&dir);
    assert!(outputs.values().all(Option::is_some));
    let run = &dir.runs()[0];
    let rows = dir.stage_runs();
    let hashes = rows
        .iter()
        .flat_map(|r| {
            r.outputs
                .iter()
                .map(|o| ((r.stage.clone(), o.path.clone()), o.hash.clone()))
        })
        .collect();
    let mut ends_ms: Vec<u64> = rows
        .iter()
        .map(|r| ((r.ended_at.unwrap() - run.started_at).max(0) / 1000) as u64)
        .collect();
    ends_ms.sort_unstable();
    Reference {
        outputs,
        hashes,
        ends_ms,
    }
}

fn check_after_kill(dir: &Dir, reference: &Reference, when: &str) {
    let ledger = dir.ledger();
    ledger
        .read::<RunRow>()
        .unwrap_or_else(|e| panic!("{when}: runs: {e}"));
    ledger
        .read::<MetricRow>()
        .unwrap_or_else(|e| panic!("{when}: metrics: {e}"));
    ledger
        .read::<EventRow>()
        .unwrap_or_else(|e| panic!("{when}: events: {e}"));
    let rows = ledger
        .read::<StageRunRow>()
        .unwrap_or_else(|e| panic!("{when}: stage_runs: {e}"));
    for r in rows.iter().filter(|r| r.status == "success") {
        for o in &r.outputs {
            let expected = &reference.hashes[&(r.stage.clone(), o.path.clone())];
            assert_eq!(
                &o.hash, expected,
                "{when}: stage {} recorded a wrong hash for {}",
                r.stage, o.path
            );
        }
    }
    for (path, found) in outputs(dir) {
        if let Some(found) = found {
            assert_eq!(
                Some(&found),
                reference.outputs[path].as_ref(),
                "{when}: output {path} is present but not complete"
            );
        }
    }
}

#[test]
fn sigkill_at_any_point_leaves_a_consistent_workspace() {
    let reference = reference();
    // Spread over the run, plus just before and after each stage ended (ledger appends
    // follow within ~200 ms of a stage's end).
    let mut delays: Vec<u64> = vec![0, 15, 40, 90, 160, 260, 380, 520];
    for &end in &reference.ends_ms {
        delays.extend([end.saturating_sub(10), end + 5, end + 120]);
    }
    delays.sort_unstable();
    delays.dedup();
    assert!(delays.len() >= 12, "{delays:?}");
    for &delay in &delays {
        let when = format!("killed after {delay} ms");
        let dir = Dir::new("crash");
        pipeline(&dir);
        let run = dir.taper().args(["run", "p.yaml", "--jobs", "2"]).spawn();
        std::thread::sleep(Duration::from_millis(delay));
        run.signal(libc::SIGKILL);
        let out = run.wait(Duration::from_secs(30));
        stop_leftovers(&dir);
        check_after_kill(&dir, &reference, &when);
        let present = outputs(&dir).values().filter(|o| o.is_some()).count();
        println!("{when}: {present} of {} outputs published", OUTPUTS.len());

        let out2 = dir.taper().args(["run", "p.yaml", "--jobs", "2"]).output();
        assert_eq!(
            out2.code,
            Some(0),
            "{when}: the next run failed\n{out}\n{out2}"
        );
        assert_eq!(
            outputs(&dir),
            reference.outputs,
            "{when}: the next run produced other bytes"
        );
        // And it recorded them: a further run has nothing to do.
        dir.taper().args(["run", "p.yaml"]).ok();
        assert!(
            dir.last_statuses().values().all(|s| s == "skipped"),
            "{when}: {:?}",
            dir.last_statuses()
        );
    }
}

#[test]
fn repeated_kills_of_the_same_workspace_converge() {
    let reference = reference();
    let dir = Dir::new("crash-repeat");
    pipeline(&dir);
    for (i, delay) in [60u64, 130, 200, 90, 300, 250].into_iter().enumerate() {
        let run = dir.taper().args(["run", "p.yaml", "--jobs", "2"]).spawn();
        std::thread::sleep(Duration::from_millis(delay));
        run.signal(libc::SIGKILL);
        run.wait(Duration::from_secs(30));
        stop_leftovers(&dir);
        check_after_kill(&dir, &reference, &format!("kill {i} after {delay} ms"));
    }
    dir.taper().args(["run", "p.yaml"]).ok();
    assert_eq!(outputs(&dir), reference.outputs);
    // A killed run stays visible as such.
    let out = dir.taper().args(["runs", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let statuses: Vec<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses[0], "success");
    assert!(statuses.contains(&"killed"), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == "success" || *s == "killed"),
        "{statuses:?}"
    );
}
