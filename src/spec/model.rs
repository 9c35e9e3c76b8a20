//! The typed pipeline: what a valid pipeline file means, after parameters are substituted
//! and fan-out is expanded.

use super::node::{Node, Pos};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// A loaded, valid pipeline.
#[derive(Clone, Debug)]
pub struct Pipeline {
    /// The file as the user named it.
    pub file: PathBuf,
    /// The file's text, kept for quoting lines in later errors.
    pub source: Arc<str>,
    /// Format version (`version: 1`).
    pub version: u32,
    /// `name:`.
    pub name: String,
    /// The parameter tree after `--set` overrides.
    pub params: Node,
    /// Capacity of each named resource slot (`resources: {gpu: 1}`).
    pub resources: BTreeMap<String, u32>,
    /// Stages in file order, fan-out expanded.
    pub stages: Vec<Stage>,
    /// The `schedule:` block, if any (read by `taper schedule`).
    pub schedule: Option<Node>,
    /// `report: {path: ...}`: where `taper run` writes the HTML run report after a run.
    pub report: Option<ReportSpec>,
}

/// `report:` — the run report `taper run` writes after every full run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReportSpec {
    /// Normalised workspace-relative path of the HTML file.
    pub path: String,
    /// Where the path is written.
    pub pos: Pos,
}

impl Pipeline {
    /// The stage named `name`.
    pub fn stage(&self, name: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.name == name)
    }
}

/// A reference to something by name, with where it is written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Named {
    /// The name.
    pub name: String,
    /// Where it is written.
    pub pos: Pos,
}

/// A workspace-relative path declared as an input or output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathDecl {
    /// Normalised relative path (`a/b`, no `.`/`..`, no trailing slash).
    pub path: String,
    /// Where it is written.
    pub pos: Pos,
}

/// One stage of the pipeline.
#[derive(Clone, Debug)]
pub struct Stage {
    /// Unique name; generated names look like `sweep@lr=3e-4`.
    pub name: String,
    /// The name before fan-out (`sweep` for `sweep@lr=3e-4`).
    pub base_name: String,
    /// Where the stage is declared.
    pub pos: Pos,
    /// `kind:` — which stage implementation runs it.
    pub kind: Named,
    /// Explicit dependencies (`needs:`), fan-out base names already expanded.
    pub needs: Vec<Named>,
    /// Paths read.
    pub inputs: Vec<PathDecl>,
    /// Paths written.
    pub outputs: Vec<PathDecl>,
    /// The kind-specific `with:` block, parameters substituted.
    pub with: Node,
    /// Extra attempts after a failure.
    pub retries: u32,
    /// Wait before the first retry; doubles for each later one.
    pub backoff: Duration,
    /// Kill the stage after this long.
    pub timeout: Option<Duration>,
    /// Resource slots taken while running.
    pub resources: BTreeMap<String, u32>,
    /// The values this stage was generated with (`foreach`/`matrix`), as JSON.
    pub item: Option<serde_json::Value>,
}
