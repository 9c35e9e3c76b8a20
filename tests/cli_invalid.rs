//! The invalid-pipeline suite (after nextest's invalid-config tests): each
//! `tests/invalid/NAME.yaml` must make `taper validate` fail with exit code 3 and print
//! exactly `tests/invalid/NAME.err` on stderr.
//!
//! To regenerate the expected files after an intended change of wording, run
//! `TAPER_BLESS=1 cargo test --test cli_invalid` and review the diff: every message must
//! still name the file, line:column, stage and key where they apply.

mod util;

use std::fs;
use std::path::PathBuf;
use util::{tests_dir, Dir};

fn cases() -> Vec<PathBuf> {
    let mut cases: Vec<PathBuf> = fs::read_dir(tests_dir().join("invalid"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    cases.sort();
    cases
}

#[test]
fn every_invalid_pipeline_fails_with_its_exact_message() {
    let bless = std::env::var_os("TAPER_BLESS").is_some();
    let cases = cases();
    assert!(cases.len() >= 15, "the suite lost cases: {cases:?}");
    let mut failures = Vec::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_str().unwrap();
        // Validate a copy in an empty workspace, named as in the suite, so that messages
        // say `NAME.yaml:line:col` and no input exists unless the case creates it.
        let dir = Dir::new("invalid");
        dir.create(name, fs::read(case).unwrap());
        let out = dir.taper().args(["validate", name]).output();
        let expected_path = case.with_extension("err");
        if bless {
            fs::write(&expected_path, &out.stderr).unwrap();
        }
        let expected = fs::read_to_string(&expected_path).unwrap_or_default();
        if out.code != Some(3) || !out.stdout.is_empty() || out.stderr != expected {
            failures.push(format!(
                "{name}: expected exit code 3 and stderr\n{expected}\n--- got\n{out}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ (TAPER_BLESS=1 rewrites the .err files):\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_expected_message_has_its_pipeline() {
    for e in fs::read_dir(tests_dir().join("invalid")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|e| e == "err") {
            assert!(
                p.with_extension("yaml").exists(),
                "{} has no pipeline",
                p.display()
            );
        }
    }
}

/// Kinds announced but not implemented yet are refused with a pointed error. Which kinds
/// those are changes as they land, so this case is built from the kind table.
#[test]
fn an_announced_but_unavailable_kind_is_refused() {
    let Some(kind) = taper::stages::KINDS
        .iter()
        .find(|k| k.unavailable.is_some())
    else {
        return; // every announced kind is implemented
    };
    let dir = Dir::new("unavailable");
    dir.create(
        "p.yaml",
        format!(
            "version: 1\nname: soon\nstages:\n  s:\n    kind: {}\n",
            kind.name
        ),
    );
    let out = dir.taper().args(["validate", "p.yaml"]).expect_code(3);
    let caret = " ".repeat(10);
    assert_eq!(
        out.stderr,
        format!(
            "error: p.yaml:5:11: stage \"s\": key `stages.s.kind`: {}\n 5 |     kind: {}\n   | {caret}^\n",
            kind.unavailable.unwrap(),
            kind.name
        )
    );
}

#[test]
fn a_valid_pipeline_validates() {
    let dir = Dir::new("valid");
    dir.create("in.txt", "x");
    dir.create(
        "p.yaml",
        "version: 1\nname: ok\nstages:\n  a:\n    kind: command\n    inputs: [in.txt]\n    outputs: [a.txt]\n    with: {run: \"cp in.txt a.txt\"}\n  b:\n    kind: command\n    foreach: [x, y]\n    inputs: [a.txt]\n    outputs: [\"b-${item}.txt\"]\n    with: {run: \"cp a.txt b-${item}.txt\"}\n",
    );
    let out = dir.taper().args(["validate", "p.yaml"]).ok();
    assert_eq!(out.stdout, "p.yaml: ok (3 stages)\n");
}

#[test]
fn validate_reports_every_file_and_every_error() {
    let dir = Dir::new("several");
    dir.create(
        "two.yaml",
        "version: 1\nname: two\nstages:\n  a:\n    kind: command\n    needs: [zzz]\n    timeout: soon\n    with: {run: \"true\"}\n",
    );
    dir.create("ok.yaml", "version: 1\nname: ok\nstages: {}\n");
    let out = dir
        .taper()
        .args(["validate", "two.yaml", "ok.yaml"])
        .expect_code(3);
    assert_eq!(out.stdout, "ok.yaml: ok (0 stages)\n");
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 2, "{out}");
    assert!(errors[0].starts_with("error: two.yaml:7:14: stage \"a\": key `stages.a.timeout`"));
    assert!(errors[1].starts_with("error: two.yaml:6:13: stage \"a\": key `stages.a.needs`"));
}
