//! `--json` of `plan`, `status`, `runs` and `show`: each prints one valid JSON document
//! whose keys are exactly the ones README documents ("Machine-readable output"), so
//! scripts can rely on them. Also `init`, `kinds`, `completions` and the report written
//! by `taper run` through the pipeline's `report:` key.

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

const PIPELINE: &str = r#"version: 1
name: json-demo
report: {path: reports/run.html}
stages:
  make:
    kind: command
    outputs: [out/a.txt]
    with: {run: "mkdir -p out && echo a > out/a.txt"}
  copy:
    kind: command
    inputs: [out/a.txt]
    outputs: [out/b.txt]
    with: {run: "cp out/a.txt out/b.txt"}
  broken:
    kind: command
    inputs: [out/b.txt]
    outputs: [out/c.txt]
    with: {run: "echo '<script>alert(1)</script>' >&2; exit 3"}
"#;

fn taper(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_taper"))
        .current_dir(dir)
        .args(args)
        .env_remove("TAPER_TRIGGER")
        .env_remove("TAPER_SCHEDULED_FOR")
        .env_remove("TAPER_RUN_TIME")
        .output()
        .expect("run taper")
}

fn json(dir: &Path, args: &[&str]) -> Value {
    let out = taper(dir, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{args:?} printed invalid JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn keys(v: &Value) -> BTreeSet<&str> {
    v.as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect()
}

fn set<'a>(k: &[&'a str]) -> BTreeSet<&'a str> {
    k.iter().copied().collect()
}

#[test]
fn json_outputs_have_the_documented_keys() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("p.yaml"), PIPELINE).unwrap();

    let plan = json(d, &["plan", "p.yaml", "--json"]);
    assert_eq!(keys(&plan), set(&["pipeline", "to_run", "stages"]));
    assert_eq!(plan["stages"].as_array().unwrap().len(), 3);
    for s in plan["stages"].as_array().unwrap() {
        assert_eq!(
            keys(s),
            set(&["stage", "kind", "action", "reason", "fingerprint"])
        );
    }

    let run = taper(d, &["run", "p.yaml"]);
    assert_eq!(run.status.code(), Some(1), "the broken stage fails the run");

    let status = json(d, &["status", "p.yaml", "--json"]);
    assert_eq!(keys(&status), set(&["pipeline", "stages"]));
    for s in status["stages"].as_array().unwrap() {
        assert_eq!(keys(s), set(&["stage", "status", "detail"]));
    }

    let runs = json(d, &["runs", "--json"]);
    let runs = runs.as_array().expect("runs is an array");
    assert_eq!(runs.len(), 1);
    assert_eq!(
        keys(&runs[0]),
        set(&[
            "run_id",
            "pipeline",
            "name",
            "status",
            "trigger",
            "started_at",
            "duration_s"
        ])
    );
    assert_eq!(runs[0]["status"], "failed");

    let show = json(d, &["show", "--json"]);
    assert_eq!(
        keys(&show),
        set(&[
            "run_id",
            "pipeline",
            "name",
            "status",
            "trigger",
            "started_at",
            "duration_s",
            "retries",
            "stages"
        ])
    );
    for s in show["stages"].as_array().unwrap() {
        assert_eq!(
            keys(s),
            set(&[
                "stage",
                "kind",
                "status",
                "reason",
                "attempt",
                "started_at",
                "duration_s",
                "fingerprint",
                "error",
                "outputs",
                "metrics",
                "series"
            ])
        );
        for o in s["outputs"].as_array().unwrap() {
            assert_eq!(keys(o), set(&["path", "hash", "bytes"]));
        }
    }

    // `report:` wrote the report after the failed run; stage text is escaped.
    let html = std::fs::read_to_string(d.join("reports/run.html")).expect("report written");
    assert!(html.contains("data-stage=\"broken\" data-status=\"failed\""));
    assert!(
        !html.contains("<script>"),
        "stderr/error text must be escaped"
    );
    assert!(!d.join("out/c.txt").exists());
}

#[test]
fn report_from_the_ledger_alone_when_the_pipeline_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("p.yaml"),
        PIPELINE.replace("report: {path: reports/run.html}\n", ""),
    )
    .unwrap();
    let _ = taper(d, &["run", "p.yaml"]);
    assert!(
        !d.join("reports/run.html").exists(),
        "no `report:`, no report"
    );
    std::fs::remove_file(d.join("p.yaml")).unwrap();
    let out = taper(d, &["report", "--out", "r/report.html"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html = std::fs::read_to_string(d.join("r/report.html")).unwrap();
    assert!(html.contains("drawn from the stages recorded in the ledger"));
    // make -> copy -> broken, recovered from recorded inputs and outputs: two edges.
    assert!(
        html.matches("class=\"edge\"").count() >= 1,
        "edges from recorded inputs and outputs"
    );
    let out = taper(d, &["report", "nope"]);
    assert_eq!(out.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no record of run \"nope\""));
}

#[test]
fn report_key_is_validated_with_positions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bad = PIPELINE.replace(
        "report: {path: reports/run.html}",
        "report: {path: ../x.html, colour: red}",
    );
    std::fs::write(d.join("p.yaml"), bad).unwrap();
    let out = taper(d, &["validate", "p.yaml"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("p.yaml:3:"), "{err}");
    assert!(err.contains("colour"), "{err}");
    let clash = PIPELINE.replace("reports/run.html", "out/a.txt");
    std::fs::write(d.join("p.yaml"), clash).unwrap();
    let out = taper(d, &["validate", "p.yaml"]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("p.yaml:3:") && err.contains("overlaps output"),
        "{err}"
    );
}

#[test]
fn init_kinds_and_completions() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = taper(d, &["init", "starter.yaml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(d.join("starter.yaml")).unwrap();
    for kind in ["command", "tokenize", "train", "eval", "migrate", "merge"] {
        assert!(
            text.contains(&format!("kind: {kind}")),
            "starter has a {kind} stage"
        );
    }
    let again = taper(d, &["init", "starter.yaml"]);
    assert_eq!(again.status.code(), Some(6));
    assert!(String::from_utf8_lossy(&again.stderr).contains("never overwrites"));
    assert_eq!(
        std::fs::read_to_string(d.join("starter.yaml")).unwrap(),
        text
    );

    // The starter is valid where it is meant to run: the repository root.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = taper(
        root,
        &["validate", d.join("starter.yaml").to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let kinds = taper(d, &["kinds"]);
    let kinds = String::from_utf8_lossy(&kinds.stdout);
    assert!(
        kinds.contains("checkpoint_every")
            && kinds.contains("kill_grace")
            && kinds.contains("shard_size")
    );
    let help = taper(d, &["run", "--help"]);
    assert!(
        String::from_utf8_lossy(&help.stdout).contains(kinds.trim()),
        "run --help lists the kinds"
    );

    for shell in ["bash", "zsh", "fish"] {
        let out = taper(d, &["completions", shell]);
        assert!(out.status.success());
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("taper") && script.contains("report") && script.contains("completions"),
            "{shell}"
        );
    }
}

/// `taper completions bash | head -c 10`: when the reader goes away, a printing command
/// ends quietly (by SIGPIPE, as other Unix tools do) instead of panicking on the write.
#[test]
fn a_closed_stdout_ends_a_printing_command_without_a_panic() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    // A pipe whose read end is closed before taper starts: its first write fails.
    let mut fds = [0; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors were just created by pipe(2) and are owned here alone.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read_end);
    let out = Command::new(env!("CARGO_BIN_EXE_taper"))
        .current_dir(dir.path())
        .args(["completions", "bash"])
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .output()
        .expect("run taper");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}
