//! The terminal reporter: renders executor events as lines on stderr (and in the run's
//! log file `.taper/runs/<run>/run.log`), with a progress bar per running stage when
//! stderr is a terminal.

use crate::exec::{Event, EventSink, RunStatus, StageStatus};
use crate::stages::StageEvent;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

/// Renders events for a person.
pub struct Console {
    tty: bool,
    log: Option<std::fs::File>,
    bars: MultiProgress,
    running: HashMap<String, ProgressBar>,
    counts: HashMap<&'static str, usize>,
}

impl Console {
    /// A reporter that also writes its lines to `log`.
    pub fn new(log: Option<std::fs::File>) -> Console {
        let tty = std::io::stderr().is_terminal();
        let target = if tty {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Console {
            tty,
            log,
            bars: MultiProgress::with_draw_target(target),
            running: HashMap::new(),
            counts: HashMap::new(),
        }
    }

    fn line(&mut self, text: String) {
        if self.tty {
            let _ = self.bars.println(&text);
        } else {
            eprintln!("{text}");
        }
        if let Some(f) = self.log.as_mut() {
            let _ = writeln!(f, "{} {text}", crate::state::time::now_rfc3339());
        }
    }

    fn bar(&mut self, stage: &str) -> &ProgressBar {
        let bars = &self.bars;
        self.running.entry(stage.to_string()).or_insert_with(|| {
            let b = bars.add(ProgressBar::new_spinner());
            b.set_style(
                ProgressStyle::with_template("  {spinner} {prefix} {wide_msg} {elapsed}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_prefix(stage.to_string());
            b.enable_steady_tick(Duration::from_millis(200));
            b
        })
    }
}

fn secs(micros: i64) -> String {
    format!("{:.2}s", micros.max(0) as f64 / 1e6)
}

impl EventSink for Console {
    fn event(&mut self, e: &Event) {
        match e {
            Event::RunStarted {
                run_id,
                total,
                to_run,
            } => {
                self.line(format!("run {run_id}: {to_run} of {total} stages to run"));
            }
            Event::StageStarted {
                stage,
                attempt,
                reason,
            } => {
                let again = if *attempt > 1 {
                    format!(" (attempt {attempt})")
                } else {
                    String::new()
                };
                self.line(format!("  > {stage}{again}: {reason}"));
                if self.tty {
                    self.bar(stage).set_message("running");
                }
            }
            Event::Stage { stage, event } => {
                if let StageEvent::Progress {
                    done,
                    total,
                    unit,
                    message,
                } = event
                {
                    if self.tty {
                        let (done, total, unit, message) =
                            (*done, *total, unit.clone(), message.clone());
                        let b = self.bar(stage);
                        let of = total.map(|t| format!("/{t}")).unwrap_or_default();
                        b.set_message(format!("{done}{of} {unit} {message}"));
                    }
                }
            }
            Event::StageRetry {
                stage,
                attempt,
                error,
                delay,
            } => {
                let first = error.lines().next().unwrap_or_default();
                self.line(format!(
                    "  ! {stage}: attempt {attempt} failed, retrying in {}: {first}",
                    humantime::format_duration(*delay)
                ));
            }
            Event::StageFinished(r) => {
                if let Some(b) = self.running.remove(&r.stage) {
                    b.finish_and_clear();
                }
                let took = secs(r.ended_at - r.started_at);
                let text = match r.status {
                    StageStatus::Success => format!("  ok {} ({took})", r.stage),
                    StageStatus::Skipped => format!("  -- {}: {}", r.stage, r.reason),
                    StageStatus::Failed | StageStatus::TimedOut => {
                        format!(
                            "  FAILED {} ({took}): {}",
                            r.stage,
                            r.error.clone().unwrap_or_default()
                        )
                    }
                    StageStatus::Interrupted => format!("  interrupted {} ({took})", r.stage),
                };
                *self.counts.entry(r.status.as_str()).or_default() += 1;
                self.line(text);
            }
            Event::StageBlocked { stage, upstream } => {
                *self.counts.entry("not run").or_default() += 1;
                self.line(format!(
                    "  -- {stage}: not run, upstream stage \"{upstream}\" failed"
                ));
            }
            Event::RunFinished { status, elapsed } => {
                let mut parts: Vec<String> = [
                    "success",
                    "skipped",
                    "failed",
                    "timed_out",
                    "interrupted",
                    "not run",
                ]
                .iter()
                .filter_map(|k| {
                    self.counts.get(k).map(|n| {
                        format!(
                            "{n} {}",
                            k.replace("success", "ran").replace("skipped", "up to date")
                        )
                    })
                })
                .collect();
                if parts.is_empty() {
                    parts.push("nothing to do".into());
                }
                let word = match status {
                    RunStatus::Success => "succeeded",
                    RunStatus::Failed => "failed",
                    RunStatus::GateFailed => "failed a gate",
                    RunStatus::Interrupted => "was interrupted",
                };
                self.line(format!(
                    "run {word} in {:.2}s ({})",
                    elapsed.as_secs_f64(),
                    parts.join(", ")
                ));
            }
        }
    }
}
