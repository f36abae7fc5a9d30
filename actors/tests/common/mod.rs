//! Shared harness of the daemon tests: a temporary state directory, a small config (tiny
//! model, batch 2, frequent evaluations, a handful of probes), the real `dreamloop` binary
//! or the real `run()` in process with fault-injecting parts, and waits on conditions
//! (status.json, files, exit) with deadlines instead of bare sleeps.

#![allow(dead_code)]

pub mod dream_server;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dreamloop::config::DreamConfig;
use dreamloop_actors::{Control, Faults, RunOptions};
use serde_json::Value;

/// The repository root (scenarios/ lives there).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("actors/ has a parent")
        .to_path_buf()
}

/// A test daemon's directory: `state/` and `dreamloop.toml`; the daemon runs either as the
/// real `dreamloop` binary ([`Daemon::start`]) or as `dreamloop_actors::run` in this process
/// with fault-injecting parts ([`Daemon::start_in_process`]).
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub in_process: Option<InProcess>,
}

/// A run of `dreamloop_actors::run` on a thread of this test process, with its own tokio
/// runtime. Runs in one process take turns (the actor registry and the metrics recorder are
/// global): the guard is held until the run has ended.
pub struct InProcess {
    control: tokio::sync::mpsc::Sender<Control>,
    thread: Option<std::thread::JoinHandle<u8>>,
    _turn: MutexGuard<'static, ()>,
}

/// Whose turn it is to run in process.
static TURN: Mutex<()> = Mutex::new(());
/// Where the in-process runs' logs go: the running test's `daemon.log`.
static LOG_SINK: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Writes the in-process runs' logs to [`LOG_SINK`].
struct SinkWriter;

impl std::io::Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match LOG_SINK.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            Some(file) => file.write(buf),
            None => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Settings a test changes in the base config (TOML snippets appended per table).
#[derive(Default, Clone)]
pub struct Overrides {
    /// `[model] spec`; empty means the `tiny` preset.
    pub model: String,
    /// More `[model]` settings.
    pub model_extra: String,
    /// `phase`; empty means `sft`.
    pub phase: String,
    pub top: String,
    pub train: String,
    pub data: String,
    pub eval: String,
    pub rollback: String,
    pub checkpoint: String,
    pub supervisor: String,
}

pub fn config_text(state: &Path, o: &Overrides) -> String {
    let scenarios = repo().join("scenarios");
    format!(
        r#"state_dir = "{state}"
metrics_addr = "127.0.0.1:0"
phase = "{phase}"
{top}
[model]
spec = "{model}"
backend = "cpu"
{model_extra}

[train]
{train}
warmup_steps = 0
schedule = "constant"
batch_size = 2
max_grad_norm = 1.0
beta = 0.01

[train.optimizer.adamw]
weight_decay = 0.0

[data]
scenarios_dir = "{scenarios}"
{data}
accept_share = 0.5
general_weights = [0.25, 0.25, 0.2, 0.3]
chunk_words = [8, 24]
seed = 0

[eval]
{eval}
probe_samples = 1
general_items = 2
max_heldout_texts = 1
heldout_max_bytes = 512
seed = 0

[rollback]
{rollback}

[checkpoint]
{checkpoint}
keep_last = 2

[queues]
examples = 8
trainer = 1

[supervisor]
{supervisor}
window_seconds = 600
call_timeout_seconds = 120
status_every_seconds = 1
"#,
        state = state.display(),
        scenarios = scenarios.display(),
        top = o.top,
        model = if o.model.is_empty() { "tiny" } else { &o.model },
        model_extra = o.model_extra,
        phase = if o.phase.is_empty() { "sft" } else { &o.phase },
        train = if o.train.contains("lr") {
            o.train.clone()
        } else {
            format!("lr = 2e-5\n{}", o.train)
        },
        data = if o.data.contains("replay_ratio") {
            o.data.clone()
        } else {
            format!("replay_ratio = 0.25\n{}", o.data)
        },
        eval = if o.eval.contains("every_n_steps") {
            o.eval.clone()
        } else {
            format!("every_n_steps = 4\n{}", o.eval)
        },
        rollback = o.rollback,
        checkpoint = if o.checkpoint.contains("every_n_steps") {
            o.checkpoint.clone()
        } else {
            format!("every_n_steps = 2\n{}", o.checkpoint)
        },
        supervisor = if o.supervisor.contains("max_restarts") {
            o.supervisor.clone()
        } else {
            format!("max_restarts = 3\n{}", o.supervisor)
        },
    )
}

impl Daemon {
    pub fn new(o: &Overrides) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = dir.path().join("state");
        std::fs::write(dir.path().join("dreamloop.toml"), config_text(&state, o))
            .expect("write config");
        Daemon {
            dir,
            child: None,
            in_process: None,
        }
    }

    pub fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("dreamloop.toml")
    }

    /// Rewrites the config (for SIGHUP tests).
    pub fn rewrite(&self, o: &Overrides) {
        std::fs::write(self.config(), config_text(&self.state(), o)).expect("write config");
    }

    /// `dreamloop run --config … <extra>` with optional extra environment.
    pub fn start(&mut self, extra: &[&str], env: &[(&str, &str)]) {
        // `DREAMLOOP_BIN` pins a copy of the binary for runs long enough to outlive a rebuild
        // (the soak bench); tests use the one cargo built for them.
        let bin = std::env::var_os("DREAMLOOP_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_dreamloop")));
        let mut cmd = Command::new(bin);
        cmd.arg("run")
            .arg("--config")
            .arg(self.config())
            .args(extra);
        cmd.env("RUST_LOG", "info");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.stdout(Stdio::null()).stderr(Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("daemon.log"))
                .expect("log file"),
        ));
        self.child = Some(cmd.spawn().expect("spawn dreamloop"));
    }

    /// `dreamloop_actors::run` with this config, in this process, on a thread of its own,
    /// with `faults` injected. `extra` takes the run flags the tests use (`--max-steps N`,
    /// `--paused`, `--metrics-addr A`).
    pub fn start_in_process(&mut self, extra: &[&str], faults: Faults) {
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        static SUBSCRIBER: std::sync::Once = std::sync::Once::new();
        SUBSCRIBER.call_once(|| {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
                .with_ansi(false)
                .with_writer(|| SinkWriter)
                .try_init();
        });
        *LOG_SINK.lock().unwrap_or_else(|e| e.into_inner()) = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join("daemon.log"))
                .expect("log file"),
        );
        let mut config = DreamConfig::load(&self.config()).expect("a valid test config");
        let mut opts = RunOptions {
            config_path: Some(self.config()),
            faults,
            ..RunOptions::default()
        };
        let mut args = extra.iter();
        while let Some(arg) = args.next() {
            match *arg {
                "--max-steps" => {
                    opts.max_steps = Some(args.next().expect("a count").parse().expect("a count"))
                }
                "--paused" => opts.paused = true,
                "--metrics-addr" => {
                    config.metrics_addr = args.next().expect("an address").to_string()
                }
                other => panic!("start_in_process does not take {other}"),
            }
        }
        let (control, rx) = tokio::sync::mpsc::channel(16);
        let thread = std::thread::Builder::new()
            .name("dreamloop-run".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a tokio runtime");
                let code = runtime.block_on(dreamloop_actors::run(config, rx, opts));
                runtime.shutdown_timeout(Duration::from_secs(5));
                code
            })
            .expect("spawn the run");
        self.in_process = Some(InProcess {
            control,
            thread: Some(thread),
            _turn: turn,
        });
    }

    /// Sends `control` to the in-process run (what the signal handlers would send).
    pub fn control(&self, control: Control) {
        let run = self.in_process.as_ref().expect("started in process");
        run.control
            .blocking_send(control)
            .expect("the run listens for control");
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("started").id() as i32
    }

    /// Signals the daemon; an in-process run gets the control the signal handlers send.
    pub fn signal(&self, sig: i32) {
        if self.in_process.is_some() {
            let control = match sig {
                libc::SIGTERM | libc::SIGINT => Control::Shutdown,
                libc::SIGTSTP => Control::Pause,
                libc::SIGCONT => Control::Resume,
                libc::SIGUSR1 => Control::Checkpoint,
                libc::SIGHUP => Control::Reload,
                other => panic!("signal {other} has no control for an in-process run"),
            };
            return self.control(control);
        }
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0, "kill failed");
    }

    /// Waits for exit within `limit`; panics (with the log) otherwise.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        if let Some(mut run) = self.in_process.take() {
            let thread = run.thread.take().expect("a running thread");
            let deadline = Instant::now() + limit;
            while !thread.is_finished() {
                if Instant::now() > deadline {
                    panic!("the run did not end within {limit:?}\n{}", self.log());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let code = thread.join().expect("the run's thread does not panic");
            *LOG_SINK.lock().unwrap_or_else(|e| e.into_inner()) = None;
            // An exit status as wait(2) encodes it: the code in bits 8–15.
            return std::os::unix::process::ExitStatusExt::from_raw(i32::from(code) << 8);
        }
        let child = self.child.as_mut().expect("started");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("daemon did not exit within {limit:?}\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn status(&self) -> Option<Value> {
        let text = std::fs::read_to_string(self.state().join("status.json")).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Polls status.json until `cond` holds (or panics after `limit`, with the log).
    pub fn wait_status(
        &mut self,
        limit: Duration,
        what: &str,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.status() {
                if cond(&s) {
                    return s;
                }
            }
            if let Some(child) = self.child.as_mut() {
                if let Some(code) = child.try_wait().expect("try_wait") {
                    panic!(
                        "daemon exited ({code}) while waiting for {what}\n{}",
                        self.log()
                    );
                }
            }
            let ended = self
                .in_process
                .as_ref()
                .and_then(|run| run.thread.as_ref())
                .is_some_and(|t| t.is_finished());
            if ended {
                panic!("the run ended while waiting for {what}\n{}", self.log());
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; status {:?}\n{}",
                    self.status(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn events(&self) -> Vec<Value> {
        read_lines(&self.state().join("events.jsonl"))
    }

    /// Every record of `trained.jsonl`, its sealed segments first (oldest to newest).
    /// The examples rollbacks quarantined (`quarantine/examples.jsonl`).
    pub fn quarantined(&self) -> Vec<Value> {
        read_lines(&self.state().join("quarantine/examples.jsonl"))
            .into_iter()
            .map(|r| r["example"].clone())
            .collect()
    }

    /// Every record of trained.jsonl and its sealed segments, oldest first, rewind markers
    /// included (what [`surviving_timeline`] reads).
    pub fn trained_log(&self) -> Vec<Value> {
        dreamloop::segmented::segments(&self.state(), "trained")
            .expect("list trained.jsonl segments")
            .iter()
            .flat_map(|p| read_lines(p))
            .collect()
    }

    /// The step records of [`Daemon::trained_log`] (rewind markers left out).
    pub fn trained(&self) -> Vec<Value> {
        self.trained_log()
            .into_iter()
            .filter(|r| r["rewind"] != true)
            .collect()
    }
}

/// `[rollback]` thresholds every evaluation after the baseline breaches (patience 1, no
/// drop allowed, an unreachable gain), with `extra` lines after them.
pub fn always_breach(extra: &[&str]) -> String {
    [
        "patience = 1",
        "max_perplexity_increase = 0.0001",
        "max_flawed_accuracy_drop = 0.0",
        "max_clear_accuracy_drop = 0.0",
        "max_general_accuracy_drop = 0.0",
        "min_accuracy_gain = 1.0",
        "min_margin_gain = 1000.0",
    ]
    .iter()
    .chain(extra)
    .copied()
    .collect::<Vec<_>>()
    .join("\n")
}

/// `[rollback]` thresholds the tiny model's probe noise cannot reach: one probe flip would
/// otherwise be a breach, and two in a row a rollback.
pub fn noise_proof_rollback() -> String {
    [
        "max_perplexity_increase = 100.0",
        "max_flawed_accuracy_drop = 1.0",
        "max_clear_accuracy_drop = 1.0",
        "max_general_accuracy_drop = 1.0",
    ]
    .join("\n")
}

/// The surviving timeline of `records` (every `trained*.jsonl` segment, oldest first): a step
/// number not above its predecessor starts a rewound timeline (a crash or a rollback), and the
/// records it replaces drop out — the rule `TrainedLog::open` applies. What the weights on
/// disk were trained on (up to the steps after the last checkpoint).
pub fn surviving_timeline(records: Vec<Value>) -> Vec<Value> {
    let mut timeline: Vec<Value> = Vec::new();
    for r in records {
        let step = r["step"].as_u64().unwrap_or(0);
        if r["rewind"] == true {
            // A marker: the timeline went back to `step` (the record at `step` stays).
            while timeline
                .last()
                .is_some_and(|last| last["step"].as_u64().unwrap_or(0) > step)
            {
                timeline.pop();
            }
            continue;
        }
        while timeline
            .last()
            .is_some_and(|last| last["step"].as_u64().unwrap_or(0) >= step)
        {
            timeline.pop();
        }
        timeline.push(r);
    }
    timeline
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut run) = self.in_process.take() {
            // A test that failed mid-run: stop the run, so the next one gets its turn.
            let _ = run.control.try_send(Control::Shutdown);
            drop(run.control);
            if let Some(thread) = run.thread.take() {
                let _ = thread.join();
            }
            *LOG_SINK.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

pub fn read_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn step(s: &Value) -> u64 {
    s["step"].as_u64().unwrap_or(0)
}

/// Content hashes of every example in trained.jsonl records, recomputed from the example
/// text with the core's hash (independent of the daemon's bookkeeping).
pub fn trained_hashes(records: &[Value]) -> Vec<u64> {
    records
        .iter()
        .flat_map(|r| r["examples"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            let example: dreamloop::example::Example =
                serde_json::from_value(e).expect("an Example");
            example.hash().0
        })
        .collect()
}

/// No example in `records` (trained.jsonl records) was trained twice.
pub fn assert_trained_once(records: &[Value]) {
    let hashes = trained_hashes(records);
    let distinct: std::collections::HashSet<&u64> = hashes.iter().collect();
    assert_eq!(distinct.len(), hashes.len(), "an example was trained twice");
}

/// The LATEST checkpoint directory.
pub fn latest_dir(state: &Path) -> Option<PathBuf> {
    let name = std::fs::read_to_string(state.join("checkpoints/LATEST")).ok()?;
    Some(state.join("checkpoints").join(name.trim()))
}
