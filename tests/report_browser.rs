//! The HTML run report in a real browser: a workspace with a recorded run (command stages
//! run by the real binary, plus training metrics appended through the library), the
//! report written by `taper report`, rendered by headless Chromium. Proves the page
//! renders (a screenshot with many distinct colours, not a blank page) and that the DOM
//! Chromium builds holds one curve per metric with exactly one point per logged step.
//!
//! `TAPER_REPORT_SCREENSHOT=FILE` keeps the screenshot. Needs Debian's `chromium`, which
//! `.ci/run` installs. In CI (`CI` set) a missing Chromium fails the test; elsewhere (a
//! fresh developer machine running `cargo test`) the test says how to install it and
//! skips.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use taper::state::{Layout, Ledger, MetricRow, RunRow};

const PIPELINE: &str = r#"version: 1
name: browser-demo
report: {path: reports/run.html}
stages:
  prepare:
    kind: command
    outputs: [data/raw.txt]
    with: {run: "mkdir -p data && echo hello > data/raw.txt"}
  train:
    kind: command
    inputs: [data/raw.txt]
    outputs: [adapters/run]
    with: {run: "mkdir -p adapters/run && cp data/raw.txt adapters/run/weights.txt"}
  package:
    kind: command
    inputs: [adapters/run]
    outputs: [dist/model.txt]
    with: {run: "mkdir -p dist && cat adapters/run/weights.txt > dist/model.txt"}
"#;

const TRAIN_STEPS: i64 = 40;
const EVAL_EVERY: i64 = 8;

fn taper(dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_taper"))
        .current_dir(dir)
        .args(args)
        .env_remove("TAPER_TRIGGER")
        .env_remove("TAPER_SCHEDULED_FOR")
        .env_remove("TAPER_RUN_TIME")
        .output()
        .expect("run taper")
}

/// Runs the pipeline, then appends train/eval metrics for its run as the train stage
/// would log them. Returns the workspace and the run id.
fn recorded_run() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pipeline.yaml"), PIPELINE).unwrap();
    let out = taper(dir.path(), &["run", "pipeline.yaml"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        dir.path().join("reports/run.html").is_file(),
        "`report:` in the pipeline makes `taper run` write the report"
    );
    let ledger = Ledger::new(&Layout::new(dir.path()));
    let run: RunRow = ledger.read::<RunRow>().unwrap().pop().unwrap();
    let mut rows = Vec::new();
    let mut metric = |step: i64, name: &str, value: f64| {
        rows.push(MetricRow {
            run_id: run.run_id.clone(),
            stage: "train".into(),
            step,
            name: name.into(),
            value,
            time: run.started_at + step,
        })
    };
    for step in 1..=TRAIN_STEPS {
        let t = step as f64;
        metric(
            step,
            "train/loss",
            3.0 * (-t / 15.0).exp() + 0.5 + 0.05 * (t * 1.7).sin(),
        );
        metric(
            step,
            "train/lr",
            2e-4 * (1.0 + (std::f64::consts::PI * t / 40.0).cos()) / 2.0,
        );
        metric(step, "train/grad_norm", 1.0 / t.sqrt());
        if step % EVAL_EVERY == 0 {
            metric(step, "eval/loss", 3.1 * (-t / 18.0).exp() + 0.6);
        }
    }
    ledger.append(&rows).unwrap();
    (dir, run.run_id)
}

fn chromium() -> Option<PathBuf> {
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .find_map(|name| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|p| p.join(name))
                    .find(|p| p.is_file())
            })
        })
}

/// Runs Chromium with `args`; kills it if it hangs (a guard, not a timing assertion).
fn run_chromium(bin: &Path, profile: &Path, args: &[String]) -> String {
    let mut child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut { stdout }, &mut s);
        s
    });
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within two minutes: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    reader.join().unwrap()
}

/// `points="..."` of the curve whose `data-metric` is `metric`, counted.
fn curve_points(dom: &str, metric: &str) -> usize {
    let tag = dom
        .split("<polyline")
        .skip(1)
        .find(|t| t.contains(&format!("data-metric=\"{metric}\"")))
        .unwrap_or_else(|| panic!("no curve for {metric} in the dumped DOM"));
    let tag = &tag[..tag.find('>').unwrap()];
    let points = tag
        .split(" points=\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap();
    points.split_whitespace().count()
}

#[test]
fn report_renders_in_chromium() {
    let Some(bin) = chromium() else {
        let msg = "this test renders the run report in headless Chromium, which is not installed.\n\
                   Install it (Debian/Ubuntu): sudo apt-get update && sudo apt-get install -y chromium";
        if std::env::var_os("CI").is_some() {
            panic!("{msg}\n(CI is set: .ci/run installs Chromium, so its absence is an error)");
        }
        eprintln!("SKIPPED report_renders_in_chromium: {msg}");
        return;
    };
    let (dir, run_id) = recorded_run();
    let out = taper(
        dir.path(),
        &["report", &run_id[..8], "--out", "report.html"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let html_path = dir.path().join("report.html");
    let html = std::fs::read_to_string(&html_path).unwrap();
    for needle in ["http://", "https://"] {
        let external = html.matches(needle).count();
        let svg_ns = html.matches("http://www.w3.org/2000/svg").count();
        assert_eq!(
            external,
            if needle == "http://" { svg_ns } else { 0 },
            "no external links"
        );
    }

    let profile = tempfile::tempdir().unwrap();
    let url = format!("file://{}", html_path.display());
    let png_path = dir.path().join("shot.png");
    run_chromium(
        &bin,
        profile.path(),
        &[
            format!("--screenshot={}", png_path.display()),
            "--window-size=1200,2000".into(),
            url.clone(),
        ],
    );
    let dom = run_chromium(&bin, profile.path(), &["--dump-dom".into(), url]);

    // The DOM Chromium built: every curve, one point per logged step.
    assert!(dom.contains("browser-demo"), "dumped DOM:\n{dom}");
    assert_eq!(curve_points(&dom, "train/loss"), TRAIN_STEPS as usize);
    assert_eq!(curve_points(&dom, "train/lr"), TRAIN_STEPS as usize);
    assert_eq!(curve_points(&dom, "train/grad_norm"), TRAIN_STEPS as usize);
    assert_eq!(
        curve_points(&dom, "eval/loss"),
        (TRAIN_STEPS / EVAL_EVERY) as usize
    );
    for stage in ["prepare", "train", "package"] {
        assert!(
            dom.contains(&format!("data-stage=\"{stage}\" data-status=\"success\"")),
            "stage {stage} in the graph"
        );
    }

    // `TAPER_REPORT_SCREENSHOT=FILE` keeps the screenshot, to look at it.
    if let Some(keep) = std::env::var_os("TAPER_REPORT_SCREENSHOT") {
        std::fs::copy(&png_path, keep).unwrap();
    }

    // The screenshot: decoded, not blank.
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png_path).unwrap(),
    ));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1200, 2000));
    let channels = info.color_type.samples();
    let px = &buf[..info.buffer_size()];
    let mut colours = HashSet::new();
    let mut non_white = 0usize;
    for p in px.chunks(channels * (info.bit_depth as usize / 8).max(1)) {
        let rgb = (p[0], p[channels.min(3) / 3], p[2 * channels.min(3) / 3]);
        colours.insert(rgb);
        if rgb.0 < 240 || rgb.1 < 240 || rgb.2 < 240 {
            non_white += 1;
        }
    }
    let total = (info.width * info.height) as usize;
    assert!(
        colours.len() >= 8,
        "only {} distinct colours: blank page?",
        colours.len()
    );
    assert!(
        non_white * 100 > total,
        "under 1% of the page is drawn: blank page?"
    );
}
