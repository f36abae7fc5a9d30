//! Learning-rate schedules for a loop that never ends: none of them needs a total step count.
//!
//! - **warmup + constant**: `lr(s) = peak·(s+1)/W` for `s < W`, then `peak`.
//! - **warmup + cosine with restarts** (SGDR, Loshchilov & Hutter 2017, with a floor):
//!   after the warmup, with `p = (s − W) mod C`,
//!   `lr(s) = floor + (peak − floor)·½·(1 + cos(π·p/C))`, `floor = floor_ratio·peak`;
//!   every `C` steps the rate jumps back to `peak`.
//!
//! `s` is the number of optimizer steps already taken (0 for the first step). The warmup starts
//! at `peak/W` rather than Hugging Face's 0, so no example of a never-repeating stream is spent
//! on a zero-rate step.
//!
//! A run-time multiplier ([`LrSchedule::scale`]) lowers the whole curve after a rollback; it is
//! part of the serialised schedule, so a checkpoint resumes with exactly the same rates.

use serde::{Deserialize, Serialize};

/// Errors of schedule validation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ScheduleError {
    /// A field has a value the schedule cannot use.
    #[error("learning-rate schedule field `{field}`: {reason}")]
    Invalid {
        /// Name of the offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Shape of the curve after the warmup.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleKind {
    /// Constant at the peak.
    Constant,
    /// Cosine from the peak to `floor_ratio·peak` over `cycle_steps`, then a restart.
    Cosine {
        /// Length C of one cosine cycle in steps.
        cycle_steps: u64,
        /// The floor as a fraction of the peak (0 decays to zero).
        floor_ratio: f64,
    },
}

/// A learning-rate schedule with its run-time multiplier.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    /// Rate reached at the end of the warmup (before the multiplier).
    pub peak_lr: f64,
    /// Warmup length W in steps (0: start at the peak).
    pub warmup_steps: u64,
    /// What follows the warmup.
    pub kind: ScheduleKind,
    /// Product of every [`scale`](Self::scale) so far (1 for a fresh run).
    #[serde(default = "one")]
    pub multiplier: f64,
}

/// Serde default of [`LrSchedule::multiplier`].
fn one() -> f64 {
    1.0
}

impl LrSchedule {
    /// Linear warmup over `warmup_steps`, then `peak_lr`.
    pub fn warmup_constant(peak_lr: f64, warmup_steps: u64) -> Self {
        Self {
            peak_lr,
            warmup_steps,
            kind: ScheduleKind::Constant,
            multiplier: 1.0,
        }
    }

    /// Linear warmup over `warmup_steps`, then cosine cycles of `cycle_steps` down to
    /// `floor_ratio·peak_lr`, each restarting at the peak.
    pub fn warmup_cosine(
        peak_lr: f64,
        warmup_steps: u64,
        cycle_steps: u64,
        floor_ratio: f64,
    ) -> Self {
        Self {
            peak_lr,
            warmup_steps,
            kind: ScheduleKind::Cosine {
                cycle_steps,
                floor_ratio,
            },
            multiplier: 1.0,
        }
    }

    /// Rejects schedules that would produce negative, infinite or undefined rates.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        let invalid = |field, reason: String| ScheduleError::Invalid { field, reason };
        if !(self.peak_lr.is_finite() && self.peak_lr >= 0.0) {
            return Err(invalid(
                "peak_lr",
                format!("must be ≥ 0, got {}", self.peak_lr),
            ));
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 0.0) {
            return Err(invalid(
                "multiplier",
                format!("must be ≥ 0, got {}", self.multiplier),
            ));
        }
        if let ScheduleKind::Cosine {
            cycle_steps,
            floor_ratio,
        } = self.kind
        {
            if cycle_steps == 0 {
                return Err(invalid("cycle_steps", "must be at least 1".into()));
            }
            if !(0.0..=1.0).contains(&floor_ratio) {
                return Err(invalid(
                    "floor_ratio",
                    format!("must be in [0, 1], got {floor_ratio}"),
                ));
            }
        }
        Ok(())
    }

    /// The rate for the step taken after `step` steps, multiplier included.
    pub fn lr_at(&self, step: u64) -> f64 {
        self.base_lr_at(step) * self.multiplier
    }

    /// The rate of the curve alone, without the run-time multiplier.
    pub fn base_lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        match self.kind {
            ScheduleKind::Constant => self.peak_lr,
            ScheduleKind::Cosine {
                cycle_steps,
                floor_ratio,
            } => {
                let position = (step - self.warmup_steps) % cycle_steps.max(1);
                let progress = position as f64 / cycle_steps.max(1) as f64;
                let floor = floor_ratio * self.peak_lr;
                floor
                    + (self.peak_lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }

    /// Multiplies all future rates by `factor` (a rollback passes e.g. 0.5; factors compound).
    pub fn scale(&mut self, factor: f64) {
        self.multiplier *= factor;
    }
}
