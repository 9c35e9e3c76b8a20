//! `taper export argo`: every example pipeline and a few made here (fan-out, resources,
//! retries, timeouts), as Workflow and CronWorkflow, through the real binary; each
//! manifest is read back from its YAML, validated against Argo's published JSON Schema
//! (and a strict copy that rejects unknown fields), and its DAG compared with taper's.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use taper::export::argo::{manifest_dag, STAGE_ANNOTATION};
use taper::export::task_name;

const WORKFLOW: &str = "io.argoproj.workflow.v1alpha1.Workflow";
const CRON_WORKFLOW: &str = "io.argoproj.workflow.v1alpha1.CronWorkflow";

fn schema() -> &'static Value {
    static S: OnceLock<Value> = OnceLock::new();
    S.get_or_init(|| {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemas/argo-workflows.schema.json");
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    })
}

/// The schema with its root pointing at one definition; `strict` adds
/// `additionalProperties: false` to every object definition that lists its properties.
fn validator(definition: &str, strict: bool) -> jsonschema::Validator {
    let mut s = schema().clone();
    let obj = s.as_object_mut().unwrap();
    obj.remove("oneOf");
    obj.remove("type");
    obj.insert(
        "$ref".into(),
        Value::String(format!("#/definitions/{definition}")),
    );
    if strict {
        for (_, def) in obj["definitions"].as_object_mut().unwrap() {
            let d = def.as_object_mut().unwrap();
            if d.contains_key("properties") && !d.contains_key("additionalProperties") {
                d.insert("additionalProperties".into(), Value::Bool(false));
            }
        }
    }
    jsonschema::validator_for(&s).unwrap()
}

fn assert_valid(manifest: &Value, definition: &str, what: &str) {
    for strict in [false, true] {
        let v = validator(definition, strict);
        let errors: Vec<String> = v
            .iter_errors(manifest)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{what} is not a valid {definition} (strict: {strict}):\n{}\n{}",
            errors.join("\n"),
            serde_json::to_string_pretty(manifest).unwrap()
        );
    }
}

fn export(root: &Path, pipeline: &Path, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_taper"))
        .current_dir(root)
        .arg("-C")
        .arg(root)
        .args(["export", "argo"])
        .arg(pipeline)
        .args([
            "--image",
            "registry.example/taper:1.0",
            "--pvc",
            "runs",
            "--namespace",
            "ml",
        ])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "export of {} failed: {}",
        pipeline.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_saphyr::from_str::<Value>(&text)
        .unwrap_or_else(|e| panic!("the exported YAML does not parse: {e}\n{text}"))
}

/// taper's DAG as (task name, sorted dependency task names).
fn taper_dag(root: &Path, pipeline: &Path) -> Vec<(String, Vec<String>)> {
    let loaded = taper::cli::load::load(&root.join(pipeline), &[], Some(root))
        .unwrap_or_else(|f| panic!("{}", f.message));
    let (p, dag) = (&loaded.pipeline, &loaded.dag);
    p.stages
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let mut deps: Vec<String> = dag.deps[i]
                .iter()
                .map(|&d| task_name(&p.stages[d].name))
                .collect();
            deps.sort();
            (task_name(&s.name), deps)
        })
        .collect()
}

fn templates(manifest: &Value) -> Vec<Value> {
    let spec = if manifest["kind"] == "CronWorkflow" {
        &manifest["spec"]["workflowSpec"]
    } else {
        &manifest["spec"]
    };
    spec["templates"].as_array().unwrap().clone()
}

fn check(root: &Path, pipeline: &Path, has_schedule: bool) -> (Value, Option<Value>) {
    let wf = export(root, pipeline, &[]);
    assert_eq!(wf["kind"], "Workflow");
    assert_valid(&wf, WORKFLOW, &pipeline.display().to_string());
    assert_eq!(
        manifest_dag(&wf),
        taper_dag(root, pipeline),
        "{}",
        pipeline.display()
    );
    // Every stage template runs `taper run PIPELINE --only <real name>` and keeps the
    // real name in an annotation.
    for t in templates(&wf).iter().filter(|t| t["name"] != "main") {
        let args = t["container"]["args"].as_array().unwrap();
        assert_eq!(args[0], "run");
        assert_eq!(args[1], pipeline.display().to_string());
        assert_eq!(args[2], "--only");
        assert_eq!(args[3], t["metadata"]["annotations"][STAGE_ANNOTATION]);
        assert_eq!(t["name"], task_name(args[3].as_str().unwrap()));
    }
    if !has_schedule {
        return (wf, None);
    }
    let cron = export(root, pipeline, &["--cron"]);
    assert_eq!(cron["kind"], "CronWorkflow");
    assert_valid(&cron, CRON_WORKFLOW, &pipeline.display().to_string());
    assert_eq!(manifest_dag(&cron), taper_dag(root, pipeline));
    (wf, Some(cron))
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_example_pipeline_exports_valid_manifests() {
    let mut seen = 0;
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo().join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    for f in files {
        let rel = f.strip_prefix(repo()).unwrap().to_path_buf();
        let text = std::fs::read_to_string(&f).unwrap();
        check(&repo(), &rel, text.contains("\nschedule:"));
        seen += 1;
    }
    assert!(seen > 0, "no example pipelines found");
}

const MADE: &str = r#"version: 1
name: Fan Out_Test
params:
  lrs: [1e-4, 3e-4]
resources: {gpu: 2, cpu: 4, licence: 1, nvidia.com/mig-1g.10gb: 1}
schedule:
  cron: "*/30 9-17 * * MON-FRI"
  timezone: America/New_York
  overlap: replace
  catch_up: latest
  keep_runs: 5
stages:
  prepare:
    kind: command
    outputs: [data/raw.txt]
    with: {run: "mkdir -p data && echo hi > data/raw.txt"}
  sweep:
    kind: command
    matrix: {lr: "${params.lrs}", r: [8, 16]}
    inputs: [data/raw.txt]
    outputs: ["out/sweep-${item.lr}-${item.r}.txt"]
    resources: {gpu: 1, cpu: 2, licence: 1}
    retries: 3
    backoff: 1500ms
    timeout: 1h 30m
    with: {run: "echo ${item.lr} > out/sweep-${item.lr}-${item.r}.txt"}
  mig:
    kind: command
    needs: [prepare]
    resources: {nvidia.com/mig-1g.10gb: 1}
    outputs: [out/mig.txt]
    with: {run: "mkdir -p out && echo > out/mig.txt"}
  report:
    kind: command
    needs: [sweep, mig]
    outputs: [out/report.txt]
    with: {run: "mkdir -p out && echo > out/report.txt"}
"#;

#[test]
fn fan_out_resources_retries_and_timeouts_map_onto_argo() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("made.yaml"), MADE).unwrap();
    let (wf, cron) = check(dir.path(), Path::new("made.yaml"), true);
    let cron = cron.unwrap();
    let ts = templates(&wf);
    let sweep = ts
        .iter()
        .find(|t| t["metadata"]["annotations"][STAGE_ANNOTATION] == "sweep@lr=3e-4,r=16")
        .unwrap();
    let name = sweep["name"].as_str().unwrap();
    assert!(name.starts_with("sweep-lr-3e-4-r-16-"), "{name}");
    assert_eq!(
        sweep["container"]["resources"]["limits"],
        serde_json::json!({"nvidia.com/gpu": "1", "cpu": "2"})
    );
    assert_eq!(
        sweep["retryStrategy"],
        serde_json::json!({"limit": "3", "retryPolicy": "Always", "backoff": {"duration": "1500ms", "factor": "2"}})
    );
    assert_eq!(sweep["activeDeadlineSeconds"], "5460");
    assert_eq!(sweep["container"]["workingDir"], "/workspace");
    let mig = ts.iter().find(|t| t["name"] == "mig").unwrap();
    assert_eq!(
        mig["container"]["resources"]["limits"],
        serde_json::json!({"nvidia.com/mig-1g.10gb": "1"})
    );
    let report = manifest_dag(&wf)
        .into_iter()
        .find(|(n, _)| n == "report")
        .unwrap();
    assert_eq!(report.1.len(), 5, "four sweep stages and mig: {report:?}");
    assert_eq!(wf["metadata"]["generateName"], "taper-fan-out-test-");
    assert_eq!(wf["metadata"]["namespace"], "ml");
    assert_eq!(
        wf["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"],
        "runs"
    );
    let spec = &cron["spec"];
    assert_eq!(
        spec["schedules"],
        serde_json::json!(["*/30 9-17 * * MON-FRI"])
    );
    assert_eq!(spec["timezone"], "America/New_York");
    assert_eq!(spec["concurrencyPolicy"], "Replace");
    assert_eq!(spec["startingDeadlineSeconds"], 1800);
    assert_eq!(spec["successfulJobsHistoryLimit"], 5);
    let env = &templates(&cron)[1]["container"]["env"];
    assert_eq!(
        env,
        &serde_json::json!([
            {"name": "TAPER_TRIGGER", "value": "schedule"},
            {"name": "TAPER_SCHEDULED_FOR", "value": "{{workflow.scheduledTime}}"}
        ])
    );
}

#[test]
fn cron_without_a_schedule_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "version: 1\nname: p\nstages:\n  a: {kind: command, outputs: [a.txt], with: {run: \"echo > a.txt\"}}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_taper"))
        .current_dir(dir.path())
        .args(["export", "argo", "p.yaml", "--image", "i", "--cron"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--cron needs a `schedule:` block"));
}
