//! The tokenize stage as the executor runs it: the library [`run`] wired to a
//! [`StageContext`] — output folder in staging, progress and counts as events, Ctrl-C.

use super::{run, Progress, TokenizeConfig, TokenizeError};
use crate::stages::{StageContext, StageError, StageEvent};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Runs one attempt: tokenizes into the stage's single declared output folder.
pub fn run_stage(cfg: &TokenizeConfig, ctx: &StageContext<'_>) -> Result<(), StageError> {
    let [out] = ctx.stage.outputs.as_slice() else {
        return Err(StageError::Failed(format!(
            "a tokenize stage declares exactly one output (the shard folder), found {}",
            ctx.stage.outputs.len()
        )));
    };
    let out_dir = ctx.staged(&out.path);
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| StageError::Failed(format!("cannot create {}: {e}", out.path)))?;
    let cancel = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let started = std::time::Instant::now();
    let progress = |p: &Progress| {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        ctx.emit(StageEvent::Progress {
            done: p.bytes_read,
            total: Some(p.bytes_total),
            unit: "bytes".into(),
            message: format!(
                "{:.1} MB/s, {:.0} records/s, {} tokens",
                p.bytes_read as f64 / 1e6 / secs,
                p.records as f64 / secs,
                p.tokens
            ),
        })
    };
    let result = std::thread::scope(|s| {
        // The library polls an AtomicBool; mirror the stage's cancel token into it.
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                if ctx.cancel.is_cancelled() {
                    cancel.store(true, Ordering::Relaxed);
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let r = run(cfg, ctx.workspace, &out_dir, &progress, &cancel);
        done.store(true, Ordering::Relaxed);
        r
    });
    let summary = match result {
        Ok(s) => s,
        Err(TokenizeError::Cancelled) => {
            return ctx
                .check_cancelled()
                .and(Err(StageError::Failed("cancelled".into())))
        }
        Err(e) => return Err(StageError::Failed(e.to_string())),
    };
    ctx.metric(0, "tokenize/records", summary.records as f64);
    ctx.metric(0, "tokenize/skipped", summary.skipped as f64);
    for (split, c) in [("train", &summary.train), ("valid", &summary.valid)] {
        ctx.metric(0, &format!("tokenize/{split}_examples"), c.examples as f64);
        ctx.metric(0, &format!("tokenize/{split}_rows"), c.rows as f64);
        ctx.metric(0, &format!("tokenize/{split}_tokens"), c.tokens as f64);
        ctx.metric(
            0,
            &format!("tokenize/{split}_loss_tokens"),
            c.loss_tokens as f64,
        );
    }
    if summary.skipped > 0 {
        ctx.emit(StageEvent::Log(format!(
            "skipped {} bad records, e.g. {}",
            summary.skipped,
            summary.skipped_samples.first().cloned().unwrap_or_default()
        )));
    }
    Ok(())
}
