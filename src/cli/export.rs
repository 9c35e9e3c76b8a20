//! `taper export systemd|argo`: the pipeline for another scheduler or engine.

use super::exit::{self, Failure};
use super::load::load;
use crate::export::{argo, units, ArgoOptions};
use crate::state::Layout;
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};

/// `taper export` options.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// What to export to.
    #[command(subcommand)]
    pub target: Target,
}

/// Export targets.
#[derive(Debug, Subcommand)]
pub enum Target {
    /// A systemd service + timer pair that runs the pipeline on its `schedule:`.
    Systemd(SystemdArgs),
    /// An Argo Workflow (or CronWorkflow) with one task per stage.
    Argo(ArgoArgs),
}

/// `taper export systemd` options.
#[derive(Debug, Args)]
pub struct SystemdArgs {
    /// The pipeline file (it needs a `schedule:` block).
    pub pipeline: PathBuf,
    /// Write `taper-NAME.service` and `taper-NAME.timer` into DIR instead of stdout.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Override a parameter for every run (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

/// `taper export argo` options.
#[derive(Debug, Args)]
pub struct ArgoArgs {
    /// The pipeline file, as a path relative to the workspace (the container runs in the
    /// workspace on the volume).
    pub pipeline: PathBuf,
    /// The container image; it must contain the `taper` binary on its PATH.
    #[arg(long)]
    pub image: String,
    /// A CronWorkflow from the `schedule:` block instead of a Workflow.
    #[arg(long)]
    pub cron: bool,
    /// The PersistentVolumeClaim that holds the workspace.
    #[arg(long, default_value = "taper-workspace", value_name = "NAME")]
    pub pvc: String,
    /// `metadata.namespace` of the resource.
    #[arg(long, value_name = "NS")]
    pub namespace: Option<String>,
    /// The Kubernetes resource the `gpu` slot maps to.
    #[arg(long, default_value = "nvidia.com/gpu", value_name = "NAME")]
    pub gpu_resource: String,
    /// Override a parameter in every task (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

/// `taper export`.
pub fn export(layout: &Layout, a: &ExportArgs) -> Result<i32, Failure> {
    match &a.target {
        Target::Systemd(s) => systemd(layout, s),
        Target::Argo(s) => argo_cmd(layout, s),
    }
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn systemd(layout: &Layout, a: &SystemdArgs) -> Result<i32, Failure> {
    let loaded = load(&a.pipeline, &a.sets, Some(&layout.root))?;
    let Some(schedule) = &loaded.schedule else {
        return Err(Failure::new(
            exit::INVALID_PIPELINE,
            format!(
                "error: {}: no `schedule:` block to export",
                a.pipeline.display()
            ),
        ));
    };
    let exe = std::env::current_exe().map_err(|e| {
        Failure::new(
            exit::ERROR,
            format!("error: cannot find the taper binary: {e}"),
        )
    })?;
    let u = units(
        &loaded.pipeline,
        schedule,
        &exe,
        &absolute(&layout.root),
        &absolute(&a.pipeline),
        &a.sets,
    )
    .map_err(|m| {
        Failure::new(
            exit::INVALID_PIPELINE,
            format!(
                "error: {}: key `schedule.cron`: cannot export to systemd: {m}",
                a.pipeline.display()
            ),
        )
    })?;
    for w in &u.warnings {
        eprintln!("warning: {w}");
    }
    match &a.out {
        Some(dir) => {
            let write = |name: &str, text: &str| {
                std::fs::create_dir_all(dir)
                    .and_then(|_| std::fs::write(dir.join(name), text))
                    .map_err(|e| {
                        Failure::new(
                            exit::ERROR,
                            format!("error: cannot write {}: {e}", dir.join(name).display()),
                        )
                    })
            };
            write(&u.service_name, &u.service)?;
            write(&u.timer_name, &u.timer)?;
            eprintln!(
                "wrote {0}/{1} and {0}/{2}; install them with:\n  cp {0}/{1} {0}/{2} /etc/systemd/system/ && systemctl daemon-reload && systemctl enable --now {2}",
                dir.display(),
                u.service_name,
                u.timer_name
            );
        }
        None => {
            println!("# ---- {} ----\n{}", u.service_name, u.service);
            println!("# ---- {} ----\n{}", u.timer_name, u.timer);
        }
    }
    Ok(exit::SUCCESS)
}

fn argo_cmd(layout: &Layout, a: &ArgoArgs) -> Result<i32, Failure> {
    let loaded = load(&a.pipeline, &a.sets, Some(&layout.root))?;
    if a.pipeline.is_absolute() {
        eprintln!(
            "warning: {} is an absolute path; the container must see the pipeline file at the same path",
            a.pipeline.display()
        );
    }
    let opts = ArgoOptions {
        image: a.image.clone(),
        cron: a.cron,
        pvc: a.pvc.clone(),
        namespace: a.namespace.clone(),
        pipeline_arg: a.pipeline.display().to_string(),
        sets: a.sets.clone(),
        gpu_resource: a.gpu_resource.clone(),
    };
    let m = argo(
        &loaded.pipeline,
        &loaded.dag,
        loaded.schedule.as_ref(),
        &opts,
    )
    .map_err(|e| Failure::new(exit::INVALID_PIPELINE, format!("error: {e}")))?;
    for w in &m.warnings {
        eprintln!("warning: {w}");
    }
    let text = serde_saphyr::to_string(&m.value)
        .unwrap_or_else(|_| serde_json::to_string_pretty(&m.value).unwrap_or_default());
    print!("{text}");
    if !text.ends_with('\n') {
        println!();
    }
    Ok(exit::SUCCESS)
}
