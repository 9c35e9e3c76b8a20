//! The train/valid split: a pure function of the seed and the example's content, so it is
//! deterministic, independent of thread count and record order, and stable when the data
//! grows (adding records never moves an existing record to the other split). Exact
//! duplicates always land in the same split, so they cannot leak from train into valid.
//!
//! The rule: `h = blake3("taper.split.v1" ‖ seed as u64 LE ‖ kind ‖ parts)`, where `kind` is
//! one byte (0 text, 1 prompt/completion, 2 chat) and `parts` are the text, or the prompt
//! and completion, or each message's role and content, each as its length (u64 LE) then its
//! UTF-8 bytes. The example goes to `valid` when the first 8 bytes of `h`, read as a
//! little-endian u64, are below `valid × 2^64`.

use super::config::SplitConfig;
use super::record::Content;

/// Decides the split of each example.
#[derive(Debug, Clone)]
pub(crate) struct Splitter {
    seed: u64,
    threshold: u64,
}

impl Splitter {
    pub(crate) fn new(cfg: &SplitConfig) -> Self {
        // `valid` is in [0, 1) after validation; the float-to-int cast saturates anyway.
        let threshold = (cfg.valid * 18_446_744_073_709_551_616.0) as u64;
        Splitter {
            seed: cfg.seed,
            threshold,
        }
    }

    /// Whether `content` belongs to the validation split.
    pub(crate) fn is_valid(&self, content: &Content) -> bool {
        if self.threshold == 0 {
            return false;
        }
        let mut h = blake3::Hasher::new();
        h.update(b"taper.split.v1");
        h.update(&self.seed.to_le_bytes());
        let mut part = |bytes: &[u8]| {
            h.update(&(bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        match content {
            Content::Text(text) => {
                part(&[0]);
                part(text.as_bytes());
            }
            Content::PromptCompletion { prompt, completion } => {
                part(&[1]);
                part(prompt.as_bytes());
                part(completion.as_bytes());
            }
            Content::Chat(messages) => {
                part(&[2]);
                for m in messages {
                    part(m.role.as_str().as_bytes());
                    part(m.content.as_bytes());
                }
            }
        }
        let hash = h.finalize();
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash.as_bytes()[..8]);
        u64::from_le_bytes(first) < self.threshold
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(i: usize) -> Content {
        Content::Text(format!("example number {i}"))
    }

    #[test]
    fn fraction_is_close_and_seed_matters() {
        let s = Splitter::new(&SplitConfig {
            valid: 0.1,
            seed: 7,
        });
        let n = (0..10_000).filter(|i| s.is_valid(&text(*i))).count();
        assert!((800..1200).contains(&n), "{n} of 10000 in valid");
        let other = Splitter::new(&SplitConfig {
            valid: 0.1,
            seed: 8,
        });
        let differ = (0..1000)
            .filter(|i| s.is_valid(&text(*i)) != other.is_valid(&text(*i)))
            .count();
        assert!(differ > 0);
    }

    #[test]
    fn zero_means_no_valid() {
        let s = Splitter::new(&SplitConfig {
            valid: 0.0,
            seed: 1,
        });
        assert!((0..1000).all(|i| !s.is_valid(&text(i))));
    }

    #[test]
    fn pinned_values() {
        // Pins the hash rule: changing it would move examples between splits.
        let s = Splitter::new(&SplitConfig {
            valid: 0.5,
            seed: 7,
        });
        let got: Vec<bool> = (0..16).map(|i| s.is_valid(&text(i))).collect();
        assert_eq!(got, PINNED);
    }

    const PINNED: [bool; 16] = [
        true, true, true, false, true, false, false, true, true, false, true, false, true, true,
        false, true,
    ];
}
