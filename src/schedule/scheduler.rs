//! The scheduler loop: sleep until the next fire time, start a run, apply the overlap
//! policy to fires that come while a run is going, catch up after downtime.
//!
//! Everything with an effect is injected: time ([`Clock`]), starting and stopping runs
//! and looking at the workspace lock ([`Launcher`]), and recording decisions
//! ([`Journal`]). The real ones spawn `taper run` and append `events` rows; the tests use
//! a fake clock and fake runs, and never sleep.
//!
//! Every start goes through one queue (the backlog): catch-up fires first, oldest first,
//! then fires as they come. Only one run of the schedule goes at a time.

use super::clock::Clock;
use super::config::{CatchUp, Overlap, ScheduleConfig, MAX_CATCH_UP};
use super::fire::rfc3339;
use jiff::{Timestamp, Zoned};
use std::collections::VecDeque;

/// A run started by the scheduler.
pub trait Child {
    /// `Some(exit code)` once it ended (`Some(None)`: killed by a signal).
    fn try_wait(&mut self) -> Option<Option<i32>>;
    /// Asks it to stop (SIGTERM; a second call asks harder).
    fn stop(&mut self);
}

/// Starts runs and looks at the workspace.
pub trait Launcher {
    /// Starts the run for fire time `scheduled_for`.
    fn start(&mut self, scheduled_for: &Zoned) -> Result<Box<dyn Child>, String>;
    /// Who holds the workspace lock, when it is not a run of ours (a manual run).
    fn foreign_holder(&mut self) -> Option<String>;
}

/// Records what the scheduler decided.
pub trait Journal {
    /// Records one decision, made at `now`.
    fn record(&mut self, now: Timestamp, decision: &Decision);
}

/// Why a run was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// Its fire time came.
    Fired,
    /// It was missed while taper was not running (`catch_up`).
    CatchUp,
    /// It waited for the previous run (`overlap: queue`).
    Queued,
    /// It replaced the previous run (`overlap: replace`).
    Replaced,
}

/// One decision of the scheduler; each becomes an `events` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A run was started for `scheduled_for`.
    Started {
        /// The fire time.
        scheduled_for: Timestamp,
        /// Why now.
        why: Why,
    },
    /// A run ended.
    Finished {
        /// Its fire time.
        scheduled_for: Timestamp,
        /// Its exit code (`None`: killed by a signal).
        code: Option<i32>,
    },
    /// A fire time was not run.
    Skipped {
        /// The fire time.
        scheduled_for: Timestamp,
        /// Why.
        reason: String,
    },
    /// A fire time waits for the running run.
    Queued {
        /// The fire time.
        scheduled_for: Timestamp,
        /// What it waits for.
        reason: String,
    },
    /// The running run is being stopped for a newer fire time.
    Replacing {
        /// The run being stopped.
        old: Timestamp,
        /// The fire that replaces it.
        new: Timestamp,
    },
    /// Fire times missed while taper was not running, and not run.
    Missed {
        /// How many.
        count: usize,
        /// The first one.
        first: Timestamp,
        /// The last one.
        last: Timestamp,
    },
    /// A run could not be started.
    StartFailed {
        /// The fire time.
        scheduled_for: Timestamp,
        /// The error.
        error: String,
    },
    /// The scheduler was stopped by a signal.
    Stopped,
}

impl Decision {
    /// The `events.event` value.
    pub fn event(&self) -> &'static str {
        match self {
            Decision::Started {
                why: Why::CatchUp, ..
            } => "schedule_caught_up",
            Decision::Started { .. } => "schedule_fired",
            Decision::Finished { .. } => "schedule_run_finished",
            Decision::Skipped { .. } => "schedule_skipped",
            Decision::Queued { .. } => "schedule_queued",
            Decision::Replacing { .. } => "schedule_replacing",
            Decision::Missed { .. } => "schedule_missed",
            Decision::StartFailed { .. } => "schedule_start_failed",
            Decision::Stopped => "schedule_stopped",
        }
    }

    /// The `events.message` value.
    pub fn message(&self) -> String {
        match self {
            Decision::Started { scheduled_for, why } => {
                let why = match why {
                    Why::Fired => "",
                    Why::CatchUp => " (missed while taper was not running)",
                    Why::Queued => " (after waiting for the previous run)",
                    Why::Replaced => " (replacing the previous run)",
                };
                format!("started the run for {}{why}", rfc3339(*scheduled_for))
            }
            Decision::Finished {
                scheduled_for,
                code,
            } => match code {
                Some(c) => format!("the run for {} exited {c}", rfc3339(*scheduled_for)),
                None => format!(
                    "the run for {} was killed by a signal",
                    rfc3339(*scheduled_for)
                ),
            },
            Decision::Skipped {
                scheduled_for,
                reason,
            } => format!("skipped {}: {reason}", rfc3339(*scheduled_for)),
            Decision::Queued {
                scheduled_for,
                reason,
            } => format!("queued {}: {reason}", rfc3339(*scheduled_for)),
            Decision::Replacing { old, new } => format!(
                "stopping the run for {} to start the one for {}",
                rfc3339(*old),
                rfc3339(*new)
            ),
            Decision::Missed { count, first, last } => format!(
                "{count} fire time(s) from {} to {} were missed while taper was not running and are not run",
                rfc3339(*first),
                rfc3339(*last)
            ),
            Decision::StartFailed {
                scheduled_for,
                error,
            } => format!(
                "could not start the run for {}: {error}",
                rfc3339(*scheduled_for)
            ),
            Decision::Stopped => "stopped by a signal".to_string(),
        }
    }
}

/// How the loop ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// `max_runs` runs were started and have ended.
    MaxRuns,
    /// A signal; the running run (if any) was stopped and has ended.
    Stopped,
    /// The cron expression has no more fire times.
    NoMoreFires,
}

/// Loop options.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Stop after this many runs were started and ended.
    pub max_runs: Option<u32>,
    /// The fire time of the last scheduled run in the ledger (for catch-up).
    pub last_scheduled: Option<Timestamp>,
}

struct Pending {
    at: Zoned,
    why: Why,
    /// When waiting for a foreign lock is given up.
    deadline: Option<Timestamp>,
}

struct Current {
    at: Zoned,
    child: Box<dyn Child>,
    stopping: bool,
}

/// The scheduler.
pub struct Scheduler<'a> {
    cfg: &'a ScheduleConfig,
    clock: &'a dyn Clock,
    launcher: &'a mut dyn Launcher,
    journal: &'a mut dyn Journal,
    signals: &'a dyn Fn() -> usize,
    backlog: VecDeque<Pending>,
    running: Option<Current>,
    started: u32,
}

impl<'a> Scheduler<'a> {
    /// A scheduler; `signals` counts SIGINT/SIGTERM received so far.
    pub fn new(
        cfg: &'a ScheduleConfig,
        clock: &'a dyn Clock,
        launcher: &'a mut dyn Launcher,
        journal: &'a mut dyn Journal,
        signals: &'a dyn Fn() -> usize,
    ) -> Self {
        Scheduler {
            cfg,
            clock,
            launcher,
            journal,
            signals,
            backlog: VecDeque::new(),
            running: None,
            started: 0,
        }
    }

    fn record(&mut self, d: Decision) {
        self.journal.record(self.clock.now(), &d);
    }

    /// Runs until `max_runs`, a signal, or the end of the fire times.
    pub fn run(&mut self, opts: &Options) -> Exit {
        let start = self.clock.now();
        self.catch_up(opts.last_scheduled, start);
        let mut next = self.cfg.next_after(start);
        let mut forwarded = 0;
        loop {
            let signals = (self.signals)();
            if signals > 0 {
                match &mut self.running {
                    Some(cur) => {
                        while forwarded < signals {
                            cur.child.stop();
                            forwarded += 1;
                        }
                    }
                    None => {
                        self.record(Decision::Stopped);
                        return Exit::Stopped;
                    }
                }
            }
            self.reap();
            if signals > 0 {
                if self.running.is_none() {
                    self.record(Decision::Stopped);
                    return Exit::Stopped;
                }
                self.clock.tick(Timestamp::MAX);
                continue;
            }
            let done = opts.max_runs.is_some_and(|m| self.started >= m);
            if done {
                if self.running.is_none() {
                    return Exit::MaxRuns;
                }
                self.clock.tick(Timestamp::MAX);
                continue;
            }
            let now = self.clock.now();
            while let Some(t) = next.clone().filter(|t| t.timestamp() <= now) {
                next = self.cfg.next_after(t.timestamp());
                self.on_fire(t, next.as_ref().map(Zoned::timestamp));
            }
            let mut wake = next.as_ref().map(Zoned::timestamp);
            if self.running.is_none() {
                if let Some(deadline) = self.start_from_backlog(now) {
                    wake = Some(wake.map_or(deadline, |w| w.min(deadline)));
                }
            }
            let wake = wake.unwrap_or(Timestamp::MAX);
            if self.running.is_some() || !self.backlog.is_empty() {
                self.clock.tick(wake);
            } else if next.is_none() {
                return Exit::NoMoreFires;
            } else {
                let signals = self.signals;
                self.clock.sleep_until(wake, &|| signals() > 0);
            }
        }
    }

    /// Missed fires between the last scheduled run and `now`.
    fn catch_up(&mut self, last: Option<Timestamp>, now: Timestamp) {
        let Some(last) = last else { return };
        let mut missed: VecDeque<Zoned> = VecDeque::new();
        let mut count = 0usize;
        let mut first = None;
        for z in self.cfg.fires_after(last).take(1_000_000) {
            if z.timestamp() > now {
                break;
            }
            count += 1;
            first.get_or_insert(z.timestamp());
            missed.push_back(z);
            if missed.len() > MAX_CATCH_UP {
                missed.pop_front();
            }
        }
        let Some(first) = first else { return };
        let run: Vec<Zoned> = match self.cfg.catch_up {
            CatchUp::None => Vec::new(),
            CatchUp::Latest => missed.back().cloned().into_iter().collect(),
            CatchUp::All => missed.iter().cloned().collect(),
        };
        let not_run = count - run.len();
        if not_run > 0 {
            let last_not_run = match run.first() {
                Some(r) => self
                    .cfg
                    .fires_after(last)
                    .take_while(|z| z.timestamp() < r.timestamp())
                    .last()
                    .map(|z| z.timestamp())
                    .unwrap_or(first),
                None => missed.back().map(|z| z.timestamp()).unwrap_or(first),
            };
            self.record(Decision::Missed {
                count: not_run,
                first,
                last: last_not_run,
            });
        }
        for z in run {
            self.backlog.push_back(Pending {
                at: z,
                why: Why::CatchUp,
                deadline: None,
            });
        }
    }

    /// A fire time came; `following` is the one after it.
    fn on_fire(&mut self, t: Zoned, following: Option<Timestamp>) {
        let ts = t.timestamp();
        if let Some(cur) = &mut self.running {
            let cur_at = cur.at.timestamp();
            match self.cfg.overlap {
                Overlap::Skip => self.record(Decision::Skipped {
                    scheduled_for: ts,
                    reason: format!("the run for {} is still going", rfc3339(cur_at)),
                }),
                Overlap::Queue => {
                    if let Some(w) = self.backlog.iter().find(|p| p.why == Why::Queued) {
                        let reason = format!(
                            "the fire time {} is already waiting (at most one waits)",
                            rfc3339(w.at.timestamp())
                        );
                        self.record(Decision::Skipped {
                            scheduled_for: ts,
                            reason,
                        });
                    } else {
                        self.backlog.push_back(Pending {
                            at: t,
                            why: Why::Queued,
                            deadline: None,
                        });
                        self.record(Decision::Queued {
                            scheduled_for: ts,
                            reason: format!("waiting for the run for {}", rfc3339(cur_at)),
                        });
                    }
                }
                Overlap::Replace => {
                    if !cur.stopping {
                        cur.stopping = true;
                        cur.child.stop();
                    }
                    let dropped: Vec<Pending> = self.backlog.drain(..).collect();
                    for p in dropped {
                        self.record(Decision::Skipped {
                            scheduled_for: p.at.timestamp(),
                            reason: format!("replaced by the newer fire time {}", rfc3339(ts)),
                        });
                    }
                    self.backlog.push_back(Pending {
                        at: t,
                        why: Why::Replaced,
                        deadline: None,
                    });
                    self.record(Decision::Replacing {
                        old: cur_at,
                        new: ts,
                    });
                }
            }
            return;
        }
        if self.backlog.is_empty() {
            if let Some(holder) = self.launcher.foreign_holder() {
                match self.cfg.overlap {
                    Overlap::Skip | Overlap::Replace => {
                        let mut reason = format!("the workspace is locked by {holder}");
                        if self.cfg.overlap == Overlap::Replace {
                            reason.push_str(" (replace stops only runs the scheduler started)");
                        }
                        self.record(Decision::Skipped {
                            scheduled_for: ts,
                            reason,
                        });
                    }
                    Overlap::Queue => {
                        self.backlog.push_back(Pending {
                            at: t,
                            why: Why::Queued,
                            deadline: following,
                        });
                        self.record(Decision::Queued {
                            scheduled_for: ts,
                            reason: format!(
                                "waiting for {holder}, at most until the next fire time"
                            ),
                        });
                    }
                }
                return;
            }
        }
        self.backlog.push_back(Pending {
            at: t,
            why: Why::Fired,
            deadline: following,
        });
    }

    /// Starts the first waiting fire unless another process holds the workspace.
    /// Returns when to look again if it waits for that process.
    fn start_from_backlog(&mut self, now: Timestamp) -> Option<Timestamp> {
        loop {
            let p = self.backlog.front()?;
            if let Some(holder) = self.launcher.foreign_holder() {
                match p.deadline {
                    Some(d) if now >= d => {
                        let p = self.backlog.pop_front().expect("front exists");
                        self.record(Decision::Skipped {
                            scheduled_for: p.at.timestamp(),
                            reason: format!(
                                "the workspace was still locked by {holder} at the next fire time"
                            ),
                        });
                        continue;
                    }
                    d => return d,
                }
            }
            let p = self.backlog.pop_front().expect("front exists");
            match self.launcher.start(&p.at) {
                Ok(child) => {
                    self.started += 1;
                    self.record(Decision::Started {
                        scheduled_for: p.at.timestamp(),
                        why: p.why,
                    });
                    self.running = Some(Current {
                        at: p.at,
                        child,
                        stopping: false,
                    });
                    return None;
                }
                Err(error) => self.record(Decision::StartFailed {
                    scheduled_for: p.at.timestamp(),
                    error,
                }),
            }
        }
    }

    fn reap(&mut self) {
        let Some(cur) = &mut self.running else { return };
        if let Some(code) = cur.child.try_wait() {
            let scheduled_for = cur.at.timestamp();
            self.running = None;
            self.record(Decision::Finished {
                scheduled_for,
                code,
            });
        }
    }
}
