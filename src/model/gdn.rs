//! Gated DeltaNet, the recurrent token mixer of the hybrid decoders (`qwen3_next`,
//! `qwen3_5`), as transformers' `Qwen3NextGatedDeltaNet` / `Qwen3_5GatedDeltaNet` compute it
//! (`../shared/GDN.md` writes it out).
//!
//! projections → causal depthwise conv1d + SiLU over q|k|v → L2-normalised q, k (q scaled by
//! `dk^-½`), `β = σ(b)`, `g = −exp(A_log)·softplus(a + dt_bias)` → gated delta rule per value
//! head (key heads shared by `Hv/Hk` value heads) → gated RMSNorm `w·rmsnorm(o)·silu(z)` →
//! `out_proj`.
//!
//! Two forms of the delta rule, which agree to float rounding:
//! - [`chunked_delta_rule`]: training and prompt prefill. Within a chunk of `C` positions the
//!   recurrence is solved in closed form with a unit-lower-triangular inverse; only `T / C`
//!   steps are sequential. Differentiable through burn's autodiff (plain tensor ops).
//! - [`recurrent_delta_rule`]: one step per position; decoding, and the test oracle.
//!
//! Precision follows transformers' bf16 path: projections, the convolution's output and the
//! gated norm's input stay in the model dtype; the convolution's taps are summed in f32 and
//! rounded once (one rounding per output, as `F.conv1d` returns one bf16 result); the gates `g` (from `A_log.float()`, `a.float()`) and
//! everything of the delta rule (q, k, v, β, g, the l2 norms, cumulative decays, the chunk
//! solve and the recurrent state) are f32, and the mixer's output is rounded back to the model
//! dtype (`torch_chunk_gated_delta_rule` casts its inputs to float32 and its output to
//! `initial_dtype`). The gated norm multiplies by `silu(z.float())` in f32.
//!
//! Decays enter only as `exp` of a non-positive number: `g ≤ 0`, so cumulative sums only
//! decrease within a chunk and every `exp(Gc[i] − Gc[j])` is taken for `j ≤ i` (the rest is
//! masked before the `exp`, never after).

// `A_log` is the checkpoint's name for the parameter and the module path is the name.
#![allow(non_snake_case)]

use burn::module::{Module, Param};
use burn::tensor::activation::{sigmoid, silu, softplus};
use burn::tensor::{Bool, DType, Device, Int, Tensor, TensorData};

use super::config::{LinearAttnConfig, ModelConfig};
use super::llama::{Linear, RmsNorm};
use super::weights::{TensorSource, WeightError};

/// Positions per chunk of the chunked form (transformers and flash-linear-attention use 64).
pub const CHUNK: usize = 64;

/// Head layout of one GDN layer.
#[derive(Debug, Clone, Copy)]
pub struct GdnShape {
    pub key_heads: usize,
    pub value_heads: usize,
    pub key_dim: usize,
    pub value_dim: usize,
    pub conv_kernel: usize,
}

impl GdnShape {
    fn key_width(&self) -> usize {
        self.key_heads * self.key_dim
    }
    fn value_width(&self) -> usize {
        self.value_heads * self.value_dim
    }
    /// Channels of the convolution: q | k | v.
    fn conv_channels(&self) -> usize {
        2 * self.key_width() + self.value_width()
    }
    /// Value heads per key head.
    fn ratio(&self) -> usize {
        self.value_heads / self.key_heads
    }
}

impl From<&LinearAttnConfig> for GdnShape {
    fn from(c: &LinearAttnConfig) -> Self {
        GdnShape {
            key_heads: c.num_key_heads,
            value_heads: c.num_value_heads,
            key_dim: c.key_head_dim,
            value_dim: c.value_head_dim,
            conv_kernel: c.conv_kernel,
        }
    }
}

/// Depthwise convolution weights, `[channels, 1, kernel]` as stored (no bias).
#[derive(Module, Debug)]
pub struct Conv1d {
    pub weight: Param<Tensor<3>>,
}

/// A Gated DeltaNet layer (`model.layers.N.linear_attn.*`).
///
/// Exactly one projection layout is present: qwen3_next's fused `in_proj_qkvz` / `in_proj_ba`
/// (rows grouped by key head) or qwen3_5's separate `in_proj_qkv` / `in_proj_z` / `in_proj_b`
/// / `in_proj_a`. Weights stay in the checkpoint's layout; the fused outputs are permuted
/// into the flat order at run time, so saving writes back what was loaded.
#[derive(Module, Debug)]
pub struct GatedDeltaNet {
    pub in_proj_qkvz: Option<Linear>,
    pub in_proj_ba: Option<Linear>,
    pub in_proj_qkv: Option<Linear>,
    pub in_proj_z: Option<Linear>,
    pub in_proj_b: Option<Linear>,
    pub in_proj_a: Option<Linear>,
    pub conv1d: Conv1d,
    /// `[value_heads]`, added to `a` before the softplus.
    pub dt_bias: Param<Tensor<1>>,
    /// `[value_heads]`, log of the decay rate's scale.
    pub A_log: Param<Tensor<1>>,
    /// Gated RMSNorm over each value head (plain `w`).
    pub norm: RmsNorm,
    pub out_proj: Linear,
    #[module(skip)]
    pub shape: GdnShape,
    /// Fused layout only: column orders taking `in_proj_qkvz` / `in_proj_ba` outputs to the
    /// flat `[q | k | v | z]` / `[b | a]` ([`fused_orders`], computed once at load).
    #[module(skip)]
    pub fused_order: Option<(Vec<i64>, Vec<i64>)>,
}

/// What decoding carries between steps for one GDN layer.
#[derive(Debug, Clone)]
pub struct GdnState {
    /// The last `kernel − 1` convolution inputs, `[batch, kernel − 1, channels]`.
    pub conv: Tensor<3>,
    /// The delta-rule state, `[batch, value_heads, key_dim, value_dim]`, always f32.
    pub recurrent: Tensor<4>,
}

impl GatedDeltaNet {
    /// Loads layer `prefix` (`model.layers.N.linear_attn`).
    pub fn load(
        src: &mut dyn TensorSource,
        prefix: &str,
        cfg: &ModelConfig,
        lin: &LinearAttnConfig,
    ) -> Result<Self, WeightError> {
        let shape = GdnShape::from(lin);
        let h = cfg.hidden_size;
        let (kw, vw, hv) = (shape.key_width(), shape.value_width(), shape.value_heads);
        let name = |part: &str| format!("{prefix}.{part}");
        let mut layer = GatedDeltaNet {
            in_proj_qkvz: None,
            in_proj_ba: None,
            in_proj_qkv: None,
            in_proj_z: None,
            in_proj_b: None,
            in_proj_a: None,
            conv1d: Conv1d {
                weight: Param::from_tensor(src.take3(
                    &name("conv1d.weight"),
                    [shape.conv_channels(), 1, shape.conv_kernel],
                )?),
            },
            dt_bias: Param::from_tensor(src.take1(&name("dt_bias"), hv)?),
            A_log: Param::from_tensor(src.take1(&name("A_log"), hv)?),
            norm: RmsNorm::load(src, &name("norm"), shape.value_dim, cfg.rms_norm_eps, false)?,
            out_proj: Linear::load(src, &name("out_proj"), h, vw, false)?,
            shape,
            fused_order: lin.fused_projections.then(|| fused_orders(&shape)),
        };
        if lin.fused_projections {
            layer.in_proj_qkvz = Some(Linear::load(
                src,
                &name("in_proj_qkvz"),
                2 * kw + 2 * vw,
                h,
                false,
            )?);
            layer.in_proj_ba = Some(Linear::load(src, &name("in_proj_ba"), 2 * hv, h, false)?);
        } else {
            layer.in_proj_qkv = Some(Linear::load(
                src,
                &name("in_proj_qkv"),
                2 * kw + vw,
                h,
                false,
            )?);
            layer.in_proj_z = Some(Linear::load(src, &name("in_proj_z"), vw, h, false)?);
            layer.in_proj_b = Some(Linear::load(src, &name("in_proj_b"), hv, h, false)?);
            layer.in_proj_a = Some(Linear::load(src, &name("in_proj_a"), hv, h, false)?);
        }
        Ok(layer)
    }

    /// The layer's output; `state` (decoding) is read as the history before `x` and
    /// replaced by the state after it. `mask` (`[batch, seq, 1]`, 1 = token) zeroes padded
    /// positions' inputs, as transformers does.
    ///
    /// # Shapes
    /// `x: [batch, seq, hidden]` → `[batch, seq, hidden]`
    pub fn forward(
        &self,
        x: Tensor<3>,
        mask: Option<&Tensor<3>>,
        state: Option<&mut Option<GdnState>>,
    ) -> Tensor<3> {
        let [batch, seq, _] = x.dims();
        let s = self.shape;
        let x = match mask {
            Some(m) => x * m.clone(),
            None => x,
        };
        let (qkv, z, b, a) = self.project(x);
        let device = qkv.device();
        let dtype = qkv.dtype();

        // Causal depthwise convolution over the kernel − 1 previous inputs and these.
        let k = s.conv_kernel;
        let channels = s.conv_channels();
        let previous = match state.as_ref().and_then(|st| st.as_ref()) {
            Some(st) => st.conv.clone(),
            None => Tensor::zeros([batch, k - 1, channels], (&device, dtype)),
        };
        let padded = Tensor::cat(vec![previous, qkv], 1);
        let conv_tail = padded.clone().narrow(1, seq, k - 1);
        let padded = padded.cast(DType::F32);
        let w = self
            .conv1d
            .weight
            .val()
            .cast(DType::F32)
            .reshape([channels, k]);
        let mut conv =
            padded.clone().narrow(1, 0, seq) * w.clone().narrow(1, 0, 1).reshape([1, 1, channels]);
        for tap in 1..k {
            conv = conv
                + padded.clone().narrow(1, tap, seq)
                    * w.clone().narrow(1, tap, 1).reshape([1, 1, channels]);
        }
        let qkv = silu(conv.cast(dtype));

        let (kw, vw) = (s.key_width(), s.value_width());
        // From here to the delta rule's output everything is f32.
        let qkv = qkv.cast(DType::F32);
        let q = qkv
            .clone()
            .narrow(2, 0, kw)
            .reshape([batch, seq, s.key_heads, s.key_dim]);
        let kk = qkv
            .clone()
            .narrow(2, kw, kw)
            .reshape([batch, seq, s.key_heads, s.key_dim]);
        let v = qkv
            .narrow(2, 2 * kw, vw)
            .reshape([batch, seq, s.value_heads, s.value_dim]);

        // `b.sigmoid()` in the model dtype, then widened; `g` from widened `A_log`, `a`, `dt_bias`.
        let beta = sigmoid(b).cast(DType::F32).swap_dims(1, 2);
        let decay_rate = self
            .A_log
            .val()
            .cast(DType::F32)
            .exp()
            .reshape([1, 1, s.value_heads]);
        let dt_bias = self.dt_bias.val().cast(DType::F32);
        let dt = softplus(
            a.cast(DType::F32) + dt_bias.reshape([1, 1, s.value_heads]),
            1.0,
        );
        let g = (decay_rate * dt).neg().swap_dims(1, 2);

        let q = l2norm(q) * (s.key_dim as f64).powf(-0.5);
        let kk = l2norm(kk);
        let heads = |t: Tensor<4>, d: usize| -> Tensor<4> {
            let r = s.ratio();
            let t = if r == 1 {
                t
            } else {
                t.unsqueeze_dim::<5>(3)
                    .expand([batch, seq, s.key_heads, r, d])
                    .reshape([batch, seq, s.value_heads, d])
            };
            t.swap_dims(1, 2)
        };
        let q = heads(q, s.key_dim);
        let kk = heads(kk, s.key_dim);
        let v = v.swap_dims(1, 2);

        let out = match state {
            Some(slot) => {
                let initial = slot.as_ref().map(|st| st.recurrent.clone());
                let (out, last) = if seq == 1 {
                    recurrent_delta_rule(q, kk, v, g, beta, initial)
                } else {
                    chunked_delta_rule(q, kk, v, g, beta, initial, CHUNK)
                };
                *slot = Some(GdnState {
                    conv: conv_tail,
                    recurrent: last,
                });
                out
            }
            None => chunked_delta_rule(q, kk, v, g, beta, None, CHUNK).0,
        };

        // [batch, heads, seq, dv] → [batch, seq, heads, dv] in the model dtype, gated RMSNorm
        // per head: `(w · norm(o)).float() · silu(z.float())`, rounded back.
        let out = out.swap_dims(1, 2).cast(dtype);
        let z = z.reshape([batch, seq, s.value_heads, s.value_dim]);
        let out = (self.norm.forward(out).cast(DType::F32) * silu(z.cast(DType::F32))).cast(dtype);
        self.out_proj.forward(out.reshape([batch, seq, vw]))
    }

    /// q|k|v (flat, conv input), z, b, a from either projection layout.
    fn project(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<3>, Tensor<3>, Tensor<3>) {
        let s = self.shape;
        let (kw, vw, hv) = (s.key_width(), s.value_width(), s.value_heads);
        if let (Some(qkvz), Some(ba), Some((qkvz_order, ba_order))) =
            (&self.in_proj_qkvz, &self.in_proj_ba, &self.fused_order)
        {
            let device = x.device();
            let index = |order: &[i64]| {
                Tensor::<1, Int>::from_data(TensorData::new(order.to_vec(), [order.len()]), &device)
            };
            let flat = qkvz.forward(x.clone()).select(2, index(qkvz_order));
            let bflat = ba.forward(x).select(2, index(ba_order));
            let qkv = flat.clone().narrow(2, 0, 2 * kw + vw);
            let z = flat.narrow(2, 2 * kw + vw, vw);
            let b = bflat.clone().narrow(2, 0, hv);
            let a = bflat.narrow(2, hv, hv);
            return (qkv, z, b, a);
        }
        fn get(l: &Option<Linear>) -> &Linear {
            l.as_ref().expect("a GDN layer has one projection layout")
        }
        (
            get(&self.in_proj_qkv).forward(x.clone()),
            get(&self.in_proj_z).forward(x.clone()),
            get(&self.in_proj_b).forward(x.clone()),
            get(&self.in_proj_a).forward(x),
        )
    }
}

/// Column orders that turn qwen3_next's fused outputs, grouped by key head
/// (`[q_g | k_g | v_g | z_g]` and `[b_g | a_g]` for each key head g), into the flat
/// `[q | k | v | z]` and `[b | a]` of the separate layout.
pub fn fused_orders(s: &GdnShape) -> (Vec<i64>, Vec<i64>) {
    let r = s.ratio();
    let (dk, dv) = (s.key_dim, s.value_dim);
    let group = 2 * dk + 2 * r * dv;
    let span = |offset: usize, len: usize| -> Vec<i64> {
        (0..s.key_heads)
            .flat_map(|g| (0..len).map(move |i| (g * group + offset + i) as i64))
            .collect()
    };
    let mut qkvz = span(0, dk);
    qkvz.extend(span(dk, dk));
    qkvz.extend(span(2 * dk, r * dv));
    qkvz.extend(span(2 * dk + r * dv, r * dv));
    let mut ba: Vec<i64> = (0..s.key_heads)
        .flat_map(|g| (0..r).map(move |i| (g * 2 * r + i) as i64))
        .collect();
    ba.extend((0..s.key_heads).flat_map(|g| (0..r).map(move |i| (g * 2 * r + r + i) as i64)));
    (qkvz, ba)
}

/// `x · rsqrt(Σx² + 1e-6)` over the last dimension (flash-linear-attention's l2norm).
fn l2norm(x: Tensor<4>) -> Tensor<4> {
    let norm = x.clone().powi_scalar(2).sum_dim(3);
    x * (norm + 1e-6).sqrt().recip()
}

/// A `[n, n]` boolean mask, true where `keep(i, j)` is false.
fn mask2(n: usize, keep: impl Fn(usize, usize) -> bool, device: &Device) -> Tensor<5, Bool> {
    let values: Vec<bool> = (0..n * n).map(|x| !keep(x / n, x % n)).collect();
    Tensor::<2, Bool>::from_data(TensorData::new(values, [n, n]), device).reshape([1, 1, 1, n, n])
}

/// The gated delta rule in chunks of `chunk` positions.
///
/// # Shapes
/// `q, k: [batch, heads, seq, dk]` (q already scaled), `v: [batch, heads, seq, dv]`,
/// `g, beta: [batch, heads, seq]`, `initial: [batch, heads, dk, dv]`
/// → (`[batch, heads, seq, dv]`, final state `[batch, heads, dk, dv]`)
pub fn chunked_delta_rule(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    g: Tensor<3>,
    beta: Tensor<3>,
    initial: Option<Tensor<4>>,
    chunk: usize,
) -> (Tensor<4>, Tensor<4>) {
    let [b, h, t, dk] = k.dims();
    let [_, _, _, dv] = v.dims();
    let device = k.device();
    let c = chunk;
    let n = t.div_ceil(c);
    let pad = n * c - t;
    // Padded positions: zero q, k, v, beta and g (no decay, no write, no read).
    let pad4 = |x: Tensor<4>, d: usize| -> Tensor<4> {
        if pad == 0 {
            x
        } else {
            Tensor::cat(vec![x, Tensor::zeros([b, h, pad, d], &device)], 2)
        }
    };
    let pad3 = |x: Tensor<3>| -> Tensor<3> {
        if pad == 0 {
            x
        } else {
            Tensor::cat(vec![x, Tensor::zeros([b, h, pad], &device)], 2)
        }
    };
    let q = pad4(q, dk).reshape([b, h, n, c, dk]);
    let k = pad4(k, dk).reshape([b, h, n, c, dk]);
    let v = pad4(v, dv).reshape([b, h, n, c, dv]);
    let g = pad3(g).reshape([b, h, n, c]);
    let beta = pad3(beta).reshape([b, h, n, c]).unsqueeze_dim::<5>(4);

    // Gc[i] = Σ_{j ≤ i} g[j] within the chunk; D[i, j] = exp(Gc[i] − Gc[j]) for j ≤ i, else 0.
    let gc = g.cumsum(3);
    let diff = gc.clone().unsqueeze_dim::<5>(4) - gc.clone().unsqueeze_dim::<5>(3);
    let above = mask2(c, |i, j| j <= i, &device).expand([b, h, n, c, c]);
    let decay = diff.mask_fill(above, f32::NEG_INFINITY).exp();

    let k_beta = k.clone() * beta.clone();
    let v_beta = v * beta;
    // A[i, j] = β_i (k_i · k_j) D[i, j] for j < i; T = (I + A)⁻¹.
    let not_below = mask2(c, |i, j| j < i, &device).expand([b, h, n, c, c]);
    let a = (k_beta.clone().matmul(k.clone().swap_dims(3, 4)) * decay.clone())
        .mask_fill(not_below, 0.0);
    let t_inv = unit_lower_inverse(a);
    let exp_gc = gc.clone().exp().unsqueeze_dim::<5>(4);
    let u = t_inv.clone().matmul(v_beta);
    let w = t_inv.matmul(k_beta * exp_gc.clone());

    let last = gc.clone().narrow(3, c - 1, 1);
    let q_decayed = q.clone() * exp_gc;
    let k_to_end = k.clone() * (last.clone() - gc).exp().unsqueeze_dim::<5>(4);
    let intra = q.matmul(k.swap_dims(3, 4)) * decay;
    let chunk_decay = last.exp();

    let state = initial.unwrap_or_else(|| Tensor::zeros([b, h, dk, dv], &device));
    let mut outs = Vec::with_capacity(n);
    let parts = ChunkParts {
        u,
        w,
        q_decayed,
        k_to_end,
        intra,
        decay: chunk_decay,
    };
    let state = parts.scan(state, &mut outs);
    let out = Tensor::cat(outs, 2);
    let out = if pad == 0 { out } else { out.narrow(2, 0, t) };
    (out, state)
}

/// The per-chunk quantities of a range of chunks (axis 2), for the sequential pass.
struct ChunkParts {
    /// `Tm·(β⊙V)`, `[b, h, m, C, dv]`
    u: Tensor<5>,
    /// `Tm·(β⊙exp(Gc)⊙K)`, `[b, h, m, C, dk]`
    w: Tensor<5>,
    /// `Q⊙exp(Gc)`, `[b, h, m, C, dk]`
    q_decayed: Tensor<5>,
    /// `K⊙exp(Gc[C−1] − Gc)`, `[b, h, m, C, dk]`
    k_to_end: Tensor<5>,
    /// `(Q·Kᵀ)⊙D`, `[b, h, m, C, C]`
    intra: Tensor<5>,
    /// `exp(Gc[C−1])`, `[b, h, m, 1]`
    decay: Tensor<4>,
}

impl ChunkParts {
    /// Runs the chunks in order from `state`, pushing each chunk's output
    /// (`[b, h, C, dv]`); returns the state after the last.
    ///
    /// The range is halved recursively rather than sliced one chunk at a time: the backward
    /// pass of a slice allocates a gradient the size of what was sliced, so chunk-by-chunk
    /// slicing would cost O(T²/C) in backward; halving costs O(T·log(T/C)).
    fn scan(self, state: Tensor<4>, outs: &mut Vec<Tensor<4>>) -> Tensor<4> {
        let [b, h, m, c, dk] = self.w.dims();
        let [_, _, _, _, dv] = self.u.dims();
        if m == 1 {
            let v_new =
                self.u.reshape([b, h, c, dv]) - self.w.reshape([b, h, c, dk]).matmul(state.clone());
            outs.push(
                self.q_decayed.reshape([b, h, c, dk]).matmul(state.clone())
                    + self.intra.reshape([b, h, c, c]).matmul(v_new.clone()),
            );
            return state * self.decay.reshape([b, h, 1, 1])
                + self
                    .k_to_end
                    .reshape([b, h, c, dk])
                    .swap_dims(2, 3)
                    .matmul(v_new);
        }
        let half = m / 2;
        let (left, right) = self.split(half);
        let state = left.scan(state, outs);
        right.scan(state, outs)
    }

    fn split(self, at: usize) -> (ChunkParts, ChunkParts) {
        let [_, _, m, _, _] = self.w.dims();
        let cut5 = |x: Tensor<5>| (x.clone().narrow(2, 0, at), x.narrow(2, at, m - at));
        let (u0, u1) = cut5(self.u);
        let (w0, w1) = cut5(self.w);
        let (q0, q1) = cut5(self.q_decayed);
        let (k0, k1) = cut5(self.k_to_end);
        let (i0, i1) = cut5(self.intra);
        let (d0, d1) = (
            self.decay.clone().narrow(2, 0, at),
            self.decay.narrow(2, at, m - at),
        );
        (
            ChunkParts {
                u: u0,
                w: w0,
                q_decayed: q0,
                k_to_end: k0,
                intra: i0,
                decay: d0,
            },
            ChunkParts {
                u: u1,
                w: w1,
                q_decayed: q1,
                k_to_end: k1,
                intra: i1,
                decay: d1,
            },
        )
    }
}

/// `(I + A)⁻¹` for strictly lower-triangular `A` (`[.., m, m]`), by forward substitution:
/// diagonal blocks of 16 row by row, then block rows `T_IJ = −T_II Σ_K A_IK T_KJ`.
fn unit_lower_inverse(a: Tensor<5>) -> Tensor<5> {
    let [b, h, n, m, _] = a.dims();
    let device = a.device();
    let bs = if m % 16 == 0 { 16 } else { m };
    let nb = m / bs;
    // All diagonal blocks side by side along the chunk axis: [b, h, n·nb, bs, bs].
    let diag = Tensor::cat(
        (0..nb)
            .map(|j| a.clone().narrow(3, j * bs, bs).narrow(4, j * bs, bs))
            .collect(),
        2,
    );
    let eye_row = |i: usize| -> Tensor<5> {
        let mut row = vec![0.0f32; bs];
        row[i] = 1.0;
        Tensor::<1>::from_data(TensorData::new(row, [bs]), &device).reshape([1, 1, 1, 1, bs])
    };
    let mut rows: Vec<Tensor<5>> = vec![eye_row(0).expand([b, h, n * nb, 1, bs])];
    for i in 1..bs {
        let prev = Tensor::cat(rows.clone(), 3);
        let coef = diag.clone().narrow(3, i, 1).narrow(4, 0, i);
        rows.push(eye_row(i) - coef.matmul(prev));
    }
    let diag_inv = Tensor::cat(rows, 3);
    let block = |j: usize| diag_inv.clone().narrow(2, j * n, n);
    let mut inv = block(0);
    for bi in 1..nb {
        let done = bi * bs;
        let t_ii = block(bi);
        let left = a
            .clone()
            .narrow(3, done, bs)
            .narrow(4, 0, done)
            .matmul(inv.clone());
        let left = t_ii.clone().matmul(left).neg();
        let top = Tensor::cat(vec![inv, Tensor::zeros([b, h, n, done, bs], &device)], 4);
        let bottom = Tensor::cat(vec![left, t_ii], 4);
        inv = Tensor::cat(vec![top, bottom], 3);
    }
    inv
}

/// The gated delta rule one position at a time (the definition).
///
/// # Shapes
/// as [`chunked_delta_rule`]
pub fn recurrent_delta_rule(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    g: Tensor<3>,
    beta: Tensor<3>,
    initial: Option<Tensor<4>>,
) -> (Tensor<4>, Tensor<4>) {
    let [b, h, t, dk] = k.dims();
    let [_, _, _, dv] = v.dims();
    let mut state = initial.unwrap_or_else(|| Tensor::zeros([b, h, dk, dv], &k.device()));
    let decay = g.exp();
    let mut outs = Vec::with_capacity(t);
    for i in 0..t {
        let q_t = q.clone().narrow(2, i, 1);
        let k_t = k.clone().narrow(2, i, 1);
        let v_t = v.clone().narrow(2, i, 1);
        let decay_t = decay.clone().narrow(2, i, 1).reshape([b, h, 1, 1]);
        let beta_t = beta.clone().narrow(2, i, 1).reshape([b, h, 1, 1]);
        state = state * decay_t;
        let delta = (v_t - k_t.clone().matmul(state.clone())) * beta_t;
        state = state + k_t.swap_dims(2, 3).matmul(delta);
        outs.push(q_t.matmul(state.clone()));
    }
    (Tensor::cat(outs, 2), state)
}
