//! What share of the daemon's wall time goes to evaluation at the configured cadence?
//!
//! Between two evaluations the daemon takes `[eval] every_n_steps` optimizer steps, so the
//! share is `eval / (every_n_steps × step + eval)`. Both parts are measured the way the
//! trainer thread runs them (`actors/src/trainer.rs`): the model opened on the config's
//! backend with autodiff, the DPO reference a frozen copy of the starting weights, the
//! `Trainer` built from `DreamConfig::trainer_config`, batches of the config's size and
//! replay ratio assembled as the labeler and mixer actors assemble them (accept and
//! push-back scenarios from the generator, general examples half replay and half
//! `general`-kind scenarios), and one full evaluation of `ProbeSuite::from_config` — the
//! daemon's suite — on the trainer's forward-only weights.
//!
//! Run (the dev profile builds dependencies at opt-level 3):
//! `cargo bench --profile dev --bench eval_share -- [--config config/dreamloop.toml]
//!  [--model tiny --model models/SmolLM2-135M-Instruct.Q4_1.gguf] [--steps 5]
//!  [--probe-samples 1,2]`
//! `--steps` timed steps follow one untimed warm-up step. `--probe-samples` also times an
//! evaluation with each of those `[eval] probe_samples` values (for a cadence that misses
//! the 10 % target). Results go to stdout as a markdown table. Without `--bench` on the
//! command line (as `cargo test --all-targets` runs it) it prints how to run it and exits.

use std::path::{Path, PathBuf};
use std::time::Instant;

use dreamloop::config::DreamConfig;
use dreamloop::eval::{EvalReport, ProbeSuite};
use dreamloop::example::Kind;
use dreamloop::general::{Corpus, GeneralReplay};
use dreamloop::label::{LabelConfig, Labeler};
use dreamloop::mix::{Mixer, Pools};
use dreamloop::model::{cpu, Model};
use dreamloop::scenario::{Generator, GeneratorConfig, Ledger, Library};
use dreamloop::train::dataset::{tokenize_example, Item};
use dreamloop::train::trainer::{Batch, Trainer};

/// The share of wall time evaluation should stay under.
const TARGET: f64 = 0.10;

/// Command-line settings.
struct Args {
    /// The daemon's config file.
    config: PathBuf,
    /// Models measured, each replacing `[model] spec`.
    models: Vec<String>,
    /// Timed optimizer steps per model.
    steps: usize,
    /// Extra `probe_samples` values to time an evaluation with.
    probe_samples: Vec<usize>,
}

fn parse_args() -> Option<Args> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if !argv.iter().any(|a| a == "--bench") {
        return None;
    }
    let mut args = Args {
        config: PathBuf::from("config/dreamloop.toml"),
        models: Vec::new(),
        steps: 5,
        probe_samples: Vec::new(),
    };
    let mut it = argv.into_iter().filter(|a| a != "--bench");
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let bad = |e: &dyn std::fmt::Display| -> ! { panic!("{flag} {value}: {e}") };
        match flag.as_str() {
            "--config" => args.config = PathBuf::from(&value),
            "--model" => args.models.push(value),
            "--steps" => args.steps = value.parse().unwrap_or_else(|e| bad(&e)),
            "--probe-samples" => {
                args.probe_samples = value
                    .split(',')
                    .map(|n| n.trim().parse().unwrap_or_else(|e| bad(&e)))
                    .collect()
            }
            other => panic!("unknown flag {other}"),
        }
    }
    if args.models.is_empty() {
        args.models = vec![
            "tiny".into(),
            "models/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
        ];
    }
    Some(args)
}

/// The daemon's batches: the labeler's way of filling the mixer's plan, then the mixer.
struct Batches {
    generator: Generator,
    labeler: Labeler,
    replay: GeneralReplay,
    mixer: Mixer,
    pools: Pools,
}

impl Batches {
    fn new(config: &DreamConfig) -> Batches {
        let data = &config.data;
        let library = Library::load_dir(&data.scenarios_dir).expect("scenario templates load");
        let generator = Generator::new(
            library,
            Ledger::in_memory(),
            GeneratorConfig {
                seed: data.seed,
                probe_samples: config.eval.probe_samples,
                ..GeneratorConfig::default()
            },
        )
        .expect("train templates exist");
        let corpus = Corpus::load_train(&data.scenarios_dir).expect("training corpus loads");
        Batches {
            generator,
            labeler: Labeler::new(&LabelConfig {
                phase: config.phase.first(),
                ..LabelConfig::default()
            }),
            replay: GeneralReplay::new(corpus, data.seed, config.general_config()),
            mixer: Mixer::new(config.mix_config()).expect("mix config is valid"),
            pools: Pools::default(),
        }
    }

    fn next(&mut self) -> Vec<dreamloop::example::Example> {
        let plan = self.mixer.plan();
        for (kind, n) in [
            (Kind::ClearDirection, plan.accept),
            (Kind::FlawedDirection, plan.push_back),
            (Kind::General, plan.general),
        ] {
            let mut scenarios = n;
            if kind == Kind::General {
                for _ in 0..n - n / 2 {
                    self.pools.push(self.replay.next_example());
                }
                scenarios = n / 2;
            }
            for _ in 0..scenarios {
                let s = self.generator.next_of(kind).expect("a fresh scenario");
                self.pools.push(self.labeler.scenario(&s));
            }
        }
        self.mixer
            .next_batch(&mut self.pools)
            .expect("the pools hold the plan")
            .examples
    }
}

/// One model's measurements.
struct Measured {
    model: String,
    parameters: usize,
    step_seconds: Vec<f64>,
    tokens: f64,
    eval: EvalReport,
    work_units: usize,
    /// (probe_samples, evaluation seconds) of the extra settings.
    alternatives: Vec<(usize, f64)>,
}

fn measure(args: &Args, base: &DreamConfig, spec: &str) -> Measured {
    let mut config = base.clone();
    config.model.spec = spec.into();
    assert!(
        config.model.reference.is_none(),
        "this benchmark uses the default DPO reference (a frozen copy)"
    );
    let device = cpu().autodiff();
    let t = Instant::now();
    let model = Model::open(spec, &device).unwrap_or_else(|e| panic!("loading `{spec}`: {e}"));
    eprintln!("[{spec}] loaded in {:.1} s", t.elapsed().as_secs_f64());
    let reference = model.frozen();
    let pad = model.config.pad_id();
    let parameters = dreamloop::model::parameter_count(&model.lm);
    let Model {
        config: model_config,
        lm,
        tokenizer,
        dtypes,
        ..
    } = model;
    let tok = tokenizer.expect("the model has a tokenizer");
    let mut trainer = Trainer::new(
        model_config,
        lm,
        Some(reference),
        config.trainer_config(pad),
    )
    .expect("trainer builds")
    .with_files(dtypes, Some(&tok));
    let mut batches = Batches::new(&config);
    let mut step = |trainer: &mut Trainer| {
        let mut batch = Batch::default();
        for example in batches.next() {
            match tokenize_example(&tok, &example).expect("example tokenizes") {
                Item::Sft(item) => batch.sft.push(item),
                Item::Dpo(item) => batch.dpo.push(item),
            }
        }
        let t = Instant::now();
        let report = trainer.step(&batch).expect("step succeeds");
        (t.elapsed().as_secs_f64(), report.tokens)
    };
    let (warm, _) = step(&mut trainer);
    eprintln!("[{spec}] warm-up step {warm:.2} s");
    let mut step_seconds = Vec::new();
    let mut tokens = 0;
    for i in 0..args.steps {
        let (s, n) = step(&mut trainer);
        eprintln!("[{spec}] step {} {s:.2} s, {n} tokens", i + 1);
        step_seconds.push(s);
        tokens += n;
    }

    let scenarios = config.data.scenarios_dir.clone();
    let suite = ProbeSuite::from_config(&config.eval, &scenarios, &tok, pad)
        .expect("the daemon's probe suite builds");
    let frozen = trainer.frozen();
    let eval = suite.evaluate(&frozen, &mut |_, _| {});
    eprintln!(
        "[{spec}] evaluation {:.1} s ({} batches)",
        eval.seconds,
        suite.work_units()
    );
    let mut alternatives = Vec::new();
    for &samples in &args.probe_samples {
        let mut eval_config = config.eval.clone();
        eval_config.probe_samples = samples;
        let suite = ProbeSuite::from_config(&eval_config, &scenarios, &tok, pad)
            .expect("probe suite builds");
        let seconds = suite.evaluate(&frozen, &mut |_, _| {}).seconds;
        eprintln!("[{spec}] evaluation with probe_samples = {samples}: {seconds:.1} s");
        alternatives.push((samples, seconds));
    }
    Measured {
        model: spec.into(),
        parameters,
        tokens: tokens as f64 / args.steps.max(1) as f64,
        step_seconds,
        work_units: suite.work_units(),
        eval,
        alternatives,
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// `eval / (n × step + eval)`.
fn share(eval: f64, step: f64, n: u64) -> f64 {
    eval / (n as f64 * step + eval)
}

/// The smallest cadence whose share is at most [`TARGET`].
fn cadence_for_target(eval: f64, step: f64) -> u64 {
    (eval * (1.0 - TARGET) / (TARGET * step)).ceil() as u64
}

fn main() {
    let Some(args) = parse_args() else {
        println!("eval_share: run with `cargo bench --profile dev --bench eval_share -- …` (see the file's docs)");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(root).expect("the repository root");
    let config = DreamConfig::load(&args.config).unwrap_or_else(|e| panic!("{e}"));
    let every = config.eval.every_n_steps;
    eprintln!(
        "{}: every_n_steps {every}, batch {}, replay {}, probe_samples {}, general_items {}, max_heldout_texts {}, heldout_max_bytes {}; {} threads",
        args.config.display(),
        config.train.batch_size,
        config.data.replay_ratio,
        config.eval.probe_samples,
        config.eval.general_items,
        config.eval.max_heldout_texts,
        config.eval.heldout_max_bytes,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let results: Vec<Measured> = args
        .models
        .iter()
        .map(|m| measure(&args, &config, m))
        .collect();

    println!(
        "| model | parameters | step (s, mean of {}) | tokens/step | evaluation (s) | forward batches | share at every_n_steps = {every} | every_n_steps for ≤ {:.0} % |",
        args.steps,
        TARGET * 100.0
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &results {
        let step = mean(&r.step_seconds);
        println!(
            "| {} | {:.2} M | {step:.3} (min {:.3}) | {:.0} | {:.2} | {} | {:.1} % | {} |",
            r.model,
            r.parameters as f64 / 1e6,
            r.step_seconds.iter().cloned().fold(f64::INFINITY, f64::min),
            r.tokens,
            r.eval.seconds,
            r.work_units,
            100.0 * share(r.eval.seconds, step, every),
            cadence_for_target(r.eval.seconds, step),
        );
    }
    for r in results.iter().filter(|r| !r.alternatives.is_empty()) {
        let step = mean(&r.step_seconds);
        for (samples, seconds) in &r.alternatives {
            println!(
                "\n{}: probe_samples = {samples}: evaluation {seconds:.2} s, share {:.1} % at every_n_steps = {every}, ≤ {:.0} % from every_n_steps = {}",
                r.model,
                100.0 * share(*seconds, step, every),
                TARGET * 100.0,
                cadence_for_target(*seconds, step)
            );
        }
    }
}
