//! Shared by the pipeline commands: load + validate a pipeline, build its DAG, and plan.

use super::exit::Failure;
use crate::plan::{missing_inputs, Dag};
use crate::spec::{Pipeline, SpecErrors};
use crate::stages::{configure, StageConfig};
use std::path::Path;

/// A pipeline that passed every static check.
pub struct Loaded {
    /// The pipeline.
    pub pipeline: Pipeline,
    /// Typed config of each stage.
    pub configs: Vec<StageConfig>,
    /// The DAG.
    pub dag: Dag,
}

/// Loads `file` with `--set` overrides and checks it: stage configs, cycles and (when
/// `root` is given) inputs that nothing provides.
pub fn load(file: &Path, sets: &[String], root: Option<&Path>) -> Result<Loaded, Failure> {
    let pipeline = crate::spec::load(file, sets)?;
    let mut errors = Vec::new();
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
    })
}
