//! Models in bf16 (`Precision::Bf16`): loading, the forward pass against transformers run in
//! bf16, and training with f32 updates written back by stochastic rounding.
//!
//! References: `tests/fixtures/models/<name>/reference_bf16.json`, written by
//! `tests/fixtures/gen_bf16.py` (transformers 5.23.0 / torch 2.15.0, eager attention, CPU). It
//! runs each fixture in bf16 and in f32 on the ids of its `reference.json` and records
//! transformers' own bf16-vs-f32 spread.
//!
//! Tolerance of the log-prob comparison: `2 × spread`, where spread is transformers' max
//! |bf16 − f32| over the model's cases (the largest per-case spread recorded). Both implementations round the same
//! weights the same way (to nearest) and round activations at the same points, but
//! accumulate in different orders, so each is within about one spread of the f32 values; two
//! such results are within the sum of their distances, 2 × spread. For the MoE fixture the
//! spread includes tokens whose top-2 experts flip between bf16 and f32, a discrete jump that
//! our bf16 run makes on other tokens than transformers' does; the same bound holds. The mean
//! check (over all the model's log-probs) is stricter: our bf16 log-probs are closer on
//! average to transformers' bf16 ones than transformers' own f32 ones are. That fails if the weights were not really bf16 (an f32
//! model sits one mean spread away) or the upcasts were in other places.

mod model_common;

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{DType, Int, Tensor, TensorData};
use dreamloop::model::llama::KvCache;
use dreamloop::model::logprobs::logprobs;
use dreamloop::model::weights::named_tensors;
use dreamloop::model::{cpu, Model, Precision};
use dreamloop::train::dataset::hash_ids;
use dreamloop::train::loss::DpoVariant;
use dreamloop::train::optim::{AdamWConfig, ApolloConfig, OptimizerConfig, Rounding};
use dreamloop::train::reference::Reference;
use dreamloop::train::schedule::LrSchedule;
use dreamloop::train::trainer::{Batch, SftItem, Trainer, TrainerConfig};
use model_common::{floats, ids_of, scored};
use serde_json::Value;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models")
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The dtype of every float parameter of a module.
struct Dtypes(Vec<DType>);

impl ModuleVisitor for Dtypes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.push(param.val().dtype());
    }
}

fn param_dtypes<M: Module>(module: &M) -> Vec<DType> {
    let mut v = Dtypes(Vec::new());
    module.visit(&mut v);
    v.0
}

#[test]
fn bf16_weights_are_the_checkpoint_rounded_to_nearest() {
    let dir = models().join("qwen3_5");
    let wide = Model::load(&dir, &cpu()).unwrap();
    let narrow = Model::load_as(&dir, &cpu(), Precision::Bf16).unwrap();
    let dtypes = param_dtypes(&narrow.lm);
    assert!(!dtypes.is_empty());
    assert!(dtypes.iter().all(|d| *d == DType::BF16), "{dtypes:?}");
    for ((n1, a), (n2, b)) in named_tensors(&wide.lm)
        .iter()
        .zip(&named_tensors(&narrow.lm))
    {
        assert_eq!(n1, n2);
        let want: Vec<half::bf16> = a.iter::<f32>().map(half::bf16::from_f32).collect();
        assert_eq!(b.as_slice::<half::bf16>().unwrap(), &want[..], "{n1}");
    }
}

/// Our bf16 next-token log-probs of every case against transformers' bf16 run.
fn check_against_transformers(name: &str) {
    let dir = models().join(name);
    let reference = read_json(&dir.join("reference_bf16.json"));
    let model = Model::load_as(&dir, &cpu(), Precision::Bf16).unwrap();
    let lm = model.frozen();
    let cases = reference["cases"].as_object().unwrap();
    // transformers' own bf16 error scale on this model: the largest spread of any case (a
    // 7-token case alone is too few samples to estimate it).
    let spread = model_spread(&reference);
    let (mut ours_sum, mut theirs_sum, mut count, mut max) = (0.0, 0.0, 0usize, 0.0f64);
    for (case_name, case) in cases {
        let rows = ids_of(case);
        let got: Vec<f32> = logprobs(&lm, &scored(&rows), 0)
            .scored_host()
            .into_iter()
            .flatten()
            .collect();
        let bf16 = floats(&case["logprobs_bf16"]);
        let f32s = floats(&case["logprobs_f32"]);
        assert_eq!(got.len(), bf16.len(), "{name}/{case_name}");
        let case_max = got
            .iter()
            .zip(&bf16)
            .map(|(a, b)| f64::from((a - b).abs()))
            .fold(0.0, f64::max);
        eprintln!("{name}/{case_name}: max |ours − transformers bf16| {case_max:.4}");
        max = max.max(case_max);
        ours_sum += got
            .iter()
            .zip(&bf16)
            .map(|(a, b)| f64::from((a - b).abs()))
            .sum::<f64>();
        theirs_sum += f32s
            .iter()
            .zip(&bf16)
            .map(|(a, b)| f64::from((a - b).abs()))
            .sum::<f64>();
        count += got.len();
    }
    let (mean, mean_spread) = (ours_sum / count as f64, theirs_sum / count as f64);
    eprintln!(
        "{name}: max {max:.4} (2 × spread {:.4}), mean {mean:.4} (transformers' mean spread \
         {mean_spread:.4}) over {count} log-probs",
        2.0 * spread
    );
    assert!(
        max <= 2.0 * spread,
        "{name}: max |ours − transformers bf16| = {max}, 2 × spread = {}",
        2.0 * spread
    );
    assert!(
        mean < mean_spread,
        "{name}: mean |ours − transformers bf16| = {mean} is not below transformers' own \
         mean bf16-vs-f32 spread {mean_spread}"
    );
}

#[test]
fn dense_fixtures_match_transformers_in_bf16() {
    for name in ["llama_tied", "llama_untied", "qwen2", "qwen3"] {
        check_against_transformers(name);
    }
}

#[test]
fn hybrid_fixtures_match_transformers_in_bf16() {
    for name in ["qwen3_next", "qwen3_5"] {
        check_against_transformers(name);
    }
}

#[test]
fn moe_fixture_matches_transformers_in_bf16() {
    check_against_transformers("qwen3_next_moe");
}

/// Largest bf16-vs-f32 spread over a reference's cases.
fn model_spread(reference: &Value) -> f64 {
    reference["cases"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["spread_bf16_vs_f32"].as_f64().unwrap())
        .fold(0.0, f64::max)
}

#[test]
fn cached_decoding_in_bf16_matches_transformers_bf16() {
    // Pieces 5, 1, 1 and the rest of seq33: prefill, two single-token steps (the recurrent
    // delta rule from a cached f32 state), and a chunked piece from a cached state.
    for name in ["llama_tied", "qwen3", "qwen3_next", "qwen3_5"] {
        let dir = models().join(name);
        let reference = read_json(&dir.join("reference_bf16.json"));
        let case = &reference["cases"]["seq33"];
        let ids = ids_of(case).remove(0);
        let model = Model::load_as(&dir, &cpu(), Precision::Bf16).unwrap();
        let lm = model.frozen();
        let mut cache = KvCache::default();
        let mut logits: Vec<f32> = Vec::new();
        let mut pos = 0;
        for n in [5, 1, 1, ids.len() - 7] {
            let piece: Vec<i64> = ids[pos..pos + n].iter().map(|&i| i64::from(i)).collect();
            let input = Tensor::<2, Int>::from_data(TensorData::new(piece, [1, n]), &lm.device());
            let out = lm.forward_cached(input, &mut cache);
            assert_eq!(out.dtype(), DType::F32, "logits leave the model in f32");
            logits.extend(out.into_data().try_to_vec::<f32>().unwrap());
            pos += n;
        }
        let vocab = model.config.vocab_size;
        let got: Vec<f64> = (0..ids.len() - 1)
            .map(|t| {
                let row: Vec<f64> = logits[t * vocab..(t + 1) * vocab]
                    .iter()
                    .map(|&v| f64::from(v))
                    .collect();
                let top = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = top + row.iter().map(|v| (v - top).exp()).sum::<f64>().ln();
                row[ids[t + 1] as usize] - lse
            })
            .collect();
        let want = floats(&case["logprobs_bf16"]);
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - f64::from(*b)).abs())
            .fold(0.0, f64::max);
        let spread = model_spread(&reference);
        assert!(
            max <= 2.0 * spread,
            "{name}: cached bf16 decoding differs from transformers' bf16 run by {max}, \
             2 × spread = {}",
            2.0 * spread
        );
    }
}

#[test]
fn bf16_save_writes_bf16_and_reloads_bit_for_bit() {
    let dir = models().join("qwen3_next");
    let model = Model::load_as(&dir, &cpu(), Precision::Bf16).unwrap();
    let out = tempfile::tempdir().unwrap();
    model.save(out.path()).unwrap();
    let bytes = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in file.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::BF16, "{name}");
    }
    let reloaded = Model::load_as(out.path(), &cpu(), Precision::Bf16).unwrap();
    for ((n1, a), (n2, b)) in named_tensors(&model.lm)
        .iter()
        .zip(&named_tensors(&reloaded.lm))
    {
        assert_eq!(n1, n2);
        assert_eq!(a.as_bytes(), b.as_bytes(), "{n1}");
    }
    // An f32 load of the bf16 file is exact too (bf16 ⊂ f32).
    let wide = Model::load(out.path(), &cpu()).unwrap();
    assert!(param_dtypes(&wide.lm).iter().all(|d| *d == DType::F32));
}

fn adamw() -> OptimizerConfig {
    OptimizerConfig::Adamw(AdamWConfig {
        weight_decay: 0.0,
        ..AdamWConfig::default()
    })
}

fn settings(lr: f64) -> TrainerConfig {
    settings_with(adamw(), lr)
}

fn settings_with(optimizer: OptimizerConfig, lr: f64) -> TrainerConfig {
    TrainerConfig {
        optimizer,
        schedule: LrSchedule::warmup_constant(lr, 0),
        max_grad_norm: 1.0,
        beta: 0.1,
        dpo_weight: 1.0,
        dpo_variant: DpoVariant::Sigmoid,
        freeze: Vec::new(),
        train_only: Vec::new(),
        pad_id: 0,
        max_seq_len: 0,
        recompute: false,
        logits_chunk: 0,
    }
}

/// Fixed SFT batches: prompt `<word>=`, completion `<word>` (bytes `a`..`h`), from an LCG.
fn batches(count: usize) -> Vec<Batch> {
    let mut state = 17u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        state >> 33
    };
    (0..count)
        .map(|_| Batch {
            sft: (0..4)
                .map(|_| {
                    let word: Vec<u32> =
                        (0..6).map(|_| b'a' as u32 + (next() % 8) as u32).collect();
                    let mut prompt = word.clone();
                    prompt.push(b'=' as u32);
                    SftItem {
                        hash: hash_ids(&[&prompt, &word]),
                        prompt,
                        completion: word,
                    }
                })
                .collect(),
            dpo: Vec::new(),
        })
        .collect()
}

/// Every parameter value of `lm`, widened to f64, in module order.
fn flat(lm: &dreamloop::model::CausalLm) -> Vec<f64> {
    named_tensors(lm)
        .iter()
        .flat_map(|(_, d)| d.iter::<f32>().map(f64::from).collect::<Vec<_>>())
        .collect()
}

fn train(model: Model, rounding: Rounding, data: &[Batch]) -> Vec<f64> {
    let mut trainer = Trainer::new(model.config, model.lm, None, settings(1e-5))
        .unwrap()
        .with_rounding(rounding);
    for batch in data {
        trainer.step(batch).unwrap();
    }
    flat(&trainer.frozen())
}

/// ⟨a, b⟩ / |b|².
fn projection(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / b.iter().map(|y| y * y).sum::<f64>()
}

#[test]
fn stochastic_rounding_keeps_small_updates_that_nearest_loses() {
    // The tiny preset: |w| ≈ 0.02 (initializer_range), where bf16's spacing is ~1.2e-4 and
    // an Adam step at lr 1e-5 moves a weight by ~1e-5.
    let device = cpu().autodiff();
    let start = Model::preset_as("tiny", 7, &device, Precision::Bf16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    start.save(dir.path()).unwrap();
    let w0 = flat(&start.lm);
    let data = batches(20);
    // The f32 run starts from the same (bf16) values, widened.
    let f32_run = train(
        Model::load_as(dir.path(), &device, Precision::F32).unwrap(),
        Rounding::default(),
        &data,
    );
    let open = || Model::load_as(dir.path(), &device, Precision::Bf16).unwrap();
    let stochastic = train(open(), Rounding::default(), &data);
    let nearest = train(open(), Rounding::Nearest, &data);
    let delta = |w: &[f64]| -> Vec<f64> { w.iter().zip(&w0).map(|(a, b)| a - b).collect() };
    let (d32, dsr, drn) = (delta(&f32_run), delta(&stochastic), delta(&nearest));
    let norm = d32.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(norm > 0.0, "the f32 run moved");
    let p_sr = projection(&dsr, &d32);
    let p_rn = projection(&drn, &d32);
    eprintln!("|Δf32| = {norm:.4e}; projection: stochastic {p_sr:.4}, nearest {p_rn:.4}");
    assert!(
        (p_sr - 1.0).abs() <= 0.15,
        "stochastic rounding: ⟨Δbf16, Δf32⟩/|Δf32|² = {p_sr}"
    );
    assert!(p_rn < 0.5, "round-to-nearest kept {p_rn} of the f32 change");
}

#[test]
fn bf16_resumed_run_is_bit_identical() {
    for optimizer in [adamw(), OptimizerConfig::Apollo(ApolloConfig::mini())] {
        resume_bit_identical(optimizer);
    }
}

fn resume_bit_identical(optimizer: OptimizerConfig) {
    let data = batches(6);
    let device = cpu().autodiff();
    let fresh = || {
        let model = Model::preset_as("tiny-hybrid", 7, &device, Precision::Bf16).unwrap();
        Trainer::new(
            model.config,
            model.lm,
            None,
            settings_with(optimizer.clone(), 1e-4),
        )
        .unwrap()
    };
    let mut straight = fresh();
    for batch in &data {
        straight.step(batch).unwrap();
    }
    let mut first = fresh();
    for batch in &data[..3] {
        first.step(batch).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    first.save(dir.path()).unwrap();
    drop(first);
    let reference = Model::preset_as("tiny-hybrid", 7, &cpu(), Precision::Bf16)
        .unwrap()
        .lm;
    let mut resumed = Trainer::restore_as(
        dir.path(),
        Reference::Resident(reference),
        &device,
        Precision::Bf16,
    )
    .unwrap();
    assert_eq!(
        resumed.optimizer().rounding(),
        (Rounding::default(), 3),
        "the rounding counter is part of the state"
    );
    for batch in &data[3..] {
        resumed.step(batch).unwrap();
    }
    for ((n1, a), (n2, b)) in named_tensors(straight.model())
        .iter()
        .zip(&named_tensors(resumed.model()))
    {
        assert_eq!(n1, n2);
        assert_eq!(a.dtype(), DType::BF16, "{n1}");
        assert_eq!(
            a.as_bytes(),
            b.as_bytes(),
            "{}: {n1} differs after resume",
            optimizer.algorithm()
        );
    }
}
