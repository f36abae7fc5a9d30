//! Does the behaviour move? The operator's first training run (SEED.md, "The Practical
//! Plan": 20 behavioural + 5 general examples, lr 1e-5, one pass) and a 200-example run on
//! SmolLM2-135M-Instruct, each from the original weights, with the monitor's probe suite
//! before and after.
//!
//! Data: the generator over `scenarios/` (train templates only; probes are held out),
//! labelled for SFT; behavioural examples are half `clear_direction`, half
//! `flawed_direction`; one general replay example per four behavioural ones (the plan's
//! 20 + 5). Each batch holds four behavioural examples and one general one, in a seeded
//! order. Training is the loop's own `Trainer` (AdamW, torch semantics, weight decay 0,
//! constant lr, global grad-norm clip 1.0).
//!
//! Evaluation: `ProbeSuite` from the probe templates (`--probe-samples` renderings each),
//! `--general-items` arithmetic and code items, and the held-out corpus
//! (`scenarios/corpus/heldout`).
//!
//! Run (the dev profile builds dependencies at opt-level 3):
//! `cargo bench --profile dev --bench behaviour -- [--model PATH] [--runs 20,200]
//!  [--batch-size 5] [--lr 1e-5] [--optimizer adamw|apollo-mini] [--probe-samples 4]
//!  [--general-items 16] [--seed 0] [--max-seq-len 512] [--out DIR]`
//! Results go to stdout (a markdown table) and `DIR/report.json`; each trained model is
//! written to `DIR/run-N/` as a Hugging Face directory so `dreamloop generate --model
//! DIR/run-N` can be asked what it now says. Without `--bench` on the command line (as
//! `cargo test --all-targets` runs it) it prints how to run it and exits.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use dreamloop::eval::{EvalReport, ProbeSuite};
use dreamloop::example::{Example, Kind, Scenario};
use dreamloop::general::{load_heldout, Corpus, GeneralConfig, GeneralReplay};
use dreamloop::label::{LabelConfig, Labeler, Phase};
use dreamloop::model::{cpu, save_dir, CausalLm, Model};
use dreamloop::scenario::{probe_scenarios, Generator, GeneratorConfig, Ledger, Library};
use dreamloop::train::dataset::{tokenize_example, Item};
use dreamloop::train::loss::DpoVariant;
use dreamloop::train::optim::{AdamWConfig, ApolloConfig, OptimizerConfig};
use dreamloop::train::schedule::LrSchedule;
use dreamloop::train::trainer::{Batch, StepReport, Trainer, TrainerConfig};
use serde_json::json;

/// Command-line settings.
struct Args {
    /// `.gguf` file or HF directory.
    model: String,
    /// Behavioural example counts, one training run each (from the original weights).
    runs: Vec<usize>,
    batch_size: usize,
    lr: f64,
    /// `adamw` (torch semantics, weight decay 0) or `apollo-mini` (the daemon's default).
    optimizer: String,
    probe_samples: usize,
    general_items: usize,
    seed: u64,
    /// Longest trained sequence (config/smollm2-cpu.toml's `max_seq_len`).
    max_seq_len: usize,
    out: PathBuf,
}

fn parse_args() -> Option<Args> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if !argv.iter().any(|a| a == "--bench") {
        return None;
    }
    let mut args = Args {
        model: "models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        runs: vec![20, 200],
        batch_size: 5,
        lr: 1e-5,
        optimizer: "adamw".into(),
        probe_samples: 4,
        general_items: 16,
        seed: 0,
        max_seq_len: 512,
        out: PathBuf::from("target/behaviour"),
    };
    let mut it = argv.into_iter().filter(|a| a != "--bench");
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let bad = |e: &dyn std::fmt::Display| -> ! { panic!("{flag} {value}: {e}") };
        match flag.as_str() {
            "--model" => args.model = value,
            "--max-seq-len" => args.max_seq_len = value.parse().unwrap_or_else(|e| bad(&e)),
            "--runs" => {
                args.runs = value
                    .split(',')
                    .map(|n| n.trim().parse().unwrap_or_else(|e| bad(&e)))
                    .collect()
            }
            "--batch-size" => args.batch_size = value.parse().unwrap_or_else(|e| bad(&e)),
            "--lr" => args.lr = value.parse().unwrap_or_else(|e| bad(&e)),
            "--optimizer" => args.optimizer = value,
            "--probe-samples" => args.probe_samples = value.parse().unwrap_or_else(|e| bad(&e)),
            "--general-items" => args.general_items = value.parse().unwrap_or_else(|e| bad(&e)),
            "--seed" => args.seed = value.parse().unwrap_or_else(|e| bad(&e)),
            "--out" => args.out = PathBuf::from(value),
            other => panic!("unknown flag {other}"),
        }
    }
    Some(args)
}

/// `n` behavioural examples (half clear, half flawed) and `n / 4` general ones, ordered so
/// every batch of five holds four behavioural and one general example.
fn training_examples(scenarios: &Path, n: usize, seed: u64) -> Vec<Example> {
    let library = Library::load_dir(scenarios).expect("scenario templates load");
    let mut generator = Generator::new(
        library,
        Ledger::in_memory(),
        GeneratorConfig {
            seed,
            ..GeneratorConfig::default()
        },
    )
    .expect("train templates exist");
    let labeler = Labeler::new(&LabelConfig {
        phase: Phase::Sft,
        ..LabelConfig::default()
    });
    let behavioural: Vec<Scenario> = (0..n)
        .map(|i| {
            let kind = if i % 2 == 0 {
                Kind::ClearDirection
            } else {
                Kind::FlawedDirection
            };
            generator.next_of(kind).expect("fresh scenario")
        })
        .collect();
    let corpus = Corpus::load_train(scenarios).expect("training corpus loads");
    let mut general = GeneralReplay::new(corpus, seed ^ 0x5EED, GeneralConfig::default());
    let mut out = Vec::with_capacity(n + n / 4);
    for (i, s) in behavioural.iter().enumerate() {
        out.push(labeler.scenario(s));
        if i % 4 == 3 {
            out.push(general.next_example());
        }
    }
    out
}

fn evaluate(suite: &ProbeSuite, lm: &CausalLm, label: &str) -> EvalReport {
    let t = Instant::now();
    let report = suite.evaluate(lm, &mut |_, _| {});
    eprintln!(
        "[{label}] eval {:.0} s: clear {:.3}/{:+.3}/{:+.4}, flawed {:.3}/{:+.3}/{:+.4}, ppl {:.3}, attention {:.4}, ablation {:+.3}",
        t.elapsed().as_secs_f64(),
        report.clear_direction.accuracy,
        report.clear_direction.margin,
        report.clear_direction.margin_per_token,
        report.flawed_direction.accuracy,
        report.flawed_direction.margin,
        report.flawed_direction.margin_per_token,
        report.perplexity,
        report.attention_on_direction,
        report.ablation_sensitivity
    );
    report
}

/// Trains one pass over `examples` from the original weights; returns the step reports,
/// the wall time and the trained forward-only weights.
fn train(args: &Args, model: &Model, examples: &[Example]) -> (Vec<StepReport>, f64, CausalLm) {
    let device = cpu().autodiff();
    let policy = Model::open(&args.model, &device).expect("model loads for training");
    let tok = model.tokenizer.as_ref().expect("the model has a tokenizer");
    let settings = TrainerConfig {
        optimizer: match args.optimizer.as_str() {
            "adamw" => OptimizerConfig::Adamw(AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            }),
            "apollo-mini" => OptimizerConfig::Apollo(ApolloConfig {
                seed: args.seed,
                ..ApolloConfig::mini()
            }),
            other => panic!("--optimizer {other}: expected adamw or apollo-mini"),
        },
        schedule: LrSchedule::warmup_constant(args.lr, 0),
        max_grad_norm: 1.0,
        beta: 0.01,
        dpo_weight: 1.0,
        dpo_variant: DpoVariant::Sigmoid,
        freeze: Vec::new(),
        train_only: Vec::new(),
        pad_id: model.config.pad_id(),
        max_seq_len: args.max_seq_len,
        recompute: false,
        logits_chunk: 0,
    };
    let mut trainer =
        Trainer::new(policy.config.clone(), policy.lm, None, settings).expect("trainer builds");
    let started = Instant::now();
    let mut reports = Vec::new();
    for chunk in examples.chunks(args.batch_size) {
        let mut batch = Batch::default();
        for e in chunk {
            match tokenize_example(tok, e).expect("example tokenizes") {
                Item::Sft(item) => batch.sft.push(item),
                Item::Dpo(item) => batch.dpo.push(item),
            }
        }
        let longest = batch
            .sft
            .iter()
            .map(|e| e.prompt.len() + e.completion.len())
            .chain(
                batch
                    .dpo
                    .iter()
                    .map(|e| e.prompt.len() + e.chosen.len().max(e.rejected.len())),
            )
            .max()
            .unwrap_or(0);
        let r = trainer.step(&batch).expect("step succeeds");
        eprintln!(
            "  step {:>3}: loss {:.4}, grad norm {:.3}, {} tokens (longest {longest}, {} cut), {:.1} s",
            r.step, r.loss, r.grad_norm, r.tokens, r.truncated, r.seconds
        );
        reports.push(r);
    }
    (reports, started.elapsed().as_secs_f64(), trainer.frozen())
}

fn row(name: &str, r: &EvalReport) -> String {
    format!(
        "| {name} | {:.3} / {:+.2} / {:+.4} | {:.3} / {:+.2} / {:+.4} | {:.3} | {:.4} | {:+.3} | {:.3} / {:+.3} | {:.3} / {:+.3} |",
        r.clear_direction.accuracy,
        r.clear_direction.margin,
        r.clear_direction.margin_per_token,
        r.flawed_direction.accuracy,
        r.flawed_direction.margin,
        r.flawed_direction.margin_per_token,
        r.perplexity,
        r.attention_on_direction,
        r.ablation_sensitivity,
        r.arithmetic.accuracy,
        r.arithmetic.margin,
        r.code.accuracy,
        r.code.margin,
    )
}

fn main() {
    let Some(args) = parse_args() else {
        println!("behaviour: run with `cargo bench --profile dev --bench behaviour -- …` (see the file's docs)");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let scenarios = root.join("scenarios");
    std::fs::create_dir_all(&args.out).expect("output dir");

    let t = Instant::now();
    let model = Model::open(&args.model, &cpu()).expect("model loads");
    eprintln!(
        "loaded {} in {:.1} s",
        args.model,
        t.elapsed().as_secs_f64()
    );
    let tok = model.tokenizer.as_ref().expect("the model has a tokenizer");
    let library = Library::load_dir(&scenarios).expect("scenario templates load");
    let probes = probe_scenarios(&library, args.probe_samples);
    let heldout: Vec<String> = load_heldout(&scenarios)
        .expect("held-out corpus loads")
        .into_iter()
        .map(|h| h.text)
        .collect();
    let pad = model.config.pad_id();
    let suite = ProbeSuite::build(tok, &probes, &heldout, args.general_items, args.seed, pad)
        .expect("probe suite builds");
    let count = |k: Kind| probes.iter().filter(|p| p.kind == k).count();
    eprintln!(
        "probes: {} clear_direction, {} flawed_direction, {} arithmetic + {} code items, {} held-out texts",
        count(Kind::ClearDirection),
        count(Kind::FlawedDirection),
        args.general_items,
        args.general_items,
        heldout.len()
    );

    let before = evaluate(&suite, &model.frozen(), "before");
    let mut results = vec![("before".to_string(), before.clone(), json!(null))];
    for &n in &args.runs {
        let examples = training_examples(&scenarios, n, args.seed);
        let general = examples.iter().filter(|e| e.kind == Kind::General).count();
        eprintln!(
            "[run {n}] {} examples ({n} behavioural, {general} general), batch {}, lr {:e}, {}",
            examples.len(),
            args.batch_size,
            args.lr,
            args.optimizer
        );
        let (reports, seconds, trained) = train(&args, &model, &examples);
        let after = evaluate(&suite, &trained, &format!("after {n}"));
        let dir = args.out.join(format!("run-{n}"));
        save_dir(
            &dir,
            &model.config,
            &trained,
            &HashMap::new(),
            model.tokenizer.as_ref(),
            &model.extra_files,
        )
        .expect("trained model saves");
        let losses: Vec<f64> = reports.iter().map(|r| r.loss).collect();
        let tokens: usize = reports.iter().map(|r| r.tokens).sum();
        eprintln!(
            "[run {n}] {} steps in {seconds:.0} s ({:.1} s/step), {tokens} tokens; saved {}",
            reports.len(),
            seconds / reports.len().max(1) as f64,
            dir.display()
        );
        results.push((
            format!("after {n} behavioural + {general} general"),
            after,
            json!({
                "examples": examples.len(),
                "behavioural": n,
                "general": general,
                "steps": reports.len(),
                "train_seconds": seconds,
                "tokens": tokens,
                "losses": losses,
                "grad_norms": reports.iter().map(|r| r.grad_norm).collect::<Vec<_>>(),
            }),
        ));
    }

    println!(
        "| model | clear acc / margin / per-token margin | flawed acc / margin / per-token margin | held-out ppl | attention on direction | ablation Δ log p | arithmetic acc / margin | code acc / margin |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (name, r, _) in &results {
        println!("{}", row(name, r));
    }
    let report: Vec<_> = results
        .iter()
        .map(|(name, r, train)| json!({ "name": name, "eval": r, "train": train }))
        .collect();
    let path = args.out.join("report.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&report).expect("serialises"),
    )
    .expect("report written");
    eprintln!("wrote {}", path.display());
}
