//! What a stage gets to work with, and what it can say back.
//!
//! A stage never prints: it reports [`StageEvent`]s through its context, and the
//! executor forwards them to the reporters (terminal, ledger).

use crate::spec::Stage;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Why a stage is asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// Ctrl-C or SIGTERM: finish cleanly if you can.
    Interrupt,
    /// The stage ran past its `timeout`.
    Timeout,
    /// A second Ctrl-C: stop now.
    Kill,
}

/// A shared flag a running stage polls to learn that it should stop.
#[derive(Clone, Debug, Default)]
pub struct CancelToken(Arc<AtomicU8>);

impl CancelToken {
    /// A token nobody has cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the holder to stop. A stronger reason replaces a weaker one.
    pub fn cancel(&self, reason: StopReason) {
        let code = match reason {
            StopReason::Interrupt => 1,
            StopReason::Timeout => 2,
            StopReason::Kill => 3,
        };
        self.0.fetch_max(code, Ordering::SeqCst);
    }

    /// Why the holder should stop, if it should.
    pub fn reason(&self) -> Option<StopReason> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            1 => Some(StopReason::Interrupt),
            2 => Some(StopReason::Timeout),
            _ => Some(StopReason::Kill),
        }
    }

    /// Whether the holder should stop.
    pub fn is_cancelled(&self) -> bool {
        self.reason().is_some()
    }
}

/// Something a running stage reports.
#[derive(Clone, Debug, PartialEq)]
pub enum StageEvent {
    /// A line of output for the stage's log.
    Log(String),
    /// A named value at a step (loss, lr, tokens/s ...), for the `metrics` table.
    Metric {
        /// Step (0 for single values).
        step: i64,
        /// Metric name.
        name: String,
        /// Value.
        value: f64,
    },
    /// Progress of the stage's main loop.
    Progress {
        /// Units done.
        done: u64,
        /// Units in all, if known.
        total: Option<u64>,
        /// What the unit is ("steps", "records").
        unit: String,
        /// A short status text ("loss 2.31").
        message: String,
    },
}

/// Everything a stage run needs.
pub struct StageContext<'a> {
    /// The run this attempt belongs to.
    pub run_id: &'a str,
    /// The stage as declared.
    pub stage: &'a Stage,
    /// The workspace root; inputs are read relative to it.
    pub workspace: &'a Path,
    /// The stage's private staging folder: outputs are written here under their
    /// workspace-relative paths, and published by the executor only on success.
    pub staging: &'a Path,
    /// Attempt number, 1-based.
    pub attempt: u32,
    /// Polled to learn about Ctrl-C and timeouts.
    pub cancel: &'a CancelToken,
    /// When the stage's timeout expires, if it has one.
    pub deadline: Option<Instant>,
    /// The stage's log file for this run.
    pub log_file: PathBuf,
    /// Where events go.
    pub events: &'a (dyn Fn(StageEvent) + Sync),
}

impl StageContext<'_> {
    /// Reports an event.
    pub fn emit(&self, e: StageEvent) {
        (self.events)(e)
    }

    /// Reports a metric.
    pub fn metric(&self, step: i64, name: &str, value: f64) {
        self.emit(StageEvent::Metric {
            step,
            name: name.to_string(),
            value,
        })
    }

    /// The staging path of a workspace-relative output path.
    pub fn staged(&self, rel: &str) -> PathBuf {
        self.staging.join(rel)
    }

    /// Returns the stop reason as an error if the stage has been asked to stop.
    pub fn check_cancelled(&self) -> Result<(), StageError> {
        match self.cancel.reason() {
            None => Ok(()),
            Some(r) => Err(StageError::Stopped(r)),
        }
    }
}

/// How a stage attempt ended, when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The stage failed; the message says why. Retried if the stage has retries left.
    #[error("{0}")]
    Failed(String),
    /// A metric gate failed. Not retried.
    #[error("gate failed: {0}")]
    Gate(String),
    /// The stage stopped because it was asked to.
    #[error("{}", match .0 { StopReason::Timeout => "timed out", _ => "interrupted" })]
    Stopped(StopReason),
}
