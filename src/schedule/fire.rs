//! Fire times of a schedule, and the names a fire time gets (run folders, `--list`).
//!
//! Fire times come from croner evaluated on `jiff::Zoned` in the schedule's time zone.
//! Across daylight-saving changes it follows Vixie cron (and croner documents it):
//!
//! - a local time that does not exist (spring forward, e.g. 02:30 in Europe/Berlin on
//!   2027-03-28): a job with fixed minute and hour runs at the first valid instant after
//!   the gap (03:00 CEST); a job with `*` or a step in its minute or hour field simply has
//!   no fire in the gap;
//! - a local time that exists twice (fall back, e.g. 02:30 on 2027-10-31): a fixed-time
//!   job runs once, at the first occurrence (02:30 CEST); a wildcard job runs in both
//!   passes, as the wall clock shows them.

use super::config::ScheduleConfig;
use jiff::{Timestamp, Zoned};

impl ScheduleConfig {
    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Zoned> {
        let start = t.to_zoned(self.timezone.clone());
        self.cron.find_next_occurrence(&start, false).ok()
    }

    /// The last fire time at or before `t`.
    pub fn last_at_or_before(&self, t: Timestamp) -> Option<Zoned> {
        let start = t.to_zoned(self.timezone.clone());
        self.cron.find_previous_occurrence(&start, true).ok()
    }

    /// Fire times strictly after `t`, in order.
    pub fn fires_after(&self, t: Timestamp) -> impl Iterator<Item = Zoned> + '_ {
        let mut cursor = t;
        std::iter::from_fn(move || {
            let next = self.next_after(cursor)?;
            cursor = next.timestamp();
            Some(next)
        })
    }
}

/// The name of a fire time's run folder: its local wall-clock time to the minute
/// (`2026-11-27T02:00`). The second of two instants with the same wall-clock time (the
/// repeated hour of a fall-back day) gets its offset appended (`2027-10-31T02:30+01:00`),
/// so no two fire times share a folder.
pub fn stamp(z: &Zoned) -> String {
    let base = z.strftime("%Y-%m-%dT%H:%M").to_string();
    let ambiguous = z.time_zone().to_ambiguous_zoned(z.datetime());
    let repeated = ambiguous.is_ambiguous();
    match ambiguous.earlier() {
        Ok(first) if repeated && first.timestamp() != z.timestamp() => {
            format!("{base}{}", z.strftime("%:z"))
        }
        _ => base,
    }
}

/// Whether `name` looks like a [`stamp`] (a run folder that retention may remove).
pub fn is_stamp(name: &str) -> bool {
    let b = name.as_bytes();
    let digits = |r: std::ops::Range<usize>| r.into_iter().all(|i| b[i].is_ascii_digit());
    let base = b.len() >= 16
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16);
    let rest = &name[if base { 16 } else { 0 }..];
    base && (rest.is_empty()
        || (rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':'))
}

/// One line of `taper schedule --list`: RFC 3339 UTC, then the local time with its zone
/// abbreviation and offset: `2027-03-29T00:30:00Z  2027-03-29 02:30 CEST (+02:00)`.
pub fn list_line(z: &Zoned) -> String {
    format!(
        "{}  {}",
        z.timestamp().strftime("%Y-%m-%dT%H:%M:%SZ"),
        z.strftime("%Y-%m-%d %H:%M %Z (%:z)")
    )
}

/// A timestamp as RFC 3339 UTC, to the second.
pub fn rfc3339(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::config::ScheduleConfig;
    use std::path::Path;

    fn config(cron: &str, tz: &str) -> ScheduleConfig {
        let text = format!(
            "version: 1\nname: t\nstages: {{}}\nschedule: {{cron: \"{cron}\", timezone: {tz}}}\n"
        );
        ScheduleConfig::from_source(Path::new("p.yaml"), &text)
            .unwrap()
            .unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn next(c: &ScheduleConfig, from: &str, n: usize) -> Vec<String> {
        c.fires_after(ts(from))
            .take(n)
            .map(|z| list_line(&z))
            .collect()
    }

    #[test]
    fn daily_in_utc_and_berlin() {
        let c = config("0 2 * * *", "UTC");
        assert_eq!(
            next(&c, "2026-11-26T15:00:00Z", 2),
            [
                "2026-11-27T02:00:00Z  2026-11-27 02:00 UTC (+00:00)",
                "2026-11-28T02:00:00Z  2026-11-28 02:00 UTC (+00:00)"
            ]
        );
        let c = config("0 2 * * *", "Europe/Berlin");
        assert_eq!(
            next(&c, "2026-11-26T15:00:00Z", 1),
            ["2026-11-27T01:00:00Z  2026-11-27 02:00 CET (+01:00)"]
        );
    }

    #[test]
    fn a_fire_time_is_strictly_after_the_start() {
        let c = config("*/15 * * * *", "UTC");
        assert_eq!(
            next(&c, "2027-01-01T00:15:00Z", 1),
            ["2027-01-01T00:30:00Z  2027-01-01 00:30 UTC (+00:00)"]
        );
    }

    /// Europe/Berlin springs forward on 2027-03-28: 02:00 CET becomes 03:00 CEST.
    #[test]
    fn spring_forward_runs_a_fixed_time_job_right_after_the_gap() {
        let c = config("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            next(&c, "2027-03-27T00:00:00Z", 3),
            [
                "2027-03-27T01:30:00Z  2027-03-27 02:30 CET (+01:00)",
                // 02:30 does not exist: the first valid instant after the gap.
                "2027-03-28T01:00:00Z  2027-03-28 03:00 CEST (+02:00)",
                "2027-03-29T00:30:00Z  2027-03-29 02:30 CEST (+02:00)",
            ]
        );
    }

    #[test]
    fn spring_forward_skips_wildcard_fires_in_the_gap() {
        let c = config("*/30 * * * *", "Europe/Berlin");
        assert_eq!(
            next(&c, "2027-03-28T00:15:00Z", 3),
            [
                "2027-03-28T00:30:00Z  2027-03-28 01:30 CET (+01:00)",
                "2027-03-28T01:00:00Z  2027-03-28 03:00 CEST (+02:00)",
                "2027-03-28T01:30:00Z  2027-03-28 03:30 CEST (+02:00)",
            ]
        );
    }

    /// Europe/Berlin falls back on 2027-10-31: 03:00 CEST becomes 02:00 CET.
    #[test]
    fn fall_back_runs_a_fixed_time_job_once_at_the_first_occurrence() {
        let c = config("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            next(&c, "2027-10-30T12:00:00Z", 2),
            [
                "2027-10-31T00:30:00Z  2027-10-31 02:30 CEST (+02:00)",
                "2027-11-01T01:30:00Z  2027-11-01 02:30 CET (+01:00)",
            ]
        );
    }

    #[test]
    fn fall_back_runs_wildcard_jobs_in_both_passes_with_distinct_folders() {
        let c = config("*/30 * * * *", "Europe/Berlin");
        let fires: Vec<Zoned> = c.fires_after(ts("2027-10-30T23:45:00Z")).take(5).collect();
        let lines: Vec<String> = fires.iter().map(list_line).collect();
        assert_eq!(
            lines,
            [
                "2027-10-31T00:00:00Z  2027-10-31 02:00 CEST (+02:00)",
                "2027-10-31T00:30:00Z  2027-10-31 02:30 CEST (+02:00)",
                "2027-10-31T01:00:00Z  2027-10-31 02:00 CET (+01:00)",
                "2027-10-31T01:30:00Z  2027-10-31 02:30 CET (+01:00)",
                "2027-10-31T02:00:00Z  2027-10-31 03:00 CET (+01:00)",
            ]
        );
        let stamps: Vec<String> = fires.iter().map(stamp).collect();
        assert_eq!(
            stamps,
            [
                "2027-10-31T02:00",
                "2027-10-31T02:30",
                "2027-10-31T02:00+01:00",
                "2027-10-31T02:30+01:00",
                "2027-10-31T03:00"
            ]
        );
        assert!(stamps.iter().all(|s| is_stamp(s)));
    }

    #[test]
    fn last_fire_at_or_before() {
        let c = config("30 2 * * *", "Europe/Berlin");
        let last = c.last_at_or_before(ts("2027-03-29T10:00:00Z")).unwrap();
        assert_eq!(rfc3339(last.timestamp()), "2027-03-29T00:30:00Z");
        let exact = c.last_at_or_before(ts("2027-03-29T00:30:00Z")).unwrap();
        assert_eq!(rfc3339(exact.timestamp()), "2027-03-29T00:30:00Z");
    }

    #[test]
    fn stamps_are_recognised() {
        assert!(is_stamp("2026-11-27T02:00"));
        assert!(is_stamp("2027-10-31T02:30+01:00"));
        assert!(!is_stamp("latest"));
        assert!(!is_stamp("manual"));
        assert!(!is_stamp("2026-11-27T02:00x"));
        assert!(!is_stamp("2026-11-27"));
    }
}
