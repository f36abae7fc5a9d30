//! The daemon's subcommands: `run`, `pause|resume|checkpoint|stop`, `status`,
//! `validate-config`.
//!
//! `run` builds the tokio runtime, installs the signal handlers (`signals.rs`) and calls
//! `dreamloop_actors::run`. The control subcommands send the matching signal (DESIGN.md §3) to the
//! pid in `<state_dir>/dreamloop.pid`; `status` reads `<state_dir>/status.json`, which the
//! daemon replaces atomically after every step, so it works while the daemon runs and after.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use dreamloop::config::{ConfigError, DreamConfig, FieldError};

use crate::pidfile::Owner;
use crate::status::{Status, PID_FILE, STATUS_FILE};
use crate::{Faults, RunOptions};

/// EX_CONFIG (sysexits.h): the configuration is wrong.
pub const EXIT_CONFIG: u8 = 78;

/// `dreamloop run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// The config file (default: config/dreamloop.toml when it exists, else built-in tiny defaults).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Overrides `state_dir` of the config.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Start paused (resume with `dreamloop resume`).
    #[arg(long)]
    pub paused: bool,
    /// Checkpoint and exit 0 after this many steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Overrides `metrics_addr` of the config (e.g. 127.0.0.1:9464).
    #[arg(long)]
    pub metrics_addr: Option<String>,
}

/// `dreamloop pause|resume|checkpoint|stop|status`.
#[derive(clap::Args)]
pub struct StateDirArgs {
    /// The daemon's state directory.
    #[arg(long, default_value = "state")]
    pub state_dir: PathBuf,
}

/// `dreamloop status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// The daemon's state directory.
    #[arg(long, default_value = "state")]
    pub state_dir: PathBuf,
    /// Print status.json as it is.
    #[arg(long)]
    pub json: bool,
}

/// `dreamloop validate-config`.
#[derive(clap::Args)]
pub struct ValidateArgs {
    /// The config file.
    pub file: PathBuf,
}

/// Which control a subcommand sends.
#[derive(Clone, Copy)]
pub enum Signal {
    Pause,
    Resume,
    Checkpoint,
    Stop,
}

pub(crate) fn print_config_error(e: &ConfigError) {
    eprintln!("error: {e}");
}

/// Prints every bad field of `path` and gives EX_CONFIG.
fn refuse(path: PathBuf, errors: Vec<FieldError>) -> ExitCode {
    print_config_error(&ConfigError::Invalid { path, errors });
    ExitCode::from(EXIT_CONFIG)
}

/// What this process cannot run although the file is valid: the backend (a CPU-only build,
/// or no NVIDIA driver), as an error naming `model.backend`; a step that `dreamloop plan`
/// says does not fit the device, as an error naming `model.device_memory` and the settings
/// that would make it fit.
fn runtime_problems(config: &DreamConfig) -> Vec<FieldError> {
    let backend = crate::trainer::backend_problem(config.model.backend).map(|reason| FieldError {
        field: "model.backend".into(),
        reason,
    });
    backend
        .into_iter()
        .chain(crate::cmd_plan::problem(config))
        .collect()
}

/// `dreamloop validate-config FILE`: 0 when valid, 78 with every error otherwise.
pub fn validate(args: ValidateArgs) -> ExitCode {
    match DreamConfig::load(&args.file) {
        Ok(config) => {
            let errors = runtime_problems(&config);
            if !errors.is_empty() {
                return refuse(args.file, errors);
            }
            if let Some(warning) = config.public_metrics_warning() {
                eprintln!("warning: {warning}");
            }
            println!("{}: valid", args.file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_config_error(&e);
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `dreamloop run`.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let default = PathBuf::from("config/dreamloop.toml");
    let path = args
        .config
        .clone()
        .or_else(|| default.exists().then_some(default));
    let mut config = match &path {
        Some(p) => match DreamConfig::load(p) {
            Ok(c) => c,
            Err(e) => {
                print_config_error(&e);
                return Ok(ExitCode::from(EXIT_CONFIG));
            }
        },
        None => {
            tracing::info!("No config file: using the built-in tiny configuration.");
            DreamConfig::tiny(
                std::path::Path::new("scenarios"),
                std::path::Path::new("state"),
            )
        }
    };
    if let Some(dir) = args.state_dir {
        config.state_dir = dir;
    }
    if let Some(addr) = args.metrics_addr {
        config.metrics_addr = addr;
    }
    // Checked before anything starts: no state directory, pid file or listener is touched
    // for a configuration this process cannot run.
    let mut errors = config.validate().err().unwrap_or_default();
    errors.extend(runtime_problems(&config));
    if !errors.is_empty() {
        return Ok(refuse(path.unwrap_or_default(), errors));
    }
    if config.public_metrics_warning().is_some() {
        tracing::warn!(
            addr = %config.metrics_addr,
            "Serving /metrics beyond loopback without authentication (metrics_public = true)."
        );
    }
    // The state holds conversation text: every file the daemon creates is 0600 and every
    // directory 0700, whichever code creates it.
    // SAFETY: umask(2) only sets this process's file-creation mask.
    unsafe { libc::umask(0o077) };
    let opts = RunOptions {
        config_path: path,
        paused: args.paused,
        max_steps: args.max_steps,
        faults: Faults::default(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let code = runtime.block_on(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        crate::signals::spawn(tx).context("installing signal handlers")?;
        anyhow::Ok(crate::run(config, rx, opts).await)
    })?;
    // Actor tasks may still be winding down; the exit status is decided.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    Ok(ExitCode::from(code))
}

/// `dreamloop pause|resume|checkpoint|stop`: signals the daemon of `--state-dir`, only
/// when its pid file is locked by a live dreamloop (`pidfile.rs`): a stale pid names a
/// stranger, and pid 0 would signal our own process group.
pub fn signal(args: StateDirArgs, which: Signal) -> anyhow::Result<ExitCode> {
    let path = args.state_dir.join(PID_FILE);
    let pid = match crate::pidfile::owner(&args.state_dir)? {
        Owner::Running(pid) => pid,
        Owner::None => bail!(
            "{}: no pid file (is a daemon running on this state directory?)",
            path.display()
        ),
        Owner::Stale(pid) => bail!(
            "{}: stale pid file{}: no dreamloop holds it (the daemon is not running); nothing was signalled",
            path.display(),
            pid.map_or_else(|| " (no valid pid)".to_string(), |p| format!(" naming pid {p}"))
        ),
    };
    let (sig, name) = match which {
        Signal::Pause => (libc::SIGTSTP, "pause"),
        Signal::Resume => (libc::SIGCONT, "resume"),
        Signal::Checkpoint => (libc::SIGUSR1, "checkpoint"),
        Signal::Stop => (libc::SIGTERM, "stop"),
    };
    // SAFETY: plain kill(2) on a positive pid that holds our pid file's lock.
    if unsafe { libc::kill(pid, sig) } != 0 {
        bail!(
            "sending {name} to pid {pid}: {}",
            std::io::Error::last_os_error()
        );
    }
    println!("sent {name} to dreamloop (pid {pid})");
    Ok(ExitCode::SUCCESS)
}

/// `dreamloop status`.
pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    if !args.state_dir.join(STATUS_FILE).exists() {
        return status_before_first_write(&args);
    }
    let status = Status::read(&args.state_dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    let holder = crate::pidfile::owner(&args.state_dir)?;
    let running = status.state != "stopped"
        && status.state != "failed"
        && matches!(holder, Owner::Running(pid) if pid as u32 == status.pid);
    println!(
        "state       {}{}",
        status.state,
        if running || status.state == "stopped" {
            ""
        } else {
            " (process gone)"
        }
    );
    println!("step        {}", status.step);
    println!(
        "phase       {:?} (phase {} of the schedule)",
        status.phase, status.phase_index
    );
    if !status.run_id.is_empty() {
        println!("run         {}", status.run_id);
    }
    println!(
        "paused      {}{}",
        status.paused,
        if status.paused_by_policy {
            " (by the rollback policy)"
        } else {
            ""
        }
    );
    println!(
        "lr          {:.3e}{}",
        status.lr,
        if status.lr_boost != 1.0 {
            format!(" (raised ×{} after flat evaluations)", status.lr_boost)
        } else {
            String::new()
        }
    );
    println!(
        "replay      {:.2}, weights arithmetic/code/reasoning/text {:?}",
        status.replay_ratio, status.replay_weights
    );
    println!(
        "good/latest {:?} / {:?}",
        status.good_step, status.latest_step
    );
    match &status.last_eval {
        Some(e) => println!(
            "last eval   step {}: clear {:.2} flawed {:.2} ppl {:.2} general {:.2} → {:?}",
            e.step,
            e.metrics.clear_accuracy,
            e.metrics.flawed_accuracy,
            e.metrics.perplexity,
            e.metrics.general_accuracy,
            e.verdict
        ),
        None => println!("last eval   none"),
    }
    match &status.last_rollback {
        Some(r) => println!(
            "rollback    {} → {} ({}) at {}, {} examples quarantined",
            r.from,
            r.to,
            r.reason.label(),
            r.ts,
            r.quarantined
        ),
        None => println!("rollback    none"),
    }
    println!(
        "restarts    {}   skipped steps {}   updated {}",
        status.restarts, status.skipped_steps, status.updated
    );
    Ok(ExitCode::SUCCESS)
}

/// `dreamloop status` when there is no status.json yet (a daemon still loading its model,
/// or none ever ran here): what the state directory and the pid file say.
fn status_before_first_write(args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let dir = &args.state_dir;
    if !dir.is_dir() {
        bail!(
            "{}: no such state directory (no daemon has run with --state-dir {})",
            dir.display(),
            dir.display()
        );
    }
    let owner = crate::pidfile::owner(dir)?;
    let (state, pid, note) = match owner {
        Owner::Running(pid) => (
            "starting",
            Some(pid),
            "the daemon is starting; status.json appears after start-up".to_string(),
        ),
        Owner::Stale(pid) => (
            "not running",
            None,
            format!(
                "stale pid file{}; no daemon holds it and none wrote a status",
                pid.map_or_else(String::new, |p| format!(" (pid {p})"))
            ),
        ),
        Owner::None => (
            "not running",
            None,
            "no daemon has written a status here yet".to_string(),
        ),
    };
    if args.json {
        let value = serde_json::json!({ "state": state, "pid": pid, "note": note });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("state       {state}");
    if let Some(pid) = pid {
        println!("pid         {pid}");
    }
    println!("state dir   {}", dir.display());
    println!("note        {note}");
    Ok(ExitCode::SUCCESS)
}
