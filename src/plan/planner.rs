//! Decides, for each stage in topological order, whether it runs and why.

use super::check::{check_stage, Check};
use super::graph::Dag;
use super::history::History;
use crate::spec::de::did_you_mean;
use crate::spec::Pipeline;
use crate::stages::kind_info;
use crate::state::HashCache;
use std::path::Path;

/// What the user asked to run.
#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    /// Run these stages even if up to date.
    pub force: Vec<String>,
    /// Run every selected stage.
    pub force_all: bool,
    /// Run only these stages and what they need (empty: all).
    pub targets: Vec<String>,
    /// With `targets`: also what depends on them.
    pub downstream: bool,
    /// Run exactly this stage; its upstream must be up to date.
    pub only: Option<String>,
}

/// What happens to a stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// It runs.
    Run,
    /// It is up to date.
    Skip,
    /// It was not selected (`--target`, `--only`).
    Excluded,
}

/// The decision for one stage.
#[derive(Clone, Debug)]
pub struct StagePlan {
    /// Index into `pipeline.stages`.
    pub stage: usize,
    /// Run, skip or not selected.
    pub action: Action,
    /// Why.
    pub reason: String,
    /// The fingerprint check, when the stage's inputs could be hashed now.
    pub check: Option<Check>,
}

/// The whole plan, in execution (topological) order.
#[derive(Clone, Debug)]
pub struct Plan {
    /// One entry per stage.
    pub steps: Vec<StagePlan>,
}

impl Plan {
    /// The entry of stage `index`.
    pub fn step(&self, index: usize) -> Option<&StagePlan> {
        self.steps.iter().find(|s| s.stage == index)
    }

    /// How many stages will run.
    pub fn to_run(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.action == Action::Run)
            .count()
    }
}

/// A plan cannot be made for the options given.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// `--target`/`--force`/`--only` named no stage.
    #[error("unknown stage \"{name}\"{hint}")]
    UnknownStage {
        /// The name given.
        name: String,
        /// A suggestion.
        hint: String,
    },
    /// `--only STAGE` whose upstream is not up to date.
    #[error(
        "--only {stage}: input stage \"{upstream}\" is not up to date ({reason}); run it first"
    )]
    UpstreamStale {
        /// The stage asked for.
        stage: String,
        /// The upstream stage.
        upstream: String,
        /// Why it is stale.
        reason: String,
    },
}

fn resolve(p: &Pipeline, names: &[String]) -> Result<Vec<usize>, PlanError> {
    let mut out = Vec::new();
    for name in names {
        let matches: Vec<usize> = p
            .stages
            .iter()
            .enumerate()
            .filter(|(_, s)| s.name == *name || s.base_name == *name)
            .map(|(i, _)| i)
            .collect();
        if matches.is_empty() {
            let hint = did_you_mean(name, p.stages.iter().map(|s| s.name.as_str()))
                .map(|b| format!(" (did you mean \"{b}\"?)"))
                .unwrap_or_default();
            return Err(PlanError::UnknownStage {
                name: name.clone(),
                hint,
            });
        }
        out.extend(matches);
    }
    Ok(out)
}

/// Makes the plan.
pub fn make_plan(
    p: &Pipeline,
    dag: &Dag,
    history: &History,
    cache: &mut HashCache,
    root: &Path,
    opts: &PlanOptions,
) -> Result<Plan, PlanError> {
    let n = p.stages.len();
    let forced = resolve(p, &opts.force)?;
    let selected: Vec<bool> = if let Some(only) = &opts.only {
        let idx = resolve(p, std::slice::from_ref(only))?;
        let mut sel = vec![false; n];
        idx.iter().for_each(|&i| sel[i] = true);
        sel
    } else if opts.targets.is_empty() {
        vec![true; n]
    } else {
        let t = resolve(p, &opts.targets)?;
        let mut sel = dag.upstream(&t);
        if opts.downstream {
            for (i, d) in dag.downstream(&t).into_iter().enumerate() {
                sel[i] |= d;
            }
        }
        sel
    };
    let mut runs = vec![false; n];
    let mut steps = Vec::with_capacity(n);
    for &i in &dag.order {
        let stage = &p.stages[i];
        if !selected[i] {
            if opts.only.is_some() && dag.dependents[i].iter().any(|&d| selected[d]) {
                let version = kind_info(&stage.kind.name).map(|k| k.version).unwrap_or(0);
                let c = check_stage(stage, version, history, cache, root);
                if let Some(reason) = c.stale {
                    let only = opts.only.clone().unwrap_or_default();
                    return Err(PlanError::UpstreamStale {
                        stage: only,
                        upstream: stage.name.clone(),
                        reason,
                    });
                }
            }
            steps.push(StagePlan {
                stage: i,
                action: Action::Excluded,
                reason: "not selected".into(),
                check: None,
            });
            continue;
        }
        if let Some(&up) = dag.deps[i].iter().find(|&&d| runs[d]) {
            runs[i] = true;
            let reason = format!("upstream stage \"{}\" runs", p.stages[up].name);
            steps.push(StagePlan {
                stage: i,
                action: Action::Run,
                reason,
                check: None,
            });
            continue;
        }
        let version = kind_info(&stage.kind.name).map(|k| k.version).unwrap_or(0);
        let check = check_stage(stage, version, history, cache, root);
        let (action, reason) = if opts.force_all || forced.contains(&i) {
            (Action::Run, "forced".to_string())
        } else if let Some(why) = &check.stale {
            (Action::Run, why.clone())
        } else {
            (Action::Skip, "up to date".to_string())
        };
        runs[i] = action == Action::Run;
        tracing::debug!(stage = %stage.name, ?action, %reason, "planned");
        steps.push(StagePlan {
            stage: i,
            action,
            reason,
            check: Some(check),
        });
    }
    Ok(Plan { steps })
}
