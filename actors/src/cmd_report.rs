//! `dreamloop report`: the run in a state directory as one self-contained HTML page
//! (`dreamloop::report`): behaviour, margins, attention, perplexity, general probes, lr /
//! replay / phase with rollbacks and phase changes marked, duty cycle, what the model writes,
//! and its generations at the first and the latest evaluation side by side.
//!
//! It reads the history files (`evals.jsonl`, `generations.jsonl`, `events.jsonl`,
//! `run.json`) and writes nothing else; a bad line is named (file:line) on stderr and the
//! rest is still used. It can run beside a live daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use dreamloop::events::{EventLog, LineWarning};
use dreamloop::history::{EvalLog, RunInfo, RUN_FILE};

/// `dreamloop report` arguments.
#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The daemon's state directory (default: `state_dir` of the config).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The config file whose `state_dir` is read (default: config/dreamloop.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the page goes.
    #[arg(long, default_value = "report.html")]
    pub out: PathBuf,
}

/// `dreamloop report`.
pub fn run(args: ReportArgs) -> anyhow::Result<ExitCode> {
    let state_dir = match args.state_dir {
        Some(d) => d,
        None => {
            let path = args
                .config
                .unwrap_or_else(|| PathBuf::from("config/dreamloop.toml"));
            dreamloop::config::DreamConfig::load(&path)?.state_dir
        }
    };
    if !state_dir.is_dir() {
        anyhow::bail!("{}: no such state directory", state_dir.display());
    }
    let warn = |warnings: Vec<LineWarning>| {
        for w in warnings {
            eprintln!("warning: {w}");
        }
    };
    let (evals, w) = EvalLog::read(&state_dir)?;
    warn(w);
    let (generations, w) = EvalLog::read_generations(&state_dir)?;
    warn(w);
    let (events, w) = EventLog::read(&state_dir)?;
    warn(w);
    let run = std::fs::read_to_string(state_dir.join(RUN_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<RunInfo>(&t).ok());
    let html = dreamloop::report::render(
        &state_dir.display().to_string(),
        run.as_ref(),
        &evals,
        &generations,
        &events,
    );
    dreamloop::durable::write_atomic(&args.out, html.as_bytes())
        .with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "{}: {} evaluations, {} with generations, {} events",
        args.out.display(),
        evals.len(),
        generations.len(),
        events.len()
    );
    Ok(ExitCode::SUCCESS)
}
