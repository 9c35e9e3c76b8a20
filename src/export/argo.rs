//! A pipeline as an Argo `Workflow` or `CronWorkflow`: one DAG task per stage, each
//! running `taper run PIPELINE --only STAGE` in a container, all sharing the workspace on
//! a PersistentVolumeClaim.
//!
//! Mapping: `needs` and path edges -> `dependencies`; resource slots -> container
//! `resources.limits` (`gpu` -> `nvidia.com/gpu` or `--gpu-resource`; `cpu` -> `cpu`;
//! names with a `/` pass as they are; other slots have no Kubernetes meaning and are left
//! out, with a warning); `retries`/`backoff` -> `retryStrategy` (factor 2, as taper
//! doubles); `timeout` -> `activeDeadlineSeconds` (plus a minute, so taper's own timeout
//! fires first and is recorded). For `CronWorkflow`: `schedules`, `timezone`, overlap ->
//! `concurrencyPolicy` (skip: Forbid, replace: Replace, queue: Allow — Argo cannot queue),
//! `catch_up: latest` -> `startingDeadlineSeconds` of one interval, `keep_runs` -> the
//! history limits.

use crate::plan::Dag;
use crate::schedule::{CatchUp, Overlap, ScheduleConfig};
use crate::spec::Pipeline;
use serde_json::{json, Map, Value};
use std::collections::BTreeSet;

/// The annotation that keeps a task's real stage name.
pub const STAGE_ANNOTATION: &str = "taper.dev/stage";
/// Where the workspace volume is mounted; the container's working folder.
pub const WORKSPACE_MOUNT: &str = "/workspace";
/// Slack added to a stage's `timeout` for `activeDeadlineSeconds`.
pub const DEADLINE_SLACK_SECS: u64 = 60;

/// What `taper export argo` was asked for.
#[derive(Clone, Debug)]
pub struct ArgoOptions {
    /// The container image (holds the `taper` binary).
    pub image: String,
    /// A `CronWorkflow` from the `schedule:` block instead of a `Workflow`.
    pub cron: bool,
    /// The PersistentVolumeClaim holding the workspace.
    pub pvc: String,
    /// `metadata.namespace`.
    pub namespace: Option<String>,
    /// The pipeline file as the container sees it (relative to the workspace).
    pub pipeline_arg: String,
    /// `--set` overrides passed on to each task.
    pub sets: Vec<String>,
    /// The Kubernetes resource name of the `gpu` slot.
    pub gpu_resource: String,
}

/// Why a pipeline cannot be exported.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// `--cron` without a `schedule:` block.
    #[error("--cron needs a `schedule:` block in {0}")]
    NoSchedule(String),
}

/// An exported manifest and what did not map.
#[derive(Clone, Debug)]
pub struct Manifest {
    /// The resource, as JSON (also valid YAML).
    pub value: Value,
    /// Things that could not be carried over.
    pub warnings: Vec<String>,
}

/// A DNS-1123 label for a stage (what Argo accepts as a task and template name):
/// lowercase letters, digits and `-`, starting with a letter, at most 63 characters. A
/// name that had to change gets a short hash of the real name, so names stay unique.
pub fn task_name(stage: &str) -> String {
    let out = sanitize(stage);
    if out == stage && out.len() <= 63 {
        return out;
    }
    let hash = blake3::hash(stage.as_bytes()).to_hex();
    let mut out = out;
    out.truncate(54);
    let out = out.trim_end_matches('-');
    format!("{out}-{}", &hash[..8])
}

/// Lowercase letters, digits and single `-`, starting with a letter.
fn sanitize(text: &str) -> String {
    let mut out = String::new();
    for c in text.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut out = out.trim_matches('-').to_string();
    if !out.starts_with(|c: char| c.is_ascii_lowercase()) {
        out.insert_str(0, "s-");
    }
    out
}

/// Go-style duration text (`90s`, `250ms`).
fn go_duration(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

/// A resource name (no hash: one pipeline, one name), short enough for Argo to add its
/// suffixes.
fn k8s_name(text: &str) -> String {
    let n = sanitize(text);
    n.chars()
        .take(52)
        .collect::<String>()
        .trim_end_matches('-')
        .to_string()
}

/// Builds the manifest.
pub fn argo(
    pipeline: &Pipeline,
    dag: &Dag,
    schedule: Option<&ScheduleConfig>,
    opts: &ArgoOptions,
) -> Result<Manifest, ExportError> {
    let mut warnings = Vec::new();
    let names: Vec<String> = pipeline.stages.iter().map(|s| task_name(&s.name)).collect();
    let mut env = vec![
        json!({"name": "TAPER_TRIGGER", "value": if opts.cron { "schedule" } else { "manual" }}),
    ];
    if opts.cron {
        env.push(json!({"name": "TAPER_SCHEDULED_FOR", "value": "{{workflow.scheduledTime}}"}));
    } else {
        env.push(json!({"name": "TAPER_RUN_TIME", "value": "{{workflow.creationTimestamp}}"}));
    }
    let mut tasks = Vec::new();
    let mut templates = Vec::new();
    let mut unmapped = BTreeSet::new();
    for (i, stage) in pipeline.stages.iter().enumerate() {
        let mut task = Map::new();
        task.insert("name".into(), json!(names[i]));
        task.insert("template".into(), json!(names[i]));
        if !dag.deps[i].is_empty() {
            let deps: Vec<&str> = dag.deps[i].iter().map(|&d| names[d].as_str()).collect();
            task.insert("dependencies".into(), json!(deps));
        }
        tasks.push(Value::Object(task));

        let mut args = vec![
            "run".to_string(),
            opts.pipeline_arg.clone(),
            "--only".into(),
            stage.name.clone(),
            "--no-retries".into(),
        ];
        for s in &opts.sets {
            args.push("--set".into());
            args.push(s.clone());
        }
        let mut limits = Map::new();
        for (slot, amount) in &stage.resources {
            let name = match slot.as_str() {
                "gpu" => opts.gpu_resource.clone(),
                "cpu" => "cpu".to_string(),
                s if s.contains('/') => s.to_string(),
                _ => {
                    unmapped.insert(slot.clone());
                    continue;
                }
            };
            limits.insert(name, json!(amount.to_string()));
        }
        let mut container = json!({
            "image": opts.image,
            "command": ["taper"],
            "args": args,
            "workingDir": WORKSPACE_MOUNT,
            "env": env,
            "volumeMounts": [{"name": "workspace", "mountPath": WORKSPACE_MOUNT}],
        });
        if !limits.is_empty() {
            container["resources"] = json!({ "limits": limits });
        }
        let mut template = json!({
            "name": names[i],
            "metadata": {"annotations": {STAGE_ANNOTATION: stage.name}},
            "container": container,
        });
        if stage.retries > 0 {
            template["retryStrategy"] = json!({
                "limit": stage.retries.to_string(),
                "retryPolicy": "Always",
                "backoff": {"duration": go_duration(stage.backoff), "factor": "2"},
            });
        }
        if let Some(t) = stage.timeout {
            let secs = t.as_secs() + u64::from(t.subsec_nanos() > 0) + DEADLINE_SLACK_SECS;
            template["activeDeadlineSeconds"] = json!(secs.to_string());
        }
        templates.push(template);
    }
    if !unmapped.is_empty() {
        let list: Vec<String> = unmapped.into_iter().collect();
        warnings.push(format!(
            "resource slot(s) {} have no Kubernetes resource and are left out (they limit concurrency inside one taper process only)",
            list.join(", ")
        ));
    }
    let mut all = vec![json!({"name": "main", "dag": {"tasks": tasks}})];
    all.extend(templates);
    let workflow_spec = json!({
        "entrypoint": "main",
        "templates": all,
        "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": opts.pvc}}],
    });
    let base = k8s_name(&format!("taper-{}", pipeline.name));
    let mut metadata = Map::new();
    let annotations =
        json!({"taper.dev/pipeline": pipeline.name, "taper.dev/file": opts.pipeline_arg});
    let value = if opts.cron {
        let s =
            schedule.ok_or_else(|| ExportError::NoSchedule(pipeline.file.display().to_string()))?;
        metadata.insert("name".into(), json!(base));
        let mut spec = json!({
            "schedules": [s.cron_text],
            "timezone": s.timezone_name,
            "concurrencyPolicy": match s.overlap {
                Overlap::Skip => "Forbid",
                Overlap::Replace => "Replace",
                Overlap::Queue => "Allow",
            },
            "workflowMetadata": {"annotations": annotations.clone()},
            "workflowSpec": workflow_spec,
        });
        if s.overlap == Overlap::Queue {
            warnings.push("overlap: queue has no Argo equivalent; concurrencyPolicy Allow runs overlapping workflows at once".into());
        }
        match s.catch_up {
            CatchUp::None => {}
            CatchUp::Latest | CatchUp::All => {
                // From a fixed instant, so that the same file exports the same manifest.
                let mut fires = s.fires_after(jiff::Timestamp::UNIX_EPOCH);
                if let (Some(a), Some(b)) = (fires.next(), fires.next()) {
                    let secs = b.timestamp().duration_since(a.timestamp()).as_secs();
                    spec["startingDeadlineSeconds"] = json!(secs.max(1));
                }
                if s.catch_up == CatchUp::All {
                    warnings.push("catch_up: all has no Argo equivalent; Argo starts at most the latest missed run (startingDeadlineSeconds)".into());
                }
            }
        }
        if let Some(k) = s.keep_runs {
            spec["successfulJobsHistoryLimit"] = json!(k);
            spec["failedJobsHistoryLimit"] = json!(k);
        }
        json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "CronWorkflow", "metadata": metadata, "spec": spec})
    } else {
        metadata.insert("generateName".into(), json!(format!("{base}-")));
        metadata.insert("annotations".into(), annotations);
        json!({"apiVersion": "argoproj.io/v1alpha1", "kind": "Workflow", "metadata": metadata, "spec": workflow_spec})
    };
    let mut value = value;
    if let Some(ns) = &opts.namespace {
        value["metadata"]["namespace"] = json!(ns);
    }
    Ok(Manifest { value, warnings })
}

/// The manifest's DAG as (task, sorted dependencies), for checks.
pub fn manifest_dag(value: &Value) -> Vec<(String, Vec<String>)> {
    let spec = value
        .get("spec")
        .and_then(|s| s.get("workflowSpec").or(Some(s)))
        .cloned()
        .unwrap_or_default();
    let tasks = spec["templates"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["name"] == "main"))
        .and_then(|t| t["dag"]["tasks"].as_array())
        .cloned()
        .unwrap_or_default();
    tasks
        .iter()
        .map(|t| {
            let mut deps: Vec<String> = t["dependencies"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .filter_map(|x| x.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            deps.sort();
            (t["name"].as_str().unwrap_or_default().to_string(), deps)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_are_dns_labels_and_unique() {
        assert_eq!(task_name("train"), "train");
        assert_eq!(task_name("eval-2"), "eval-2");
        let a = task_name("sweep@lr=3e-4,r=8");
        let b = task_name("sweep@lr=3e-4,r=16");
        assert!(a.starts_with("sweep-lr-3e-4-r-8-"), "{a}");
        assert_ne!(a, b);
        assert_ne!(task_name("Train"), task_name("train"));
        assert!(task_name("_x").starts_with("x-"));
        assert!(task_name("9lives").starts_with("s-9lives-"));
        let long = task_name(&"a".repeat(100));
        assert!(long.len() <= 63, "{long}");
        for n in [a, b, long, task_name("a.b_c")] {
            assert!(n.len() <= 63);
            assert!(n
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
            assert!(!n.ends_with('-') && n.starts_with(|c: char| c.is_ascii_lowercase()));
        }
    }
}
