//! The `dreamloop` command line: subcommands describe the process (which model, which
//! files, which state directory); the loop's own settings live in the TOML config
//! (`config/dreamloop.toml`, `dreamloop validate-config`). Everything it runs is in the
//! `dreamloop_actors` library (its crate docs draw the supervision tree).

use dreamloop_actors::{
    cmd_daemon, cmd_device_check, cmd_dream, cmd_eval, cmd_export, cmd_generate, cmd_import,
    cmd_logprobs, cmd_plan, cmd_report, cmd_train,
};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dreamloop",
    version,
    about = "Keeps a language model learning a behaviour, unattended."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Score a text under a model: per-token log-probs, mean negative log-likelihood, perplexity.
    Score(cmd_logprobs::ScoreArgs),
    /// Per-token log-probs of every line of a JSONL file ({"ids":[..]}, {"text":..} or {"messages":[..]}).
    Logprobs(cmd_logprobs::LogprobsArgs),
    /// One pass of SFT or DPO over a dataset file (TRL formats), written as a HF directory.
    Train(cmd_train::TrainArgs),
    /// Chat-templated generation (greedy by default) with a KV cache.
    Generate(cmd_generate::GenerateArgs),
    /// Ask the config's [dream] server for scenarios and measure them (nothing is trained).
    Dream(cmd_dream::DreamArgs),
    /// Convert a GGUF file (llama architecture) into a Hugging Face directory.
    ImportGguf(cmd_import::ImportGgufArgs),
    /// Generated examples as JSONL in TRL's conversational formats.
    ExportDataset(cmd_export::ExportDatasetArgs),
    /// Run the daemon: generate, label, mix, train, evaluate, roll back, checkpoint — until stopped.
    Run(cmd_daemon::RunArgs),
    /// Pause the running daemon at the next step boundary (SIGTSTP).
    Pause(cmd_daemon::StateDirArgs),
    /// Resume a paused daemon (SIGCONT).
    Resume(cmd_daemon::StateDirArgs),
    /// Ask the running daemon for a checkpoint now (SIGUSR1).
    Checkpoint(cmd_daemon::StateDirArgs),
    /// Stop the daemon: finish the step, checkpoint, exit (SIGTERM).
    Stop(cmd_daemon::StateDirArgs),
    /// Step, phase, paused, lr, replay ratio, last evaluation and rollback (from status.json).
    Status(cmd_daemon::StatusArgs),
    /// The memory budget and step time of a run, from the model's config.json alone.
    Plan(cmd_plan::PlanArgs),
    /// This build on its device: fixture models against transformers, a 27B-shaped training step.
    DeviceCheck(cmd_device_check::DeviceCheckArgs),
    /// Check a config file; exit 78 listing every error.
    ValidateConfig(cmd_daemon::ValidateArgs),
    /// The daemon's probe suite on a model or a checkpoint: accuracy, margins, perplexity, attention.
    Eval(cmd_eval::EvalArgs),
    /// The run in a state directory as one HTML page: plots, controller decisions, generations.
    Report(cmd_report::ReportArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Score(args) => cmd_logprobs::score(args),
        Command::Logprobs(args) => cmd_logprobs::logprobs(args),
        Command::Train(args) => cmd_train::run(args),
        Command::Generate(args) => cmd_generate::run(args),
        Command::Dream(args) => cmd_dream::run(args),
        Command::ExportDataset(args) => {
            cmd_export::run(args).map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::ImportGguf(args) => {
            cmd_import::run(args).map(|()| std::process::ExitCode::SUCCESS)
        }
        Command::Run(args) => cmd_daemon::run(args),
        Command::Pause(args) => cmd_daemon::signal(args, cmd_daemon::Signal::Pause),
        Command::Resume(args) => cmd_daemon::signal(args, cmd_daemon::Signal::Resume),
        Command::Checkpoint(args) => cmd_daemon::signal(args, cmd_daemon::Signal::Checkpoint),
        Command::Stop(args) => cmd_daemon::signal(args, cmd_daemon::Signal::Stop),
        Command::Status(args) => cmd_daemon::status(args),
        Command::Plan(args) => cmd_plan::run(args),
        Command::ValidateConfig(args) => Ok(cmd_daemon::validate(args)),
        Command::Eval(args) => cmd_eval::run(args),
        Command::Report(args) => cmd_report::run(args),
        Command::DeviceCheck(args) => cmd_device_check::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
