//! Line charts as inline SVG, written by hand.
//!
//! Why not a plotting crate (`plotters`): a chart here is a few polylines, two axes and a
//! legend. Writing the SVG ourselves keeps the output byte-for-byte deterministic (the
//! same ledger gives the same file, so reports diff cleanly), tiny (no embedded fonts or
//! styles), free of a dependency tree, and lets every curve carry the attributes the
//! browser test counts: each `<polyline>` has `data-metric`, `data-stage` and
//! `data-points`, and exactly one point per logged step.

use super::html::escape;
use std::fmt::Write;

/// Colours of successive curves in one chart.
const PALETTE: &[&str] = &["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];

const W: f64 = 560.0;
const H: f64 = 250.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 14.0;
const BOTTOM: f64 = 50.0;

/// One curve: stage, metric name and `(step, value)` points.
pub struct Curve<'a> {
    /// Stage that logged it.
    pub stage: &'a str,
    /// Metric name.
    pub metric: &'a str,
    /// Points, sorted by step.
    pub points: &'a [(i64, f64)],
}

/// A number for an axis label or a table: short, and the same on every machine.
pub fn number(v: f64) -> String {
    if !v.is_finite() {
        return v.to_string();
    }
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e6).contains(&a) {
        format!("{v:.3e}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    }
}

/// An SVG line chart of `curves` with the title `title`. Non-finite values are drawn at
/// the edge of the plot so that each curve keeps one point per step.
pub fn line_chart(title: &str, curves: &[Curve<'_>]) -> String {
    let finite = || {
        curves
            .iter()
            .flat_map(|c| c.points.iter())
            .filter(|p| p.1.is_finite())
    };
    let (mut x0, mut x1) = (i64::MAX, i64::MIN);
    for c in curves {
        for p in c.points {
            x0 = x0.min(p.0);
            x1 = x1.max(p.0);
        }
    }
    if x0 > x1 {
        (x0, x1) = (0, 1);
    }
    if x0 == x1 {
        x1 = x0 + 1;
    }
    let (mut y0, mut y1) = finite().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), p| {
        (lo.min(p.1), hi.max(p.1))
    });
    if y0 > y1 {
        (y0, y1) = (0.0, 1.0);
    }
    if y1 - y0 < 1e-12 {
        let pad = if y0.abs() > 0.0 { y0.abs() * 0.1 } else { 1.0 };
        (y0, y1) = (y0 - pad, y1 + pad);
    } else {
        let pad = (y1 - y0) * 0.05;
        (y0, y1) = (y0 - pad, y1 + pad);
    }
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: i64| LEFT + (x - x0) as f64 / (x1 - x0) as f64 * pw;
    let sy = |y: f64| {
        let y = if y.is_finite() { y.clamp(y0, y1) } else { y1 };
        TOP + (1.0 - (y - y0) / (y1 - y0)) * ph
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" aria-label="{t}"><title>{t}</title>"#,
        t = escape(title)
    );
    let _ = write!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#fff" stroke="#999"/>"##
    );
    for i in 0..=4 {
        let v = y0 + (y1 - y0) * i as f64 / 4.0;
        let y = sy(v);
        let _ = write!(
            s,
            r##"<line x1="{LEFT}" x2="{x2}" y1="{y:.1}" y2="{y:.1}" stroke="#eee"/><text x="{tx}" y="{ty:.1}" text-anchor="end" font-size="11">{label}</text>"##,
            x2 = LEFT + pw,
            tx = LEFT - 4.0,
            ty = y + 4.0,
            label = escape(&number(v)),
        );
    }
    for (x, anchor) in [(x0, "start"), (x1, "end")] {
        let _ = write!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="{anchor}" font-size="11">{x}</text>"#,
            sx(x),
            TOP + ph + 14.0,
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="11">step</text>"#,
        LEFT + pw / 2.0,
        TOP + ph + 14.0
    );
    for (i, c) in curves.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let pts: Vec<String> = c
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = write!(
            s,
            r#"<polyline class="curve" data-stage="{st}" data-metric="{m}" data-points="{n}" fill="none" stroke="{colour}" stroke-width="1.5" points="{p}"/>"#,
            st = escape(c.stage),
            m = escape(c.metric),
            n = c.points.len(),
            p = pts.join(" "),
        );
        if c.points.len() == 1 {
            let (x, y) = c.points[0];
            let _ = write!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                sx(x),
                sy(y)
            );
        }
        let ly = H - 16.0;
        let lx = LEFT + i as f64 * 150.0;
        let _ = write!(
            s,
            r#"<line x1="{lx}" x2="{:.1}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{:.1}" y="{:.1}" font-size="11">{}</text>"#,
            lx + 18.0,
            lx + 22.0,
            ly + 4.0,
            escape(c.metric)
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_point_per_step_and_escaped_names() {
        let pts = [(1, 2.0), (2, 1.5), (3, f64::NAN)];
        let svg = line_chart(
            "a<b",
            &[Curve {
                stage: "s\"x",
                metric: "train/loss",
                points: &pts,
            }],
        );
        let poly = svg.split("<polyline").nth(1).unwrap();
        let points = poly
            .split(" points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(points.split(' ').count(), 3);
        assert!(svg.contains(r#"data-points="3""#));
        assert!(svg.contains("a&lt;b"));
        assert!(svg.contains("s&quot;x"));
        assert_eq!(
            svg,
            line_chart(
                "a<b",
                &[Curve {
                    stage: "s\"x",
                    metric: "train/loss",
                    points: &pts
                }]
            )
        );
    }

    #[test]
    fn flat_and_empty_curves_do_not_divide_by_zero() {
        let svg = line_chart(
            "flat",
            &[Curve {
                stage: "t",
                metric: "m",
                points: &[(5, 1.0)],
            }],
        );
        assert!(!svg.contains("NaN") && !svg.contains("inf"));
        let svg = line_chart("none", &[]);
        assert!(svg.starts_with("<svg"));
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(number(2.5), "2.5");
        assert_eq!(number(0.0002), "2.000e-4");
        assert_eq!(number(1234.56), "1234.6");
        assert_eq!(number(0.0), "0");
    }
}
