//! `config.json` parsing: families, both RoPE spellings, scaling types, and errors that name
//! the field or tensor. RoPE frequencies are checked against numbers computed independently
//! with transformers' `_compute_llama3_parameters` formula in Python.

use std::path::Path;

use dreamloop::model::config::{ConfigError, Family, ModelConfig, RopeScaling};
use dreamloop::model::{cpu, Model, ModelError, WeightError};
use serde_json::{json, Value};

fn base() -> Value {
    json!({
        "model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0
    })
}

fn parse(v: Value) -> Result<ModelConfig, ConfigError> {
    ModelConfig::from_json(v, "config.json")
}

#[test]
fn families_and_their_conventions() {
    let mut v = base();
    v["model_type"] = json!("qwen2");
    let c = parse(v).unwrap();
    assert_eq!(c.family, Family::Qwen2);
    assert!(c.qkv_bias && !c.o_bias && !c.qk_norm);

    let mut v = base();
    v["model_type"] = json!("qwen3");
    v["head_dim"] = json!(32);
    let c = parse(v).unwrap();
    assert!(c.qk_norm && !c.qkv_bias);
    assert_eq!(c.head_dim, 32);

    let mut v = base();
    v["model_type"] = json!("mistral");
    v["sliding_window"] = json!(4096);
    v["head_dim"] = Value::Null;
    let c = parse(v).unwrap();
    assert_eq!(c.sliding_window, Some(4096));
    assert_eq!(
        c.head_dim, 16,
        "head_dim: null falls back to hidden / heads"
    );

    let mut v = base();
    v["attention_bias"] = json!(true);
    v.as_object_mut().unwrap().remove("num_key_value_heads");
    let c = parse(v).unwrap();
    assert!(c.qkv_bias && c.o_bias);
    assert_eq!(c.num_key_value_heads, 4, "kv heads default to heads");
    assert!(!c.tie_word_embeddings);
}

#[test]
fn both_rope_spellings_parse_to_the_same_thing() {
    let scaling = json!({"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192});
    let mut old = base();
    old["rope_theta"] = json!(500000.0);
    old["head_dim"] = json!(128);
    let mut s = scaling.clone();
    s["rope_type"] = json!("llama3");
    old["rope_scaling"] = s;

    let mut new = base();
    new.as_object_mut().unwrap().remove("rope_theta");
    new["head_dim"] = json!(128);
    let mut p = scaling;
    p["rope_type"] = json!("llama3");
    p["rope_theta"] = json!(500000.0);
    new["rope_parameters"] = p;

    let (a, b) = (parse(old).unwrap(), parse(new).unwrap());
    assert_eq!(a.rope_theta, 500000.0);
    assert_eq!(a.rope_scaling, b.rope_scaling);
    assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));

    // transformers' llama3 inverse frequencies (float64 reference), by index.
    let want = [
        (0, 1.0),
        (10, 0.12868737343265052),
        (20, 0.016560440080994446),
        (25, 0.005940730375674967),
        (30, 0.0013718935677611381),
        (40, 3.428102195952591e-05),
        (50, 4.411534674558404e-06),
        (63, 3.068925988914511e-07),
    ];
    let inv = a.inv_freq();
    assert_eq!(inv.len(), 64);
    for (i, w) in want {
        let rel = ((inv[i] as f64 - w) / w).abs();
        assert!(rel < 1e-5, "inv_freq[{i}] = {} vs {w}", inv[i]);
    }
}

#[test]
fn linear_scaling_divides_frequencies() {
    let mut v = base();
    v["rope_scaling"] = json!({"type": "linear", "factor": 4.0});
    let scaled = parse(v).unwrap().inv_freq();
    let plain = parse(base()).unwrap().inv_freq();
    for (s, p) in scaled.iter().zip(&plain) {
        assert_eq!(*s, p / 4.0);
    }
    // head_dim 16: theta^(-2i/16) for i = 0..8
    for (i, p) in plain.iter().enumerate() {
        let want = 1.0 / 10000f64.powf(2.0 * i as f64 / 16.0);
        assert!(((*p as f64 - want) / want).abs() < 1e-6);
    }
}

#[test]
fn errors_name_the_field() {
    let mut v = base();
    v["model_type"] = json!("gpt2");
    let e = parse(v).unwrap_err().to_string();
    assert!(e.contains("gpt2") && e.contains("model_type"), "{e}");

    let mut v = base();
    v.as_object_mut().unwrap().remove("hidden_size");
    let e = parse(v).unwrap_err().to_string();
    assert!(
        e.contains("`hidden_size`") && e.contains("config.json"),
        "{e}"
    );

    let mut v = base();
    v.as_object_mut().unwrap().remove("rope_theta");
    assert!(parse(v).unwrap_err().to_string().contains("rope_theta"));

    let mut v = base();
    v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
    let e = parse(v).unwrap_err().to_string();
    assert!(
        e.contains("yarn") && e.contains("rope_scaling.rope_type"),
        "{e}"
    );

    let mut v = base();
    v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0});
    assert!(parse(v)
        .unwrap_err()
        .to_string()
        .contains("rope_scaling.low_freq_factor"));

    let mut v = base();
    v["num_key_value_heads"] = json!(3);
    assert!(parse(v)
        .unwrap_err()
        .to_string()
        .contains("num_key_value_heads"));

    let mut v = base();
    v["hidden_size"] = json!("64");
    assert!(parse(v).unwrap_err().to_string().contains("`hidden_size`"));
}

fn fixture_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama_untied");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    dir
}

fn rewrite_weights(dir: &Path, edit: impl Fn(&mut Vec<(String, Vec<usize>, Vec<u8>)>)) {
    use safetensors::tensor::{Dtype, TensorView};
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
        .collect();
    edit(&mut tensors);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                TensorView::new(Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
}

#[test]
fn weight_errors_name_the_tensor() {
    let dir = fixture_copy();
    rewrite_weights(dir.path(), |t| {
        t.retain(|(n, _, _)| n != "model.layers.1.mlp.up_proj.weight")
    });
    match Model::load(dir.path(), &cpu()) {
        Err(ModelError::Weights(WeightError::Missing { name })) => {
            assert_eq!(name, "model.layers.1.mlp.up_proj.weight")
        }
        other => panic!("expected a missing-tensor error, got {:?}", other.err()),
    }

    let dir = fixture_copy();
    rewrite_weights(dir.path(), |t| {
        t.push(("model.layers.9.extra.weight".into(), vec![2], vec![0; 8]))
    });
    let e = Model::load(dir.path(), &cpu()).err().unwrap().to_string();
    assert!(e.contains("model.layers.9.extra.weight"), "{e}");

    let dir = fixture_copy();
    rewrite_weights(dir.path(), |t| {
        let w = t
            .iter_mut()
            .find(|(n, _, _)| n == "model.norm.weight")
            .unwrap();
        w.1 = vec![32];
        w.2.truncate(32 * 4);
    });
    let e = Model::load(dir.path(), &cpu()).err().unwrap().to_string();
    assert!(
        e.contains("model.norm.weight") && e.contains("[64]") && e.contains("[32]"),
        "{e}"
    );
}
