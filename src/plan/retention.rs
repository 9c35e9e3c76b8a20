//! `keep_runs` for the ledger: which old runs to remove, never one that planning reads.
//!
//! A *run of a pipeline* is a `runs` row with the pipeline's `name:` as `pipeline_name`,
//! whatever its trigger (manual or schedule) and outcome. The `pipeline` column is not
//! used: it is the file path as typed (`p.yaml`, `./p.yaml`, an absolute path), so one
//! pipeline has several spellings of it.
//!
//! A run is kept or removed whole: its rows in `runs`, `stage_runs`, `metrics` and
//! `events`. The newest `keep` runs of a pipeline (by start time) are kept, and so is every
//! older run that holds a row [`History`] indexes (a stage's latest success, which decides
//! "up to date", or its latest attempt), so pruning never changes a plan: a stage skipped
//! as up to date in recent runs stays up to date, and `taper show` still shows the run
//! that made its outputs.

use super::history::History;
use crate::state::{EventRow, Ledger, LedgerError, MetricRow, RunRow, StageRunRow};
use std::collections::{BTreeMap, BTreeSet};

/// The runs to remove: per pipeline (only `pipeline` when given), those beyond the newest
/// `keep` that hold no row of the history of `stage_runs`. Oldest first.
pub fn select(
    runs: &[RunRow],
    stage_runs: &[StageRunRow],
    keep: usize,
    pipeline: Option<&str>,
) -> Vec<String> {
    // The last row of each run wins (a run has a start and an end row).
    let mut last: BTreeMap<&str, &RunRow> = BTreeMap::new();
    for r in runs {
        last.insert(&r.run_id, r);
    }
    let mut by_pipeline: BTreeMap<&str, Vec<&RunRow>> = BTreeMap::new();
    for r in last.into_values() {
        if pipeline.is_none_or(|p| p == r.pipeline_name) {
            by_pipeline.entry(&r.pipeline_name).or_default().push(r);
        }
    }
    let history = History::from_rows(stage_runs.to_vec());
    let held = history.run_ids();
    let mut remove: Vec<&RunRow> = Vec::new();
    for mut group in by_pipeline.into_values() {
        // Newest first, as `taper runs` lists them.
        group.sort_by(|a, b| {
            b.started_at
                .cmp(&a.started_at)
                .then(b.run_id.cmp(&a.run_id))
        });
        remove.extend(
            group
                .into_iter()
                .skip(keep)
                .filter(|r| !held.contains(r.run_id.as_str())),
        );
    }
    remove.sort_by(|a, b| {
        a.started_at
            .cmp(&b.started_at)
            .then(a.run_id.cmp(&b.run_id))
    });
    remove.into_iter().map(|r| r.run_id.clone()).collect()
}

/// Removes the runs [`select`] picks from every table; returns their ids, oldest first.
///
/// Each table is rewritten atomically (see `state::ledger`); `runs` goes last, so a crash
/// part-way leaves runs that the next prune removes again, never rows without a run.
/// The caller holds the exclusive workspace lock.
pub fn prune(
    ledger: &Ledger,
    keep: usize,
    pipeline: Option<&str>,
) -> Result<Vec<String>, LedgerError> {
    let runs = ledger.read::<RunRow>()?;
    let stage_runs = ledger.read::<StageRunRow>()?;
    let ids = select(&runs, &stage_runs, keep, pipeline);
    if ids.is_empty() {
        return Ok(ids);
    }
    let gone: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
    ledger.retain::<EventRow>(|r| !gone.contains(r.run_id.as_str()))?;
    ledger.retain::<MetricRow>(|r| !gone.contains(r.run_id.as_str()))?;
    ledger.retain::<StageRunRow>(|r| !gone.contains(r.run_id.as_str()))?;
    ledger.retain::<RunRow>(|r| !gone.contains(r.run_id.as_str()))?;
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Layout;

    fn run(id: &str, pipeline: &str, started_at: i64, status: &str) -> RunRow {
        RunRow {
            run_id: id.into(),
            pipeline: "p.yaml".into(),
            pipeline_name: pipeline.into(),
            status: status.into(),
            trigger: "schedule".into(),
            scheduled_for: None,
            started_at,
            ended_at: None,
            args: "{}".into(),
            host: "h".into(),
            pid: 1,
            taper_version: "0".into(),
        }
    }

    fn stage(run_id: &str, stage: &str, status: &str) -> StageRunRow {
        StageRunRow {
            run_id: run_id.into(),
            stage: stage.into(),
            kind: "command".into(),
            fingerprint: format!("fp-{stage}"),
            config_hash: "ch".into(),
            status: status.into(),
            reason: String::new(),
            attempt: 1,
            started_at: 0,
            ended_at: Some(1),
            inputs: Vec::new(),
            outputs: Vec::new(),
            error: None,
        }
    }

    /// Pipeline `p`: five runs `r1`..`r5`. Stage `a` succeeded in `r1` and was skipped as
    /// up to date since; `b` ran in every run; `d` failed in `r2` and never ran again.
    /// Pipeline `q`: one old run.
    fn history() -> (Vec<RunRow>, Vec<StageRunRow>) {
        let mut runs = vec![run("q1", "q", 0, "success")];
        let mut stages = vec![stage("q1", "qa", "success")];
        for i in 1..=5 {
            let id = format!("r{i}");
            runs.push(run(&id, "p", i, "running"));
            stages.push(stage(&id, "a", if i == 1 { "success" } else { "skipped" }));
            stages.push(stage(&id, "b", "success"));
            if i == 2 {
                stages.push(stage(&id, "d", "failed"));
            }
            runs.push(run(&id, "p", i, if i == 2 { "failed" } else { "success" }));
        }
        (runs, stages)
    }

    #[test]
    fn keeps_the_newest_runs_and_those_planning_reads() {
        let (runs, stages) = history();
        // r5, r4: the newest two; r1: `a`'s latest success; r2: `d`'s latest attempt.
        assert_eq!(select(&runs, &stages, 2, Some("p")), ["r3"]);
        assert_eq!(select(&runs, &stages, 1, None), ["r3", "r4"]);
        assert_eq!(select(&runs, &stages, 5, Some("p")), Vec::<String>::new());
        // Without `d`'s failure, r2 goes too; `q` is never touched for `p`.
        let stages: Vec<_> = stages.into_iter().filter(|s| s.stage != "d").collect();
        assert_eq!(select(&runs, &stages, 2, Some("p")), ["r2", "r3"]);
        assert_eq!(select(&runs, &stages, 0, Some("q")), Vec::<String>::new());
    }

    #[test]
    fn prune_removes_whole_runs_from_every_table_and_keeps_the_history() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::new(&Layout::new(dir.path()));
        let (runs, stages) = history();
        let stages: Vec<_> = stages.into_iter().filter(|s| s.stage != "d").collect();
        // Spread over several files, as runs append them.
        for chunk in runs.chunks(3) {
            ledger.append(chunk).unwrap();
        }
        for chunk in stages.chunks(4) {
            ledger.append(chunk).unwrap();
        }
        let ids = ["q1", "r1", "r2", "r3", "r4", "r5", "schedule"];
        let metrics: Vec<MetricRow> = ids
            .iter()
            .map(|id| MetricRow {
                run_id: id.to_string(),
                stage: "b".into(),
                step: 1,
                name: "loss".into(),
                value: 1.0,
                time: 1,
            })
            .collect();
        ledger.append(&metrics).unwrap();
        let events: Vec<EventRow> = ids
            .iter()
            .map(|id| EventRow {
                run_id: id.to_string(),
                time: 1,
                stage: None,
                event: "run_finished".into(),
                message: String::new(),
            })
            .collect();
        ledger.append(&events).unwrap();
        let before = History::load(&ledger).unwrap();

        assert_eq!(prune(&ledger, 2, Some("p")).unwrap(), ["r2", "r3"]);
        let left = ["q1", "r1", "r4", "r5"];
        let mut run_ids: Vec<String> = ledger
            .read::<RunRow>()
            .unwrap()
            .into_iter()
            .map(|r| r.run_id)
            .collect();
        run_ids.dedup();
        assert_eq!(run_ids, left);
        let stage_ids: BTreeSet<String> = ledger
            .read::<StageRunRow>()
            .unwrap()
            .into_iter()
            .map(|r| r.run_id)
            .collect();
        assert_eq!(stage_ids, left.iter().map(|s| s.to_string()).collect());
        // Rows of no run (the scheduler's decisions) stay.
        let with_schedule = ["q1", "r1", "r4", "r5", "schedule"];
        let metric_ids: Vec<String> = ledger
            .read::<MetricRow>()
            .unwrap()
            .into_iter()
            .map(|r| r.run_id)
            .collect();
        assert_eq!(metric_ids, with_schedule);
        let event_ids: Vec<String> = ledger
            .read::<EventRow>()
            .unwrap()
            .into_iter()
            .map(|r| r.run_id)
            .collect();
        assert_eq!(event_ids, with_schedule);
        let after = History::load(&ledger).unwrap();
        assert_eq!(after.last_success, before.last_success);
        assert_eq!(after.last, before.last);

        // Nothing more to remove: nothing is rewritten.
        let files = ledger.files("runs").unwrap();
        assert_eq!(files.len(), 1);
        assert!(prune(&ledger, 2, Some("p")).unwrap().is_empty());
        assert_eq!(ledger.files("runs").unwrap(), files);
    }
}
