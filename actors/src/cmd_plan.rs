//! `dreamloop plan`: the memory budget and step time of the configured run (or of the run
//! the flags describe), from the model's `config.json` alone — planning comes before
//! downloading the weights. Also the start-up check of `run` and `validate-config`
//! ([`problem`]): a configuration whose plan does not fit its device is refused.
//!
//! The core is `dreamloop::plan`; this file reads the files (the TOML, `config.json`,
//! `/proc/meminfo`), applies the what-if flags and prints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use dreamloop::config::{Backend, DreamConfig, FieldError};
use dreamloop::label::Phase;
use dreamloop::model::{Model, ModelConfig};
use dreamloop::plan::{
    default_peak_flops, fixes, host_memory_bytes, parse_bytes, plan, Dtype, Plan, PlanSettings,
    ReferenceMode, Target,
};
use dreamloop::train::optim::{AdamWConfig, ApolloConfig, OptimizerConfig};

/// `dreamloop plan`.
#[derive(clap::Args)]
pub struct PlanArgs {
    /// The config file (default: config/dreamloop.toml when it exists, else built-in tiny defaults).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The model instead of the config's `[model] spec`: a preset, a .gguf file, or a
    /// directory (only its config.json is read).
    #[arg(long)]
    pub model: Option<String>,
    /// cpu or cuda instead of the config's `[model] backend` (what the plan is checked
    /// against: host memory, or a GPU's).
    #[arg(long, value_parser = parse_backend)]
    pub backend: Option<Backend>,
    /// Memory of the device (141GB, 24GiB, 512MB); default: `[model] device_memory`, else
    /// the host's memory on cpu and 141GB on cuda.
    #[arg(long)]
    pub device_memory: Option<String>,
    /// Tokens per sequence (default: `[train] max_seq_len`).
    #[arg(long)]
    pub seq_len: Option<usize>,
    /// Examples per step (default: `[train] batch_size`); a DPO pair is two sequences.
    #[arg(long)]
    pub batch: Option<usize>,
    /// sft, dpo or mixed (default: the config's phase).
    #[arg(long)]
    pub phase: Option<Phase>,
    /// f32 or bf16 weights, gradients and activations instead of the config's `[model] dtype`.
    #[arg(long, value_parser = parse_dtype)]
    pub dtype: Option<Dtype>,
    /// Per-layer recompute (keep only each layer's input) instead of the config's `[train]
    /// recompute`.
    #[arg(long)]
    pub recompute: bool,
    /// Tokens per chunk of the LM head (0: the whole [tokens × vocab]) instead of the config's
    /// `[train] logits_chunk`.
    #[arg(long)]
    pub logits_chunk: Option<usize>,
    /// The DPO reference resident or streamed instead of the config's `[model]
    /// stream_reference`.
    #[arg(long, value_parser = parse_reference)]
    pub reference: Option<ReferenceMode>,
    /// The optimizer instead of the config's: adamw, apollo (r = 256) or apollo-mini.
    #[arg(long, value_parser = ["adamw", "apollo", "apollo-mini"])]
    pub optimizer: Option<String>,
    /// More `[train] freeze` globs (repeatable), e.g. --freeze 'model.embed_tokens.*'.
    #[arg(long)]
    pub freeze: Vec<String>,
    /// Share of the peak FLOP/s a step reaches (default 0.40).
    #[arg(long)]
    pub mfu: Option<f64>,
    /// Peak TFLOP/s of the device (default on cuda: an H200's, 989 bf16 / 67 f32; on cpu
    /// none, so no step time).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

fn parse_dtype(s: &str) -> Result<Dtype, String> {
    match s {
        "f32" => Ok(Dtype::F32),
        "bf16" => Ok(Dtype::Bf16),
        _ => Err(format!("`{s}` is not f32 or bf16")),
    }
}

pub fn parse_backend(s: &str) -> Result<Backend, String> {
    match s {
        "cpu" => Ok(Backend::Cpu),
        "cuda" => Ok(Backend::Cuda),
        _ => Err(format!("`{s}` is not cpu or cuda")),
    }
}

fn parse_reference(s: &str) -> Result<ReferenceMode, String> {
    match s {
        "resident" => Ok(ReferenceMode::Resident),
        "streamed" => Ok(ReferenceMode::Streamed),
        _ => Err(format!("`{s}` is not resident or streamed")),
    }
}

/// The host's MemTotal, when `/proc/meminfo` can be read.
fn host_memory() -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .as_deref()
        .and_then(host_memory_bytes)
}

/// The memory of `target` when nothing names it: the host's on CPU (0 if unknown), one
/// H200 on CUDA.
pub fn default_device_bytes(target: Target) -> u64 {
    match target {
        Target::Cpu => host_memory().unwrap_or(0),
        Target::Cuda => dreamloop::plan::DEFAULT_CUDA_DEVICE_BYTES,
    }
}

/// The plan settings of `config`, with the host's memory filled in on CPU.
pub fn settings(config: &DreamConfig) -> PlanSettings {
    let mut s = PlanSettings::from_config(config);
    if s.device_bytes == 0 {
        s.device_bytes = host_memory().unwrap_or(0);
    }
    s
}

/// Why `config` cannot run on its device according to the plan, naming what would make it
/// fit; `None` when it fits, or when the model's config cannot be read here (loading the
/// model reports that later, as before).
pub fn problem(config: &DreamConfig) -> Option<FieldError> {
    if let Some(text) = &config.model.device_memory {
        // A bad size is already `validate`'s error; there is nothing to plan against.
        parse_bytes(text).ok()?;
    }
    let model = match Model::config_of(&config.model.spec) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, "No plan: the model's config could not be read.");
            return None;
        }
    };
    let s = settings(config);
    if s.device_bytes == 0 {
        return None;
    }
    let p = plan(&model, &s);
    if p.fits {
        return None;
    }
    let device = match &config.model.device_memory {
        Some(text) => format!("model.device_memory = \"{text}\""),
        None if s.target == Target::Cpu => "the host's MemTotal".into(),
        None => "one H200 by default".into(),
    };
    let options = fixes(&model, &s);
    let fitting: Vec<String> = options
        .iter()
        .filter(|f| f.fits)
        .map(|f| format!("{} ({})", f.setting, gb(f.total_bytes)))
        .collect();
    let advice = if fitting.is_empty() {
        "nothing dreamloop plan knows makes it fit; a smaller model or a larger device".into()
    } else {
        format!("it would fit with any of: {}", fitting.join("; "))
    };
    Some(FieldError {
        field: "model.device_memory".into(),
        reason: format!(
            "`dreamloop plan` says a step needs {} (peak at {}) but the device has {} ({device}); {advice}",
            gb(p.total_bytes),
            p.peak_at,
            gb(p.device_bytes),
        ),
    })
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

/// `dreamloop plan`.
pub fn run(args: PlanArgs) -> anyhow::Result<ExitCode> {
    let default = PathBuf::from("config/dreamloop.toml");
    let path = args
        .config
        .clone()
        .or_else(|| default.exists().then_some(default));
    let mut config = match &path {
        Some(p) => DreamConfig::load(p).map_err(anyhow::Error::new)?,
        None => DreamConfig::tiny(
            std::path::Path::new("scenarios"),
            std::path::Path::new("state"),
        ),
    };
    if let Some(backend) = args.backend {
        config.model.backend = backend;
    }
    let spec = args.model.clone().unwrap_or(config.model.spec.clone());
    let model = Model::config_of(&spec).with_context(|| format!("reading model `{spec}`"))?;
    let mut s = settings(&config);
    if let Some(text) = &args.device_memory {
        s.device_bytes = parse_bytes(text).with_context(|| "--device-memory")?;
    }
    if s.device_bytes == 0 {
        bail!("the host's memory could not be read from /proc/meminfo: give --device-memory");
    }
    if let Some(n) = args.seq_len {
        s.seq_len = n;
    }
    if let Some(n) = args.batch {
        s.batch = n;
    }
    if let Some(phase) = args.phase {
        s.phase = phase;
    }
    if let Some(dtype) = args.dtype {
        s.dtype = dtype;
        if s.target == Target::Cuda && args.peak_tflops.is_none() {
            s.peak_flops = Some(default_peak_flops(dtype));
        }
    }
    s.recompute |= args.recompute;
    if let Some(n) = args.logits_chunk {
        s.logits_chunk = n;
    }
    if let Some(r) = args.reference {
        s.reference = r;
    }
    match args.optimizer.as_deref() {
        Some("adamw") => s.optimizer = OptimizerConfig::Adamw(AdamWConfig::default()),
        Some("apollo") => s.optimizer = OptimizerConfig::Apollo(ApolloConfig::default()),
        Some("apollo-mini") => s.optimizer = OptimizerConfig::Apollo(ApolloConfig::mini()),
        _ => {}
    }
    s.freeze.extend(args.freeze.iter().cloned());
    if let Some(mfu) = args.mfu {
        if !(mfu > 0.0 && mfu <= 1.0) {
            bail!("--mfu: {mfu} is not in (0, 1]");
        }
        s.mfu = mfu;
    }
    if let Some(tflops) = args.peak_tflops {
        if !(tflops.is_finite() && tflops > 0.0) {
            bail!("--peak-tflops: {tflops} is not a positive number");
        }
        s.peak_flops = Some(tflops * 1e12);
    }
    let p = plan(&model, &s);
    if args.json {
        let mut v = serde_json::to_value(&p)?;
        v["model"] = spec.clone().into();
        v["target"] = serde_json::to_value(s.target)?;
        v["fixes"] = serde_json::to_value(fixes(&model, &s))?;
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_table(&spec, &model, &s, &p);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(spec: &str, model: &ModelConfig, s: &PlanSettings, p: &Plan) {
    let billions = |n: u64| format!("{:.2} B", n as f64 / 1e9);
    println!(
        "model: {spec} ({}, {} layers, {} parameters, {} trainable)",
        model.family.model_type(),
        model.num_hidden_layers,
        billions(p.parameters),
        billions(p.trainable_parameters)
    );
    println!("settings: {}\n", p.settings);
    println!("| item | GB | how |");
    println!("| --- | ---: | --- |");
    for item in &p.items {
        println!(
            "| {} | {:.2} | {} |",
            item.name,
            item.bytes as f64 / 1e9,
            item.how
        );
    }
    println!(
        "| **total** (peak at {}) | **{:.2}** | of {:.2} GB {}: **{}**, headroom {:.1} % |",
        p.peak_at,
        p.total_bytes as f64 / 1e9,
        p.device_bytes as f64 / 1e9,
        match s.target {
            Target::Cpu => "host memory (cpu)",
            Target::Cuda => "device memory (cuda)",
        },
        if p.fits { "fits" } else { "does not fit" },
        100.0 * p.headroom
    );
    print!(
        "\nFLOPs: {:.2e} per step ({} tokens), {:.2e} per token",
        p.flops_per_step, p.tokens_per_step, p.flops_per_token
    );
    match (p.step_seconds, p.peak_flops) {
        (Some(t), Some(peak)) => println!(
            "; step ≈ {t:.2} s at {:.0} % MFU of {:.0} TFLOP/s",
            100.0 * p.mfu,
            peak / 1e12
        ),
        _ => println!("; step time not estimated (give --peak-tflops)"),
    }
    if !p.fits {
        println!("\nWhat would make it fit:");
        for f in fixes(model, s) {
            println!(
                "- {}: {:.2} GB, {}",
                f.setting,
                f.total_bytes as f64 / 1e9,
                if f.fits { "fits" } else { "still too large" }
            );
        }
    }
}
