//! The GGUF `llama` architecture in Hugging Face terms: hyperparameters → `config.json`,
//! tensor names → HF names, and llama.cpp's Q/K row order → HF's.
//!
//! Follows transformers' GGUF loader (`integrations/ggml.py`,
//! `modeling_gguf_pytorch_utils.py`) and the inverse of llama.cpp's `convert_hf_to_gguf.py`.
//!
//! | GGUF | Hugging Face |
//! | --- | --- |
//! | `token_embd.weight` | `model.embed_tokens.weight` |
//! | `output_norm.weight` | `model.norm.weight` |
//! | `output.weight` (absent when tied) | `lm_head.weight` |
//! | `blk.N.attn_q` / `attn_k` / `attn_v` / `attn_output` | `model.layers.N.self_attn.{q,k,v,o}_proj` |
//! | `blk.N.ffn_gate` / `ffn_up` / `ffn_down` | `model.layers.N.mlp.{gate,up,down}_proj` |
//! | `blk.N.attn_norm` / `ffn_norm` | `model.layers.N.{input,post_attention}_layernorm` |
//!
//! Q/K rows: HF applies RoPE with `rotate_half` (pairs `x[i]`, `x[i + head_dim/2]`),
//! llama.cpp with adjacent pairs (`x[2i]`, `x[2i+1]`), so the converter permutes the rows of
//! `q_proj` (per attention head) and `k_proj` (per KV head):
//! `gguf = hf.reshape(n_head, 2, head_dim/2, in).swapaxes(1, 2)`. [`unpermute_qk_rows`]
//! undoes it; the checkpoint then runs with HF's RoPE unchanged.

use super::{GgufError, GgufFile};
use serde_json::{json, Value};

/// Hyperparameters of a GGUF `llama` model.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaParams {
    /// Decoder layers (`llama.block_count`).
    pub block_count: usize,
    /// Trained context (`llama.context_length`) → `max_position_embeddings`.
    pub context_length: u64,
    /// Residual width (`llama.embedding_length`) → `hidden_size`.
    pub embedding_length: usize,
    /// MLP width (`llama.feed_forward_length`) → `intermediate_size`.
    pub feed_forward_length: usize,
    /// Query heads (`llama.attention.head_count`).
    pub head_count: usize,
    /// Key/value heads (`llama.attention.head_count_kv`, default: `head_count`).
    pub head_count_kv: usize,
    /// Per-head width (`llama.attention.key_length`, default: width / heads).
    pub head_dim: usize,
    /// RoPE base (`llama.rope.freq_base`, default 10000) → `rope_theta`.
    pub rope_freq_base: f64,
    /// RMSNorm epsilon (`llama.attention.layer_norm_rms_epsilon`), an f32 in the file.
    pub rms_norm_eps: f64,
    /// Rows of the embedding matrix.
    pub vocab_size: usize,
    /// No `output.weight` in the file: the LM head reuses the embedding.
    pub tied_embeddings: bool,
    /// `tokenizer.ggml.bos_token_id`.
    pub bos_token_id: Option<u64>,
    /// `tokenizer.ggml.eos_token_id`.
    pub eos_token_id: Option<u64>,
    /// `tokenizer.ggml.padding_token_id`.
    pub pad_token_id: Option<u64>,
}

fn to_usize(key: &str, v: u64) -> Result<usize, GgufError> {
    usize::try_from(v).map_err(|_| GgufError::BadModel(format!("{key} = {v} is too large")))
}

impl LlamaParams {
    /// Reads and checks the hyperparameters; errors unless the architecture is `llama` and
    /// the widths are consistent.
    pub fn from_gguf(file: &GgufFile<'_>) -> Result<Self, GgufError> {
        let arch = file.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(GgufError::Unsupported {
                what: "architecture",
                value: arch.to_owned(),
            });
        }
        let int = |key: &str| file.get_u64(key).and_then(|v| to_usize(key, v));
        let block_count = int("llama.block_count")?;
        let embedding_length = int("llama.embedding_length")?;
        let feed_forward_length = int("llama.feed_forward_length")?;
        let head_count = int("llama.attention.head_count")?;
        let head_count_kv = match file.get_u64_opt("llama.attention.head_count_kv")? {
            Some(v) => to_usize("llama.attention.head_count_kv", v)?,
            None => head_count,
        };
        if head_count == 0 || head_count_kv == 0 || head_count % head_count_kv != 0 {
            return Err(GgufError::BadModel(format!(
                "{head_count} attention heads cannot be shared by {head_count_kv} KV heads"
            )));
        }
        let head_dim = match file.get_u64_opt("llama.attention.key_length")? {
            Some(v) => to_usize("llama.attention.key_length", v)?,
            None if embedding_length % head_count == 0 => embedding_length / head_count,
            None => {
                return Err(GgufError::BadModel(format!(
                    "width {embedding_length} is not divisible by {head_count} heads"
                )))
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(GgufError::BadModel(format!(
                "head dimension {head_dim} must be even and positive for RoPE"
            )));
        }
        if let Some(rope_dim) = file.get_u64_opt("llama.rope.dimension_count")? {
            if rope_dim != head_dim as u64 {
                return Err(GgufError::Unsupported {
                    what: "partial rotary embedding (llama.rope.dimension_count)",
                    value: format!("{rope_dim} of head dimension {head_dim}"),
                });
            }
        }
        if let Some(scaling) = file.get_str_opt("llama.rope.scaling.type")? {
            if scaling != "none" {
                return Err(GgufError::Unsupported {
                    what: "RoPE scaling",
                    value: scaling.to_owned(),
                });
            }
        }
        let embd = file
            .tensor("token_embd.weight")
            .ok_or_else(|| GgufError::MissingTensor {
                name: "token_embd.weight".into(),
            })?;
        let vocab_size = match embd.dims.as_slice() {
            [width, rows] if *width == embedding_length as u64 => {
                to_usize("token_embd.weight rows", *rows)?
            }
            dims => {
                return Err(GgufError::BadModel(format!(
                    "token_embd.weight has dims {dims:?}, expected [{embedding_length}, vocab]"
                )))
            }
        };
        if let Some(v) = file.get_u64_opt("llama.vocab_size")? {
            if v != vocab_size as u64 {
                return Err(GgufError::BadModel(format!(
                    "llama.vocab_size {v} but token_embd.weight has {vocab_size} rows"
                )));
            }
        }
        Ok(Self {
            block_count,
            context_length: file.get_u64("llama.context_length")?,
            embedding_length,
            feed_forward_length,
            head_count,
            head_count_kv,
            head_dim,
            rope_freq_base: file
                .get_f64_opt("llama.rope.freq_base")?
                .unwrap_or(10_000.0),
            rms_norm_eps: file.get_f64("llama.attention.layer_norm_rms_epsilon")?,
            vocab_size,
            tied_embeddings: file.tensor("output.weight").is_none(),
            bos_token_id: file.get_u64_opt("tokenizer.ggml.bos_token_id")?,
            eos_token_id: file.get_u64_opt("tokenizer.ggml.eos_token_id")?,
            pad_token_id: file.get_u64_opt("tokenizer.ggml.padding_token_id")?,
        })
    }

    /// A Hugging Face `LlamaForCausalLM` `config.json` (float32 weights).
    pub fn hf_config(&self) -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.embedding_length,
            "initializer_range": 0.02,
            "intermediate_size": self.feed_forward_length,
            "max_position_embeddings": self.context_length,
            "mlp_bias": false,
            "num_attention_heads": self.head_count,
            "num_hidden_layers": self.block_count,
            "num_key_value_heads": self.head_count_kv,
            "pretraining_tp": 1,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": null,
            "rope_theta": self.rope_freq_base,
            "tie_word_embeddings": self.tied_embeddings,
            "torch_dtype": "float32",
            "use_cache": true,
            "vocab_size": self.vocab_size,
        })
    }

    /// `generation_config.json`: the special token ids, nothing sampled.
    pub fn hf_generation_config(&self) -> Value {
        json!({
            "_from_model_config": true,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
        })
    }
}

/// What a GGUF tensor becomes in the HF checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HfTensor {
    /// The HF parameter name.
    pub name: String,
    /// Q/K rows to un-permute with this many heads (`None`: copy rows as they are).
    pub unpermute_heads: Option<usize>,
}

/// Maps a GGUF tensor name of a `llama` model to its HF name (and whether its rows need
/// un-permuting); `None` for names outside the architecture.
pub fn hf_tensor(gguf_name: &str, params: &LlamaParams) -> Option<HfTensor> {
    let plain = |name: String| {
        Some(HfTensor {
            name,
            unpermute_heads: None,
        })
    };
    match gguf_name {
        "token_embd.weight" => return plain("model.embed_tokens.weight".into()),
        "output_norm.weight" => return plain("model.norm.weight".into()),
        "output.weight" => return plain("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf_name.strip_prefix("blk.")?;
    let (layer_text, rest) = rest.split_once('.')?;
    let layer: usize = layer_text.parse().ok()?;
    // `blk.01` or `blk.+1` would alias `blk.1`; only the canonical spelling maps.
    if layer >= params.block_count || layer.to_string() != layer_text {
        return None;
    }
    let (part, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let (module, unpermute_heads) = match part {
        "attn_q" => ("self_attn.q_proj", Some(params.head_count)),
        "attn_k" => ("self_attn.k_proj", Some(params.head_count_kv)),
        "attn_v" => ("self_attn.v_proj", None),
        "attn_output" => ("self_attn.o_proj", None),
        "ffn_gate" => ("mlp.gate_proj", None),
        "ffn_up" => ("mlp.up_proj", None),
        "ffn_down" => ("mlp.down_proj", None),
        "attn_norm" => ("input_layernorm", None),
        "ffn_norm" => ("post_attention_layernorm", None),
        _ => return None,
    };
    Some(HfTensor {
        name: format!("model.layers.{layer}.{module}.{suffix}"),
        unpermute_heads,
    })
}

/// Undoes llama.cpp's per-head Q/K row permutation (transformers' `reverse_permute_weights`):
/// HF row `h*hd + j*hd/2 + i` is GGUF row `h*hd + 2i + j`.
///
/// # Shapes
/// - `w`: `[rows, cols]` row-major, `rows = n_head * head_dim` (`cols = 1` for a bias)
/// - returns: `[rows, cols]`
pub fn unpermute_qk_rows(
    w: &[f32],
    rows: usize,
    cols: usize,
    n_head: usize,
) -> Result<Vec<f32>, GgufError> {
    if n_head == 0 || rows % (2 * n_head) != 0 || rows.checked_mul(cols) != Some(w.len()) {
        return Err(GgufError::BadModel(format!(
            "cannot un-permute a [{rows}, {cols}] Q/K matrix ({} values) over {n_head} heads",
            w.len()
        )));
    }
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let hf_row = h * head_dim + j * half + i;
                let gguf_row = h * head_dim + 2 * i + j;
                out[hf_row * cols..(hf_row + 1) * cols]
                    .copy_from_slice(&w[gguf_row * cols..(gguf_row + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// The HF names every `llama` checkpoint needs (the LM head only when untied).
pub fn required_hf_tensors(params: &LlamaParams) -> Vec<String> {
    let mut names = vec![
        "model.embed_tokens.weight".to_owned(),
        "model.norm.weight".to_owned(),
    ];
    if !params.tied_embeddings {
        names.push("lm_head.weight".to_owned());
    }
    for layer in 0..params.block_count {
        for module in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ] {
            names.push(format!("model.layers.{layer}.{module}.weight"));
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(block_count: usize) -> LlamaParams {
        LlamaParams {
            block_count,
            context_length: 16,
            embedding_length: 8,
            feed_forward_length: 16,
            head_count: 4,
            head_count_kv: 2,
            head_dim: 2,
            rope_freq_base: 10_000.0,
            rms_norm_eps: 1e-5,
            vocab_size: 10,
            tied_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
        }
    }

    #[test]
    fn names_map_to_the_hf_table() {
        let p = params(12);
        let name = |g: &str| hf_tensor(g, &p).map(|t| (t.name, t.unpermute_heads));
        assert_eq!(
            name("token_embd.weight"),
            Some(("model.embed_tokens.weight".into(), None))
        );
        assert_eq!(name("output.weight"), Some(("lm_head.weight".into(), None)));
        assert_eq!(
            name("output_norm.weight"),
            Some(("model.norm.weight".into(), None))
        );
        assert_eq!(
            name("blk.11.attn_q.weight"),
            Some(("model.layers.11.self_attn.q_proj.weight".into(), Some(4)))
        );
        assert_eq!(
            name("blk.0.attn_k.bias"),
            Some(("model.layers.0.self_attn.k_proj.bias".into(), Some(2)))
        );
        assert_eq!(
            name("blk.3.attn_output.weight"),
            Some(("model.layers.3.self_attn.o_proj.weight".into(), None))
        );
        assert_eq!(
            name("blk.3.ffn_down.weight"),
            Some(("model.layers.3.mlp.down_proj.weight".into(), None))
        );
        assert_eq!(
            name("blk.3.ffn_norm.weight"),
            Some((
                "model.layers.3.post_attention_layernorm.weight".into(),
                None
            ))
        );
        assert_eq!(
            name("blk.3.attn_norm.weight"),
            Some(("model.layers.3.input_layernorm.weight".into(), None))
        );
        for bad in [
            "blk.12.attn_q.weight",
            "blk.01.attn_q.weight",
            "blk.1.attn_q.scale",
            "blk.1.ffn_gate_exps.weight",
            "rope_freqs.weight",
            "blk..attn_q.weight",
        ] {
            assert_eq!(name(bad), None, "{bad}");
        }
    }

    #[test]
    fn required_tensors_follow_tying() {
        let mut p = params(2);
        assert_eq!(required_hf_tensors(&p).len(), 2 + 2 * 9);
        p.tied_embeddings = false;
        assert!(required_hf_tensors(&p).contains(&"lm_head.weight".to_owned()));
    }
}
