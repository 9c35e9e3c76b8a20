//! `keep_runs` prunes the ledger: after a successful run, a pipeline's runs beyond the
//! newest N leave every table, except a run that still holds a stage's latest success
//! (what decides "up to date"), so later runs still skip what is up to date. Also
//! `taper gc --keep-runs N`.

mod util;

use std::collections::BTreeMap;
use util::{command_stage, Dir};

/// `a` runs once and is up to date from then on; `b` reads `b.in`, which each run's
/// caller changes first, so `b` runs every time.
fn pipeline(dir: &Dir) {
    dir.create("a.in", "A\n");
    dir.create("b.in", "B\n");
    let mut p = String::from(
        "version: 1\nname: nightly\nschedule:\n  cron: \"0 2 * * *\"\n  keep_runs: 2\nstages:\n",
    );
    p += &command_stage("a", &["a.in"], &["a.txt"], "cat a.in > a.txt");
    p += &command_stage(
        "b",
        &["a.txt", "b.in"],
        &["b.txt"],
        "cat a.txt b.in > b.txt",
    );
    dir.create("p.yaml", p);
}

/// Run ids as `taper runs --json` lists them (newest first).
fn listed(dir: &Dir) -> Vec<String> {
    let out = dir.taper().args(["runs", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect()
}

fn statuses(dir: &Dir) -> BTreeMap<String, String> {
    dir.last_statuses()
}

/// The run ids that rows of `runs`, `stage_runs` and `events` mention (command stages
/// record no metrics).
fn ids_in_tables(dir: &Dir) -> [Vec<String>; 3] {
    let uniq = |v: Vec<String>| {
        let mut v = v;
        v.sort();
        v.dedup();
        v
    };
    [
        uniq(dir.runs().into_iter().map(|r| r.run_id).collect()),
        uniq(dir.stage_runs().into_iter().map(|r| r.run_id).collect()),
        uniq(dir.events().into_iter().map(|r| r.run_id).collect()),
    ]
}

#[test]
fn keep_runs_prunes_the_ledger_but_keeps_the_latest_successes() {
    let dir = Dir::new("keep-runs");
    pipeline(&dir);
    let mut ids = Vec::new();
    for i in 1..=4 {
        dir.touch("b.in");
        let out = dir.taper().args(["run", "p.yaml"]).ok();
        ids.push(dir.run_ids().pop().unwrap());
        let a = if i == 1 { "success" } else { "skipped" };
        assert_eq!(statuses(&dir)["a"], a, "run {i}\n{out}");
        assert_eq!(statuses(&dir)["b"], "success", "run {i}\n{out}");
        if i == 4 {
            assert!(
                out.stderr.contains(&format!(
                    "removed 1 old run(s) of nightly from the ledger (keep_runs: 2): {}",
                    ids[1]
                )),
                "{out}"
            );
        }
    }
    // The newest two, and the first: it holds `a`'s latest success.
    assert_eq!(
        listed(&dir),
        [ids[3].clone(), ids[2].clone(), ids[0].clone()]
    );
    let mut kept = vec![ids[0].clone(), ids[2].clone(), ids[3].clone()];
    kept.sort();
    for (table, in_table) in ["runs", "stage_runs", "events"]
        .iter()
        .zip(ids_in_tables(&dir))
    {
        assert_eq!(in_table, kept, "{table}");
    }
    assert!(!dir.exists(&format!(".taper/runs/{}", ids[1])));
    assert!(dir.exists(&format!(".taper/runs/{}/run.log", ids[0])));
    // The kept old run still shows whole.
    let out = dir.taper().args(["show", &ids[0], "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["stages"][0]["stage"], "a");
    assert_eq!(v["stages"][0]["status"], "success");
    assert_eq!(v["stages"][1]["stage"], "b");

    // A fifth run still finds `a` up to date.
    dir.touch("b.in");
    let out = dir.taper().args(["run", "p.yaml"]).ok();
    ids.push(dir.run_ids().pop().unwrap());
    assert_eq!(statuses(&dir)["a"], "skipped", "{out}");
    assert_eq!(
        dir.stage_runs_of(&ids[4])["a"].reason,
        "up to date",
        "{out}"
    );
    assert_eq!(
        listed(&dir),
        [ids[4].clone(), ids[3].clone(), ids[0].clone()]
    );

    // `taper gc --keep-runs 1` does the same for every pipeline of the workspace.
    let out = dir.taper().args(["gc", "--keep-runs", "1"]).ok();
    assert!(
        out.stdout
            .contains("removed 1 old run(s) from the ledger (--keep-runs 1)"),
        "{out}"
    );
    assert_eq!(listed(&dir), [ids[4].clone(), ids[0].clone()]);
    let out = dir.taper().args(["status", "p.yaml", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["stages"][0]["status"], "up to date", "{out}");
    assert_eq!(v["stages"][1]["status"], "up to date", "{out}");
    dir.taper().args(["gc", "--keep-runs", "0"]).expect_code(2);
}
