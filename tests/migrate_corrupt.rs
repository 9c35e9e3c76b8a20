//! Corrupt inputs give clear errors and leave no output: truncated files, a header length
//! beyond the file, a 100 MB header, unknown dtype strings, shapes that do not fit.

mod model_util;

use std::path::{Path, PathBuf};

use model_util::fixture;
use taper::formats::{
    merge, migrate, MigrateFormat as F, MigrateOptions, Rounding, DEFAULT_SHARD_SIZE,
};

/// A copy of the PEFT fixture whose weights file is replaced by `weights`.
fn peft_with(dir: &Path, weights: &[u8]) -> PathBuf {
    let out = dir.join("adapter");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(
        fixture("peft-adapter-llama/adapter_config.json"),
        out.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(out.join("adapter_model.safetensors"), weights).unwrap();
    out
}

fn original() -> Vec<u8> {
    std::fs::read(fixture("peft-adapter-llama/adapter_model.safetensors")).unwrap()
}

/// Converting and merging both fail with a message containing every `needles`, and
/// neither leaves its output behind.
fn refused(adapter: &Path, dir: &Path, needles: &[&str]) {
    let out = dir.join("out");
    let errors = [
        migrate(F::Peft, F::Mlx, adapter, &out, &MigrateOptions::default())
            .unwrap_err()
            .to_string(),
        merge(
            &fixture("tiny-llama"),
            adapter,
            &out,
            Rounding::Peft,
            DEFAULT_SHARD_SIZE,
        )
        .unwrap_err()
        .to_string(),
    ];
    for err in errors {
        for n in needles {
            assert!(err.contains(n), "`{n}` not in: {err}");
        }
        assert!(
            err.contains("adapter_model.safetensors"),
            "the file is named: {err}"
        );
    }
    assert!(!out.exists(), "no output on failure");
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(".taper-partial")
        })
        .collect();
    assert!(leftovers.is_empty(), "temporary output left behind");
}

#[test]
fn truncated_file() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = original();
    let a = peft_with(tmp.path(), &bytes[..bytes.len() - 100]);
    refused(&a, tmp.path(), &["truncated"]);
}

#[test]
fn header_length_beyond_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = original();
    let len = bytes.len() as u64;
    bytes[..8].copy_from_slice(&len.to_le_bytes());
    let a = peft_with(tmp.path(), &bytes);
    refused(&a, tmp.path(), &["beyond the end of the file"]);
}

#[test]
fn header_of_100_mb() {
    let tmp = tempfile::tempdir().unwrap();
    let a = peft_with(tmp.path(), &[]);
    // A real 100 MB+ header (sparse file): refused before it is read.
    let n: u64 = 100_000_008;
    let f = std::fs::File::create(a.join("adapter_model.safetensors")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&n.to_le_bytes(), 0).unwrap();
    f.set_len(8 + n + 16).unwrap();
    refused(
        &a,
        tmp.path(),
        &["larger than the 100000000 bytes accepted"],
    );
}

#[test]
fn unknown_dtype_string() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = original();
    let text = String::from_utf8_lossy(&bytes[8..1032]).replacen("\"F32\"", "\"F33\"", 1);
    let mut edited = bytes[..8].to_vec();
    edited.extend_from_slice(text.as_bytes());
    edited.extend_from_slice(&bytes[1032..]);
    let a = peft_with(tmp.path(), &edited);
    refused(&a, tmp.path(), &["invalid header", "F33"]);
}

#[test]
fn shape_that_does_not_fit_the_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let a = peft_with(tmp.path(), &original());
    // The config says r = 4, the tensors have 8 rows.
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.join("adapter_config.json")).unwrap()).unwrap();
    json["r"] = serde_json::json!(4);
    std::fs::write(
        a.join("adapter_config.json"),
        serde_json::to_vec(&json).unwrap(),
    )
    .unwrap();
    refused(&a, tmp.path(), &["lora_A.weight", "[8, 64]"]);
}

#[test]
fn corrupt_base_is_refused_too() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::copy(fixture("tiny-llama/config.json"), base.join("config.json")).unwrap();
    let bytes = std::fs::read(fixture("tiny-llama/model.safetensors")).unwrap();
    std::fs::write(base.join("model.safetensors"), &bytes[..bytes.len() / 2]).unwrap();
    let out = tmp.path().join("out");
    let err = merge(
        &base,
        &fixture("peft-adapter-llama"),
        &out,
        Rounding::Peft,
        DEFAULT_SHARD_SIZE,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn existing_output_is_not_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = merge(
        &fixture("tiny-llama"),
        &fixture("peft-adapter-llama"),
        &out,
        Rounding::Peft,
        DEFAULT_SHARD_SIZE,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("not an empty directory"), "{err}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
}
