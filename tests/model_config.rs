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

/// Issue 15 #14: a hostile `config.json` is an error naming the file and the field, never an
/// allocation that aborts the process; shapes are bounded by the weight files before the
/// model is allocated.
#[test]
fn hostile_sizes_are_refused_before_allocating() {
    for (field, value) in [
        ("num_hidden_layers", json!(100_000_000_000u64)),
        ("hidden_size", json!(1u64 << 40)),
        ("vocab_size", json!(1u64 << 40)),
    ] {
        let mut v = base();
        v[field] = value;
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains(field), "{e}");
    }

    let dir = fixture_copy();
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    config["num_hidden_layers"] = json!(100_000_000_000u64);
    std::fs::write(&path, config.to_string()).unwrap();
    let e = Model::load(dir.path(), &cpu()).err().unwrap().to_string();
    assert!(
        e.contains("config.json") && e.contains("num_hidden_layers"),
        "{e}"
    );

    // Within the sanity bound, but more layers than the checkpoint holds.
    config["num_hidden_layers"] = json!(1000);
    std::fs::write(&path, config.to_string()).unwrap();
    let e = Model::load(dir.path(), &cpu()).err().unwrap().to_string();
    assert!(
        e.contains("config.json") && e.contains("num_hidden_layers") && e.contains("hold 2"),
        "{e}"
    );

    config["num_hidden_layers"] = json!(2);
    config["vocab_size"] = json!(1_000_000);
    std::fs::write(&path, config.to_string()).unwrap();
    let e = Model::load(dir.path(), &cpu()).err().unwrap().to_string();
    assert!(e.contains("config.json") && e.contains("vocab_size"), "{e}");
}

fn hybrid_base() -> Value {
    json!({
        "model_type": "qwen3_5_text", "vocab_size": 256, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25},
        "linear_num_key_heads": 2, "linear_num_value_heads": 6, "linear_key_head_dim": 16,
        "linear_value_head_dim": 8, "linear_conv_kernel_dim": 4
    })
}

/// Hybrid configs: layer pattern from `full_attention_interval` (default 4) as transformers
/// derives it, partial RoPE, gated attention and zero-centred norms, GDN shape, MoE layers.
#[test]
fn hybrid_families_and_their_conventions() {
    use dreamloop::model::config::LayerKind::{FullAttention as F, LinearAttention as L};
    let c = parse(hybrid_base()).unwrap();
    assert_eq!(c.family, Family::Qwen35);
    assert_eq!(c.layer_types, [L, L, L, F, L, L, L, F]);
    assert_eq!(c.rotary_dim, 8);
    assert_eq!(c.inv_freq().len(), 4);
    assert!(c.attn_output_gate && c.norm_unit_offset && c.qk_norm);
    let lin = c.linear_attn.unwrap();
    assert_eq!((lin.num_key_heads, lin.num_value_heads), (2, 6));
    assert!(!lin.fused_projections);
    assert!(c.moe.is_none());

    let mut v = hybrid_base();
    v["model_type"] = json!("qwen3_next");
    v["full_attention_interval"] = json!(2);
    v["num_experts"] = json!(4);
    v["num_experts_per_tok"] = json!(2);
    v["moe_intermediate_size"] = json!(16);
    v["shared_expert_intermediate_size"] = json!(24);
    v["decoder_sparse_step"] = json!(2);
    v["mlp_only_layers"] = json!([5]);
    let c = parse(v).unwrap();
    assert_eq!(c.family, Family::Qwen3Next);
    assert_eq!(c.layer_types, [L, F, L, F, L, F, L, F]);
    assert!(c.linear_attn.unwrap().fused_projections);
    let moe = c.moe.unwrap();
    assert!(moe.norm_topk_prob, "transformers' default");
    // sparse where (i + 1) % 2 == 0, except mlp_only_layers
    assert_eq!(
        moe.sparse_layers,
        [false, true, false, true, false, false, false, true]
    );

    // The multimodal checkpoint: text config nested, tying by the top-level flag only.
    let mut text = hybrid_base();
    text["tie_word_embeddings"] = json!(true);
    let v = json!({"model_type": "qwen3_5", "text_config": text, "eos_token_id": 7});
    let c = parse(v).unwrap();
    assert_eq!(c.text_prefix, "model.language_model.");
    assert!(!c.tie_word_embeddings, "text_config's tie flag is ignored");
    assert_eq!(c.eos_token_id, Some(7));
    assert_eq!(c.layer_types.len(), 8);
}

/// Errors name the field, including inside `text_config`.
#[test]
fn hybrid_config_errors_name_the_field() {
    let field_of = |v: Value| match parse(v).unwrap_err() {
        ConfigError::Missing { field, .. } | ConfigError::Invalid { field, .. } => field,
        other => panic!("{other}"),
    };
    let mut v = hybrid_base();
    v["linear_num_value_heads"] = json!(5);
    assert_eq!(field_of(v), "linear_num_value_heads");

    let mut v = hybrid_base();
    v.as_object_mut().unwrap().remove("linear_key_head_dim");
    assert_eq!(field_of(v), "linear_key_head_dim");

    let mut v = hybrid_base();
    v["layer_types"] = json!(["linear_attention", "full_attention"]);
    assert_eq!(field_of(v), "layer_types");

    let mut v = hybrid_base();
    v["layer_types"] = json!(vec!["linear_attention"; 8]);
    v["layer_types"][7] = json!("sliding_attention");
    assert_eq!(field_of(v), "layer_types[7]");

    let mut v = base();
    v["layer_types"] = json!(["full_attention", "linear_attention"]);
    assert_eq!(
        field_of(v),
        "layer_types[1]",
        "GDN layers only in hybrid families"
    );

    let mut v = hybrid_base();
    v["rope_parameters"]["partial_rotary_factor"] = json!(0.01);
    assert_eq!(field_of(v), "partial_rotary_factor");

    // An odd width is transformers' too: 32 × 0.15625 = 5 → arange(0, 5, 2), 3 frequencies.
    let mut v = hybrid_base();
    v["rope_parameters"]["partial_rotary_factor"] = json!(0.15625);
    let c = parse(v).unwrap();
    assert_eq!((c.rotary_dim, c.inv_freq().len()), (5, 3));

    let mut text = hybrid_base();
    text.as_object_mut().unwrap().remove("rms_norm_eps");
    let v = json!({"model_type": "qwen3_5", "text_config": text});
    assert_eq!(field_of(v), "text_config.rms_norm_eps");

    let v = json!({"model_type": "qwen3_5"});
    assert_eq!(field_of(v), "text_config");
}

/// A GDN checkpoint missing a tensor names it under the multimodal prefix it was looked for.
#[test]
fn hybrid_missing_tensor_is_named() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hybrid_unseen/qwen3_5_vl");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let gone = "model.language_model.layers.2.linear_attn.A_log";
    let kept: Vec<_> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != gone)
        .collect();
    safetensors::serialize_to_file(kept, None, &dir.path().join("model.safetensors")).unwrap();
    match Model::load(dir.path(), &cpu()) {
        Err(ModelError::Weights(WeightError::Missing { name })) => assert_eq!(name, gone),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("loaded without {gone}"),
    }
}

/// The operator's model as its published `config.json` describes it (multimodal Qwen3.5-27B:
/// text decoder nested, `full_attention_interval` instead of `layer_types`, M-RoPE sections,
/// keys dreamloop does not use such as `mamba_ssm_dtype` and `mtp_num_hidden_layers`).
#[test]
fn qwen3_5_27b_config_parses() {
    // tests/fixtures/qwen3_5_27b/config.json: the published file, weights not included.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/qwen3_5_27b/config.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let c = parse(v).unwrap();
    assert_eq!(c.family, Family::Qwen35);
    assert_eq!(c.text_prefix, "model.language_model.");
    assert_eq!(c.num_hidden_layers, 64);
    let full: Vec<usize> = (0..64)
        .filter(|&i| c.layer_types[i] == dreamloop::model::config::LayerKind::FullAttention)
        .collect();
    assert_eq!(full, (0..16).map(|i| 4 * i + 3).collect::<Vec<_>>());
    assert_eq!(
        c.rotary_dim, 64,
        "partial_rotary_factor 0.25 of head_dim 256"
    );
    let lin = c.linear_attn.unwrap();
    assert_eq!(
        (
            lin.num_key_heads,
            lin.num_value_heads,
            lin.key_head_dim,
            lin.value_head_dim
        ),
        (16, 48, 128, 128)
    );
    assert!(!c.tie_word_embeddings);
    assert_eq!(
        c.eos_token_id,
        Some(248044),
        "the text config's own id wins"
    );
    assert_eq!(c.pad_token_id, Some(248044));
}
