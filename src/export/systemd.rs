//! A pipeline's schedule as a systemd service + timer pair.
//!
//! The cron expression becomes `OnCalendar=` lines in the schedule's time zone. Cron runs
//! a job when either a restricted day-of-month or a restricted day-of-week matches; a
//! timer fires when any of its `OnCalendar=` lines matches, so that case becomes two
//! lines. What has no calendar-event equivalent (`L`, `W`, `#`, `?`) is refused.

use crate::schedule::{CatchUp, Overlap, ScheduleConfig};
use crate::spec::Pipeline;
use std::path::Path;

/// The two units and what did not map.
#[derive(Clone, Debug)]
pub struct Units {
    /// `taper-<name>.service`
    pub service_name: String,
    /// Its text.
    pub service: String,
    /// `taper-<name>.timer`
    pub timer_name: String,
    /// Its text.
    pub timer: String,
    /// Policies systemd cannot honour exactly.
    pub warnings: Vec<String>,
}

/// A cron field's allowed values, for expansion.
struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MINUTE: Field = Field {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
};
const HOUR: Field = Field {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
};
const DOM: Field = Field {
    name: "day-of-month",
    min: 1,
    max: 31,
    names: &[],
};
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
};
const DOW: Field = Field {
    name: "day-of-week",
    min: 0,
    max: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

impl Field {
    fn value(&self, text: &str) -> Result<u32, String> {
        let lower = text.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            return Ok(i as u32 + if self.names.len() == 12 { 1 } else { 0 });
        }
        match text.parse::<u32>() {
            Ok(v) if (self.min..=self.max).contains(&v) => Ok(v),
            _ => Err(format!(
                "{} value \"{text}\" is not in {}..{}",
                self.name, self.min, self.max
            )),
        }
    }

    /// `None` for `*`; else the sorted values the field matches.
    fn expand(&self, text: &str) -> Result<Option<Vec<u32>>, String> {
        if text == "*" {
            return Ok(None);
        }
        if text.contains(['L', 'l', 'W', 'w', '#', '?'])
            && !self
                .names
                .iter()
                .any(|n| text.to_ascii_lowercase().contains(n))
        {
            return Err(format!(
                "{} field \"{text}\" uses `L`, `W`, `#` or `?`, which systemd calendar events cannot express",
                self.name
            ));
        }
        let mut out = Vec::new();
        for item in text.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((r, s)) => {
                    let step = s.parse::<u32>().ok().filter(|s| *s > 0).ok_or_else(|| {
                        format!("{} step \"{s}\" is not a positive number", self.name)
                    })?;
                    (r, step)
                }
                None => (item, 1),
            };
            let (lo, hi) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                (self.value(a)?, self.value(b)?)
            } else {
                let v = self.value(range)?;
                (v, if step > 1 { self.max } else { v })
            };
            if lo > hi {
                return Err(format!("{} range \"{range}\" is backwards", self.name));
            }
            out.extend((lo..=hi).step_by(step as usize));
        }
        if self.names.len() == 7 {
            for v in &mut out {
                if *v == 7 {
                    *v = 0;
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        Ok(Some(out))
    }
}

fn nickname(text: &str) -> Option<&'static str> {
    Some(match text {
        "@yearly" | "@annually" => "0 0 1 1 *",
        "@monthly" => "0 0 1 * *",
        "@weekly" => "0 0 * * 0",
        "@daily" | "@midnight" => "0 0 * * *",
        "@hourly" => "0 * * * *",
        _ => return None,
    })
}

fn list(values: &Option<Vec<u32>>, width: usize) -> String {
    match values {
        None => "*".to_string(),
        Some(v) => v
            .iter()
            .map(|x| format!("{x:0width$}"))
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// The `OnCalendar=` values for a 5-field cron expression in time zone `tz`.
pub fn on_calendar(cron: &str, tz: &str) -> Result<Vec<String>, String> {
    let text = cron.trim().to_ascii_lowercase();
    let text = nickname(&text).unwrap_or(&text).to_string();
    let fields: Vec<&str> = text.split_whitespace().collect();
    let [m, h, dom, mon, dow] = fields[..] else {
        return Err(format!("\"{cron}\" is not a 5-field cron expression"));
    };
    let minutes = MINUTE.expand(m)?;
    let hours = HOUR.expand(h)?;
    let doms = DOM.expand(dom)?;
    let months = MONTH.expand(mon)?;
    let dows = DOW.expand(dow)?;
    let time = format!("{}:{}:00", list(&hours, 2), list(&minutes, 2));
    let date = |d: &Option<Vec<u32>>| format!("*-{}-{}", list(&months, 2), list(d, 2));
    let weekdays = |w: &Vec<u32>| {
        const NAMES: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
        w.iter()
            .map(|&d| NAMES[d as usize])
            .collect::<Vec<_>>()
            .join(",")
    };
    Ok(match (&doms, &dows) {
        (_, None) => vec![format!("{} {time} {tz}", date(&doms))],
        (None, Some(w)) => vec![format!("{} {} {time} {tz}", weekdays(w), date(&None))],
        (Some(_), Some(w)) => {
            if dom.starts_with('*') || dow.starts_with('*') {
                return Err(format!(
                    "\"{cron}\" restricts both day-of-month and day-of-week with a `*` step; cron implementations disagree on what it means, so taper does not guess"
                ));
            }
            // Cron: either day field matching is enough.
            vec![
                format!("{} {time} {tz}", date(&doms)),
                format!("{} {} {time} {tz}", weekdays(w), date(&None)),
            ]
        }
    })
}

/// Builds the units. `exe` is the taper binary, `root` the workspace, `pipeline` the
/// pipeline file; all absolute, as systemd needs them.
pub fn units(
    pipeline: &Pipeline,
    schedule: &ScheduleConfig,
    exe: &Path,
    root: &Path,
    pipeline_file: &Path,
    sets: &[String],
) -> Result<Units, String> {
    let calendars = on_calendar(&schedule.cron_text, &schedule.timezone_name)?;
    let base = format!("taper-{}", crate::export::argo::task_name(&pipeline.name));
    let mut warnings = Vec::new();
    let quote = |p: &Path| {
        let s = p.display().to_string();
        if s.contains([' ', '"', '\'', '\\']) {
            format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
        } else {
            s
        }
    };
    let mut exec = format!(
        "{} -C {} run {}",
        quote(exe),
        quote(root),
        quote(pipeline_file)
    );
    for s in sets {
        exec.push_str(&format!(" --set '{}'", s.replace('\'', "")));
    }
    let service = format!(
        "# Made by `taper export systemd`. One scheduled run of pipeline \"{name}\".\n\
         [Unit]\n\
         Description=taper pipeline {name} ({file})\n\
         \n\
         [Service]\n\
         Type=oneshot\n\
         WorkingDirectory={root}\n\
         Environment=TAPER_TRIGGER=schedule\n\
         # The schedule's latest fire time at or before the start: the run's scheduled_for.\n\
         Environment=TAPER_SCHEDULED_FOR=last-fire\n\
         ExecStart={exec}\n\
         # SIGTERM to taper only: it stops its stages itself and records them interrupted.\n\
         KillMode=mixed\n",
        name = pipeline.name,
        file = pipeline_file.display(),
        root = quote(root),
    );
    let overlap_note = match schedule.overlap {
        Overlap::Skip => {
            "# overlap: skip — systemd does not start the service while it still runs.\n"
        }
        Overlap::Queue | Overlap::Replace => {
            warnings.push(format!(
                "overlap: {} has no systemd equivalent; a timer that elapses while the service still runs starts nothing (as overlap: skip)",
                schedule.overlap.as_str()
            ));
            "# overlap: systemd does not start the service while it still runs (as overlap: skip).\n"
        }
    };
    let persistent = match schedule.catch_up {
        CatchUp::None => "false",
        CatchUp::Latest => "true",
        CatchUp::All => {
            warnings.push(
                "catch_up: all has no systemd equivalent; Persistent=true runs the service once for all missed fire times".into(),
            );
            "true"
        }
    };
    let mut timer = format!(
        "# Made by `taper export systemd` from cron \"{cron}\" ({tz}).\n\
         [Unit]\n\
         Description=Schedule of taper pipeline {name}\n\
         \n\
         [Timer]\n",
        cron = schedule.cron_text,
        tz = schedule.timezone_name,
        name = pipeline.name,
    );
    for c in &calendars {
        timer.push_str(&format!("OnCalendar={c}\n"));
    }
    timer.push_str(&format!(
        "# catch_up: {} — Persistent= runs a missed fire time once after downtime.\n\
         Persistent={persistent}\n\
         AccuracySec=1s\n\
         {overlap_note}\
         Unit={base}.service\n\
         \n\
         [Install]\n\
         WantedBy=timers.target\n",
        schedule.catch_up.as_str()
    ));
    Ok(Units {
        service_name: format!("{base}.service"),
        service,
        timer_name: format!("{base}.timer"),
        timer,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simple_expressions() {
        assert_eq!(
            on_calendar("0 2 * * *", "Europe/Berlin").unwrap(),
            ["*-*-* 02:00:00 Europe/Berlin"]
        );
        assert_eq!(
            on_calendar("*/15 9-17 * * MON-FRI", "UTC").unwrap(),
            ["Mon,Tue,Wed,Thu,Fri *-*-* 09,10,11,12,13,14,15,16,17:00,15,30,45:00 UTC"]
        );
        assert_eq!(
            on_calendar("30 4 1,15 jan,jul *", "UTC").unwrap(),
            ["*-01,07-01,15 04:30:00 UTC"]
        );
        assert_eq!(
            on_calendar("@weekly", "UTC").unwrap(),
            ["Sun *-*-* 00:00:00 UTC"]
        );
        assert_eq!(
            on_calendar("0 0 * * 7", "UTC").unwrap(),
            ["Sun *-*-* 00:00:00 UTC"]
        );
    }

    #[test]
    fn either_day_field_becomes_two_lines() {
        assert_eq!(
            on_calendar("0 3 1 * 1", "UTC").unwrap(),
            ["*-*-01 03:00:00 UTC", "Mon *-*-* 03:00:00 UTC"]
        );
    }

    #[test]
    fn refuses_what_cannot_map() {
        for bad in [
            "0 0 L * *",
            "0 0 * * 5#2",
            "0 0 15W * *",
            "0 0 ? * *",
            "0 0 * *",
        ] {
            assert!(on_calendar(bad, "UTC").is_err(), "{bad}");
        }
        let e = on_calendar("0 0 L * *", "UTC").unwrap_err();
        assert!(e.contains("systemd calendar events cannot express"), "{e}");
    }
}
