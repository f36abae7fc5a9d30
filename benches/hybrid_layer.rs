//! Gated DeltaNet against full attention, forward + backward on CPU (f32, batch 1):
//!
//! - **one layer**: a GDN layer (qwen3_5 layout, 4 key heads / 8 value heads of 64) against a
//!   gated full-attention layer (8 heads / 2 kv heads of 64, partial RoPE) of the same width
//!   (hidden 512), token mixer only, at 256, 1024 and 4096 tokens;
//! - **a small hybrid model**: hidden 512, 8 layers as [GDN, GDN, GDN, attention] × 2, dense
//!   SwiGLU 1408, vocab 8192 — against the same model with every layer full attention —
//!   forward + backward of the mean NLL at the same lengths, and one SFT step with APOLLO-Mini
//!   through the real `Trainer` at 1024 tokens.
//!
//! Each measurement runs in its own child process so that its peak RSS is its own; time is the
//! best of 2 after one warm-up. When `benches/.venv` exists (`benches/setup-torch.sh`), the
//! same two layers in transformers' Qwen3.5 (pure-torch fallbacks) are timed too
//! (`benches/torch_gdn_layer.py`; `HYBRID_BENCH_TORCH=0` skips them).
//! Run: `cargo bench --profile dev --bench hybrid_layer` (`HYBRID_BENCH_LENGTHS=256,1024`
//! limits the lengths).

use std::process::Command;
use std::time::Instant;

use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use dreamloop::model::config::ModelConfig;
use dreamloop::model::logprobs::{logprobs, ScoredSeq};
use dreamloop::model::preset::SeededInit;
use dreamloop::model::{cpu, CausalLm};
use dreamloop::train::loss::{sft_loss, DpoVariant};
use dreamloop::train::optim::{ApolloConfig, OptimizerConfig};
use dreamloop::train::schedule::LrSchedule;
use dreamloop::train::trainer::{Batch, SftItem, Trainer, TrainerConfig};

fn config(layers: &[&str], vocab: usize) -> ModelConfig {
    let raw = serde_json::json!({
        "model_type": "qwen3_5_text", "vocab_size": vocab, "hidden_size": 512,
        "intermediate_size": 1408, "num_hidden_layers": layers.len(), "layer_types": layers,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
        "linear_num_key_heads": 4, "linear_num_value_heads": 8, "linear_key_head_dim": 64,
        "linear_value_head_dim": 64, "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
        "tie_word_embeddings": false
    });
    ModelConfig::from_json(raw, "hybrid bench shape").expect("valid shape")
}

fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    pseudo_random(n, seed)
        .into_iter()
        .map(|x| ((x + 1.0) * 0.5 * (vocab - 1) as f32) as u32)
        .collect()
}

/// One measurement in this process; prints one JSON line.
fn run_one(what: &str, seq: usize) {
    let device = cpu().autodiff();
    let (layers, vocab): (Vec<&str>, usize) = match what {
        "gdn-layer" | "attention-layer" => (vec!["linear_attention", "full_attention"], 256),
        "hybrid-model" | "hybrid-apollo-mini-step" => (
            [
                "linear_attention",
                "linear_attention",
                "linear_attention",
                "full_attention",
            ]
            .repeat(2),
            8192,
        ),
        "attention-model" => (vec!["full_attention"; 8], 8192),
        other => panic!("unknown measurement {other}"),
    };
    let cfg = config(&layers, vocab);
    let mut init = SeededInit {
        seed: 0,
        std: 0.02,
        device: device.clone(),
        zero_centred_norms: cfg.norm_unit_offset,
    };
    let lm = CausalLm::load(&cfg, &mut init).expect("shape loads");
    let mut times = Vec::new();
    if what == "hybrid-apollo-mini-step" {
        let settings = TrainerConfig {
            optimizer: OptimizerConfig::Apollo(ApolloConfig::mini()),
            schedule: LrSchedule::warmup_constant(1e-5, 0),
            max_grad_norm: 1.0,
            beta: 0.01,
            dpo_weight: 1.0,
            dpo_variant: DpoVariant::Sigmoid,
            freeze: Vec::new(),
            train_only: Vec::new(),
            pad_id: 0,
            max_seq_len: 0,
            recompute: false,
            logits_chunk: 0,
        };
        let mut trainer = Trainer::new(cfg.clone(), lm, None, settings).expect("trainer");
        for step in 0..3u64 {
            let mut batch = Batch::default();
            batch.sft.push(SftItem {
                prompt: ids(seq / 2, vocab, 2 * step + 1),
                completion: ids(seq - seq / 2, vocab, 2 * step + 2),
                hash: step,
            });
            let t0 = Instant::now();
            trainer.step(&batch).expect("step");
            times.push(t0.elapsed().as_secs_f64());
        }
    } else {
        for round in 0..3u64 {
            let t0 = Instant::now();
            let loss = match what {
                "gdn-layer" | "attention-layer" => {
                    let x = Tensor::<3>::from_data(
                        TensorData::new(pseudo_random(seq * 512, round + 7), [1, seq, 512]),
                        &device,
                    )
                    .require_grad();
                    let layer = usize::from(what == "attention-layer");
                    lm.mixer_forward(layer, x).powi_scalar(2).mean()
                }
                _ => {
                    let seqs = vec![ScoredSeq {
                        ids: ids(seq, vocab, round + 3),
                        score_from: 1,
                    }];
                    sft_loss(&logprobs(&lm, &seqs, 0))
                }
            };
            let grads = GradientsParams::from_grads(loss.backward(), &lm);
            drop(grads);
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let best = times[1..].iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "{}",
        serde_json::json!({
            "what": what, "seq": seq, "seconds": best, "warmup_s": times[0],
            "peak_rss_bytes": peak_rss_bytes(),
        })
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--one") {
        run_one(&args[i + 1], args[i + 2].parse().expect("length"));
        return;
    }
    let lengths: Vec<usize> = std::env::var("HYBRID_BENCH_LENGTHS")
        .unwrap_or_else(|_| "256,1024,4096".into())
        .split(',')
        .map(|s| s.trim().parse().expect("HYBRID_BENCH_LENGTHS=256,1024,..."))
        .collect();
    println!(
        "machine: {} cores; f32 CPU (burn flex), batch 1, best of 2 after a warm-up\n",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| measurement | tokens | fwd+bwd (s) | s per 1k tokens | peak RSS (GiB) |");
    println!("| --- | --- | --- | --- | --- |");
    let mut runs: Vec<(&str, usize)> = Vec::new();
    for what in [
        "gdn-layer",
        "attention-layer",
        "hybrid-model",
        "attention-model",
    ] {
        for &seq in &lengths {
            runs.push((what, seq));
        }
    }
    runs.push(("hybrid-apollo-mini-step", 1024));
    for (what, seq) in runs {
        let out = Command::new(&args[0])
            .args(["--one", what, &seq.to_string()])
            .output()
            .expect("child bench");
        let text = String::from_utf8_lossy(&out.stdout);
        match text
            .lines()
            .last()
            .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            Some(v) => {
                let s = v["seconds"].as_f64().unwrap_or(f64::NAN);
                println!(
                    "| {what} | {seq} | {s:.3} | {:.3} | {:.2} |",
                    s * 1000.0 / seq as f64,
                    v["peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64
                );
            }
            None => println!(
                "| {what} | {seq} | failed: {} | | |",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
        }
    }
    torch_rows(&lengths);
}

/// The same two layers in PyTorch (transformers' Qwen3.5 modules), when the bench venv exists.
fn torch_rows(lengths: &[usize]) {
    let venv = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/.venv/bin/python");
    if std::env::var("HYBRID_BENCH_TORCH").as_deref() == Ok("0")
        || !std::path::Path::new(venv).exists()
    {
        println!(
            "\nPyTorch comparison skipped (run benches/setup-torch.sh, unset HYBRID_BENCH_TORCH=0)"
        );
        return;
    }
    let list: Vec<String> = lengths.iter().map(usize::to_string).collect();
    let out = Command::new(venv)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/torch_gdn_layer.py"
        ))
        .arg(list.join(","))
        .output()
        .expect("running the PyTorch comparison");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let seq = v["seq"].as_u64().unwrap_or(0) as usize;
        let s = v["seconds"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} {}-layer | {seq} | {s:.3} | {:.3} | – |",
            v["impl"].as_str().unwrap_or("torch"),
            v["what"].as_str().unwrap_or("?"),
            s * 1000.0 / seq.max(1) as f64
        );
    }
    if !out.status.success() {
        println!(
            "PyTorch comparison failed: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        );
    }
}
