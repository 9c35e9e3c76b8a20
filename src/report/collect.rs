//! What a report shows, gathered from the ledger: the run, its stages (last attempt of
//! each), every metric series, the eval stage's JSON report, and the stage graph.

use crate::plan::Dag;
use crate::spec::Pipeline;
use crate::state::{Layout, Ledger, LedgerError, MetricRow, RunRow, StageRunRow};
use std::collections::BTreeMap;

/// The eval stage's JSON report, rendered when the workspace has it.
pub const EVAL_JSON: &str = "reports/eval.json";

/// One stage as the report shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct StageInfo {
    /// Stage name.
    pub name: String,
    /// Kind (empty when the stage has no row in this run).
    pub kind: String,
    /// success, skipped, failed, timed_out, interrupted, or `not run`.
    pub status: String,
    /// Why it ran or was skipped.
    pub reason: String,
    /// Attempt of the recorded row.
    pub attempt: u32,
    /// Seconds, when it ended.
    pub duration_s: Option<f64>,
    /// The error, if it failed.
    pub error: Option<String>,
    /// Outputs: path, content hash, bytes.
    pub outputs: Vec<(String, String, u64)>,
}

/// A metric logged by one stage: `(step, value)` sorted by step, one point per step (a
/// step logged twice, e.g. by a retried attempt, keeps its last value).
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// Stage that logged it.
    pub stage: String,
    /// Metric name (`train/loss`).
    pub name: String,
    /// Points.
    pub points: Vec<(i64, f64)>,
}

/// The stage graph to draw: names and, for each, the indices of the stages it needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Graph {
    /// Stage names.
    pub nodes: Vec<String>,
    /// `deps[i]`: the stages node `i` needs.
    pub deps: Vec<Vec<usize>>,
}

impl Graph {
    /// From a pipeline's DAG.
    pub fn from_dag(pipeline: &Pipeline, dag: &Dag) -> Graph {
        Graph {
            nodes: pipeline.stages.iter().map(|s| s.name.clone()).collect(),
            deps: dag.deps.clone(),
        }
    }

    /// From recorded stage rows alone (the pipeline file is gone or no longer valid):
    /// a stage needs the stages whose recorded outputs it read.
    pub fn from_rows(rows: &[StageRunRow]) -> Graph {
        let mut nodes: Vec<String> = Vec::new();
        for r in rows {
            if !nodes.contains(&r.stage) {
                nodes.push(r.stage.clone());
            }
        }
        let producer = |path: &str| -> Option<usize> {
            rows.iter()
                .find(|r| r.outputs.iter().any(|o| o.path == path))
                .and_then(|r| nodes.iter().position(|n| *n == r.stage))
        };
        let mut deps = vec![Vec::new(); nodes.len()];
        for r in rows {
            let i = nodes.iter().position(|n| *n == r.stage).unwrap_or(0);
            for input in &r.inputs {
                if let Some(p) = producer(&input.path) {
                    if p != i && !deps[i].contains(&p) {
                        deps[i].push(p);
                    }
                }
            }
        }
        Graph { nodes, deps }
    }
}

/// Everything a report shows.
#[derive(Clone, Debug, PartialEq)]
pub struct RunReport {
    /// The run's last `runs` row.
    pub run: RunRow,
    /// Stages in graph order.
    pub stages: Vec<StageInfo>,
    /// The graph.
    pub graph: Graph,
    /// Whether the graph came from the pipeline file (else from the ledger).
    pub graph_from_pipeline: bool,
    /// Every metric series of the run, by stage then name.
    pub series: Vec<Series>,
    /// `reports/eval.json`, parsed, if the workspace has it.
    pub eval_json: Option<serde_json::Value>,
    /// Why `reports/eval.json` could not be read, if it exists but is not JSON.
    pub eval_json_error: Option<String>,
}

/// Gathers the report of `run` (its last `runs` row). `graph` is the pipeline's graph
/// when the pipeline file could be loaded.
pub fn collect(
    layout: &Layout,
    ledger: &Ledger,
    run: RunRow,
    graph: Option<Graph>,
) -> Result<RunReport, LedgerError> {
    let mut rows: Vec<StageRunRow> = ledger
        .read::<StageRunRow>()?
        .into_iter()
        .filter(|s| s.run_id == run.run_id)
        .collect();
    rows.sort_by(|a, b| {
        a.started_at
            .cmp(&b.started_at)
            .then(a.attempt.cmp(&b.attempt))
    });
    let graph_from_pipeline = graph.is_some();
    let graph = graph.unwrap_or_else(|| Graph::from_rows(&rows));
    let mut last: BTreeMap<&str, &StageRunRow> = BTreeMap::new();
    for r in &rows {
        last.insert(r.stage.as_str(), r);
    }
    let stages = graph
        .nodes
        .iter()
        .map(|name| match last.get(name.as_str()) {
            Some(r) => StageInfo {
                name: name.clone(),
                kind: r.kind.clone(),
                status: r.status.clone(),
                reason: r.reason.clone(),
                attempt: r.attempt,
                duration_s: r.ended_at.map(|e| (e - r.started_at).max(0) as f64 / 1e6),
                error: r.error.clone(),
                outputs: r
                    .outputs
                    .iter()
                    .map(|o| (o.path.clone(), o.hash.clone(), o.bytes))
                    .collect(),
            },
            None => StageInfo {
                name: name.clone(),
                kind: String::new(),
                status: "not run".into(),
                reason: String::new(),
                attempt: 0,
                duration_s: None,
                error: None,
                outputs: Vec::new(),
            },
        })
        .collect();
    let mut by_key: BTreeMap<(String, String), BTreeMap<i64, f64>> = BTreeMap::new();
    for m in ledger.read::<MetricRow>()? {
        if m.run_id == run.run_id {
            by_key
                .entry((m.stage, m.name))
                .or_default()
                .insert(m.step, m.value);
        }
    }
    let series = by_key
        .into_iter()
        .map(|((stage, name), points)| Series {
            stage,
            name,
            points: points.into_iter().collect(),
        })
        .collect();
    let (eval_json, eval_json_error) = match std::fs::read(layout.path(EVAL_JSON)) {
        Err(_) => (None, None),
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(format!("{EVAL_JSON} is not valid JSON: {e}"))),
        },
    };
    Ok(RunReport {
        run,
        stages,
        graph,
        graph_from_pipeline,
        series,
        eval_json,
        eval_json_error,
    })
}
