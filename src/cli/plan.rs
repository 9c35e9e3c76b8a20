//! `taper plan`, `taper status` and `taper validate`.

use super::exit::{self, Failure};
use super::load::{load, plan_with_state};
use super::Selection;
use crate::plan::{Action, Plan};
use crate::spec::Pipeline;
use crate::state::{lock::current_holders, EventRow, Layout, Ledger};
use clap::Args;
use std::collections::HashSet;
use std::path::PathBuf;

/// `taper plan` options.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// What would run.
    #[command(flatten)]
    pub select: Selection,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `taper status` options.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The pipeline file.
    pub pipeline: PathBuf,
    /// Override parameters as `run` would.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `taper validate` options.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// Pipeline files.
    #[arg(required = true)]
    pub pipelines: Vec<PathBuf>,
}

/// Prints a plan as a table.
pub fn print_plan(p: &Pipeline, plan: &Plan) {
    let width = plan
        .steps
        .iter()
        .map(|s| p.stages[s.stage].name.len())
        .max()
        .unwrap_or(0);
    for step in &plan.steps {
        let word = match step.action {
            Action::Run => "run ",
            Action::Skip => "skip",
            Action::Excluded => continue,
        };
        println!(
            "{word}  {:width$}  {}",
            p.stages[step.stage].name, step.reason
        );
    }
    println!(
        "{} of {} stages to run",
        plan.to_run(),
        plan.steps
            .iter()
            .filter(|s| s.action != Action::Excluded)
            .count()
    );
}

fn plan_json(p: &Pipeline, plan: &Plan) -> serde_json::Value {
    let stages: Vec<_> = plan
        .steps
        .iter()
        .filter(|s| s.action != Action::Excluded)
        .map(|s| {
            serde_json::json!({
                "stage": p.stages[s.stage].name,
                "kind": p.stages[s.stage].kind.name,
                "action": if s.action == Action::Run { "run" } else { "skip" },
                "reason": s.reason,
                "fingerprint": s.check.as_ref().map(|c| c.fingerprint.clone()),
            })
        })
        .collect();
    serde_json::json!({ "pipeline": p.name, "to_run": plan.to_run(), "stages": stages })
}

/// `taper plan`.
pub fn plan(layout: &Layout, a: &PlanArgs) -> Result<i32, Failure> {
    let loaded = load(&a.pipeline, &a.select.sets, Some(&layout.root))?;
    let (_, mut cache, plan) = plan_with_state(layout, &loaded, &a.select.plan_options())?;
    if layout.exists() {
        let _ = cache.save(layout);
    }
    if a.json {
        println!("{}", plan_json(&loaded.pipeline, &plan));
    } else {
        print_plan(&loaded.pipeline, &plan);
    }
    Ok(exit::SUCCESS)
}

/// `taper status`.
pub fn status(layout: &Layout, a: &StatusArgs) -> Result<i32, Failure> {
    let loaded = load(&a.pipeline, &a.sets, Some(&layout.root))?;
    let ledger = Ledger::new(layout);
    let (history, _, plan) = plan_with_state(layout, &loaded, &Default::default())?;
    // Stages of a run in progress that started and have not finished.
    let mut running = HashSet::new();
    let holders = current_holders(layout);
    if !holders.is_empty() {
        for e in ledger
            .read::<EventRow>()?
            .into_iter()
            .filter(|e| holders.iter().any(|h| h.run_id == e.run_id))
        {
            if let Some(stage) = e.stage {
                if e.event == "stage_started" {
                    running.insert(stage);
                } else if e.event.starts_with("stage_") && e.event != "stage_retry" {
                    running.remove(&stage);
                }
            }
        }
    }
    let mut rows = Vec::new();
    for step in &plan.steps {
        let s = &loaded.pipeline.stages[step.stage];
        let failed = history
            .last
            .get(&s.name)
            .is_some_and(|r| r.status != "success");
        let (state, detail) = if running.contains(&s.name) {
            ("running", String::new())
        } else if step.action == Action::Skip {
            ("up to date", String::new())
        } else if failed && step.reason != "configuration changed" {
            let r = &history.last[&s.name];
            (
                if r.status == "interrupted" {
                    "interrupted"
                } else {
                    "failed"
                },
                r.error.clone().unwrap_or_default(),
            )
        } else {
            ("stale", step.reason.clone())
        };
        rows.push((s.name.clone(), state, detail));
    }
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|(n, s, d)| serde_json::json!({"stage": n, "status": s, "detail": d}))
            .collect();
        println!(
            "{}",
            serde_json::json!({ "pipeline": loaded.pipeline.name, "stages": v })
        );
    } else {
        let width = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        for (n, s, d) in &rows {
            let detail = d.lines().next().unwrap_or_default();
            if detail.is_empty() {
                println!("{n:width$}  {s}");
            } else {
                println!("{n:width$}  {s} ({detail})");
            }
        }
    }
    Ok(exit::SUCCESS)
}

/// `taper validate`.
pub fn validate(layout: &Layout, a: &ValidateArgs) -> Result<i32, Failure> {
    let mut failures = Vec::new();
    for p in &a.pipelines {
        match load(p, &[], Some(&layout.root)) {
            Ok(l) => println!("{}: ok ({} stages)", p.display(), l.pipeline.stages.len()),
            Err(f) => failures.push(f.message),
        }
    }
    if failures.is_empty() {
        Ok(exit::SUCCESS)
    } else {
        Err(Failure::new(exit::INVALID_PIPELINE, failures.join("\n")))
    }
}
