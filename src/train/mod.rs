//! Training: optimizers (AdamW with PyTorch semantics, APOLLO, APOLLO-Mini), global gradient
//! clipping and learning-rate schedules.
//!
//! References: `torch.optim.AdamW`, `torch.nn.utils.clip_grad_norm_`, APOLLO (arXiv 2412.05270,
//! `apollo_torch`); details in each module.

pub mod clip;
pub mod optim;
pub mod schedule;
