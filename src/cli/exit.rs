//! Exit codes of the `taper` binary. Documented in README.md; a script may rely on them.

/// Everything asked for succeeded (or was already up to date).
pub const SUCCESS: i32 = 0;
/// A stage failed (after its retries), or timed out.
pub const STAGE_FAILED: i32 = 1;
/// The command line could not be parsed (clap's own code).
pub const USAGE: i32 = 2;
/// The pipeline file is invalid: nothing ran.
pub const INVALID_PIPELINE: i32 = 3;
/// The workspace state could not be used: the lock is held by another run, or the
/// ledger could not be read or written.
pub const STATE_ERROR: i32 = 4;
/// A metric gate of an eval stage failed; downstream stages did not run.
pub const GATE_FAILED: i32 = 5;
/// Bad input to a command other than a pipeline file (a model folder, an adapter, a file
/// of ids), or an error taper did not classify.
pub const ERROR: i32 = 6;
/// `taper verify`: an output of the run is missing, unreadable or no longer has the
/// hash the ledger recorded (and no later run recorded its new content).
pub const VERIFY_FAILED: i32 = 7;
/// The run was interrupted (Ctrl-C or SIGTERM); 128 + SIGINT, as shells do.
pub const INTERRUPTED: i32 = 130;

/// An error on its way out of the binary: the message to print and the exit code.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: i32,
    /// Message for stderr.
    pub message: String,
}

impl Failure {
    /// A failure with `code`.
    pub fn new(code: i32, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<crate::spec::SpecErrors> for Failure {
    fn from(e: crate::spec::SpecErrors) -> Self {
        Failure::new(INVALID_PIPELINE, e.to_string())
    }
}

impl From<crate::state::LedgerError> for Failure {
    fn from(e: crate::state::LedgerError) -> Self {
        Failure::new(STATE_ERROR, format!("error: {e}"))
    }
}

impl From<crate::state::LockError> for Failure {
    fn from(e: crate::state::LockError) -> Self {
        Failure::new(STATE_ERROR, format!("error: {e}"))
    }
}

impl From<crate::plan::PlanError> for Failure {
    fn from(e: crate::plan::PlanError) -> Self {
        Failure::new(INVALID_PIPELINE, format!("error: {e}"))
    }
}
