//! Models in bf16 (`Precision::Bf16`): loading, saving, and the forward pass against
//! transformers run in bf16.
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
use burn::tensor::{DType, Tensor};
use dreamloop::model::logprobs::logprobs;
use dreamloop::model::weights::named_tensors;
use dreamloop::model::{cpu, Model, Precision};
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
    let spread = cases
        .values()
        .map(|c| c["spread_bf16_vs_f32"].as_f64().unwrap())
        .fold(0.0, f64::max);
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
