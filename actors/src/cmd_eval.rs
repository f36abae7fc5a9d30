//! `dreamloop eval`: the daemon's probe suite, on demand, on any model or checkpoint.
//!
//! The suite is [`ProbeSuite::from_config`] of the same config file the daemon reads
//! (`--config`, else `config/dreamloop.toml` when it exists, else the built-in tiny
//! configuration — `dreamloop run`'s rule), so the numbers are comparable with the ones the
//! monitor acts on. The weights are either `--model` (a Hugging Face directory, a `.gguf`
//! file or a preset) or `--checkpoint STEP|good|latest` of a state directory. A checkpoint is
//! read the way the trainer thread restores one: the tokenizer and padding id come from the
//! config's `[model] spec`, the weights from the checkpoint directory (`Model::load`, what
//! `Trainer::restore` calls), after every file was re-hashed against `MANIFEST.json`
//! ([`load_read_only`], which never touches a running daemon's files).
//!
//! Output: a table on stdout, or with `--json` the [`EvalReport`] as one JSON object. A
//! progress line on stderr only when stderr is a terminal. Exit codes: 0 evaluated, 2 the
//! model or checkpoint named is unusable (missing, corrupt, not this config's model), 78 the
//! config is (unreadable, invalid, or its model, backend or scenarios do not load), 1 any
//! other failure.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, Context};
use dreamloop::checkpoint::{load_read_only, Select};
use dreamloop::config::DreamConfig;
use dreamloop::eval::{EvalReport, PreferenceScore, ProbeSuite, SuiteError};
use dreamloop::model::{CausalLm, Model, ModelConfig, Precision, Tokenizer};

use crate::cmd_daemon::EXIT_CONFIG;

/// Exit status when the model or checkpoint named on the command line is unusable (the
/// status clap uses for a bad argument).
pub const EXIT_INPUT: u8 = 2;

/// `dreamloop eval`.
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("weights").required(true).args(["model", "checkpoint"])))]
pub struct EvalArgs {
    /// A Hugging Face model directory, a `.gguf` file, or a preset name (`tiny`, `tiny-hybrid`).
    #[arg(long)]
    pub model: Option<String>,
    /// A checkpoint of the state directory: a step number, `good` or `latest`.
    #[arg(long, value_parser = parse_select)]
    pub checkpoint: Option<Select>,
    /// The daemon's state directory (default: `state_dir` of the config).
    #[arg(long, requires = "checkpoint")]
    pub state_dir: Option<PathBuf>,
    /// The daemon's config file (default: config/dreamloop.toml when it exists, else the
    /// built-in tiny defaults).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// `f32` or `bf16`: the dtype the weights live in (default: `[model] dtype` of the config).
    #[arg(long)]
    pub dtype: Option<Precision>,
}

/// `STEP|good|latest`.
fn parse_select(text: &str) -> anyhow::Result<Select> {
    match text {
        "good" => Ok(Select::Good),
        "latest" => Ok(Select::Latest),
        _ => text
            .parse()
            .map(Select::Step)
            .map_err(|_| anyhow!("expected a step number, `good` or `latest`")),
    }
}

/// How an evaluation failed, which decides the exit status.
enum Failure {
    /// The model or checkpoint named on the command line (exit 2).
    Input(anyhow::Error),
    /// The config file or what it names (exit 78).
    Config(anyhow::Error),
}

/// `dreamloop eval`.
pub fn run(args: EvalArgs) -> anyhow::Result<ExitCode> {
    let (code, e) = match evaluate(&args) {
        Ok(()) => return Ok(ExitCode::SUCCESS),
        Err(Failure::Input(e)) => (EXIT_INPUT, e),
        Err(Failure::Config(e)) => (EXIT_CONFIG, e),
    };
    eprintln!("error: {e:#}");
    Ok(ExitCode::from(code))
}

/// The config `dreamloop run` would use with these flags, validated.
fn load_config(path: Option<&Path>) -> Result<(DreamConfig, String), Failure> {
    let default = Path::new("config/dreamloop.toml");
    let path = path.or_else(|| default.exists().then_some(default));
    match path {
        Some(p) => DreamConfig::load(p)
            .map(|c| (c, p.display().to_string()))
            .map_err(|e| Failure::Config(e.into())),
        None => Ok((
            DreamConfig::tiny(Path::new("scenarios"), Path::new("state")),
            "the built-in tiny configuration".into(),
        )),
    }
}

fn evaluate(args: &EvalArgs) -> Result<(), Failure> {
    let input = Failure::Input;
    let bad_config = Failure::Config;
    let (config, origin) = load_config(args.config.as_deref())?;
    let device = crate::trainer::device(config.model.backend)
        .with_context(|| format!("[model] backend of {origin}"))
        .map_err(bad_config)?;
    let precision = args.dtype.unwrap_or(config.model.dtype);

    let (what, lm, tokenizer, model_config) = match (&args.model, args.checkpoint) {
        (Some(spec), _) => {
            let mut model = Model::open_as(spec, &device, precision)
                .with_context(|| format!("loading model `{spec}`"))
                .map_err(input)?;
            let tokenizer = model
                .tokenizer
                .take()
                .ok_or_else(|| anyhow!("model `{spec}` has no tokenizer.json"))
                .map_err(input)?;
            (
                format!("model {spec}"),
                model.frozen(),
                tokenizer,
                model.config.clone(),
            )
        }
        (None, Some(select)) => {
            let state_dir = args.state_dir.as_ref().unwrap_or(&config.state_dir);
            // The store's errors name the file (a corrupt one) or the directory (a missing
            // step) and already include their cause: shown as one line, not as a chain.
            let checkpoint =
                load_read_only(state_dir, select).map_err(|e| input(anyhow!("{e}")))?;
            let spec = &config.model.spec;
            let (base_config, tokenizer) = base_model(spec, &device, precision)
                .with_context(|| format!("[model] spec of {origin}"))
                .map_err(bad_config)?;
            let weights = Model::load_as(&checkpoint.path, &device, precision)
                .with_context(|| format!("loading the weights of {}", checkpoint.path.display()))
                .map_err(input)?;
            if weights.config.raw != base_config.raw {
                return Err(input(anyhow!(
                    "{}: this checkpoint is not of `{spec}`, the model of {origin}",
                    checkpoint.file("config.json").display()
                )));
            }
            (
                format!("checkpoint {}", checkpoint.path.display()),
                weights.frozen(),
                tokenizer,
                base_config,
            )
        }
        (None, None) => return Err(input(anyhow!("give --model or --checkpoint"))),
    };

    let pad = model_config.pad_id();
    let suite = ProbeSuite::from_config(&config.eval, &config.data.scenarios_dir, &tokenizer, pad)
        .map_err(|e| match e {
            SuiteError::Tokenizer(_) => input(anyhow!("{what}: {e}")),
            _ => bad_config(anyhow!("[data] scenarios_dir of {origin}: {e}")),
        })?;
    let mut report = run_suite(&suite, &lm);
    let probes =
        dreamloop::eval::generations::from_config(&config.eval, &config.data.scenarios_dir)
            .map_err(|e| bad_config(anyhow!("[data] scenarios_dir of {origin}: {e}")))?;
    if !probes.is_empty() {
        let stop = dreamloop::eval::generations::stop_tokens(&model_config, &tokenizer);
        report.generations = Some(dreamloop::eval::generations::answer(
            &lm,
            &tokenizer,
            &stop,
            &probes,
            config.eval.generation_tokens,
        ));
    }
    if args.json {
        // Numbers and a list of numbers; a non-finite one is written as null.
        let line = serde_json::to_string(&report).expect("an EvalReport always serialises");
        println!("{line}");
    } else {
        print_table(&what, &report);
    }
    Ok(())
}

/// The config and tokenizer of the config's model; its weights are dropped at once (a
/// checkpoint's replace them).
fn base_model(
    spec: &str,
    device: &dreamloop::model::Device,
    precision: Precision,
) -> anyhow::Result<(ModelConfig, Tokenizer)> {
    let Model {
        config, tokenizer, ..
    } = Model::open_as(spec, device, precision)
        .with_context(|| format!("loading model `{spec}`"))?;
    let tokenizer = tokenizer.ok_or_else(|| anyhow!("model `{spec}` has no tokenizer.json"))?;
    Ok((config, tokenizer))
}

/// Runs the suite with a progress bar on stderr when it is a terminal.
fn run_suite(suite: &ProbeSuite, lm: &CausalLm) -> EvalReport {
    const WIDTH: usize = 30;
    let tty = std::io::stderr().is_terminal();
    let report = suite.evaluate(lm, &mut |done, total| {
        if tty {
            let filled = WIDTH * done / total.max(1);
            eprint!(
                "\revaluating [{}{}] {done}/{total} batches\x1b[K",
                "=".repeat(filled),
                " ".repeat(WIDTH - filled)
            );
        }
    });
    if tty {
        eprint!("\r\x1b[K");
    }
    report
}

fn print_table(what: &str, r: &EvalReport) {
    let score = |name: &str, s: &PreferenceScore| {
        println!(
            "{name:<24} accuracy {:.3}   margin {:+.4} nats ({:+.4} per token)   ({} probes)",
            s.accuracy, s.margin, s.margin_per_token, s.count
        );
    };
    println!("{:<24} {what}", "weights");
    score("clear_direction", &r.clear_direction);
    score("flawed_direction", &r.flawed_direction);
    score("arithmetic", &r.arithmetic);
    score("code", &r.code);
    println!("{:<24} {:.4}", "held-out perplexity", r.perplexity);
    println!(
        "{:<24} {:.4}   per layer: {}",
        "attention on direction",
        r.attention_on_direction,
        r.attention_per_layer
            .iter()
            .enumerate()
            .map(|(i, a)| match r.attention_layers.get(i) {
                Some(layer) => format!("L{layer} {a:.4}"),
                None => format!("{a:.4}"),
            })
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "{:<24} {:+.4} nats",
        "ablation sensitivity", r.ablation_sensitivity
    );
    println!("{:<24} {:.2}", "eval seconds", r.seconds);
    if let Some(g) = &r.generations {
        for (name, value) in g.measures.named() {
            println!("{:<24} {value:.3}", format!("generation {name}"));
        }
        for reply in &g.generations {
            println!(
                "  [{:?} {} → {}] {:?}",
                reply.kind,
                reply.id,
                reply.verdict(),
                reply.reply
            );
        }
    }
}
