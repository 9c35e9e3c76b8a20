//! End-to-end tests of `taper run` and the commands that read its results, driving the
//! real binary in temporary workspaces.
//!
//! Nothing here asserts how fast anything is: overlap and order are proved from the
//! timestamps the ledger records, and time limits only guard against hangs.

mod util;

use std::time::Duration;
use util::{command_stage, process_alive, wait_until, Dir};

/// A diamond: `a -> b`, `a -> c`, `b, c -> d`. `b` and `c` sleep `sleep` seconds.
fn diamond(dir: &Dir, sleep: &str) {
    dir.create("in.txt", "hello\n");
    let mut p = String::from("version: 1\nname: diamond\nparams:\n  greeting: hi\nstages:\n");
    p += &command_stage(
        "a",
        &["in.txt"],
        &["a.txt"],
        "cat in.txt > a.txt; echo ${params.greeting} >> a.txt",
    );
    p += &command_stage(
        "b",
        &["a.txt"],
        &["b.txt"],
        &format!("sleep {sleep}; sed s/^/b:/ a.txt > b.txt"),
    );
    p += &command_stage(
        "c",
        &["a.txt"],
        &["c.txt"],
        &format!("sleep {sleep}; sed s/^/c:/ a.txt > c.txt"),
    );
    p += &command_stage(
        "d",
        &["b.txt", "c.txt"],
        &["d.txt"],
        "cat b.txt c.txt > d.txt",
    );
    dir.create("p.yaml", p);
}

fn statuses(pairs: &[(&str, &str)]) -> std::collections::BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[test]
fn diamond_runs_its_middle_stages_at_the_same_time() {
    let dir = Dir::new("overlap");
    diamond(&dir, "1");
    dir.taper().args(["run", "p.yaml", "--jobs", "2"]).ok();
    let rows = dir.last_run_stages();
    assert_eq!(
        dir.last_statuses(),
        statuses(&[
            ("a", "success"),
            ("b", "success"),
            ("c", "success"),
            ("d", "success")
        ])
    );
    let (a, b, c, d) = (&rows["a"], &rows["b"], &rows["c"], &rows["d"]);
    let end = |r: &taper::state::StageRunRow| r.ended_at.expect("ended_at recorded");
    // b and c overlapped ...
    assert!(
        b.started_at < end(c) && c.started_at < end(b),
        "b [{}, {}] and c [{}, {}] did not overlap",
        b.started_at,
        end(b),
        c.started_at,
        end(c)
    );
    // ... and the edges were respected.
    assert!(end(a) <= b.started_at && end(a) <= c.started_at);
    assert!(end(b) <= d.started_at && end(c) <= d.started_at);
    assert_eq!(dir.read("d.txt"), "b:hello\nb:hi\nc:hello\nc:hi\n");
}

#[test]
fn jobs_1_runs_one_stage_at_a_time() {
    let dir = Dir::new("serial");
    diamond(&dir, "0.2");
    dir.taper().args(["run", "p.yaml", "--jobs", "1"]).ok();
    let rows = dir.last_run_stages();
    let (b, c) = (&rows["b"], &rows["c"]);
    assert!(
        b.ended_at.unwrap() <= c.started_at || c.ended_at.unwrap() <= b.started_at,
        "b and c overlapped with --jobs 1"
    );
}

#[test]
fn a_rerun_skips_everything() {
    let dir = Dir::new("rerun");
    diamond(&dir, "0");
    dir.taper().args(["run", "p.yaml"]).ok();
    let before = dir.read("d.txt");
    let out = dir.taper().args(["run", "p.yaml"]).ok();
    assert_eq!(
        dir.last_statuses(),
        statuses(&[
            ("a", "skipped"),
            ("b", "skipped"),
            ("c", "skipped"),
            ("d", "skipped")
        ]),
        "{out}"
    );
    assert_eq!(dir.run_ids().len(), 2);
    assert_eq!(dir.read("d.txt"), before);
}

#[test]
fn changing_an_input_reruns_exactly_what_is_downstream_of_it() {
    let dir = Dir::new("touch");
    dir.create("left.txt", "L\n");
    dir.create("right.txt", "R\n");
    let mut p = String::from("version: 1\nname: two-branches\nstages:\n");
    p += &command_stage("l1", &["left.txt"], &["l1.txt"], "cat left.txt > l1.txt");
    p += &command_stage("l2", &["l1.txt"], &["l2.txt"], "cat l1.txt > l2.txt");
    p += &command_stage("r1", &["right.txt"], &["r1.txt"], "cat right.txt > r1.txt");
    p += &command_stage("r2", &["r1.txt"], &["r2.txt"], "cat r1.txt > r2.txt");
    p += &command_stage(
        "join",
        &["l2.txt", "r2.txt"],
        &["join.txt"],
        "cat l2.txt r2.txt > join.txt",
    );
    dir.create("p.yaml", p);
    dir.taper().args(["run", "p.yaml"]).ok();

    dir.touch("left.txt");
    let out = dir.taper().args(["run", "p.yaml"]).ok();
    assert_eq!(
        dir.last_statuses(),
        statuses(&[
            ("join", "success"),
            ("l1", "success"),
            ("l2", "success"),
            ("r1", "skipped"),
            ("r2", "skipped"),
        ]),
        "{out}"
    );
    assert_eq!(dir.read("join.txt"), "L\ntouched\nR\n");
    let l1 = &dir.last_run_stages()["l1"];
    assert_eq!(l1.reason, "input \"left.txt\" changed");

    // A change that does not change an intermediate output stops there.
    dir.create("right.txt", "R\n"); // same content, new mtime
    dir.taper().args(["run", "p.yaml"]).ok();
    assert!(dir.last_statuses().values().all(|s| s == "skipped"));
}

#[test]
fn an_unchanged_upstream_output_does_not_rerun_downstream() {
    let dir = Dir::new("cutoff");
    dir.create("in.txt", "3\n");
    let mut p = String::from("version: 1\nname: cutoff\nstages:\n");
    // `parity` only depends on whether the number is odd.
    p += &command_stage(
        "parity",
        &["in.txt"],
        &["parity.txt"],
        "echo $(( $(cat in.txt) % 2 )) > parity.txt",
    );
    p += &command_stage(
        "report",
        &["parity.txt"],
        &["report.txt"],
        "cat parity.txt > report.txt",
    );
    dir.create("p.yaml", p);
    dir.taper().args(["run", "p.yaml"]).ok();
    dir.create("in.txt", "5\n");
    dir.taper().args(["run", "p.yaml"]).ok();
    let st = dir.last_statuses();
    assert_eq!(st["parity"], "success");
    assert_eq!(st["report"], "skipped");
}

#[test]
fn set_changes_the_fingerprint_and_unknown_keys_are_refused() {
    let dir = Dir::new("set");
    diamond(&dir, "0");
    dir.taper().args(["run", "p.yaml"]).ok();
    let fp1 = dir.last_run_stages()["a"].fingerprint.clone();

    let out = dir
        .taper()
        .args(["run", "p.yaml", "--set", "greeting=bye"])
        .ok();
    let rows = dir.last_run_stages();
    assert_eq!(rows["a"].status, "success", "{out}");
    assert_eq!(rows["a"].reason, "configuration changed");
    assert_ne!(rows["a"].fingerprint, fp1);
    assert_eq!(rows["d"].status, "success");
    assert!(dir.read("d.txt").contains("b:bye"));

    // The same override again is up to date; dropping it runs again.
    dir.taper()
        .args(["run", "p.yaml", "--set", "params.greeting=bye"])
        .ok();
    assert!(dir.last_statuses().values().all(|s| s == "skipped"));
    dir.taper().args(["run", "p.yaml"]).ok();
    assert_eq!(dir.last_run_stages()["a"].fingerprint, fp1);

    let runs_before = dir.run_ids().len();
    let out = dir
        .taper()
        .args(["run", "p.yaml", "--set", "greting=x"])
        .expect_code(3);
    assert_eq!(
        out.stderr.trim_end(),
        "error: p.yaml: --set greting: unknown parameter `params.greting` (did you mean `greeting`?)"
    );
    assert_eq!(dir.run_ids().len(), runs_before, "nothing ran");
}

#[test]
fn a_failing_attempt_is_retried() {
    let dir = Dir::new("retry");
    // The counter lives in the workspace, outside the staging folder, so it survives
    // between attempts.
    let p = "version: 1\nname: retry\nstages:\n  flaky:\n    kind: command\n    outputs: [out.txt]\n    retries: 2\n    backoff: 10ms\n    with:\n      run: 'n=$(cat \"$TAPER_WORKSPACE/count\" 2>/dev/null || echo 0); n=$((n+1)); echo $n > \"$TAPER_WORKSPACE/count\"; echo attempt $TAPER_ATTEMPT > out.txt; [ $n -ge 2 ]'\n";
    dir.create("p.yaml", p);
    let out = dir.taper().args(["run", "p.yaml"]).ok();
    assert_eq!(dir.read("count").trim(), "2", "{out}");
    let row = &dir.last_run_stages()["flaky"];
    assert_eq!(row.status, "success");
    assert_eq!(row.attempt, 2);
    assert_eq!(dir.read("out.txt"), "attempt 2\n");
    let retries: Vec<_> = dir
        .events()
        .into_iter()
        .filter(|e| e.event == "stage_retry")
        .collect();
    assert_eq!(retries.len(), 1);
    assert_eq!(retries[0].stage.as_deref(), Some("flaky"));
    assert!(
        retries[0].message.starts_with("attempt 1 failed"),
        "{}",
        retries[0].message
    );
}

#[test]
fn retries_run_out() {
    let dir = Dir::new("retry-out");
    let p = "version: 1\nname: retry\nstages:\n  never:\n    kind: command\n    outputs: [out.txt]\n    retries: 2\n    backoff: 1ms\n    with:\n      run: 'echo $TAPER_ATTEMPT >> \"$TAPER_WORKSPACE/attempts\"; exit 7'\n";
    dir.create("p.yaml", p);
    dir.taper().args(["run", "p.yaml"]).expect_code(1);
    assert_eq!(dir.read("attempts"), "1\n2\n3\n");
    let row = &dir.last_run_stages()["never"];
    assert_eq!((row.status.as_str(), row.attempt), ("failed", 3));
    assert!(row.error.as_deref().unwrap().contains("exit code 7"));
}

#[test]
fn a_timeout_kills_the_stage_and_its_processes() {
    let dir = Dir::new("timeout");
    let p = "version: 1\nname: timeout\nstages:\n  slow:\n    kind: command\n    outputs: [out.txt]\n    timeout: 1s\n    with:\n      run: 'echo started > out.txt; sleep 30 & echo $! > \"$TAPER_WORKSPACE/sleep.pid\"; wait'\n";
    dir.create("p.yaml", p);
    // 30 s is the sleep; finishing well before proves the kill.
    let out = dir
        .taper()
        .args(["run", "p.yaml"])
        .spawn()
        .wait(Duration::from_secs(20));
    assert_eq!(out.code, Some(1), "{out}");
    let row = &dir.last_run_stages()["slow"];
    assert_eq!(row.status, "timed_out");
    assert_eq!(row.error.as_deref(), Some("timed out after 1s"));
    assert!(
        !dir.exists("out.txt"),
        "a timed-out stage published its output"
    );
    let pid: i32 = dir.read("sleep.pid").trim().parse().unwrap();
    wait_until(Duration::from_secs(10), "the sleep to die", || {
        !process_alive(pid)
    });
}

/// `bad` fails after writing its output; `after` needs it; `other` is independent.
fn failing(dir: &Dir) {
    let mut p = String::from("version: 1\nname: failing\nstages:\n");
    p += &command_stage("bad", &[], &["bad.txt"], "echo partial > bad.txt; exit 1");
    p += &command_stage(
        "after",
        &["bad.txt"],
        &["after.txt"],
        "cp bad.txt after.txt",
    );
    p += &command_stage("other", &[], &["other.txt"], "echo other > other.txt");
    dir.create("p.yaml", p);
}

#[test]
fn a_failed_stage_publishes_nothing_and_stops_the_run() {
    let dir = Dir::new("fail");
    failing(&dir);
    let out = dir
        .taper()
        .args(["run", "p.yaml", "--jobs", "1"])
        .expect_code(1);
    assert!(!dir.exists("bad.txt"), "failed stage published its output");
    assert!(!dir.exists("after.txt"));
    assert!(!dir.exists("other.txt"), "scheduling did not stop: {out}");
    let st = dir.last_statuses();
    assert_eq!(st.get("bad").map(String::as_str), Some("failed"));
    assert!(!st.contains_key("after"), "{st:?}");
    let row = &dir.last_run_stages()["bad"];
    assert!(row.outputs.is_empty());
    assert!(
        row.error
            .as_deref()
            .unwrap()
            .starts_with("command failed (exit code 1)"),
        "{:?}",
        row.error
    );
    // status says so.
    let status = dir.taper().args(["status", "p.yaml"]).ok();
    assert!(
        status
            .stdout
            .contains("bad    failed (command failed (exit code 1)"),
        "{status}"
    );
}

#[test]
fn keep_going_runs_the_independent_branch() {
    let dir = Dir::new("keep-going");
    failing(&dir);
    dir.taper()
        .args(["run", "p.yaml", "--jobs", "1", "--keep-going"])
        .expect_code(1);
    assert!(!dir.exists("bad.txt"));
    assert!(!dir.exists("after.txt"));
    assert_eq!(dir.read("other.txt"), "other\n");
    let st = dir.last_statuses();
    assert_eq!(st["bad"], "failed");
    assert_eq!(st["other"], "success");
    assert!(!st.contains_key("after"));
    assert!(dir
        .events()
        .iter()
        .any(|e| e.event == "stage_blocked" && e.stage.as_deref() == Some("after")));
}

#[test]
fn target_runs_a_stage_and_its_upstream_only() {
    let dir = Dir::new("target");
    diamond(&dir, "0");
    dir.taper().args(["run", "p.yaml", "--target", "c"]).ok();
    assert_eq!(
        dir.last_statuses(),
        statuses(&[("a", "success"), ("c", "success")])
    );
    assert!(dir.exists("c.txt") && !dir.exists("b.txt") && !dir.exists("d.txt"));

    dir.taper()
        .args(["run", "p.yaml", "--target", "a", "--downstream"])
        .ok();
    let st = dir.last_statuses();
    assert_eq!(st["a"], "skipped");
    assert_eq!(st["b"], "success");
    assert_eq!(st["d"], "success");

    let out = dir
        .taper()
        .args(["run", "p.yaml", "--target", "e"])
        .expect_code(3);
    assert!(out.stderr.contains("unknown stage \"e\""), "{out}");
}

#[test]
fn force_reruns_an_up_to_date_stage() {
    let dir = Dir::new("force");
    diamond(&dir, "0");
    dir.taper().args(["run", "p.yaml"]).ok();
    dir.taper().args(["run", "p.yaml", "--force", "b"]).ok();
    let rows = dir.last_run_stages();
    assert_eq!(rows["b"].status, "success");
    assert_eq!(rows["b"].reason, "forced");
    // b wrote the same bytes, so d is still up to date.
    assert_eq!(rows["a"].status, "skipped");
    assert_eq!(rows["c"].status, "skipped");
    assert_eq!(rows["d"].status, "skipped");
}

#[test]
fn dry_run_and_plan_have_no_side_effects() {
    let dir = Dir::new("dry-run");
    diamond(&dir, "0");
    let out = dir.taper().args(["run", "p.yaml", "--dry-run"]).ok();
    assert_eq!(
        out.stdout,
        "run   a  never run\nrun   b  upstream stage \"a\" runs\nrun   c  upstream stage \"a\" runs\nrun   d  upstream stage \"b\" runs\n4 of 4 stages to run\n"
    );
    let plan = dir.taper().args(["plan", "p.yaml"]).ok();
    assert_eq!(plan.stdout, out.stdout);
    assert!(!dir.exists(".taper/ledger"), "a dry run wrote the ledger");
    assert!(!dir.exists(".taper/lock"), "a dry run took the lock");
    assert!(!dir.exists("a.txt"));

    dir.taper().args(["run", "p.yaml"]).ok();
    let files = dir.ledger().files("stage_runs").unwrap();
    dir.touch("in.txt");
    let out = dir.taper().args(["run", "p.yaml", "--dry-run"]).ok();
    assert!(
        out.stdout
            .starts_with("run   a  input \"in.txt\" changed\n"),
        "{out}"
    );
    assert_eq!(dir.ledger().files("stage_runs").unwrap(), files);
    assert_eq!(dir.read("a.txt"), "hello\nhi\n");
}

#[test]
fn plan_json_says_what_would_run_and_why() {
    let dir = Dir::new("plan-json");
    diamond(&dir, "0");
    let out = dir.taper().args(["plan", "p.yaml", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["pipeline"], "diamond");
    assert_eq!(v["to_run"], 4);
    let stages = v["stages"].as_array().unwrap();
    let names: Vec<_> = stages
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c", "d"]);
    assert_eq!(stages[0]["action"], "run");
    assert_eq!(stages[0]["reason"], "never run");
    assert_eq!(stages[0]["kind"], "command");

    dir.taper().args(["run", "p.yaml"]).ok();
    let recorded = dir.last_run_stages();
    let out = dir.taper().args(["plan", "p.yaml", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["to_run"], 0);
    for s in v["stages"].as_array().unwrap() {
        assert_eq!(s["action"], "skip");
        assert_eq!(s["reason"], "up to date");
        let name = s["stage"].as_str().unwrap();
        assert_eq!(s["fingerprint"], recorded[name].fingerprint.as_str());
    }
}

#[test]
fn status_reports_each_stage() {
    let dir = Dir::new("status");
    diamond(&dir, "0");
    let out = dir.taper().args(["status", "p.yaml"]).ok();
    assert_eq!(
        out.stdout,
        "a  stale (never run)\nb  stale (upstream stage \"a\" runs)\nc  stale (upstream stage \"a\" runs)\nd  stale (upstream stage \"b\" runs)\n"
    );
    dir.taper().args(["run", "p.yaml"]).ok();
    let out = dir.taper().args(["status", "p.yaml"]).ok();
    assert_eq!(
        out.stdout,
        "a  up to date\nb  up to date\nc  up to date\nd  up to date\n"
    );
    std::fs::remove_file(dir.path("c.txt")).unwrap();
    let out = dir.taper().args(["status", "p.yaml", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["stages"][2]["stage"], "c");
    assert_eq!(v["stages"][2]["status"], "stale");
    assert_eq!(v["stages"][2]["detail"], "output \"c.txt\" is missing");
    assert_eq!(v["stages"][1]["status"], "up to date");
}

#[test]
fn runs_and_show_read_the_history() {
    let dir = Dir::new("history");
    let out = dir.taper().arg("runs").ok();
    assert_eq!(out.stdout, "no runs recorded in this workspace\n");
    diamond(&dir, "0");
    dir.taper().args(["run", "p.yaml"]).ok();
    dir.taper().args(["run", "p.yaml"]).ok();
    let ids = dir.run_ids();
    assert_eq!(ids.len(), 2);

    let out = dir.taper().args(["runs", "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    let listed: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["run_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, [ids[1].clone(), ids[0].clone()], "newest first");
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["status"] == "success"));
    let text = dir.taper().arg("runs").ok().stdout;
    assert_eq!(text.lines().count(), 2);
    assert!(text.lines().next().unwrap().starts_with(&ids[1]));
    assert!(text.contains(" success "), "{text}");

    let out = dir.taper().args(["show", &ids[0], "--json"]).ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["run_id"], ids[0].as_str());
    assert_eq!(v["status"], "success");
    let d = &v["stages"][3];
    assert_eq!(d["stage"], "d");
    assert_eq!(d["status"], "success");
    let hash = blake3::hash(&dir.bytes("d.txt").unwrap())
        .to_hex()
        .to_string();
    assert_eq!(d["outputs"][0]["path"], "d.txt");
    assert_eq!(d["outputs"][0]["hash"], hash.as_str());

    let text = dir.taper().args(["show", &ids[0]]).ok().stdout;
    assert!(text.starts_with(&format!("run {}  success  (p.yaml)", ids[0])));
    assert!(
        text.contains(&format!("d.txt  {}  ", &hash[..16])),
        "{text}"
    );
    // Default: the latest run.
    let latest = dir.taper().arg("show").ok().stdout;
    assert!(latest.starts_with(&format!("run {}", ids[1])));
    let out = dir.taper().args(["show", "no-such-run"]).expect_code(6);
    assert!(out.stderr.contains("no record of run \"no-such-run\""));
}

#[test]
fn verify_rehashes_a_runs_outputs_against_the_ledger() {
    let dir = Dir::new("verify");
    diamond(&dir, "0");
    dir.taper().args(["run", "p.yaml"]).ok();
    let first = dir.run_ids()[0].clone();
    let out = dir.taper().args(["verify", &first]).ok();
    assert_eq!(
        out.stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        4
    );
    assert!(
        out.stderr.contains("4 outputs checked, all as recorded"),
        "{}",
        out.stderr
    );

    // Damaged behind taper's back (same size, same mtime would fool a hash cache).
    let before = std::fs::metadata(dir.root.join("d.txt")).unwrap();
    let damaged = dir
        .bytes("d.txt")
        .unwrap()
        .iter()
        .map(|b| b ^ 1)
        .collect::<Vec<u8>>();
    std::fs::write(dir.root.join("d.txt"), damaged).unwrap();
    std::fs::File::options()
        .write(true)
        .open(dir.root.join("d.txt"))
        .unwrap()
        .set_modified(before.modified().unwrap())
        .unwrap();
    let out = dir.taper().args(["verify"]).expect_code(7);
    assert!(out.stdout.contains("CHANGED   d  d.txt"), "{}", out.stdout);
    assert!(out.stderr.contains("1 of 4 outputs"), "{}", out.stderr);
    std::fs::remove_file(dir.root.join("c.txt")).unwrap();
    let out = dir.taper().args(["verify"]).expect_code(7);
    assert!(out.stdout.contains("MISSING   c  c.txt"), "{}", out.stdout);

    // A later run that rewrites the outputs: the first run's are replaced, not damaged.
    dir.create("in.txt", "changed\n");
    dir.taper().args(["run", "p.yaml"]).ok();
    let second = dir.run_ids()[1].clone();
    let out = dir.taper().args(["verify", &first]).ok();
    assert!(
        out.stdout
            .contains(&format!("replaced  a  a.txt  (by run {second};")),
        "{}",
        out.stdout
    );
    dir.taper().args(["verify", &second]).ok();
    let out = dir.taper().args(["verify", "no-such-run"]).expect_code(6);
    assert!(out.stderr.contains("no record of run \"no-such-run\""));
}

#[test]
fn a_second_run_is_refused_while_the_lock_is_held() {
    let dir = Dir::new("lock");
    let p = "version: 1\nname: lock\nstages:\n  wait:\n    kind: command\n    outputs: [out.txt]\n    with:\n      run: 'touch \"$TAPER_WORKSPACE/started\"; i=0; while [ ! -e \"$TAPER_WORKSPACE/release\" ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; echo done > out.txt'\n";
    dir.create("p.yaml", p);
    let first = dir.taper().args(["run", "p.yaml"]).spawn();
    wait_until(Duration::from_secs(30), "the first run's stage", || {
        dir.exists("started")
    });
    let second = dir.taper().args(["run", "p.yaml"]).expect_code(4);
    assert!(
        second.stderr.contains("the workspace is locked by run "),
        "{second}"
    );
    assert!(
        second.stderr.contains(&format!("(pid {} on ", first.pid())),
        "{second}"
    );
    // Reading commands do not need the lock.
    dir.taper().args(["plan", "p.yaml"]).ok();
    // The recorder flushes the `stage_started` event within a moment.
    wait_until(Duration::from_secs(10), "status to say running", || {
        dir.taper().args(["status", "p.yaml"]).ok().stdout == "wait  running\n"
    });
    dir.create("release", "");
    let out = first.wait(Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{out}");
    assert_eq!(dir.read("out.txt"), "done\n");
    // Released on exit.
    dir.taper().args(["run", "p.yaml"]).ok();
}

#[test]
fn ctrl_c_interrupts_the_run_and_publishes_nothing() {
    let dir = Dir::new("sigint");
    let p = "version: 1\nname: sigint\nstages:\n  slow:\n    kind: command\n    outputs: [out.txt]\n    with:\n      run: 'echo partial > out.txt; touch \"$TAPER_WORKSPACE/started\"; sleep 30 & echo $! > \"$TAPER_WORKSPACE/sleep.pid\"; wait'\n  later:\n    kind: command\n    inputs: [out.txt]\n    outputs: [later.txt]\n    with:\n      run: 'cp out.txt later.txt'\n";
    dir.create("p.yaml", p);
    let run = dir.taper().args(["run", "p.yaml"]).spawn();
    wait_until(Duration::from_secs(30), "the stage to start", || {
        dir.exists("sleep.pid") && !dir.read("sleep.pid").trim().is_empty()
    });
    run.signal(libc::SIGINT);
    // The stage sleeps 30 s; exiting well before proves the stop.
    let out = run.wait(Duration::from_secs(20));
    assert_eq!(out.code, Some(130), "{out}");
    let st = dir.last_statuses();
    assert_eq!(st.get("slow").map(String::as_str), Some("interrupted"));
    assert!(!st.contains_key("later"));
    assert!(
        !dir.exists("out.txt"),
        "an interrupted stage published output"
    );
    assert!(!dir.exists("later.txt"));
    let pid: i32 = dir.read("sleep.pid").trim().parse().unwrap();
    wait_until(Duration::from_secs(10), "the sleep to die", || {
        !process_alive(pid)
    });
    let run = dir.runs().into_iter().last().unwrap();
    assert_eq!(run.status, "interrupted");
    // The next run starts over.
    let status = dir.taper().args(["status", "p.yaml"]).ok();
    assert!(status.stdout.starts_with("slow   interrupted"), "{status}");
}
