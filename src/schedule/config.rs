//! The `schedule:` block of a pipeline file -> a typed [`ScheduleConfig`].
//!
//! Two levels, like stage headers: serde reads the block into `RawSchedule`
//! (`deny_unknown_fields`, through `spec::de` so errors carry line:column and key path),
//! then the cron expression, time zone and folder are checked.

use crate::spec::de::{did_you_mean, from_node};
use crate::spec::node::{self, Node};
use crate::spec::{normalize_path, SpecError, SpecErrors};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use jiff::tz::TimeZone;
use serde::Deserialize;
use std::path::Path;

/// What to do when a fire time comes while the previous run is still going.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Do not start; record the fire as skipped.
    #[default]
    Skip,
    /// Start it as soon as the running one ends (at most one fire waits).
    Queue,
    /// Stop our running run (SIGTERM) and start the new one.
    Replace,
}

/// Which fire times missed while `taper schedule` was not running are run on start.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// None: missed fires are recorded as missed.
    #[default]
    None,
    /// The most recent missed fire only.
    Latest,
    /// Every missed fire, oldest first (at most [`MAX_CATCH_UP`]).
    All,
}

/// The most missed fires `catch_up: all` runs; older ones are recorded as missed.
pub const MAX_CATCH_UP: usize = 100;

impl Overlap {
    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::Queue => "queue",
            Overlap::Replace => "replace",
        }
    }
}

impl CatchUp {
    /// The YAML spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            CatchUp::None => "none",
            CatchUp::Latest => "latest",
            CatchUp::All => "all",
        }
    }
}

/// The block as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    cron: String,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    overlap: Overlap,
    #[serde(default)]
    catch_up: CatchUp,
    #[serde(default)]
    keep_runs: Option<u32>,
    #[serde(default)]
    folder: Option<String>,
}

/// A valid `schedule:` block.
#[derive(Clone, Debug)]
pub struct ScheduleConfig {
    /// The cron expression as written (5 fields, or an `@daily`-style nickname).
    pub cron_text: String,
    /// The parsed expression.
    pub cron: Cron,
    /// The IANA name of the time zone (`UTC` by default).
    pub timezone_name: String,
    /// The time zone fire times are computed in.
    pub timezone: TimeZone,
    /// Overlap policy.
    pub overlap: Overlap,
    /// Catch-up policy.
    pub catch_up: CatchUp,
    /// How many per-run folders to keep (all when `None`).
    pub keep_runs: Option<u32>,
    /// Workspace-relative folder under which each run gets `<folder>/<time>/`.
    pub folder: Option<String>,
}

/// Parses a 5-field cron expression (or `@hourly`, `@daily`, ...) the way taper does.
pub fn parse_cron(text: &str) -> Result<Cron, String> {
    if text.trim_start().starts_with("@reboot") {
        return Err("`@reboot` is not a time; start `taper schedule` at boot instead".into());
    }
    let fields = text.split_whitespace().count();
    if !text.trim_start().starts_with('@') && fields != 5 {
        return Err(format!(
            "invalid cron expression \"{text}\": expected 5 fields (minute hour day-of-month month day-of-week), found {fields}"
        ));
    }
    CronParser::builder()
        .seconds(Seconds::Disallowed)
        .year(Year::Disallowed)
        .build()
        .parse(text)
        .map_err(|e| format!("invalid cron expression \"{text}\": {e}"))
}

/// Looks up an IANA time zone, with a "did you mean" on a typo.
pub fn parse_timezone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name).map_err(|_| {
        let names: Vec<String> = jiff::tz::db().available().map(|n| n.to_string()).collect();
        let mut msg = format!("unknown time zone \"{name}\"");
        if let Some(best) = did_you_mean(name, names.iter().map(String::as_str)) {
            msg.push_str(&format!(" (did you mean \"{best}\"?)"));
        }
        msg.push_str("; use an IANA name such as UTC or Europe/Berlin");
        msg
    })
}

impl ScheduleConfig {
    /// Converts the raw `schedule:` node of `file`.
    pub fn from_node(file: &Path, node: &Node) -> Result<ScheduleConfig, SpecErrors> {
        let raw: RawSchedule =
            from_node(node).map_err(|e| SpecError::from_de(file, node.pos, "schedule", e))?;
        let pos_of = |key: &str| node.get(key).map(|n| n.pos).unwrap_or(node.pos);
        let at = |key: &str, msg: String| {
            SpecError::at(file, pos_of(key), msg).key(format!("schedule.{key}"))
        };
        let mut errors = Vec::new();
        let cron = parse_cron(&raw.cron)
            .map_err(|m| errors.push(at("cron", m)))
            .ok();
        let timezone_name = raw.timezone.clone().unwrap_or_else(|| "UTC".into());
        let timezone = parse_timezone(&timezone_name)
            .map_err(|m| errors.push(at("timezone", m)))
            .ok();
        if raw.keep_runs == Some(0) {
            errors.push(at("keep_runs", "`keep_runs` must be at least 1".into()));
        }
        let folder = match &raw.folder {
            None => None,
            Some(f) if f.contains("${") => {
                errors.push(at(
                    "folder",
                    "`folder` cannot use `${...}` references".into(),
                ));
                None
            }
            Some(f) => normalize_path(f)
                .map_err(|m| errors.push(at("folder", m)))
                .ok(),
        };
        if !errors.is_empty() {
            return Err(SpecErrors(errors));
        }
        Ok(ScheduleConfig {
            cron_text: raw.cron.trim().to_string(),
            cron: cron.expect("no errors"),
            timezone_name,
            timezone: timezone.expect("no errors"),
            overlap: raw.overlap,
            catch_up: raw.catch_up,
            keep_runs: raw.keep_runs,
            folder,
        })
    }

    /// The `schedule:` block of a pipeline file's text, if it has one. YAML errors are
    /// left to the pipeline loader, which reports them with the rest.
    pub fn from_source(file: &Path, source: &str) -> Result<Option<ScheduleConfig>, SpecErrors> {
        let Ok(root) = node::parse(source) else {
            return Ok(None);
        };
        match root.get("schedule") {
            None => Ok(None),
            Some(n) if matches!(n.value, node::Value::Null) => {
                Err(
                    SpecError::at(file, n.pos, "`schedule` is empty; it needs at least `cron`")
                        .key("schedule")
                        .into(),
                )
            }
            Some(n) => Self::from_node(file, n).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Option<ScheduleConfig>, SpecErrors> {
        let text = format!("version: 1\nname: t\nstages: {{}}\nschedule:\n{yaml}");
        ScheduleConfig::from_source(Path::new("p.yaml"), &text)
            .map_err(|e| SpecErrors(e.0.into_iter().map(|e| e.with_source(&text)).collect()))
    }

    #[test]
    fn defaults() {
        let c = parse("  cron: \"0 2 * * *\"\n").unwrap().unwrap();
        assert_eq!(c.timezone_name, "UTC");
        assert_eq!(c.overlap, Overlap::Skip);
        assert_eq!(c.catch_up, CatchUp::None);
        assert_eq!(c.keep_runs, None);
        assert_eq!(c.folder, None);
    }

    #[test]
    fn all_keys() {
        let c = parse("  cron: \"30 2 * * MON-FRI\"\n  timezone: Europe/Berlin\n  overlap: queue\n  catch_up: all\n  keep_runs: 3\n  folder: ./nightly/\n")
            .unwrap()
            .unwrap();
        assert_eq!(c.overlap, Overlap::Queue);
        assert_eq!(c.catch_up, CatchUp::All);
        assert_eq!(c.keep_runs, Some(3));
        assert_eq!(c.folder.as_deref(), Some("nightly"));
    }

    #[test]
    fn errors_point_at_the_key() {
        let e =
            parse("  cron: \"0 2 * *\"\n  timezone: Europe/Berln\n  keep_runs: 0\n").unwrap_err();
        let text = e.to_string();
        assert_eq!(e.0.len(), 3, "{text}");
        assert!(text.contains("p.yaml:5:9: key `schedule.cron`: invalid cron expression \"0 2 * *\": expected 5 fields"), "{text}");
        assert!(text.contains("p.yaml:6:13: key `schedule.timezone`: unknown time zone \"Europe/Berln\" (did you mean \"Europe/Berlin\"?)"), "{text}");
        assert!(
            text.contains("key `schedule.keep_runs`: `keep_runs` must be at least 1"),
            "{text}"
        );
    }

    #[test]
    fn unknown_keys_and_values_are_named() {
        let e = parse("  cron: \"0 2 * * *\"\n  overlapp: skip\n").unwrap_err();
        assert!(e.to_string().contains("p.yaml:6:3: key `schedule.overlapp`: unknown key \"overlapp\" (did you mean \"overlap\"?)"), "{e}");
        let e = parse("  cron: \"0 2 * * *\"\n  overlap: wait\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("key `schedule.overlap`: unknown value \"wait\""),
            "{e}"
        );
        let e = parse("  cron: \"0 2 * * * *\"\n").unwrap_err();
        assert!(e.to_string().contains("expected 5 fields"), "{e}");
        let e = parse("  cron: \"61 2 * * *\"\n").unwrap_err();
        assert!(e.to_string().contains("invalid cron expression"), "{e}");
    }

    #[test]
    fn nicknames_parse() {
        assert!(parse("  cron: \"@daily\"\n").unwrap().is_some());
        assert!(parse("  cron: \"@reboot\"\n").is_err());
    }
}
