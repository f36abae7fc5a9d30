//! The memory and time budget of one training step, computed from a model's `config.json`
//! and the run's settings before anything is loaded: `dreamloop plan`, and the check with
//! which `dreamloop run` refuses a configuration that cannot fit its device.
//!
//! [`plan`] is a pure function of a [`ModelConfig`] and [`PlanSettings`]. It models *this*
//! implementation, not PyTorch's: which tensors burn 0.22's autodiff keeps for the backward
//! pass is read off the forward code (`model/llama.rs`, `model/gdn.rs`, `model/moe.rs`,
//! `model/logprobs.rs`) with burn's rules — a product or matmul keeps each operand whose
//! partner needs a gradient; `exp`, `sigmoid` keep their output; `powi`, `recip` their input;
//! additions, slices, concatenations, reshapes and scalar products keep nothing; burn's flex
//! backend copies on `reshape` of a non-contiguous view. The counts per layer are written
//! next to the code that produces them ([`attention_kept`], [`gdn_kept`], [`mlp_kept`]).
//! One hazard of ours is counted too: `Linear::forward`'s `weight.transpose().unsqueeze_dim(0)`
//! is a reshape of a transposed view, which flex copies, and the matmul keeps the copy — so
//! every matmul weight is held twice from its layer's forward to its layer's backward.
//!
//! The step's peak is the largest of these moments, each a sum of what is alive then:
//! - the LM head's backward: every layer's kept activations, the log-softmax buffers;
//! - each layer's backward, top layer first: the kept activations of the layers below it,
//!   the gradients of the layers above it, its own backward buffers;
//! - DPO only: the frozen reference's forward, after the policy's graph is built;
//! - the optimizer update: all gradients, and the weights held twice (`Trainer::step` keeps
//!   a `backup` of the model while the optimizer builds the new one).
//!
//! Weights, the resident DPO reference (`Trainer::new`'s `model.valid()` shares the starting
//! weights only until the first update replaces them; from the second step on it is a second
//! copy) and the optimizer state are alive at every moment. The optimizer's state follows
//! `train/optim/`: AdamW keeps two f32 moments of each gradient (f32 in bf16 runs too),
//! APOLLO projects the tensors [`ApolloConfig::projects`] names (a projection `r × min(m, n)`
//! and moments `r × max(m, n)`) and keeps AdamW moments for the rest.
//!
//! FLOPs per step are `6 · (parameters in matmuls) · tokens` plus attention's full `T × T`
//! scores (this implementation computes the whole square, masked) and the Gated DeltaNet's
//! chunk work (`../shared/GDN.md`), plus one more forward with per-layer recompute and the
//! reference's forward for DPO; the `(I + A)⁻¹` solve inside each chunk (under 5 % of the GDN
//! work) is left out.
//!
//! The dtype, per-layer recompute, the chunked head and the streamed reference are read from
//! the configuration ([`PlanSettings::from_config`]); the `dreamloop plan` flags override
//! them, so that it can answer "would it fit if…".

use serde::{Deserialize, Serialize};

use crate::config::{Backend, DreamConfig};
use crate::label::Phase;
use crate::model::config::{LayerKind, LinearAttnConfig, ModelConfig};
use crate::model::gdn::CHUNK;
use crate::train::optim::{ApolloConfig, OptimizerConfig};
use crate::train::reference::BUCKET_SEQUENCES;
use crate::train::trainer::glob_match;

/// Bytes assumed for a CUDA device when none is stated: one H200 (141 GB).
pub const DEFAULT_CUDA_DEVICE_BYTES: u64 = 141_000_000_000;

/// Tokens per log-softmax chunk that the refusal message proposes.
pub const SUGGESTED_LOGITS_CHUNK: usize = 1024;

/// Dense bf16 tensor-core peak of an H200 (NVIDIA's datasheet, without sparsity).
pub const H200_BF16_FLOPS: f64 = 989e12;

/// FP32 peak of an H200 on its CUDA cores (burn's f32 matmuls are not assumed to use TF32).
pub const H200_F32_FLOPS: f64 = 67e12;

/// The share of peak FLOPs a step is assumed to reach unless told otherwise.
pub const DEFAULT_MFU: f64 = 0.40;

/// A setting the planner could not read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// A memory size that is not a number with an optional B / KB / MB / GB / TB (or KiB,
    /// MiB, GiB, TiB) suffix.
    #[error("`{text}` is not a memory size such as 141GB, 24GiB or 512MB")]
    BadSize { text: String },
}

/// Storage type of weights, gradients and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F32,
    Bf16,
}

impl Dtype {
    /// Bytes per element.
    pub fn bytes(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::Bf16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F32 => "f32",
            Dtype::Bf16 => "bf16",
        }
    }
}

/// How the DPO reference's log-probs are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReferenceMode {
    /// A second, frozen copy of the weights held by the trainer.
    Resident,
    /// The reference read from its files one unit at a time (`[model] stream_reference`).
    Streamed,
}

/// Which device the memory is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// burn flex on the host: the plan is checked against host memory.
    Cpu,
    /// burn's CUDA backend.
    Cuda,
}

/// Everything about a run that the budget depends on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanSettings {
    /// Weights, gradients and activations (`[model] dtype`).
    pub dtype: Dtype,
    /// Keep only each decoder layer's input and recompute its forward in backward
    /// (`[train] recompute`).
    pub recompute: bool,
    /// Tokens per log-softmax chunk, 0 = the whole `[tokens × vocab]` at once
    /// (`[train] logits_chunk`).
    pub logits_chunk: usize,
    /// SFT rows only, DPO pairs only, or half of each.
    pub phase: Phase,
    /// Tokens of every sequence (the trainer pads a batch to its longest).
    pub seq_len: usize,
    /// Examples per step (`[train] batch_size`); a DPO pair is two sequences.
    pub batch: usize,
    /// The DPO reference's residence.
    pub reference: ReferenceMode,
    /// DPO pairs whose streamed-reference log-probs are computed in one pass between steps
    /// (`[train] reference_block`; 0: in each step, with the step's pairs).
    #[serde(default)]
    pub reference_block: usize,
    /// The optimizer and its hyper-parameters (which tensors APOLLO projects).
    pub optimizer: OptimizerConfig,
    /// `[train] freeze` globs: no gradient, no optimizer state.
    pub freeze: Vec<String>,
    /// `[train] train_only` globs: if non-empty, only these train.
    pub train_only: Vec<String>,
    /// Memory of the device the step runs on.
    pub device_bytes: u64,
    /// CPU or CUDA (runtime overhead, allocator headroom, default peak FLOPs).
    pub target: Target,
    /// Peak FLOP/s for the step-time estimate; `None` leaves it out (the CPU default).
    pub peak_flops: Option<f64>,
    /// Share of `peak_flops` reached.
    pub mfu: f64,
}

impl PlanSettings {
    /// The settings a `DreamConfig` describes.
    ///
    /// `device_bytes` is `[model] device_memory` when given, else
    /// [`DEFAULT_CUDA_DEVICE_BYTES`] for CUDA and **0 for the CPU**: 0 means unknown, and the
    /// caller puts the host's memory there (`dreamloop` parses `/proc/meminfo` with
    /// [`host_memory_bytes`]).
    pub fn from_config(config: &DreamConfig) -> PlanSettings {
        let t = &config.train;
        let target = match config.model.backend {
            Backend::Cpu => Target::Cpu,
            Backend::Cuda => Target::Cuda,
        };
        let device_bytes = match &config.model.device_memory {
            // A bad size is `DreamConfig::validate`'s error; here it counts as unknown.
            Some(text) => parse_bytes(text).unwrap_or(0),
            None if target == Target::Cuda => DEFAULT_CUDA_DEVICE_BYTES,
            None => 0,
        };
        let dtype = match config.model.dtype {
            crate::model::Precision::F32 => Dtype::F32,
            crate::model::Precision::Bf16 => Dtype::Bf16,
        };
        let (recompute, logits_chunk) = (config.recompute(), t.logits_chunk);
        PlanSettings {
            dtype,
            recompute,
            logits_chunk,
            phase: config.phase.heaviest(),
            seq_len: t.max_seq_len,
            batch: t.batch_size,
            reference: if config.model.stream_reference {
                ReferenceMode::Streamed
            } else {
                ReferenceMode::Resident
            },
            reference_block: t.reference_block,
            optimizer: t.optimizer.clone(),
            freeze: t.freeze.clone(),
            train_only: t.train_only.clone(),
            device_bytes,
            target,
            peak_flops: match target {
                Target::Cuda => Some(default_peak_flops(dtype)),
                Target::Cpu => None,
            },
            mfu: DEFAULT_MFU,
        }
    }

    /// Sequences through the policy per step: SFT rows plus two per DPO pair.
    fn rows(&self) -> (usize, usize) {
        let b = self.batch.max(1);
        let (sft, pairs) = match self.phase {
            Phase::Sft => (b, 0),
            Phase::Dpo => (0, b),
            Phase::Mixed => (b.div_ceil(2), b / 2),
        };
        (sft + 2 * pairs, pairs)
    }
}

/// The H200 peak for `dtype` ([`H200_BF16_FLOPS`], [`H200_F32_FLOPS`]).
pub fn default_peak_flops(dtype: Dtype) -> f64 {
    match dtype {
        Dtype::Bf16 => H200_BF16_FLOPS,
        Dtype::F32 => H200_F32_FLOPS,
    }
}

/// `141GB`, `24GiB`, `512MB`, `1e9`: decimal (kB, MB, GB, TB) or binary (KiB, MiB, GiB, TiB)
/// units, case-insensitive, bytes without a suffix.
pub fn parse_bytes(text: &str) -> Result<u64, PlanError> {
    let bad = || PlanError::BadSize {
        text: text.to_string(),
    };
    let t = text.trim();
    if let Ok(value) = t.parse::<f64>() {
        return if value.is_finite() && value >= 1.0 {
            Ok(value as u64)
        } else {
            Err(bad())
        };
    }
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.trim().parse().map_err(|_| bad())?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let bytes = value * scale;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// `MemTotal` of a `/proc/meminfo` text, in bytes.
pub fn host_memory_bytes(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// One parameter tensor as `CausalLm::load` builds it: module-path name, stored shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamShape {
    pub name: String,
    pub dims: Vec<usize>,
}

impl ParamShape {
    fn numel(&self) -> u64 {
        self.dims.iter().product::<usize>() as u64
    }
    /// A 2-D weight used in a matmul (embedding lookups are not, `lm_head` is).
    fn is_matmul(&self) -> bool {
        self.dims.len() == 2 && !self.name.ends_with("embed_tokens.weight")
    }
    fn is_embedding(&self) -> bool {
        self.name.ends_with("embed_tokens.weight") || self.name.starts_with("lm_head.")
    }
    /// The decoder layer this tensor belongs to.
    fn layer(&self) -> Option<usize> {
        self.name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse().ok())
    }
}

/// Every parameter of the model, named as the optimizer and `[train] freeze` see them.
pub fn param_shapes(m: &ModelConfig) -> Vec<ParamShape> {
    let mut out = Vec::new();
    let h = m.hidden_size;
    push(
        &mut out,
        "model.embed_tokens.weight".into(),
        vec![m.vocab_size, h],
    );
    for (i, kind) in m.layer_types.iter().enumerate() {
        let p = format!("model.layers.{i}");
        match (kind, &m.linear_attn) {
            (LayerKind::LinearAttention, Some(lin)) => {
                let a = format!("{p}.linear_attn");
                let (kw, vw, hv) = (
                    lin.num_key_heads * lin.key_head_dim,
                    lin.num_value_heads * lin.value_head_dim,
                    lin.num_value_heads,
                );
                if lin.fused_projections {
                    linear(
                        &mut out,
                        &format!("{a}.in_proj_qkvz"),
                        2 * kw + 2 * vw,
                        h,
                        false,
                    );
                    linear(&mut out, &format!("{a}.in_proj_ba"), 2 * hv, h, false);
                } else {
                    linear(&mut out, &format!("{a}.in_proj_qkv"), 2 * kw + vw, h, false);
                    linear(&mut out, &format!("{a}.in_proj_z"), vw, h, false);
                    linear(&mut out, &format!("{a}.in_proj_b"), hv, h, false);
                    linear(&mut out, &format!("{a}.in_proj_a"), hv, h, false);
                }
                linear(&mut out, &format!("{a}.out_proj"), h, vw, false);
                let conv = vec![2 * kw + vw, 1, lin.conv_kernel];
                push(&mut out, format!("{a}.conv1d.weight"), conv);
                push(&mut out, format!("{a}.dt_bias"), vec![hv]);
                push(&mut out, format!("{a}.A_log"), vec![hv]);
                push(
                    &mut out,
                    format!("{a}.norm.weight"),
                    vec![lin.value_head_dim],
                );
            }
            _ => {
                let a = format!("{p}.self_attn");
                let (heads, kv, hd) = (m.num_attention_heads, m.num_key_value_heads, m.head_dim);
                let q_rows = heads * hd * if m.attn_output_gate { 2 } else { 1 };
                linear(&mut out, &format!("{a}.q_proj"), q_rows, h, m.qkv_bias);
                linear(&mut out, &format!("{a}.k_proj"), kv * hd, h, m.qkv_bias);
                linear(&mut out, &format!("{a}.v_proj"), kv * hd, h, m.qkv_bias);
                linear(&mut out, &format!("{a}.o_proj"), h, heads * hd, m.o_bias);
                if m.qk_norm {
                    push(&mut out, format!("{a}.q_norm.weight"), vec![hd]);
                    push(&mut out, format!("{a}.k_norm.weight"), vec![hd]);
                }
            }
        }
        match &m.moe {
            Some(moe) if moe.sparse_layers[i] => {
                linear(
                    &mut out,
                    &format!("{p}.mlp.gate"),
                    moe.num_experts,
                    h,
                    false,
                );
                for e in 0..moe.num_experts {
                    let prefix = format!("{p}.mlp.experts.{e}");
                    mlp(&mut out, m, &prefix, moe.expert_intermediate_size);
                }
                let shared = moe.shared_expert_intermediate_size;
                mlp(&mut out, m, &format!("{p}.mlp.shared_expert"), shared);
                linear(
                    &mut out,
                    &format!("{p}.mlp.shared_expert_gate"),
                    1,
                    h,
                    false,
                );
            }
            _ => mlp(&mut out, m, &format!("{p}.mlp"), m.intermediate_size),
        }
        push(&mut out, format!("{p}.input_layernorm.weight"), vec![h]);
        push(
            &mut out,
            format!("{p}.post_attention_layernorm.weight"),
            vec![h],
        );
    }
    push(&mut out, "model.norm.weight".into(), vec![h]);
    if !m.tie_word_embeddings {
        push(&mut out, "lm_head.weight".into(), vec![m.vocab_size, h]);
    }
    out
}

fn push(out: &mut Vec<ParamShape>, name: String, dims: Vec<usize>) {
    out.push(ParamShape { name, dims });
}

/// A `Linear` in Hugging Face orientation: weight `[out, in]`, optional bias `[out]`.
fn linear(out: &mut Vec<ParamShape>, name: &str, rows: usize, cols: usize, bias: bool) {
    if bias {
        push(out, format!("{name}.bias"), vec![rows]);
    }
    push(out, format!("{name}.weight"), vec![rows, cols]);
}

/// A SwiGLU MLP of inner width `inner` under `prefix`.
fn mlp(out: &mut Vec<ParamShape>, m: &ModelConfig, prefix: &str, inner: usize) {
    let h = m.hidden_size;
    for (part, rows, cols) in [
        ("gate_proj", inner, h),
        ("up_proj", inner, h),
        ("down_proj", h, inner),
    ] {
        linear(out, &format!("{prefix}.{part}"), rows, cols, m.mlp_bias);
    }
}

/// Whether `name` trains under `[train] freeze` / `train_only` (as `Trainer::new` decides).
fn trains(name: &str, s: &PlanSettings) -> bool {
    !s.freeze.iter().any(|p| glob_match(p, name))
        && (s.train_only.is_empty() || s.train_only.iter().any(|p| glob_match(p, name)))
}

/// Optimizer state elements of one trainable parameter, and whether APOLLO projects it.
fn state_elements(p: &ParamShape, optimizer: &OptimizerConfig) -> (u64, bool) {
    match optimizer {
        OptimizerConfig::Apollo(c) if c.projects(&p.name, &p.dims) => {
            let [m, n] = c.hf_dims([p.dims[0], p.dims[1]]);
            let r = c.rank as u64;
            let (small, large) = (m.min(n) as u64, m.max(n) as u64);
            // Projection r × min(m, n), two compact moments r × max(m, n), the limiter's norm.
            let limiter = u64::from(c.norm_growth_limit.is_some());
            (r * small + 2 * r * large + limiter, true)
        }
        _ => (2 * p.numel(), false),
    }
}

/// Elements one decoder layer keeps for backward and needs while it runs, for `rows`
/// sequences of `t` tokens.
#[derive(Debug, Clone, Copy, Default)]
struct LayerCost {
    /// Kept from the forward until this layer's backward has run.
    kept: f64,
    /// Alive on top of `kept` while this layer's backward runs.
    backward: f64,
    /// Alive while the layer runs forward without a graph (the DPO reference).
    forward: f64,
}

/// Full attention (`Attention::forward`), per token unless noted:
/// - with q/k norms: the `q_proj` output (the norm's `powi` keeps a view of it), the normed
///   q, the `k_proj` output and the normed k;
/// - q after RoPE and k after `repeat_kv` (the `QKᵀ` matmul keeps both), v after `repeat_kv`
///   (kept by `P·V`);
/// - `exp` of the shifted scores and the probabilities: `2 · heads · T` per token — burn's
///   softmax is `exp(x − max) / Σ`, its `exp` keeps its output and the division both operands;
/// - the attention output (`swap_dims` + `reshape` copies it), `sigmoid(gate)` and their
///   product (kept by `o_proj`) when gated.
///
/// Backward adds the probabilities' gradient and the two `T × T` terms of the division's
/// backward while `P` itself is already freed: `2 · heads · T` per token more. Forward without
/// a graph holds the scores and their masked copy.
fn attention_kept(m: &ModelConfig, rows: f64, t: f64) -> LayerCost {
    let (heads, kv, hd) = (
        m.num_attention_heads as f64,
        m.num_key_value_heads as f64,
        m.head_dim as f64,
    );
    let q_rows = heads * hd * if m.attn_output_gate { 2.0 } else { 1.0 };
    let norms = if m.qk_norm {
        q_rows + heads * hd + 2.0 * kv * hd
    } else {
        0.0
    };
    let k_and_v = 2.0 * if kv < heads { heads * hd } else { kv * hd };
    let gate = if m.attn_output_gate {
        2.0 * heads * hd
    } else {
        0.0
    };
    let per_token = norms + heads * hd + k_and_v + heads * hd + gate;
    let tokens = rows * t;
    let square = rows * heads * t * t;
    LayerCost {
        kept: per_token * tokens + 2.0 * square,
        backward: 2.0 * square,
        forward: 2.0 * square + 3.0 * q_rows.max(heads * hd) * tokens,
    }
}

/// A Gated DeltaNet layer (`GatedDeltaNet::forward` and `chunked_delta_rule`), per token
/// unless noted, with `C = 2·kw + vw` conv channels, `Hv` value heads, chunk `c = 64`:
/// - the conv input padded (the per-tap products keep views of it), the conv output and its
///   `sigmoid` (SiLU is `x · σ(x)`): `3C`;
/// - q and k cut from the SiLU output (`reshape` copies the narrowed view; `l2norm` keeps
///   them): `2·kw`;
/// - per value head, `dk` wide: q and k in chunk layout, `β ⊙ K`, `β ⊙ exp(Gc) ⊙ K`, and the
///   per-chunk copies of `W`, `Q ⊙ exp(Gc)`, `K ⊙ exp(Gc[C−1] − Gc)` that the sequential scan
///   keeps: `7 · Hv · dk`;
/// - `dv` wide: V in chunk layout, `β ⊙ V`, each chunk's new values, the concatenated output,
///   the gated norm's normed value and output, z, `σ(z)`, `silu(z)`, their product (kept by
///   `out_proj`): `10 · vw`;
/// - `c` wide per value head: the decay matrix, `βK·Kᵀ`, A, `(I + A)⁻¹`, `Q·Kᵀ` and the scan's
///   copies of the intra-chunk matrix: `6 · c · Hv`; the unit-lower inverse's blocks (diagonal
///   blocks, the 15 row stacks of its forward substitution, the inverse and the off-diagonal
///   products at each block row): `232 · Hv` for `c = 64` in blocks of 16;
/// - the state entering each chunk, kept by the scan's matmuls: `Hv · dk · dv` per chunk.
///   qwen3_next's fused `in_proj_qkvz` output stays whole behind the z view: `2·kw + vw` more.
///
/// Backward keeps running sums of the sliced tensors' gradients (burn's slice backward
/// allocates the whole source): one each of `U`, `W`, `Q ⊙ exp(Gc)`, `K ⊙ …`, the intra-chunk
/// matrix, plus the newest slice's.
fn gdn_kept(lin: &LinearAttnConfig, rows: f64, t: f64) -> LayerCost {
    let c = CHUNK as f64;
    let padded = (t / c).ceil() * c;
    let (hk, hv, dk, dv) = (
        lin.num_key_heads as f64,
        lin.num_value_heads as f64,
        lin.key_head_dim as f64,
        lin.value_head_dim as f64,
    );
    let (kw, vw) = (hk * dk, hv * dv);
    let channels = 2.0 * kw + vw;
    let fused = if lin.fused_projections {
        2.0 * kw + vw
    } else {
        0.0
    };
    let inverse = unit_lower_inverse_kept(CHUNK, 16) as f64;
    let linear = 3.0 * channels + 2.0 * kw + 10.0 * vw + fused;
    let chunked = 7.0 * hv * dk + 6.0 * c * hv + inverse * hv;
    let states = rows * (padded / c) * hv * dk * dv;
    let kept = linear * rows * t + chunked * rows * padded + states;
    let sums = vw + 3.0 * hv * dk + c * hv + vw.max(hv * dk).max(c * hv);
    LayerCost {
        kept,
        backward: sums * rows * padded,
        forward: kept - inverse * hv * rows * padded,
    }
}

/// Elements per token and value head that `unit_lower_inverse` keeps for backward, for a
/// chunk of `c` rows solved in diagonal blocks of `bs`: the diagonal blocks (`bs`), the row
/// stacks `prev` of the forward substitution (`1 + … + (bs − 1)`), the inverted diagonal
/// blocks (`bs`), and per block row `bi` the inverse so far (`(bi·bs)² / c`) and the
/// off-diagonal product (`bs · bi·bs / c`).
fn unit_lower_inverse_kept(c: usize, bs: usize) -> usize {
    let nb = c / bs;
    let rows_stacked = bs * (bs - 1) / 2;
    let blocks: usize = (1..nb)
        .map(|bi| (bi * bs) * (bi * bs) / c + bs * bi * bs / c)
        .sum();
    bs + rows_stacked + bs + blocks
}

/// The SwiGLU feed-forward (`swiglu`): the gate projection, its `sigmoid`, `silu`, the up
/// projection and `silu ⊙ up` (kept by `down_proj`), `5 · I` per token. Backward holds the
/// down projection's input gradient and the gate's three products: `4 · I`.
fn mlp_kept(inner: f64, rows: f64, t: f64) -> LayerCost {
    let tokens = rows * t;
    LayerCost {
        kept: 5.0 * inner * tokens,
        backward: 4.0 * inner * tokens,
        forward: 3.0 * inner * tokens,
    }
}

/// One decoder layer: its two RMSNorms (each keeps its input, the normalised value and its
/// output: `3 · hidden` per token), the token mixer, the feed-forward.
fn layer_cost(m: &ModelConfig, i: usize, rows: f64, t: f64) -> LayerCost {
    let tokens = rows * t;
    let mixer = match (m.layer_types[i], &m.linear_attn) {
        (LayerKind::LinearAttention, Some(lin)) => gdn_kept(lin, rows, t),
        _ => attention_kept(m, rows, t),
    };
    let ffn = match &m.moe {
        Some(moe) if moe.sparse_layers[i] => {
            // Each token through its top-k experts and the shared expert, plus the router's
            // softmax (its `exp` and probabilities).
            let per =
                moe.top_k * moe.expert_intermediate_size + moe.shared_expert_intermediate_size;
            let mut cost = mlp_kept(per as f64, rows, t);
            cost.kept += 2.0 * moe.num_experts as f64 * tokens;
            cost
        }
        _ => mlp_kept(m.intermediate_size as f64, rows, t),
    };
    let norms = 6.0 * m.hidden_size as f64 * tokens;
    LayerCost {
        kept: norms + mixer.kept + ffn.kept,
        backward: mixer.backward.max(ffn.backward),
        forward: mixer.forward.max(ffn.forward) + 2.0 * m.hidden_size as f64 * tokens,
    }
}

/// One line of the budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanItem {
    /// What it is.
    pub name: String,
    /// Bytes alive at the step's peak.
    pub bytes: u64,
    /// How it was counted, and its size when it is not at the peak.
    pub how: String,
}

/// The budget of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// One line per item, at the peak moment; they sum to `total_bytes`.
    pub items: Vec<PlanItem>,
    /// The step's peak memory.
    pub total_bytes: u64,
    /// The device's memory.
    pub device_bytes: u64,
    /// `total_bytes ≤ device_bytes`.
    pub fits: bool,
    /// `1 − total / device`: the share left free (negative when it does not fit).
    pub headroom: f64,
    /// Which moment of the step is the peak.
    pub peak_at: String,
    /// Parameters of the model.
    pub parameters: u64,
    /// Parameters that train (the rest are frozen).
    pub trainable_parameters: u64,
    /// Tokens through the policy per step.
    pub tokens_per_step: u64,
    /// FLOPs of one step.
    pub flops_per_step: f64,
    /// `flops_per_step / tokens_per_step`.
    pub flops_per_token: f64,
    /// Peak FLOP/s assumed, when stated.
    pub peak_flops: Option<f64>,
    /// Share of the peak assumed.
    pub mfu: f64,
    /// `flops_per_step / (mfu · peak_flops)`.
    pub step_seconds: Option<f64>,
    /// The settings planned, in words.
    pub settings: String,
}

/// A moment of the step: what is alive, by item.
#[derive(Debug, Clone, Default)]
struct Moment {
    label: String,
    gradients: u64,
    kept: u64,
    recompute: u64,
    logits: u64,
    layer_backward: u64,
    reference_forward: u64,
    update: u64,
}

impl Moment {
    fn transient(&self) -> u64 {
        self.gradients
            + self.kept
            + self.recompute
            + self.logits
            + self.layer_backward
            + self.reference_forward
            + self.update
    }
}

const GB: f64 = 1e9;

/// Gradients and optimizer state, by where they are counted.
#[derive(Debug, Default)]
struct Tally {
    parameters: u64,
    trainable: u64,
    /// Gradient bytes per decoder layer, of the head (LM head, final norm, a tied
    /// embedding: their backward comes first) and of an untied embedding (last).
    grad_layer: Vec<u64>,
    grad_head: u64,
    grad_embed: u64,
    /// Optimizer state bytes per branch.
    projected: u64,
    dense: u64,
    embeddings: u64,
    /// Elements of the largest trainable tensor (the update's temporaries).
    largest: u64,
}

impl Tally {
    fn of(model: &ModelConfig, params: &[ParamShape], s: &PlanSettings) -> Tally {
        let dt = s.dtype.bytes();
        let mut t = Tally {
            grad_layer: vec![0; model.num_hidden_layers],
            ..Tally::default()
        };
        for p in params {
            let n = p.numel();
            t.parameters += n;
            if !trains(&p.name, s) {
                continue;
            }
            t.trainable += n;
            t.largest = t.largest.max(n);
            match p.layer() {
                Some(i) => t.grad_layer[i] += n * dt,
                None if p.name.starts_with("lm_head.")
                    || p.name == "model.norm.weight"
                    || (model.tie_word_embeddings && p.is_embedding()) =>
                {
                    t.grad_head += n * dt
                }
                None => t.grad_embed += n * dt,
            }
            // Optimizer state is f32 in either dtype (bf16 steps widen to f32 and round back).
            let (elements, is_projected) = state_elements(p, &s.optimizer);
            let bytes = elements * Dtype::F32.bytes();
            if p.is_embedding() {
                t.embeddings += bytes;
            } else if is_projected {
                t.projected += bytes;
            } else {
                t.dense += bytes;
            }
        }
        t
    }

    fn grads(&self) -> u64 {
        self.grad_layer.iter().sum::<u64>() + self.grad_head + self.grad_embed
    }
}

/// The DPO reference's resident bytes and how they are counted, and the bytes of its weights
/// alive only while it runs forward (counted in those moments).
fn reference_bytes(
    model: &ModelConfig,
    params: &[ParamShape],
    s: &PlanSettings,
    pairs: usize,
) -> (u64, String, u64) {
    let dt = s.dtype.bytes();
    let weights: u64 = params.iter().map(ParamShape::numel).sum::<u64>() * dt;
    match s.reference {
        ReferenceMode::Resident => (
            weights,
            "a second copy of the weights: Trainer::new's `valid()` copy shares them until the first update, then holds the old ones (in every phase: the phase is hot-reloadable)".into(),
            0,
        ),
        ReferenceMode::Streamed if pairs > 0 => {
            let layer = |i: usize| -> u64 {
                params
                    .iter()
                    .filter(|p| p.layer() == Some(i))
                    .map(ParamShape::numel)
                    .sum()
            };
            let vocabulary = (model.vocab_size * model.hidden_size) as u64;
            let unit = (0..model.num_hidden_layers)
                .map(layer)
                .chain(std::iter::once(vocabulary))
                .max()
                .unwrap_or(0);
            let units = 2 * unit * dt;
            let block = if s.reference_block > 0 {
                format!(" (for a block of {} pairs between steps, or in a step for pairs without stored log-probs)", s.reference_block)
            } else {
                String::new()
            };
            (
                0,
                format!(
                    "streamed reference: nothing resident; at most two units at once (a decoder layer, the tied embedding or the head: {:.2} GB) while it runs forward{block}, counted in the reference forward",
                    units as f64 / GB
                ),
                units,
            )
        }
        ReferenceMode::Streamed => (0, "streamed reference: nothing in SFT".into(), 0),
    }
}

/// The shape of one step's work.
struct Work {
    /// Tokens per sequence.
    t: f64,
    /// Sequences through the policy, and DPO pairs (whose two sequences the reference sees).
    rows: f64,
    pairs: f64,
}

impl Work {
    fn tokens(&self) -> f64 {
        self.rows * self.t
    }
}

/// Every moment of the step that can be its peak (see the module docs), by item.
fn moments(
    model: &ModelConfig,
    params: &[ParamShape],
    s: &PlanSettings,
    w: &Work,
    tally: &Tally,
    reference_units: u64,
) -> Vec<Moment> {
    let dt = s.dtype.bytes() as f64;
    let bytes = |elements: f64| (elements * dt).ceil() as u64;
    // What runs in f32 in either dtype: a layer's working tensors (a bf16 model upcasts in
    // RMSNorm, softmax and the whole Gated DeltaNet rule), the logits and their log-softmax,
    // the optimizer's widened parameter and gradient. Counting these at 2 B in bf16 put the
    // plan 46 % under a measured bf16 + recompute step (BENCHMARKS.md).
    let wide = |elements: f64| (elements * Dtype::F32.bytes() as f64).ceil() as u64;
    let (vocab, hidden, tokens) = (
        model.vocab_size as f64,
        model.hidden_size as f64,
        w.tokens(),
    );
    // `Linear::forward` multiplies by `weight.transpose().unsqueeze_dim(0)`: the unsqueeze
    // is a reshape of a transposed view, which flex copies, and the matmul keeps that copy
    // for backward — every matmul weight is held a second time until its layer's backward.
    let copies = |layer: Option<usize>| -> f64 {
        params
            .iter()
            .filter(|p| p.is_matmul() && p.layer() == layer)
            .map(|p| p.numel() as f64)
            .sum()
    };
    let costs: Vec<LayerCost> = (0..model.num_hidden_layers)
        .map(|i| {
            let mut c = layer_cost(model, i, w.rows, w.t);
            c.kept += copies(Some(i));
            c
        })
        .collect();
    let kept = |c: &LayerCost| if s.recompute { hidden * tokens } else { c.kept };
    let chunk = |tokens: f64| {
        if s.logits_chunk == 0 {
            tokens
        } else {
            (s.logits_chunk as f64).min(tokens)
        }
    };
    // The log-softmax's `exp` is kept for backward (whole, without chunks); its backward
    // holds the gathered gradient, the broadcast sum's and `exp`'s: 4 × [tokens × vocab].
    let logits_kept = if s.logits_chunk == 0 {
        tokens * vocab
    } else {
        0.0
    };
    let layers_kept: f64 = costs.iter().map(kept).sum();
    // The final norm keeps its input, normalised value and output; the head its weight's
    // transposed copy (the tied embedding's too).
    let head_copy = copies(None)
        + if model.tie_word_embeddings {
            vocab * hidden
        } else {
            0.0
        };
    let head_kept = layers_kept + 3.0 * hidden * tokens + head_copy;
    let mut out = vec![Moment {
        label: "the LM head's backward (log-softmax over the vocabulary)".into(),
        gradients: tally.grad_head,
        kept: bytes(head_kept),
        logits: wide(4.0 * chunk(tokens) * vocab),
        ..Moment::default()
    }];
    let mut grads_above = tally.grad_head;
    let mut kept_below = layers_kept;
    for (i, c) in costs.iter().enumerate().rev() {
        grads_above += tally.grad_layer[i];
        kept_below -= kept(c);
        let own = if s.recompute { hidden * tokens } else { c.kept };
        out.push(Moment {
            label: format!("layer {i}'s backward"),
            gradients: grads_above,
            kept: bytes(kept_below + own),
            recompute: if s.recompute { wide(c.kept) } else { 0 },
            layer_backward: wide(c.backward),
            ..Moment::default()
        });
    }
    // The reference's forward over `sequences`: a resident copy runs them as one batch; a
    // streamed one in length buckets of `BUCKET_SEQUENCES` (one bucket's working set, every
    // bucket's hidden states) with two of its units loaded.
    let reference_pass = |sequences: f64| -> u64 {
        let together = match s.reference {
            ReferenceMode::Resident => sequences,
            ReferenceMode::Streamed => sequences.min(BUCKET_SEQUENCES as f64),
        };
        let layer_peak = (0..model.num_hidden_layers)
            .map(|i| layer_cost(model, i, together, w.t).forward)
            .fold(0.0, f64::max);
        let hidden_states = match s.reference {
            ReferenceMode::Resident => 0,
            ReferenceMode::Streamed => bytes(sequences * w.t * hidden),
        };
        reference_units + hidden_states + wide(layer_peak.max(3.0 * chunk(together * w.t) * vocab))
    };
    if w.pairs > 0.0 {
        out.push(Moment {
            label: "the DPO reference's forward".into(),
            kept: bytes(head_kept + logits_kept),
            reference_forward: reference_pass(2.0 * w.pairs),
            ..Moment::default()
        });
        if s.reference == ReferenceMode::Streamed && s.reference_block > 0 {
            // Between steps nothing of the policy's graph is alive: only the block's forward.
            out.push(Moment {
                label: format!(
                    "a block of {} DPO pairs through the reference, between steps",
                    s.reference_block
                ),
                reference_forward: reference_pass(2.0 * s.reference_block as f64),
                ..Moment::default()
            });
        }
    }
    // The update: every gradient, and the weights twice — the trainer's backup while the
    // optimizer builds the new ones (new weights and not yet used gradients stay one
    // gradient's worth) — plus the largest tensor's temporaries.
    out.push(Moment {
        label: "the optimizer update".into(),
        gradients: tally.grads(),
        update: wide(4.0 * tally.largest as f64),
        ..Moment::default()
    });
    out
}

/// FLOPs of one step: forward and backward through the policy (`3 ×` the forward), one more
/// forward of the layers with recompute, the reference's forward for DPO pairs.
fn step_flops(model: &ModelConfig, params: &[ParamShape], s: &PlanSettings, w: &Work) -> f64 {
    let matmul = |layers_only: bool| -> f64 {
        params
            .iter()
            .filter(|p| p.is_matmul() && (!layers_only || p.layer().is_some()))
            .map(|p| p.numel() as f64)
            .sum()
    };
    let tied_head = if model.tie_word_embeddings {
        (model.vocab_size * model.hidden_size) as f64
    } else {
        0.0
    };
    let t = w.t;
    // Token mixing beyond the projections, forward, for `rows` sequences.
    let mixing = |rows: f64| -> f64 {
        let mut f = 0.0;
        for kind in &model.layer_types {
            match (kind, &model.linear_attn) {
                (LayerKind::LinearAttention, Some(lin)) => {
                    let c = CHUNK as f64;
                    let padded = (t / c).ceil() * c;
                    let (dk, dv) = (lin.key_head_dim as f64, lin.value_head_dim as f64);
                    // β⊙K·Kᵀ, Q·Kᵀ, T·(β⊙V), T·(β⊙K), intra·V (2C wide); W·S, Q·S, Kᵀ·V.
                    let per_head = 2.0 * c * (3.0 * dk + 2.0 * dv) + 6.0 * dk * dv;
                    f += rows * padded * lin.num_value_heads as f64 * per_head;
                }
                _ => {
                    // Q·Kᵀ and P·V over the whole T × T square (masked, not skipped).
                    let width = (model.num_attention_heads * model.head_dim) as f64;
                    f += rows * 4.0 * width * t * t;
                }
            }
        }
        f
    };
    let all = matmul(false) + tied_head;
    let mut flops = 3.0 * (2.0 * all * w.tokens() + mixing(w.rows));
    if s.recompute {
        flops += 2.0 * matmul(true) * w.tokens() + mixing(w.rows);
    }
    if w.pairs > 0.0 {
        let sequences = 2.0 * w.pairs;
        flops += 2.0 * all * sequences * t + mixing(sequences);
    }
    flops
}

/// The memory and time budget of one step of `model` under `s`.
pub fn plan(model: &ModelConfig, s: &PlanSettings) -> Plan {
    let params = param_shapes(model);
    let (rows, pairs) = s.rows();
    // No limit (`max_seq_len = 0`): the longest context the checkpoint was trained for.
    let seq_len = if s.seq_len == 0 {
        model.max_position_embeddings
    } else {
        s.seq_len
    };
    let work = Work {
        t: seq_len.max(1) as f64,
        rows: rows as f64,
        pairs: pairs as f64,
    };
    let tally = Tally::of(model, &params, s);
    let weights = tally.parameters * s.dtype.bytes();
    let (reference, reference_how, units) = reference_bytes(model, &params, s, pairs);
    let all = moments(model, &params, s, &work, &tally, units);
    let peak = all
        .iter()
        .max_by_key(|m| m.transient())
        .cloned()
        .expect("at least the update moment");
    let runtime = match s.target {
        Target::Cpu => 100_000_000,
        Target::Cuda => 1_000_000_000,
    };
    let resident = weights + reference + tally.projected + tally.dense + tally.embeddings;
    let before_headroom = resident + runtime + peak.transient();
    let headroom = match s.target {
        Target::Cpu => 0,
        Target::Cuda => before_headroom / 20,
    };
    let total = before_headroom + headroom;
    let flops = step_flops(model, &params, s, &work);
    let context = Context {
        model,
        s,
        work: &work,
        tally: &tally,
        moments: &all,
        peak: &peak,
    };
    let mut items = vec![
        PlanItem {
            name: "weights".into(),
            bytes: weights,
            how: format!(
                "{} parameters × {} B ({})",
                tally.parameters,
                s.dtype.bytes(),
                s.dtype.name()
            ),
        },
        PlanItem {
            name: "reference".into(),
            bytes: reference,
            how: reference_how,
        },
    ];
    items.extend(context.items());
    items.push(PlanItem {
        name: "runtime".into(),
        bytes: runtime,
        how: match s.target {
            Target::Cpu => "assumed: the process before any tensor (binary, thread stacks, tokenizer, probe suite)".into(),
            Target::Cuda => "assumed: CUDA context and compiled kernels".into(),
        },
    });
    items.push(PlanItem {
        name: "allocator headroom".into(),
        bytes: headroom,
        how: match s.target {
            Target::Cpu => {
                "none: peak RSS counts touched pages, and large frees go back to the OS".into()
            }
            Target::Cuda => "assumed: 5 % for cubecl's memory pools".into(),
        },
    });
    Plan {
        items,
        total_bytes: total,
        device_bytes: s.device_bytes,
        fits: total <= s.device_bytes,
        headroom: 1.0 - total as f64 / s.device_bytes.max(1) as f64,
        peak_at: peak.label,
        parameters: tally.parameters,
        trainable_parameters: tally.trainable,
        tokens_per_step: work.tokens() as u64,
        flops_per_step: flops,
        flops_per_token: flops / work.tokens(),
        peak_flops: s.peak_flops,
        mfu: s.mfu,
        step_seconds: s.peak_flops.map(|p| flops / (s.mfu * p)),
        settings: describe(s, seq_len),
    }
}

/// What the item lines need to say about a plan.
struct Context<'a> {
    model: &'a ModelConfig,
    s: &'a PlanSettings,
    work: &'a Work,
    tally: &'a Tally,
    moments: &'a [Moment],
    peak: &'a Moment,
}

impl Context<'_> {
    /// The lines between the reference and the runtime, at the peak moment; each says its
    /// size at the moment it is largest when that is another one.
    fn items(&self) -> Vec<PlanItem> {
        let (s, peak, tally) = (self.s, self.peak, self.tally);
        let optimizer = optimizer_name(&s.optimizer);
        let dense = match &s.optimizer {
            OptimizerConfig::Adamw(_) => "two moments of every other tensor",
            OptimizerConfig::Apollo(_) => {
                "dense-branch moments: norms, A_log, dt_bias, conv1d, in_proj_a/b, routers"
            }
        };
        let tokens = self.work.tokens();
        let line = |name: &str, bytes: u64, how: String| PlanItem {
            name: name.into(),
            bytes,
            how,
        };
        vec![
            line(
                "gradients",
                peak.gradients,
                format!(
                    "{} trainable × {} B, all held at once (GradientsParams); during backward those of the layers above{}",
                    tally.trainable,
                    s.dtype.bytes(),
                    self.elsewhere(peak.gradients, |m| m.gradients),
                ),
            ),
            line(
                "optimizer: projected",
                tally.projected,
                format!("{optimizer}: projection and compact moments of the projected matrices"),
            ),
            line("optimizer: dense", tally.dense, format!("{optimizer}: {dense}")),
            line(
                "optimizer: embeddings + LM head",
                tally.embeddings,
                format!(
                    "{optimizer}: two moments of embed_tokens{} (0 if frozen)",
                    if self.model.tie_word_embeddings { " (tied)" } else { " and lm_head" }
                ),
            ),
            line(
                if s.recompute { "kept layer inputs" } else { "activations kept for backward" },
                peak.kept,
                if s.recompute {
                    format!(
                        "recompute: each layer's input (hidden × {} tokens){}",
                        tokens as u64,
                        self.elsewhere(peak.kept, |m| m.kept)
                    )
                } else {
                    format!(
                        "burn autodiff's saved tensors of every layer, {} tokens{}",
                        tokens as u64,
                        self.elsewhere(peak.kept, |m| m.kept)
                    )
                },
            ),
            line(
                "one layer's recompute working set",
                peak.recompute,
                if s.recompute {
                    format!("the recomputed layer's saved tensors{}", self.elsewhere(peak.recompute, |m| m.recompute))
                } else {
                    "no recompute".into()
                },
            ),
            line(
                "layer backward working set",
                peak.layer_backward,
                format!(
                    "the running layer's gradient buffers (T × T terms, slice-gradient sums, SwiGLU){}",
                    self.elsewhere(peak.layer_backward, |m| m.layer_backward)
                ),
            ),
            line(
                "logits chunk",
                peak.logits,
                format!(
                    "{} × {} vocabulary: log-softmax's saved exp + 3 gradient buffers{}",
                    if s.logits_chunk == 0 {
                        format!("all {} tokens", tokens as u64)
                    } else {
                        format!("{} tokens per chunk", s.logits_chunk)
                    },
                    self.model.vocab_size,
                    self.elsewhere(peak.logits, |m| m.logits)
                ),
            ),
            line(
                "reference forward",
                peak.reference_forward,
                if self.work.pairs > 0.0 {
                    format!("the frozen forward's largest buffers (logits or one layer; a streamed reference's two units){}", self.elsewhere(peak.reference_forward, |m| m.reference_forward))
                } else {
                    "no DPO pairs".into()
                },
            ),
            line(
                "optimizer update working set",
                peak.update,
                format!("4 × the largest trainable tensor{}", self.elsewhere(peak.update, |m| m.update)),
            ),
        ]
    }

    /// `"; X GB at <moment>"` when the item is larger at another moment than at the peak.
    fn elsewhere(&self, at_peak: u64, pick: fn(&Moment) -> u64) -> String {
        match self.moments.iter().max_by_key(|m| pick(m)) {
            Some(m) if pick(m) > at_peak => {
                format!("; {:.2} GB at {}", pick(m) as f64 / GB, m.label)
            }
            _ => String::new(),
        }
    }
}

fn optimizer_name(optimizer: &OptimizerConfig) -> String {
    match optimizer {
        OptimizerConfig::Adamw(_) => "AdamW".into(),
        OptimizerConfig::Apollo(c) if is_mini(c) => "APOLLO-Mini".into(),
        OptimizerConfig::Apollo(c) => format!("APOLLO r={}", c.rank),
    }
}

/// The settings planned, in words.
fn describe(s: &PlanSettings, seq_len: usize) -> String {
    let phase = match s.phase {
        Phase::Sft => format!("SFT, {} × {seq_len} tokens", s.batch),
        Phase::Dpo => format!("DPO, {} pairs × 2 × {seq_len} tokens", s.batch),
        Phase::Mixed => format!("mixed SFT/DPO, batch {} at {seq_len} tokens", s.batch),
    };
    format!(
        "{phase}; {}; {}; logits chunk {}; {}; reference {}; {} freeze/train_only glob(s)",
        s.dtype.name(),
        if s.recompute {
            "recompute"
        } else {
            "no recompute"
        },
        if s.logits_chunk == 0 {
            "whole".into()
        } else {
            s.logits_chunk.to_string()
        },
        optimizer_name(&s.optimizer),
        match (s.reference, s.reference_block) {
            (ReferenceMode::Resident, _) => "resident".to_string(),
            (ReferenceMode::Streamed, 0) => "streamed".to_string(),
            (ReferenceMode::Streamed, n) => format!("streamed in blocks of {n} pairs"),
        },
        s.freeze.len() + s.train_only.len(),
    )
}

fn is_mini(c: &ApolloConfig) -> bool {
    c.rank == 1 && c.scale_type == crate::train::optim::ScaleType::Tensor
}

/// One change of settings and what the plan says with it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Fix {
    /// The setting, as the config file (or, for what-ifs, the `dreamloop plan` flag) names it.
    pub setting: String,
    /// The plan's peak with it.
    pub total_bytes: u64,
    pub fits: bool,
}

/// Settings that would make a plan fit: each change alone, then the changes together in
/// the order listed (the first prefix that fits), then the longest `max_seq_len` that fits
/// as things are. Empty when the plan fits already.
pub fn fixes(model: &ModelConfig, s: &PlanSettings) -> Vec<Fix> {
    if plan(model, s).fits {
        return Vec::new();
    }
    type Change = (String, Box<dyn Fn(&mut PlanSettings)>);
    let mut changes: Vec<Change> = Vec::new();
    if s.dtype != Dtype::Bf16 {
        changes.push((
            "[model] dtype = \"bf16\"".into(),
            Box::new(|s| s.dtype = Dtype::Bf16),
        ));
    }
    if !s.recompute {
        changes.push((
            "[train] recompute = true".into(),
            Box::new(|s| s.recompute = true),
        ));
    }
    if s.logits_chunk == 0 || s.logits_chunk > SUGGESTED_LOGITS_CHUNK {
        changes.push((
            format!("[train] logits_chunk = {SUGGESTED_LOGITS_CHUNK}"),
            Box::new(|s| s.logits_chunk = SUGGESTED_LOGITS_CHUNK),
        ));
    }
    let embeddings = ["model.embed_tokens.*", "lm_head.*"];
    if param_shapes(model)
        .iter()
        .any(|p| p.is_embedding() && trains(&p.name, s))
    {
        changes.push((
            "train.freeze += [\"model.embed_tokens.*\", \"lm_head.*\"]".into(),
            Box::new(move |s| s.freeze.extend(embeddings.iter().map(|g| g.to_string()))),
        ));
    }
    if !matches!(&s.optimizer, OptimizerConfig::Apollo(c) if is_mini(c)) {
        changes.push((
            "[train.optimizer.apollo] rank = 1, scale = 128.0, scale_type = \"tensor\" (APOLLO-Mini)".into(),
            Box::new(|s| s.optimizer = OptimizerConfig::Apollo(ApolloConfig::mini())),
        ));
    }
    if s.reference == ReferenceMode::Resident {
        changes.push((
            "[model] stream_reference = true (a model directory)".into(),
            Box::new(|s| s.reference = ReferenceMode::Streamed),
        ));
    }
    let mut out = Vec::new();
    for (name, change) in &changes {
        let mut t = s.clone();
        change(&mut t);
        let p = plan(model, &t);
        out.push(Fix {
            setting: name.clone(),
            total_bytes: p.total_bytes,
            fits: p.fits,
        });
    }
    if !out.iter().any(|f| f.fits) {
        let mut t = s.clone();
        let mut names = Vec::new();
        for (name, change) in &changes {
            change(&mut t);
            names.push(name.clone());
            let p = plan(model, &t);
            if p.fits || names.len() == changes.len() {
                out.push(Fix {
                    setting: names.join(" + "),
                    total_bytes: p.total_bytes,
                    fits: p.fits,
                });
                break;
            }
        }
    }
    // The longest sequence that fits as things are, by halving.
    let mut t = s.clone();
    if t.seq_len == 0 {
        t.seq_len = model.max_position_embeddings;
    }
    while t.seq_len > 64 {
        t.seq_len /= 2;
        let p = plan(model, &t);
        if p.fits {
            out.push(Fix {
                setting: format!("train.max_seq_len = {}", t.seq_len),
                total_bytes: p.total_bytes,
                fits: true,
            });
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::AdamWConfig;

    fn fixture(name: &str) -> ModelConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/models")
            .join(name)
            .join("config.json");
        ModelConfig::from_file(&path).expect("fixture config")
    }

    /// The operator's Qwen3.5-27B as its published config.json describes it.
    fn qwen3_5_27b() -> ModelConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/qwen3_5_27b/config.json");
        ModelConfig::from_file(&path).expect("the published config parses")
    }

    fn settings(optimizer: OptimizerConfig) -> PlanSettings {
        PlanSettings {
            dtype: Dtype::F32,
            recompute: false,
            logits_chunk: 0,
            phase: Phase::Sft,
            seq_len: 4096,
            batch: 1,
            reference: ReferenceMode::Resident,
            reference_block: 0,
            optimizer,
            freeze: Vec::new(),
            train_only: Vec::new(),
            device_bytes: DEFAULT_CUDA_DEVICE_BYTES,
            target: Target::Cuda,
            peak_flops: Some(H200_BF16_FLOPS),
            mfu: DEFAULT_MFU,
        }
    }

    fn adamw() -> OptimizerConfig {
        OptimizerConfig::Adamw(AdamWConfig::default())
    }

    fn item(p: &Plan, name: &str) -> u64 {
        p.items
            .iter()
            .find(|i| i.name == name)
            .unwrap_or_else(|| panic!("no item {name}"))
            .bytes
    }

    /// Parameter counts equal the fixtures' safetensors counts (`../shared/fixtures/README.md`).
    #[test]
    fn parameter_counts_match_the_fixture_checkpoints() {
        for (name, want) in [
            ("llama_tied", 90_432u64),
            ("llama_untied", 106_816),
            ("qwen2", 107_072),
            ("qwen3", 115_136),
            ("qwen3_next", 216_776),
            ("qwen3_next_moe", 254_920),
            ("qwen3_5", 200_392),
        ] {
            let p = plan(&fixture(name), &settings(adamw()));
            assert_eq!(p.parameters, want, "{name}");
        }
    }

    /// 26.90 B parameters, split as BENCHMARKS.md's paper estimate has it: embeddings + LM
    /// head 2.54 B, MLPs 17.11 B, 16 attention layers 1.68 B, 48 GDN layers 5.56 B.
    #[test]
    fn the_27b_has_26_90_billion_parameters() {
        let m = qwen3_5_27b();
        let shapes = param_shapes(&m);
        let sum = |f: &dyn Fn(&str) -> bool| -> f64 {
            shapes
                .iter()
                .filter(|p| f(&p.name))
                .map(|p| p.numel() as f64)
                .sum::<f64>()
                / 1e9
        };
        let close = |got: f64, want: f64| (got - want).abs() < 0.005;
        assert!(close(sum(&|_| true), 26.90), "{}", sum(&|_| true));
        assert!(close(
            sum(&|n| n.contains("embed_tokens") || n.starts_with("lm_head")),
            2.54
        ));
        assert!(close(sum(&|n| n.contains(".mlp.")), 17.11));
        assert!(close(sum(&|n| n.contains(".self_attn.")), 1.68));
        assert!(close(sum(&|n| n.contains(".linear_attn.")), 5.56));
    }

    #[test]
    fn weights_are_parameters_times_dtype_size() {
        let m = qwen3_5_27b();
        let mut s = settings(adamw());
        let f32_plan = plan(&m, &s);
        assert_eq!(item(&f32_plan, "weights"), f32_plan.parameters * 4);
        s.dtype = Dtype::Bf16;
        let bf16_plan = plan(&m, &s);
        assert_eq!(item(&bf16_plan, "weights"), bf16_plan.parameters * 2);
        // The resident reference is a second copy.
        assert_eq!(item(&bf16_plan, "reference"), bf16_plan.parameters * 2);
    }

    /// AdamW keeps two f32 moments per trainable parameter; freezing the embeddings and the
    /// head removes their gradients and moments (llama_tied: 90,432 parameters, of which the
    /// tied 256 × 64 embedding is 16,384).
    #[test]
    fn adamw_state_and_freezing_follow_the_parameter_count() {
        let m = fixture("llama_tied");
        let mut s = settings(adamw());
        s.seq_len = 8;
        let p = plan(&m, &s);
        let state = item(&p, "optimizer: dense") + item(&p, "optimizer: embeddings + LM head");
        assert_eq!(state, 2 * 90_432 * 4);
        assert_eq!(item(&p, "optimizer: embeddings + LM head"), 2 * 16_384 * 4);
        s.freeze = vec!["model.embed_tokens.*".into()];
        let frozen = plan(&m, &s);
        assert_eq!(frozen.trainable_parameters, 90_432 - 16_384);
        assert_eq!(item(&frozen, "optimizer: embeddings + LM head"), 0);
    }

    /// APOLLO-Mini on a `[m, n]` matrix keeps a rank-1 projection of `min(m, n)`, two moments
    /// of `max(m, n)` and the limiter's norm; llama_tied's q/o_proj are 64 × 64, k/v_proj
    /// 32 × 64, its MLP gate/up 128 × 64 and down 64 × 128.
    #[test]
    fn apollo_mini_state_of_projected_matrices() {
        let m = fixture("llama_tied");
        let p = plan(&m, &settings(OptimizerConfig::Apollo(ApolloConfig::mini())));
        let per_layer = 2 * (64 + 2 * 64 + 1) + 2 * (32 + 2 * 64 + 1) + 3 * (64 + 2 * 128 + 1);
        assert_eq!(item(&p, "optimizer: projected"), 2 * per_layer * 4);
        // Norms stay on the dense branch: 2 layers × 2 × 64 + the final 64, two moments each.
        assert_eq!(item(&p, "optimizer: dense"), 2 * (2 * 2 * 64 + 64) * 4);
    }

    /// The unit-lower inverse of a 64-row chunk in blocks of 16 keeps 16 + 120 + 16 + 56 + 24
    /// elements per token and value head (see `gdn_kept`).
    #[test]
    fn the_chunk_inverse_keeps_232_elements_per_token_and_head() {
        assert_eq!(unit_lower_inverse_kept(64, 16), 232);
    }

    /// One token through llama_tied: `6 ·` its 90,112 matmul parameters (everything but the
    /// five 64-wide norms; the tied embedding counted once, as the head) plus the 1 × 1
    /// attention scores: `3 · 2 layers · 4 · 64`.
    #[test]
    fn flops_per_token_of_a_single_token() {
        let m = fixture("llama_tied");
        let mut s = settings(adamw());
        s.seq_len = 1;
        let p = plan(&m, &s);
        assert_eq!(p.flops_per_step, (6 * 90_112 + 3 * 2 * 4 * 64) as f64);
    }

    /// f32 without recompute cannot hold the 27B on one 141 GB H200; the what-ifs together
    /// (bf16, recompute, chunked log-softmax, frozen embeddings, APOLLO-Mini) do, and the
    /// fixes name them.
    #[test]
    fn the_27b_fits_one_h200_only_with_the_what_ifs() {
        let m = qwen3_5_27b();
        let s = settings(OptimizerConfig::Apollo(ApolloConfig::mini()));
        let p = plan(&m, &s);
        assert!(!p.fits, "{}", p.total_bytes);
        let fixes = fixes(&m, &s);
        assert!(fixes.iter().any(|f| f.fits), "{fixes:?}");
        let mut t = s.clone();
        t.dtype = Dtype::Bf16;
        t.recompute = true;
        t.logits_chunk = SUGGESTED_LOGITS_CHUNK;
        t.freeze = vec!["model.embed_tokens.*".into(), "lm_head.*".into()];
        t.reference = ReferenceMode::Streamed;
        assert!(plan(&m, &t).fits, "{}", plan(&m, &t).total_bytes);
    }

    /// Issue 13's target: the operator's 27B on one 141 GB H200 with at least 15 % free, for
    /// SFT at 4096 tokens and a DPO pair at 2 × 2048 with the streamed reference (its two
    /// units alive only while it runs forward, which is never during a backward) computed in
    /// blocks of 16 pairs between steps; a block too large for the device is the peak and
    /// does not fit.
    #[test]
    fn the_27b_sft_and_dpo_leave_15_percent_of_an_h200() {
        let m = qwen3_5_27b();
        let mut s = settings(OptimizerConfig::Apollo(ApolloConfig::mini()));
        s.dtype = Dtype::Bf16;
        s.recompute = true;
        s.logits_chunk = SUGGESTED_LOGITS_CHUNK;
        s.freeze = vec!["model.embed_tokens.*".into(), "lm_head.*".into()];
        s.reference = ReferenceMode::Streamed;
        s.reference_block = 16;
        let sft = plan(&m, &s);
        assert!(sft.headroom >= 0.15, "SFT: {:.3}", sft.headroom);
        let mut d = s.clone();
        d.phase = Phase::Dpo;
        d.seq_len = 2048;
        let dpo = plan(&m, &d);
        assert!(dpo.headroom >= 0.15, "DPO: {:.3}", dpo.headroom);
        assert!(dpo.peak_at.contains("backward"), "{}", dpo.peak_at);
        let reference = &dpo.items.iter().find(|i| i.name == "reference").unwrap();
        assert_eq!(reference.bytes, 0, "{}", reference.how);
        // A block's pass holds every pair's hidden states (4096 pairs: 172 GB).
        d.reference_block = 4096;
        let huge = plan(&m, &d);
        assert!(!huge.fits, "{}", huge.total_bytes);
        assert!(huge.peak_at.contains("block of 4096"), "{}", huge.peak_at);
    }

    /// Today's code: f32, no recompute, whole logits, a resident reference; the device is
    /// `[model] device_memory`, else one H200 on cuda and the host (0, read by the caller) on
    /// cpu.
    #[test]
    fn settings_from_a_config_plan_what_exists() {
        let mut c = DreamConfig::tiny(std::path::Path::new("s"), std::path::Path::new("t"));
        let s = PlanSettings::from_config(&c);
        assert_eq!(
            (s.dtype, s.recompute, s.logits_chunk, s.reference),
            (Dtype::F32, false, 0, ReferenceMode::Resident)
        );
        assert_eq!((s.seq_len, s.batch, s.device_bytes), (1024, 2, 0));
        assert_eq!(s.target, Target::Cpu);
        c.model.backend = Backend::Cuda;
        assert_eq!(
            PlanSettings::from_config(&c).device_bytes,
            DEFAULT_CUDA_DEVICE_BYTES
        );
        c.model.device_memory = Some("80GB".into());
        assert_eq!(PlanSettings::from_config(&c).device_bytes, 80_000_000_000);
    }

    #[test]
    fn memory_sizes_parse_with_decimal_and_binary_units() {
        assert_eq!(parse_bytes("141GB"), Ok(141_000_000_000));
        assert_eq!(parse_bytes("24GiB"), Ok(24 << 30));
        assert_eq!(parse_bytes("512 MB"), Ok(512_000_000));
        assert_eq!(parse_bytes("1e9"), Ok(1_000_000_000));
        assert_eq!(parse_bytes("1.5tb"), Ok(1_500_000_000_000));
        for bad in ["lots", "", "0", "-3GB", "12 parsecs"] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        assert_eq!(
            host_memory_bytes("MemTotal:       24576000 kB\nMemFree: 1 kB\n"),
            Some(24_576_000 * 1024)
        );
    }
}
