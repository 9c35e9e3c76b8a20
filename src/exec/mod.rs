//! Runs a plan: worker pool, retries, timeouts, cancellation, events.

pub mod events;
pub mod publish;
pub mod recorder;
pub mod runner;
pub mod signals;

pub use events::{Event, EventSink, RunStatus, StageResult, StageStatus};
pub use recorder::{Recorder, Tee};
pub use runner::{Executor, RunOptions};
pub use signals::Signals;
