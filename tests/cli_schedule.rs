//! `taper schedule` end to end: the real binary with a fake clock (hidden
//! `--fake-clock`) that starts two seconds before a fire time and jumps over every wait,
//! so two scheduled runs of an every-minute cron take as long as the runs themselves.
//! Also `--list`, `export systemd`, and `${run.folder}` in a manual run. `keep_runs` in the
//! ledger has its own tests in `cli_keep_runs.rs`. And SIGTERM to the real scheduler while
//! its real child run is in a stage.

use std::path::Path;
use std::process::{Command, Output};
use taper::state::{EventRow, Layout, Ledger, RunRow};

const PIPELINE: &str = r#"version: 1
name: minutely
schedule:
  cron: "* * * * *"
  folder: runs
  keep_runs: 1
stages:
  make:
    kind: command
    outputs: ["${run.folder}/out.txt"]
    with: {run: "mkdir -p ${run.folder} && echo ${run.stamp} > ${run.folder}/out.txt"}
"#;

fn taper(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_taper"));
    cmd.current_dir(dir)
        .args(args)
        .env_remove("TAPER_TRIGGER")
        .env_remove("TAPER_SCHEDULED_FOR")
        .env_remove("TAPER_RUN_TIME");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The last row of each run.
fn run_rows(dir: &Path) -> Vec<RunRow> {
    let rows: Vec<RunRow> = Ledger::new(&Layout::new(dir)).read().unwrap();
    let mut last: Vec<RunRow> = Vec::new();
    for r in rows {
        match last.iter_mut().find(|l| l.run_id == r.run_id) {
            Some(l) => *l = r,
            None => last.push(r),
        }
    }
    last.sort_by_key(|r| r.scheduled_for);
    last
}

#[test]
fn two_scheduled_runs_are_recorded_with_their_trigger_and_fire_time() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), PIPELINE).unwrap();
    let out = taper(
        dir.path(),
        &[
            "schedule",
            "p.yaml",
            "--max-runs",
            "2",
            "--fake-clock",
            "2027-03-29T00:29:58Z",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    // keep_runs: 1 removed the first run from the ledger once the second succeeded (the
    // second's `make` holds the latest success); the decisions below still name both.
    let runs = run_rows(dir.path());
    assert_eq!(runs.len(), 1, "{runs:?}");
    let micros = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_microsecond();
    assert_eq!(runs[0].scheduled_for, Some(micros("2027-03-29T00:31:00Z")));
    assert_eq!(runs[0].trigger, "schedule");
    assert_eq!(runs[0].status, "success", "{}", text(&out));
    // Each run wrote its own folder; `latest` points at the last; keep_runs: 1 removed
    // the first once the second succeeded.
    let root = dir.path().join("runs");
    assert_eq!(
        std::fs::read_link(root.join("latest")).unwrap(),
        Path::new("2027-03-29T00:31")
    );
    assert_eq!(
        std::fs::read_to_string(root.join("latest/out.txt")).unwrap(),
        "2027-03-29T00:31\n"
    );
    assert!(!root.join("2027-03-29T00:30").exists());
    // The decisions are in the ledger.
    let events: Vec<EventRow> = Ledger::new(&Layout::new(dir.path())).read().unwrap();
    let fired: Vec<&str> = events
        .iter()
        .filter(|e| e.run_id == "schedule" && e.event == "schedule_fired")
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(
        fired,
        [
            "minutely: started the run for 2027-03-29T00:30:00Z",
            "minutely: started the run for 2027-03-29T00:31:00Z"
        ]
    );

    // Restarted later with catch_up: none (the default), the missed fires are recorded.
    let out = taper(
        dir.path(),
        &[
            "schedule",
            "p.yaml",
            "--max-runs",
            "1",
            "--fake-clock",
            "2027-03-29T00:34:30Z",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let events: Vec<EventRow> = Ledger::new(&Layout::new(dir.path())).read().unwrap();
    assert!(
        events.iter().any(|e| e.event == "schedule_missed"
            && e.message
                == "minutely: 3 fire time(s) from 2027-03-29T00:32:00Z to 2027-03-29T00:34:00Z were missed while taper was not running and are not run"),
        "{events:?}"
    );
    assert_eq!(
        run_rows(dir.path()).last().unwrap().scheduled_for,
        Some(micros("2027-03-29T00:35:00Z"))
    );
}

#[test]
fn list_prints_utc_then_local_time_across_a_dst_change() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "version: 1\nname: n\nschedule: {cron: \"30 2 * * *\", timezone: Europe/Berlin}\nstages:\n  a: {kind: command, outputs: [a.txt], with: {run: \"echo > a.txt\"}}\n",
    )
    .unwrap();
    let out = taper(
        dir.path(),
        &[
            "schedule",
            "p.yaml",
            "--list",
            "3",
            "--from",
            "2027-03-27T00:00:00Z",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2027-03-27T01:30:00Z  2027-03-27 02:30 CET (+01:00)\n\
         2027-03-28T01:00:00Z  2027-03-28 03:00 CEST (+02:00)\n\
         2027-03-29T00:30:00Z  2027-03-29 02:30 CEST (+02:00)\n"
    );
    let out = taper(
        dir.path(),
        &["schedule", "p.yaml", "--list", "1", "--from", "yesterday"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
}

#[test]
fn a_manual_run_uses_the_manual_folder_and_a_bad_schedule_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), PIPELINE).unwrap();
    let out = taper(dir.path(), &["run", "p.yaml"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("runs/manual/out.txt")).unwrap(),
        "manual\n"
    );
    let r = run_rows(dir.path());
    assert_eq!(
        (r[0].trigger.as_str(), r[0].scheduled_for),
        ("manual", None)
    );

    std::fs::write(
        dir.path().join("bad.yaml"),
        PIPELINE.replace("keep_runs: 1", "keep_runs: 1\n  overlap: wait"),
    )
    .unwrap();
    let out = taper(dir.path(), &["validate", "bad.yaml"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("bad.yaml:7:12: key `schedule.overlap`: unknown value \"wait\""),
        "{}",
        text(&out)
    );
}

#[test]
fn export_systemd_writes_a_service_and_a_timer() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        PIPELINE.replace(
            "\"* * * * *\"",
            "\"0 2 * * *\"\n  timezone: Europe/Berlin\n  catch_up: latest",
        ),
    )
    .unwrap();
    let out = taper(
        dir.path(),
        &["export", "systemd", "p.yaml", "--out", "units"],
        &[],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let timer = std::fs::read_to_string(dir.path().join("units/taper-minutely.timer")).unwrap();
    assert!(
        timer.contains("OnCalendar=*-*-* 02:00:00 Europe/Berlin\n"),
        "{timer}"
    );
    assert!(timer.contains("Persistent=true\n"), "{timer}");
    assert!(timer.contains("Unit=taper-minutely.service\n"), "{timer}");
    let service = std::fs::read_to_string(dir.path().join("units/taper-minutely.service")).unwrap();
    assert!(
        service.contains("Environment=TAPER_TRIGGER=schedule\n"),
        "{service}"
    );
    assert!(service.contains(" run "), "{service}");

    std::fs::write(
        dir.path().join("l.yaml"),
        PIPELINE.replace("\"* * * * *\"", "\"0 2 L * *\""),
    )
    .unwrap();
    let out = taper(dir.path(), &["export", "systemd", "l.yaml"], &[]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
    assert!(
        text(&out).contains("cannot export to systemd"),
        "{}",
        text(&out)
    );
}

/// SIGTERM to the real scheduler process while its real `taper run` child is in a stage:
/// the signal is forwarded, the stage's process is stopped, the run is recorded as
/// interrupted, the decision as "stopped by a signal", and the scheduler exits 130.
#[test]
fn sigterm_stops_the_scheduler_and_its_running_run() {
    let dir = tempfile::tempdir().unwrap();
    // The stage runs in its staging folder: it writes its pid where the test looks.
    let pid_file = dir.path().join("stage.pid");
    let pipeline = format!(
        r#"version: 1
name: slow
schedule: {{cron: "* * * * *"}}
stages:
  wait:
    kind: command
    outputs: [done.txt]
    with: {{run: "echo $$ > {}; sleep 60; touch done.txt"}}
"#,
        pid_file.display()
    );
    std::fs::write(dir.path().join("p.yaml"), pipeline).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_taper"))
        .current_dir(dir.path())
        .args(["schedule", "p.yaml", "--max-runs", "1"])
        .args(["--fake-clock", "2027-03-29T00:29:58Z"])
        .env_remove("TAPER_TRIGGER")
        .env_remove("TAPER_SCHEDULED_FOR")
        .env_remove("TAPER_RUN_TIME")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let stage_pid: i32 = loop {
        if let Some(pid) = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            break pid;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the scheduled run's stage never started"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    // SAFETY: kill(2) on the scheduler we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "the scheduler did not stop after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(130), "{}", text(&out));
    let stat = std::fs::read_to_string(format!("/proc/{stage_pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.trim_start().to_string());
    assert!(
        state.is_none_or(|s| s.starts_with('Z') || s.starts_with('X')),
        "the stage's shell {stage_pid} still runs: {stat}"
    );
    assert!(!dir.path().join("done.txt").exists());
    let runs = run_rows(dir.path());
    assert_eq!(runs.len(), 1, "{runs:?}");
    assert_eq!(runs[0].status, "interrupted", "{}", text(&out));
    let events: Vec<EventRow> = Ledger::new(&Layout::new(dir.path())).read().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.run_id == "schedule" && e.message == "slow: stopped by a signal"),
        "{events:?}"
    );
}
