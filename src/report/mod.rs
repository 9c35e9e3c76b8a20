//! The HTML run report: one self-contained file (inline CSS and SVG, no scripts, no
//! network) showing a run's DAG, loss and learning-rate curves, eval results and outputs.
//!
//! [`collect()`] gathers a [`RunReport`] from the ledger (and `reports/eval.json` when the
//! workspace has it); [`render()`] turns it into HTML. Rendering is pure and deterministic.

pub mod chart;
pub mod collect;
pub mod graph;
pub mod html;

pub use collect::{collect, Graph, RunReport, Series, StageInfo};
pub use html::{escape, render};
