//! Fast text-to-ids with the tokenizer's own parts: its added-token extraction, normalizer,
//! pre-tokenizer and model run exactly as `Tokenizer::encode` runs them, but the model's
//! result for each pre-tokenized word is memoized in a per-thread cache, and no `Encoding`
//! (token strings, offsets, masks) is built, since the stage only needs ids.
//!
//! The ids are those of `tokenizer.encode(text, false)`: with truncation and padding off and
//! no special tokens asked for, the post-processor does not change ids (the tests compare
//! the two). A model with randomness (BPE dropout) is never cached.

use std::cell::RefCell;

use ahash::AHashMap;
use thread_local::ThreadLocal;
use tokenizers::models::ModelWrapper;
use tokenizers::{Model, OffsetReferential, OffsetType, PreTokenizer, Tokenizer};

/// Words cached per thread before the cache is emptied (bounds memory to a few MB/thread).
const MAX_WORDS: usize = 1 << 18;

/// Word -> ids, for one thread.
type WordCache = AHashMap<String, Box<[u32]>>;

/// A tokenizer ready for [`Words::encode`]. The caches live as long as it does, so they are
/// freed when the stage ends.
#[derive(Debug)]
pub(crate) struct Words {
    tokenizer: Tokenizer,
    cacheable: bool,
    caches: ThreadLocal<RefCell<WordCache>>,
}

impl Words {
    /// Wraps `tokenizer` (its truncation and padding must be off).
    pub(crate) fn new(tokenizer: Tokenizer) -> Self {
        let cacheable = match tokenizer.get_model() {
            ModelWrapper::BPE(bpe) => bpe.dropout.is_none_or(|d| d <= 0.0),
            _ => true,
        };
        Words {
            tokenizer,
            cacheable,
            caches: ThreadLocal::new(),
        }
    }

    /// Appends the ids of `text` (no special tokens added) to `out`.
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) -> tokenizers::Result<()> {
        let tok = &self.tokenizer;
        let mut pretok = tok
            .get_added_vocabulary()
            .extract_and_normalize(tok.get_normalizer(), text);
        if let Some(pre) = tok.get_pre_tokenizer() {
            pre.pre_tokenize(&mut pretok)?;
        }
        let splits = pretok.get_splits(OffsetReferential::Original, OffsetType::None);
        let model = tok.get_model();
        if !self.cacheable {
            for (word, _, tokens) in splits {
                match tokens {
                    Some(tokens) => out.extend(tokens.iter().map(|t| t.id)),
                    None => out.extend(model.tokenize(word)?.iter().map(|t| t.id)),
                }
            }
            return Ok(());
        }
        let mut cache = self.caches.get_or_default().borrow_mut();
        if cache.len() >= MAX_WORDS {
            cache.clear();
        }
        for (word, _, tokens) in splits {
            if let Some(tokens) = tokens {
                out.extend(tokens.iter().map(|t| t.id));
            } else if let Some(ids) = cache.get(word) {
                out.extend_from_slice(ids);
            } else {
                let ids: Box<[u32]> = model.tokenize(word)?.iter().map(|t| t.id).collect();
                out.extend_from_slice(&ids);
                cache.insert(word.to_string(), ids);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> Tokenizer {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama");
        Tokenizer::from_file(dir.join("tokenizer.json")).unwrap()
    }

    #[test]
    fn ids_equal_tokenizer_encode() {
        let words = Words::new(fixture());
        let reference = fixture();
        let texts = [
            "Permission is hereby granted, free of charge, to any person",
            "  leading and trailing spaces  ",
            "tabs\tand\nnewlines\r\n and  double  spaces",
            "special tokens inline: <s>hello</s> and <pad>",
            "unicode: naïve café — 😀 日本語 العربية",
            "numbers 3.14159 and 1,000,000 and 42nd",
            "",
            " ",
        ];
        // Twice, so the second pass is served from the cache.
        for _ in 0..2 {
            for text in texts {
                let mut got = Vec::new();
                words.encode(text, &mut got).unwrap();
                let want = reference.encode(text, false).unwrap().get_ids().to_vec();
                assert_eq!(got, want, "{text:?}");
            }
        }
    }

    #[test]
    fn two_tokenizers_on_one_thread_do_not_share_a_cache() {
        let a = Words::new(fixture());
        let mut json: serde_json::Value =
            serde_json::from_str(&fixture().to_string(false).unwrap()).unwrap();
        // Another vocabulary: swap the ids of two ordinary tokens.
        let vocab = json["model"]["vocab"].as_object_mut().unwrap();
        let (x, y) = (vocab["a"].clone(), vocab["b"].clone());
        vocab.insert("a".into(), y);
        vocab.insert("b".into(), x);
        let b = Words::new(Tokenizer::from_bytes(serde_json::to_vec(&json).unwrap()).unwrap());
        let (mut ids_a, mut ids_b) = (Vec::new(), Vec::new());
        a.encode("a", &mut ids_a).unwrap();
        b.encode("a", &mut ids_b).unwrap();
        assert_ne!(ids_a, ids_b);
    }
}
