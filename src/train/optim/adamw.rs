//! AdamW exactly as `torch.optim.AdamW` computes it (`_single_tensor_adamw`, `foreach=False`).
//!
//! Per step `t` (1-based), with decoupled weight decay applied *first*:
//!
//! ```text
//! p ← p · (1 − lr·λ)
//! m ← m + (1−β1)·(g − m)                 (torch's `lerp_`)
//! v ← β2·v + (1−β2)·g·g                  (torch's `addcmul_`)
//! p ← p − (lr / (1−β1^t)) · m / (√v / √(1−β2^t) + ε)
//! ```
//!
//! burn's own `AdamW` differs in three ways that matter for a port checked against PyTorch: its
//! default ε is 1e-5 (torch 1e-8) and its weight decay 1e-4 (torch 1e-2), and it evaluates the
//! bias corrections in `f32` with a different operation order. This file follows torch's order
//! (scalars in `f64`, tensors in `f32`) so `tests/optim_adamw.rs` matches
//! `adamw_reference.json` to float32 rounding.
//!
//! It knows nothing about parameter names; [`super::ModelOptimizer`] decides which tensors are
//! decayed (by default only tensors of rank ≥ 2, as Hugging Face's `Trainer` excludes biases and
//! norm weights).

use burn::optim::{LearningRate, Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{Device, Tensor};
use burn_pack::Scalar;
use serde::{Deserialize, Serialize};

/// Hyper-parameters of [`TorchAdamW`]; the defaults are `torch.optim.AdamW`'s.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    /// β1, decay of the first moment (torch default 0.9).
    pub beta1: f64,
    /// β2, decay of the second moment (torch default 0.999).
    pub beta2: f64,
    /// ε added to the bias-corrected √v (torch default 1e-8; burn's 1e-5 would damp small updates).
    pub eps: f64,
    /// Decoupled weight decay λ, applied as `p ← p·(1 − lr·λ)` before the Adam step (torch 0.01).
    pub weight_decay: f64,
    /// Whether 1-D tensors (biases, norm weights) are decayed too. Hugging Face's `Trainer`
    /// excludes them, so the default is `false`.
    pub decay_1d: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            decay_1d: false,
        }
    }
}

impl AdamWConfig {
    /// The per-tensor optimizer for a tensor of rank `rank` (decay switched off for 1-D tensors
    /// unless [`decay_1d`](Self::decay_1d)).
    pub fn for_rank(&self, rank: usize) -> TorchAdamW {
        let decayed = rank >= 2 || self.decay_1d;
        TorchAdamW {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: if decayed { self.weight_decay } else { 0.0 },
        }
    }
}

/// One tensor's AdamW, as a burn [`Optimizer`] (so it also plugs into burn's `ModuleOptimizer`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TorchAdamW {
    /// β1 of the first moment.
    pub beta1: f64,
    /// β2 of the second moment.
    pub beta2: f64,
    /// ε added after the bias correction of √v.
    pub eps: f64,
    /// Effective decoupled weight decay for this tensor (already 0 for undecayed tensors).
    pub weight_decay: f64,
}

/// AdamW state of one tensor: torch's `state["step"]`, `exp_avg`, `exp_avg_sq`.
#[derive(Debug, Clone)]
pub struct AdamWState<const D: usize> {
    /// Steps taken so far (the `t` of the bias corrections after the next increment).
    pub step: u64,
    /// First moment `m`, same shape as the parameter.
    pub exp_avg: Tensor<D>,
    /// Second moment `v`, same shape as the parameter.
    pub exp_avg_sq: Tensor<D>,
}

impl<const D: usize> AdamWState<D> {
    /// Bytes held by this state's tensors.
    pub fn bytes(&self) -> usize {
        tensor_bytes(&self.exp_avg) + tensor_bytes(&self.exp_avg_sq)
    }

    /// Shape of the parameter this state belongs to.
    pub fn param_dims(&self) -> Vec<usize> {
        self.exp_avg.dims().to_vec()
    }
}

/// Bytes of a float tensor's elements.
pub(crate) fn tensor_bytes<const D: usize>(tensor: &Tensor<D>) -> usize {
    tensor.shape().num_elements() * tensor.dtype().size()
}

impl<const D: usize> RecordState for AdamWState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        out.push_scalar(prefix, "step", Scalar::from(self.step));
        out.push_tensor(prefix, "exp_avg", self.exp_avg.to_data());
        out.push_tensor(prefix, "exp_avg_sq", self.exp_avg_sq.to_data());
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let step = u64::try_from(src.take_scalar(prefix, "step")?).ok()?;
        let exp_avg = src.take_tensor(prefix, "exp_avg")?;
        let exp_avg_sq = src.take_tensor(prefix, "exp_avg_sq")?;
        if exp_avg.rank() != D || exp_avg_sq.shape() != exp_avg.shape() {
            return None;
        }
        Some(Self {
            step,
            exp_avg: Tensor::from_data(exp_avg, device),
            exp_avg_sq: Tensor::from_data(exp_avg_sq, device),
        })
    }
}

impl TorchAdamW {
    /// One torch-AdamW step, returning the new parameter and state.
    ///
    /// # Shapes
    /// `param`, `grad` and the state's moments all have the same shape.
    pub fn update<const D: usize>(
        &self,
        lr: f64,
        param: Tensor<D>,
        grad: Tensor<D>,
        state: Option<AdamWState<D>>,
    ) -> (Tensor<D>, AdamWState<D>) {
        let param = if self.weight_decay != 0.0 {
            param.mul_scalar(1.0 - lr * self.weight_decay)
        } else {
            param
        };
        let (step, exp_avg, exp_avg_sq) = match state {
            Some(state) => (state.step, state.exp_avg, state.exp_avg_sq),
            None => (0, grad.zeros_like(), grad.zeros_like()),
        };
        let step = step + 1;

        // lerp_(grad, 1-β1) with a weight below 0.5 evaluates `self + w·(end − self)`.
        let exp_avg = exp_avg.clone() + (grad.clone() - exp_avg).mul_scalar(1.0 - self.beta1);
        // addcmul_(grad, grad, value=1-β2) evaluates `self + (value·g)·g`.
        let exp_avg_sq =
            exp_avg_sq.mul_scalar(self.beta2) + grad.clone().mul_scalar(1.0 - self.beta2).mul(grad);

        // Python's `beta ** step` on floats.
        let bias_correction1 = 1.0 - self.beta1.powf(step as f64);
        let bias_correction2 = 1.0 - self.beta2.powf(step as f64);
        let step_size = lr / bias_correction1;
        let denom = exp_avg_sq
            .clone()
            .sqrt()
            .div_scalar(bias_correction2.sqrt())
            .add_scalar(self.eps);
        // addcdiv_(m, denom, value=-step_size) evaluates `self + (value·m) / denom`.
        let param = param + exp_avg.clone().mul_scalar(-step_size).div(denom);

        (
            param,
            AdamWState {
                step,
                exp_avg,
                exp_avg_sq,
            },
        )
    }
}

impl Optimizer for TorchAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let (tensor, state) = self.update(lr, tensor, grad, state);
        (tensor, Some(state))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        AdamWState {
            step: state.step,
            exp_avg: state.exp_avg.to_device(device),
            exp_avg_sq: state.exp_avg_sq.to_device(device),
        }
    }
}
