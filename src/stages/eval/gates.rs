//! Gates: bounds on the eval metrics. A failed gate fails the stage with a message that
//! names the metric, its value and the bound (`perplexity 52.1 > max 40`).

use serde::Serialize;

use super::config::{Bound, GatesConfig};

/// The metrics gates can test, by gate name.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Metrics {
    pub eval_loss: f64,
    pub perplexity: f64,
    pub base_loss: Option<f64>,
    pub base_perplexity: Option<f64>,
    pub improvement_over_base: Option<f64>,
}

impl Metrics {
    /// The value of gate metric `name`, if it was computed.
    pub fn get(&self, name: &str) -> Option<f64> {
        match name {
            "eval_loss" => Some(self.eval_loss),
            "perplexity" => Some(self.perplexity),
            "base_loss" => self.base_loss,
            "base_perplexity" => self.base_perplexity,
            "improvement_over_base" => self.improvement_over_base,
            _ => None,
        }
    }
}

/// One gate's outcome, as the report records it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct GateResult {
    pub metric: String,
    pub value: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub passed: bool,
    /// Why it failed; `None` when it passed.
    pub message: Option<String>,
}

/// Checks every gate of `gates` against `metrics`, in the order of [`GatesConfig::list`].
pub fn check(gates: &GatesConfig, metrics: &Metrics) -> Vec<GateResult> {
    gates
        .list()
        .into_iter()
        .map(|(name, bound)| check_one(name, bound, metrics.get(name)))
        .collect()
}

fn check_one(name: &str, bound: Bound, value: Option<f64>) -> GateResult {
    let message = match value {
        None => Some(format!("{name} was not computed")),
        Some(v) if v.is_nan() => Some(format!("{name} is NaN")),
        Some(v) => match (bound.min, bound.max) {
            (Some(lo), _) if v < lo => Some(format!("{name} {} < min {}", num(v), num(lo))),
            (_, Some(hi)) if v > hi => Some(format!("{name} {} > max {}", num(v), num(hi))),
            _ => None,
        },
    };
    GateResult {
        metric: name.to_string(),
        value,
        min: bound.min,
        max: bound.max,
        passed: message.is_none(),
        message,
    }
}

/// A value for a message: 4 decimals, trailing zeros dropped (`52.1`, `40`, `0.0531`).
/// Small values keep four significant digits.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let decimals = if v != 0.0 && v.abs() < 1e-3 {
        (3 - v.abs().log10().floor() as i32).clamp(4, 17) as usize
    } else {
        4
    };
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gates() -> GatesConfig {
        GatesConfig {
            perplexity: Some(Bound {
                min: None,
                max: Some(40.0),
            }),
            improvement_over_base: Some(Bound {
                min: Some(0.05),
                max: None,
            }),
            ..GatesConfig::default()
        }
    }

    #[test]
    fn a_failed_gate_names_metric_value_and_bound() {
        let m = Metrics {
            eval_loss: 52.1f64.ln(),
            perplexity: 52.1,
            base_loss: Some(4.0),
            base_perplexity: Some(4f64.exp()),
            improvement_over_base: Some(0.0123),
        };
        let r = check(&gates(), &m);
        assert_eq!(
            r[0].message.as_deref(),
            Some("perplexity 52.1 > max 40"),
            "{r:?}"
        );
        assert_eq!(
            r[1].message.as_deref(),
            Some("improvement_over_base 0.0123 < min 0.05")
        );
        assert!(!r[0].passed && !r[1].passed);
    }

    #[test]
    fn bounds_are_inclusive_and_missing_values_fail() {
        let m = Metrics {
            perplexity: 40.0,
            improvement_over_base: None,
            ..Metrics::default()
        };
        let r = check(&gates(), &m);
        assert!(r[0].passed);
        assert_eq!(
            r[1].message.as_deref(),
            Some("improvement_over_base was not computed")
        );
    }

    #[test]
    fn numbers_print_short() {
        assert_eq!(num(40.0), "40");
        assert_eq!(num(6.251793), "6.2518");
        assert_eq!(num(0.000012344), "0.00001234");
        assert_eq!(num(-0.5), "-0.5");
    }
}
