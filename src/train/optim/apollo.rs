//! APOLLO and APOLLO-Mini (Zhu et al., arXiv 2412.05270), as the authors' `apollo_torch`
//! (`APOLLOAdamW`, `GradientProjector`) computes them; `/work/shared/APOLLO.md` has the recipe.
//!
//! For a projected 2-D weight with gradient `G` (m×n, Hugging Face `[out, in]` orientation):
//!
//! ```text
//! if no P yet or t % T == 0:  P ← N(0, 1/r) from this parameter's seed; advance the seed
//! R = Pᵀ·G (m < n, "left", P m×r)   or   R = G·Pᵀ (m ≥ n, "right", P r×n)
//! t += 1;  M = β1·M + (1−β1)·R;  V = β2·V + (1−β2)·R²   (compact moments, kept across refreshes)
//! s = ‖M/(√V+ε)‖ / (‖R‖ + 1e-8)   per channel of the larger dimension, or over the tensor (Mini)
//! S = G ⊙ s                          (the raw full-rank gradient, rescaled)
//! limiter: S ← S / (max(‖S‖/(prev+1e-8), γ)/γ); prev ← ‖S‖ after limiting     (γ = 1.01)
//! W ← W − lr·√(1−β2^t)/(1−β1^t) · √scale · S;  then W ← W − lr·λ·W       (decay after)
//! ```
//!
//! Every tensor that is not projected gets the same optimizer's dense branch: Adam with full
//! moments, ε added to √v *before* the bias correction and weight decay *after* the update — the
//! formula `apollo_torch` applies to such tensors, which differs from `torch.optim.AdamW`.
//!
//! The projection cannot reproduce torch's RNG, so P comes from our own portable generator:
//! ChaCha20 keyed from a 64-bit seed, Box-Muller normals. A parameter's first seed is a stable
//! hash of its *name* and the global seed, so a restarted or rolled-back run regenerates the
//! same P. Tests can inject P ([`ApolloTensor::projected`]'s `injected` list) to compare with
//! `apollo_reference.json` exactly.
//!
//! This file does not know which tensors are projected or how they are named; the caller
//! ([`super::ModelOptimizer`]) decides that from [`ApolloConfig::projects`].

use std::sync::Arc;

use burn::optim::{LearningRate, Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{Device, Tensor, TensorData};
use burn_pack::Scalar;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};

use super::adamw::tensor_bytes;
use super::OptimError;

/// How the compact update is turned into a scaling of the raw gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScaleType {
    /// One factor per channel of the larger dimension (APOLLO).
    Channel,
    /// One factor for the whole tensor (APOLLO-Mini).
    Tensor,
}

/// How projected 2-D weights are stored in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightLayout {
    /// `[out, in]`, the Hugging Face / PyTorch orientation APOLLO is defined in.
    OutIn,
    /// `[in, out]`, burn's `Linear` orientation; the optimizer transposes to `[out, in]` so that
    /// "rows", "channels" and the saved compact moments mean the same as in `apollo_torch`.
    InOut,
}

/// Hyper-parameters of APOLLO / APOLLO-Mini (defaults: APOLLO README, rank 256, channel-wise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApolloConfig {
    /// Rank r of the random projection (1 for APOLLO-Mini).
    pub rank: usize,
    /// `scale` of `apollo_torch`; the update is multiplied by √scale (Mini: 128; HF suggests n/r).
    pub scale: f64,
    /// Channel-wise (APOLLO) or tensor-wise (APOLLO-Mini) scaling.
    pub scale_type: ScaleType,
    /// Refresh interval T of the projection (`update_proj_gap`, 200 in the reference scripts).
    pub update_proj_gap: u64,
    /// β1 of the first moment.
    pub beta1: f64,
    /// β2 of the second moment.
    pub beta2: f64,
    /// ε added to √v (apollo_torch default 1e-6).
    pub eps: f64,
    /// Decoupled weight decay λ, applied after the update (`W ← W − lr·λ·W`).
    pub weight_decay: f64,
    /// Whether 1-D tensors are decayed too (Hugging Face's `Trainer` excludes them).
    pub decay_1d: bool,
    /// γ of the norm-growth limiter (Fira): ‖S_t‖ ≤ γ·‖S_{t−1}‖. `None` disables it.
    pub norm_growth_limit: Option<f64>,
    /// Global seed mixed into every parameter's name hash.
    pub seed: u64,
    /// Module names whose 2-D weights are projected: a parameter is projected when one of the
    /// dot-separated segments of its name equals one of these (`layers.3.self_attn.q_proj.weight`
    /// matches `q_proj`). Embeddings, `lm_head`, routers, the GDN gate projections and all
    /// 1-D and 3-D tensors (`A_log`, `conv1d.weight`) get the dense branch.
    pub projected_modules: Vec<String>,
    /// Storage orientation of the projected weights.
    pub layout: WeightLayout,
}

impl Default for ApolloConfig {
    fn default() -> Self {
        Self {
            rank: 256,
            scale: 1.0,
            scale_type: ScaleType::Channel,
            update_proj_gap: 200,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.0,
            decay_1d: false,
            norm_growth_limit: Some(1.01),
            seed: 0,
            projected_modules: [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
                // Gated DeltaNet (qwen3_5 / qwen3_next): a quarter of a 27B model's weights.
                // in_proj_b / in_proj_a / in_proj_ba have one row per value head and stay dense.
                "in_proj_qkv",
                "in_proj_z",
                "in_proj_qkvz",
                "out_proj",
            ]
            .iter()
            .map(|name| name.to_string())
            .collect(),
            layout: WeightLayout::OutIn,
        }
    }
}

impl ApolloConfig {
    /// APOLLO with channel-wise scaling at rank `rank` and `scale = 1`.
    pub fn apollo(rank: usize) -> Self {
        Self {
            rank,
            ..Self::default()
        }
    }

    /// APOLLO-Mini: rank 1, tensor-wise scaling, scale 128 (the APOLLO-Mini README defaults).
    pub fn mini() -> Self {
        Self {
            rank: 1,
            scale: 128.0,
            scale_type: ScaleType::Tensor,
            ..Self::default()
        }
    }

    /// Rejects values the algorithm cannot run with.
    pub fn validate(&self) -> Result<(), OptimError> {
        let bad = |field: &'static str, reason: String| OptimError::InvalidConfig { field, reason };
        if self.rank == 0 {
            return Err(bad("rank", "must be at least 1".into()));
        }
        if self.update_proj_gap == 0 {
            return Err(bad("update_proj_gap", "must be at least 1".into()));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(bad(
                "scale",
                format!("must be positive, got {}", self.scale),
            ));
        }
        if let Some(gamma) = self.norm_growth_limit {
            if !(gamma.is_finite() && gamma >= 1.0) {
                return Err(bad(
                    "norm_growth_limit",
                    format!("must be ≥ 1, got {gamma}"),
                ));
            }
        }
        for (field, beta) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(bad(field, format!("must be in [0, 1), got {beta}")));
            }
        }
        Ok(())
    }

    /// Whether the parameter `name` of shape `dims` (as stored) is projected.
    pub fn projects(&self, name: &str, dims: &[usize]) -> bool {
        dims.len() == 2
            && name
                .split('.')
                .any(|segment| self.projected_modules.iter().any(|m| m == segment))
    }

    /// `[out, in]` shape of a projected weight stored with shape `dims`.
    pub fn hf_dims(&self, dims: [usize; 2]) -> [usize; 2] {
        match self.layout {
            WeightLayout::OutIn => dims,
            WeightLayout::InOut => [dims[1], dims[0]],
        }
    }

    /// Shape of P for a weight of `[out, in]` shape `hf_dims`: `[m, r]` when m < n, else `[r, n]`.
    pub fn projection_dims(&self, hf_dims: [usize; 2]) -> [usize; 2] {
        let [m, n] = hf_dims;
        if m < n {
            [m, self.rank]
        } else {
            [self.rank, n]
        }
    }
}

/// First seed of the parameter `name`: FNV-1a of the name mixed with the global seed.
pub fn name_seed(global_seed: u64, name: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.as_bytes() {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64(hash ^ splitmix64(global_seed))
}

/// The seed after one draw (`apollo_torch`'s `next_seed`, here one SplitMix64 step).
pub fn next_seed(seed: u64) -> u64 {
    splitmix64(seed.wrapping_add(0x9e37_79b9_7f4a_7c15))
}

/// SplitMix64's output function (Steele et al. 2014), a bijective 64-bit mixer.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `rows·cols` entries drawn from N(0, 1/rank), row-major, determined by `seed` alone.
///
/// ChaCha20 keyed with four SplitMix64 words of `seed`; Box-Muller turns pairs of 53-bit
/// uniforms into pairs of normals (computed in f64, rounded to f32).
pub fn gaussian_projection(seed: u64, rows: usize, cols: usize, rank: usize) -> Vec<f32> {
    let mut key = [0u8; 32];
    let mut word = seed;
    for chunk in key.chunks_exact_mut(8) {
        word = splitmix64(word);
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    let mut rng = ChaCha20Rng::from_seed(key);
    let inv_sqrt_rank = 1.0 / (rank.max(1) as f64).sqrt();
    let len = rows * cols;
    let mut out = Vec::with_capacity(len + 1);
    const UNIT: f64 = 1.0 / (1u64 << 53) as f64;
    while out.len() < len {
        // u1 ∈ (0, 1] keeps ln finite; u2 ∈ [0, 1).
        let u1 = ((rng.next_u64() >> 11) + 1) as f64 * UNIT;
        let u2 = (rng.next_u64() >> 11) as f64 * UNIT;
        let radius = (-2.0 * u1.ln()).sqrt() * inv_sqrt_rank;
        let angle = std::f64::consts::TAU * u2;
        out.push((radius * angle.cos()) as f32);
        out.push((radius * angle.sin()) as f32);
    }
    out.truncate(len);
    out
}

/// Per-tensor APOLLO, as a burn [`Optimizer`]. Build one per parameter (it carries the
/// parameter's seed) with [`ApolloTensor::dense`] or [`ApolloTensor::projected`].
#[derive(Debug, Clone)]
pub struct ApolloTensor {
    /// Shared hyper-parameters.
    config: Arc<ApolloConfig>,
    /// Effective weight decay for this tensor (0 for undecayed 1-D tensors).
    weight_decay: f64,
    /// Dense or projected branch, with what the projected one needs to draw P.
    mode: Mode,
}

/// Which branch a tensor takes.
#[derive(Debug, Clone)]
enum Mode {
    /// Full Adam moments (everything not projected).
    Dense,
    /// Low-rank moments with a random projection.
    Projected {
        /// Seed of the first draw (used when the state is fresh).
        first_seed: u64,
        /// P to use for draw k instead of the seeded one, when present (tests).
        injected: Option<Arc<Vec<TensorData>>>,
        /// The tensor is stored `[in, out]` and is transposed to `[out, in]` for the algorithm.
        transposed: bool,
    },
}

/// APOLLO state of one tensor: the step count and the branch's moments.
#[derive(Debug, Clone)]
pub struct ApolloState<const D: usize> {
    /// Steps taken so far.
    pub step: u64,
    /// Full moments of a dense tensor.
    pub dense: Option<DenseMoments<D>>,
    /// Compact moments and projection of a projected tensor.
    pub projected: Option<ProjectedState>,
}

/// Full Adam moments of a tensor on the dense branch.
#[derive(Debug, Clone)]
pub struct DenseMoments<const D: usize> {
    /// First moment, same shape as the parameter.
    pub exp_avg: Tensor<D>,
    /// Second moment, same shape as the parameter.
    pub exp_avg_sq: Tensor<D>,
}

/// State of a projected tensor, in `[out, in]` orientation.
#[derive(Debug, Clone)]
pub struct ProjectedState {
    /// The current P (`[m, r]` left or `[r, n]` right); kept so a resumed run needs no redraw.
    pub projection: Tensor<2>,
    /// Seed of the next draw.
    pub next_seed: u64,
    /// Number of projections drawn so far (indexes an injected list).
    pub draws: u64,
    /// Compact first moment (`[r, n]` left or `[m, r]` right).
    pub exp_avg: Tensor<2>,
    /// Compact second moment, same shape as `exp_avg`.
    pub exp_avg_sq: Tensor<2>,
    /// ‖S‖ after limiting at the previous step (`[1]`), the limiter's reference.
    pub limiter_norm: Option<Tensor<1>>,
}

/// Everything a projected step computed, for tests against `apollo_reference.json`.
#[derive(Debug, Clone)]
pub struct ApolloTrace {
    /// Whether P was (re)drawn at this step.
    pub refreshed: bool,
    /// The P used.
    pub projection: Tensor<2>,
    /// R, the compact gradient.
    pub projected_grad: Tensor<2>,
    /// M after the update.
    pub exp_avg: Tensor<2>,
    /// V after the update.
    pub exp_avg_sq: Tensor<2>,
    /// lr·√(1−β2^t)/(1−β1^t).
    pub step_size: f64,
    /// s: `[1, n]` (left, channel), `[m, 1]` (right, channel) or `[1, 1]` (tensor).
    pub scaling: Tensor<2>,
    /// ‖G ⊙ s‖ before the limiter (`[1]`).
    pub norm_before_limiter: Tensor<1>,
    /// The limiter's divisor (`[1]`, 1 when it did not act).
    pub limiter: Tensor<1>,
    /// The limiter's reference norm stored for the next step (`[1]`).
    pub limiter_state: Option<Tensor<1>>,
    /// √scale · S, the direction the weight moves against (`[m, n]`).
    pub update: Tensor<2>,
}

impl ApolloTensor {
    /// The dense branch for a tensor of rank `tensor_rank`.
    pub fn dense(config: Arc<ApolloConfig>, tensor_rank: usize) -> Self {
        let weight_decay = decay_for(&config, tensor_rank);
        Self {
            config,
            weight_decay,
            mode: Mode::Dense,
        }
    }

    /// The projected branch for a 2-D weight stored with shape `dims`, whose first P comes
    /// from `first_seed` (see [`name_seed`]) unless `injected` supplies the P of draw k at
    /// index k (a draw past the end of the list falls back to the seed chain).
    ///
    /// # Errors
    /// [`OptimError::InjectedShape`] if an injected P does not have the shape
    /// [`ApolloConfig::projection_dims`] requires.
    pub fn projected(
        config: Arc<ApolloConfig>,
        name: &str,
        dims: [usize; 2],
        first_seed: u64,
        injected: Option<Arc<Vec<TensorData>>>,
    ) -> Result<Self, OptimError> {
        let expected = config.projection_dims(config.hf_dims(dims));
        if let Some(list) = &injected {
            for (draw, p) in list.iter().enumerate() {
                if p.shape().as_slice() != expected.as_slice() {
                    return Err(OptimError::InjectedShape {
                        name: name.to_string(),
                        draw,
                        expected: expected.to_vec(),
                        found: p.shape().as_slice().to_vec(),
                    });
                }
            }
        }
        let weight_decay = decay_for(&config, 2);
        let transposed = config.layout == WeightLayout::InOut;
        Ok(Self {
            config,
            weight_decay,
            mode: Mode::Projected {
                first_seed,
                injected,
                transposed,
            },
        })
    }

    /// One dense-branch step (apollo_torch's formula for unprojected tensors).
    ///
    /// # Shapes
    /// `param`, `grad` and the moments share one shape.
    pub fn step_dense<const D: usize>(
        &self,
        lr: f64,
        param: Tensor<D>,
        grad: Tensor<D>,
        step: u64,
        moments: Option<DenseMoments<D>>,
    ) -> (Tensor<D>, DenseMoments<D>) {
        let (exp_avg, exp_avg_sq) = match moments {
            Some(m) => (m.exp_avg, m.exp_avg_sq),
            None => (grad.zeros_like(), grad.zeros_like()),
        };
        let (exp_avg, exp_avg_sq, normalized) = self.adam_moments(exp_avg, exp_avg_sq, grad);
        let step_size = self.step_size(lr, step + 1);
        let param = param + normalized.mul_scalar(-step_size);
        (
            self.decay(lr, param),
            DenseMoments {
                exp_avg,
                exp_avg_sq,
            },
        )
    }

    /// One projected step on a weight in `[out, in]` orientation, with the full trace.
    /// `step` is the number of steps taken before this one.
    ///
    /// # Shapes
    /// `param`, `grad`: `[m, n]`; the state's tensors as documented on [`ProjectedState`].
    pub fn step_projected(
        &self,
        lr: f64,
        param: Tensor<2>,
        grad: Tensor<2>,
        step: u64,
        state: Option<ProjectedState>,
    ) -> (Tensor<2>, ProjectedState, ApolloTrace) {
        let [m, n] = grad.dims();
        let left = m < n;
        let device = grad.device();
        let (first_seed, injected) = match &self.mode {
            Mode::Projected {
                first_seed,
                injected,
                ..
            } => (*first_seed, injected.clone()),
            Mode::Dense => (0, None),
        };
        let (current, mut seed, mut draws, moments, limiter_norm) = match state {
            Some(s) => (
                Some(s.projection),
                s.next_seed,
                s.draws,
                Some((s.exp_avg, s.exp_avg_sq)),
                s.limiter_norm,
            ),
            None => (None, first_seed, 0, None, None),
        };
        let gap = self.config.update_proj_gap.max(1);
        let (projection, refreshed) = match current {
            Some(p) if step % gap != 0 => (p, false),
            _ => {
                let [rows, cols] = self.config.projection_dims([m, n]);
                let injected_p = injected
                    .as_ref()
                    .and_then(|list| usize::try_from(draws).ok().and_then(|k| list.get(k)));
                let data = match injected_p {
                    Some(p) => p.clone(),
                    None => TensorData::new(
                        gaussian_projection(seed, rows, cols, self.config.rank),
                        [rows, cols],
                    ),
                };
                seed = next_seed(seed);
                draws += 1;
                (Tensor::<2>::from_data(data, &device), true)
            }
        };

        let projected_grad = if left {
            projection.clone().transpose().matmul(grad.clone())
        } else {
            grad.clone().matmul(projection.clone().transpose())
        };
        let (exp_avg, exp_avg_sq) = match moments {
            Some(moments) => moments,
            None => (projected_grad.zeros_like(), projected_grad.zeros_like()),
        };
        let (exp_avg, exp_avg_sq, normalized) =
            self.adam_moments(exp_avg, exp_avg_sq, projected_grad.clone());
        let step_size = self.step_size(lr, step + 1);

        let scaling = match self.config.scale_type {
            ScaleType::Channel => {
                // Channels run along the larger dimension: columns for left, rows for right.
                let dim = if left { 0 } else { 1 };
                let num = normalized.square().sum_dim(dim).sqrt();
                let den = projected_grad.clone().square().sum_dim(dim).sqrt();
                num.div(den.add_scalar(1e-8))
            }
            ScaleType::Tensor => {
                let num = normalized.square().sum().sqrt();
                let den = projected_grad.clone().square().sum().sqrt();
                num.div(den.add_scalar(1e-8)).reshape([1, 1])
            }
        };
        let scaled = grad.mul(scaling.clone());

        let norm_before_limiter = scaled.clone().square().sum().sqrt();
        let (scaled, limiter, limiter_state) = match (self.config.norm_growth_limit, limiter_norm) {
            (Some(gamma), Some(previous)) => {
                let limiter = norm_before_limiter
                    .clone()
                    .div(previous.add_scalar(1e-8))
                    .clamp_min(gamma)
                    .div_scalar(gamma);
                let scaled = scaled.div(limiter.clone().reshape([1, 1]));
                let state = norm_before_limiter.clone().div(limiter.clone());
                (scaled, limiter, Some(state))
            }
            (Some(_), None) => (
                scaled,
                norm_before_limiter.ones_like(),
                Some(norm_before_limiter.clone()),
            ),
            (None, _) => (scaled, norm_before_limiter.ones_like(), None),
        };
        let update = scaled.mul_scalar(self.config.scale.sqrt());
        let param = self.decay(lr, param + update.clone().mul_scalar(-step_size));

        let state = ProjectedState {
            projection: projection.clone(),
            next_seed: seed,
            draws,
            exp_avg: exp_avg.clone(),
            exp_avg_sq: exp_avg_sq.clone(),
            limiter_norm: limiter_state.clone(),
        };
        let trace = ApolloTrace {
            refreshed,
            projection,
            projected_grad,
            exp_avg,
            exp_avg_sq,
            step_size,
            scaling,
            norm_before_limiter,
            limiter,
            limiter_state,
            update,
        };
        (param, state, trace)
    }

    /// Moment updates and `M/(√V+ε)`, in apollo_torch's operation order.
    fn adam_moments<const D: usize>(
        &self,
        exp_avg: Tensor<D>,
        exp_avg_sq: Tensor<D>,
        grad: Tensor<D>,
    ) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
        let (b1, b2) = (self.config.beta1, self.config.beta2);
        // exp_avg.mul_(β1).add_(g, alpha=1-β1); exp_avg_sq.mul_(β2).addcmul_(g, g, value=1-β2)
        let exp_avg = exp_avg.mul_scalar(b1) + grad.clone().mul_scalar(1.0 - b1);
        let exp_avg_sq = exp_avg_sq.mul_scalar(b2) + grad.clone().mul_scalar(1.0 - b2).mul(grad);
        let normalized = exp_avg
            .clone()
            .div(exp_avg_sq.clone().sqrt().add_scalar(self.config.eps));
        (exp_avg, exp_avg_sq, normalized)
    }

    /// lr·√(1−β2^t)/(1−β1^t) for the 1-based step `t` (`correct_bias=True`).
    fn step_size(&self, lr: f64, t: u64) -> f64 {
        let t = t as f64;
        lr * (1.0 - self.config.beta2.powf(t)).sqrt() / (1.0 - self.config.beta1.powf(t))
    }

    /// `p.add_(p, alpha=-lr·λ)` after the update.
    fn decay<const D: usize>(&self, lr: f64, param: Tensor<D>) -> Tensor<D> {
        if self.weight_decay > 0.0 {
            param.clone() + param.mul_scalar(-lr * self.weight_decay)
        } else {
            param
        }
    }
}

/// Effective weight decay for a tensor of rank `tensor_rank`.
fn decay_for(config: &ApolloConfig, tensor_rank: usize) -> f64 {
    if tensor_rank >= 2 || config.decay_1d {
        config.weight_decay
    } else {
        0.0
    }
}

impl Optimizer for ApolloTensor {
    type State<const D: usize> = ApolloState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let (step, dense, projected) = match state {
            Some(s) => (s.step, s.dense, s.projected),
            None => (0, None, None),
        };
        match &self.mode {
            Mode::Projected { transposed, .. } if D == 2 => {
                let dims = tensor.dims();
                let (rows, cols) = (dims[0], dims[1]);
                let mut param: Tensor<2> = tensor.reshape([rows, cols]);
                let mut grad: Tensor<2> = grad.reshape([rows, cols]);
                if *transposed {
                    param = param.transpose();
                    grad = grad.transpose();
                }
                let (param, state, _) = self.step_projected(lr, param, grad, step, projected);
                let param = if *transposed {
                    param.transpose()
                } else {
                    param
                };
                let state = ApolloState {
                    step: step + 1,
                    dense: None,
                    projected: Some(state),
                };
                (param.reshape(dims), Some(state))
            }
            _ => {
                let (param, moments) = self.step_dense(lr, tensor, grad, step, dense);
                let state = ApolloState {
                    step: step + 1,
                    dense: Some(moments),
                    projected: None,
                };
                (param, Some(state))
            }
        }
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        ApolloState {
            step: state.step,
            dense: state.dense.map(|m| DenseMoments {
                exp_avg: m.exp_avg.to_device(device),
                exp_avg_sq: m.exp_avg_sq.to_device(device),
            }),
            projected: state.projected.map(|p| ProjectedState {
                projection: p.projection.to_device(device),
                next_seed: p.next_seed,
                draws: p.draws,
                exp_avg: p.exp_avg.to_device(device),
                exp_avg_sq: p.exp_avg_sq.to_device(device),
                limiter_norm: p.limiter_norm.map(|t| t.to_device(device)),
            }),
        }
    }
}

impl<const D: usize> ApolloState<D> {
    /// Bytes held by this state's tensors.
    pub fn bytes(&self) -> usize {
        let dense = self.dense.as_ref().map_or(0, |m| {
            tensor_bytes(&m.exp_avg) + tensor_bytes(&m.exp_avg_sq)
        });
        let projected = self.projected.as_ref().map_or(0, |p| {
            tensor_bytes(&p.projection)
                + tensor_bytes(&p.exp_avg)
                + tensor_bytes(&p.exp_avg_sq)
                + p.limiter_norm.as_ref().map_or(0, tensor_bytes)
        });
        dense + projected
    }

    /// Whether this state fits a tensor stored with shape `dims` under `config` (a checkpoint of
    /// another model or another rank does not).
    pub fn fits(&self, config: &ApolloConfig, dims: &[usize]) -> bool {
        if let Some(dense) = &self.dense {
            return dense.exp_avg.dims().as_slice() == dims;
        }
        match (&self.projected, dims) {
            (Some(p), [rows, cols]) => {
                let hf = config.hf_dims([*rows, *cols]);
                let [m, n] = hf;
                let moments = if m < n {
                    [config.rank, n]
                } else {
                    [m, config.rank]
                };
                p.projection.dims() == config.projection_dims(hf)
                    && p.exp_avg.dims() == moments
                    && p.exp_avg_sq.dims() == moments
            }
            _ => false,
        }
    }
}

impl<const D: usize> RecordState for ApolloState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        out.push_scalar(prefix, "step", Scalar::from(self.step));
        if let Some(dense) = &self.dense {
            out.push_tensor(prefix, "dense.exp_avg", dense.exp_avg.to_data());
            out.push_tensor(prefix, "dense.exp_avg_sq", dense.exp_avg_sq.to_data());
        }
        if let Some(p) = &self.projected {
            out.push_tensor(prefix, "proj.projection", p.projection.to_data());
            out.push_tensor(prefix, "proj.exp_avg", p.exp_avg.to_data());
            out.push_tensor(prefix, "proj.exp_avg_sq", p.exp_avg_sq.to_data());
            out.push_scalar(prefix, "proj.next_seed", Scalar::from(p.next_seed));
            out.push_scalar(prefix, "proj.draws", Scalar::from(p.draws));
            if let Some(norm) = &p.limiter_norm {
                out.push_tensor(prefix, "proj.limiter_norm", norm.to_data());
            }
        }
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let step = u64::try_from(src.take_scalar(prefix, "step")?).ok()?;
        let dense = match src.take_tensor(prefix, "dense.exp_avg") {
            Some(exp_avg) => {
                let exp_avg_sq = src.take_tensor(prefix, "dense.exp_avg_sq")?;
                if exp_avg.rank() != D || exp_avg_sq.shape() != exp_avg.shape() {
                    return None;
                }
                Some(DenseMoments {
                    exp_avg: Tensor::from_data(exp_avg, device),
                    exp_avg_sq: Tensor::from_data(exp_avg_sq, device),
                })
            }
            None => None,
        };
        let projected = match src.take_tensor(prefix, "proj.projection") {
            Some(projection) => {
                let exp_avg = src.take_tensor(prefix, "proj.exp_avg")?;
                let exp_avg_sq = src.take_tensor(prefix, "proj.exp_avg_sq")?;
                if projection.rank() != 2
                    || exp_avg.rank() != 2
                    || exp_avg_sq.shape() != exp_avg.shape()
                {
                    return None;
                }
                let limiter_norm = match src.take_tensor(prefix, "proj.limiter_norm") {
                    Some(norm) if norm.rank() == 1 => Some(Tensor::from_data(norm, device)),
                    Some(_) => return None,
                    None => None,
                };
                Some(ProjectedState {
                    projection: Tensor::from_data(projection, device),
                    next_seed: u64::try_from(src.take_scalar(prefix, "proj.next_seed")?).ok()?,
                    draws: u64::try_from(src.take_scalar(prefix, "proj.draws")?).ok()?,
                    exp_avg: Tensor::from_data(exp_avg, device),
                    exp_avg_sq: Tensor::from_data(exp_avg_sq, device),
                    limiter_norm,
                })
            }
            None => None,
        };
        if dense.is_some() == projected.is_some() {
            return None;
        }
        Some(Self {
            step,
            dense,
            projected,
        })
    }
}
