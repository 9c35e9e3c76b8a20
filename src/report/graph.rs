//! The stage graph as inline SVG: a layered layout (a stage's column is one more than
//! the deepest stage it needs), one box per stage coloured by its status, with its
//! duration, and an edge from each stage to each stage that needs it.

use super::chart::number;
use super::collect::{Graph, StageInfo};
use super::html::escape;
use std::fmt::Write;

const BOX_W: f64 = 180.0;
const BOX_H: f64 = 46.0;
const GAP_X: f64 = 50.0;
const GAP_Y: f64 = 16.0;
const PAD: f64 = 10.0;

/// The fill colour for a stage status.
pub fn status_colour(status: &str) -> &'static str {
    match status {
        "success" => "#c8e6c9",
        "skipped" => "#e0e0e0",
        "failed" | "timed_out" => "#ffcdd2",
        "interrupted" => "#ffe0b2",
        "running" => "#bbdefb",
        _ => "#f5f5f5",
    }
}

/// Column of each node: 0 for stages that need nothing, else 1 + the deepest need.
/// Robust to cycles (which a valid pipeline never has): depth is capped by node count.
pub fn layers(g: &Graph) -> Vec<usize> {
    let n = g.nodes.len();
    let mut layer = vec![0usize; n];
    for _ in 0..n {
        let mut changed = false;
        for i in 0..n {
            let want = g.deps[i]
                .iter()
                .filter(|&&d| d < n)
                .map(|&d| layer[d] + 1)
                .max()
                .unwrap_or(0)
                .min(n);
            if want != layer[i] {
                layer[i] = want;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    layer
}

fn short(name: &str, max: usize) -> String {
    if name.chars().count() <= max {
        name.to_string()
    } else {
        let mut s: String = name.chars().take(max - 1).collect();
        s.push('…');
        s
    }
}

/// Human duration.
pub fn duration(secs: Option<f64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s < 60.0 => format!("{}s", number((s * 100.0).round() / 100.0)),
        Some(s) if s < 3600.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        Some(s) => format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        ),
    }
}

/// The graph of `stages` (in `g`'s node order) as SVG.
pub fn dag_svg(g: &Graph, stages: &[StageInfo]) -> String {
    let layer = layers(g);
    let columns = layer.iter().max().map(|m| m + 1).unwrap_or(0);
    let mut row = vec![0usize; g.nodes.len()];
    let mut per_col = vec![0usize; columns];
    for (i, &l) in layer.iter().enumerate() {
        row[i] = per_col[l];
        per_col[l] += 1;
    }
    let rows = per_col.iter().copied().max().unwrap_or(0);
    let w = PAD * 2.0 + columns as f64 * BOX_W + columns.saturating_sub(1) as f64 * GAP_X;
    let h = PAD * 2.0 + rows as f64 * BOX_H + rows.saturating_sub(1) as f64 * GAP_Y;
    let pos = |i: usize| {
        (
            PAD + layer[i] as f64 * (BOX_W + GAP_X),
            PAD + row[i] as f64 * (BOX_H + GAP_Y),
        )
    };
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg class="dag" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="stage graph">"#
    );
    for (i, deps) in g.deps.iter().enumerate() {
        for &d in deps {
            if d >= g.nodes.len() {
                continue;
            }
            let (fx, fy) = pos(d);
            let (tx, ty) = pos(i);
            let (x1, y1, x2, y2) = (fx + BOX_W, fy + BOX_H / 2.0, tx, ty + BOX_H / 2.0);
            let mx = (x1 + x2) / 2.0;
            let _ = write!(
                s,
                r##"<path class="edge" d="M{x1:.1},{y1:.1} C{mx:.1},{y1:.1} {mx:.1},{y2:.1} {x2:.1},{y2:.1}" fill="none" stroke="#777" stroke-width="1.2"/>"##
            );
        }
    }
    for (i, name) in g.nodes.iter().enumerate() {
        let (x, y) = pos(i);
        let st = stages.iter().find(|s| s.name == *name);
        let status = st.map(|s| s.status.as_str()).unwrap_or("not run");
        let took = duration(st.and_then(|s| s.duration_s));
        let _ = write!(
            s,
            r##"<g class="stage" data-stage="{n}" data-status="{st}"><title>{n}: {st}</title><rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" fill="{fill}" stroke="#555"/><text x="{tx}" y="{ty1}" font-size="13" font-weight="bold">{label}</text><text x="{tx}" y="{ty2}" font-size="11">{st} · {took}</text></g>"##,
            n = escape(name),
            st = escape(status),
            fill = status_colour(status),
            tx = x + 8.0,
            ty1 = y + 19.0,
            ty2 = y + 36.0,
            label = escape(&short(name, 22)),
        );
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_follow_the_deepest_need() {
        let g = Graph {
            nodes: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            deps: vec![vec![], vec![0], vec![0, 1], vec![]],
        };
        assert_eq!(layers(&g), vec![0, 1, 2, 0]);
        let cyclic = Graph {
            nodes: vec!["a".into(), "b".into()],
            deps: vec![vec![1], vec![0]],
        };
        assert!(layers(&cyclic).iter().all(|&l| l <= 2));
    }

    #[test]
    fn durations() {
        assert_eq!(duration(Some(1.234)), "1.23s");
        assert_eq!(duration(Some(125.0)), "2m05s");
        assert_eq!(duration(None), "-");
    }
}
