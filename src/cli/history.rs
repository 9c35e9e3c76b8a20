//! `taper runs`, `taper show`, `taper verify` and `taper gc`: reading, checking and
//! tidying the ledger.

use super::exit::{self, Failure};
use crate::state::{
    time::rfc3339, EventRow, HashCache, Layout, Ledger, LedgerError, MetricRow, RunRow,
    StageRunRow, WorkspaceLock,
};
use clap::Args;
use std::collections::BTreeMap;

/// `taper runs` options.
#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Show at most this many runs (newest first).
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `taper show` options.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// A run id (or a unique prefix of one); default: the latest run.
    pub run_id: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `taper verify` options.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// A run id (or a unique prefix of one); default: the latest run.
    pub run_id: Option<String>,
}

/// What re-hashing one recorded output found.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// The recorded hash.
    Same,
    /// Another hash, which a later run recorded for the same path: replaced, not damaged.
    Replaced(String),
    /// Another hash that no run recorded.
    Changed,
    /// The path is gone.
    Missing,
    /// It could not be read.
    Unreadable(String),
}

/// Re-hashes, from the bytes on disk (no hash cache), every output that the stages of a
/// run published or found up to date, and compares each with the hash the ledger
/// recorded. Exit 0 when each is the same (or was replaced by a later run), 7 otherwise.
pub fn verify(layout: &Layout, a: &VerifyArgs) -> Result<i32, Failure> {
    let ledger = Ledger::new(layout);
    let runs = latest_runs(&ledger)?;
    let run = find_run(&runs, a.run_id.as_deref())?;
    let rows = ledger.read::<StageRunRow>()?;
    let mut cache = HashCache::default();
    let mut bad = 0;
    let mut checked = 0;
    for s in rows
        .iter()
        .filter(|s| s.run_id == run.run_id && (s.status == "success" || s.status == "skipped"))
    {
        for o in &s.outputs {
            checked += 1;
            let verdict = match cache.hash_path(&layout.path(&o.path)) {
                Ok(h) if h.hash == o.hash => Verdict::Same,
                Ok(h) => rows
                    .iter()
                    .filter(|later| {
                        later.run_id != run.run_id
                            && later.started_at > s.started_at
                            && later
                                .outputs
                                .iter()
                                .any(|l| l.path == o.path && l.hash == h.hash)
                    })
                    .max_by_key(|later| later.started_at)
                    .map(|later| Verdict::Replaced(later.run_id.clone()))
                    .unwrap_or(Verdict::Changed),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Verdict::Missing,
                Err(e) => Verdict::Unreadable(e.to_string()),
            };
            let short = &o.hash[..o.hash.len().min(12)];
            let line = match &verdict {
                Verdict::Same => format!("ok        {}  {}  {short}", s.stage, o.path),
                Verdict::Replaced(by) => format!(
                    "replaced  {}  {}  (by run {by}; this run wrote {short})",
                    s.stage, o.path
                ),
                Verdict::Changed => format!(
                    "CHANGED   {}  {}  (the ledger recorded {short}; no run wrote what is there now)",
                    s.stage, o.path
                ),
                Verdict::Missing => format!("MISSING   {}  {}", s.stage, o.path),
                Verdict::Unreadable(e) => format!("UNREADABLE {}  {}  ({e})", s.stage, o.path),
            };
            println!("{line}");
            if !matches!(verdict, Verdict::Same | Verdict::Replaced(_)) {
                bad += 1;
            }
        }
    }
    if bad > 0 {
        return Err(Failure::new(
            exit::VERIFY_FAILED,
            format!(
                "error: run {}: {bad} of {checked} outputs no longer have their recorded content",
                run.run_id
            ),
        ));
    }
    eprintln!(
        "run {}: {checked} outputs checked, all as recorded",
        run.run_id
    );
    Ok(exit::SUCCESS)
}

/// `taper gc` options.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Also remove each pipeline's runs beyond its newest N from the ledger, as
    /// `keep_runs: N` does after a run (never a run holding a stage's latest success).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub keep_runs: Option<u32>,
}

/// The last row of each run, newest first.
pub fn latest_runs(ledger: &Ledger) -> Result<Vec<RunRow>, Failure> {
    let mut by_id: BTreeMap<String, RunRow> = BTreeMap::new();
    for r in ledger.read::<RunRow>()? {
        by_id.insert(r.run_id.clone(), r);
    }
    let mut runs: Vec<RunRow> = by_id.into_values().collect();
    runs.sort_by(|a, b| {
        b.started_at
            .cmp(&a.started_at)
            .then(b.run_id.cmp(&a.run_id))
    });
    Ok(runs)
}

fn duration(r: &RunRow) -> Option<f64> {
    r.ended_at.map(|e| (e - r.started_at) as f64 / 1e6)
}

/// A run whose row says `running` but whose process no longer holds the lock was killed.
fn effective_status(r: &RunRow, layout: &Layout) -> String {
    if r.status == "running"
        && !crate::state::lock::current_holders(layout)
            .iter()
            .any(|h| h.run_id == r.run_id)
    {
        "killed".to_string()
    } else {
        r.status.clone()
    }
}

/// `taper runs`.
pub fn runs(layout: &Layout, a: &RunsArgs) -> Result<i32, Failure> {
    let runs = latest_runs(&Ledger::new(layout))?;
    let runs = &runs[..runs.len().min(a.limit)];
    if a.json {
        let v: Vec<_> = runs
            .iter()
            .map(|r| {
                serde_json::json!({
                    "run_id": r.run_id, "pipeline": r.pipeline, "name": r.pipeline_name,
                    "status": effective_status(r, layout), "trigger": r.trigger,
                    "started_at": rfc3339(r.started_at), "duration_s": duration(r),
                })
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(exit::SUCCESS);
    }
    if runs.is_empty() {
        println!("no runs recorded in this workspace");
    }
    for r in runs {
        let d = duration(r)
            .map(|d| format!("{d:.1}s"))
            .unwrap_or_else(|| "-".into());
        println!(
            "{}  {:<11} {:<8} {}  {:>8}  {}",
            r.run_id,
            effective_status(r, layout),
            r.trigger,
            rfc3339(r.started_at),
            d,
            r.pipeline_name
        );
    }
    Ok(exit::SUCCESS)
}

/// The run `id` names (a unique prefix), or the latest run; an error says why not.
pub fn find_run<'r>(runs: &'r [RunRow], id: Option<&str>) -> Result<&'r RunRow, Failure> {
    let run = match id {
        None => runs.first(),
        Some(id) => {
            let matches: Vec<&RunRow> = runs.iter().filter(|r| r.run_id.starts_with(id)).collect();
            if matches.len() > 1 {
                return Err(Failure::new(
                    exit::ERROR,
                    format!(
                        "error: run id prefix \"{id}\" matches {} runs",
                        matches.len()
                    ),
                ));
            }
            matches.into_iter().next()
        }
    };
    run.ok_or_else(|| {
        let what = id
            .map(|i| format!("run \"{i}\""))
            .unwrap_or_else(|| "any run".into());
        Failure::new(
            exit::ERROR,
            format!("error: the ledger has no record of {what}"),
        )
    })
}

/// `taper show`.
pub fn show(layout: &Layout, a: &ShowArgs) -> Result<i32, Failure> {
    let ledger = Ledger::new(layout);
    let runs = latest_runs(&ledger)?;
    let run = find_run(&runs, a.run_id.as_deref())?;
    let stages: Vec<StageRunRow> = ledger
        .read::<StageRunRow>()?
        .into_iter()
        .filter(|s| s.run_id == run.run_id)
        .collect();
    let mut last_metric: BTreeMap<(String, String), (i64, f64)> = BTreeMap::new();
    let mut series: BTreeMap<(String, String), Vec<(i64, f64)>> = BTreeMap::new();
    for m in ledger
        .read::<MetricRow>()?
        .into_iter()
        .filter(|m| m.run_id == run.run_id)
    {
        let key = (m.stage, m.name);
        series
            .entry(key.clone())
            .or_default()
            .push((m.step, m.value));
        last_metric.insert(key, (m.step, m.value));
    }
    let retries = ledger
        .read::<EventRow>()?
        .into_iter()
        .filter(|e| e.run_id == run.run_id && e.event == "stage_retry")
        .count();
    if a.json {
        let st: Vec<_> = stages
            .iter()
            .map(|s| {
                let metrics: BTreeMap<&str, f64> = last_metric
                    .iter()
                    .filter(|((stage, _), _)| *stage == s.stage)
                    .map(|((_, n), (_, v))| (n.as_str(), *v))
                    .collect();
                let steps: BTreeMap<&str, &Vec<(i64, f64)>> = series
                    .iter()
                    .filter(|((stage, _), _)| *stage == s.stage)
                    .map(|((_, n), points)| (n.as_str(), points))
                    .collect();
                serde_json::json!({
                    "stage": s.stage, "kind": s.kind, "status": s.status, "reason": s.reason,
                    "attempt": s.attempt, "started_at": rfc3339(s.started_at),
                    "duration_s": s.ended_at.map(|e| (e - s.started_at) as f64 / 1e6),
                    "fingerprint": s.fingerprint, "error": s.error,
                    "outputs": s.outputs.iter().map(|o| serde_json::json!({"path": o.path, "hash": o.hash, "bytes": o.bytes})).collect::<Vec<_>>(),
                    "metrics": metrics,
                    "series": steps,
                })
            })
            .collect();
        let v = serde_json::json!({
            "run_id": run.run_id, "pipeline": run.pipeline, "name": run.pipeline_name,
            "status": effective_status(run, layout), "trigger": run.trigger,
            "started_at": rfc3339(run.started_at), "duration_s": duration(run), "retries": retries, "stages": st,
        });
        println!("{v}");
        return Ok(exit::SUCCESS);
    }
    println!(
        "run {}  {}  ({})",
        run.run_id,
        effective_status(run, layout),
        run.pipeline
    );
    println!(
        "started {}  took {}",
        rfc3339(run.started_at),
        duration(run)
            .map(|d| format!("{d:.2}s"))
            .unwrap_or("-".into())
    );
    for s in &stages {
        let d = s
            .ended_at
            .map(|e| format!("{:.2}s", (e - s.started_at) as f64 / 1e6))
            .unwrap_or("-".into());
        println!("  {:<10} {:<24} {:>8}  {}", s.status, s.stage, d, s.reason);
        if let Some(e) = &s.error {
            println!("      error: {}", e.lines().next().unwrap_or_default());
        }
        for o in &s.outputs {
            println!(
                "      {}  {}  {} bytes",
                o.path,
                &o.hash[..o.hash.len().min(16)],
                o.bytes
            );
        }
        for ((stage, name), (step, value)) in &last_metric {
            if *stage == s.stage {
                println!("      {name} = {value} (step {step})");
            }
        }
    }
    Ok(exit::SUCCESS)
}

/// Removes the runs of `pipeline` (of every pipeline when `None`) beyond its newest
/// `keep` from the ledger, and their log folders; `plan::retention` says which. Returns
/// their ids, oldest first. The caller holds the exclusive workspace lock.
pub fn prune_runs(
    layout: &Layout,
    keep: usize,
    pipeline: Option<&str>,
) -> Result<Vec<String>, LedgerError> {
    let ids = crate::plan::retention::prune(&Ledger::new(layout), keep, pipeline)?;
    for id in &ids {
        // Run ids name folders: never follow one that is not a plain name.
        if !id.is_empty() && !id.starts_with('.') && !id.contains(['/', '\\']) {
            let _ = std::fs::remove_dir_all(layout.run_dir(id));
        }
    }
    Ok(ids)
}

/// `taper gc`.
pub fn gc(layout: &Layout, a: &GcArgs) -> Result<i32, Failure> {
    let _lock = WorkspaceLock::acquire(layout, "gc")?;
    if let Some(keep) = a.keep_runs {
        let removed = prune_runs(layout, keep as usize, None)?;
        println!(
            "removed {} old run(s) from the ledger (--keep-runs {keep})",
            removed.len()
        );
    }
    let ledger = Ledger::new(layout);
    let merged = ledger.compact::<RunRow>()?
        + ledger.compact::<StageRunRow>()?
        + ledger.compact::<MetricRow>()?
        + ledger.compact::<EventRow>()?;
    let _ = std::fs::remove_dir_all(layout.trash());
    println!("merged {merged} ledger files");
    Ok(exit::SUCCESS)
}
