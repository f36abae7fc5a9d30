//! The `dreamloop` command line.
//!
//! Subcommands describe the process (which model, which files); the loop's own settings
//! live in the TOML config (later issues). Errors are reported with `anyhow` here only; the
//! core returns typed errors.

mod cmd_export;
mod cmd_generate;
mod cmd_import;
mod cmd_logprobs;
mod cmd_train;

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
    /// Convert a GGUF file (llama architecture) into a Hugging Face directory.
    ImportGguf(cmd_import::ImportGgufArgs),
    /// Generated examples as JSONL in TRL's conversational formats.
    ExportDataset(cmd_export::ExportDatasetArgs),
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
        Command::ExportDataset(args) => cmd_export::run(args).map(|()| std::process::ExitCode::SUCCESS),
        Command::ImportGguf(args) => cmd_import::run(args).map(|()| std::process::ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
