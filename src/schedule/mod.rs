//! Scheduled runs: the `schedule:` block, fire times across time zones and DST, the
//! scheduler loop (overlap, catch-up) with injected clock and launcher, per-run folders.
//!
//! `taper schedule` runs [`Scheduler`] with the [`SystemClock`], a [`ProcessLauncher`]
//! (each run is a `taper run` child process) and a [`LedgerJournal`].

pub mod clock;
pub mod config;
pub mod fire;
pub mod folders;
pub mod process;
pub mod scheduler;

pub use clock::{Clock, FakeClock, SystemClock};
pub use config::{CatchUp, Overlap, ScheduleConfig};
pub use process::{LedgerJournal, ProcessLauncher};
pub use scheduler::{Decision, Exit, Options, Scheduler, Why};

#[cfg(test)]
mod scheduler_tests;
