//! Training-step cost on a SmolLM2-135M-shaped llama (hidden 576, 30 layers, 9 heads, 3 kv
//! heads, head dim 64, intermediate 1536, vocab 49152, tied) at batch 4 × 256 tokens, f32, CPU:
//!
//! - forward+backward tokens/s and one SFT step (forward + backward + AdamW) — and, when
//!   `benches/.venv` exists (`benches/setup-torch.sh`), the same SFT step in PyTorch eager in the
//!   same run for comparison;
//! - step time and peak RSS of SFT and DPO steps through the real `Trainer` with AdamW,
//!   APOLLO (r = 128) and APOLLO-Mini, and each optimizer's state bytes;
//! - the memory settings, as `+` suffixes of a configuration: `+recompute` (`[train]
//!   recompute`: per-layer recompute), `+chunk` (`[train] logits_chunk = 1024`), `+balanced`
//!   (burn's own `Device::autodiff().gradient_checkpointing()`, for comparison), `+stream`
//!   (`[model] stream_reference`: the DPO reference read from files layer by layer).
//!
//! Every configuration runs in its own child process so that peak RSS is its own.
//! Run: `cargo bench --profile dev --bench model_step` (the dev profile builds dependencies at
//! opt-level 3; plain `cargo bench` would rebuild burn in release mode).
//! `MODEL_STEP_SHAPE=batch,seq,steps` (default `4,256,1`); `MODEL_STEP_ONLY=sft-adamw,...`
//! limits the configurations; `MODEL_STEP_TORCH=0` skips PyTorch.

use std::process::Command;
use std::time::Instant;

use burn::module::Module;
use burn::optim::GradientsParams;
use dreamloop::model::config::ModelConfig;
use dreamloop::model::logprobs::{logprobs, ScoredSeq};
use dreamloop::model::preset::SeededInit;
use dreamloop::model::{cpu, CausalLm};
use dreamloop::train::loss::{sft_loss, DpoVariant};
use dreamloop::train::optim::{AdamWConfig, ApolloConfig, OptimizerConfig};
use dreamloop::train::reference::StreamedReference;
use dreamloop::train::schedule::LrSchedule;
use dreamloop::train::trainer::{Batch, DpoItem, SftItem, Trainer, TrainerConfig};

const CONFIGS: [&str; 14] = [
    "fwd-bwd",
    "sft-adamw",
    "sft-apollo",
    "sft-apollo-mini",
    "dpo-adamw",
    "dpo-apollo",
    "dpo-apollo-mini",
    "sft-adamw+balanced",
    "sft-adamw+recompute",
    "sft-adamw+chunk",
    "sft-adamw+recompute+chunk",
    "dpo-apollo-mini+recompute+chunk",
    "dpo-apollo-mini+stream",
    "dpo-apollo-mini+recompute+chunk+stream",
];

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn smollm2_shape() -> ModelConfig {
    let raw = serde_json::json!({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true,
        "max_position_embeddings": 8192
    });
    ModelConfig::from_json(raw, "smollm2-135m shape").expect("valid shape")
}

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

fn shape() -> (usize, usize, usize) {
    let v: Vec<usize> = std::env::var("MODEL_STEP_SHAPE")
        .unwrap_or_else(|_| "4,256,1".into())
        .split(',')
        .map(|s| s.trim().parse().expect("MODEL_STEP_SHAPE=batch,seq,steps"))
        .collect();
    (v[0], v[1], v[2])
}

/// One configuration, in this process; prints one JSON line.
fn run_one(name: &str) {
    let (batch, seq, steps) = shape();
    let cfg = smollm2_shape();
    let mut parts = name.split('+');
    let base = parts.next().expect("a configuration name");
    let memory: Vec<&str> = parts.collect();
    let device = if memory.contains(&"balanced") {
        cpu().autodiff().gradient_checkpointing()
    } else {
        cpu().autodiff()
    };
    let mut init = SeededInit {
        seed: 0,
        std: 0.02,
        device: device.clone(),
        zero_centred_norms: cfg.norm_unit_offset,
    };
    let model = CausalLm::load(&cfg, &mut init).expect("shape loads");
    let mut ids = Ids(0x2545F4914F6CDD1D);
    let mut times = Vec::new();
    let mut extra = serde_json::Map::new();
    if base == "fwd-bwd" {
        let seqs: Vec<ScoredSeq> = (0..batch)
            .map(|_| ScoredSeq {
                ids: ids.take(seq, cfg.vocab_size),
                score_from: 1,
            })
            .collect();
        for _ in 0..=steps {
            let t0 = Instant::now();
            let loss = sft_loss(&logprobs(&model, &seqs, 0));
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            drop(grads);
            times.push(t0.elapsed().as_secs_f64());
        }
    } else {
        let (loss, optim) = base.split_once('-').expect("loss-optimizer");
        let optimizer = match optim {
            "adamw" => OptimizerConfig::Adamw(AdamWConfig {
                weight_decay: 0.0,
                ..AdamWConfig::default()
            }),
            "apollo" => OptimizerConfig::Apollo(ApolloConfig {
                scale: 32.0,
                ..ApolloConfig::apollo(128)
            }),
            _ => OptimizerConfig::Apollo(ApolloConfig::mini()),
        };
        let settings = TrainerConfig {
            optimizer,
            schedule: LrSchedule::warmup_constant(1e-5, 0),
            max_grad_norm: 1.0,
            beta: 0.01,
            dpo_weight: 1.0,
            dpo_variant: DpoVariant::Sigmoid,
            freeze: Vec::new(),
            train_only: Vec::new(),
            pad_id: 0,
            max_seq_len: 0,
            recompute: memory.contains(&"recompute"),
            logits_chunk: if memory.contains(&"chunk") { 1024 } else { 0 },
        };
        // `+stream`: the reference read from files layer by layer (the starting weights
        // saved to a temporary directory first), not a resident copy.
        let reference_dir = memory.contains(&"stream").then(|| {
            let dir = tempfile::tempdir().expect("a temporary directory");
            let frozen = model.valid();
            dreamloop::model::save_dir(dir.path(), &cfg, &frozen, &Default::default(), None, &[])
                .expect("saving the reference");
            dir
        });
        let mut trainer = Trainer::new(cfg.clone(), model, None, settings).expect("trainer");
        if let Some(dir) = &reference_dir {
            let streamed =
                StreamedReference::open(dir.path(), &cpu()).expect("the saved reference");
            trainer = trainer.with_streamed_reference(streamed);
        }
        let mut hash = 0u64;
        for _ in 0..=steps {
            let mut b = Batch::default();
            for _ in 0..batch {
                hash += 1;
                let prompt = ids.take(seq / 2, cfg.vocab_size);
                if loss == "sft" {
                    b.sft.push(SftItem {
                        prompt,
                        completion: ids.take(seq - seq / 2, cfg.vocab_size),
                        hash,
                    });
                } else {
                    b.dpo.push(DpoItem {
                        prompt,
                        chosen: ids.take(seq - seq / 2, cfg.vocab_size),
                        rejected: ids.take(seq - seq / 2, cfg.vocab_size),
                        hash,
                        reference: None,
                    });
                }
            }
            let t0 = Instant::now();
            trainer.step(&b).expect("step");
            times.push(t0.elapsed().as_secs_f64());
        }
        let bytes = trainer.optimizer().state_bytes();
        extra.insert("optimizer_state_bytes".into(), bytes.total().into());
        extra.insert("projected_state_bytes".into(), bytes.projected().into());
        extra.insert(
            "projected_adamw_equivalent_bytes".into(),
            bytes.projected_adamw().into(),
        );
    }
    let measured = &times[1..];
    let best = measured.iter().cloned().fold(f64::INFINITY, f64::min);
    let mut out = serde_json::json!({
        "config": name, "batch": batch, "seq": seq, "warmup_s": times[0], "step_s": best,
        "tokens_per_s": (batch * seq) as f64 / best, "peak_rss_bytes": peak_rss_bytes(),
    });
    out.as_object_mut().expect("object").extend(extra);
    println!("{out}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--one") {
        run_one(&args[i + 1]);
        return;
    }
    let (batch, seq, steps) = shape();
    let only = std::env::var("MODEL_STEP_ONLY").ok();
    let gib = |b: f64| b / (1u64 << 30) as f64;
    println!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model()
    );
    println!("model: SmolLM2-135M shape, f32, batch {batch} x {seq} tokens, best of {steps} step(s) after one warm-up\n");
    println!("| configuration | step (s) | tokens/s | peak RSS (GiB) | optimizer state (MiB) | projected state / AdamW's |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut sft_adamw = None;
    for name in CONFIGS {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|x| x == name))
        {
            continue;
        }
        let out = Command::new(&args[0])
            .args(["--one", name])
            .output()
            .expect("child bench");
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(v) = text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        else {
            println!(
                "| {name} | failed: {} |",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            continue;
        };
        let step = v["step_s"].as_f64().unwrap_or(f64::NAN);
        if name == "sft-adamw" {
            sft_adamw = Some(step);
        }
        let state = v["optimizer_state_bytes"]
            .as_f64()
            .map_or("–".into(), |b| format!("{:.1}", b / (1u64 << 20) as f64));
        let share = match (
            v["projected_state_bytes"].as_f64(),
            v["projected_adamw_equivalent_bytes"].as_f64(),
        ) {
            (Some(p), Some(a)) if a > 0.0 => format!("{:.3}%", 100.0 * p / a),
            _ => "–".into(),
        };
        println!(
            "| {name} | {step:.2} | {:.1} | {:.2} | {state} | {share} |",
            v["tokens_per_s"].as_f64().unwrap_or(0.0),
            gib(v["peak_rss_bytes"].as_f64().unwrap_or(0.0))
        );
    }
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/.venv/bin/python");
    if std::env::var("MODEL_STEP_TORCH").as_deref() == Ok("0")
        || !std::path::Path::new(venv).exists()
    {
        println!(
            "\nPyTorch comparison skipped (run benches/setup-torch.sh, unset MODEL_STEP_TORCH=0)"
        );
        return;
    }
    let out = Command::new(venv)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/torch_sft_step.py"
        ))
        .args([batch.to_string(), seq.to_string(), steps.max(1).to_string()])
        .output()
        .expect("running the PyTorch comparison");
    let text = String::from_utf8_lossy(&out.stdout);
    match text
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
    {
        Some(v) => {
            let torch = v["sft_step_s"].as_f64().unwrap_or(f64::NAN);
            println!(
                "| torch sft-adamw ({}) | {torch:.2} | {:.1} | {:.2} | – | – |",
                v["impl"].as_str().unwrap_or("torch"),
                (batch * seq) as f64 / torch,
                gib(v["peak_rss_bytes"].as_f64().unwrap_or(0.0))
            );
            if let Some(ours) = sft_adamw {
                println!(
                    "\nratio, SFT step with AdamW (dreamloop / PyTorch): {:.2}",
                    ours / torch
                );
            }
        }
        None => println!(
            "PyTorch comparison failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
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
