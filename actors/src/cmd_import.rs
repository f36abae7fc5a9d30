//! `dreamloop import-gguf FILE OUT_DIR`: turn a GGUF `llama` model (e.g. SmolLM2-135M-Instruct
//! Q4_1) into a Hugging Face directory with f32 safetensors. All the work is
//! `dreamloop::model::gguf::import_gguf`; this file only parses arguments and prints a summary.

use anyhow::Context;
use std::path::PathBuf;

/// Arguments of `dreamloop import-gguf`.
#[derive(Debug, clap::Args)]
pub struct ImportGgufArgs {
    /// The .gguf file to import.
    pub file: PathBuf,
    /// The Hugging Face model directory to create (must not exist, or be empty).
    pub out_dir: PathBuf,
}

/// Runs the import and prints what was written.
pub fn run(args: ImportGgufArgs) -> anyhow::Result<()> {
    let report =
        dreamloop::model::gguf::import_gguf(&args.file, &args.out_dir).with_context(|| {
            format!(
                "importing {} into {}",
                args.file.display(),
                args.out_dir.display()
            )
        })?;
    let types: Vec<String> = report
        .source_types
        .iter()
        .map(|(ty, n)| format!("{n} {ty}"))
        .collect();
    println!(
        "imported {} -> {}: {} tensors ({}), {} parameters, {} layers, vocab {}, tied embeddings: {}, {:.1} s",
        args.file.display(),
        report.out_dir.display(),
        report.tensors,
        types.join(", "),
        report.parameters,
        report.params.block_count,
        report.params.vocab_size,
        report.params.tied_embeddings,
        report.elapsed.as_secs_f64()
    );
    Ok(())
}
