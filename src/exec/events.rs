//! What the executor reports. Reporters (terminal, ledger) implement [`EventSink`].

use crate::stages::StageEvent;
use crate::state::FileHash;
use std::time::Duration;

/// How a stage ended in this run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageStatus {
    /// Ran and published its outputs.
    Success,
    /// Up to date; did not run.
    Skipped,
    /// Failed (after its retries).
    Failed,
    /// Ran past its timeout (after its retries).
    TimedOut,
    /// Stopped by Ctrl-C / SIGTERM.
    Interrupted,
}

impl StageStatus {
    /// The word stored in the ledger.
    pub fn as_str(&self) -> &'static str {
        match self {
            StageStatus::Success => "success",
            StageStatus::Skipped => "skipped",
            StageStatus::Failed => "failed",
            StageStatus::TimedOut => "timed_out",
            StageStatus::Interrupted => "interrupted",
        }
    }
}

/// The outcome of one stage in a run.
#[derive(Clone, Debug, PartialEq)]
pub struct StageResult {
    /// Stage name.
    pub stage: String,
    /// Kind.
    pub kind: String,
    /// Outcome.
    pub status: StageStatus,
    /// Why it ran (or was skipped).
    pub reason: String,
    /// Attempts made (0 if skipped).
    pub attempt: u32,
    /// Start (µs since epoch).
    pub started_at: i64,
    /// End (µs since epoch).
    pub ended_at: i64,
    /// Fingerprint.
    pub fingerprint: String,
    /// Config hash.
    pub config_hash: String,
    /// Inputs with hashes.
    pub inputs: Vec<FileHash>,
    /// Published outputs with hashes.
    pub outputs: Vec<FileHash>,
    /// Error, for failures.
    pub error: Option<String>,
}

/// How the whole run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    /// Every selected stage succeeded or was up to date.
    Success,
    /// A stage failed.
    Failed,
    /// A gate failed (a kind of failure with its own exit code).
    GateFailed,
    /// Stopped by Ctrl-C / SIGTERM.
    Interrupted,
}

impl RunStatus {
    /// The word stored in the ledger.
    pub fn as_str(&self) -> &'static str {
        match self {
            RunStatus::Success => "success",
            RunStatus::Failed | RunStatus::GateFailed => "failed",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

/// Something that happened during a run.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// The run began.
    RunStarted {
        /// Run id.
        run_id: String,
        /// Stages in the plan.
        total: usize,
        /// Stages that will (probably) run.
        to_run: usize,
    },
    /// A stage starts an attempt.
    StageStarted {
        /// Stage.
        stage: String,
        /// Attempt, 1-based.
        attempt: u32,
        /// Why it runs.
        reason: String,
    },
    /// A stage reported something.
    Stage {
        /// Stage.
        stage: String,
        /// What.
        event: StageEvent,
    },
    /// An attempt failed and will be retried.
    StageRetry {
        /// Stage.
        stage: String,
        /// The failed attempt.
        attempt: u32,
        /// Why it failed.
        error: String,
        /// Wait before the next attempt.
        delay: Duration,
    },
    /// A stage finished, was skipped, or was stopped.
    StageFinished(StageResult),
    /// A stage did not run because a stage it needs failed.
    StageBlocked {
        /// Stage.
        stage: String,
        /// The failed upstream stage.
        upstream: String,
    },
    /// The run ended.
    RunFinished {
        /// Outcome.
        status: RunStatus,
        /// Wall time.
        elapsed: Duration,
    },
}

/// Receives events, in order, on the executor's thread.
pub trait EventSink {
    /// Handles one event.
    fn event(&mut self, e: &Event);
    /// Called regularly (about every 50 ms) so that sinks can flush.
    fn tick(&mut self) {}
}
