//! A [`RunReport`] as one self-contained HTML page: inline CSS and SVG, no scripts, no
//! fonts, no links to fetch. Every text that comes from the ledger or the workspace
//! (stage names, errors, paths, eval samples) goes through [`escape`].

use super::chart::{line_chart, number, Curve};
use super::collect::{RunReport, Series, EVAL_JSON};
use super::graph::{dag_svg, duration, status_colour};
use crate::state::time::rfc3339;
use std::fmt::Write;

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str =
    "body{font-family:system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}\
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ccc}\
h3{font-size:15px;margin:16px 0 6px}table{border-collapse:collapse;background:#fff;margin:6px 0}\
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top;font-size:13px}\
th{background:#eee}.num{text-align:right;font-variant-numeric:tabular-nums}\
code,.hash{font-family:ui-monospace,monospace;font-size:12px}.meta{color:#555;font-size:13px}\
.charts{display:flex;flex-wrap:wrap;gap:12px}.status{padding:1px 6px;border-radius:4px}\
.pass{background:#c8e6c9}.fail{background:#ffcdd2}.none{color:#777;font-style:italic}\
pre{white-space:pre-wrap;margin:0;font-size:12px;max-width:520px}";

/// Metrics drawn on the loss chart of a stage.
fn is_loss(name: &str) -> bool {
    name == "loss" || name.ends_with("/loss")
}

fn status_span(status: &str) -> String {
    format!(
        r#"<span class="status" style="background:{}">{}</span>"#,
        status_colour(status),
        escape(status)
    )
}

fn human_bytes(b: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The whole page.
pub fn render(r: &RunReport) -> String {
    let mut h = String::new();
    let title = format!("{} — run {}", r.run.pipeline_name, r.run.run_id);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{}</title><style>{CSS}</style></head><body>\n",
        escape(&title)
    );
    let took = r.run.ended_at.map(|e| (e - r.run.started_at) as f64 / 1e6);
    let _ = writeln!(
        h,
        "<h1>{}</h1><p class=\"meta\">run <code>{}</code> · {} · pipeline <code>{}</code> · started {} · took {} · trigger {} · taper {}</p>",
        escape(&r.run.pipeline_name),
        escape(&r.run.run_id),
        status_span(&r.run.status),
        escape(&r.run.pipeline),
        escape(&rfc3339(r.run.started_at)),
        escape(&duration(took)),
        escape(&r.run.trigger),
        escape(&r.run.taper_version),
    );
    stages_section(&mut h, r);
    curves_section(&mut h, r);
    eval_section(&mut h, r);
    outputs_section(&mut h, r);
    h.push_str("</body></html>\n");
    h
}

fn stages_section(h: &mut String, r: &RunReport) {
    h.push_str("<h2>Stages</h2>\n");
    if !r.graph_from_pipeline {
        h.push_str("<p class=\"meta\">The pipeline file could not be loaded; the graph is drawn from the stages recorded in the ledger (edges from recorded inputs and outputs).</p>\n");
    }
    if r.graph.nodes.is_empty() {
        h.push_str("<p class=\"none\">No stages recorded for this run.</p>\n");
        return;
    }
    h.push_str(&dag_svg(&r.graph, &r.stages));
    h.push_str("\n<table class=\"stages\"><tr><th>stage</th><th>kind</th><th>status</th><th>duration</th><th>attempt</th><th>reason</th><th>error</th></tr>\n");
    for s in &r.stages {
        let _ = writeln!(
            h,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
            escape(&s.name),
            escape(&s.kind),
            status_span(&s.status),
            escape(&duration(s.duration_s)),
            s.attempt,
            escape(&s.reason),
            escape(s.error.as_deref().unwrap_or("")),
        );
    }
    h.push_str("</table>\n");
}

/// Stages with a metric logged at more than one step get charts: one with every loss
/// (`train/loss`, `eval/loss`), one per other stepped metric. Single values go to a table.
fn curves_section(h: &mut String, r: &RunReport) {
    h.push_str("<h2>Training curves</h2>\n");
    let mut stages: Vec<&str> = Vec::new();
    for s in &r.series {
        if s.points.len() > 1 && !stages.contains(&s.stage.as_str()) {
            stages.push(&s.stage);
        }
    }
    if stages.is_empty() {
        h.push_str("<p class=\"none\">No metric was logged at more than one step.</p>\n");
    }
    for stage in &stages {
        let mine: Vec<&Series> = r.series.iter().filter(|s| s.stage == *stage).collect();
        let _ = writeln!(h, "<h3>{}</h3><div class=\"charts\">", escape(stage));
        fn curve<'a>(s: &&'a Series) -> Curve<'a> {
            Curve {
                stage: &s.stage,
                metric: &s.name,
                points: &s.points,
            }
        }
        let losses: Vec<Curve> = mine
            .iter()
            .filter(|s| is_loss(&s.name))
            .map(curve)
            .collect();
        if !losses.is_empty() {
            h.push_str(&line_chart(&format!("{stage}: loss"), &losses));
        }
        for s in mine.iter().filter(|s| !is_loss(&s.name)) {
            h.push_str(&line_chart(&format!("{stage}: {}", s.name), &[curve(s)]));
        }
        h.push_str("</div>\n");
    }
    let singles: Vec<&Series> = r
        .series
        .iter()
        .filter(|s| !stages.contains(&s.stage.as_str()))
        .collect();
    if !singles.is_empty() {
        h.push_str("<h3>Other metrics</h3><table class=\"metrics\"><tr><th>stage</th><th>metric</th><th>step</th><th>value</th></tr>\n");
        for s in singles {
            if let Some((step, v)) = s.points.last() {
                let _ = writeln!(
                    h,
                    "<tr><td><code>{}</code></td><td><code>{}</code></td><td class=\"num\">{step}</td><td class=\"num\">{}</td></tr>",
                    escape(&s.stage),
                    escape(&s.name),
                    escape(&number(*v)),
                );
            }
        }
        h.push_str("</table>\n");
    }
}

fn last(r: &RunReport, stage: &str, name: &str) -> Option<f64> {
    r.series
        .iter()
        .find(|s| s.stage == stage && s.name == name)
        .and_then(|s| s.points.last().map(|p| p.1))
}

fn eval_section(h: &mut String, r: &RunReport) {
    h.push_str("<h2>Evaluation</h2>\n");
    let eval_stages: Vec<&str> = r
        .stages
        .iter()
        .filter(|s| {
            s.kind == "eval"
                || last(r, &s.name, "eval/base_loss").is_some()
                || last(r, &s.name, "eval/base_perplexity").is_some()
        })
        .map(|s| s.name.as_str())
        .collect();
    if eval_stages.is_empty() {
        h.push_str("<p class=\"none\">No eval stage in this run.</p>\n");
    }
    for stage in eval_stages {
        let _ = writeln!(h, "<h3>{}</h3><table class=\"eval\"><tr><th>metric</th><th>base</th><th>adapter</th></tr>", escape(stage));
        let cell = |v: Option<f64>| v.map(number).unwrap_or_else(|| "-".into());
        for (label, base, adapter) in [
            ("loss", "eval/base_loss", "eval/loss"),
            ("perplexity", "eval/base_perplexity", "eval/perplexity"),
        ] {
            let _ = writeln!(
                h,
                "<tr><td>{label}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                escape(&cell(last(r, stage, base))),
                escape(&cell(last(r, stage, adapter))),
            );
        }
        if let Some(v) = last(r, stage, "eval/improvement") {
            let _ = writeln!(
                h,
                "<tr><td>improvement</td><td colspan=\"2\" class=\"num\">{}</td></tr>",
                escape(&number(v))
            );
        }
        h.push_str("</table>\n");
    }
    if let Some(e) = &r.eval_json_error {
        let _ = writeln!(h, "<p class=\"fail\">{}</p>", escape(e));
    }
    for (key, title) in [("gates", "Gates"), ("samples", "Samples")] {
        let _ = writeln!(h, "<h3>{title}</h3>");
        match r.eval_json.as_ref().and_then(|v| v.get(key)) {
            Some(v) => json_table(h, key, v),
            None => {
                let _ = writeln!(
                    h,
                    "<p class=\"none\">None ({} {}).</p>",
                    escape(EVAL_JSON),
                    if r.eval_json.is_some() {
                        format!("has no `{key}`")
                    } else {
                        "not found in the workspace".into()
                    }
                );
            }
        }
    }
    // With `compare_base`, the same prompts answered by the base alone.
    if let Some(v) = r.eval_json.as_ref().and_then(|v| v.get("base_samples")) {
        if v.as_array().is_some_and(|a| !a.is_empty()) {
            let _ = writeln!(h, "<h3>Base model samples</h3>");
            json_table(h, "samples", v);
        }
    }
}

/// A JSON list of objects (or a map of name to object) as a table whose columns are the
/// union of the objects' keys; `passed`/`pass`/`ok` booleans are coloured.
fn json_table(h: &mut String, class: &str, v: &serde_json::Value) {
    let rows: Vec<(Option<String>, &serde_json::Value)> = match v {
        serde_json::Value::Array(a) => a.iter().map(|x| (None, x)).collect(),
        serde_json::Value::Object(m) => m.iter().map(|(k, x)| (Some(k.clone()), x)).collect(),
        other => {
            let _ = writeln!(h, "<pre>{}</pre>", escape(&other.to_string()));
            return;
        }
    };
    if rows.is_empty() {
        h.push_str("<p class=\"none\">None.</p>\n");
        return;
    }
    let named = rows.iter().any(|r| r.0.is_some());
    let mut cols: Vec<String> = Vec::new();
    for (_, r) in &rows {
        if let serde_json::Value::Object(m) = r {
            for k in m.keys() {
                if !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
    }
    let _ = write!(h, "<table class=\"{}\"><tr>", escape(class));
    if named {
        h.push_str("<th>name</th>");
    }
    if cols.is_empty() {
        h.push_str("<th>value</th>");
    }
    for c in &cols {
        let _ = write!(h, "<th>{}</th>", escape(c));
    }
    h.push_str("</tr>\n");
    let text = |x: &serde_json::Value| match x {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.as_f64().map(number).unwrap_or_else(|| n.to_string()),
        other => other.to_string(),
    };
    for (name, r) in &rows {
        h.push_str("<tr>");
        if named {
            let _ = write!(
                h,
                "<td><code>{}</code></td>",
                escape(name.as_deref().unwrap_or(""))
            );
        }
        match r {
            serde_json::Value::Object(m) => {
                for c in &cols {
                    match m.get(c) {
                        Some(serde_json::Value::Bool(b))
                            if matches!(c.as_str(), "passed" | "pass" | "ok") =>
                        {
                            let (cls, word) = if *b {
                                ("pass", "passed")
                            } else {
                                ("fail", "failed")
                            };
                            let _ = write!(h, "<td class=\"{cls}\">{word}</td>");
                        }
                        Some(x) => {
                            let _ = write!(h, "<td><pre>{}</pre></td>", escape(&text(x)));
                        }
                        None => h.push_str("<td></td>"),
                    }
                }
            }
            other => {
                let _ = write!(h, "<td><pre>{}</pre></td>", escape(&text(other)));
            }
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</table>\n");
}

fn outputs_section(h: &mut String, r: &RunReport) {
    h.push_str("<h2>Outputs</h2>\n");
    let outs: Vec<(&str, &(String, String, u64))> = r
        .stages
        .iter()
        .flat_map(|s| s.outputs.iter().map(move |o| (s.name.as_str(), o)))
        .collect();
    if outs.is_empty() {
        h.push_str("<p class=\"none\">No outputs recorded for this run.</p>\n");
        return;
    }
    h.push_str("<table class=\"outputs\"><tr><th>stage</th><th>path</th><th>size</th><th>blake3</th></tr>\n");
    for (stage, (path, hash, bytes)) in outs {
        let _ = writeln!(
            h,
            "<tr><td><code>{}</code></td><td><code>{}</code></td><td class=\"num\" title=\"{bytes} bytes\">{}</td><td class=\"hash\" title=\"{}\">{}</td></tr>",
            escape(stage),
            escape(path),
            human_bytes(*bytes),
            escape(hash),
            escape(&hash.chars().take(16).collect::<String>()),
        );
    }
    h.push_str("</table>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<script>alert('x') & \"y\"</script>"),
            "&lt;script&gt;alert(&#39;x&#39;) &amp; &quot;y&quot;&lt;/script&gt;"
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(human_bytes(12), "12 B");
        assert_eq!(human_bytes(2048), "2.0 KiB");
    }
}
