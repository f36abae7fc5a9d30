//! `dreamloop export-dataset`: generated examples as JSONL in TRL's conversational
//! formats, for inspection or for training with other tools.
//!
//! SFT rows are `{"prompt":[…],"completion":[{"role":"assistant","content":…}]}` and
//! DPO rows `{"prompt":[…],"chosen":[…],"rejected":[…]}` (TRL's "conversational
//! prompt-completion" and "conversational preference" formats). Examples are unique
//! within the file (an in-memory ledger); the daemon's persistent ledger is not touched.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use dreamloop::example::{Example, Message, Target};
use dreamloop::label::{LabelConfig, Labeler, Phase};
use dreamloop::scenario::{Generator, GeneratorConfig, Ledger, Library};
use serde_json::{json, Value};

/// Arguments of `dreamloop export-dataset`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportDatasetArgs {
    /// Number of examples to write.
    #[arg(long)]
    pub n: usize,
    /// Output JSONL file.
    #[arg(long)]
    pub out: PathBuf,
    /// sft, dpo or mixed (half of each, decided per example).
    #[arg(long, default_value = "dpo", value_parser = parse_phase)]
    pub phase: Phase,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The scenario template directory.
    #[arg(long, default_value = "scenarios")]
    pub scenarios: PathBuf,
}

fn parse_phase(s: &str) -> Result<Phase, String> {
    s.parse()
}

fn messages(prompt: &[Message]) -> Value {
    Value::Array(
        prompt
            .iter()
            .map(|m| json!({"role": m.role, "content": m.content}))
            .collect(),
    )
}

fn assistant(content: &str) -> Value {
    json!([{"role": "assistant", "content": content}])
}

/// One example as a TRL conversational row.
pub fn trl_row(example: &Example) -> Value {
    match &example.target {
        Target::Sft { completion } => json!({
            "prompt": messages(&example.prompt),
            "completion": assistant(completion),
        }),
        Target::Dpo { chosen, rejected } => json!({
            "prompt": messages(&example.prompt),
            "chosen": assistant(chosen),
            "rejected": assistant(rejected),
        }),
    }
}

/// Runs the export.
pub fn run(args: ExportDatasetArgs) -> anyhow::Result<()> {
    let library = Library::load_dir(&args.scenarios).with_context(|| {
        format!(
            "loading scenario templates from {}",
            args.scenarios.display()
        )
    })?;
    let config = GeneratorConfig {
        seed: args.seed,
        ..GeneratorConfig::default()
    };
    let mut generator = Generator::new(library, Ledger::in_memory(), config)?;
    let labeler = Labeler::new(&LabelConfig {
        phase: args.phase,
        ..LabelConfig::default()
    });
    let file =
        File::create(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut out = BufWriter::new(file);
    for _ in 0..args.n {
        let example = labeler.scenario(&generator.next()?);
        serde_json::to_writer(&mut out, &trl_row(&example))?;
        out.write_all(b"\n")?;
    }
    out.flush()
        .with_context(|| format!("writing {}", args.out.display()))?;
    tracing::info!(
        n = args.n,
        out = %args.out.display(),
        duplicates_skipped = generator.duplicates_skipped(),
        "Dataset exported."
    );
    Ok(())
}
