//! The real effects of the scheduler: each run is a `taper run PIPELINE` child process,
//! and each decision an `events` row in the ledger.

use super::fire::rfc3339;
use super::scheduler::{Child, Decision, Journal, Launcher};
use crate::state::{lock, EventRow, Layout, Ledger};
use jiff::{Timestamp, Zoned};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

/// Starts `taper run` children.
pub struct ProcessLauncher {
    /// The taper binary (`std::env::current_exe()`).
    pub exe: PathBuf,
    /// The workspace.
    pub layout: Layout,
    /// The pipeline file, as the user named it.
    pub pipeline: PathBuf,
    /// `--set` overrides passed on.
    pub sets: Vec<String>,
}

impl Launcher for ProcessLauncher {
    fn start(&mut self, scheduled_for: &Zoned) -> Result<Box<dyn Child>, String> {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("-C")
            .arg(&self.layout.root)
            .arg("run")
            .arg(&self.pipeline);
        for s in &self.sets {
            cmd.arg("--set").arg(s);
        }
        cmd.env("TAPER_TRIGGER", "schedule")
            .env("TAPER_SCHEDULED_FOR", rfc3339(scheduled_for.timestamp()))
            .env_remove("TAPER_RUN_TIME")
            // Its own process group: a Ctrl-C in the terminal reaches only the scheduler,
            // which forwards it once.
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.exe.display()))?;
        Ok(Box::new(Process(child)))
    }

    fn foreign_holder(&mut self) -> Option<String> {
        lock::current_holders(&self.layout)
            .first()
            .map(|h| h.to_string())
    }
}

struct Process(std::process::Child);

impl Child for Process {
    fn try_wait(&mut self) -> Option<Option<i32>> {
        match self.0.try_wait() {
            Ok(Some(status)) => Some(status.code()),
            Ok(None) => None,
            Err(_) => Some(None),
        }
    }

    fn stop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            // SAFETY: kill(2) with a pid we spawned and have not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
    }
}

/// Records decisions as `events` rows (`run_id` "schedule").
pub struct LedgerJournal {
    /// The ledger.
    pub ledger: Ledger,
    /// The pipeline's name, put in front of each message.
    pub pipeline_name: String,
    /// The first error, if recording failed.
    pub error: Option<String>,
}

impl Journal for LedgerJournal {
    fn record(&mut self, now: Timestamp, d: &Decision) {
        let message = format!("{}: {}", self.pipeline_name, d.message());
        let row = EventRow {
            run_id: "schedule".into(),
            time: now.as_microsecond(),
            stage: None,
            event: d.event().into(),
            message,
        };
        if let Err(e) = self.ledger.append(&[row]) {
            self.error.get_or_insert_with(|| e.to_string());
        }
    }
}
