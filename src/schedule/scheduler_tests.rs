//! Scheduler tests: a fake clock that jumps and fake runs with fixed durations. Nothing
//! sleeps; a day of schedule takes microseconds.

use super::clock::{Clock, FakeClock};
use super::config::ScheduleConfig;
use super::scheduler::*;
use jiff::{Timestamp, Zoned};
use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn config(yaml: &str) -> ScheduleConfig {
    let text = format!("version: 1\nname: t\nstages: {{}}\nschedule: {{{yaml}}}\n");
    ScheduleConfig::from_source(Path::new("p.yaml"), &text)
        .unwrap()
        .unwrap()
}

struct FakeChild {
    clock: Rc<FakeClock>,
    end: Timestamp,
    stopped: bool,
}

impl Child for FakeChild {
    fn try_wait(&mut self) -> Option<Option<i32>> {
        if self.stopped {
            Some(Some(130))
        } else if self.clock.now() >= self.end {
            Some(Some(0))
        } else {
            None
        }
    }
    fn stop(&mut self) {
        self.stopped = true;
    }
}

/// Runs take `run_for`; a manual run holds the workspace during `manual`.
struct FakeLauncher {
    clock: Rc<FakeClock>,
    run_for: Duration,
    manual: Option<(Timestamp, Timestamp)>,
}

impl Launcher for FakeLauncher {
    fn start(&mut self, _: &Zoned) -> Result<Box<dyn Child>, String> {
        let end = self.clock.now() + jiff::SignedDuration::try_from(self.run_for).unwrap();
        Ok(Box::new(FakeChild {
            clock: self.clock.clone(),
            end,
            stopped: false,
        }))
    }
    fn foreign_holder(&mut self) -> Option<String> {
        let now = self.clock.now();
        match self.manual {
            Some((a, b)) if now >= a && now < b => Some("run manual-1".into()),
            _ => None,
        }
    }
}

#[derive(Default)]
struct Log(Rc<RefCell<Vec<String>>>);

impl Journal for Log {
    fn record(&mut self, now: Timestamp, d: &Decision) {
        self.0.borrow_mut().push(format!(
            "{} {} {}",
            now.strftime("%m-%dT%H:%M"),
            d.event(),
            d.message()
        ));
    }
}

struct Setup {
    start: &'static str,
    run_for: Duration,
    manual: Option<(&'static str, &'static str)>,
    signal_at: Option<&'static str>,
    max_runs: u32,
    last: Option<&'static str>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            start: "2027-01-01T00:30:00Z",
            run_for: Duration::from_secs(600),
            manual: None,
            signal_at: None,
            max_runs: 2,
            last: None,
        }
    }
}

fn run(cfg: &ScheduleConfig, s: Setup) -> (Exit, Vec<String>) {
    let clock = Rc::new(FakeClock::new(ts(s.start), Duration::from_secs(60)));
    let mut launcher = FakeLauncher {
        clock: clock.clone(),
        run_for: s.run_for,
        manual: s.manual.map(|(a, b)| (ts(a), ts(b))),
    };
    let lines = Rc::new(RefCell::new(Vec::new()));
    let mut journal = Log(lines.clone());
    let signal_at = s.signal_at.map(ts);
    let c2 = clock.clone();
    let signals = move || usize::from(signal_at.is_some_and(|t| c2.now() >= t));
    let exit = Scheduler::new(cfg, &*clock, &mut launcher, &mut journal, &signals).run(&Options {
        max_runs: Some(s.max_runs),
        last_scheduled: s.last.map(ts),
    });
    let out = lines.borrow().clone();
    (exit, out)
}

const HOURLY: &str = "cron: \"0 * * * *\"";

#[test]
fn fires_on_time_and_records_each_run() {
    let (exit, log) = run(&config(HOURLY), Setup::default());
    assert_eq!(exit, Exit::MaxRuns);
    assert_eq!(
        log,
        [
            "01-01T01:00 schedule_fired started the run for 2027-01-01T01:00:00Z",
            "01-01T01:10 schedule_run_finished the run for 2027-01-01T01:00:00Z exited 0",
            "01-01T02:00 schedule_fired started the run for 2027-01-01T02:00:00Z",
            "01-01T02:10 schedule_run_finished the run for 2027-01-01T02:00:00Z exited 0",
        ]
    );
}

#[test]
fn overlap_skip_skips_a_fire_while_the_run_goes_on() {
    let setup = Setup {
        run_for: Duration::from_secs(90 * 60),
        ..Setup::default()
    };
    let (_, log) = run(&config(&format!("{HOURLY}, overlap: skip")), setup);
    assert_eq!(
        log,
        [
            "01-01T01:00 schedule_fired started the run for 2027-01-01T01:00:00Z",
            "01-01T02:00 schedule_skipped skipped 2027-01-01T02:00:00Z: the run for 2027-01-01T01:00:00Z is still going",
            "01-01T02:30 schedule_run_finished the run for 2027-01-01T01:00:00Z exited 0",
            "01-01T03:00 schedule_fired started the run for 2027-01-01T03:00:00Z",
            "01-01T04:30 schedule_run_finished the run for 2027-01-01T03:00:00Z exited 0",
        ]
    );
}

#[test]
fn overlap_queue_runs_the_fire_after_the_run_and_keeps_at_most_one_waiting() {
    let setup = Setup {
        run_for: Duration::from_secs(150 * 60),
        ..Setup::default()
    };
    let (_, log) = run(&config(&format!("{HOURLY}, overlap: queue")), setup);
    assert_eq!(
        log,
        [
            "01-01T01:00 schedule_fired started the run for 2027-01-01T01:00:00Z",
            "01-01T02:00 schedule_queued queued 2027-01-01T02:00:00Z: waiting for the run for 2027-01-01T01:00:00Z",
            "01-01T03:00 schedule_skipped skipped 2027-01-01T03:00:00Z: the fire time 2027-01-01T02:00:00Z is already waiting (at most one waits)",
            "01-01T03:30 schedule_run_finished the run for 2027-01-01T01:00:00Z exited 0",
            "01-01T03:30 schedule_fired started the run for 2027-01-01T02:00:00Z (after waiting for the previous run)",
            "01-01T06:00 schedule_run_finished the run for 2027-01-01T02:00:00Z exited 0",
        ]
    );
}

#[test]
fn overlap_replace_stops_the_running_run_and_starts_the_new_one() {
    let setup = Setup {
        run_for: Duration::from_secs(90 * 60),
        max_runs: 3,
        ..Setup::default()
    };
    let (_, log) = run(&config(&format!("{HOURLY}, overlap: replace")), setup);
    assert_eq!(
        log,
        [
            "01-01T01:00 schedule_fired started the run for 2027-01-01T01:00:00Z",
            "01-01T02:00 schedule_replacing stopping the run for 2027-01-01T01:00:00Z to start the one for 2027-01-01T02:00:00Z",
            "01-01T02:01 schedule_run_finished the run for 2027-01-01T01:00:00Z exited 130",
            "01-01T02:01 schedule_fired started the run for 2027-01-01T02:00:00Z (replacing the previous run)",
            "01-01T03:00 schedule_replacing stopping the run for 2027-01-01T02:00:00Z to start the one for 2027-01-01T03:00:00Z",
            "01-01T03:01 schedule_run_finished the run for 2027-01-01T02:00:00Z exited 130",
            "01-01T03:01 schedule_fired started the run for 2027-01-01T03:00:00Z (replacing the previous run)",
            "01-01T04:31 schedule_run_finished the run for 2027-01-01T03:00:00Z exited 0",
        ]
    );
}

#[test]
fn a_manual_run_holding_the_lock_is_never_waited_for_forever() {
    // skip: the fire is skipped and recorded.
    let manual = Some(("2027-01-01T00:50:00Z", "2027-01-01T01:20:00Z"));
    let (_, log) = run(
        &config(HOURLY),
        Setup {
            manual,
            ..Setup::default()
        },
    );
    assert_eq!(
        log[0],
        "01-01T01:00 schedule_skipped skipped 2027-01-01T01:00:00Z: the workspace is locked by run manual-1"
    );
    assert!(log[1].starts_with("01-01T02:00 schedule_fired"), "{log:?}");
    // replace does not stop a run it did not start.
    let (_, log) = run(
        &config(&format!("{HOURLY}, overlap: replace")),
        Setup {
            manual,
            ..Setup::default()
        },
    );
    assert!(
        log[0].ends_with("(replace stops only runs the scheduler started)"),
        "{log:?}"
    );
    // queue: waits for the manual run, at most until the next fire time.
    let (_, log) = run(
        &config(&format!("{HOURLY}, overlap: queue")),
        Setup {
            manual,
            ..Setup::default()
        },
    );
    assert_eq!(
        &log[..2],
        [
            "01-01T01:00 schedule_queued queued 2027-01-01T01:00:00Z: waiting for run manual-1, at most until the next fire time",
            "01-01T01:20 schedule_fired started the run for 2027-01-01T01:00:00Z (after waiting for the previous run)",
        ]
    );
    let (_, log) = run(
        &config(&format!("{HOURLY}, overlap: queue")),
        Setup {
            manual: Some(("2027-01-01T00:50:00Z", "2027-01-01T02:20:00Z")),
            max_runs: 1,
            ..Setup::default()
        },
    );
    assert_eq!(
        log,
        [
            "01-01T01:00 schedule_queued queued 2027-01-01T01:00:00Z: waiting for run manual-1, at most until the next fire time",
            "01-01T02:00 schedule_skipped skipped 2027-01-01T01:00:00Z: the workspace was still locked by run manual-1 at the next fire time",
            "01-01T02:20 schedule_fired started the run for 2027-01-01T02:00:00Z",
            "01-01T02:30 schedule_run_finished the run for 2027-01-01T02:00:00Z exited 0",
        ]
    );
}

const DAILY: &str = "cron: \"0 2 * * *\"";

fn after_gap(catch_up: &str, max_runs: u32) -> Vec<String> {
    let (_, log) = run(
        &config(&format!("{DAILY}, catch_up: {catch_up}")),
        Setup {
            start: "2027-01-05T12:00:00Z",
            last: Some("2027-01-01T02:00:00Z"),
            max_runs,
            ..Setup::default()
        },
    );
    log
}

#[test]
fn catch_up_none_records_the_missed_fires_and_waits_for_the_next() {
    assert_eq!(
        after_gap("none", 1),
        [
            "01-05T12:00 schedule_missed 4 fire time(s) from 2027-01-02T02:00:00Z to 2027-01-05T02:00:00Z were missed while taper was not running and are not run",
            "01-06T02:00 schedule_fired started the run for 2027-01-06T02:00:00Z",
            "01-06T02:10 schedule_run_finished the run for 2027-01-06T02:00:00Z exited 0",
        ]
    );
}

#[test]
fn catch_up_latest_runs_only_the_most_recent_missed_fire() {
    assert_eq!(
        after_gap("latest", 1),
        [
            "01-05T12:00 schedule_missed 3 fire time(s) from 2027-01-02T02:00:00Z to 2027-01-04T02:00:00Z were missed while taper was not running and are not run",
            "01-05T12:00 schedule_caught_up started the run for 2027-01-05T02:00:00Z (missed while taper was not running)",
            "01-05T12:10 schedule_run_finished the run for 2027-01-05T02:00:00Z exited 0",
        ]
    );
}

#[test]
fn catch_up_all_runs_every_missed_fire_in_order_one_at_a_time() {
    let log = after_gap("all", 5);
    assert_eq!(
        log,
        [
            "01-05T12:00 schedule_caught_up started the run for 2027-01-02T02:00:00Z (missed while taper was not running)",
            "01-05T12:10 schedule_run_finished the run for 2027-01-02T02:00:00Z exited 0",
            "01-05T12:10 schedule_caught_up started the run for 2027-01-03T02:00:00Z (missed while taper was not running)",
            "01-05T12:20 schedule_run_finished the run for 2027-01-03T02:00:00Z exited 0",
            "01-05T12:20 schedule_caught_up started the run for 2027-01-04T02:00:00Z (missed while taper was not running)",
            "01-05T12:30 schedule_run_finished the run for 2027-01-04T02:00:00Z exited 0",
            "01-05T12:30 schedule_caught_up started the run for 2027-01-05T02:00:00Z (missed while taper was not running)",
            "01-05T12:40 schedule_run_finished the run for 2027-01-05T02:00:00Z exited 0",
            "01-06T02:00 schedule_fired started the run for 2027-01-06T02:00:00Z",
            "01-06T02:10 schedule_run_finished the run for 2027-01-06T02:00:00Z exited 0",
        ]
    );
}

#[test]
fn no_catch_up_without_an_earlier_scheduled_run() {
    let (_, log) = run(
        &config(&format!("{DAILY}, catch_up: all")),
        Setup {
            start: "2027-01-05T12:00:00Z",
            max_runs: 1,
            ..Setup::default()
        },
    );
    assert!(log[0].starts_with("01-06T02:00 schedule_fired"), "{log:?}");
}

#[test]
fn a_signal_stops_the_running_run_then_the_scheduler() {
    let (exit, log) = run(
        &config(HOURLY),
        Setup {
            run_for: Duration::from_secs(3600 * 5),
            signal_at: Some("2027-01-01T01:30:00Z"),
            ..Setup::default()
        },
    );
    assert_eq!(exit, Exit::Stopped);
    assert_eq!(
        log,
        [
            "01-01T01:00 schedule_fired started the run for 2027-01-01T01:00:00Z",
            "01-01T01:30 schedule_run_finished the run for 2027-01-01T01:00:00Z exited 130",
            "01-01T01:30 schedule_stopped stopped by a signal",
        ]
    );
}

#[test]
fn runs_across_a_spring_forward_day_at_the_first_valid_instant() {
    let (_, log) = run(
        &config("cron: \"30 2 * * *\", timezone: Europe/Berlin"),
        Setup {
            start: "2027-03-27T12:00:00Z",
            ..Setup::default()
        },
    );
    assert_eq!(
        log,
        [
            "03-28T01:00 schedule_fired started the run for 2027-03-28T01:00:00Z",
            "03-28T01:10 schedule_run_finished the run for 2027-03-28T01:00:00Z exited 0",
            "03-29T00:30 schedule_fired started the run for 2027-03-29T00:30:00Z",
            "03-29T00:40 schedule_run_finished the run for 2027-03-29T00:30:00Z exited 0",
        ]
    );
}

#[test]
fn runs_once_on_a_fall_back_day() {
    let (_, log) = run(
        &config("cron: \"30 2 * * *\", timezone: Europe/Berlin"),
        Setup {
            start: "2027-10-30T12:00:00Z",
            ..Setup::default()
        },
    );
    assert_eq!(
        log,
        [
            "10-31T00:30 schedule_fired started the run for 2027-10-31T00:30:00Z",
            "10-31T00:40 schedule_run_finished the run for 2027-10-31T00:30:00Z exited 0",
            "11-01T01:30 schedule_fired started the run for 2027-11-01T01:30:00Z",
            "11-01T01:40 schedule_run_finished the run for 2027-11-01T01:30:00Z exited 0",
        ]
    );
}
