//! Forward+backward throughput and one SFT step (forward + backward + AdamW) of a
//! SmolLM2-135M-shaped llama (hidden 576, 30 layers, 9 heads, 3 kv heads, head dim 64,
//! intermediate 1536, vocab 49152, tied) at batch 4 × 256, f32, CPU — and, when
//! `benches/.venv` exists (`benches/setup-torch.sh`), the same SFT step in PyTorch eager in
//! the same run for comparison.
//!
//! Run: `cargo bench --profile dev --bench model_step` (the dev profile builds dependencies at
//! opt-level 3; `cargo bench` alone would rebuild burn in release mode).
//! Optional: `MODEL_STEP_SHAPE=batch,seq,steps` (default `4,256,2`).

use std::process::Command;
use std::time::Instant;

use dreamloop::model::config::ModelConfig;
use dreamloop::model::logprobs::{logprobs, ScoredSeq};
use dreamloop::model::preset::SeededInit;
use dreamloop::model::{cpu, CausalLm};
use dreamloop::train::loss::sft_loss;
use dreamloop::train::optim::{AdamWConfig, ModelOptimizer, OptimizerConfig};
use burn::optim::GradientsParams;

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

fn main() {
    let shape: Vec<usize> = std::env::var("MODEL_STEP_SHAPE")
        .unwrap_or_else(|_| "4,256,2".into())
        .split(',')
        .map(|s| s.trim().parse().expect("MODEL_STEP_SHAPE=batch,seq,steps"))
        .collect();
    let (batch, seq, steps) = (shape[0], shape[1], shape[2]);
    let cfg = smollm2_shape();
    let device = cpu().autodiff();
    let mut init = SeededInit { seed: 0, std: 0.02, device: device.clone() };
    let mut model = CausalLm::load(&cfg, &mut init).expect("shape loads");
    let params = burn::module::Module::num_params(&model);
    let mut optim = ModelOptimizer::new(OptimizerConfig::Adamw(AdamWConfig { weight_decay: 0.0, ..AdamWConfig::default() }))
        .expect("valid AdamW");
    let mut rng = 0x2545F4914F6CDD1Du64;
    let seqs: Vec<ScoredSeq> = (0..batch)
        .map(|_| ScoredSeq {
            ids: (0..seq)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    (rng % cfg.vocab_size as u64) as u32
                })
                .collect(),
            score_from: 1,
        })
        .collect();

    let mut fwd_bwd = Vec::new();
    let mut full = Vec::new();
    for i in 0..=steps {
        let t0 = Instant::now();
        let loss = sft_loss(&logprobs(&model, &seqs, 0));
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let t1 = Instant::now();
        model = optim.step(1e-5, model, grads).expect("AdamW step");
        // Force the update to finish before stopping the clock (a sync point).
        let _ = model.model.norm.weight.val().into_data();
        let t2 = Instant::now();
        if i > 0 {
            fwd_bwd.push((t1 - t0).as_secs_f64());
            full.push((t2 - t0).as_secs_f64());
        }
        eprintln!("step {i}: fwd+bwd {:.2}s, sft step {:.2}s{}", (t1 - t0).as_secs_f64(), (t2 - t0).as_secs_f64(), if i == 0 { " (warm-up)" } else { "" });
    }
    let best = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    let tokens = (batch * seq) as f64;
    println!("machine: {} cores, {}", std::thread::available_parallelism().map_or(0, |n| n.get()), cpu_model());
    println!("model: SmolLM2-135M shape, {params} parameters, f32, batch {batch} x {seq}");
    println!("dreamloop (burn flex): fwd+bwd {:.2} s ({:.1} tokens/s); SFT step with AdamW {:.2} s ({:.1} tokens/s); peak RSS {:.2} GiB",
        best(&fwd_bwd), tokens / best(&fwd_bwd), best(&full), tokens / best(&full), peak_rss_bytes() as f64 / (1u64 << 30) as f64);

    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/.venv/bin/python");
    if std::path::Path::new(venv).exists() {
        let out = Command::new(venv)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/benches/torch_sft_step.py"))
            .args([batch.to_string(), seq.to_string(), steps.to_string()])
            .output()
            .expect("running the PyTorch comparison");
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().last().and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok()) {
            Some(v) => {
                let torch_step = v["sft_step_s"].as_f64().unwrap_or(f64::NAN);
                println!("{}: fwd+bwd {:.2} s; SFT step with AdamW {:.2} s ({:.1} tokens/s); peak RSS {:.2} GiB",
                    v["impl"].as_str().unwrap_or("torch"), v["fwd_bwd_s"].as_f64().unwrap_or(f64::NAN), torch_step,
                    tokens / torch_step, v["peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64);
                println!("ratio (dreamloop step time / torch step time): {:.2}", best(&full) / torch_step);
            }
            None => println!("PyTorch comparison failed: {}", String::from_utf8_lossy(&out.stderr)),
        }
    } else {
        println!("PyTorch comparison skipped: run benches/setup-torch.sh first");
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string()))
        .unwrap_or_default()
}
