//! Pipelines for other schedulers and engines: a systemd service + timer pair, and an
//! Argo Workflows `Workflow`/`CronWorkflow` whose DAG mirrors taper's. Pure: pipeline,
//! DAG and schedule in, text or JSON out; the CLI prints.

pub mod argo;
pub mod systemd;

pub use argo::{argo, task_name, ArgoOptions, ExportError, Manifest};
pub use systemd::{on_calendar, units, Units};
