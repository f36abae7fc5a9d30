//! What a resumed trainer takes from the config file: the `[train]` settings saved in a
//! checkpoint (`trainer_state.json`) against the ones configured now.
//!
//! Some settings only shape how the next steps are computed, and are the operator's fix
//! after an out-of-memory or a diverging run: the clipping threshold, the longest sequence,
//! layer recomputation and the logits chunk. A resume applies those. The others are bound
//! to the saved state — the optimizer and its hyper-parameters (the moments in
//! `optimizer.bpk` are theirs), the frozen and trained parameter sets (which parameters have
//! moments), the DPO objective, the schedule's shape — and a resume refuses to start when
//! one of them changed, naming each, rather than train on with the old value in silence.
//!
//! The peak lr is neither: the loop applies a changed `train.lr` by scaling the restored
//! curve, so [`reconcile`] ignores it (and the curve's run-time multiplier).
//!
//! This module knows nothing of files or of the loop; the daemon reads the checkpoint and
//! logs what [`reconcile`] answers.

use super::schedule::LrSchedule;
use super::trainer::TrainerConfig;

/// One `[train]` setting that differs between a checkpoint and the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingChange {
    /// The config file's name of the setting (`train.max_grad_norm`).
    pub field: &'static str,
    /// The checkpoint's value, as the config file would spell it.
    pub saved: String,
    /// The configured value.
    pub configured: String,
}

impl std::fmt::Display for SettingChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {} → {}", self.field, self.saved, self.configured)
    }
}

/// What a resume does with the settings that changed since the checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Reconciled {
    /// The settings to train with: the checkpoint's, with every applicable change applied.
    pub settings: TrainerConfig,
    /// The changes applied (empty when nothing applicable changed).
    pub applied: Vec<SettingChange>,
    /// The changes a resume cannot make (empty when it may start).
    pub refused: Vec<SettingChange>,
}

/// Compares the checkpoint's settings with the configured ones (see the module docs).
pub fn reconcile(saved: &TrainerConfig, configured: &TrainerConfig) -> Reconciled {
    let mut settings = saved.clone();
    let mut applied = Vec::new();
    let mut refused = Vec::new();
    let change = |field, saved: String, configured: String| SettingChange {
        field,
        saved,
        configured,
    };

    // Applicable: read afresh at every step.
    if saved.max_grad_norm != configured.max_grad_norm {
        applied.push(change(
            "train.max_grad_norm",
            saved.max_grad_norm.to_string(),
            configured.max_grad_norm.to_string(),
        ));
        settings.max_grad_norm = configured.max_grad_norm;
    }
    if saved.max_seq_len != configured.max_seq_len {
        applied.push(change(
            "train.max_seq_len",
            saved.max_seq_len.to_string(),
            configured.max_seq_len.to_string(),
        ));
        settings.max_seq_len = configured.max_seq_len;
    }
    if saved.recompute != configured.recompute {
        applied.push(change(
            "train.recompute",
            saved.recompute.to_string(),
            configured.recompute.to_string(),
        ));
        settings.recompute = configured.recompute;
    }
    if saved.logits_chunk != configured.logits_chunk {
        applied.push(change(
            "train.logits_chunk",
            saved.logits_chunk.to_string(),
            configured.logits_chunk.to_string(),
        ));
        settings.logits_chunk = configured.logits_chunk;
    }

    // Bound to the saved state.
    if saved.optimizer != configured.optimizer {
        let (from, to) = (
            saved.optimizer.algorithm(),
            configured.optimizer.algorithm(),
        );
        let field = if from == to {
            "train.optimizer (its hyper-parameters)"
        } else {
            "train.optimizer"
        };
        refused.push(change(
            field,
            format!("{:?}", saved.optimizer),
            format!("{:?}", configured.optimizer),
        ));
    }
    if saved.freeze != configured.freeze {
        refused.push(change(
            "train.freeze",
            format!("{:?}", saved.freeze),
            format!("{:?}", configured.freeze),
        ));
    }
    if saved.train_only != configured.train_only {
        refused.push(change(
            "train.train_only",
            format!("{:?}", saved.train_only),
            format!("{:?}", configured.train_only),
        ));
    }
    if saved.beta != configured.beta {
        refused.push(change(
            "train.beta",
            saved.beta.to_string(),
            configured.beta.to_string(),
        ));
    }
    if saved.dpo_variant != configured.dpo_variant {
        refused.push(change(
            "train.dpo_variant",
            format!("{:?}", saved.dpo_variant),
            format!("{:?}", configured.dpo_variant),
        ));
    }
    if shape(&saved.schedule) != shape(&configured.schedule) {
        refused.push(change(
            "train.schedule (shape: schedule, warmup_steps, cycle_steps, floor_ratio)",
            format!("{:?}", shape(&saved.schedule)),
            format!("{:?}", shape(&configured.schedule)),
        ));
    }
    Reconciled {
        settings,
        applied,
        refused,
    }
}

/// A schedule without its peak lr and multiplier (which the loop rescales).
fn shape(schedule: &LrSchedule) -> LrSchedule {
    LrSchedule {
        peak_lr: 1.0,
        multiplier: 1.0,
        ..*schedule
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::loss::DpoVariant;
    use crate::train::optim::{AdamWConfig, ApolloConfig, OptimizerConfig};

    fn saved() -> TrainerConfig {
        TrainerConfig {
            optimizer: OptimizerConfig::Adamw(AdamWConfig::default()),
            schedule: LrSchedule::warmup_constant(2e-5, 0),
            max_grad_norm: 1.0,
            beta: 0.1,
            dpo_weight: 1.0,
            dpo_variant: DpoVariant::Sigmoid,
            freeze: Vec::new(),
            train_only: Vec::new(),
            pad_id: 0,
            max_seq_len: 1024,
            recompute: false,
            logits_chunk: 0,
        }
    }

    #[test]
    fn the_operators_memory_fixes_are_applied_and_named() {
        let configured = TrainerConfig {
            max_grad_norm: 0.5,
            max_seq_len: 16,
            recompute: true,
            logits_chunk: 64,
            ..saved()
        };
        let r = reconcile(&saved(), &configured);
        assert_eq!(r.settings, configured);
        assert!(r.refused.is_empty(), "{:?}", r.refused);
        let fields: Vec<_> = r.applied.iter().map(|c| c.field).collect();
        assert_eq!(
            fields,
            [
                "train.max_grad_norm",
                "train.max_seq_len",
                "train.recompute",
                "train.logits_chunk"
            ]
        );
        assert_eq!(r.applied[1].to_string(), "train.max_seq_len 1024 → 16");
    }

    #[test]
    fn a_changed_lr_is_the_loops_business() {
        let mut configured = saved();
        configured.schedule = LrSchedule::warmup_constant(1e-4, 0);
        let r = reconcile(&saved(), &configured);
        assert!(r.applied.is_empty() && r.refused.is_empty(), "{r:?}");
        assert_eq!(
            r.settings,
            saved(),
            "the saved curve is kept for the loop to scale"
        );
    }

    #[test]
    fn settings_bound_to_the_saved_state_are_refused_each_by_name() {
        let configured = TrainerConfig {
            optimizer: OptimizerConfig::Apollo(ApolloConfig::mini()),
            freeze: vec!["model.embed_tokens.*".into()],
            beta: 0.2,
            dpo_weight: 1.0,
            schedule: LrSchedule::warmup_constant(2e-5, 10),
            max_grad_norm: 0.5,
            ..saved()
        };
        let r = reconcile(&saved(), &configured);
        let refused: Vec<_> = r.refused.iter().map(|c| c.field).collect();
        assert_eq!(refused.len(), 4, "{refused:?}");
        assert!(refused.contains(&"train.optimizer"), "{refused:?}");
        assert!(refused.contains(&"train.freeze"), "{refused:?}");
        assert!(refused.contains(&"train.beta"), "{refused:?}");
        assert!(refused[3].starts_with("train.schedule"), "{refused:?}");
        assert_eq!(
            r.applied.len(),
            1,
            "the applicable change is still reported"
        );
        assert_eq!(r.settings.optimizer, saved().optimizer);
    }
}
