//! Stage fingerprints: blake3 over the kind, its implementation version, the resolved
//! configuration and the content hashes of the inputs.

use crate::spec::Stage;
use crate::state::FileHash;

/// Hash of what the stage is asked to do: kind, kind version, resolved `with:`, and the
/// declared input and output paths. Key order in `with:` does not matter.
pub fn config_hash(stage: &Stage, kind_version: u32) -> String {
    let doc = serde_json::json!({
        "kind": stage.kind.name,
        "kind_version": kind_version,
        "with": canonical(&stage.with.to_json()),
        "inputs": stage.inputs.iter().map(|i| &i.path).collect::<Vec<_>>(),
        "outputs": stage.outputs.iter().map(|o| &o.path).collect::<Vec<_>>(),
    });
    let mut h = blake3::Hasher::new();
    h.update(b"taper-config-v1\0");
    h.update(canonical(&doc).to_string().as_bytes());
    h.finalize().to_hex().to_string()
}

/// The stage fingerprint: config hash plus input content hashes (in declared order).
pub fn fingerprint(config_hash: &str, inputs: &[FileHash]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"taper-fingerprint-v1\0");
    h.update(config_hash.as_bytes());
    for i in inputs {
        h.update(b"\0");
        h.update(i.path.as_bytes());
        h.update(b"\0");
        h.update(i.hash.as_bytes());
    }
    h.finalize().to_hex().to_string()
}

/// JSON with object keys sorted at every level.
pub fn canonical(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        J::Object(m) => {
            let mut entries: Vec<_> = m.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            J::Object(
                entries
                    .into_iter()
                    .map(|(k, v)| (k.clone(), canonical(v)))
                    .collect(),
            )
        }
        J::Array(a) => J::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}
