//! The terminal reporter: renders executor events as lines on stderr (and in the run's
//! log file `.taper/runs/<run>/run.log`), with a progress bar per running stage when
//! stderr is a terminal.

use crate::exec::{Event, EventSink, RunStatus, StageStatus};
use crate::stages::StageEvent;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Renders events for a person.
pub struct Console {
    tty: bool,
    log: Option<std::fs::File>,
    bars: MultiProgress,
    running: HashMap<String, ProgressBar>,
    counts: HashMap<&'static str, usize>,
    /// When each running stage started, and the last `*/tokens_per_s` it logged.
    started: HashMap<String, Instant>,
    tokens_per_s: HashMap<String, f64>,
    /// Last progress count printed as a plain line, per stage (non-TTY).
    printed: HashMap<String, u64>,
}

/// The text of a progress update: `step 12/300 loss 2.3100 1.2k tok/s ETA 1m 5s`. `rate`
/// is tokens per second, when the stage logs it; the ETA is extrapolated from the time
/// the stage has taken so far.
pub fn progress_text(
    done: u64,
    total: Option<u64>,
    unit: &str,
    message: &str,
    rate: Option<f64>,
    elapsed: Duration,
) -> String {
    let unit = match unit {
        "steps" => "step",
        u => u,
    };
    let mut parts = vec![match total {
        Some(t) => format!("{unit} {done}/{t}"),
        None => format!("{unit} {done}"),
    }];
    if !message.is_empty() {
        parts.push(message.to_string());
    }
    if let Some(r) = rate.filter(|r| r.is_finite()) {
        parts.push(if r >= 1000.0 {
            format!("{:.1}k tok/s", r / 1000.0)
        } else {
            format!("{r:.0} tok/s")
        });
    }
    if let Some(t) = total.filter(|&t| done > 0 && done < t) {
        let left = elapsed.as_secs_f64() / done as f64 * (t - done) as f64;
        let left = Duration::from_secs(left.round() as u64);
        parts.push(format!("ETA {}", humantime::format_duration(left)));
    }
    parts.join(" ")
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
            started: HashMap::new(),
            tokens_per_s: HashMap::new(),
            printed: HashMap::new(),
        }
    }

    fn line(&mut self, text: String) {
        if self.tty {
            let _ = self.bars.println(&text);
        } else {
            // Not `eprintln!`: a run goes on (and records its end) when whoever reads
            // its stderr has gone away.
            let _ = writeln!(std::io::stderr(), "{text}");
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
                self.started.insert(stage.clone(), Instant::now());
                self.printed.remove(stage);
                if self.tty {
                    self.bar(stage).set_message("running");
                }
            }
            Event::Stage { stage, event } => match event {
                StageEvent::Metric { name, value, .. } if name.ends_with("tokens_per_s") => {
                    self.tokens_per_s.insert(stage.clone(), *value);
                }
                StageEvent::Progress {
                    done,
                    total,
                    unit,
                    message,
                } => {
                    let elapsed = self
                        .started
                        .get(stage)
                        .map(|t| t.elapsed())
                        .unwrap_or_default();
                    let rate = self.tokens_per_s.get(stage).copied();
                    let text = progress_text(*done, *total, unit, message, rate, elapsed);
                    if self.tty {
                        let (done, total) = (*done, *total);
                        let b = self.bar(stage);
                        if let Some(t) = total {
                            if b.length() != Some(t) {
                                b.set_length(t);
                                b.set_style(
                                    ProgressStyle::with_template(
                                        "  {spinner} {prefix} [{bar:30}] {wide_msg} {elapsed}",
                                    )
                                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                                    .progress_chars("=> "),
                                );
                            }
                            b.set_position(done);
                        }
                        b.set_message(text);
                    } else {
                        // Piped: a plain line at every tenth of the way (and the end).
                        let step = total.map(|t| (t / 10).max(1)).unwrap_or(1);
                        let last = self.printed.get(stage).copied();
                        let due = Some(*done) == *total
                            || last.is_none_or(|l| *done >= l.saturating_add(step));
                        if due {
                            self.printed.insert(stage.clone(), *done);
                            self.line(format!("  . {stage}: {text}"));
                        }
                    }
                }
                _ => {}
            },
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
                self.started.remove(&r.stage);
                self.tokens_per_s.remove(&r.stage);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_progress_reads_step_loss_rate_eta() {
        let t = progress_text(
            10,
            Some(40),
            "steps",
            "loss 2.3100",
            Some(1534.0),
            Duration::from_secs(20),
        );
        assert_eq!(t, "step 10/40 loss 2.3100 1.5k tok/s ETA 1m");
        let t = progress_text(
            40,
            Some(40),
            "steps",
            "loss 1.0",
            None,
            Duration::from_secs(80),
        );
        assert_eq!(t, "step 40/40 loss 1.0");
        assert_eq!(
            progress_text(7, None, "records", "", Some(12.0), Duration::ZERO),
            "records 7 12 tok/s"
        );
    }
}
