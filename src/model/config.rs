//! `config.json` of a Hugging Face checkpoint → [`ModelConfig`], the one description of a
//! decoder that the rest of dreamloop reads.
//!
//! Families: `llama` (SmolLM2 is one), `mistral`, `qwen2` (q/k/v bias), `qwen3` (per-head
//! q/k RMSNorm), and the hybrid Gated-DeltaNet decoders `qwen3_next` (fused GDN projections,
//! optional sparse MoE) and `qwen3_5` / `qwen3_5_text` (separate projections; the multimodal
//! `qwen3_5` nests the text decoder's config under `text_config` and its weights under
//! `model.language_model.*`). RoPE parameters come in two spellings: the older top-level `rope_theta` +
//! `rope_scaling` that most published checkpoints carry, and transformers ≥ 5's
//! `rope_parameters` (what the shared fixtures use). Scaling types `default`, `linear` and
//! `llama3` follow transformers' `modeling_rope_utils.py`; anything else is refused rather
//! than silently computed wrong.
//!
//! Deliberately strict: a field whose default would silently change the numbers
//! (`rms_norm_eps`, `rope_theta`) must be present; only fields whose transformers default
//! is part of the architecture's definition (`num_key_value_heads` = heads, `head_dim` =
//! hidden / heads) are filled in.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Why a `config.json` could not be turned into a [`ModelConfig`].
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {source}")]
    Json {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: missing field `{field}`")]
    Missing { path: String, field: String },
    #[error("{path}: field `{field}`: {reason}")]
    Invalid {
        path: String,
        field: String,
        reason: String,
    },
    #[error(
        "{path}: unsupported model_type `{model_type}` (supported: llama, mistral, qwen2, qwen3, qwen3_next, qwen3_5, qwen3_5_text)"
    )]
    UnsupportedModelType { path: String, model_type: String },
}

/// Upper bounds on a `config.json`'s sizes, checked before any of them sizes an allocation.
/// Each is far above every released model (Llama-3.1-405B: 126 layers, hidden 16384,
/// 128 heads, vocab 128256; DeepSeek-V3: 256 experts), so they only catch nonsense; the
/// weight files then bound the real shapes ([`crate::model::Model::load_as`]).
pub const MAX_LAYERS: usize = 1024;
/// Bound on `hidden_size`, `head_dim` and the other per-channel widths
/// (`intermediate_size` gets 8× this).
pub const MAX_WIDTH: usize = 1 << 16;
/// Bound on attention and key/value heads.
pub const MAX_HEADS: usize = 1024;
/// Bound on `vocab_size`.
pub const MAX_VOCAB: usize = 1 << 22;
/// Bound on `max_position_embeddings`.
pub const MAX_POSITIONS: usize = 1 << 24;
/// Bound on `num_experts`.
pub const MAX_EXPERTS: usize = 4096;

/// Which family's conventions apply (bias placement, q/k norm).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    /// Qwen3-Next: hybrid GDN / gated attention, fused GDN projections, optional MoE.
    #[serde(rename = "qwen3_next")]
    Qwen3Next,
    /// Qwen3.5 text decoder: hybrid GDN / gated attention, separate GDN projections.
    #[serde(rename = "qwen3_5_text")]
    Qwen35,
}

impl Family {
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Mistral => "mistral",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Qwen3Next => "qwen3_next",
            Family::Qwen35 => "qwen3_5_text",
        }
    }

    /// The hybrid families: Gated DeltaNet layers, gated attention, zero-centred norms.
    pub fn is_hybrid(self) -> bool {
        matches!(self, Family::Qwen3Next | Family::Qwen35)
    }
}

/// What a decoder layer mixes tokens with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    /// Causal softmax attention with a KV cache (`self_attn`).
    FullAttention,
    /// Gated DeltaNet, a gated delta-rule recurrence (`linear_attn`).
    LinearAttention,
}

/// Shape of the Gated DeltaNet layers (`linear_*` fields of the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearAttnConfig {
    pub num_key_heads: usize,
    pub num_value_heads: usize,
    pub key_head_dim: usize,
    pub value_head_dim: usize,
    /// Width of the causal depthwise convolution.
    pub conv_kernel: usize,
    /// qwen3_next: `in_proj_qkvz` / `in_proj_ba` grouped by key head; qwen3_5: separate
    /// `in_proj_qkv`, `in_proj_z`, `in_proj_b`, `in_proj_a`.
    pub fused_projections: bool,
}

/// Sparse mixture-of-experts feed-forward (qwen3_next with `num_experts > 0`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// Experts each token is routed to.
    pub top_k: usize,
    /// Renormalise the chosen experts' probabilities to sum to one.
    pub norm_topk_prob: bool,
    /// Inner width of each routed expert.
    pub expert_intermediate_size: usize,
    /// Inner width of the always-on shared expert (0 = none).
    pub shared_expert_intermediate_size: usize,
    /// Per layer: sparse MoE (true) or the dense MLP of `intermediate_size` (false).
    pub sparse_layers: Vec<bool>,
}

/// RoPE frequency scaling, as transformers' `ROPE_INIT_FUNCTIONS` computes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain `theta^(-2i/d)` frequencies.
    Default,
    /// Position interpolation: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's band-wise rescaling of low frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Everything the decoder needs to know about a checkpoint's architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Family conventions (bias layout, q/k norm).
    pub family: Family,
    /// Rows of the embedding matrix and of the LM head.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP's inner projection.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head width; may differ from hidden / heads (qwen3).
    pub head_dim: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Longest context the checkpoint was trained for (kept for saving back).
    pub max_position_embeddings: usize,
    /// LM head shares the embedding matrix (no `lm_head.weight` in the file).
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (qwen2 always; llama/qwen3 with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (llama/qwen3 `attention_bias`).
    pub o_bias: bool,
    /// gate/up/down carry a bias (llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (qwen3).
    pub qk_norm: bool,
    /// Sliding-window attention width (mistral), `None` for full causal attention.
    pub sliding_window: Option<usize>,
    /// Token mixer of each layer (all `FullAttention` for the dense families).
    pub layer_types: Vec<LayerKind>,
    /// Gated DeltaNet shape, for configs with linear-attention layers.
    pub linear_attn: Option<LinearAttnConfig>,
    /// transformers' rotary `dim`: `partial_rotary_factor · head_dim`, truncated. It sets the
    /// frequencies (`base^(−2i/dim)`, `i < ⌈dim/2⌉`); RoPE rotates `2·⌈dim/2⌉` channels of each
    /// head (one more than `dim` when it is odd, as transformers does) and the rest pass through.
    pub rotary_dim: usize,
    /// `q_proj` also produces a per-head output gate: `attn · sigmoid(gate)` (hybrid families).
    pub attn_output_gate: bool,
    /// RMSNorms scale by `1 + w` (zero-centred weights, hybrid families) instead of `w`.
    pub norm_unit_offset: bool,
    /// Sparse MoE feed-forward, when the config has experts.
    pub moe: Option<MoeConfig>,
    /// Where the decoder's tensors live in the checkpoint: `model.` for a causal LM,
    /// `model.language_model.` for a multimodal qwen3_5 (whose `model.visual.*` and `mtp.*`
    /// tensors are carried through unchanged).
    pub text_prefix: String,
    /// Special token ids, kept for generation and for saving back.
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// The original `config.json`, written back unchanged on save so that transformers and
    /// vLLM see exactly what they were given.
    pub raw: Value,
}

impl ModelConfig {
    /// Reads and parses `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: shown.clone(),
            source,
        })?;
        let value: Value = serde_json::from_str(&text).map_err(|source| ConfigError::Json {
            path: shown.clone(),
            source,
        })?;
        Self::from_json(value, &shown)
    }

    /// Parses an already-read `config.json`; `path` only names the file in errors.
    pub fn from_json(value: Value, path: &str) -> Result<Self, ConfigError> {
        let root = value.as_object().ok_or_else(|| ConfigError::Invalid {
            path: path.into(),
            field: "<root>".into(),
            reason: "expected a JSON object".into(),
        })?;
        let top = Fields {
            obj: root,
            path,
            prefix: "",
        };
        let model_type = top.string("model_type")?;
        // The multimodal qwen3_5 (`Qwen3_5ForConditionalGeneration`) describes its text decoder
        // in `text_config`; token ids and tying may sit at either level.
        let nested = model_type == "qwen3_5";
        let merged: Map<String, Value>;
        let f = if nested {
            let text = top
                .get("text_config")
                .and_then(Value::as_object)
                .ok_or_else(|| top.missing("text_config"))?;
            let mut m = text.clone();
            for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
                if let Some(v) = root.get(key).filter(|v| !v.is_null()) {
                    m.entry(key).or_insert_with(|| v.clone());
                }
            }
            // Qwen3_5ForConditionalGeneration ties by the top-level flag only (default false);
            // `text_config.tie_word_embeddings` is ignored (checked against transformers 5.23).
            let tie = root
                .get("tie_word_embeddings")
                .cloned()
                .unwrap_or(Value::Bool(false));
            m.insert("tie_word_embeddings".into(), tie);
            merged = m;
            Fields {
                obj: &merged,
                path,
                prefix: "text_config.",
            }
        } else {
            top
        };
        let family = match model_type.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "qwen3_next" => Family::Qwen3Next,
            "qwen3_5" | "qwen3_5_text" => Family::Qwen35,
            _ => {
                return Err(ConfigError::UnsupportedModelType {
                    path: path.into(),
                    model_type,
                })
            }
        };
        let hybrid = family.is_hybrid();
        if let Some(act) = f.opt_string("hidden_act")? {
            if act != "silu" {
                return Err(f.invalid(
                    "hidden_act",
                    format!("`{act}` is not supported (only silu)"),
                ));
            }
        }
        // Every size is bounded before anything is sized by it: a hostile or mistyped
        // `num_hidden_layers: 100000000000` is an error naming the field, not a
        // 100 GB allocation that aborts the process.
        let hidden_size = f.bounded("hidden_size", MAX_WIDTH)?;
        let num_hidden_layers = f.bounded("num_hidden_layers", MAX_LAYERS)?;
        let num_attention_heads = f.bounded("num_attention_heads", MAX_HEADS)?;
        for (field, max) in [
            ("num_key_value_heads", MAX_HEADS),
            ("head_dim", MAX_WIDTH),
            ("vocab_size", MAX_VOCAB),
            ("intermediate_size", MAX_WIDTH * 8),
            ("max_position_embeddings", MAX_POSITIONS),
            ("linear_num_key_heads", MAX_HEADS),
            ("linear_num_value_heads", MAX_HEADS),
            ("linear_key_head_dim", MAX_WIDTH),
            ("linear_value_head_dim", MAX_WIDTH),
            ("linear_conv_kernel_dim", MAX_WIDTH),
            ("num_experts", MAX_EXPERTS),
            ("moe_intermediate_size", MAX_WIDTH * 8),
            ("shared_expert_intermediate_size", MAX_WIDTH * 8),
        ] {
            if f.get(field).is_some() {
                f.bounded(field, max)?;
            }
        }
        let num_key_value_heads = f
            .opt_usize("num_key_value_heads")?
            .unwrap_or(num_attention_heads);
        if num_attention_heads == 0
            || num_key_value_heads == 0
            || num_attention_heads % num_key_value_heads != 0
        {
            return Err(f.invalid(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = f
            .opt_usize("head_dim")?
            .unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(f.invalid("head_dim", format!("{head_dim} must be even and positive")));
        }
        let (rope_theta, rope_scaling) = parse_rope(&f)?;
        let rotary_dim = rotary_dim(&f, head_dim, hybrid)?;
        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match family {
            // Qwen2 hard-codes bias on q/k/v and none on o_proj.
            Family::Qwen2 => (true, false),
            _ => (attention_bias, attention_bias),
        };
        let sliding_window = match family {
            Family::Mistral => f.opt_usize("sliding_window")?,
            Family::Llama => None,
            _ => {
                if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
                    return Err(f.invalid(
                        "use_sliding_window",
                        "sliding-window layers are not supported for qwen".into(),
                    ));
                }
                None
            }
        };
        let layer_types = layer_types(&f, num_hidden_layers, hybrid)?;
        let linear_attn = if layer_types.contains(&LayerKind::LinearAttention) {
            let num_key_heads = f.usize("linear_num_key_heads")?;
            let num_value_heads = f.usize("linear_num_value_heads")?;
            if num_key_heads == 0 || num_value_heads % num_key_heads != 0 {
                return Err(f.invalid(
                    "linear_num_value_heads",
                    format!("{num_value_heads} is not a positive multiple of linear_num_key_heads {num_key_heads}"),
                ));
            }
            let positive = |field: &str| -> Result<usize, ConfigError> {
                match f.usize(field)? {
                    0 => Err(f.invalid(field, "must be positive".into())),
                    n => Ok(n),
                }
            };
            Some(LinearAttnConfig {
                num_key_heads,
                num_value_heads,
                key_head_dim: positive("linear_key_head_dim")?,
                value_head_dim: positive("linear_value_head_dim")?,
                conv_kernel: positive("linear_conv_kernel_dim")?,
                fused_projections: family == Family::Qwen3Next,
            })
        } else {
            None
        };
        let moe = match (family, f.opt_usize("num_experts")?.unwrap_or(0)) {
            (Family::Qwen3Next, num_experts) if num_experts > 0 => {
                let top_k = f.usize("num_experts_per_tok")?;
                if top_k == 0 || top_k > num_experts {
                    return Err(f.invalid(
                        "num_experts_per_tok",
                        format!("{top_k} must be between 1 and num_experts {num_experts}"),
                    ));
                }
                let step = f.opt_usize("decoder_sparse_step")?.unwrap_or(1).max(1);
                let dense_only = f.opt_usize_list("mlp_only_layers")?.unwrap_or_default();
                Some(MoeConfig {
                    num_experts,
                    top_k,
                    norm_topk_prob: f.opt_bool("norm_topk_prob")?.unwrap_or(true),
                    expert_intermediate_size: f.usize("moe_intermediate_size")?,
                    shared_expert_intermediate_size: f.usize("shared_expert_intermediate_size")?,
                    sparse_layers: (0..num_hidden_layers)
                        .map(|i| !dense_only.contains(&i) && (i + 1) % step == 0)
                        .collect(),
                })
            }
            _ => None,
        };
        Ok(ModelConfig {
            family,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: f.f64("rms_norm_eps")?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: f.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            // transformers' PretrainedConfig default.
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            qk_norm: family == Family::Qwen3 || hybrid,
            sliding_window,
            layer_types,
            linear_attn,
            rotary_dim,
            attn_output_gate: hybrid,
            norm_unit_offset: hybrid,
            moe,
            text_prefix: if nested {
                "model.language_model.".into()
            } else {
                "model.".into()
            },
            bos_token_id: f.opt_token_id("bos_token_id")?,
            eos_token_id: f.opt_token_id("eos_token_id")?,
            pad_token_id: f.opt_token_id("pad_token_id")?,
            raw: value.clone(),
        })
    }

    /// Number of query heads sharing one key/value head.
    /// The id padding batches of this model: `pad_token_id`, else `eos_token_id`, else 0
    /// (padded positions are masked, so any valid id works; these keep it a real token).
    pub fn pad_id(&self) -> u32 {
        self.pad_token_id.or(self.eos_token_id).unwrap_or(0)
    }

    pub fn kv_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// RoPE inverse frequencies (`⌈rotary_dim / 2⌉` values), as transformers computes them.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.rotary_dim;
        // transformers computes `base ** (arange(0, dim, 2).float() / dim)` in float32;
        // mirror that rounding. `arange(0, dim, 2)` has ⌈dim/2⌉ entries, so an odd `dim` (head_dim
        // 20 × 0.25 = 5) gives 3 frequencies and the tables (`cat(freqs, freqs)`) rotate 6 channels.
        let base: Vec<f32> = (0..dim.div_ceil(2))
            .map(|i| 1.0 / (self.rope_theta as f32).powf((2 * i) as f32 / dim as f32))
            .collect();
        match &self.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old_ctx = *original_max_position_embeddings as f32;
                let low_freq_wavelen = old_ctx / *low_freq_factor as f32;
                let high_freq_wavelen = old_ctx / *high_freq_factor as f32;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_freq_wavelen {
                            f / *factor as f32
                        } else if wavelen < high_freq_wavelen {
                            f
                        } else {
                            let smooth = (old_ctx / wavelen - *low_freq_factor as f32)
                                / (*high_freq_factor as f32 - *low_freq_factor as f32);
                            (1.0 - smooth) * f / *factor as f32 + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

/// `layer_types` as listed, or (hybrid families) every `full_attention_interval`-th layer full
/// attention and the rest Gated DeltaNet, as transformers derives it (interval default 4).
fn layer_types(f: &Fields, layers: usize, hybrid: bool) -> Result<Vec<LayerKind>, ConfigError> {
    let Some(list) = f.get("layer_types") else {
        if !hybrid {
            return Ok(vec![LayerKind::FullAttention; layers]);
        }
        let interval = f.opt_usize("full_attention_interval")?.unwrap_or(4);
        if interval == 0 {
            return Err(f.invalid("full_attention_interval", "must be positive".into()));
        }
        return Ok((0..layers)
            .map(|i| {
                if (i + 1) % interval == 0 {
                    LayerKind::FullAttention
                } else {
                    LayerKind::LinearAttention
                }
            })
            .collect());
    };
    let items = list
        .as_array()
        .ok_or_else(|| f.invalid("layer_types", format!("expected a list, found {list}")))?;
    if items.len() != layers {
        return Err(f.invalid(
            "layer_types",
            format!("{} entries for num_hidden_layers {layers}", items.len()),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_str() {
            Some("full_attention") => Ok(LayerKind::FullAttention),
            Some("linear_attention") if hybrid => Ok(LayerKind::LinearAttention),
            _ => Err(f.invalid(
                &format!("layer_types[{i}]"),
                format!(
                    "{v} is not supported here (expected \"full_attention\"{})",
                    if hybrid {
                        " or \"linear_attention\""
                    } else {
                        ""
                    }
                ),
            )),
        })
        .collect()
}

/// `partial_rotary_factor · head_dim` (transformers truncates); the factor sits in
/// `rope_parameters` or at the top level, default 1 (0.25 for the hybrid families, as their
/// configs default it). An odd result is transformers' too (see [`ModelConfig::inv_freq`]); the
/// rotated width `2·⌈dim/2⌉` fits because `head_dim` is even.
fn rotary_dim(f: &Fields, head_dim: usize, hybrid: bool) -> Result<usize, ConfigError> {
    let nested = match f.get("rope_parameters").and_then(Value::as_object) {
        Some(obj) => Fields {
            obj,
            path: f.path,
            prefix: f.prefix,
        }
        .opt_f64("partial_rotary_factor")?,
        None => None,
    };
    let factor = nested
        .or(f.opt_f64("partial_rotary_factor")?)
        .unwrap_or(if hybrid { 0.25 } else { 1.0 });
    let dim = (head_dim as f64 * factor) as usize;
    if dim == 0 || dim > head_dim {
        return Err(f.invalid(
            "partial_rotary_factor",
            format!(
                "{factor} gives {dim} rotary channels of head_dim {head_dim}; need 1..=head_dim"
            ),
        ));
    }
    Ok(dim)
}

/// RoPE base and scaling from either spelling.
fn parse_rope(f: &Fields) -> Result<(f64, RopeScaling), ConfigError> {
    // transformers ≥ 5: everything under `rope_parameters`.
    if let Some(params) = f.obj.get("rope_parameters").filter(|v| !v.is_null()) {
        let obj = params
            .as_object()
            .ok_or_else(|| f.invalid("rope_parameters", "expected an object".into()))?;
        let sub = Fields {
            obj,
            path: f.path,
            prefix: f.prefix,
        };
        let theta = sub
            .opt_f64("rope_theta")?
            .or(f.opt_f64("rope_theta")?)
            .ok_or_else(|| f.missing("rope_parameters.rope_theta"))?;
        let kind = sub.opt_string("rope_type")?.or(sub.opt_string("type")?);
        return Ok((theta, scaling_of(&sub, kind.as_deref(), "rope_parameters")?));
    }
    let theta = f
        .opt_f64("rope_theta")?
        .ok_or_else(|| f.missing("rope_theta"))?;
    let scaling = match f.obj.get("rope_scaling").filter(|v| !v.is_null()) {
        None => RopeScaling::Default,
        Some(v) => {
            let obj = v
                .as_object()
                .ok_or_else(|| f.invalid("rope_scaling", "expected an object".into()))?;
            let sub = Fields {
                obj,
                path: f.path,
                prefix: f.prefix,
            };
            let kind = sub.opt_string("rope_type")?.or(sub.opt_string("type")?);
            scaling_of(&sub, kind.as_deref(), "rope_scaling")?
        }
    };
    Ok((theta, scaling))
}

fn scaling_of(sub: &Fields, kind: Option<&str>, prefix: &str) -> Result<RopeScaling, ConfigError> {
    let need = |name: &str| -> Result<f64, ConfigError> {
        sub.opt_f64(name)?
            .ok_or_else(|| sub.missing(&format!("{prefix}.{name}")))
    };
    match kind.unwrap_or("default") {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear {
            factor: need("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        }),
        other => Err(sub.invalid(
            &format!("{prefix}.rope_type"),
            format!("RoPE scaling `{other}` is not supported (supported: default, linear, llama3)"),
        )),
    }
}

/// Typed field access that names the file and field in every error.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a str,
    /// Shown before field names in errors (`text_config.` for a nested text config).
    prefix: &'a str,
}

impl Fields<'_> {
    fn missing(&self, field: &str) -> ConfigError {
        ConfigError::Missing {
            path: self.path.into(),
            field: format!("{}{field}", self.prefix),
        }
    }
    fn invalid(&self, field: &str, reason: String) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.into(),
            field: format!("{}{field}", self.prefix),
            reason,
        }
    }
    fn opt_usize_list(&self, field: &str) -> Result<Option<Vec<usize>>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_u64().map(|n| n as usize).ok_or_else(|| {
                        self.invalid(field, format!("expected non-negative integers, found {v}"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => Err(self.invalid(field, format!("expected a list, found {v}"))),
        }
    }
    fn get(&self, field: &str) -> Option<&Value> {
        self.obj.get(field).filter(|v| !v.is_null())
    }
    fn string(&self, field: &str) -> Result<String, ConfigError> {
        self.opt_string(field)?.ok_or_else(|| self.missing(field))
    }
    fn opt_string(&self, field: &str) -> Result<Option<String>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.invalid(field, format!("expected a string, found {v}"))),
        }
    }
    /// A required size no larger than `max` (see the `MAX_*` bounds).
    fn bounded(&self, field: &str, max: usize) -> Result<usize, ConfigError> {
        let n = self.usize(field)?;
        if n > max {
            return Err(self.invalid(
                field,
                format!("{n} is over the bound of {max} (no released model comes near it)"),
            ));
        }
        Ok(n)
    }

    fn usize(&self, field: &str) -> Result<usize, ConfigError> {
        self.opt_usize(field)?.ok_or_else(|| self.missing(field))
    }
    fn opt_usize(&self, field: &str) -> Result<Option<usize>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                self.invalid(field, format!("expected a non-negative integer, found {v}"))
            }),
        }
    }
    fn f64(&self, field: &str) -> Result<f64, ConfigError> {
        self.opt_f64(field)?.ok_or_else(|| self.missing(field))
    }
    fn opt_f64(&self, field: &str) -> Result<Option<f64>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.invalid(field, format!("expected a number, found {v}"))),
        }
    }
    fn opt_bool(&self, field: &str) -> Result<Option<bool>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.invalid(field, format!("expected true or false, found {v}"))),
        }
    }
    /// Token ids may be an integer or (for eos in newer checkpoints) a list; the first wins.
    fn opt_token_id(&self, field: &str) -> Result<Option<u32>, ConfigError> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Array(items)) => {
                Ok(items.first().and_then(|v| v.as_u64()).map(|n| n as u32))
            }
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as u32))
                .ok_or_else(|| self.invalid(field, format!("expected a token id, found {v}"))),
        }
    }
}
