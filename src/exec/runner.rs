//! Runs a [`Plan`]: independent stages in parallel up to `jobs` and the resource slots,
//! retries with backoff, timeouts, failure policy and cancellation. Reports everything as
//! [`Event`]s; prints nothing.

use super::events::{Event, EventSink, RunStatus, StageResult, StageStatus};
use super::publish::{clear_staged_outputs, prepare_staging, publish, remove_staging};
use super::signals::Signals;
use crate::plan::{check_stage, Action, Dag, History, Plan};
use crate::spec::Pipeline;
use crate::stages::{kind_info, CancelToken, StageConfig, StageContext, StageError, StopReason};
use crate::state::{time::now_micros, FileHash, HashCache, Layout};
use std::collections::BTreeMap;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How to run.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Run id.
    pub run_id: String,
    /// Stages running at once, at most.
    pub jobs: usize,
    /// On failure, keep running what does not depend on the failed stage.
    pub keep_going: bool,
    /// Capacity per resource slot (from the pipeline, overridable).
    pub resources: BTreeMap<String, u32>,
}

/// What the executor needs to know about the pipeline.
pub struct Executor<'a> {
    /// Workspace.
    pub layout: &'a Layout,
    /// Pipeline.
    pub pipeline: &'a Pipeline,
    /// Typed configuration of each stage (same order as `pipeline.stages`).
    pub configs: &'a [StageConfig],
    /// DAG.
    pub dag: &'a Dag,
    /// Plan.
    pub plan: &'a Plan,
    /// Ledger history (for re-checks after upstream stages ran).
    pub history: &'a History,
    /// Hash cache, shared with workers.
    pub cache: &'a Mutex<HashCache>,
    /// Options.
    pub opts: RunOptions,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Pending,
    Running,
    Done,
    Skipped,
    Failed,
    NotRun,
}

enum Msg {
    Event(Event),
    Done(usize, StageResult, bool),
}

struct Active {
    token: CancelToken,
    deadline: Option<Instant>,
}

impl Executor<'_> {
    /// Runs the plan to the end (or until stopped) and returns the run's status.
    pub fn run(&self, sink: &mut dyn EventSink, signals: &Signals) -> RunStatus {
        let started = Instant::now();
        let n = self.pipeline.stages.len();
        let mut state = vec![State::Pending; n];
        for step in &self.plan.steps {
            if step.action == Action::Excluded {
                state[step.stage] = State::NotRun;
            }
        }
        sink.event(&Event::RunStarted {
            run_id: self.opts.run_id.clone(),
            total: self
                .plan
                .steps
                .iter()
                .filter(|s| s.action != Action::Excluded)
                .count(),
            to_run: self.plan.to_run(),
        });
        let active: Vec<Mutex<Option<Active>>> = (0..n).map(|_| Mutex::new(None)).collect();
        let mut used: BTreeMap<String, u32> = BTreeMap::new();
        let mut running = 0usize;
        let mut failed = false;
        let mut gate_failed = false;
        let mut interrupted = false;
        let mut seen_signals = 0;
        let jobs = self.opts.jobs.max(1);
        let (tx, rx) = mpsc::channel::<Msg>();
        std::thread::scope(|scope| {
            loop {
                // Signals: the first stops scheduling and asks stages to stop; the second kills.
                let sigs = signals.count();
                if sigs > seen_signals {
                    seen_signals = sigs;
                    interrupted = true;
                    let reason = if sigs >= 2 {
                        StopReason::Kill
                    } else {
                        StopReason::Interrupt
                    };
                    for a in active.iter() {
                        if let Some(a) = a.lock().expect("active lock").as_ref() {
                            a.token.cancel(reason);
                        }
                    }
                }
                // Timeouts.
                let now = Instant::now();
                for a in active.iter() {
                    if let Some(a) = a.lock().expect("active lock").as_ref() {
                        if a.deadline.is_some_and(|d| now >= d) {
                            a.token.cancel(StopReason::Timeout);
                        }
                    }
                }
                let stopping = interrupted || (failed && !self.opts.keep_going);
                // Schedule every stage that is ready, in topological order.
                let mut progressed = true;
                while progressed && !stopping {
                    progressed = false;
                    for &i in &self.dag.order {
                        if state[i] != State::Pending {
                            continue;
                        }
                        let deps = &self.dag.deps[i];
                        if let Some(&bad) =
                            deps.iter().find(|&&d| matches!(state[d], State::Failed))
                        {
                            state[i] = State::Failed;
                            sink.event(&Event::StageBlocked {
                                stage: self.pipeline.stages[i].name.clone(),
                                upstream: self.pipeline.stages[bad].name.clone(),
                            });
                            progressed = true;
                            continue;
                        }
                        if !deps.iter().all(|&d| {
                            matches!(state[d], State::Done | State::Skipped | State::NotRun)
                        }) {
                            continue;
                        }
                        let step = self.plan.step(i).expect("every stage has a step");
                        if step.action == Action::Skip {
                            state[i] = State::Skipped;
                            sink.event(&Event::StageFinished(self.skipped(
                                i,
                                &step.reason,
                                step.check.as_ref(),
                            )));
                            progressed = true;
                            continue;
                        }
                        // A stage planned to run because upstream ran is checked again now
                        // that its inputs exist: unchanged inputs mean it is up to date.
                        let stage = &self.pipeline.stages[i];
                        let info = kind_info(&stage.kind.name);
                        let version = info.map(|k| k.version).unwrap_or(0);
                        let check = match &step.check {
                            Some(c) => c.clone(),
                            None => {
                                let mut cache = self.cache.lock().expect("cache lock");
                                check_stage(
                                    stage,
                                    version,
                                    self.history,
                                    &mut cache,
                                    &self.layout.root,
                                )
                            }
                        };
                        if step.check.is_none() && check.stale.is_none() {
                            state[i] = State::Skipped;
                            let reason = "up to date (upstream outputs unchanged)";
                            sink.event(&Event::StageFinished(self.skipped(
                                i,
                                reason,
                                Some(&check),
                            )));
                            progressed = true;
                            continue;
                        }
                        if running >= jobs || !self.fits(&used, i) {
                            continue;
                        }
                        for (slot, amount) in &stage.resources {
                            *used.entry(slot.clone()).or_default() += amount;
                        }
                        running += 1;
                        state[i] = State::Running;
                        progressed = true;
                        let tx = tx.clone();
                        let active = &active[i];
                        let reason = step.reason.clone();
                        let resumable = info.map(|k| k.resumable).unwrap_or(false);
                        scope.spawn(move || {
                            let (result, gate) =
                                self.run_stage(i, check, reason, resumable, active, &tx);
                            let _ = tx.send(Msg::Done(i, result, gate));
                        });
                    }
                }
                if running == 0 {
                    break;
                }
                sink.tick();
                match rx.recv_timeout(Duration::from_millis(50)) {
                    Ok(Msg::Event(e)) => sink.event(&e),
                    Ok(Msg::Done(i, result, gate)) => {
                        running -= 1;
                        for (slot, amount) in &self.pipeline.stages[i].resources {
                            if let Some(u) = used.get_mut(slot) {
                                *u -= amount;
                            }
                        }
                        state[i] = match result.status {
                            StageStatus::Success => State::Done,
                            StageStatus::Interrupted => {
                                interrupted = true;
                                State::Failed
                            }
                            _ => {
                                failed = true;
                                gate_failed |= gate;
                                State::Failed
                            }
                        };
                        tracing::info!(stage = %result.stage, status = result.status.as_str(), error = ?result.error, "stage finished");
                        sink.event(&Event::StageFinished(result));
                    }
                    Err(_) => {}
                }
            }
            // Drain events sent after the last Done.
            while let Ok(msg) = rx.try_recv() {
                if let Msg::Event(e) = msg {
                    sink.event(&e);
                }
            }
        });
        let status = if interrupted {
            RunStatus::Interrupted
        } else if gate_failed {
            RunStatus::GateFailed
        } else if failed || state.contains(&State::Failed) {
            RunStatus::Failed
        } else {
            RunStatus::Success
        };
        sink.event(&Event::RunFinished {
            status,
            elapsed: started.elapsed(),
        });
        status
    }

    fn fits(&self, used: &BTreeMap<String, u32>, i: usize) -> bool {
        self.pipeline.stages[i]
            .resources
            .iter()
            .all(|(slot, amount)| {
                let cap = self.opts.resources.get(slot).copied().unwrap_or(0);
                used.get(slot).copied().unwrap_or(0) + amount <= cap
            })
    }

    fn skipped(&self, i: usize, reason: &str, check: Option<&crate::plan::Check>) -> StageResult {
        let stage = &self.pipeline.stages[i];
        let last = self.history.last_success.get(&stage.name);
        let now = now_micros();
        StageResult {
            stage: stage.name.clone(),
            kind: stage.kind.name.clone(),
            status: StageStatus::Skipped,
            reason: reason.to_string(),
            attempt: 0,
            started_at: now,
            ended_at: now,
            fingerprint: check.map(|c| c.fingerprint.clone()).unwrap_or_default(),
            config_hash: check.map(|c| c.config_hash.clone()).unwrap_or_default(),
            inputs: check.map(|c| c.inputs.clone()).unwrap_or_default(),
            outputs: last.map(|l| l.outputs.clone()).unwrap_or_default(),
            error: None,
        }
    }

    /// Runs all attempts of one stage on a worker thread. Returns the result and whether
    /// the failure was a gate.
    fn run_stage(
        &self,
        i: usize,
        check: crate::plan::Check,
        reason: String,
        resumable: bool,
        active: &Mutex<Option<Active>>,
        tx: &mpsc::Sender<Msg>,
    ) -> (StageResult, bool) {
        let stage = &self.pipeline.stages[i];
        let started_at = now_micros();
        let staging = self.layout.staging(&stage.name);
        let outputs: Vec<String> = stage.outputs.iter().map(|o| o.path.clone()).collect();
        let mut result = StageResult {
            stage: stage.name.clone(),
            kind: stage.kind.name.clone(),
            status: StageStatus::Failed,
            reason: reason.clone(),
            attempt: 0,
            started_at,
            ended_at: started_at,
            fingerprint: check.fingerprint.clone(),
            config_hash: check.config_hash.clone(),
            inputs: check.inputs.clone(),
            outputs: Vec::new(),
            error: None,
        };
        let finish = |mut r: StageResult, status: StageStatus, error: Option<String>| {
            r.status = status;
            r.error = error;
            r.ended_at = now_micros();
            r
        };
        if let Some(why) = &check.stale {
            if why.starts_with("input \"") && why.ends_with("is missing") {
                return (
                    finish(result, StageStatus::Failed, Some(why.clone())),
                    false,
                );
            }
        }
        if let Err(e) = prepare_staging(&staging, &check.fingerprint, resumable) {
            return (
                finish(
                    result,
                    StageStatus::Failed,
                    Some(format!("cannot prepare the staging folder: {e}")),
                ),
                false,
            );
        }
        let log_dir = self.layout.run_dir(&self.opts.run_id).join("logs");
        let _ = std::fs::create_dir_all(&log_dir);
        let log_file = log_dir.join(format!("{}.log", stage.name));
        let name = stage.name.clone();
        let emit = |e: crate::stages::StageEvent| {
            let _ = tx.send(Msg::Event(Event::Stage {
                stage: name.clone(),
                event: e,
            }));
        };
        let max_attempts = stage.retries + 1;
        for attempt in 1..=max_attempts {
            result.attempt = attempt;
            let token = CancelToken::new();
            let deadline = stage.timeout.map(|t| Instant::now() + t);
            *active.lock().expect("active lock") = Some(Active {
                token: token.clone(),
                deadline,
            });
            tracing::info!(stage = %stage.name, attempt, fingerprint = %check.fingerprint, "stage attempt starts");
            let _ = tx.send(Msg::Event(Event::StageStarted {
                stage: stage.name.clone(),
                attempt,
                reason: reason.clone(),
            }));
            if let Err(e) = clear_staged_outputs(&staging, &outputs) {
                return (
                    finish(
                        result,
                        StageStatus::Failed,
                        Some(format!("cannot clear the staging folder: {e}")),
                    ),
                    false,
                );
            }
            let ctx = StageContext {
                run_id: &self.opts.run_id,
                stage,
                workspace: &self.layout.root,
                staging: &staging,
                attempt,
                cancel: &token,
                deadline,
                log_file: log_file.clone(),
                events: &emit,
            };
            let outcome = self.configs[i].run(&ctx);
            *active.lock().expect("active lock") = None;
            let error = match outcome {
                Ok(()) => match publish(self.layout, &staging, &outputs, &self.opts.run_id) {
                    Ok(()) => {
                        let mut cache = self.cache.lock().expect("cache lock");
                        let mut hashed = Vec::new();
                        for o in &outputs {
                            match cache.hash_path(&self.layout.path(o)) {
                                Ok(h) => hashed.push(FileHash {
                                    path: o.clone(),
                                    hash: h.hash,
                                    bytes: h.bytes,
                                }),
                                Err(e) => {
                                    return (
                                        finish(
                                            result,
                                            StageStatus::Failed,
                                            Some(format!("cannot hash output \"{o}\": {e}")),
                                        ),
                                        false,
                                    )
                                }
                            }
                        }
                        drop(cache);
                        remove_staging(&staging);
                        result.outputs = hashed;
                        return (finish(result, StageStatus::Success, None), false);
                    }
                    Err(e) => e,
                },
                Err(StageError::Gate(msg)) => {
                    return (
                        finish(
                            result,
                            StageStatus::Failed,
                            Some(format!("gate failed: {msg}")),
                        ),
                        true,
                    )
                }
                Err(StageError::Stopped(StopReason::Timeout)) => {
                    let t = stage
                        .timeout
                        .map(|t| humantime::format_duration(t).to_string())
                        .unwrap_or_default();
                    if attempt == max_attempts {
                        return (
                            finish(
                                result,
                                StageStatus::TimedOut,
                                Some(format!("timed out after {t}")),
                            ),
                            false,
                        );
                    }
                    format!("timed out after {t}")
                }
                Err(StageError::Stopped(_)) => {
                    return (
                        finish(result, StageStatus::Interrupted, Some("interrupted".into())),
                        false,
                    )
                }
                Err(StageError::Failed(msg)) => msg,
            };
            if attempt == max_attempts {
                return (finish(result, StageStatus::Failed, Some(error)), false);
            }
            let delay = stage.backoff.saturating_mul(1 << (attempt - 1).min(16));
            let _ = tx.send(Msg::Event(Event::StageRetry {
                stage: stage.name.clone(),
                attempt,
                error,
                delay,
            }));
            // Wait, but wake up for Ctrl-C: register a token the main loop can cancel.
            let wait = CancelToken::new();
            *active.lock().expect("active lock") = Some(Active {
                token: wait.clone(),
                deadline: None,
            });
            let until = Instant::now() + delay;
            while Instant::now() < until && !wait.is_cancelled() {
                std::thread::sleep(Duration::from_millis(10));
            }
            *active.lock().expect("active lock") = None;
            if wait.is_cancelled() {
                return (
                    finish(result, StageStatus::Interrupted, Some("interrupted".into())),
                    false,
                );
            }
        }
        (
            finish(
                result,
                StageStatus::Failed,
                Some("no attempt was made".into()),
            ),
            false,
        )
    }
}
