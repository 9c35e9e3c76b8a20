//! Shared helpers of the end-to-end `cli_*` tests, in the style of ripgrep's `tests/util.rs`:
//! a temporary workspace [`Dir`], a [`TestCommand`] builder that runs the real `taper`
//! binary in it, and readers of the workspace's ledger.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use taper::state::{EventRow, Layout, Ledger, MetricRow, RunRow, StageRunRow};

/// A temporary workspace, deleted when dropped.
pub struct Dir {
    _tmp: tempfile::TempDir,
    /// The workspace root (absolute).
    pub root: PathBuf,
}

impl Dir {
    /// A new, empty workspace. `name` only helps to recognise it in a listing of /tmp.
    pub fn new(name: &str) -> Dir {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("taper-test-{name}-"))
            .tempdir()
            .expect("create a temp workspace");
        let root = fs::canonicalize(tmp.path()).expect("canonical temp path");
        Dir { _tmp: tmp, root }
    }

    /// `root/rel`.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Writes `contents` to `rel`, creating its folders.
    pub fn create(&self, rel: &str, contents: impl AsRef<[u8]>) {
        let p = self.path(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).unwrap();
        }
        fs::write(&p, contents).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
    }

    /// The text of `rel`.
    pub fn read(&self, rel: &str) -> String {
        let p = self.path(rel);
        fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
    }

    /// The bytes of `rel`, or `None` if it does not exist.
    pub fn bytes(&self, rel: &str) -> Option<Vec<u8>> {
        fs::read(self.path(rel)).ok()
    }

    /// Whether `rel` exists (a dangling link counts as existing).
    pub fn exists(&self, rel: &str) -> bool {
        self.path(rel).symlink_metadata().is_ok()
    }

    /// Changes the content of `rel` (appends a line), so its hash changes.
    pub fn touch(&self, rel: &str) {
        use std::io::Write;
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.path(rel))
            .unwrap();
        writeln!(f, "touched").unwrap();
    }

    /// A `taper` command run in this workspace (as its current folder and `-C`).
    pub fn taper(&self) -> TestCommand {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_taper"));
        cmd.current_dir(&self.root)
            .arg("-C")
            .arg(&self.root)
            .env_remove("RUST_LOG")
            .env_remove("TAPER_TRIGGER")
            .stdin(Stdio::null());
        TestCommand { cmd }
    }

    /// The workspace's ledger.
    pub fn ledger(&self) -> Ledger {
        Ledger::new(&Layout::new(&self.root))
    }

    /// All `stage_runs` rows.
    pub fn stage_runs(&self) -> Vec<StageRunRow> {
        self.ledger().read().expect("read stage_runs")
    }

    /// All `runs` rows.
    pub fn runs(&self) -> Vec<RunRow> {
        self.ledger().read().expect("read runs")
    }

    /// All `events` rows.
    pub fn events(&self) -> Vec<EventRow> {
        self.ledger().read().expect("read events")
    }

    /// All `metrics` rows.
    pub fn metrics(&self) -> Vec<MetricRow> {
        self.ledger().read().expect("read metrics")
    }

    /// Run ids in the order their first row was written.
    pub fn run_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = Vec::new();
        for r in self.runs() {
            if !ids.contains(&r.run_id) {
                ids.push(r.run_id);
            }
        }
        ids
    }

    /// The `stage_runs` rows of the newest run, by stage name.
    pub fn last_run_stages(&self) -> BTreeMap<String, StageRunRow> {
        let last = self.run_ids().pop().expect("a recorded run");
        self.stage_runs_of(&last)
    }

    /// The `stage_runs` rows of run `run_id`, by stage name.
    pub fn stage_runs_of(&self, run_id: &str) -> BTreeMap<String, StageRunRow> {
        self.stage_runs()
            .into_iter()
            .filter(|r| r.run_id == run_id)
            .map(|r| (r.stage.clone(), r))
            .collect()
    }

    /// Status of each stage in the newest run, e.g. `{"a": "success", "b": "skipped"}`.
    pub fn last_statuses(&self) -> BTreeMap<String, String> {
        self.last_run_stages()
            .into_iter()
            .map(|(k, v)| (k, v.status))
            .collect()
    }
}

/// A `taper` invocation being built.
pub struct TestCommand {
    cmd: Command,
}

/// What a finished `taper` printed and returned.
#[derive(Debug)]
pub struct Outcome {
    /// Exit code (`None`: killed by a signal).
    pub code: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code: {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl From<Output> for Outcome {
    fn from(o: Output) -> Self {
        Outcome {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl TestCommand {
    /// Adds one argument.
    pub fn arg(mut self, a: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.arg(a);
        self
    }

    /// Adds arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.cmd.args(args);
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, k: &str, v: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.env(k, v);
        self
    }

    /// Runs to the end and captures the outcome.
    pub fn output(mut self) -> Outcome {
        self.cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .expect("run taper")
            .into()
    }

    /// Runs and asserts the exit code; returns the outcome.
    #[track_caller]
    pub fn expect_code(self, code: i32) -> Outcome {
        let out = self.output();
        assert_eq!(out.code, Some(code), "unexpected exit code\n{out}");
        out
    }

    /// Runs and asserts success; returns the outcome.
    #[track_caller]
    pub fn ok(self) -> Outcome {
        self.expect_code(0)
    }

    /// Starts taper without waiting; its output is captured for [`Running::wait`].
    pub fn spawn(mut self) -> Running {
        let mut child = self
            .cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn taper");
        let drain = |mut r: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                buf
            })
        };
        let stdout = drain(Box::new(child.stdout.take().unwrap()));
        let stderr = drain(Box::new(child.stderr.take().unwrap()));
        Running {
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
        }
    }
}

/// A `taper` process started with [`TestCommand::spawn`].
pub struct Running {
    /// The process.
    pub child: Child,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
}

impl Running {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child we started and have not reaped yet.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits at most `limit` for the process to exit; kills it and panics if it does not.
    /// The limit is a hang guard, not a speed assertion: pass something generous.
    #[track_caller]
    pub fn wait(mut self, limit: Duration) -> Outcome {
        let start = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break Some(status);
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let text = |h: Option<std::thread::JoinHandle<Vec<u8>>>| {
            String::from_utf8_lossy(&h.unwrap().join().unwrap()).into_owned()
        };
        let out = Outcome {
            code: status.and_then(|s| s.code()),
            stdout: text(self.stdout.take()),
            stderr: text(self.stderr.take()),
        };
        assert!(
            status.is_some(),
            "taper did not exit within {limit:?}\n{out}"
        );
        out
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A test that panicked half-way must not leave taper running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `cond` every 20 ms until it holds; panics after `limit` (a hang guard).
#[track_caller]
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether process `pid` still exists (zombies count as gone).
pub fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            // `pid (comm) S ...`: the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X'))
        }
    }
}

/// A one-line command stage, for building pipelines in tests.
pub fn command_stage(name: &str, inputs: &[&str], outputs: &[&str], run: &str) -> String {
    let list = |v: &[&str]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "  {name}:\n    kind: command\n    inputs: [{}]\n    outputs: [{}]\n    with:\n      run: '{run}'\n",
        list(inputs),
        list(outputs)
    )
}

/// Path of a file under the repository's `tests/` folder.
pub fn tests_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests"))
}
