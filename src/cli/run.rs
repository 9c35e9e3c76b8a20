//! `taper run`: plan, take the workspace lock, execute, record.

use super::exit::{self, Failure};
use super::load::{load, plan_with_state};
use super::plan::print_plan;
use super::reporter::Console;
use super::Selection;
use crate::exec::{Executor, Recorder, RunOptions, RunStatus, Signals, Tee};
use crate::state::{time, Layout, Ledger, RunRow, WorkspaceLock};
use clap::Args;
use std::path::PathBuf;
use std::sync::Mutex;

/// `taper run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// What to run.
    #[command(flatten)]
    pub select: Selection,
    /// Stages running at once, at most. Default: the number of CPUs.
    #[arg(short, long)]
    pub jobs: Option<usize>,
    /// After a failure, keep running stages that do not depend on it.
    #[arg(long)]
    pub keep_going: bool,
    /// Print the plan and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Override a resource slot's capacity: `--resource gpu=2` (repeatable).
    #[arg(long = "resource", value_name = "NAME=N")]
    pub resources: Vec<String>,
    /// Attempt each stage once, ignoring `retries:` (exported Argo workflows use it:
    /// there Argo retries the task's pod).
    #[arg(long)]
    pub no_retries: bool,
}

/// Runs a pipeline.
pub fn run(layout: &Layout, a: &RunArgs) -> Result<i32, Failure> {
    let mut loaded = load(&a.pipeline, &a.select.sets, Some(&layout.root))?;
    if a.no_retries {
        for s in &mut loaded.pipeline.stages {
            s.retries = 0;
        }
    }
    let mut resources = loaded.pipeline.resources.clone();
    for r in &a.resources {
        let (k, v) = r
            .split_once('=')
            .and_then(|(k, v)| Some((k.trim().to_string(), v.trim().parse::<u32>().ok()?)))
            .ok_or_else(|| {
                Failure::new(
                    exit::USAGE,
                    format!("error: --resource {r}: expected NAME=N"),
                )
            })?;
        resources.insert(k, v);
    }
    let ledger = Ledger::new(layout);
    if a.dry_run {
        let (_, _, plan) = plan_with_state(layout, &loaded, &a.select.plan_options())?;
        print_plan(&loaded.pipeline, &plan);
        return Ok(exit::SUCCESS);
    }
    let run_id = time::new_run_id();
    let report_run_id = run_id.clone();
    // A full run owns the workspace; `--only` runs (parallel Argo tasks on one volume)
    // share it, one process per stage.
    let lock = match &a.select.only {
        Some(stage) => WorkspaceLock::acquire_shared(layout, &run_id, stage)?,
        None => WorkspaceLock::acquire(layout, &run_id)?,
    };
    if let Some(h) = &lock.recovered {
        eprintln!("warning: recovered the workspace lock left by {h}, which is no longer running");
    }
    let (history, cache, plan) = plan_with_state(layout, &loaded, &a.select.plan_options())?;
    let signals = Signals::install()
        .map_err(|e| Failure::new(exit::ERROR, format!("error: cannot handle signals: {e}")))?;
    let run_dir = layout.run_dir(&run_id);
    let _ = std::fs::create_dir_all(&run_dir);
    let log = std::fs::File::create(run_dir.join("run.log")).ok();
    let args = serde_json::json!({
        "sets": a.select.sets, "force": a.select.force, "force_all": a.select.force_all,
        "target": a.select.target, "downstream": a.select.downstream, "only": a.select.only,
        "jobs": a.jobs, "keep_going": a.keep_going,
    });
    let run_row = RunRow {
        run_id: run_id.clone(),
        pipeline: a.pipeline.display().to_string(),
        pipeline_name: loaded.pipeline.name.clone(),
        status: "running".into(),
        trigger: std::env::var("TAPER_TRIGGER").unwrap_or_else(|_| "manual".into()),
        scheduled_for: loaded.scheduled_for.map(|t| t.as_microsecond()),
        started_at: time::now_micros(),
        ended_at: None,
        args: args.to_string(),
        host: crate::state::lock::hostname(),
        pid: std::process::id(),
        taper_version: env!("CARGO_PKG_VERSION").into(),
    };
    let mut recorder = Recorder::new(ledger.clone(), run_row);
    let mut console = Console::new(log);
    let cache = Mutex::new(cache);
    let executor = Executor {
        layout,
        pipeline: &loaded.pipeline,
        configs: &loaded.configs,
        dag: &loaded.dag,
        plan: &plan,
        history: &history,
        cache: &cache,
        opts: RunOptions {
            run_id,
            jobs: a.jobs.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            }),
            keep_going: a.keep_going,
            resources,
        },
    };
    let status = {
        let mut tee = Tee(vec![&mut recorder, &mut console]);
        executor.run(&mut tee, &signals)
    };
    let _ = cache.into_inner().map(|mut c| c.save(layout));
    if let Some(e) = recorder.error.take() {
        return Err(Failure::new(
            exit::STATE_ERROR,
            format!("error: the run could not be recorded: {e}"),
        ));
    }
    // A full run holds the exclusive lock, which pruning and compaction need: they
    // delete ledger files.
    if status == RunStatus::Success && a.select.only.is_none() {
        publish_run_folder(layout, &loaded);
        prune_ledger(layout, &loaded);
    }
    if !lock.is_shared() {
        compact_if_large(&ledger);
    }
    // The report is written after every full run, failed ones included (that is when it
    // helps most); it is not a stage output, so it is not fingerprinted.
    if a.select.only.is_none() {
        super::report::after_run(layout, &loaded, &report_run_id);
    }
    drop(lock);
    Ok(match status {
        RunStatus::Success => exit::SUCCESS,
        RunStatus::Failed => exit::STAGE_FAILED,
        RunStatus::GateFailed => exit::GATE_FAILED,
        RunStatus::Interrupted => exit::INTERRUPTED,
    })
}

/// After a successful full run: points `<folder>/latest` at this run's folder and
/// removes run folders beyond `keep_runs`. Problems are warnings: the run succeeded.
fn publish_run_folder(layout: &Layout, loaded: &super::load::Loaded) {
    use crate::schedule::folders;
    let (Some(schedule), Some((run_folder, name))) = (&loaded.schedule, &loaded.run_folder) else {
        return;
    };
    let Some(folder) = &schedule.folder else {
        return;
    };
    if !layout.path(run_folder).is_dir() {
        return;
    }
    if let Err(e) = folders::point_latest(&layout.root, folder, name) {
        eprintln!("warning: cannot point {folder}/latest at {name}: {e}");
    }
    if let Some(keep) = schedule.keep_runs {
        match folders::prune(&layout.root, folder, keep as usize) {
            Ok(removed) if !removed.is_empty() => {
                eprintln!(
                    "removed {} old run folder(s) of {folder} (keep_runs: {keep}): {}",
                    removed.len(),
                    removed.join(", ")
                );
            }
            Ok(_) => {}
            Err(e) => eprintln!("warning: cannot remove old run folders of {folder}: {e}"),
        }
    }
}

/// After a successful full run of a pipeline with `keep_runs: N`: removes its runs beyond
/// the newest N from the ledger, except those planning still reads (`plan::retention`).
/// Problems are warnings: the run succeeded.
fn prune_ledger(layout: &Layout, loaded: &super::load::Loaded) {
    let Some(keep) = loaded.schedule.as_ref().and_then(|s| s.keep_runs) else {
        return;
    };
    let name = &loaded.pipeline.name;
    match super::history::prune_runs(layout, keep as usize, Some(name)) {
        Ok(removed) if !removed.is_empty() => eprintln!(
            "removed {} old run(s) of {name} from the ledger (keep_runs: {keep}): {}",
            removed.len(),
            removed.join(", ")
        ),
        Ok(_) => {}
        Err(e) => eprintln!("warning: cannot remove old runs of {name} from the ledger: {e}"),
    }
}

/// Keeps reads fast: merges a table's files once it has more than 64.
fn compact_if_large(ledger: &Ledger) {
    use crate::state::{EventRow, MetricRow, RunRow, StageRunRow};
    let many = |t: &str| ledger.files(t).map(|f| f.len() > 64).unwrap_or(false);
    if many("runs") {
        let _ = ledger.compact::<RunRow>();
    }
    if many("stage_runs") {
        let _ = ledger.compact::<StageRunRow>();
    }
    if many("metrics") {
        let _ = ledger.compact::<MetricRow>();
    }
    if many("events") {
        let _ = ledger.compact::<EventRow>();
    }
}
