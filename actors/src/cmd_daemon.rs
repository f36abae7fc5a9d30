//! The daemon's subcommands: `run`, `pause|resume|checkpoint|stop`, `status`,
//! `validate-config`.
//!
//! `run` builds the tokio runtime, installs the signal handlers (`signals.rs`) and calls
//! `supervisor::run`. The control subcommands send the matching signal (DESIGN.md §3) to the
//! pid in `<state_dir>/dreamloop.pid`; `status` reads `<state_dir>/status.json`, which the
//! daemon replaces atomically after every step, so it works while the daemon runs and after.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use dreamloop::config::{ConfigError, DreamConfig, FieldError};

use crate::status::{Status, PID_FILE};
use crate::supervisor::{self, RunOptions};

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

fn print_config_error(e: &ConfigError) {
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
    let opts = RunOptions {
        config_path: path,
        paused: args.paused,
        max_steps: args.max_steps,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    let code = runtime.block_on(async move {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        crate::signals::spawn(tx).context("installing signal handlers")?;
        anyhow::Ok(supervisor::run(config, rx, opts).await)
    })?;
    // Actor tasks may still be winding down; the exit status is decided.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    Ok(ExitCode::from(code))
}

/// Whether a process with this pid exists (kill(pid, 0)).
pub fn alive(pid: i32) -> bool {
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// `dreamloop pause|resume|checkpoint|stop`: signals the daemon of `--state-dir`.
pub fn signal(args: StateDirArgs, which: Signal) -> anyhow::Result<ExitCode> {
    let path = args.state_dir.join(PID_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (is a daemon running on this state directory?)",
            path.display()
        )
    })?;
    let pid: i32 = text
        .trim()
        .parse()
        .with_context(|| format!("{}: `{}` is not a pid", path.display(), text.trim()))?;
    if !alive(pid) {
        bail!(
            "{}: stale pid file: no process {pid} (the daemon is not running)",
            path.display()
        );
    }
    let (sig, name) = match which {
        Signal::Pause => (libc::SIGTSTP, "pause"),
        Signal::Resume => (libc::SIGCONT, "resume"),
        Signal::Checkpoint => (libc::SIGUSR1, "checkpoint"),
        Signal::Stop => (libc::SIGTERM, "stop"),
    };
    // SAFETY: plain kill(2) on a pid read from our own pid file.
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
    let status = Status::read(&args.state_dir)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(ExitCode::SUCCESS);
    }
    let running = status.state != "stopped" && status.state != "failed" && alive(status.pid as i32);
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
    println!("phase       {:?}", status.phase);
    println!(
        "paused      {}{}",
        status.paused,
        if status.paused_by_policy {
            " (by the rollback policy)"
        } else {
            ""
        }
    );
    println!("lr          {:.3e}", status.lr);
    println!("replay      {:.2}", status.replay_ratio);
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
