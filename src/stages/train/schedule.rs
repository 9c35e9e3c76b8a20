//! The learning rate at each optimizer step: linear warmup, then cosine, linear or
//! constant decay towards `min_lr_ratio · lr`.
//!
//! Step `s` is 0-based (the `s+1`-th update). Warmup gives `lr · (s+1) / warmup_steps`
//! for `s < warmup_steps`, so the first update is not wasted at lr 0. After it, with
//! progress `p = (s - warmup) / max(1, total - warmup)` in `[0, 1)`:
//! cosine `min + (1 - min) · (1 + cos(π p)) / 2`, linear `min + (1 - min) · (1 - p)`,
//! constant `1`, all times `lr`. A pure function of the step, so resuming needs only it.

use super::config::{Decay, ScheduleSection};

/// The learning rate of step `step` (0-based) of `total` steps.
pub fn lr_at(base_lr: f64, s: &ScheduleSection, step: u64, total: u64) -> f64 {
    if step < s.warmup_steps {
        return base_lr * (step + 1) as f64 / s.warmup_steps as f64;
    }
    let span = total.saturating_sub(s.warmup_steps).max(1) as f64;
    let p = ((step - s.warmup_steps) as f64 / span).min(1.0);
    let min = s.min_lr_ratio;
    let factor = match s.decay {
        Decay::Cosine => min + (1.0 - min) * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
        Decay::Linear => min + (1.0 - min) * (1.0 - p),
        Decay::Constant => 1.0,
    };
    base_lr * factor
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(warmup_steps: u64, decay: Decay, min_lr_ratio: f64) -> ScheduleSection {
        ScheduleSection {
            warmup_steps,
            decay,
            min_lr_ratio,
        }
    }

    #[test]
    fn warmup_then_cosine_to_the_floor() {
        let s = sched(4, Decay::Cosine, 0.1);
        let lrs: Vec<f64> = (0..14).map(|i| lr_at(1.0, &s, i, 14)).collect();
        assert_eq!(&lrs[..4], &[0.25, 0.5, 0.75, 1.0]);
        assert_eq!(lrs[4], 1.0, "decay starts at the peak");
        let half = lr_at(1.0, &s, 9, 14);
        assert!((half - 0.55).abs() < 1e-12, "midpoint {half}");
        assert!(lrs.windows(2).skip(4).all(|w| w[1] < w[0]));
        assert!(lrs[13] > 0.1 && lrs[13] < 0.15);
    }

    #[test]
    fn linear_and_constant() {
        let s = sched(0, Decay::Linear, 0.0);
        assert_eq!(lr_at(2.0, &s, 0, 4), 2.0);
        assert_eq!(lr_at(2.0, &s, 2, 4), 1.0);
        let s = sched(2, Decay::Constant, 0.0);
        assert_eq!(lr_at(2.0, &s, 0, 4), 1.0);
        assert_eq!(lr_at(2.0, &s, 3, 4), 2.0);
    }
}
