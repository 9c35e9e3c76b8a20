//! Shared helpers for the `tokenize_*` integration tests: a temporary workspace with the
//! tiny-llama tokenizer copied in, config parsing, and runs on a chosen number of threads.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use taper::stages::tokenize::{self, Summary, TokenizeConfig, TokenizeError};

/// The fixture tokenizer folder.
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

/// The fixture tokenizer, loaded with the `tokenizers` crate directly.
pub fn reference_tokenizer() -> tokenizers::Tokenizer {
    tokenizers::Tokenizer::from_file(fixture_dir().join("tokenizer.json")).unwrap()
}

/// Ids of `text` as the `tokenizers` crate gives them, without special tokens.
pub fn ids(tok: &tokenizers::Tokenizer, text: &str) -> Vec<u32> {
    tok.encode(text, false).unwrap().get_ids().to_vec()
}

/// A temporary workspace: `tok/tokenizer.json` (+ `tokenizer_config.json`) from tiny-llama.
pub struct Workspace {
    pub dir: tempfile::TempDir,
}

impl Workspace {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("tok")).unwrap();
        for name in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture_dir().join(name), dir.path().join("tok").join(name)).unwrap();
        }
        Workspace { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `content` to `rel` (creating folders).
    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) {
        let path = self.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }

    /// Runs the stage into `out` (relative) on a pool of `threads` threads.
    pub fn run_in(&self, yaml: &str, out: &str, threads: usize) -> Result<Summary, TokenizeError> {
        let cfg = config(yaml);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let cancel = AtomicBool::new(false);
        let out = self.path().join(out);
        pool.install(|| tokenize::run(&cfg, self.path(), &out, &|_| {}, &cancel))
    }

    /// Runs the stage into `out/` on 2 threads.
    pub fn run(&self, yaml: &str) -> Result<Summary, TokenizeError> {
        self.run_in(yaml, "out", 2)
    }

    /// All rows of a split of `out/`.
    pub fn rows(&self, split: &str) -> Vec<tokenize::Row> {
        tokenize::read_shards(&self.path().join("out").join(split)).unwrap()
    }

    /// (row, example_id) of every shard of a split of `out_dir`.
    pub fn rows_with_ids(&self, out: &str, split: &str) -> Vec<(tokenize::Row, u64)> {
        let dir = self.path().join(out).join(split);
        let mut all = Vec::new();
        for path in tokenize::shard_paths(&dir).unwrap() {
            all.extend(tokenize::read_shard(&path).unwrap());
        }
        all
    }
}

/// Parses a `with:` block.
pub fn config(yaml: &str) -> TokenizeConfig {
    serde_saphyr::from_str(yaml).unwrap()
}
