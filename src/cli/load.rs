//! Shared by the pipeline commands: load + validate a pipeline, build its DAG, and plan.

use super::exit::{self, Failure};
use crate::plan::{missing_inputs, Dag};
use crate::schedule::{folders, ScheduleConfig};
use crate::spec::{Node, Pipeline, SpecError, SpecErrors};
use crate::stages::{configure, StageConfig};
use jiff::Timestamp;
use std::path::Path;

/// A pipeline that passed every static check.
pub struct Loaded {
    /// The pipeline.
    pub pipeline: Pipeline,
    /// Typed config of each stage.
    pub configs: Vec<StageConfig>,
    /// The DAG.
    pub dag: Dag,
    /// The `schedule:` block, if any.
    pub schedule: Option<ScheduleConfig>,
    /// The fire time this run is for (`TAPER_SCHEDULED_FOR`).
    pub scheduled_for: Option<Timestamp>,
    /// This run's folder and its name (`nightly/2026-11-27T02:00`, `2026-11-27T02:00`)
    /// when the schedule has `folder:`.
    pub run_folder: Option<(String, String)>,
}

/// Reads a time from the environment variable `var`: RFC 3339, or `last-fire` (the
/// schedule's latest fire time at or before now, for runs started by a systemd timer).
fn env_time(var: &str, schedule: Option<&ScheduleConfig>) -> Result<Option<Timestamp>, Failure> {
    let Ok(text) = std::env::var(var) else {
        return Ok(None);
    };
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if text == "last-fire" {
        return match schedule.and_then(|s| s.last_at_or_before(Timestamp::now())) {
            Some(z) => Ok(Some(z.timestamp())),
            None => Err(Failure::new(
                exit::USAGE,
                format!("error: {var}=last-fire needs a `schedule:` block with a past fire time"),
            )),
        };
    }
    text.parse::<Timestamp>().map(Some).map_err(|e| {
        Failure::new(
            exit::USAGE,
            format!("error: {var}={text}: expected an RFC 3339 time such as 2027-03-29T00:30:00Z, or `last-fire` ({e})"),
        )
    })
}

/// Loads `file` with `--set` overrides and checks it: the schedule, stage configs, cycles
/// and (when `root` is given) inputs that nothing provides.
pub fn load(file: &Path, sets: &[String], root: Option<&Path>) -> Result<Loaded, Failure> {
    let source = std::fs::read_to_string(file).map_err(|e| {
        SpecErrors::from(SpecError {
            file: file.to_path_buf(),
            pos: None,
            stage: None,
            key: None,
            message: format!("cannot read the pipeline file: {e}"),
            line_text: None,
        })
    })?;
    let mut errors = Vec::new();
    let schedule = match ScheduleConfig::from_source(file, &source) {
        Ok(s) => s,
        Err(SpecErrors(es)) => {
            errors.extend(es.into_iter().map(|e| e.with_source(&source)));
            None
        }
    };
    let scheduled_for = env_time("TAPER_SCHEDULED_FOR", schedule.as_ref())?;
    let run_time = match scheduled_for {
        Some(t) => Some(t),
        None => env_time("TAPER_RUN_TIME", schedule.as_ref())?,
    };
    let run_folder = schedule
        .as_ref()
        .and_then(|s| folders::run_folder(s, run_time));
    let extra: Vec<(&str, Node)> = run_folder
        .iter()
        .map(|(folder, name)| ("run", folders::run_root(folder, name)))
        .collect();
    let pipeline = match crate::spec::load_str_with(file, &source, sets, &extra) {
        Ok(p) => p,
        Err(SpecErrors(es)) => {
            errors.extend(es);
            return Err(SpecErrors(errors).into());
        }
    };
    let mut configs = Vec::with_capacity(pipeline.stages.len());
    for s in &pipeline.stages {
        match configure(&pipeline.file, s) {
            Ok(c) => configs.push(c),
            Err(e) => errors.push(e.with_source(&pipeline.source)),
        }
    }
    let dag = match Dag::build(&pipeline) {
        Ok(d) => Some(d),
        Err(SpecErrors(es)) => {
            errors.extend(es.into_iter().map(|e| e.with_source(&pipeline.source)));
            None
        }
    };
    if let (Some(dag), Some(root)) = (&dag, root) {
        errors.extend(
            missing_inputs(&pipeline, dag, root)
                .into_iter()
                .map(|e| e.with_source(&pipeline.source)),
        );
    }
    if !errors.is_empty() {
        return Err(SpecErrors(errors).into());
    }
    Ok(Loaded {
        pipeline,
        configs,
        dag: dag.expect("no errors means a DAG"),
        schedule,
        scheduled_for,
        run_folder,
    })
}

/// Reads the ledger's history and the hash cache, and plans `loaded` under `opts`.
pub fn plan_with_state(
    layout: &crate::state::Layout,
    loaded: &Loaded,
    opts: &crate::plan::PlanOptions,
) -> Result<
    (
        crate::plan::History,
        crate::state::HashCache,
        crate::plan::Plan,
    ),
    Failure,
> {
    let history = crate::plan::History::load(&crate::state::Ledger::new(layout))?;
    let mut cache = crate::state::HashCache::load(layout);
    let plan = crate::plan::make_plan(
        &loaded.pipeline,
        &loaded.dag,
        &history,
        &mut cache,
        &layout.root,
        opts,
    )?;
    Ok((history, cache, plan))
}
