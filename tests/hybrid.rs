//! The hybrid Gated-DeltaNet decoders (qwen3_next, qwen3_5) against transformers.
//!
//! - `tests/fixtures/models/{qwen3_next, qwen3_next_moe, qwen3_5}`: the shared golden fixtures
//!   (every case, including `seq80`, which crosses the 64-position chunk boundary).
//! - `tests/fixtures/hybrid_unseen/*`: models of other shapes made by
//!   `scripts/gen-hybrid-reference.py` (other head counts and ratios, conv kernel 3, partial
//!   RoPE 0.5, `full_attention_interval` instead of `layer_types`, top-2-of-3 MoE without
//!   renormalisation beside dense layers, and a multimodal qwen3_5 checkpoint), and an odd
//!   partial rotary width (`scripts/gen-odd-rotary-reference.py`).
//! - The chunked delta rule against the recurrent one (values and gradients), and the
//!   recurrent one's gradient against finite differences.
//!
//! Tolerances: the fixtures README's for hybrid models (log-probs/logits 3e-4, loss 5e-5);
//! `qwen3_next_r3`'s own float32-vs-float64 spread is 4.3e-5 in log-probs (README of
//! `hybrid_unseen`), so it gets 5e-4.

mod model_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor, TensorData};
use dreamloop::model::gdn::{chunked_delta_rule, recurrent_delta_rule};
use dreamloop::model::logprobs::logprobs;
use dreamloop::model::{cpu, Device, Model};
use model_common::{
    check_cached_decoding, check_case, floats, ids_of, logits_of, max_abs_diff, scored,
};
use serde_json::Value;

const ATOL: f32 = 3e-4;
const LOSS_ATOL: f64 = 5e-5;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A shared fixture model and its `reference.json`.
fn load_shared(name: &str) -> (Model, Value) {
    let dir = root().join("models").join(name);
    let model = Model::load(&dir, &cpu()).unwrap();
    (model, read_json(&dir.join("reference.json")))
}

/// Logits, log-probs and loss of every case of a shared fixture.
fn check_shared(name: &str) {
    let (model, reference) = load_shared(name);
    let cases = reference["cases"].as_object().unwrap();
    assert!(
        cases.contains_key("seq80"),
        "{name}: the chunk-crossing case"
    );
    for (case_name, case) in cases {
        check_case(
            &model,
            &format!("{name}/{case_name}"),
            case,
            ATOL,
            ATOL,
            LOSS_ATOL,
        );
    }
}

#[test]
fn qwen3_next_matches_transformers() {
    check_shared("qwen3_next");
}

#[test]
fn qwen3_next_moe_matches_transformers() {
    check_shared("qwen3_next_moe");
}

#[test]
fn qwen3_5_matches_transformers() {
    check_shared("qwen3_5");
}

/// Final hidden states of `seq7` (after the last norm) against transformers'
/// `debug_hidden_states_seq7`, and which layers report attention probabilities.
#[test]
fn hybrid_hidden_states_match_per_layer() {
    use dreamloop::model::llama::Capture;
    for name in ["qwen3_next", "qwen3_5"] {
        let (model, reference) = load_shared(name);
        let want = floats(&reference["debug_hidden_states_seq7"]["values"]);
        let ids = ids_of(&reference["cases"]["seq7"]);
        let lm = model.frozen();
        let input = Tensor::<2, Int>::from_data(
            TensorData::new(ids[0].iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, 7]),
            &lm.device(),
        );
        let mut capture = Capture::default();
        let last = lm
            .hidden_states(input, None, Some(&mut capture))
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let n = last.len();
        let diff = max_abs_diff(&last, &want[want.len() - n..]);
        assert!(diff <= ATOL, "{name}: final hidden states differ by {diff}");
        // Only the full-attention layer (index 3) has attention probabilities.
        assert_eq!(capture.attention_layers, vec![3], "{name}");
    }
}

/// Right-padded batches of different lengths give each sequence's own reference logits (GDN
/// layers see zeroed inputs at padded positions, which only follow the real ones).
#[test]
fn hybrid_right_padded_batch_matches_references() {
    for name in ["qwen3_next_moe", "qwen3_5"] {
        let (model, reference) = load_shared(name);
        let names = ["seq7", "seq80", "seq33"];
        let rows: Vec<Vec<u32>> = names
            .iter()
            .map(|c| ids_of(&reference["cases"][*c]).remove(0))
            .collect();
        let width = rows.iter().map(Vec::len).max().unwrap();
        let mask: Vec<Vec<u8>> = rows
            .iter()
            .map(|r| {
                let mut m = vec![1u8; r.len()];
                m.resize(width, 0);
                m
            })
            .collect();
        let logits = logits_of(&model, &rows, Some(&mask));
        let vocab = model.config.vocab_size;
        for (b, case) in names.iter().enumerate() {
            let want = floats(&reference["cases"][*case]["logits"]);
            let got = &logits[b * width * vocab..(b * width + rows[b].len()) * vocab];
            let diff = max_abs_diff(got, &want);
            assert!(diff <= ATOL, "{name}: padded row {case} differs by {diff}");
        }
    }
}

/// Decoding with conv + recurrent state (GDN layers) and a KV cache (attention layers): a
/// 70-token prefill (chunked, crossing a chunk boundary) then single tokens (recurrent).
#[test]
fn hybrid_cached_decoding_matches_full_sequence_logits() {
    for name in ["qwen3_next", "qwen3_next_moe", "qwen3_5"] {
        let (model, reference) = load_shared(name);
        let case = &reference["cases"]["seq80"];
        check_cached_decoding(&model, name, case, &[70, 1, 1, 1, 1, 1, 1, 1], ATOL);
    }
}

/// Deterministic pseudo-random values in [lo, hi).
fn uniform(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            lo + (hi - lo) * ((state >> 40) as f32 / (1u64 << 24) as f32)
        })
        .collect()
}

struct RuleInputs {
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    g: Tensor<3>,
    beta: Tensor<3>,
    initial: Tensor<4>,
}

/// Inputs shaped as the layer makes them: unit-norm keys and queries (q scaled by dk^-½),
/// `g ≤ 0` with some strong decays, `β ∈ (0, 1)`.
fn rule_inputs(
    b: usize,
    h: usize,
    t: usize,
    dk: usize,
    dv: usize,
    seed: u64,
    device: &Device,
) -> RuleInputs {
    let unit = |seed: u64, scale: f32| -> Tensor<4> {
        let raw = uniform(b * h * t * dk, seed, -1.0, 1.0);
        let mut out = Vec::with_capacity(raw.len());
        for row in raw.chunks(dk) {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            out.extend(row.iter().map(|x| x / norm * scale));
        }
        Tensor::from_data(TensorData::new(out, [b, h, t, dk]), device)
    };
    let g: Vec<f32> = uniform(b * h * t, seed + 3, 0.0, 1.0)
        .into_iter()
        .map(|u| -(u * u * 3.0))
        .collect();
    RuleInputs {
        q: unit(seed, (dk as f32).powf(-0.5)),
        k: unit(seed + 1, 1.0),
        v: Tensor::from_data(
            TensorData::new(uniform(b * h * t * dv, seed + 2, -2.0, 2.0), [b, h, t, dv]),
            device,
        ),
        g: Tensor::from_data(TensorData::new(g, [b, h, t]), device),
        beta: Tensor::from_data(
            TensorData::new(uniform(b * h * t, seed + 4, 0.05, 0.95), [b, h, t]),
            device,
        ),
        initial: Tensor::from_data(
            TensorData::new(
                uniform(b * h * dk * dv, seed + 5, -0.5, 0.5),
                [b, h, dk, dv],
            ),
            device,
        ),
    }
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

/// Chunked and recurrent forms agree to 1e-5 (outputs and final state) at lengths that are
/// not multiples of the chunk, with and without an initial state, at chunk 64 and 16.
#[test]
fn chunked_and_recurrent_delta_rules_agree() {
    let device = cpu();
    for (t, chunk) in [
        (1, 64),
        (37, 64),
        (64, 64),
        (65, 64),
        (150, 64),
        (150, 16),
        (23, 16),
    ] {
        let x = rule_inputs(2, 3, t, 16, 8, t as u64 * 7 + chunk as u64, &device);
        for initial in [None, Some(x.initial.clone())] {
            let (o_c, s_c) = chunked_delta_rule(
                x.q.clone(),
                x.k.clone(),
                x.v.clone(),
                x.g.clone(),
                x.beta.clone(),
                initial.clone(),
                chunk,
            );
            let (o_r, s_r) = recurrent_delta_rule(
                x.q.clone(),
                x.k.clone(),
                x.v.clone(),
                x.g.clone(),
                x.beta.clone(),
                initial.clone(),
            );
            let d_out = max_abs_diff(&host(o_c), &host(o_r));
            let d_state = max_abs_diff(&host(s_c), &host(s_r));
            assert!(
                d_out <= 1e-5 && d_state <= 1e-5,
                "T={t} chunk={chunk} initial={}: outputs differ by {d_out}, states by {d_state}",
                initial.is_some()
            );
        }
    }
}

/// Gradients through the chunked form (burn autodiff) equal those through the recurrent
/// form for every input, and the recurrent form's gradient matches central finite
/// differences at a few elements.
#[test]
fn chunked_delta_rule_gradients_match_recurrent_and_finite_differences() {
    let device = cpu().autodiff();
    let (b, h, t, dk, dv) = (1, 2, 83, 8, 4);
    let weights = Tensor::<4>::from_data(
        TensorData::new(uniform(b * h * t * dv, 99, -1.0, 1.0), [b, h, t, dv]),
        &device,
    );
    let state_weights = Tensor::<4>::from_data(
        TensorData::new(uniform(b * h * dk * dv, 98, -1.0, 1.0), [b, h, dk, dv]),
        &device,
    );
    let run = |chunked: bool| -> Vec<Vec<f32>> {
        let x = rule_inputs(b, h, t, dk, dv, 5, &device);
        let (q, k, v, g, beta, s0) = (
            x.q.require_grad(),
            x.k.require_grad(),
            x.v.require_grad(),
            x.g.require_grad(),
            x.beta.require_grad(),
            x.initial.require_grad(),
        );
        let (o, s) = if chunked {
            chunked_delta_rule(
                q.clone(),
                k.clone(),
                v.clone(),
                g.clone(),
                beta.clone(),
                Some(s0.clone()),
                16,
            )
        } else {
            recurrent_delta_rule(
                q.clone(),
                k.clone(),
                v.clone(),
                g.clone(),
                beta.clone(),
                Some(s0.clone()),
            )
        };
        let loss = (o * weights.clone()).sum() + (s * state_weights.clone()).sum();
        let grads = loss.backward();
        vec![
            host(q.grad(&grads).unwrap()),
            host(k.grad(&grads).unwrap()),
            host(v.grad(&grads).unwrap()),
            host(g.grad(&grads).unwrap()),
            host(beta.grad(&grads).unwrap()),
            host(s0.grad(&grads).unwrap()),
        ]
    };
    let chunked = run(true);
    let recurrent = run(false);
    for (i, name) in ["q", "k", "v", "g", "beta", "initial"].iter().enumerate() {
        let scale = recurrent[i].iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let diff = max_abs_diff(&chunked[i], &recurrent[i]);
        assert!(
            diff <= 1e-5 * scale.max(1.0),
            "d/d{name}: chunked and recurrent gradients differ by {diff} (scale {scale})"
        );
    }

    // Finite differences of the recurrent form in f32: a coarse but independent check.
    let plain = cpu();
    let loss_at = |which: usize, index: usize, delta: f32| -> f64 {
        let x = rule_inputs(b, h, t, dk, dv, 5, &plain);
        let mut parts = vec![host(x.q), host(x.k), host(x.v), host(x.g), host(x.beta)];
        parts[which][index] += delta;
        let t4 = |v: Vec<f32>, d: usize| {
            Tensor::<4>::from_data(TensorData::new(v, [b, h, t, d]), &plain)
        };
        let t3 = |v: Vec<f32>| Tensor::<3>::from_data(TensorData::new(v, [b, h, t]), &plain);
        let beta = t3(parts.pop().unwrap());
        let g = t3(parts.pop().unwrap());
        let v = t4(parts.pop().unwrap(), dv);
        let k = t4(parts.pop().unwrap(), dk);
        let q = t4(parts.pop().unwrap(), dk);
        let (o, s) = recurrent_delta_rule(q, k, v, g, beta, Some(x.initial));
        let w = host(weights.clone().inner());
        let sw = host(state_weights.clone().inner());
        let o = host(o);
        let s = host(s);
        o.iter()
            .zip(&w)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum::<f64>()
            + s.iter()
                .zip(&sw)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum::<f64>()
    };
    for (which, index) in [
        (0, 17),
        (1, 100),
        (2, 33),
        (3, 50),
        (3, 160),
        (4, 7),
        (4, 120),
    ] {
        let eps = 1e-2;
        let numeric =
            (loss_at(which, index, eps) - loss_at(which, index, -eps)) / (2.0 * eps as f64);
        let analytic = recurrent[which][index] as f64;
        assert!(
            (numeric - analytic).abs() <= 2e-3 * analytic.abs().max(1.0),
            "input {which}[{index}]: autodiff {analytic} vs finite difference {numeric}"
        );
    }
}

fn key_set(path: &Path) -> BTreeMap<String, (String, Vec<usize>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| (name, (format!("{:?}", view.dtype()), view.shape().to_vec())))
        .collect()
}

/// load → save → load, both projection layouts, MoE, and the multimodal checkpoint (whose
/// bf16 vision tower and `mtp.*` head are carried through byte for byte): identical keys,
/// shapes, dtypes and config, identical logits, and every carried tensor's bytes unchanged.
#[test]
fn hybrid_save_round_trip_is_exact() {
    let dirs = [
        root().join("models/qwen3_next"),
        root().join("models/qwen3_next_moe"),
        root().join("models/qwen3_5"),
        root().join("hybrid_unseen/qwen3_next_r3"),
        root().join("hybrid_unseen/qwen3_5_vl"),
    ];
    for dir in dirs {
        let model = Model::load(&dir, &cpu()).unwrap();
        let out = tempfile::tempdir().unwrap();
        model.save(out.path()).unwrap();
        let shown = dir.display();
        assert_eq!(
            key_set(&dir.join("model.safetensors")),
            key_set(&out.path().join("model.safetensors")),
            "{shown}: saved key set/shapes/dtypes differ"
        );
        assert_eq!(
            read_json(&dir.join("config.json")),
            read_json(&out.path().join("config.json")),
            "{shown}: config.json changed"
        );
        let original = std::fs::read(dir.join("model.safetensors")).unwrap();
        let saved = std::fs::read(out.path().join("model.safetensors")).unwrap();
        let original = safetensors::SafeTensors::deserialize(&original).unwrap();
        let saved = safetensors::SafeTensors::deserialize(&saved).unwrap();
        for (name, view) in original.tensors() {
            assert_eq!(
                view.data(),
                saved.tensor(&name).unwrap().data(),
                "{shown}: tensor {name} changed"
            );
        }
        let reloaded = Model::load(out.path(), &cpu()).unwrap();
        let rows = vec![(3..40)
            .map(|i| (i * 7 % 250) as u32 + 3)
            .collect::<Vec<_>>()];
        assert_eq!(
            logits_of(&model, &rows, None),
            logits_of(&reloaded, &rows, None),
            "{shown}"
        );
    }
}

/// Models of shapes the shared fixtures do not have match transformers' log-probs.
#[test]
fn unseen_hybrid_configs_match_transformers() {
    for (name, atol) in [
        ("qwen3_5_odd", 3e-4),
        ("qwen3_next_r3", 5e-4),
        ("qwen3_5_vl", 3e-4),
    ] {
        let dir = root().join("hybrid_unseen").join(name);
        let model = Model::load(&dir, &cpu()).unwrap();
        let reference = read_json(&dir.join("reference.json"));
        let resolved: Vec<String> = reference["layer_types"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let ours: Vec<String> = model
            .config
            .layer_types
            .iter()
            .map(|k| {
                serde_json::to_value(k)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(ours, resolved, "{name}: layer types");
        for case in reference["cases"].as_array().unwrap() {
            let rows = ids_of(case);
            let lp = logprobs(&model.frozen(), &scored(&rows), 0);
            let got: Vec<f32> = lp.scored_host().into_iter().flatten().collect();
            let diff = max_abs_diff(&got, &floats(&case["logprobs"]));
            let label = case["name"].as_str().unwrap_or("?");
            assert!(diff <= atol, "{name}/{label}: log-probs differ by {diff}");
        }
    }
}

/// An odd partial rotary width, as transformers handles it: head_dim 20 × 0.25 gives `dim` 5,
/// `inv_freq` has ⌈5/2⌉ = 3 entries (exponents 0, 2/5, 4/5) and 6 channels are rotated
/// (`scripts/gen-odd-rotary-reference.py`). Rounding the width to 4 or 6 instead moves the
/// fixture's log-probs by 1.06 / 0.44 (`reference.json`), far beyond the tolerance.
#[test]
fn odd_partial_rotary_width_matches_transformers() {
    let dir = root().join("hybrid_unseen/qwen3_next_rot5");
    let reference = read_json(&dir.join("reference.json"));
    let model = Model::load(&dir, &cpu()).unwrap();
    assert_eq!(model.config.rotary_dim, 5);
    let inv_freq = model.config.inv_freq();
    let want = floats(&reference["rotary"]["inv_freq"]);
    assert_eq!(inv_freq.len(), 3);
    assert!(
        max_abs_diff(&inv_freq, &want) <= 1e-7,
        "{inv_freq:?} vs {want:?}"
    );
    for case in reference["cases"].as_array().unwrap() {
        let rows = ids_of(case);
        let lp = logprobs(&model.frozen(), &scored(&rows), 0);
        let got: Vec<f32> = lp.scored_host().into_iter().flatten().collect();
        let diff = max_abs_diff(&got, &floats(&case["logprobs"]));
        let label = case["name"].as_str().unwrap_or("?");
        assert!(diff <= ATOL, "{label}: log-probs differ by {diff}");
    }
}

/// Greedy generation through the recurrent + conv state and KV cache picks, at every step,
/// the argmax of a full uncached forward over everything so far.
#[test]
fn hybrid_greedy_generation_matches_uncached_argmax() {
    use dreamloop::model::generate::{generate_ids, Sampling};
    for name in ["qwen3_next_moe", "qwen3_5"] {
        let model = Model::load(&root().join("models").join(name), &cpu()).unwrap();
        let lm = model.frozen();
        let prompt: Vec<u32> = (0..67).map(|i| (i * 13 % 250) as u32 + 3).collect();
        let sampling = Sampling {
            max_new_tokens: 12,
            ..Sampling::default()
        };
        let (generated, _) = generate_ids(&lm, &prompt, &[], &sampling);
        assert_eq!(generated.len(), 12, "{name}");
        let mut seq = prompt.clone();
        for (step, &token) in generated.iter().enumerate() {
            let logits = logits_of(&model, std::slice::from_ref(&seq), None);
            let vocab = model.config.vocab_size;
            let last = &logits[(seq.len() - 1) * vocab..];
            let best = (0..vocab)
                .max_by(|&a, &b| last[a].total_cmp(&last[b]))
                .unwrap() as u32;
            assert_eq!(token, best, "{name}: step {step}");
            seq.push(token);
        }
    }
}

/// The learning core on the hybrid preset: SFT then DPO steps through the real `Trainer` with
/// APOLLO-Mini, the GDN and attention projections projected (low-rank state), `A_log` and the
/// 3-D `conv1d.weight` on the dense branch, and freezing by name holding the GDN layers still.
#[test]
fn hybrid_trains_with_apollo_mini_and_freezing() {
    use dreamloop::model::weights::named_tensors;
    use dreamloop::train::loss::DpoVariant;
    use dreamloop::train::optim::{ApolloConfig, OptimizerConfig};
    use dreamloop::train::schedule::LrSchedule;
    use dreamloop::train::trainer::{Batch, DpoItem, SftItem, Trainer, TrainerConfig};

    let device = cpu().autodiff();
    let model = Model::preset("tiny-hybrid", 1, &device).unwrap();
    let before = named_tensors(&model.lm);
    let settings = TrainerConfig {
        optimizer: OptimizerConfig::Apollo(ApolloConfig::mini()),
        schedule: LrSchedule::warmup_constant(1e-3, 0),
        max_grad_norm: 1.0,
        beta: 0.1,
        dpo_weight: 1.0,
        dpo_variant: DpoVariant::Sigmoid,
        freeze: vec!["*.linear_attn.*".into()],
        train_only: Vec::new(),
        pad_id: model.config.pad_id(),
        max_seq_len: 0,
        recompute: false,
        logits_chunk: 0,
    };
    let mut trainer = Trainer::new(model.config.clone(), model.lm, None, settings).unwrap();
    let ids = |seed: u64, n: usize| -> Vec<u32> {
        uniform(n, seed, 3.0, 250.0)
            .into_iter()
            .map(|x| x as u32)
            .collect()
    };
    let mut sft = Batch::default();
    for i in 0..2 {
        sft.sft.push(SftItem {
            prompt: ids(10 + i, 70 + 3 * i as usize),
            completion: ids(20 + i, 9),
            hash: i,
        });
    }
    let report = trainer.step(&sft).unwrap();
    assert!(
        report.loss.is_finite() && report.grad_norm > 0.0,
        "{report:?}"
    );
    let mut dpo = Batch::default();
    dpo.dpo.push(DpoItem {
        prompt: ids(30, 40),
        chosen: ids(31, 6),
        rejected: ids(32, 8),
        hash: 99,
        reference: None,
    });
    let report = trainer.step(&dpo).unwrap();
    assert!(report.loss.is_finite(), "{report:?}");

    let optim = trainer.optimizer();
    let attn = "model.layers.3.self_attn.q_proj.weight";
    assert!(
        optim.apollo_state::<2>(attn).unwrap().projected.is_some(),
        "{attn}"
    );
    let names: Vec<&str> = optim.param_names().collect();
    assert!(
        !names.iter().any(|n| n.contains("linear_attn")),
        "frozen GDN parameters have no optimizer state: {names:?}"
    );
    let after = named_tensors(trainer.model());
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        let moved = max_abs_diff(
            &a.clone().try_to_vec::<f32>().unwrap(),
            &b.clone().try_to_vec::<f32>().unwrap(),
        );
        if name.contains("linear_attn") {
            assert_eq!(moved, 0.0, "{name} is frozen but moved");
        } else if name.contains("layers.3.self_attn") || name.contains("mlp") {
            assert!(moved > 0.0, "{name} did not train");
        }
    }

    // Without freezing, the GDN projections get projected (low-rank) state and the rest dense.
    let model = Model::preset("tiny-hybrid", 1, &device).unwrap();
    let settings = TrainerConfig {
        optimizer: OptimizerConfig::Apollo(ApolloConfig::mini()),
        schedule: LrSchedule::warmup_constant(1e-3, 0),
        max_grad_norm: 1.0,
        beta: 0.1,
        dpo_weight: 1.0,
        dpo_variant: DpoVariant::Sigmoid,
        freeze: Vec::new(),
        train_only: Vec::new(),
        pad_id: model.config.pad_id(),
        max_seq_len: 0,
        recompute: false,
        logits_chunk: 0,
    };
    let mut trainer = Trainer::new(model.config.clone(), model.lm, None, settings).unwrap();
    trainer.step(&sft).unwrap();
    let optim = trainer.optimizer();
    for name in ["in_proj_qkv", "in_proj_z", "out_proj"] {
        let full = format!("model.layers.0.linear_attn.{name}.weight");
        assert!(
            optim.apollo_state::<2>(&full).unwrap().projected.is_some(),
            "{full}"
        );
    }
    for name in ["in_proj_a.weight", "in_proj_b.weight"] {
        let full = format!("model.layers.0.linear_attn.{name}");
        assert!(
            optim.apollo_state::<2>(&full).unwrap().projected.is_none(),
            "{full}"
        );
    }
    assert!(optim
        .apollo_state::<1>("model.layers.0.linear_attn.A_log")
        .is_some());
    assert!(optim
        .apollo_state::<3>("model.layers.0.linear_attn.conv1d.weight")
        .is_some());
}

/// Decays far beyond f32's exponent range (g down to −80 per step, a cumulative −5000 within a
/// chunk): every exponent taken is ≤ 0, so outputs and gradients stay finite, and the chunked
/// form still equals the recurrent one — to 1e-4 here rather than 1e-5: the chunked form takes
/// differences of cumulative sums near −2000, where one f32 ulp is 1.2e-4, so a decay factor
/// exp(Gc[i] − Gc[j]) carries ~1e-4 relative error (transformers' and flash-linear-attention's
/// chunked kernels share this; the recurrent form multiplies step by step).
#[test]
fn extreme_decays_stay_finite() {
    let device = cpu().autodiff();
    let (b, h, t, dk, dv) = (1, 2, 130, 8, 4);
    let x = rule_inputs(b, h, t, dk, dv, 21, &device);
    let g: Vec<f32> = uniform(b * h * t, 22, 0.0, 1.0)
        .into_iter()
        .map(|u| if u < 0.5 { -80.0 * u } else { -1e-4 })
        .collect();
    let g = Tensor::<3>::from_data(TensorData::new(g, [b, h, t]), &device).require_grad();
    let q = x.q.require_grad();
    let k = x.k.require_grad();
    let (o, s) = chunked_delta_rule(
        q.clone(),
        k.clone(),
        x.v.clone(),
        g.clone(),
        x.beta.clone(),
        None,
        64,
    );
    let (o_r, _) = recurrent_delta_rule(
        q.clone().inner(),
        k.clone().inner(),
        x.v.clone().inner(),
        g.clone().inner(),
        x.beta.clone().inner(),
        None,
    );
    let diff = max_abs_diff(&host(o.clone().inner()), &host(o_r));
    assert!(
        diff <= 1e-4,
        "chunked vs recurrent under extreme decay: {diff}"
    );
    let grads = (o.sum() + s.sum()).backward();
    for (name, grad) in [
        ("q", host(q.grad(&grads).unwrap())),
        ("k", host(k.grad(&grads).unwrap())),
        ("g", host(g.grad(&grads).unwrap())),
    ] {
        assert!(
            grad.iter().all(|v| v.is_finite()),
            "d/d{name} has a non-finite value"
        );
    }
}
