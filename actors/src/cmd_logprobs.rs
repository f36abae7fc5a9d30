//! `dreamloop score` and `dreamloop logprobs`: a user's way to score text under a model.

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use dreamloop::model::logprobs::{logprobs as batch_logprobs, ScoredSeq};
use dreamloop::model::{default_device, ChatMessage, Model, Precision};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct ScoreArgs {
    /// A Hugging Face model directory, a `.gguf` file, or a preset name (`tiny`, `tiny-hybrid`; embedded, seed 0).
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// The text to score.
    pub text: String,
    /// `f32` or `bf16`: the dtype the weights live in.
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
}

#[derive(clap::Args)]
pub struct LogprobsArgs {
    /// A Hugging Face model directory, a `.gguf` file, or a preset name (`tiny`, `tiny-hybrid`).
    #[arg(long, default_value = "tiny")]
    pub model: String,
    /// JSONL input: one `{"ids":[...]}`, `{"text":"..."}` or `{"messages":[...]}` per line.
    #[arg(long)]
    pub input: PathBuf,
    /// Lines scored together in one padded batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// `f32` or `bf16`: the dtype the weights live in.
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
}

pub fn score(args: ScoreArgs) -> anyhow::Result<ExitCode> {
    let device = default_device();
    let model = Model::open_as(&args.model, &device, args.dtype)
        .with_context(|| format!("loading model `{}`", args.model))?;
    let ids = tokenize(&model, &json!({ "text": args.text }))?;
    let out = score_batch(&model, &[ids])?.remove(0);
    println!("{out}");
    Ok(ExitCode::SUCCESS)
}

pub fn logprobs(args: LogprobsArgs) -> anyhow::Result<ExitCode> {
    let device = default_device();
    let model = Model::open_as(&args.model, &device, args.dtype)
        .with_context(|| format!("loading model `{}`", args.model))?;
    let file = std::fs::File::open(&args.input)
        .with_context(|| format!("opening {}", args.input.display()))?;
    let shown = args.input.display().to_string();
    let mut failures = 0usize;
    let mut pending: Vec<(usize, Vec<u32>)> = Vec::new();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let flush = |pending: &mut Vec<(usize, Vec<u32>)>, out: &mut dyn Write| -> anyhow::Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let seqs: Vec<Vec<u32>> = pending.iter().map(|(_, ids)| ids.clone()).collect();
        for ((line, _), mut value) in pending.drain(..).zip(score_batch(&model, &seqs)?) {
            value["line"] = json!(line);
            writeln!(out, "{value}")?;
        }
        Ok(())
    };
    for (index, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        let number = index + 1;
        let bytes = line.with_context(|| format!("reading {shown}"))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = std::str::from_utf8(&bytes)
            .map_err(|e| anyhow::anyhow!("not UTF-8: {e}"))
            .and_then(|s| {
                serde_json::from_str::<Value>(s).map_err(|e| anyhow::anyhow!("not JSON: {e}"))
            })
            .and_then(|v| tokenize(&model, &v));
        match parsed {
            Ok(ids) => pending.push((number, ids)),
            Err(e) => {
                failures += 1;
                eprintln!("{shown}:{number}: {e:#}");
            }
        }
        if pending.len() >= args.batch_size.max(1) {
            flush(&mut pending, &mut out)?;
        }
    }
    flush(&mut pending, &mut out)?;
    if failures > 0 {
        eprintln!("{shown}: {failures} line(s) could not be scored");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Token ids of one input object; the error names the offending field.
fn tokenize(model: &Model, value: &Value) -> anyhow::Result<Vec<u32>> {
    let ids: Vec<u32> = if let Some(ids) = value.get("ids") {
        let list = ids
            .as_array()
            .context("field `ids`: expected an array of token ids")?;
        list.iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .filter(|&n| (n as usize) < model.config.vocab_size)
                    .map(|n| n as u32)
                    .with_context(|| {
                        format!(
                            "field `ids[{i}]`: {v} is not a token id below {}",
                            model.config.vocab_size
                        )
                    })
            })
            .collect::<anyhow::Result<_>>()?
    } else if let Some(text) = value.get("text") {
        let text = text.as_str().context("field `text`: expected a string")?;
        let tok = model
            .tokenizer
            .as_ref()
            .context("field `text`: the model has no tokenizer.json")?;
        tok.encode(text, true)?.ids
    } else if let Some(messages) = value.get("messages") {
        let messages: Vec<ChatMessage> = serde_json::from_value(messages.clone())
            .context("field `messages`: expected [{\"role\",\"content\"}]")?;
        let tok = model
            .tokenizer
            .as_ref()
            .context("field `messages`: the model has no tokenizer.json")?;
        tok.encode_chat(&messages, false)?.encoding.ids
    } else {
        bail!("expected one of the fields `ids`, `text` or `messages`");
    };
    if ids.len() < 2 {
        bail!("needs at least 2 tokens to score (got {})", ids.len());
    }
    Ok(ids)
}

/// Scores sequences in one padded batch; one JSON object per sequence.
fn score_batch(model: &Model, seqs: &[Vec<u32>]) -> anyhow::Result<Vec<Value>> {
    let frozen = model.frozen();
    let batch: Vec<ScoredSeq> = seqs
        .iter()
        .map(|ids| ScoredSeq {
            ids: ids.clone(),
            score_from: 1,
        })
        .collect();
    let lp = batch_logprobs(&frozen, &batch, 0);
    Ok(lp
        .scored_host()
        .into_iter()
        .zip(seqs)
        .map(|(values, ids)| {
            let nll = -values.iter().map(|&v| v as f64).sum::<f64>() / values.len() as f64;
            json!({
                "ids": ids,
                "logprobs": values,
                "mean_nll": nll,
                "perplexity": nll.exp(),
            })
        })
        .collect())
}
