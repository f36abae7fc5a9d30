//! Training: losses, optimizers, schedules and the one-step trainer.

pub mod loss;
pub mod dataset;
pub mod trainer;
