//! Choosing the next token from a logits vector: greedy, temperature, top-k, top-p and a
//! repetition penalty, with a seeded RNG so that a seed always gives the same tokens.
//!
//! The order is that of transformers' logits processors: repetition penalty, then
//! temperature, then top-k, then top-p (over the probabilities renormalised after top-k),
//! then one draw. Temperature 0 is greedy decoding. Ties between equal logits go to the
//! lower token id everywhere, so top-k 1 is exactly greedy.

use std::cmp::Ordering;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick tokens. The default is greedy decoding.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingConfig {
    /// Divides the logits; 0 means greedy (argmax).
    pub temperature: f64,
    /// Keep only the `k` most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose mass reaches `p` (`None` or 1:
    /// all).
    pub top_p: Option<f64>,
    /// transformers' repetition penalty: a logit of a token already in the sequence is
    /// divided by it when positive and multiplied by it when negative. 1 = off.
    pub repetition_penalty: f64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
        }
    }
}

impl SamplingConfig {
    /// Checks the ranges; the message names the setting.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be 0 (greedy) or positive, got {}",
                self.temperature
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(format!(
                "repetition_penalty must be positive, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }

    /// Whether this picks the argmax (temperature 0 or top-k 1).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }
}

/// A [`SamplingConfig`] with its RNG.
#[derive(Clone, Debug)]
pub struct Sampler {
    cfg: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    /// A sampler whose draws depend only on `seed` (and the logits it is given).
    pub fn new(cfg: SamplingConfig, seed: u64) -> Self {
        Self {
            cfg,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    pub fn config(&self) -> &SamplingConfig {
        &self.cfg
    }

    /// The next token for `logits` (one per vocabulary entry) after the tokens in
    /// `history` (prompt and generated so far; used by the repetition penalty). Modifies
    /// `logits` in place.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        apply_repetition_penalty(logits, history, self.cfg.repetition_penalty as f32);
        if self.cfg.is_greedy() {
            return argmax(logits);
        }
        let dist = distribution(logits, &self.cfg);
        draw(&dist, self.rng.random::<f64>())
    }
}

/// The index of the largest logit; the first one on ties; NaNs never win. 0 for an
/// empty or all-NaN vector.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v || (!found && v == best_v) {
            best = i;
            best_v = v;
            found = true;
        }
    }
    best as u32
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: each distinct token of `history`
/// has its logit divided by `penalty` if positive, multiplied by it otherwise.
pub fn apply_repetition_penalty(logits: &mut [f32], history: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in history {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            let v = logits[t];
            logits[t] = if v < 0.0 { v * penalty } else { v / penalty };
        }
    }
}

/// The sampling distribution after temperature, top-k and top-p: `(token, probability)`,
/// probabilities summing to 1. When top-k or top-p cut it, the entries are sorted by
/// decreasing logit (lower id first on ties); otherwise they are in id order (sorting a
/// whole vocabulary would change nothing but the cost). Expects a positive temperature.
pub fn distribution(logits: &[f32], cfg: &SamplingConfig) -> Vec<(u32, f64)> {
    let t = if cfg.temperature > 0.0 {
        cfg.temperature
    } else {
        1.0
    };
    let mut cand: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .filter(|(_, v)| !v.is_nan() && **v != f32::NEG_INFINITY)
        .map(|(i, &v)| (i as u32, v))
        .collect();
    if cand.is_empty() {
        return vec![(argmax(logits), 1.0)];
    }
    let order = |a: &(u32, f32), b: &(u32, f32)| {
        b.1.partial_cmp(&a.1)
            .unwrap_or(Ordering::Equal)
            .then(a.0.cmp(&b.0))
    };
    let cut_k = matches!(cfg.top_k, Some(k) if k > 0 && k < cand.len());
    if let Some(k) = cfg.top_k.filter(|_| cut_k) {
        cand.select_nth_unstable_by(k - 1, order);
        cand.truncate(k);
        cand.sort_unstable_by(order);
    }
    let max = cand.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max) as f64;
    let weight = |v: f32| ((v as f64 - max) / t).exp();
    if let Some(p) = cfg.top_p.filter(|&p| p < 1.0) {
        let total: f64 = cand.iter().map(|c| weight(c.1)).sum();
        // Sort a growing head until its mass reaches p: top-p usually keeps few tokens,
        // so this costs a few linear passes instead of sorting the vocabulary.
        let mut k = cand.len().min(64);
        loop {
            if !cut_k {
                if k < cand.len() {
                    cand.select_nth_unstable_by(k - 1, order);
                }
                cand[..k].sort_unstable_by(order);
            }
            let head: Vec<(u32, f64)> = cand[..k]
                .iter()
                .map(|c| (c.0, weight(c.1) / total))
                .collect();
            if let Some(keep) = reach(&head, p) {
                cand.truncate(keep);
                break;
            }
            if k == cand.len() {
                break;
            }
            k = (k * 4).min(cand.len());
        }
    }
    let mut dist: Vec<(u32, f64)> = cand.iter().map(|&(i, v)| (i, weight(v))).collect();
    normalise(&mut dist);
    dist
}

/// How many leading entries of `sorted` (probabilities in decreasing order, summing to 1)
/// top-p keeps: the smallest prefix whose mass reaches `p`, at least one.
pub fn top_p_count(sorted: &[(u32, f64)], p: f64) -> usize {
    reach(sorted, p).unwrap_or(sorted.len()).max(1)
}

/// The length of the shortest prefix whose mass reaches `p`, if one does.
fn reach(sorted: &[(u32, f64)], p: f64) -> Option<usize> {
    let mut mass = 0.0;
    for (n, (_, prob)) in sorted.iter().enumerate() {
        mass += prob;
        if mass >= p {
            return Some(n + 1);
        }
    }
    None
}

/// The token whose cumulative-probability interval holds `u` in `[0, 1)`.
pub fn draw(dist: &[(u32, f64)], u: f64) -> u32 {
    let total: f64 = dist.iter().map(|(_, p)| p).sum();
    let target = u * total;
    let mut acc = 0.0;
    for &(tok, p) in dist {
        acc += p;
        if target < acc {
            return tok;
        }
    }
    dist.last().map(|d| d.0).unwrap_or(0)
}

fn normalise(dist: &mut [(u32, f64)]) {
    let sum: f64 = dist.iter().map(|(_, p)| p).sum();
    if sum > 0.0 {
        for (_, p) in dist.iter_mut() {
            *p /= sum;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-5.0f32..5.0)).collect()
    }

    fn cfg(temperature: f64, top_k: Option<usize>, top_p: Option<f64>) -> SamplingConfig {
        SamplingConfig {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
        }
    }

    fn run(cfg: SamplingConfig, seed: u64, logits: &[f32], n: usize) -> Vec<u32> {
        let mut s = Sampler::new(cfg, seed);
        (0..n)
            .map(|_| s.sample(&mut logits.to_vec(), &[]))
            .collect()
    }

    #[test]
    fn argmax_takes_the_first_maximum_and_skips_nan() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, 2.0]), 1);
        assert_eq!(argmax(&[f32::NAN, -1.0, -2.0]), 1);
        assert_eq!(argmax(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
    }

    #[test]
    fn a_seed_gives_the_same_tokens_and_another_seed_other_ones() {
        let logits = random_logits(1000, 3);
        let c = cfg(1.0, Some(50), Some(0.9));
        let a = run(c.clone(), 7, &logits, 64);
        assert_eq!(a, run(c.clone(), 7, &logits, 64));
        assert_ne!(a, run(c, 8, &logits, 64));
    }

    #[test]
    fn top_k_one_and_temperature_zero_are_greedy() {
        for seed in 0..20 {
            let logits = random_logits(500, seed);
            let greedy = argmax(&logits);
            assert_eq!(
                run(cfg(0.8, Some(1), None), seed, &logits, 5),
                vec![greedy; 5]
            );
            assert_eq!(
                run(cfg(0.0, None, Some(0.5)), seed, &logits, 5),
                vec![greedy; 5]
            );
        }
        // Ties: the lower id, as argmax.
        let tied = [0.5, 2.0, 2.0, 1.0];
        assert_eq!(run(cfg(1.0, Some(1), None), 0, &tied, 3), vec![1; 3]);
        assert_eq!(
            distribution(&tied, &cfg(1.0, Some(1), None)),
            vec![(1, 1.0)]
        );
    }

    #[test]
    fn top_p_keeps_the_smallest_set_that_reaches_p() {
        // Probabilities 1/8, 1/2, 1/4, 1/8 (exact in binary).
        let probs = [0.125f64, 0.5, 0.25, 0.125];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        let kept = |p: f64| -> Vec<u32> {
            distribution(&logits, &cfg(1.0, None, Some(p)))
                .iter()
                .map(|d| d.0)
                .collect()
        };
        // (Away from the exact boundaries: these probabilities went through ln and exp.)
        assert_eq!(kept(0.4), [1]);
        assert_eq!(kept(0.49), [1]);
        assert_eq!(kept(0.51), [1, 2]);
        assert_eq!(kept(0.74), [1, 2]);
        assert_eq!(kept(0.76), [1, 2, 0]);
        assert_eq!(kept(0.87), [1, 2, 0]);
        assert_eq!(kept(0.99), [1, 2, 0, 3]);
        // No cut: id order.
        assert_eq!(kept(1.0), [0, 1, 2, 3]);
        // Directly on sorted probabilities, and renormalised after the cut.
        let sorted = [(1, 0.5), (2, 0.25), (0, 0.125), (3, 0.125)];
        assert_eq!(top_p_count(&sorted, 0.5), 1);
        assert_eq!(top_p_count(&sorted, 0.75), 2);
        assert_eq!(top_p_count(&sorted, 0.7500001), 3);
        let d = distribution(&logits, &cfg(1.0, None, Some(0.75)));
        assert!((d[0].1 - 2.0 / 3.0).abs() < 1e-6 && (d[1].1 - 1.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn top_p_on_a_large_vocabulary_equals_sorting_everything() {
        for (seed, scale) in [(1u64, 1.0f32), (2, 0.05), (3, 8.0)] {
            let logits: Vec<f32> = random_logits(5000, seed)
                .iter()
                .map(|v| v * scale)
                .collect();
            for p in [0.3, 0.9, 0.99, 0.9999] {
                let got: Vec<u32> = distribution(&logits, &cfg(0.8, None, Some(p)))
                    .iter()
                    .map(|d| d.0)
                    .collect();
                let mut all: Vec<(u32, f32)> = logits
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| (i as u32, v))
                    .collect();
                all.sort_by(|a, b| b.1.partial_cmp(&a.1).unwrap().then(a.0.cmp(&b.0)));
                let w: Vec<f64> = all
                    .iter()
                    .map(|c| ((c.1 as f64 - all[0].1 as f64) / 0.8).exp())
                    .collect();
                let z: f64 = w.iter().sum();
                let sorted: Vec<(u32, f64)> =
                    all.iter().zip(&w).map(|(c, w)| (c.0, w / z)).collect();
                let want: Vec<u32> = sorted[..top_p_count(&sorted, p)]
                    .iter()
                    .map(|d| d.0)
                    .collect();
                assert_eq!(got, want, "seed {seed} scale {scale} p {p}");
            }
        }
    }

    #[test]
    fn top_k_then_top_p_uses_the_renormalised_mass() {
        let probs = [0.4f64, 0.3, 0.2, 0.1];
        let logits: Vec<f32> = probs.iter().map(|p| p.ln() as f32).collect();
        // After top-2: 4/7, 3/7. p = 0.5 keeps one.
        let d = distribution(&logits, &cfg(1.0, Some(2), Some(0.5)));
        assert_eq!(d, vec![(0, 1.0)]);
        let d = distribution(&logits, &cfg(1.0, Some(2), Some(0.6)));
        assert_eq!(d.iter().map(|x| x.0).collect::<Vec<_>>(), [0, 1]);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let logits = [0.0f32, 1.0];
        // Without a cut the entries stay in id order.
        let p = |t| distribution(&logits, &cfg(t, None, None))[0].1;
        let e = std::f64::consts::E;
        assert!((p(1.0) - 1.0 / (1.0 + e)).abs() < 1e-9);
        assert!(p(0.5) < p(1.0) && p(2.0) > p(1.0));
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        let mut logits = [2.0f32, -1.0, 0.5, 3.0];
        apply_repetition_penalty(&mut logits, &[0, 1, 1, 9], 2.0);
        assert_eq!(logits, [1.0, -2.0, 0.5, 3.0]);
        // It changes the greedy choice when the leader was already said.
        let mut logits = [2.0f32, 1.5];
        let mut s = Sampler::new(
            SamplingConfig {
                repetition_penalty: 1.5,
                ..SamplingConfig::default()
            },
            0,
        );
        assert_eq!(s.sample(&mut logits, &[0]), 1);
    }

    #[test]
    fn draws_follow_the_distribution() {
        let dist = [(4, 0.25), (9, 0.75)];
        assert_eq!(draw(&dist, 0.0), 4);
        assert_eq!(draw(&dist, 0.2499), 4);
        assert_eq!(draw(&dist, 0.25), 9);
        assert_eq!(draw(&dist, 0.9999), 9);
        // Empirically: about 75 % of 4000 seeded draws are token 9.
        let logits = [0.0f32, 3f32.ln()];
        let toks = run(cfg(1.0, None, None), 11, &logits, 4000);
        let ones = toks.iter().filter(|&&t| t == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }

    #[test]
    fn bad_settings_are_named() {
        assert!(cfg(-1.0, None, None)
            .validate()
            .unwrap_err()
            .contains("temperature"));
        assert!(cfg(1.0, None, Some(0.0))
            .validate()
            .unwrap_err()
            .contains("top_p"));
        let c = SamplingConfig {
            repetition_penalty: 0.0,
            ..SamplingConfig::default()
        };
        assert!(c.validate().unwrap_err().contains("repetition_penalty"));
    }
}
