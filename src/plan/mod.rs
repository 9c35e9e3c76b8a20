//! Pipeline + recorded state -> DAG -> [`Plan`]: for each stage, run or skip and why.
//! Pure apart from hashing files (through the hash cache).

pub mod check;
pub mod fingerprint;
pub mod graph;
pub mod history;
pub mod planner;
pub mod retention;

pub use check::{check_stage, Check};
pub use graph::{missing_inputs, Dag, EdgeWhy};
pub use history::History;
pub use planner::{make_plan, Action, Plan, PlanError, PlanOptions, StagePlan};
