//! The llama-family decoder (llama, mistral, qwen2, qwen3) in burn 0.22, matching
//! transformers' `modeling_llama.py` / `modeling_qwen2.py` / `modeling_qwen3.py` in float32
//! or bfloat16.
//!
//! In bf16 the weights and the activations between blocks are bf16, and exactly where
//! transformers upcasts this code computes in f32: RMSNorm statistics (llama's weight
//! product after the cast back, qwen3_next's `(1 + w)` product before it), the rotary tables
//! (computed in f32, then rounded to the model dtype, as `cos.to(x.dtype)`), the attention
//! softmax (`softmax(.., dtype=float32).to(q.dtype)` of eager attention), and the logits,
//! which leave [`CausalLm::logits_from_hidden`] as f32 (the bf16 head output widened, as the
//! losses' `logits.float()` does). In f32 every cast is a no-op, so nothing changes there.
//!
//! Hazard: burn-flex compares the dtypes of a binary op's operands only in a `debug_assert`,
//! and dependencies are built without debug assertions (`Cargo.toml`), so an f32 tensor made
//! with `from_data(.., &device)` / `zeros(.., &device)` and combined with a bf16 activation is
//! not caught. Tensors made during a forward pass take the model dtype
//! (`(&device, lm.dtype())`), as the rotary tables and the padding mask of [`ForwardContext`] do.
//!
//! embeddings → layers of (RMSNorm → causal GQA attention with `rotate_half` RoPE → residual
//! → RMSNorm → SwiGLU MLP → residual) → final norm → lm_head (or the tied embedding).
//!
//! Field names are the checkpoint's names (`model.layers.3.self_attn.q_proj.weight`), and
//! linear weights keep Hugging Face's `[out, in]` orientation, so loading and saving are a
//! rename-free copy. burn's own `Linear` (`[in, out]`) and `RotaryEncoding` (interleaved
//! pairs) are deliberately not used: both would need weights rewritten to match HF.
//!
//! Batches are right-padded: `attention_mask[b, t] = 0` marks padding, which no real token
//! attends to. Positions are `0..T` for every row, as transformers uses for right padding.
//!
//! The hybrid families (qwen3_next, qwen3_5) reuse this stack: a layer's token mixer is
//! either this attention (then with a per-head output gate, partial RoPE and zero-centred
//! `1 + w` norms) or a Gated DeltaNet (`gdn`), and its feed-forward block dense or a sparse
//! MoE (`moe`).

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, silu, softmax};
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};

use super::config::{LayerKind, ModelConfig};
use super::gdn::{GatedDeltaNet, GdnState};
use super::moe::FeedForward;
use super::weights::{CheckpointLayout, TensorSource, WeightError};

/// A linear layer in Hugging Face orientation: `y = x·Wᵀ + b`.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[out, in]`, as stored in the checkpoint.
    pub weight: Param<Tensor<2>>,
    /// `[out]`, when the family has one here.
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    pub(crate) fn load(
        src: &mut dyn TensorSource,
        name: &str,
        out: usize,
        inp: usize,
        bias: bool,
    ) -> Result<Self, WeightError> {
        Ok(Linear {
            weight: Param::from_tensor(src.take2(&format!("{name}.weight"), [out, inp])?),
            bias: if bias {
                Some(Param::from_tensor(src.take1(&format!("{name}.bias"), out)?))
            } else {
                None
            },
        })
    }

    /// # Shapes
    /// `x: [batch, seq, in]` → `[batch, seq, out]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let w = self.weight.val().transpose().unsqueeze_dim::<3>(0);
        let y = x.matmul(w);
        match &self.bias {
            Some(b) => y + b.val().unsqueeze_dims::<3>(&[0, 1]),
            None => y,
        }
    }
}

/// `x · rsqrt(mean(x²) + eps) · w` over the last dimension (llama/qwen convention: plain `w`),
/// or `· (1 + w)` with zero-centred weights (qwen3_next / qwen3_5).
#[derive(Module, Debug)]
pub struct RmsNorm {
    /// `[dim]`
    pub weight: Param<Tensor<1>>,
    /// Added to the mean square before the root.
    #[module(skip)]
    pub eps: f64,
    /// Scale by `1 + w` instead of `w`.
    #[module(skip)]
    pub unit_offset: bool,
}

impl RmsNorm {
    pub(crate) fn load(
        src: &mut dyn TensorSource,
        name: &str,
        dim: usize,
        eps: f64,
        unit_offset: bool,
    ) -> Result<Self, WeightError> {
        Ok(RmsNorm {
            weight: Param::from_tensor(src.take1(&format!("{name}.weight"), dim)?),
            eps,
            unit_offset,
        })
    }

    /// Normalises over the last dimension of a tensor of any rank; the statistics are
    /// always f32 and the result is in `x`'s dtype.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        let x = x.cast(DType::F32);
        let variance = x.clone().powi_scalar(2).mean_dim(D - 1);
        let normed = x * (variance + self.eps).sqrt().recip();
        let mut shape = [1usize; D];
        shape[D - 1] = self.weight.dims()[0];
        let w = self.weight.val().reshape(shape);
        if self.unit_offset {
            // Qwen3NextRMSNorm: `(x · (1 + w.float())).type_as(x)`.
            (normed * (w.cast(DType::F32) + 1.0)).cast(dtype)
        } else {
            // LlamaRMSNorm: `w · x.to(input_dtype)`.
            normed.cast(dtype) * w
        }
    }
}

/// Token embedding table.
#[derive(Module, Debug)]
pub struct Embedding {
    /// `[vocab, hidden]`
    pub weight: Param<Tensor<2>>,
}

/// SwiGLU feed-forward block: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    /// # Shapes
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        swiglu(&self.gate_proj, &self.up_proj, &self.down_proj, x)
    }
}

/// `down(silu(gate(x)) ⊙ up(x))`, for [`Mlp`] and the dense case of `moe::FeedForward`.
///
/// # Shapes
/// `[batch, seq, hidden]` → `[batch, seq, hidden]`
pub(crate) fn swiglu(gate: &Linear, up: &Linear, down: &Linear, x: Tensor<3>) -> Tensor<3> {
    down.forward(silu(gate.forward(x.clone())) * up.forward(x))
}

/// Head counts of one attention block.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (fewer than `heads` under GQA).
    pub kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// `q_proj` yields `[query | gate]` per head; the output is `attn · sigmoid(gate)`.
    pub gated: bool,
}

/// Causal self-attention with grouped-query heads and optional per-head q/k norm (qwen3).
#[derive(Module, Debug)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// qwen3: RMSNorm over `head_dim`, applied per head before RoPE.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    /// Head counts; not a parameter.
    #[module(skip)]
    pub shape: AttentionShape,
}

/// What one forward pass shares across layers: RoPE tables and the attention mask.
pub struct ForwardContext {
    /// `[seq, head_dim]` cos and sin of `position · inv_freq`, duplicated halves (HF layout),
    /// computed in f32 and stored in the model dtype.
    cos: Tensor<4>,
    sin: Tensor<4>,
    /// `[batch, 1, seq_q, seq_k]`, true where attention is forbidden (future, padding,
    /// outside the sliding window).
    mask: Tensor<4, Bool>,
    /// `[batch, seq, 1]`, 1 for tokens and 0 for padding (GDN layers zero padded inputs).
    token_mask: Option<Tensor<3>>,
}

impl Attention {
    /// # Shapes
    /// `x: [batch, seq, hidden]` → (`[batch, seq, hidden]`, attention probabilities
    /// `[batch, heads, seq, seq]` when `keep_probs`)
    pub fn forward(
        &self,
        x: Tensor<3>,
        ctx: &ForwardContext,
        keep_probs: bool,
    ) -> (Tensor<3>, Option<Tensor<4>>) {
        let [batch, seq, _] = x.dims();
        let AttentionShape {
            heads,
            kv_heads,
            head_dim,
            ..
        } = self.shape;
        let dtype = x.dtype();
        let split = |t: Tensor<3>, n: usize| t.reshape([batch, seq, n, head_dim]).swap_dims(1, 2);
        let (q, gate) = self.query(x.clone());
        let mut q = q.swap_dims(1, 2);
        let mut k = split(self.k_proj.forward(x.clone()), kv_heads);
        let v = split(self.v_proj.forward(x), kv_heads);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        let q = apply_rope(q, &ctx.cos, &ctx.sin);
        let k = repeat_kv(apply_rope(k, &ctx.cos, &ctx.sin), heads / kv_heads);
        let v = repeat_kv(v, heads / kv_heads);

        let scale = (head_dim as f64).powf(-0.5);
        let scores = q.matmul(k.swap_dims(2, 3)) * scale;
        // A large finite value rather than -inf: a fully masked row (left padding) then
        // gives a uniform row instead of NaN, and exp() of it is exactly 0 otherwise.
        let scores = scores.mask_fill(ctx.mask.clone().expand([batch, heads, seq, seq]), -1.0e30);
        let probs = softmax(scores.cast(DType::F32), 3).cast(dtype);
        let out = probs
            .clone()
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, seq, heads * head_dim]);
        let out = match gate {
            Some(gate) => out * sigmoid(gate),
            None => out,
        };
        (self.o_proj.forward(out), keep_probs.then_some(probs))
    }

    /// Queries `[batch, seq, heads, head_dim]` and, for gated attention, the output gate
    /// `[batch, seq, heads · head_dim]` (`q_proj` rows per head are `[query | gate]`).
    fn query(&self, x: Tensor<3>) -> (Tensor<4>, Option<Tensor<3>>) {
        let [batch, seq, _] = x.dims();
        let AttentionShape {
            heads,
            head_dim,
            gated,
            ..
        } = self.shape;
        let projected = self.q_proj.forward(x);
        if !gated {
            return (projected.reshape([batch, seq, heads, head_dim]), None);
        }
        let both = projected.reshape([batch, seq, heads, 2 * head_dim]);
        let gate =
            both.clone()
                .narrow(3, head_dim, head_dim)
                .reshape([batch, seq, heads * head_dim]);
        (both.narrow(3, 0, head_dim), Some(gate))
    }
}

impl Attention {
    /// Loads `prefix` (`model.layers.N.self_attn`).
    fn load(
        src: &mut dyn TensorSource,
        prefix: &str,
        cfg: &ModelConfig,
    ) -> Result<Self, WeightError> {
        let h = cfg.hidden_size;
        let (heads, kv, hd) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let gated = cfg.attn_output_gate;
        let q_rows = heads * hd * if gated { 2 } else { 1 };
        let norm = |src: &mut dyn TensorSource, which: &str| {
            if cfg.qk_norm {
                let name = format!("{prefix}.{which}");
                RmsNorm::load(src, &name, hd, cfg.rms_norm_eps, cfg.norm_unit_offset).map(Some)
            } else {
                Ok(None)
            }
        };
        let name = |part: &str| format!("{prefix}.{part}");
        Ok(Attention {
            q_proj: Linear::load(src, &name("q_proj"), q_rows, h, cfg.qkv_bias)?,
            k_proj: Linear::load(src, &name("k_proj"), kv * hd, h, cfg.qkv_bias)?,
            v_proj: Linear::load(src, &name("v_proj"), kv * hd, h, cfg.qkv_bias)?,
            o_proj: Linear::load(src, &name("o_proj"), h, heads * hd, cfg.o_bias)?,
            q_norm: norm(src, "q_norm")?,
            k_norm: norm(src, "k_norm")?,
            shape: AttentionShape {
                heads,
                kv_heads: kv,
                head_dim: hd,
                gated,
            },
        })
    }

    /// Attention of `n` new positions over the cached keys/values plus their own; appends the
    /// new keys/values (after RoPE, before `repeat_kv`) to `cache`.
    ///
    /// # Shapes
    /// `x: [batch, n, hidden]`, `ctx.mask: [batch, 1, n, past + n]` → `[batch, n, hidden]`
    pub fn forward_cached(
        &self,
        x: Tensor<3>,
        ctx: &ForwardContext,
        cache: &mut Option<(Tensor<4>, Tensor<4>)>,
    ) -> Tensor<3> {
        let [batch, n, _] = x.dims();
        let AttentionShape {
            heads,
            kv_heads,
            head_dim,
            ..
        } = self.shape;
        let dtype = x.dtype();
        let split = |t: Tensor<3>, h: usize| t.reshape([batch, n, h, head_dim]).swap_dims(1, 2);
        let (q, gate) = self.query(x.clone());
        let mut q = q.swap_dims(1, 2);
        let mut k = split(self.k_proj.forward(x.clone()), kv_heads);
        let v = split(self.v_proj.forward(x), kv_heads);
        if let (Some(qn), Some(kn)) = (&self.q_norm, &self.k_norm) {
            q = qn.forward(q);
            k = kn.forward(k);
        }
        let q = apply_rope(q, &ctx.cos, &ctx.sin);
        let k = apply_rope(k, &ctx.cos, &ctx.sin);
        let (k, v) = match cache.take() {
            Some((pk, pv)) => (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2)),
            None => (k, v),
        };
        *cache = Some((k.clone(), v.clone()));
        let [_, _, total, _] = k.dims();
        let k = repeat_kv(k, heads / kv_heads);
        let v = repeat_kv(v, heads / kv_heads);
        let scores = q.matmul(k.swap_dims(2, 3)) * (head_dim as f64).powf(-0.5);
        let scores = scores.mask_fill(ctx.mask.clone().expand([batch, heads, n, total]), -1.0e30);
        let out = softmax(scores.cast(DType::F32), 3)
            .cast(dtype)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([batch, n, heads * head_dim]);
        let out = match gate {
            Some(gate) => out * sigmoid(gate),
            None => out,
        };
        self.o_proj.forward(out)
    }
}

/// `x·cos + rotate_half(x)·sin` with `rotate_half(x) = cat(-x₂, x₁)` (HF's non-interleaved RoPE)
/// on the first `2·inv_freq.len()` channels (the tables' width: `rotary_dim` rounded up to
/// even, as transformers rotates an odd partial width); the rest pass through (partial RoPE).
///
/// # Shapes
/// `x: [batch, heads, seq, head_dim]`, `cos`/`sin`: `[1, 1, seq, rotary_dim]`
fn apply_rope(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [_, _, _, head_dim] = x.dims();
    let [_, _, _, rotary] = cos.dims();
    if rotary < head_dim {
        let pass = x.clone().narrow(3, rotary, head_dim - rotary);
        let rotated = apply_rope(x.narrow(3, 0, rotary), cos, sin);
        return Tensor::cat(vec![rotated, pass], 3);
    }
    let half = head_dim / 2;
    let x1 = x.clone().narrow(3, 0, half);
    let x2 = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// Repeats each key/value head `groups` times (transformers' `repeat_kv`).
///
/// # Shapes
/// `[batch, kv_heads, seq, head_dim]` → `[batch, kv_heads·groups, seq, head_dim]`
fn repeat_kv(x: Tensor<4>, groups: usize) -> Tensor<4> {
    if groups == 1 {
        return x;
    }
    let [batch, kv_heads, seq, head_dim] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([batch, kv_heads, groups, seq, head_dim])
        .reshape([batch, kv_heads * groups, seq, head_dim])
}

/// One pre-norm decoder block; exactly one of `self_attn` / `linear_attn` is present.
#[derive(Module, Debug)]
pub struct DecoderLayer {
    pub self_attn: Option<Attention>,
    /// Gated DeltaNet (hybrid families).
    pub linear_attn: Option<GatedDeltaNet>,
    pub mlp: FeedForward,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    /// The block over `x`: returns its output and, when `keep_probs`, the attention
    /// probabilities (softmax layers only).
    ///
    /// # Shapes
    /// `x: [batch, seq, hidden]` → `[batch, seq, hidden]`, probs `[batch, heads, seq, seq]`
    pub(crate) fn forward(
        &self,
        x: Tensor<3>,
        ctx: &ForwardContext,
        keep_probs: bool,
    ) -> (Tensor<3>, Option<Tensor<4>>) {
        let normed = self.input_layernorm.forward(x.clone());
        let (mixed, probs) = match (&self.self_attn, &self.linear_attn) {
            (Some(attn), _) => attn.forward(normed, ctx, keep_probs),
            (None, Some(gdn)) => (gdn.forward(normed, ctx.token_mask.as_ref(), None), None),
            (None, None) => unreachable!("a decoder layer has a token mixer"),
        };
        let x = x + mixed;
        let x = x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x));
        (x, probs)
    }

    /// Attention (or GDN) over the cached history plus `x`, updating the cache slot.
    fn forward_cached(
        &self,
        x: Tensor<3>,
        ctx: &ForwardContext,
        slot: &mut LayerCache,
    ) -> Tensor<3> {
        let normed = self.input_layernorm.forward(x.clone());
        let mixed = match (&self.self_attn, &self.linear_attn) {
            (Some(attn), _) => attn.forward_cached(normed, ctx, &mut slot.kv),
            (None, Some(gdn)) => gdn.forward(normed, None, Some(&mut slot.recurrent)),
            (None, None) => unreachable!("a decoder layer has a token mixer"),
        };
        let x = x + mixed;
        x.clone() + self.mlp.forward(self.post_attention_layernorm.forward(x))
    }

    /// Decoder layer `i` (`model.layers.{i}.*`) of `cfg` from `src`.
    pub fn load(
        cfg: &ModelConfig,
        src: &mut dyn TensorSource,
        i: usize,
    ) -> Result<Self, WeightError> {
        let (h, eps, offset) = (cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset);
        let p = format!("model.layers.{i}");
        let (self_attn, linear_attn) = match (&cfg.layer_types[i], &cfg.linear_attn) {
            (LayerKind::LinearAttention, Some(lin)) => (
                None,
                Some(GatedDeltaNet::load(
                    src,
                    &format!("{p}.linear_attn"),
                    cfg,
                    lin,
                )?),
            ),
            _ => (
                Some(Attention::load(src, &format!("{p}.self_attn"), cfg)?),
                None,
            ),
        };
        Ok(DecoderLayer {
            self_attn,
            linear_attn,
            mlp: FeedForward::load(src, &format!("{p}.mlp"), cfg, i)?,
            input_layernorm: RmsNorm::load(src, &format!("{p}.input_layernorm"), h, eps, offset)?,
            post_attention_layernorm: RmsNorm::load(
                src,
                &format!("{p}.post_attention_layernorm"),
                h,
                eps,
                offset,
            )?,
        })
    }

    /// Whether this layer is softmax attention (has attention probabilities to capture).
    pub fn is_attention(&self) -> bool {
        self.self_attn.is_some()
    }
}

/// The decoder stack (`model.*` in the checkpoint).
#[derive(Module, Debug)]
pub struct DecoderModel {
    pub embed_tokens: Embedding,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
}

/// A causal LM: the checkpoint's top level (`model.*` and `lm_head.*`).
#[derive(Module, Debug)]
pub struct CausalLm {
    pub model: DecoderModel,
    /// Absent when the embedding is tied (the file then has no `lm_head.weight`).
    pub lm_head: Option<Linear>,
    /// RoPE inverse frequencies (`⌈rotary_dim / 2⌉`); derived from the config, not a parameter.
    #[module(skip)]
    pub inv_freq: Vec<f32>,
    /// Sliding-window width (mistral), if any.
    #[module(skip)]
    pub sliding_window: Option<usize>,
    /// Where the decoder's tensors sit in the checkpoint and what else it carries (vision
    /// tower, MTP head), for saving back.
    #[module(skip)]
    pub layout: Arc<CheckpointLayout>,
}

/// What one layer remembers of the positions decoded so far.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    /// Attention: keys and values (`[batch, kv_heads, len, head_dim]`).
    kv: Option<(Tensor<4>, Tensor<4>)>,
    /// Gated DeltaNet: convolution inputs and the delta-rule state (size independent of len).
    recurrent: Option<GdnState>,
}

/// The decoding cache of every layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    /// Positions already in the cache.
    pub len: usize,
}

/// What a forward pass returns besides logits when asked.
#[derive(Default)]
pub struct Capture {
    /// Per full-attention layer, attention probabilities `[batch, heads, seq, seq]`.
    pub attention: Vec<Tensor<4>>,
    /// The decoder layer index of each entry of `attention` (Gated-DeltaNet layers have no
    /// attention probabilities and are skipped).
    pub attention_layers: Vec<usize>,
}

impl CausalLm {
    /// Builds the model from named tensors (a checkpoint, or a seeded initialiser).
    pub fn load(cfg: &ModelConfig, src: &mut dyn TensorSource) -> Result<Self, WeightError> {
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps;
        let offset = cfg.norm_unit_offset;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(cfg, src, i))
            .collect::<Result<Vec<_>, _>>()?;
        let model = DecoderModel {
            embed_tokens: Embedding {
                weight: Param::from_tensor(
                    src.take2("model.embed_tokens.weight", [cfg.vocab_size, h])?,
                ),
            },
            layers,
            norm: RmsNorm::load(src, "model.norm", h, eps, offset)?,
        };
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(Linear::load(src, "lm_head", cfg.vocab_size, h, false)?)
        };
        src.finish()?;
        Ok(CausalLm {
            model,
            lm_head,
            inv_freq: cfg.inv_freq(),
            sliding_window: cfg.sliding_window,
            layout: Arc::new(CheckpointLayout::default()),
        })
    }

    /// What a save writes, in order, by checkpoint name and disk dtype (`dtypes`, as loaded),
    /// pass-through tensors included; nothing is read off the device until it is written.
    pub fn outgoing<'a>(
        &'a self,
        dtypes: &std::collections::HashMap<String, super::DiskDtype>,
    ) -> Vec<super::weights::Outgoing<'a>> {
        super::weights::outgoing(
            self,
            &|name| self.layout.disk_name(name),
            dtypes,
            &self.layout.passthrough,
        )
    }

    /// Every parameter under its checkpoint name (`model.language_model.…` for a multimodal
    /// qwen3_5), gathered on the host at once (what saves did before streaming; the
    /// `save_memory` bench compares against it).
    pub fn checkpoint_tensors(&self) -> Vec<(String, TensorData)> {
        super::weights::named_tensors(self)
            .into_iter()
            .map(|(name, data)| (self.layout.disk_name(&name), data))
            .collect()
    }

    /// Only the token mixer of layer `layer` (its attention or Gated DeltaNet, no norms, no
    /// MLP) over `x` at positions `0..seq`, unmasked: what benchmarks compare layer kinds with.
    ///
    /// # Shapes
    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`
    pub fn mixer_forward(&self, layer: usize, x: Tensor<3>) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let ctx = self.context(batch, seq, None, &x.device());
        let l = &self.model.layers[layer];
        match (&l.self_attn, &l.linear_attn) {
            (Some(attn), _) => attn.forward(x, &ctx, false).0,
            (None, Some(gdn)) => gdn.forward(x, None, None),
            (None, None) => unreachable!("a decoder layer has a token mixer"),
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        self.model.embed_tokens.weight.val().device()
    }

    /// The dtype the weights (and the activations between blocks) are in.
    pub fn dtype(&self) -> DType {
        self.model.embed_tokens.weight.val().dtype()
    }

    /// Final hidden states (after the last norm).
    ///
    /// # Shapes
    /// `input_ids: [batch, seq]`, `attention_mask: [batch, seq]` (1 = token, 0 = padding)
    /// → `[batch, seq, hidden]`
    pub fn hidden_states(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<&[Vec<u8>]>,
        mut capture: Option<&mut Capture>,
    ) -> Tensor<3> {
        let [batch, seq] = input_ids.dims();
        let device = input_ids.device();
        let ctx = self.context(batch, seq, attention_mask, &device);
        let mut x =
            burn::tensor::module::embedding(self.model.embed_tokens.weight.val(), input_ids);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let (next, probs) = layer.forward(x, &ctx, capture.is_some());
            x = next;
            if let (Some(c), Some(p)) = (capture.as_deref_mut(), probs) {
                c.attention.push(p);
                c.attention_layers.push(i);
            }
        }
        self.model.norm.forward(x)
    }

    /// Projects hidden states to vocabulary logits with the head (or the tied embedding),
    /// returned in f32: a bf16 model's bf16 head output widened, as transformers' losses do
    /// (`logits.float()`) before their log-softmax.
    ///
    /// # Shapes
    /// `[batch, seq, hidden]` → `[batch, seq, vocab]`
    pub fn logits_from_hidden(&self, hidden: Tensor<3>) -> Tensor<3> {
        let logits = match &self.lm_head {
            Some(head) => head.forward(hidden),
            None => tied_logits(hidden, self.model.embed_tokens.weight.val()),
        };
        logits.cast(DType::F32)
    }

    /// Logits for every position.
    ///
    /// # Shapes
    /// `input_ids: [batch, seq]` → `[batch, seq, vocab]`
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: Option<&[Vec<u8>]>,
    ) -> Tensor<3> {
        let hidden = self.hidden_states(input_ids, attention_mask, None);
        self.logits_from_hidden(hidden)
    }

    /// Logits of `input_ids` appended after the positions already in `cache` (a single
    /// unpadded sequence per row), updating the cache: decoding is linear, not quadratic.
    ///
    /// # Shapes
    /// `input_ids: [batch, n]` → `[batch, n, vocab]`
    pub fn forward_cached(&self, input_ids: Tensor<2, Int>, cache: &mut KvCache) -> Tensor<3> {
        let [batch, n] = input_ids.dims();
        let device = input_ids.device();
        if cache.layers.len() != self.model.layers.len() {
            cache.layers = vec![LayerCache::default(); self.model.layers.len()];
        }
        let past = cache.len;
        let (cos, sin) = self.rope_tables(past, n, &device);
        let mut mask = Vec::with_capacity(batch * n * (past + n));
        for _ in 0..batch {
            for i in 0..n {
                let pos = past + i;
                for j in 0..past + n {
                    mask.push(j > pos || self.sliding_window.is_some_and(|w| pos >= j + w));
                }
            }
        }
        let ctx = ForwardContext {
            cos,
            sin,
            mask: Tensor::<4, Bool>::from_data(
                TensorData::new(mask, [batch, 1, n, past + n]),
                &device,
            ),
            token_mask: None,
        };
        let mut x =
            burn::tensor::module::embedding(self.model.embed_tokens.weight.val(), input_ids);
        for (layer, slot) in self.model.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward_cached(x, &ctx, slot);
        }
        cache.len += n;
        self.logits_from_hidden(self.model.norm.forward(x))
    }

    /// cos/sin tables for positions `start..start + n`.
    fn rope_tables(&self, start: usize, n: usize, device: &Device) -> (Tensor<4>, Tensor<4>) {
        rope_tables(&self.inv_freq, start, n, (device, self.dtype()))
    }

    /// RoPE tables for positions `0..seq` and the combined attention mask.
    pub(crate) fn context(
        &self,
        batch: usize,
        seq: usize,
        attention_mask: Option<&[Vec<u8>]>,
        device: &Device,
    ) -> ForwardContext {
        let has_gdn = self.model.layers.iter().any(|l| l.linear_attn.is_some());
        ForwardContext::new(
            &self.inv_freq,
            self.sliding_window,
            has_gdn,
            (batch, seq),
            attention_mask,
            (device, self.dtype()),
        )
    }
}

/// Logits through a tied head: the hidden states times the embedding matrix transposed.
///
/// # Shapes
/// `hidden: [batch, seq, hidden]`, `embedding: [vocab, hidden]` → `[batch, seq, vocab]`
pub(crate) fn tied_logits(hidden: Tensor<3>, embedding: Tensor<2>) -> Tensor<3> {
    hidden.matmul(embedding.transpose().unsqueeze_dim::<3>(0))
}

/// cos/sin tables of `inv_freq` for positions `start..start + n`.
fn rope_tables(
    inv_freq: &[f32],
    start: usize,
    n: usize,
    (device, dtype): (&Device, DType),
) -> (Tensor<4>, Tensor<4>) {
    let half = inv_freq.len();
    let head_dim = 2 * half; // the rotary width
    let mut cos = Vec::with_capacity(n * head_dim);
    let mut sin = Vec::with_capacity(n * head_dim);
    for pos in start..start + n {
        // transformers: freqs = inv_freq ⊗ position in float32, emb = cat(freqs, freqs).
        let freqs: Vec<f32> = inv_freq.iter().map(|f| f * pos as f32).collect();
        for _ in 0..2 {
            cos.extend(freqs.iter().map(|f| f.cos()));
            sin.extend(freqs.iter().map(|f| f.sin()));
        }
    }
    // transformers: `cos.to(dtype=x.dtype)`, rounded to nearest from the f32 values.
    let table = |v: Vec<f32>| {
        Tensor::<4>::from_data(TensorData::new(v, [1, 1, n, head_dim]), (device, dtype))
    };
    (table(cos), table(sin))
}

impl ForwardContext {
    /// RoPE tables of `inv_freq` for positions `0..seq` and the combined attention mask
    /// (future, padding, outside `sliding_window`); `has_gdn`: some layer is Gated DeltaNet,
    /// which needs the token mask. Float tables are in `dtype`, the model's.
    pub(crate) fn new(
        inv_freq: &[f32],
        sliding_window: Option<usize>,
        has_gdn: bool,
        (batch, seq): (usize, usize),
        attention_mask: Option<&[Vec<u8>]>,
        (device, dtype): (&Device, DType),
    ) -> ForwardContext {
        let (cos, sin) = rope_tables(inv_freq, 0, seq, (device, dtype));
        let mut mask = Vec::with_capacity(batch * seq * seq);
        for b in 0..batch {
            for i in 0..seq {
                for j in 0..seq {
                    let future = j > i;
                    let padding =
                        attention_mask.is_some_and(|m| m[b].get(j).copied().unwrap_or(0) == 0);
                    let outside = sliding_window.is_some_and(|w| i >= j + w);
                    mask.push(future || padding || outside);
                }
            }
        }
        let token_mask = match attention_mask {
            Some(m) if has_gdn => {
                let values: Vec<f32> = (0..batch)
                    .flat_map(|b| {
                        (0..seq).map(move |t| f32::from(m[b].get(t).copied().unwrap_or(0) != 0))
                    })
                    .collect();
                Some(Tensor::<3>::from_data(
                    TensorData::new(values, [batch, seq, 1]),
                    (device, dtype),
                ))
            }
            _ => None,
        };
        ForwardContext {
            cos,
            sin,
            mask: Tensor::<4, Bool>::from_data(TensorData::new(mask, [batch, 1, seq, seq]), device),
            token_mask,
        }
    }
}
