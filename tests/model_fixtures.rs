//! The decoder against transformers' golden outputs (`tests/fixtures/models/*/reference.json`,
//! copied from the shared fixtures): logits, per-token log-probs and the mean loss of every
//! case, right-padded batches, and the save → load round trip.
//! Tolerances are the fixtures README's for a float32 port of a dense model.

mod model_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use dreamloop::model::logprobs::logprobs;
use dreamloop::model::{cpu, Model};
use model_common::{
    check_cached_decoding, check_case, floats, ids_of, logits_of, max_abs_diff, scored,
};
use serde_json::Value;

const LOGIT_ATOL: f32 = 1e-4;
const LOGPROB_ATOL: f32 = 1e-4;
const LOSS_ATOL: f64 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/models")
        .join(name)
}

fn reference(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn check_model(name: &str) {
    let model = Model::load(&fixture(name), &cpu()).unwrap();
    let reference = reference(name);
    for (case_name, case) in reference["cases"].as_object().unwrap() {
        let label = format!("{name}/{case_name}");
        check_case(&model, &label, case, LOGIT_ATOL, LOGPROB_ATOL, LOSS_ATOL);
    }
}

#[test]
fn llama_tied_matches_transformers() {
    check_model("llama_tied");
}

#[test]
fn llama_untied_matches_transformers() {
    check_model("llama_untied");
}

#[test]
fn qwen2_matches_transformers() {
    check_model("qwen2");
}

#[test]
fn qwen3_matches_transformers() {
    check_model("qwen3");
}

/// Sequences of different lengths right-padded into one batch give each sequence's
/// unbatched reference logits on its real positions.
#[test]
fn right_padded_batch_matches_unbatched_references() {
    for name in ["llama_tied", "qwen2", "qwen3"] {
        let model = Model::load(&fixture(name), &cpu()).unwrap();
        let reference = reference(name);
        let cases = ["seq7", "seq16", "seq33"];
        let rows: Vec<Vec<u32>> = cases
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
        for (b, case) in cases.iter().enumerate() {
            let want = floats(&reference["cases"][*case]["logits"]);
            let len = rows[b].len();
            let got = &logits[b * width * vocab..(b * width + len) * vocab];
            let diff = max_abs_diff(got, &want);
            assert!(
                diff <= LOGIT_ATOL,
                "{name}: padded row {case} differs by {diff}"
            );
        }

        let lp = logprobs(&model.frozen(), &scored(&rows), 0);
        for (b, case) in cases.iter().enumerate() {
            let want = floats(&reference["cases"][*case]["logprobs"]);
            let diff = max_abs_diff(&lp.scored_host()[b], &want);
            assert!(
                diff <= LOGPROB_ATOL,
                "{name}: padded log-probs of {case} differ by {diff}"
            );
        }
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

/// load → save → load gives identical logits, and the saved file has exactly the original
/// key set, shapes and dtypes (tied models keep no `lm_head.weight`).
#[test]
fn save_round_trip_is_exact() {
    for name in ["llama_tied", "llama_untied", "qwen2", "qwen3"] {
        let model = Model::load(&fixture(name), &cpu()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        model.save(dir.path()).unwrap();
        assert_eq!(
            key_set(&fixture(name).join("model.safetensors")),
            key_set(&dir.path().join("model.safetensors")),
            "{name}: saved key set/shapes/dtypes differ"
        );
        let original: Value =
            serde_json::from_slice(&std::fs::read(fixture(name).join("config.json")).unwrap())
                .unwrap();
        let saved: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(original, saved, "{name}: config.json changed");
        let reloaded = Model::load(dir.path(), &cpu()).unwrap();
        let rows = ids_of(&reference(name)["cases"]["seq16"]);
        assert_eq!(
            logits_of(&model, &rows, None),
            logits_of(&reloaded, &rows, None),
            "{name}"
        );
    }
}

/// bf16 and f16 files are read as f32 and written back in their own dtype.
#[test]
fn half_precision_files_load_and_save_in_their_dtype() {
    use safetensors::tensor::{Dtype, TensorView};
    let src = fixture("llama_tied");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut encoded = Vec::new();
    for (name, view) in st.tensors() {
        let values: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (dtype, data): (Dtype, Vec<u8>) = if name.contains("mlp") {
            (
                Dtype::F16,
                values
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            )
        } else {
            (
                Dtype::BF16,
                values
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            )
        };
        encoded.push((name, dtype, view.shape().to_vec(), data, values));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let views: Vec<(String, TensorView)> = encoded
        .iter()
        .map(|(n, d, s, b, _)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();

    let model = Model::load(dir.path(), &cpu()).unwrap();
    let norm = model
        .lm
        .model
        .norm
        .weight
        .val()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let (_, _, _, _, original) = encoded.iter().find(|e| e.0 == "model.norm.weight").unwrap();
    for (got, orig) in norm.iter().zip(original) {
        assert_eq!(*got, half::bf16::from_f32(*orig).to_f32());
    }
    let out = tempfile::tempdir().unwrap();
    model.save(out.path()).unwrap();
    let saved = key_set(&out.path().join("model.safetensors"));
    assert_eq!(saved, key_set(&dir.path().join("model.safetensors")));
}

/// Shards listed in `model.safetensors.index.json` load like one file.
#[test]
fn sharded_checkpoint_loads() {
    use safetensors::tensor::TensorView;
    let src = fixture("llama_untied");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut weight_map = serde_json::Map::new();
    let mut shards: [Vec<(String, TensorView)>; 2] = [Vec::new(), Vec::new()];
    for (i, (name, view)) in st.tensors().into_iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(name.clone(), Value::String(file));
        shards[i % 2].push((name, view));
    }
    for (i, shard) in shards.into_iter().enumerate() {
        safetensors::serialize_to_file(
            shard,
            None,
            &dir.path()
                .join(format!("model-0000{}-of-00002.safetensors", i + 1)),
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = Model::load(dir.path(), &cpu()).unwrap();
    let single = Model::load(&src, &cpu()).unwrap();
    let rows = ids_of(&reference("llama_untied")["cases"]["seq7"]);
    assert_eq!(
        logits_of(&sharded, &rows, None),
        logits_of(&single, &rows, None)
    );
}

/// Decoding one token at a time through the KV cache gives transformers' full-sequence
/// logits at every position.
#[test]
fn cached_decoding_matches_full_sequence_logits() {
    for name in ["llama_tied", "qwen2", "qwen3"] {
        let model = Model::load(&fixture(name), &cpu()).unwrap();
        // A 5-token prefill, then one token at a time, then the rest.
        let case = &reference(name)["cases"]["seq16"];
        check_cached_decoding(&model, name, case, &[5, 1, 1], LOGIT_ATOL);
    }
}
