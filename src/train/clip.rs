//! Global gradient-norm clipping, as `torch.nn.utils.clip_grad_norm_` does it, and a finiteness
//! check for the trainer's guard.
//!
//! `total = ‖(‖g₁‖, ‖g₂‖, …)‖₂` over every gradient of the model; when `total > max_norm` every
//! gradient is multiplied by `max_norm / (total + 1e-6)`. burn's own `GradientClipping::Norm`
//! clips each tensor separately, which changes the update direction; the recipes this project
//! follows (Hugging Face `Trainer`, TRL) clip globally.
//!
//! Each tensor's sum of squares is computed on its device in f32 and the per-tensor sums are
//! read back together (one device sync) and added in f64. A non-finite gradient makes the norm
//! non-finite; [`clip_grad_norm`] then leaves the gradients untouched, so the caller can skip the
//! step (see [`grads_finite`] for an exact element-wise check).

use std::collections::HashSet;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Bool, DType, Device, Tensor};

/// ε of torch's clip coefficient `max_norm / (total + 1e-6)`.
const CLIP_EPS: f64 = 1e-6;

/// Global L2 norm of all gradients of `module` in `grads`.
pub fn grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    let mut visitor = SquaredNorms {
        grads,
        seen: HashSet::new(),
        sums: Vec::new(),
        device: None,
    };
    module.visit(&mut visitor);
    if visitor.sums.is_empty() {
        return 0.0;
    }
    let sums: Vec<f32> = Tensor::cat(visitor.sums, 0)
        .into_data()
        .try_to_vec()
        .unwrap_or_default();
    sums.iter().map(|s| f64::from(*s)).sum::<f64>().sqrt()
}

/// Clips the gradients of `module` in place to a global L2 norm of at most `max_norm` and
/// returns the norm *before* clipping (torch's return value). Non-finite norms are returned
/// without touching the gradients.
pub fn clip_grad_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    let total = grad_norm(module, grads);
    if total.is_finite() && total > max_norm {
        let coef = max_norm / (total + CLIP_EPS);
        let mut visitor = Scale {
            grads,
            coef,
            seen: HashSet::new(),
        };
        module.visit(&mut visitor);
    }
    total
}

/// Whether every element of every gradient of `module` is finite (no NaN, no ±inf).
pub fn grads_finite<M: Module>(module: &M, grads: &GradientsParams) -> bool {
    let mut visitor = Finite {
        grads,
        seen: HashSet::new(),
        flags: Vec::new(),
        device: None,
    };
    module.visit(&mut visitor);
    if visitor.flags.is_empty() {
        return true;
    }
    Tensor::cat(visitor.flags, 0).all().into_scalar::<bool>()
}

/// Collects each gradient's sum of squares as a `[1]` tensor on one device.
struct SquaredNorms<'a> {
    /// The gradients read.
    grads: &'a GradientsParams,
    /// Parameters already counted (a shared parameter is visited once per owner).
    seen: HashSet<ParamId>,
    /// One `[1]` tensor per gradient.
    sums: Vec<Tensor<1>>,
    /// Device the sums are gathered on (the first gradient's).
    device: Option<Device>,
}

impl ModuleVisitor for SquaredNorms<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.seen.insert(param.id) {
            return;
        }
        if let Some(grad) = self.grads.get::<D>(param.id) {
            let device = self.device.get_or_insert_with(|| grad.device()).clone();
            // f32 whatever the gradient's dtype (a bf16 model has bf16 gradients).
            let grad = grad.cast(DType::F32);
            self.sums.push(grad.square().sum().to_device(&device));
        }
    }
}

/// Multiplies every gradient by `coef`.
struct Scale<'a> {
    /// The gradients rescaled in place.
    grads: &'a mut GradientsParams,
    /// The clip coefficient.
    coef: f64,
    /// Parameters already scaled.
    seen: HashSet<ParamId>,
}

impl ModuleVisitor for Scale<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.seen.insert(param.id) {
            return;
        }
        if let Some(grad) = self.grads.remove::<D>(param.id) {
            self.grads.register(param.id, grad.mul_scalar(self.coef));
        }
    }
}

/// Collects "all elements finite" per gradient as `[1]` bool tensors on one device.
struct Finite<'a> {
    /// The gradients read.
    grads: &'a GradientsParams,
    /// Parameters already checked.
    seen: HashSet<ParamId>,
    /// One `[1]` flag per gradient.
    flags: Vec<Tensor<1, Bool>>,
    /// Device the flags are gathered on.
    device: Option<Device>,
}

impl ModuleVisitor for Finite<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if !self.seen.insert(param.id) {
            return;
        }
        if let Some(grad) = self.grads.get::<D>(param.id) {
            let device = self.device.get_or_insert_with(|| grad.device()).clone();
            self.flags.push(grad.is_finite().all().to_device(&device));
        }
    }
}
