//! `taper report [RUN_ID] --out FILE`: the HTML run report, and the report `taper run`
//! writes after a run when the pipeline has `report: {path: ...}`.

use super::exit::{self, Failure};
use super::history::{find_run, latest_runs};
use crate::report::{collect, render, Graph};
use crate::state::{Layout, Ledger, RunRow};
use clap::Args;
use std::path::{Path, PathBuf};

/// `taper report` options.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// A run id (or a unique prefix of one); default: the latest run.
    pub run_id: Option<String>,
    /// Where to write the HTML file.
    #[arg(short, long, value_name = "FILE", default_value = "report.html")]
    pub out: PathBuf,
    /// The pipeline file to draw the stage graph from; default: the one the run recorded.
    /// Without a loadable pipeline the graph is drawn from the ledger's stages alone.
    #[arg(long, value_name = "FILE")]
    pub pipeline: Option<PathBuf>,
}

/// `taper report`.
pub fn report(layout: &Layout, a: &ReportArgs) -> Result<i32, Failure> {
    let ledger = Ledger::new(layout);
    let runs = latest_runs(&ledger)?;
    let run = find_run(&runs, a.run_id.as_deref())?.clone();
    let graph = pipeline_graph(layout, &run, a.pipeline.as_deref());
    if a.pipeline.is_some() && graph.is_none() {
        eprintln!("warning: cannot load the pipeline file; drawing the graph from the ledger");
    }
    write(layout, &ledger, run, graph, &a.out)
        .map_err(|e| Failure::new(exit::ERROR, format!("error: {e}")))?;
    eprintln!("wrote {}", a.out.display());
    Ok(exit::SUCCESS)
}

/// Renders the report of `run` and writes it to `out` atomically (a temporary file in the
/// same folder, then a rename), creating the folder.
pub fn write(
    layout: &Layout,
    ledger: &Ledger,
    run: RunRow,
    graph: Option<Graph>,
    out: &Path,
) -> Result<(), String> {
    let report = collect(layout, ledger, run, graph).map_err(|e| e.to_string())?;
    let html = render(&report);
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    crate::state::layout::write_atomic(out, html.as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", out.display()))
}

/// The graph of the pipeline `run` recorded (or `explicit`), loaded with the run's
/// `--set` values so fan-out stage names match; `None` when it cannot be loaded.
fn pipeline_graph(layout: &Layout, run: &RunRow, explicit: Option<&Path>) -> Option<Graph> {
    let sets: Vec<String> = serde_json::from_str::<serde_json::Value>(&run.args)
        .ok()
        .and_then(|v| v.get("sets").cloned())
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let recorded = PathBuf::from(&run.pipeline);
    let candidates: Vec<PathBuf> = match explicit {
        Some(p) => vec![p.to_path_buf()],
        None if recorded.is_absolute() => vec![recorded],
        None => vec![layout.root.join(&recorded), recorded],
    };
    candidates.iter().filter(|p| p.is_file()).find_map(|p| {
        let loaded = super::load::load(p, &sets, None).ok()?;
        Some(Graph::from_dag(&loaded.pipeline, &loaded.dag))
    })
}

/// After `taper run`: writes the pipeline's `report:` file for run `run_id`. Problems are
/// warnings; the run's own outcome stands.
pub fn after_run(layout: &Layout, loaded: &super::load::Loaded, run_id: &str) {
    let Some(spec) = &loaded.pipeline.report else {
        return;
    };
    let ledger = Ledger::new(layout);
    let run = match latest_runs(&ledger) {
        Ok(runs) => runs.into_iter().find(|r| r.run_id == run_id),
        Err(e) => {
            eprintln!("warning: cannot write the run report: {}", e.message);
            return;
        }
    };
    let Some(run) = run else {
        eprintln!("warning: cannot write the run report: run {run_id} is not in the ledger");
        return;
    };
    let graph = Graph::from_dag(&loaded.pipeline, &loaded.dag);
    match write(layout, &ledger, run, Some(graph), &layout.path(&spec.path)) {
        Ok(()) => eprintln!("report: {}", spec.path),
        Err(e) => eprintln!("warning: cannot write the run report: {e}"),
    }
}
