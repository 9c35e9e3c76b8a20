//! `taper migrate` and `taper merge` through the real binary: they write what the
//! library writes, and every error is exit code 6 with a message that says what is wrong
//! (a command line clap cannot parse stays code 2).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use taper::formats::safetensors_in::SafetensorsFile;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn taper(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_taper"))
        .args(args)
        .output()
        .unwrap()
}

fn code(o: &Output) -> (Option<i32>, String) {
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap()
}

#[test]
fn migrate_round_trips_and_merge_writes_a_model() {
    let tmp = tempfile::tempdir().unwrap();
    let (mlx, peft, native, merged) = (
        tmp.path().join("mlx"),
        tmp.path().join("peft"),
        tmp.path().join("taper"),
        tmp.path().join("merged"),
    );
    let peft_in = fixture("peft-adapter-llama");
    let base = fixture("tiny-llama");
    let (c, out) = code(&taper(&[
        "migrate",
        "--from",
        "peft",
        "--to",
        "mlx",
        s(&peft_in),
        s(&mlx),
        "--base",
        s(&base),
    ]));
    assert_eq!(c, Some(0), "{out}");
    assert!(out.contains("peft -> mlx"), "{out}");
    let (c, out) = code(&taper(&[
        "migrate",
        "--from",
        "mlx",
        "--to",
        "taper",
        s(&mlx),
        s(&native),
        "--base",
        s(&base),
    ]));
    assert_eq!(c, Some(0), "{out}");
    let (c, out) = code(&taper(&[
        "migrate",
        "--from",
        "taper",
        "--to",
        "peft",
        s(&native),
        s(&peft),
        "--base",
        s(&base),
    ]));
    assert_eq!(c, Some(0), "{out}");
    let tensors = |dir: &Path| {
        let file = SafetensorsFile::open(&dir.join("adapter_model.safetensors")).unwrap();
        let names: Vec<String> = file.entries().keys().cloned().collect();
        names
            .into_iter()
            .map(|n| (file.read(&n).unwrap(), n))
            .collect::<Vec<_>>()
    };
    assert!(
        tensors(&peft) == tensors(&peft_in),
        "peft -> mlx -> taper -> peft changed the tensors"
    );

    let (c, out) = code(&taper(&[
        "merge",
        "--base",
        s(&base),
        "--adapter",
        s(&native),
        s(&merged),
        "--shard-size",
        "200KB",
    ]));
    assert_eq!(c, Some(0), "{out}");
    assert!(
        merged.join("model.safetensors.index.json").is_file(),
        "{out}"
    );
    let (c, out) = code(&taper(&["inspect", s(&merged)]));
    assert_eq!(c, Some(0), "{out}");
    let library = tmp.path().join("library");
    taper::formats::merge(
        &base,
        &native,
        &library,
        taper::formats::Rounding::Peft,
        200_000,
    )
    .unwrap();
    for f in std::fs::read_dir(&library).unwrap() {
        let name = f.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            read(&merged, &name) == read(&library, &name),
            "{name} differs"
        );
    }
}

#[test]
fn errors_exit_6_with_a_clear_message_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out_dir = tmp.path().join("out");
    let peft = fixture("peft-adapter-llama");
    let native = tmp.path().join("native");
    let (base, bf16) = (fixture("tiny-llama"), fixture("tiny-llama-bf16"));
    let (c, out) = code(&taper(&[
        "migrate",
        "--from",
        "peft",
        "--to",
        "taper",
        s(&peft),
        s(&native),
        "--base",
        s(&base),
    ]));
    assert_eq!(c, Some(0), "{out}");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "migrate",
                "--from",
                "mlx",
                "--to",
                "peft",
                s(&peft),
                s(&out_dir),
            ],
            "found a peft adapter",
        ),
        (
            vec![
                "migrate",
                "--from",
                "gguf",
                "--to",
                "peft",
                s(&peft),
                s(&out_dir),
            ],
            "GGUF",
        ),
        (
            vec![
                "migrate",
                "--from",
                "peft",
                "--to",
                "mlx",
                s(&peft),
                s(&out_dir),
                "--dtype",
                "f16",
            ],
            "GGUF import only",
        ),
        (
            vec![
                "migrate",
                "--from",
                "peft",
                "--to",
                "mlx",
                s(&peft),
                s(&native),
            ],
            "not an empty directory",
        ),
        (
            vec![
                "merge",
                "--base",
                s(&bf16),
                "--adapter",
                s(&native),
                s(&out_dir),
            ],
            "hash",
        ),
        (
            vec![
                "merge",
                "--base",
                s(&base),
                "--adapter",
                s(&peft),
                s(&out_dir),
                "--shard-size",
                "lots",
            ],
            "--shard-size lots",
        ),
        (
            vec![
                "merge",
                "--base",
                s(tmp.path()),
                "--adapter",
                s(&peft),
                s(&out_dir),
            ],
            "config.json",
        ),
    ];
    for (args, needle) in cases {
        let (c, out) = code(&taper(&args));
        assert_eq!(c, Some(6), "{args:?}: {out}");
        assert!(out.starts_with("error: "), "{args:?}: {out}");
        assert!(
            out.contains(needle),
            "{args:?}: expected `{needle}` in {out}"
        );
        assert!(!out_dir.exists(), "{args:?} left {}", out_dir.display());
    }
    let (c, out) = code(&taper(&[
        "migrate",
        "--from",
        "onnx",
        "--to",
        "peft",
        s(&peft),
        s(&out_dir),
    ]));
    assert_eq!(c, Some(2), "{out}");
    assert!(out.contains("onnx"), "{out}");
}
