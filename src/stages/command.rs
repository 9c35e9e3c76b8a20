//! `kind: command` — any shell step, like a DVC stage.
//!
//! Runs `sh -c <run>` in the stage's staging folder, where each input is linked in under
//! its workspace-relative path (as Nextflow stages a task). Whatever the command writes
//! there under a declared output path is published only when it exits 0. The child runs
//! in its own process group so that a timeout or Ctrl-C can stop all it started.

use super::context::{StageContext, StageError, StageEvent, StopReason};
use serde::Deserialize;
use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Bumped when the way a command stage runs changes what it produces.
pub const VERSION: u32 = 1;

/// Every `with:` key: (key, default, meaning). `taper kinds` and `taper run --help` print
/// it; a test checks it names exactly the fields of [`CommandConfig`].
pub const KEYS: &[(&str, &str, &str)] = &[
    (
        "run",
        "required",
        "shell command, run by `sh -c` in the staging folder",
    ),
    ("env", "{}", "extra environment variables (a mapping)"),
    (
        "kill_grace",
        "5s",
        "wait between SIGTERM and SIGKILL on timeout or Ctrl-C",
    ),
];

/// `with:` of a command stage.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CommandConfig {
    /// The shell command, run by `sh -c` in the staging folder.
    pub run: String,
    /// Extra environment variables.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// After asking the command to stop (SIGTERM), wait this long before SIGKILL.
    #[serde(default = "default_grace")]
    pub kill_grace: String,
}

fn default_grace() -> String {
    "5s".to_string()
}

/// Runs one attempt of a command stage.
pub fn run(cfg: &CommandConfig, ctx: &StageContext<'_>) -> Result<(), StageError> {
    let failed = |what: &str, e: std::io::Error| StageError::Failed(format!("{what}: {e}"));
    link_inputs(ctx).map_err(|e| failed("cannot link inputs into the staging folder", e))?;
    for o in &ctx.stage.outputs {
        if let Some(parent) = ctx.staged(&o.path).parent() {
            fs::create_dir_all(parent).map_err(|e| failed("cannot create output folder", e))?;
        }
    }
    let mut log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&ctx.log_file)
        .map_err(|e| failed("cannot open the stage log", e))?;
    let _ = writeln!(
        log,
        "--- attempt {} of stage {}: {}",
        ctx.attempt, ctx.stage.name, cfg.run
    );
    let stderr = log
        .try_clone()
        .map_err(|e| failed("cannot open the stage log", e))?;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&cfg.run)
        .current_dir(ctx.staging)
        .envs(&cfg.env)
        .env("TAPER_STAGE", &ctx.stage.name)
        .env("TAPER_RUN_ID", ctx.run_id)
        .env("TAPER_WORKSPACE", ctx.workspace)
        .env("TAPER_ATTEMPT", ctx.attempt.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(stderr))
        .process_group(0)
        .spawn()
        .map_err(|e| failed("cannot start `sh`", e))?;
    let grace = crate::spec::parse_duration(&cfg.kill_grace).unwrap_or(Duration::from_secs(5));
    let pgid = child.id() as i32;
    let mut term_sent: Option<Instant> = None;
    let mut stop: Option<StopReason> = None;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                if let Some(r) = stop {
                    return Err(StageError::Stopped(r));
                }
                if status.success() {
                    return Ok(());
                }
                let tail = log_tail(&ctx.log_file, 5);
                ctx.emit(StageEvent::Log(tail.clone()));
                let how = match status.code() {
                    Some(c) => format!("exit code {c}"),
                    None => "killed by a signal".to_string(),
                };
                return Err(StageError::Failed(format!(
                    "command failed ({how}): {}{}",
                    cfg.run,
                    indent(&tail)
                )));
            }
            Ok(None) => {}
            Err(e) => return Err(failed("cannot wait for the command", e)),
        }
        if stop.is_none() {
            if let Some(r) = ctx.cancel.reason() {
                stop = Some(r);
            } else if ctx.deadline.is_some_and(|d| Instant::now() >= d) {
                stop = Some(StopReason::Timeout);
            }
        }
        match (stop, term_sent) {
            (Some(StopReason::Kill), _) => signal_group(pgid, libc::SIGKILL),
            (Some(_), None) => {
                signal_group(pgid, libc::SIGTERM);
                term_sent = Some(Instant::now());
            }
            (Some(_), Some(t)) if t.elapsed() >= grace => signal_group(pgid, libc::SIGKILL),
            _ => {}
        }
        // A second Ctrl-C upgrades an interrupt to a kill.
        if stop.is_some() && ctx.cancel.reason() == Some(StopReason::Kill) {
            stop = Some(StopReason::Kill);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn signal_group(pgid: i32, sig: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group we created; no memory
    // is touched.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

fn indent(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!(
            "\n  last output:\n    {}",
            tail.trim_end().replace('\n', "\n    ")
        )
    }
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Links each input into the staging folder under its workspace-relative path.
fn link_inputs(ctx: &StageContext<'_>) -> std::io::Result<()> {
    for i in &ctx.stage.inputs {
        let target = ctx.workspace.join(&i.path);
        let link = ctx.staged(&i.path);
        if link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent)?;
        }
        let target = fs::canonicalize(&target).unwrap_or(target);
        std::os::unix::fs::symlink(&target, &link)?;
    }
    Ok(())
}
