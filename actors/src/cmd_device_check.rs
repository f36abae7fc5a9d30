//! `dreamloop device-check`: what a GPU build computes, and how fast, on the card it runs on.
//! `scripts/gpu-check.sh` runs it from a stripped binary and the test fixtures, with nothing
//! else installed; on the CPU it is the same code on the flex backend (the script's
//! `--dry-run`).
//!
//! - `fixtures`: every golden fixture model's logits and log-probs against transformers', in
//!   f32 and bf16 (`dreamloop::selfcheck`).
//! - `step`: SFT or DPO steps of a model shaped by a `config.json` (the operator's 27B) with
//!   random weights drawn on the device, through the real `Trainer`: step time, tokens/s,
//!   utilisation of the card's peak, and `dreamloop plan`'s prediction for the same step.
//!   `--layers 0` keeps the most layers (in whole layer-pattern periods) that the plan says fit
//!   the device, so the check runs on a card smaller than the one the model is planned for.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context};
use dreamloop::config::Backend;
use dreamloop::label::Phase;
use dreamloop::model::preset::DeviceInit;
use dreamloop::model::{CausalLm, ModelConfig, Precision};
use dreamloop::plan::{parse_bytes, plan, Dtype, Plan, PlanSettings, ReferenceMode, Target};
use dreamloop::selfcheck::{check_fixture, fixture_dirs};
use dreamloop::train::loss::DpoVariant;
use dreamloop::train::optim::{AdamWConfig, ApolloConfig, OptimizerConfig};
use dreamloop::train::reference::Reference;
use dreamloop::train::schedule::LrSchedule;
use dreamloop::train::trainer::{Batch, DpoItem, SftItem, Trainer, TrainerConfig};
use serde_json::{json, Value};

#[derive(clap::Args)]
pub struct DeviceCheckArgs {
    #[command(subcommand)]
    pub part: Part,
}

#[derive(clap::Subcommand)]
pub enum Part {
    /// Logits and log-probs of every fixture model against transformers' references.
    Fixtures(FixturesArgs),
    /// Training steps of a model shaped by a config.json, random weights, through the Trainer.
    Step(StepArgs),
}

#[derive(clap::Args)]
pub struct FixturesArgs {
    /// The directory of fixture models (each with config.json, model.safetensors,
    /// reference.json, reference_bf16.json).
    #[arg(long, default_value = "tests/fixtures/models")]
    pub dir: PathBuf,
    /// cpu or cuda.
    #[arg(long, value_parser = crate::cmd_plan::parse_backend, default_value = "cpu")]
    pub backend: Backend,
    /// f32, bf16, or both (repeatable; default both).
    #[arg(long)]
    pub dtype: Vec<Precision>,
}

#[derive(clap::Args)]
pub struct StepArgs {
    /// A model directory: only its config.json is read.
    #[arg(long, default_value = "tests/fixtures/qwen3_5_27b")]
    pub model: PathBuf,
    /// cpu or cuda.
    #[arg(long, value_parser = crate::cmd_plan::parse_backend, default_value = "cpu")]
    pub backend: Backend,
    /// sft (one sequence of --seq-len tokens) or dpo (one pair, chosen and rejected each
    /// --seq-len tokens).
    #[arg(long, default_value = "sft")]
    pub phase: Phase,
    #[arg(long, default_value_t = 4096)]
    pub seq_len: usize,
    /// Decoder layers (0: the most, in whole periods of the layer pattern, that fit the
    /// device by the plan).
    #[arg(long, default_value_t = 0)]
    pub layers: usize,
    /// Steps; the first one compiles and tunes kernels, the time reported is the median of
    /// the others.
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    #[arg(long, default_value = "bf16")]
    pub dtype: Precision,
    /// Tokens per chunk of the LM head (0: all at once).
    #[arg(long, default_value_t = 1024)]
    pub logits_chunk: usize,
    /// adamw, apollo or apollo-mini.
    #[arg(long, value_parser = ["adamw", "apollo", "apollo-mini"], default_value = "apollo-mini")]
    pub optimizer: String,
    /// `[train] freeze` globs (default: the embeddings and the LM head, as the 27B needs).
    #[arg(long, default_values_t = ["model.embed_tokens.*".to_string(), "lm_head.*".to_string()])]
    pub freeze: Vec<String>,
    /// The device's memory (141GB, 80GiB); default: the host's on cpu, 141GB on cuda.
    #[arg(long)]
    pub device_memory: Option<String>,
    /// The card's peak TFLOP/s in the step's dtype, for the utilisation (default: an
    /// H100/H200's 989 bf16 / 67 f32 on cuda; none on cpu).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Print the layers chosen and the plan, then stop (what a GPU run would do, checked
    /// on a machine without one).
    #[arg(long)]
    pub plan_only: bool,
}

pub fn run(args: DeviceCheckArgs) -> anyhow::Result<ExitCode> {
    match args.part {
        Part::Fixtures(a) => fixtures(a),
        Part::Step(a) => step(a),
    }
}

fn device_of(backend: Backend) -> anyhow::Result<dreamloop::model::Device> {
    crate::trainer::device(backend)
}

fn fixtures(args: FixturesArgs) -> anyhow::Result<ExitCode> {
    let device = device_of(args.backend)?;
    let dtypes = if args.dtype.is_empty() {
        vec![Precision::F32, Precision::Bf16]
    } else {
        args.dtype.clone()
    };
    let dirs = fixture_dirs(&args.dir)?;
    if dirs.is_empty() {
        bail!(
            "{}: no fixture models (config.json + reference.json)",
            args.dir.display()
        );
    }
    let mut all_pass = true;
    for precision in dtypes {
        let (mut passed, mut worst, mut failed) = (0, 0.0f64, Vec::new());
        for dir in &dirs {
            let started = Instant::now();
            let check = check_fixture(dir, &device, precision)?;
            println!(
                "{}",
                json!({"part": "fixtures", "check": check, "seconds": started.elapsed().as_secs_f64()})
            );
            // How close to its bound each model came: the summary's one number.
            worst = worst.max(check.max_logprob_diff / check.logprob_bound);
            if check.pass {
                passed += 1;
            } else {
                failed.push(check.model.clone());
            }
        }
        all_pass &= failed.is_empty();
        println!(
            "SUMMARY fixtures {} {}: {passed}/{} models within tolerance (largest log-prob \
             diff {:.2} × its bound){}",
            backend_name(args.backend),
            precision_name(precision),
            dirs.len(),
            worst,
            if failed.is_empty() {
                String::new()
            } else {
                format!("; FAILED: {}", failed.join(", "))
            }
        );
    }
    Ok(if all_pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn precision_name(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "f32",
        Precision::Bf16 => "bf16",
    }
}

/// The model config with `layers` decoder layers (the layer pattern's first `layers`).
fn with_layers(raw: &Value, layers: usize, path: &str) -> anyhow::Result<ModelConfig> {
    let mut raw = raw.clone();
    let text = if raw.get("text_config").is_some() {
        &mut raw["text_config"]
    } else {
        &mut raw
    };
    text["num_hidden_layers"] = json!(layers);
    if let Some(types) = text.get_mut("layer_types").and_then(Value::as_array_mut) {
        types.truncate(layers);
    }
    Ok(ModelConfig::from_json(raw, path)?)
}

fn step(args: StepArgs) -> anyhow::Result<ExitCode> {
    let path = args.model.join("config.json");
    let shown = path.display().to_string();
    let raw: Value = serde_json::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {shown}"))?,
    )
    .with_context(|| format!("{shown}: not JSON"))?;
    let full = ModelConfig::from_json(raw.clone(), &shown)?;
    let optimizer = match args.optimizer.as_str() {
        "adamw" => OptimizerConfig::Adamw(AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        }),
        "apollo" => OptimizerConfig::Apollo(ApolloConfig::default()),
        _ => OptimizerConfig::Apollo(ApolloConfig::mini()),
    };
    let dtype = match args.dtype {
        Precision::F32 => Dtype::F32,
        Precision::Bf16 => Dtype::Bf16,
    };
    let recompute = args.dtype == Precision::Bf16;
    let target = match args.backend {
        Backend::Cpu => Target::Cpu,
        Backend::Cuda => Target::Cuda,
    };
    let device_bytes = match &args.device_memory {
        Some(text) => parse_bytes(text).map_err(|e| anyhow::anyhow!("--device-memory: {e}"))?,
        None => crate::cmd_plan::default_device_bytes(target),
    };
    let settings = PlanSettings {
        dtype,
        recompute,
        logits_chunk: args.logits_chunk,
        phase: args.phase,
        seq_len: args.seq_len,
        batch: 1,
        // SFT runs with no reference at all, which the plan counts as a streamed one (0 in
        // SFT); DPO with random weights has no files to stream from, so its reference is a
        // resident copy.
        reference: match args.phase {
            Phase::Dpo => ReferenceMode::Resident,
            _ => ReferenceMode::Streamed,
        },
        reference_block: 0,
        optimizer: optimizer.clone(),
        freeze: args.freeze.clone(),
        train_only: Vec::new(),
        device_bytes,
        target,
        peak_flops: args.peak_tflops.map(|t| t * 1e12).or_else(|| {
            (target == Target::Cuda).then(|| dreamloop::plan::default_peak_flops(dtype))
        }),
        mfu: dreamloop::plan::DEFAULT_MFU,
    };
    let (cfg, planned) = if args.layers > 0 {
        let cfg = with_layers(&raw, args.layers, &shown)?;
        let p = plan(&cfg, &settings);
        (cfg, p)
    } else {
        most_layers_that_fit(&raw, &full, &settings, &shown)?
    };
    eprintln!(
        "{} of {} layers, {:.2} B parameters; plan: {:.2} GB of {:.2} GB ({})",
        cfg.num_hidden_layers,
        full.num_hidden_layers,
        planned.parameters as f64 / 1e9,
        planned.total_bytes as f64 / 1e9,
        planned.device_bytes as f64 / 1e9,
        if planned.fits { "fits" } else { "does not fit" }
    );
    if args.plan_only {
        println!(
            "SUMMARY step {} {} (plan only): {}/{} layers ({:.2} B params), {} tokens, plan \
             peak {:.2} GB of {:.2} GB, headroom {:.1} %, peak at {}",
            phase_name(args.phase),
            backend_name(args.backend),
            cfg.num_hidden_layers,
            full.num_hidden_layers,
            planned.parameters as f64 / 1e9,
            planned.tokens_per_step,
            planned.total_bytes as f64 / 1e9,
            planned.device_bytes as f64 / 1e9,
            100.0 * planned.headroom,
            planned.peak_at,
        );
        return Ok(ExitCode::SUCCESS);
    }

    let device = device_of(args.backend)?.autodiff();
    let started = Instant::now();
    let model = CausalLm::load(
        &cfg,
        &mut DeviceInit {
            std: 0.02,
            device: device.clone(),
            dtype: args.dtype.dtype(),
            zero_centred_norms: cfg.norm_unit_offset,
        },
    )?;
    device.sync().ok();
    let init_seconds = started.elapsed().as_secs_f64();
    let trainer_config = TrainerConfig {
        optimizer,
        schedule: LrSchedule::warmup_constant(
            if args.phase == Phase::Dpo { 5e-7 } else { 1e-5 },
            0,
        ),
        max_grad_norm: 1.0,
        beta: 0.01,
        dpo_weight: 1.0,
        dpo_variant: DpoVariant::Sigmoid,
        freeze: args.freeze.clone(),
        train_only: Vec::new(),
        pad_id: 0,
        max_seq_len: 0,
        recompute,
        logits_chunk: args.logits_chunk,
    };
    // DPO: a resident frozen copy of the starting weights (`Trainer::new`'s default).
    let mut trainer = match args.phase {
        Phase::Dpo => Trainer::new(cfg.clone(), model, None, trainer_config)?,
        _ => Trainer::with_reference(cfg.clone(), model, Reference::Absent, trainer_config)?,
    };
    let mut ids = Ids(0x2545_F491_4F6C_DD1D);
    let vocab = cfg.vocab_size;
    let mut seconds = Vec::new();
    for n in 0..args.steps.max(1) {
        let half = args.seq_len / 2;
        let batch = match args.phase {
            Phase::Dpo => Batch {
                sft: Vec::new(),
                dpo: vec![DpoItem {
                    prompt: ids.take(half, vocab),
                    chosen: ids.take(args.seq_len - half, vocab),
                    rejected: ids.take(args.seq_len - half, vocab),
                    hash: n as u64 + 1,
                    reference: None,
                }],
            },
            _ => Batch {
                sft: vec![SftItem {
                    prompt: ids.take(half, vocab),
                    completion: ids.take(args.seq_len - half, vocab),
                    hash: n as u64 + 1,
                }],
                dpo: Vec::new(),
            },
        };
        let t0 = Instant::now();
        let report = trainer.step(&batch)?;
        // The report's loss was read back, but the optimizer's last writes may still be
        // queued: wait for the device so the step's time is the whole step.
        device.sync().ok();
        let s = t0.elapsed().as_secs_f64();
        eprintln!("step {}: {s:.3} s, loss {:.4}", n + 1, report.loss);
        seconds.push(s);
    }
    let timed: Vec<f64> = if seconds.len() > 1 {
        seconds[1..].to_vec()
    } else {
        seconds.clone()
    };
    let median = median(&timed);
    let tokens = planned.tokens_per_step as f64;
    let mfu = planned
        .peak_flops
        .map(|peak| planned.flops_per_step / median / peak);
    let peak_rss = peak_rss_bytes();
    println!(
        "{}",
        json!({
            "part": "step", "phase": phase_name(args.phase), "backend": backend_name(args.backend),
            "layers": cfg.num_hidden_layers, "layers_of_model": full.num_hidden_layers,
            "parameters": planned.parameters, "tokens_per_step": planned.tokens_per_step,
            "init_seconds": init_seconds, "step_seconds": seconds, "median_step_seconds": median,
            "tokens_per_second": tokens / median, "flops_per_step": planned.flops_per_step,
            "peak_flops": planned.peak_flops, "mfu": mfu,
            "plan_total_bytes": planned.total_bytes, "plan_device_bytes": planned.device_bytes,
            "plan_fits": planned.fits, "plan_peak_at": planned.peak_at,
            "host_peak_rss_bytes": peak_rss,
        })
    );
    println!(
        "SUMMARY step {} {}: {}/{} layers ({:.2} B params), {} tokens, median step {:.3} s, \
         {:.0} tokens/s, MFU {}, plan peak {:.2} GB of {:.2} GB, host peak RSS {:.2} GB",
        phase_name(args.phase),
        backend_name(args.backend),
        cfg.num_hidden_layers,
        full.num_hidden_layers,
        planned.parameters as f64 / 1e9,
        planned.tokens_per_step,
        median,
        tokens / median,
        mfu.map_or("n/a (no peak given)".to_string(), |m| format!(
            "{:.1} % of {:.0} TFLOP/s",
            100.0 * m,
            planned.peak_flops.unwrap_or(0.0) / 1e12
        )),
        planned.total_bytes as f64 / 1e9,
        planned.device_bytes as f64 / 1e9,
        peak_rss as f64 / 1e9,
    );
    Ok(ExitCode::SUCCESS)
}

/// The config with the most layers, in whole periods of the layer pattern, whose plan leaves
/// [`SAFETY`] of the device free; one period when none does (the step then shows by how much).
fn most_layers_that_fit(
    raw: &Value,
    full: &ModelConfig,
    settings: &PlanSettings,
    path: &str,
) -> anyhow::Result<(ModelConfig, Plan)> {
    let types = &full.layer_types;
    let n = types.len().max(1);
    // The smallest p with types[i] == types[i mod p] for all i ([GDN × 3, attention]: 4).
    let period = (1..=n)
        .find(|&p| (0..types.len()).all(|i| types[i] == types[i % p]))
        .unwrap_or(n);
    let mut layers = full.num_hidden_layers - full.num_hidden_layers % period;
    loop {
        let cfg = with_layers(raw, layers.max(period), path)?;
        let p = plan(&cfg, settings);
        if p.headroom >= SAFETY || layers <= period {
            return Ok((cfg, p));
        }
        layers -= period;
    }
}

/// Share of the device the automatic layer count leaves free beyond the plan: the plan has
/// come out up to 9 % under the measured peak on the CPU (BENCHMARKS.md, "Is the plan
/// right?"), and a check that runs out of memory measures nothing.
const SAFETY: f64 = 0.10;

fn backend_name(b: Backend) -> &'static str {
    match b {
        Backend::Cpu => "cpu",
        Backend::Cuda => "cuda",
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::Sft => "sft",
        Phase::Dpo => "dpo",
        Phase::Mixed => "mixed",
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The process's peak resident memory (`VmHWM`), 0 where `/proc` is not there.
fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// xorshift64 token ids: deterministic, no RNG crate needed.
struct Ids(u64);

impl Ids {
    fn take(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 % vocab as u64) as u32
            })
            .collect()
    }
}
