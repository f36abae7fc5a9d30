//! Training: losses (SFT, DPO, IPO), optimizers (AdamW with PyTorch semantics, APOLLO,
//! APOLLO-Mini), global gradient clipping, learning-rate schedules, TRL-format datasets and
//! the one-step trainer.
//!
//! References: TRL's `SFTTrainer`/`DPOTrainer`, `torch.optim.AdamW`,
//! `torch.nn.utils.clip_grad_norm_`, APOLLO (arXiv 2412.05270, `apollo_torch`); details in
//! each module.

pub mod clip;
pub mod dataset;
pub mod loss;
pub mod optim;
pub mod rebase;
pub mod recompute;
pub mod reference;
pub mod resume;
pub mod schedule;
pub mod trainer;
