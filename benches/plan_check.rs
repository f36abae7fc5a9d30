//! Is `dreamloop plan` right? Three scaled-down hybrids shaped like the operator's
//! Qwen3.5-27B — layers as [GDN × 3, gated attention], 6 query heads per kv head, 3 GDN value
//! heads per key head, value width 1.5 × hidden, SwiGLU 3.4 × hidden, a 32k vocabulary,
//! untied — each trained for two SFT steps through the real `Trainer` in its own child
//! process; the child's peak RSS against `plan`'s prediction for the same settings
//! (`Target::Cpu`). `PLAN_CHECK_MODE=plain` (default: f32, no recompute, whole logits) or
//! `PLAN_CHECK_MODE=bf16` (bf16 weights, per-layer recompute, logits chunk 1024).
//!
//! Two steps, because from the second on the DPO reference that `Trainer::new` keeps is a
//! second copy of the weights (the first update replaces the policy's tensors), which is the
//! steady state the plan describes.
//!
//! Run: `cargo bench --profile dev --bench plan_check`; `PLAN_CHECK_ONLY=a,b` limits the
//! shapes.

use std::process::Command;
use std::time::Instant;

use burn::tensor::DType;
use dreamloop::label::Phase;
use dreamloop::model::config::ModelConfig;
use dreamloop::model::preset::SeededInit;
use dreamloop::model::weights::CastSource;
use dreamloop::model::{cpu, CausalLm};
use dreamloop::plan::{plan, Dtype, PlanSettings, ReferenceMode, Target};
use dreamloop::train::loss::DpoVariant;
use dreamloop::train::optim::{AdamWConfig, ApolloConfig, OptimizerConfig};
use dreamloop::train::schedule::LrSchedule;
use dreamloop::train::trainer::{Batch, SftItem, Trainer, TrainerConfig};

/// One scaled-down 27B: name, hidden, layers, attention heads, GDN key heads, tokens,
/// optimizer.
struct Shape {
    name: &'static str,
    hidden: usize,
    layers: usize,
    heads: usize,
    key_heads: usize,
    seq: usize,
    optimizer: &'static str,
}

const SHAPES: [Shape; 3] = [
    Shape {
        name: "a",
        hidden: 512,
        layers: 8,
        heads: 12,
        key_heads: 4,
        seq: 2048,
        optimizer: "adamw",
    },
    Shape {
        name: "b",
        hidden: 768,
        layers: 12,
        heads: 18,
        key_heads: 6,
        seq: 1024,
        optimizer: "apollo-mini",
    },
    Shape {
        name: "c",
        hidden: 1024,
        layers: 16,
        heads: 24,
        key_heads: 8,
        seq: 1024,
        optimizer: "apollo-mini",
    },
];

impl Shape {
    /// The `config.json` of this shape: head dim 64 throughout, the 27B's ratios.
    fn config(&self) -> ModelConfig {
        let inner = (self.hidden * 34 / 10).div_ceil(64) * 64;
        let raw = serde_json::json!({
            "model_type": "qwen3_5_text", "vocab_size": 32000, "hidden_size": self.hidden,
            "intermediate_size": inner, "num_hidden_layers": self.layers,
            "full_attention_interval": 4, "num_attention_heads": self.heads,
            "num_key_value_heads": self.heads / 6, "head_dim": 64,
            "linear_num_key_heads": self.key_heads, "linear_num_value_heads": 3 * self.key_heads,
            "linear_key_head_dim": 64, "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": false,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0,
                "partial_rotary_factor": 0.25},
            "max_position_embeddings": 262144
        });
        ModelConfig::from_json(raw, self.name).expect("a valid hybrid shape")
    }

    fn optimizer(&self) -> OptimizerConfig {
        match self.optimizer {
            "adamw" => OptimizerConfig::Adamw(AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            }),
            _ => OptimizerConfig::Apollo(ApolloConfig::mini()),
        }
    }

    fn settings(&self) -> PlanSettings {
        let light = light_mode();
        PlanSettings {
            dtype: if light { Dtype::Bf16 } else { Dtype::F32 },
            recompute: light,
            logits_chunk: if light { 1024 } else { 0 },
            phase: Phase::Sft,
            seq_len: self.seq,
            batch: 1,
            reference: ReferenceMode::Resident,
            reference_block: 0,
            optimizer: self.optimizer(),
            freeze: Vec::new(),
            train_only: Vec::new(),
            device_bytes: 24 << 30,
            target: Target::Cpu,
            peak_flops: None,
            mfu: 0.4,
        }
    }
}

/// `PLAN_CHECK_MODE=bf16`: bf16 + recompute + chunked head, else f32 / plain.
fn light_mode() -> bool {
    std::env::var("PLAN_CHECK_MODE").as_deref() == Ok("bf16")
}

fn peak_rss_bytes() -> u64 {
    rss_field("VmHWM:")
}

fn rss_field(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// xorshift token ids.
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

/// One shape, in this process: two SFT steps; prints one JSON line.
fn run_one(shape: &Shape) {
    let baseline = rss_field("VmRSS:");
    let cfg = shape.config();
    let device = cpu().autodiff();
    let mut init = SeededInit {
        seed: 0,
        std: 0.02,
        device: device.clone(),
        zero_centred_norms: cfg.norm_unit_offset,
    };
    let light = light_mode();
    let dtype = if light { DType::BF16 } else { DType::F32 };
    let model = CausalLm::load(
        &cfg,
        &mut CastSource {
            inner: &mut init,
            dtype,
        },
    )
    .expect("shape loads");
    let settings = TrainerConfig {
        optimizer: shape.optimizer(),
        schedule: LrSchedule::warmup_constant(1e-5, 0),
        max_grad_norm: 1.0,
        beta: 0.01,
        dpo_weight: 1.0,
        dpo_variant: DpoVariant::Sigmoid,
        freeze: Vec::new(),
        train_only: Vec::new(),
        pad_id: 0,
        max_seq_len: 0,
        recompute: light,
        logits_chunk: if light { 1024 } else { 0 },
    };
    let mut trainer = Trainer::new(cfg.clone(), model, None, settings).expect("trainer");
    let mut ids = Ids(0x2545F4914F6CDD1D);
    let mut seconds = Vec::new();
    for hash in 1..=2u64 {
        let batch = Batch {
            sft: vec![SftItem {
                prompt: ids.take(shape.seq / 2, cfg.vocab_size),
                completion: ids.take(shape.seq - shape.seq / 2, cfg.vocab_size),
                hash,
            }],
            dpo: Vec::new(),
        };
        let t0 = Instant::now();
        trainer.step(&batch).expect("step");
        seconds.push(t0.elapsed().as_secs_f64());
    }
    println!(
        "{}",
        serde_json::json!({
            "shape": shape.name, "baseline_rss_bytes": baseline,
            "peak_rss_bytes": peak_rss_bytes(), "step_s": seconds,
        })
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--one") {
        let shape = SHAPES
            .iter()
            .find(|s| s.name == args[i + 1])
            .expect("a known shape");
        run_one(shape);
        return;
    }
    let only = std::env::var("PLAN_CHECK_ONLY").ok();
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    println!(
        "two SFT steps, {}, batch 1, random weights; peak RSS of the child\n",
        if light_mode() {
            "bf16, recompute, logits chunk 1024"
        } else {
            "f32, no recompute"
        }
    );
    println!("| shape | parameters | tokens | optimizer | predicted peak (GB) | measured peak RSS (GB) | measured / predicted | peak at | baseline RSS (GB) | step 2 (s) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for shape in &SHAPES {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|x| x == shape.name))
        {
            continue;
        }
        let cfg = shape.config();
        let predicted = plan(&cfg, &shape.settings());
        let out = Command::new(&args[0])
            .args(["--one", shape.name])
            .output()
            .expect("child bench");
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(v) = text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        else {
            println!(
                "| {} | failed: {} |",
                shape.name,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            continue;
        };
        let measured = v["peak_rss_bytes"].as_f64().unwrap_or(0.0);
        let gb = |b: f64| b / 1e9;
        println!(
            "| {} (hidden {}, {} layers, {}/{} heads, GDN {}/{}) | {:.1} M | {} | {} | {:.2} | {:.2} | {:.3} | {} | {:.2} | {:.1} |",
            shape.name,
            shape.hidden,
            shape.layers,
            shape.heads,
            shape.heads / 6,
            shape.key_heads,
            3 * shape.key_heads,
            predicted.parameters as f64 / 1e6,
            shape.seq,
            shape.optimizer,
            gb(predicted.total_bytes as f64),
            gb(measured),
            measured / predicted.total_bytes as f64,
            predicted.peak_at,
            gb(v["baseline_rss_bytes"].as_f64().unwrap_or(0.0)),
            v["step_s"][1].as_f64().unwrap_or(f64::NAN),
        );
        for item in &predicted.items {
            eprintln!(
                "  {} {}: {:.3} GB — {}",
                shape.name,
                item.name,
                item.bytes as f64 / 1e9,
                item.how
            );
        }
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default()
}
