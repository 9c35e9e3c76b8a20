//! The ledger writer: turns executor events into ledger rows.
//!
//! The run's start row is written at once; stage outcomes are flushed within ~200 ms,
//! metrics within ~1 s, all at the end of the run; each flush is one atomic append per
//! table. A crash loses at most the rows of that window (never the run's start row, so a
//! killed run is always listed), and a stage whose success was not recorded simply runs
//! again.

use super::events::{Event, EventSink, StageResult};
use crate::stages::StageEvent;
use crate::state::{
    time::now_micros, EventRow, Ledger, LedgerError, MetricRow, RunRow, StageRunRow,
};
use std::time::{Duration, Instant};

/// Persists events of one run.
pub struct Recorder {
    ledger: Ledger,
    run: RunRow,
    runs: Vec<RunRow>,
    stage_runs: Vec<StageRunRow>,
    metrics: Vec<MetricRow>,
    events: Vec<EventRow>,
    urgent_since: Option<Instant>,
    metrics_since: Option<Instant>,
    /// The first ledger write that failed.
    pub error: Option<LedgerError>,
}

impl Recorder {
    /// A recorder for the run described by `run` (status `running`).
    pub fn new(ledger: Ledger, run: RunRow) -> Recorder {
        Recorder {
            ledger,
            runs: vec![run.clone()],
            run,
            stage_runs: Vec::new(),
            metrics: Vec::new(),
            events: Vec::new(),
            urgent_since: Some(Instant::now()),
            metrics_since: None,
            error: None,
        }
    }

    fn ev(&mut self, stage: Option<&str>, event: &str, message: String) {
        self.events.push(EventRow {
            run_id: self.run.run_id.clone(),
            time: now_micros(),
            stage: stage.map(str::to_string),
            event: event.to_string(),
            message,
        });
        self.urgent_since.get_or_insert_with(Instant::now);
    }

    /// Writes everything buffered.
    pub fn flush(&mut self) {
        let r = (|| {
            self.ledger.append(&self.runs)?;
            self.ledger.append(&self.stage_runs)?;
            self.ledger.append(&self.metrics)?;
            self.ledger.append(&self.events)
        })();
        match r {
            Ok(()) => {
                self.runs.clear();
                self.stage_runs.clear();
                self.metrics.clear();
                self.events.clear();
            }
            Err(e) => {
                if self.error.is_none() {
                    self.error = Some(e);
                }
            }
        }
        self.urgent_since = None;
        self.metrics_since = None;
    }

    fn stage_row(&self, r: &StageResult) -> StageRunRow {
        StageRunRow {
            run_id: self.run.run_id.clone(),
            stage: r.stage.clone(),
            kind: r.kind.clone(),
            fingerprint: r.fingerprint.clone(),
            config_hash: r.config_hash.clone(),
            status: r.status.as_str().to_string(),
            reason: r.reason.clone(),
            attempt: r.attempt,
            started_at: r.started_at,
            ended_at: Some(r.ended_at),
            inputs: r.inputs.clone(),
            outputs: r.outputs.clone(),
            error: r.error.clone(),
        }
    }
}

impl EventSink for Recorder {
    fn event(&mut self, e: &Event) {
        match e {
            Event::RunStarted { total, to_run, .. } => {
                self.ev(
                    None,
                    "run_started",
                    format!("{to_run} of {total} stages to run"),
                );
                // At once: a run killed in its first 200 ms must still have its
                // `running` row, or `taper runs` could not report it as killed.
                self.flush();
            }
            Event::StageStarted {
                stage,
                attempt,
                reason,
            } => {
                self.ev(
                    Some(stage),
                    "stage_started",
                    format!("attempt {attempt}: {reason}"),
                );
            }
            Event::Stage { stage, event } => match event {
                StageEvent::Metric { step, name, value } => {
                    self.metrics.push(MetricRow {
                        run_id: self.run.run_id.clone(),
                        stage: stage.clone(),
                        step: *step,
                        name: name.clone(),
                        value: *value,
                        time: now_micros(),
                    });
                    self.metrics_since.get_or_insert_with(Instant::now);
                }
                StageEvent::Log(line) => self.ev(Some(stage), "log", line.clone()),
                StageEvent::Progress { .. } => {}
            },
            Event::StageRetry {
                stage,
                attempt,
                error,
                delay,
            } => {
                let msg = format!(
                    "attempt {attempt} failed, retrying in {}: {error}",
                    humantime::format_duration(*delay)
                );
                self.ev(Some(stage), "stage_retry", msg);
            }
            Event::StageFinished(r) => {
                let row = self.stage_row(r);
                self.stage_runs.push(row);
                let msg = r.error.clone().unwrap_or_else(|| r.reason.clone());
                self.ev(Some(&r.stage), &format!("stage_{}", r.status.as_str()), msg);
            }
            Event::StageBlocked { stage, upstream } => {
                self.ev(
                    Some(stage),
                    "stage_blocked",
                    format!("not run: upstream stage \"{upstream}\" failed"),
                );
            }
            Event::RunFinished { status, .. } => {
                let mut row = self.run.clone();
                row.status = status.as_str().to_string();
                row.ended_at = Some(now_micros());
                self.runs.push(row);
                self.ev(None, "run_finished", status.as_str().to_string());
                self.flush();
            }
        }
    }

    fn tick(&mut self) {
        let due =
            |t: Option<Instant>, d: u64| t.is_some_and(|t| t.elapsed() >= Duration::from_millis(d));
        if due(self.urgent_since, 200) || due(self.metrics_since, 1000) {
            self.flush();
        }
    }
}

/// Sends each event to several sinks.
pub struct Tee<'a>(pub Vec<&'a mut dyn EventSink>);

impl EventSink for Tee<'_> {
    fn event(&mut self, e: &Event) {
        for s in self.0.iter_mut() {
            s.event(e);
        }
    }
    fn tick(&mut self) {
        for s in self.0.iter_mut() {
            s.tick();
        }
    }
}
