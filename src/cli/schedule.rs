//! `taper schedule`: run a pipeline on its `schedule:` in the foreground, or list the
//! next fire times.

use super::exit::{self, Failure};
use super::load::{load, Loaded};
use crate::exec::Signals;
use crate::schedule::fire::list_line;
use crate::schedule::scheduler::{Decision, Journal};
use crate::schedule::{
    Clock, Exit, FakeClock, LedgerJournal, Options, ProcessLauncher, ScheduleConfig, Scheduler,
    SystemClock,
};
use crate::state::{Layout, Ledger, RunRow};
use clap::Args;
use jiff::Timestamp;
use std::path::PathBuf;
use std::time::Duration;

/// `taper schedule` options.
#[derive(Debug, Args)]
pub struct ScheduleArgs {
    /// The pipeline file (it needs a `schedule:` block).
    pub pipeline: PathBuf,
    /// Override a parameter for every run (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Print the next N fire times (UTC, then local time) and exit.
    #[arg(long, value_name = "N")]
    pub list: Option<usize>,
    /// With --list: the fire times after this RFC 3339 time instead of after now.
    #[arg(long, requires = "list", value_name = "TIME")]
    pub from: Option<String>,
    /// Exit after N runs were started and have ended.
    #[arg(long, value_name = "N")]
    pub max_runs: Option<u32>,
    /// Testing only: a fake clock that starts at TIME and jumps over every wait.
    #[arg(long, hide = true, value_name = "TIME")]
    pub fake_clock: Option<String>,
}

fn parse_time(what: &str, text: &str) -> Result<Timestamp, Failure> {
    text.parse::<Timestamp>().map_err(|e| {
        Failure::new(
            exit::USAGE,
            format!("error: {what} {text}: expected an RFC 3339 time such as 2027-03-29T00:30:00Z ({e})"),
        )
    })
}

fn schedule_of(loaded: &Loaded) -> Result<&ScheduleConfig, Failure> {
    loaded.schedule.as_ref().ok_or_else(|| {
        Failure::new(
            exit::INVALID_PIPELINE,
            format!(
                "error: {}: no `schedule:` block; add one, e.g.\n  schedule:\n    cron: \"0 2 * * *\"",
                loaded.pipeline.file.display()
            ),
        )
    })
}

/// Records decisions in the ledger and shows them on stderr.
struct Console(LedgerJournal);

impl Journal for Console {
    fn record(&mut self, now: Timestamp, d: &Decision) {
        eprintln!("taper schedule: {}: {}", self.0.pipeline_name, d.message());
        self.0.record(now, d);
    }
}

/// The fire time of the last scheduled run of pipeline `name` in the ledger.
fn last_scheduled(ledger: &Ledger, name: &str) -> Result<Option<Timestamp>, Failure> {
    let rows: Vec<RunRow> = ledger.read()?;
    Ok(rows
        .iter()
        .filter(|r| r.trigger == "schedule" && r.pipeline_name == name)
        .filter_map(|r| r.scheduled_for)
        .max()
        .and_then(|us| Timestamp::from_microsecond(us).ok()))
}

/// `taper schedule`.
pub fn schedule(layout: &Layout, a: &ScheduleArgs) -> Result<i32, Failure> {
    let loaded = load(&a.pipeline, &a.sets, Some(&layout.root))?;
    let cfg = schedule_of(&loaded)?;
    if let Some(n) = a.list {
        let from = match &a.from {
            Some(t) => parse_time("--from", t)?,
            None => Timestamp::now(),
        };
        for z in cfg.fires_after(from).take(n) {
            println!("{}", list_line(&z));
        }
        return Ok(exit::SUCCESS);
    }
    let ledger = Ledger::new(layout);
    let last = last_scheduled(&ledger, &loaded.pipeline.name)?;
    let signals = Signals::install()
        .map_err(|e| Failure::new(exit::ERROR, format!("error: cannot handle signals: {e}")))?;
    let system = SystemClock::default();
    let fake = match &a.fake_clock {
        Some(t) => Some(
            FakeClock::new(parse_time("--fake-clock", t)?, Duration::ZERO)
                .with_real_pause(Duration::from_millis(20)),
        ),
        None => None,
    };
    let clock: &dyn Clock = match &fake {
        Some(f) => f,
        None => &system,
    };
    let exe = std::env::current_exe().map_err(|e| {
        Failure::new(
            exit::ERROR,
            format!("error: cannot find the taper binary: {e}"),
        )
    })?;
    let mut launcher = ProcessLauncher {
        exe,
        layout: layout.clone(),
        pipeline: a.pipeline.clone(),
        sets: a.sets.clone(),
    };
    let mut journal = Console(LedgerJournal {
        ledger,
        pipeline_name: loaded.pipeline.name.clone(),
        error: None,
    });
    if let Some(next) = cfg.next_after(clock.now()) {
        eprintln!(
            "taper schedule: {}: cron \"{}\" in {}, overlap {}, catch_up {}; next run {}",
            loaded.pipeline.name,
            cfg.cron_text,
            cfg.timezone_name,
            cfg.overlap.as_str(),
            cfg.catch_up.as_str(),
            list_line(&next)
        );
    }
    let count = {
        let signals = signals.clone();
        move || signals.count()
    };
    let end = Scheduler::new(cfg, clock, &mut launcher, &mut journal, &count).run(&Options {
        max_runs: a.max_runs,
        last_scheduled: last,
    });
    if let Some(e) = journal.0.error {
        eprintln!("warning: some schedule decisions could not be recorded: {e}");
    }
    Ok(match end {
        Exit::Stopped => exit::INTERRUPTED,
        Exit::MaxRuns => exit::SUCCESS,
        Exit::NoMoreFires => {
            eprintln!(
                "taper schedule: {}: cron \"{}\" has no more fire times",
                loaded.pipeline.name, cfg.cron_text
            );
            exit::SUCCESS
        }
    })
}
