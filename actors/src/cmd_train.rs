//! `dreamloop train`: one pass over a dataset file, in file order, through the same
//! `Trainer` the loop uses — an operator's first run, and a way to compare with other tools.
//!
//! With a constant lr (no warmup) and no clipping the result matches PyTorch with TRL's
//! semantics: SFT loss = mean over all completion tokens of a batch, DPO loss = mean over the
//! batch's pairs, `torch.optim.AdamW` (1-D tensors not decayed, as HF's Trainer groups them).

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use dreamloop::model::{default_device, Model, Precision};
use dreamloop::train::dataset::{parse_line, Item};
use dreamloop::train::loss::DpoVariant;
use dreamloop::train::optim::{AdamWConfig, ApolloConfig, OptimizerConfig};
use dreamloop::train::reference::StreamedReference;
use dreamloop::train::schedule::LrSchedule;
use dreamloop::train::trainer::{Batch, TrainError, Trainer, TrainerConfig};

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LossKind {
    Sft,
    Dpo,
    Ipo,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerKind {
    Adamw,
    Apollo,
    ApolloMini,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    /// The starting model: a Hugging Face directory, a `.gguf` file, or a preset name.
    #[arg(long)]
    pub model: String,
    /// JSONL in TRL's formats (prompt/completion, prompt/chosen/rejected, or pre-tokenized).
    #[arg(long)]
    pub data: PathBuf,
    /// Where the trained Hugging Face directory is written.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "sft")]
    pub loss: LossKind,
    /// DPO temperature β.
    #[arg(long, default_value_t = 0.01)]
    pub beta: f64,
    /// Longest trained sequence in tokens (longer examples are cut as TRL cuts them; 0: no
    /// limit).
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    /// Keep only each decoder layer's input and recompute the layer during backward.
    #[arg(long)]
    pub recompute: bool,
    /// Target positions per chunk of the LM head's logits, forward and backward (0: all).
    #[arg(long, default_value_t = 0)]
    pub logits_chunk: usize,
    /// DPO reference weights (default: a frozen copy of --model).
    #[arg(long)]
    pub ref_model: Option<String>,
    /// Read the DPO reference (--ref-model, else --model: a model directory) from its
    /// safetensors files one layer at a time instead of keeping a second copy in memory.
    #[arg(long)]
    pub stream_reference: bool,
    /// With --stream-reference: DPO pairs whose reference log-probs are computed in one pass
    /// over the files, ahead of their steps (0: each step's pairs in their step).
    #[arg(long, default_value_t = 32)]
    pub reference_block: usize,
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: OptimizerKind,
    /// Peak learning rate (default: 1e-5 for SFT, 5e-7 for DPO/IPO).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Decoupled weight decay (not applied to 1-D tensors).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Linear warmup steps (0 = constant lr from the first step).
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// Global grad-norm clipping threshold (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Seed of APOLLO's projections.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// APOLLO rank (ignored by adamw and apollo-mini).
    #[arg(long, default_value_t = 128)]
    pub apollo_rank: usize,
    /// `f32` or `bf16`: the dtype the weights (and the reference's) live in; bf16 updates
    /// are computed in f32 and written back with stochastic rounding.
    #[arg(long, default_value = "f32")]
    pub dtype: Precision,
}

pub fn run(args: TrainArgs) -> anyhow::Result<ExitCode> {
    let device = default_device().autodiff();
    let model = Model::open_as(&args.model, &device, args.dtype)
        .with_context(|| format!("loading model `{}`", args.model))?;
    let reference = match &args.ref_model {
        Some(spec) => Some(
            Model::open_as(spec, &default_device(), args.dtype)
                .with_context(|| format!("loading reference `{spec}`"))?
                .lm,
        ),
        None => None,
    };
    let lr = args.lr.unwrap_or(match args.loss {
        LossKind::Sft => 1e-5,
        LossKind::Dpo | LossKind::Ipo => 5e-7,
    });
    let optimizer = match args.optimizer {
        OptimizerKind::Adamw => OptimizerConfig::Adamw(AdamWConfig {
            weight_decay: args.weight_decay,
            ..AdamWConfig::default()
        }),
        OptimizerKind::Apollo => OptimizerConfig::Apollo(ApolloConfig {
            weight_decay: args.weight_decay,
            seed: args.seed,
            ..ApolloConfig::apollo(args.apollo_rank)
        }),
        OptimizerKind::ApolloMini => OptimizerConfig::Apollo(ApolloConfig {
            weight_decay: args.weight_decay,
            seed: args.seed,
            ..ApolloConfig::mini()
        }),
    };
    let settings = TrainerConfig {
        optimizer,
        schedule: LrSchedule::warmup_constant(lr, args.warmup_steps),
        max_grad_norm: args.max_grad_norm,
        beta: args.beta,
        dpo_weight: 1.0,
        dpo_variant: if args.loss == LossKind::Ipo {
            DpoVariant::Ipo
        } else {
            DpoVariant::Sigmoid
        },
        freeze: Vec::new(),
        train_only: Vec::new(),
        max_seq_len: args.max_seq_len,
        recompute: args.recompute,
        logits_chunk: args.logits_chunk,
        pad_id: model.config.pad_id(),
    };

    // Read and tokenize every line first: a bad line is reported and skipped, never fatal.
    let shown = args.data.display().to_string();
    let file = std::fs::File::open(&args.data).with_context(|| format!("opening {shown}"))?;
    let mut items = Vec::new();
    let mut bad = 0usize;
    for (index, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        let bytes = line.with_context(|| format!("reading {shown}"))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let parsed = match std::str::from_utf8(&bytes) {
            Ok(text) => parse_line(
                text,
                model.tokenizer.as_ref(),
                model.config.vocab_size,
                &shown,
                index + 1,
            )
            .map_err(|e| e.to_string()),
            Err(e) => Err(format!("{shown}:{}: <line>: not UTF-8: {e}", index + 1)),
        };
        match parsed {
            Ok(item) => {
                let wrong = match (&item, args.loss) {
                    (Item::Sft(_), LossKind::Sft)
                    | (Item::Dpo(_), LossKind::Dpo | LossKind::Ipo) => None,
                    (Item::Sft(_), _) => Some("an SFT example in a preference run"),
                    (Item::Dpo(_), _) => Some("a preference pair in an SFT run"),
                };
                match wrong {
                    Some(why) => {
                        bad += 1;
                        eprintln!("{shown}:{}: skipped: {why}", index + 1);
                    }
                    None => items.push(item),
                }
            }
            Err(e) => {
                bad += 1;
                eprintln!("{e}");
            }
        }
    }
    if items.is_empty() {
        bail!("{shown}: no usable examples ({bad} bad lines)");
    }

    let mut trainer = Trainer::new(model.config.clone(), model.lm, reference, settings)?
        .with_files(model.dtypes, model.tokenizer.as_ref());
    if args.stream_reference {
        let spec = args.ref_model.as_deref().unwrap_or(&args.model);
        let streamed = StreamedReference::open_as(Path::new(spec), &default_device(), args.dtype)
            .with_context(|| format!("opening the streamed reference `{spec}`"))?;
        trainer = trainer.with_streamed_reference(streamed);
    }
    let mut batches: Vec<Batch> = items
        .chunks(args.batch_size.max(1))
        .map(|chunk| {
            let mut batch = Batch::default();
            for item in chunk {
                match item {
                    Item::Sft(e) => batch.sft.push(e.clone()),
                    Item::Dpo(e) => batch.dpo.push(e.clone()),
                }
            }
            batch
        })
        .collect();
    let total = batches.len();
    let tty = std::io::stderr().is_terminal();
    let mut skipped = 0usize;
    let mut stored = 0usize;
    // The first batch whose pairs have no reference log-probs yet.
    let mut ahead = 0;
    for i in 0..total {
        if i == ahead && args.reference_block > 0 {
            ahead = precompute_block(&trainer, &mut batches[i..], args.reference_block)? + i;
        }
        match trainer.step(&batches[i]) {
            Ok(r) => {
                stored += r.reference_stored;
                let dpo = r
                    .dpo
                    .as_ref()
                    .map(|d| format!(" margin {:.4} acc {:.2}", d.margins, d.accuracy))
                    .unwrap_or_default();
                let line = format!(
                    "step {}/{total} loss {:.4}{dpo} grad_norm {:.3} lr {:.2e} {:.0} tok/s",
                    i + 1,
                    r.loss,
                    r.grad_norm,
                    r.lr,
                    r.tokens as f64 / r.seconds.max(1e-9)
                );
                if tty {
                    eprint!("\r{line}\x1b[K");
                } else {
                    eprintln!("{line}");
                }
            }
            Err(
                e @ (TrainError::NonFiniteLoss { .. }
                | TrainError::NonFiniteGradient
                | TrainError::Repeated { .. }),
            ) => {
                skipped += 1;
                eprintln!("\nstep {}/{total}: skipped: {e}", i + 1);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if tty {
        eprintln!();
    }
    trainer
        .save(&args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let precomputed = if stored > 0 {
        format!(", {stored} pairs with precomputed reference log-probs")
    } else {
        String::new()
    };
    eprintln!(
        "wrote {} ({} steps, {} skipped, {bad} bad lines{precomputed})",
        args.out.display(),
        trainer.step_count(),
        skipped
    );
    Ok(if bad > 0 || skipped > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    })
}

/// Computes the reference log-probs of the DPO pairs of the first batches of `batches`, at
/// least `block` pairs (or all that are left) in one pass over a streamed reference, and
/// stores them with each pair; answers how many batches it covered (at least one). With a
/// resident reference nothing is stored and each step computes its own pairs.
fn precompute_block(
    trainer: &Trainer,
    batches: &mut [Batch],
    block: usize,
) -> anyhow::Result<usize> {
    let mut counts = Vec::new();
    let mut pairs = Vec::new();
    while counts.len() < batches.len() && (counts.is_empty() || pairs.len() < block) {
        let batch = &mut batches[counts.len()];
        counts.push(batch.dpo.len());
        pairs.append(&mut batch.dpo);
    }
    let computed = trainer.precompute_reference(&mut pairs, block);
    // The pairs go back to their batches whether or not the pass succeeded.
    let mut rest = pairs.into_iter();
    for (batch, n) in batches.iter_mut().zip(&counts) {
        batch.dpo.extend(rest.by_ref().take(*n));
    }
    computed.context("precomputing the DPO reference's log-probs")?;
    Ok(counts.len())
}
