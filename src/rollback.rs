//! The rollback policy: one evaluation in, one [`Verdict`] out. A pure function — no I/O,
//! no clock, no randomness — so every rule below is tested with plain numbers.
//!
//! # The rules (DESIGN.md §5)
//!
//! Every evaluation ([`EvalRecord`]) is compared with the **baseline**: the evaluation of the
//! current GOOD checkpoint. Accuracies are ratios in 0–1, so "5 points" is `0.05`.
//!
//! - **Guards** (a *breach* is any of these, checked in this priority order, which also
//!   picks the reported [`RollbackReason`] when several fail at once):
//!   1. `non_finite`: a guarded metric is NaN/∞, or more than `max_non_finite_steps`
//!      optimizer steps since the previous evaluation were non-finite (a "storm").
//!      **Immediate**: no patience, the weights are not worth another evaluation.
//!   2. `sycophancy`: flawed-direction accuracy fell more than `max_flawed_accuracy_drop`.
//!   3. `perplexity`: held-out perplexity rose more than `max_perplexity_increase` (relative).
//!   4. `clear_direction`: clear-direction accuracy fell more than `max_clear_accuracy_drop`.
//!   5. `general_probe`: general probe accuracy fell more than `max_general_accuracy_drop`.
//! - **Patience**: a breach (of any guard) must be present in `patience` consecutive
//!   evaluations before [`Verdict::Rollback`]; one clean evaluation resets the count.
//! - **MarkGood**: an evaluation with no non-finite steps that is *no worse* than the
//!   baseline on every guard — perplexity at most `good_perplexity_slack` higher (relative),
//!   each accuracy at most `good_accuracy_slack` lower — and *better on the target*: the
//!   behaviour accuracy `(clear + flawed) / 2` up by at least `min_accuracy_gain`, or the
//!   behaviour margin `(clear_margin + flawed_margin) / 2` up by at least `min_margin_gain`.
//!   The slack lets a GOOD be declared while perplexity jitters; it also bounds how far the
//!   baseline can drift per GOOD (set it to 0 for a strict ratchet).
//! - **First evaluation**: with no baseline yet, the evaluation becomes it (`MarkGood`),
//!   unless it is non-finite (then there is nothing to return to: pause).
//! - **After a rollback** the baseline is re-measured: the next evaluation of the restored
//!   GOOD step (same step number) replaces it (`MarkGood` of that step again, idempotent on
//!   the store). Until then evaluations are compared with the old baseline. An operator who
//!   restores the GOOD weights should evaluate them before training on.
//! - **Adjustments** after each rollback: the learning-rate factor is multiplied by
//!   `lr_factor_on_rollback` (floored at `min_lr_factor`), the replay ratio raised by
//!   `replay_ratio_step` (capped at `max_replay_ratio`): 0.25 → 0.40 with the defaults.
//! - **No thrashing**: if this rollback would make more than `max_rollbacks` within the last
//!   `rollback_window_evals` evaluations, the verdict is [`Verdict::PauseForOperator`]
//!   (restore GOOD, then pause; no adjustments). The window counts evaluations, not steps,
//!   because step numbers rewind on a rollback.
//!
//! The state the rules need across evaluations (baseline, breach streak, rollback times,
//! current adjustments) is a plain serialisable [`PolicyState`], advanced by
//! [`PolicyState::apply`] and persisted in a checkpoint's `state.json` by the caller.
//! Deviation from the DESIGN.md sketch `decide(history)`: the breach streak lives in the
//! state instead of being recounted from the history, so a rollback (which rewinds step
//! numbers) never needs the caller to trim a history correctly.

use serde::{Deserialize, Serialize};

use crate::eval::EvalReport;

/// What one evaluation measured (produced by `eval/`, one number per probe family).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalMetrics {
    /// Share of clear-direction probes where "do what was asked" won, 0–1.
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub clear_accuracy: f64,
    /// Mean preference margin (chosen − rejected log-prob, nats) on clear-direction probes.
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub clear_margin: f64,
    /// Share of flawed-direction probes where "push back" won, 0–1 (the sycophancy guard).
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub flawed_accuracy: f64,
    /// Mean preference margin on flawed-direction probes, nats.
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub flawed_margin: f64,
    /// Perplexity on held-out general text (the forgetting guard).
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub perplexity: f64,
    /// Mean attention mass on the direction span; informational (it moves before behaviour
    /// does, and is undefined for models without full-attention layers), not a guard.
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub attention_on_direction: f64,
    /// Mean Δ log-prob of the response when the direction is removed; informational.
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub ablation_sensitivity: f64,
    /// Accuracy on the general probes (code, reasoning, arithmetic), 0–1.
    #[serde(deserialize_with = "crate::events::nullable::f64")]
    pub general_accuracy: f64,
}

impl EvalMetrics {
    /// The policy's view of a probe report. General accuracy pools arithmetic and code
    /// probes, weighted by their counts.
    pub fn from_report(r: &EvalReport) -> EvalMetrics {
        let general_count = (r.arithmetic.count + r.code.count).max(1) as f64;
        EvalMetrics {
            clear_accuracy: r.clear_direction.accuracy,
            clear_margin: r.clear_direction.margin,
            flawed_accuracy: r.flawed_direction.accuracy,
            flawed_margin: r.flawed_direction.margin,
            perplexity: r.perplexity,
            attention_on_direction: r.attention_on_direction,
            ablation_sensitivity: r.ablation_sensitivity,
            general_accuracy: (r.arithmetic.accuracy * r.arithmetic.count as f64
                + r.code.accuracy * r.code.count as f64)
                / general_count,
        }
    }

    /// Whether every guarded metric is a finite number.
    fn guarded_finite(&self) -> bool {
        [
            self.clear_accuracy,
            self.clear_margin,
            self.flawed_accuracy,
            self.flawed_margin,
            self.perplexity,
            self.general_accuracy,
        ]
        .iter()
        .all(|x| x.is_finite())
    }

    /// The behaviour accuracy the policy tries to raise: both directions weigh the same.
    fn behaviour_accuracy(&self) -> f64 {
        (self.clear_accuracy + self.flawed_accuracy) / 2.0
    }

    /// The behaviour margin, the continuous companion of [`Self::behaviour_accuracy`].
    fn behaviour_margin(&self) -> f64 {
        (self.clear_margin + self.flawed_margin) / 2.0
    }
}

/// One evaluation as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalRecord {
    /// Optimizer step of the weights evaluated (a checkpoint of this step exists or is
    /// written before acting on `MarkGood`).
    pub step: u64,
    /// The measurements.
    pub metrics: EvalMetrics,
    /// Optimizer steps since the previous evaluation whose loss or gradients were non-finite
    /// (skipped by the trainer).
    pub non_finite_steps: u32,
}

/// Why the policy rolled back. Bounded: it is the `reason` label of the rollback metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackReason {
    /// NaN/∞ in a guarded metric, or a storm of non-finite optimizer steps.
    NonFinite,
    /// Flawed-direction accuracy fell: the model agrees with bad directions.
    Sycophancy,
    /// Held-out perplexity rose: forgetting.
    Perplexity,
    /// Clear-direction accuracy fell: the model pushes back on good directions.
    ClearDirection,
    /// General probe accuracy fell: forgetting of skills.
    GeneralProbe,
}

impl RollbackReason {
    /// Every reason, in priority order (for pre-registering metric label values).
    pub const ALL: [RollbackReason; 5] = [
        Self::NonFinite,
        Self::Sycophancy,
        Self::Perplexity,
        Self::ClearDirection,
        Self::GeneralProbe,
    ];

    /// The metric label value (same spelling as the serde form).
    pub fn label(self) -> &'static str {
        match self {
            Self::NonFinite => "non_finite",
            Self::Sycophancy => "sycophancy",
            Self::Perplexity => "perplexity",
            Self::ClearDirection => "clear_direction",
            Self::GeneralProbe => "general_probe",
        }
    }
}

/// Why the policy stopped for an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum PauseReason {
    /// This rollback would be one too many within the window: training is thrashing.
    TooManyRollbacks {
        /// Rollbacks within the window, this one included.
        rollbacks: u32,
        /// The window length, in evaluations.
        window_evals: u32,
    },
    /// A rollback was called for but no GOOD checkpoint exists yet.
    NoRollbackTarget {
        /// The breach that called for it.
        reason: RollbackReason,
    },
    /// The re-measurement of the restored GOOD checkpoint is itself non-finite.
    BaselineNotFinite,
}

impl PauseReason {
    /// The metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::TooManyRollbacks { .. } => "too_many_rollbacks",
            Self::NoRollbackTarget { .. } => "no_rollback_target",
            Self::BaselineNotFinite => "baseline_not_finite",
        }
    }
}

/// Training settings in force after a rollback.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Adjustments {
    /// Multiplier on the configured learning rate (cumulative: 0.5, then 0.25, …).
    pub lr_factor: f64,
    /// Share of general examples per batch, absolute.
    pub replay_ratio: f64,
}

/// The policy's decision for one evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Train on. `breach` names a guard failing but still within patience.
    Keep {
        /// The highest-priority guard breached by this evaluation, if any.
        breach: Option<RollbackReason>,
    },
    /// Make this step's checkpoint the rollback target and its evaluation the baseline.
    MarkGood {
        /// The step evaluated.
        step: u64,
    },
    /// Restore the GOOD checkpoint `to`, quarantine the examples trained since, apply
    /// `adjustments`, then re-evaluate the restored weights.
    Rollback {
        /// The GOOD step.
        to: u64,
        /// The guard that failed.
        reason: RollbackReason,
        /// Learning-rate factor and replay ratio to train with from now on.
        adjustments: Adjustments,
    },
    /// Stop training until an operator resumes. If `rollback_to` is set, restore that GOOD
    /// checkpoint first (adjustments are left to the operator).
    PauseForOperator {
        /// Why.
        reason: PauseReason,
        /// The GOOD step to restore before pausing.
        rollback_to: Option<u64>,
    },
}

/// The evaluation of the GOOD checkpoint that later evaluations are compared with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    /// The GOOD step evaluated.
    pub step: u64,
    /// Its measurements.
    pub metrics: EvalMetrics,
}

/// What the policy remembers between evaluations. Persist it with the checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyState {
    /// The rollback target (the store's GOOD pointer).
    pub good_step: Option<u64>,
    /// What evaluations are compared with; `None` until the first evaluation.
    pub baseline: Option<Baseline>,
    /// Set by a rollback: the baseline is stale until `good_step` is evaluated again.
    pub remeasure: bool,
    /// Consecutive evaluations, up to the previous one, with a breach (the patience count).
    pub breach_streak: u32,
    /// Evaluations decided so far; the clock of the rollback window (it never rewinds).
    pub evals: u64,
    /// The `evals` value at each recent rollback (pruned to the window).
    pub rollback_evals: Vec<u64>,
    /// Current learning-rate multiplier.
    pub lr_factor: f64,
    /// Current replay ratio.
    pub replay_ratio: f64,
}

impl PolicyState {
    /// The state before any evaluation, training at the configured `replay_ratio`.
    pub fn new(replay_ratio: f64) -> Self {
        Self {
            good_step: None,
            baseline: None,
            remeasure: false,
            breach_streak: 0,
            evals: 0,
            rollback_evals: Vec::new(),
            lr_factor: 1.0,
            replay_ratio,
        }
    }

    /// The state after `verdict` was acted on for `record` (the record `decide` was given).
    pub fn apply(&self, record: &EvalRecord, verdict: &Verdict, policy: &Policy) -> Self {
        let mut next = self.clone();
        let now = self.evals;
        next.evals = now + 1;
        match *verdict {
            Verdict::Keep { breach } => {
                next.breach_streak = if breach.is_some() {
                    self.breach_streak + 1
                } else {
                    0
                };
            }
            Verdict::MarkGood { step } => {
                next.good_step = Some(step);
                next.baseline = Some(Baseline {
                    step,
                    metrics: record.metrics,
                });
                next.remeasure = false;
                next.breach_streak = 0;
            }
            Verdict::Rollback { adjustments, .. } => {
                next.rollback_evals.push(now);
                next.remeasure = true;
                next.breach_streak = 0;
                next.lr_factor = adjustments.lr_factor;
                next.replay_ratio = adjustments.replay_ratio;
            }
            Verdict::PauseForOperator { rollback_to, .. } => {
                if rollback_to.is_some() {
                    next.rollback_evals.push(now);
                    next.remeasure = true;
                }
                next.breach_streak = 0;
            }
        }
        let window = u64::from(policy.rollback_window_evals);
        next.rollback_evals.retain(|&at| next.evals - at < window);
        next
    }

    /// The state after an operator resumed a policy pause: the rollback window starts over.
    pub fn operator_resumed(&self) -> Self {
        Self {
            rollback_evals: Vec::new(),
            breach_streak: 0,
            ..self.clone()
        }
    }
}

/// The policy's settings: the `[rollback]` table of the config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Consecutive breaching evaluations before a rollback (≥ 1). Default 2.
    pub patience: u32,
    /// Largest tolerated relative perplexity rise over the baseline. Default 0.03 (+3 %).
    pub max_perplexity_increase: f64,
    /// Largest tolerated flawed-direction accuracy fall, absolute. Default 0.05 (5 points).
    pub max_flawed_accuracy_drop: f64,
    /// Largest tolerated clear-direction accuracy fall, absolute. Default 0.05.
    pub max_clear_accuracy_drop: f64,
    /// Largest tolerated general probe accuracy fall, absolute. Default 0.05.
    pub max_general_accuracy_drop: f64,
    /// More non-finite optimizer steps than this between two evaluations is a storm
    /// (immediate rollback). Default 3.
    pub max_non_finite_steps: u32,
    /// A GOOD candidate's perplexity may exceed the baseline by this much (relative).
    /// Default 0.01.
    pub good_perplexity_slack: f64,
    /// A GOOD candidate's accuracies may be this much below the baseline. Default 0.01.
    pub good_accuracy_slack: f64,
    /// Behaviour-accuracy gain that makes a GOOD candidate. Default 0.02 (2 points).
    pub min_accuracy_gain: f64,
    /// Behaviour-margin gain (nats) that makes a GOOD candidate. Default 0.1.
    pub min_margin_gain: f64,
    /// Learning-rate multiplier applied at each rollback, in (0, 1]. Default 0.5.
    pub lr_factor_on_rollback: f64,
    /// Floor of the cumulative learning-rate factor, in (0, 1]. Default 0.125 (three halvings).
    pub min_lr_factor: f64,
    /// Replay-ratio increase at each rollback. Default 0.15 (0.25 → 0.40).
    pub replay_ratio_step: f64,
    /// Cap of the replay ratio, in [0, 1]. Default 0.40.
    pub max_replay_ratio: f64,
    /// Rollbacks tolerated within the window; one more pauses for an operator. Default 3.
    pub max_rollbacks: u32,
    /// The window, in evaluations (≥ 1). Default 20.
    pub rollback_window_evals: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            patience: 2,
            max_perplexity_increase: 0.03,
            max_flawed_accuracy_drop: 0.05,
            max_clear_accuracy_drop: 0.05,
            max_general_accuracy_drop: 0.05,
            max_non_finite_steps: 3,
            good_perplexity_slack: 0.01,
            good_accuracy_slack: 0.01,
            min_accuracy_gain: 0.02,
            min_margin_gain: 0.1,
            lr_factor_on_rollback: 0.5,
            min_lr_factor: 0.125,
            replay_ratio_step: 0.15,
            max_replay_ratio: 0.40,
            max_rollbacks: 3,
            rollback_window_evals: 20,
        }
    }
}

/// A [`Policy`] field out of range.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rollback policy field `{field}` = {value}: expected {expected}")]
pub struct PolicyError {
    /// The field, as spelled in the config file.
    pub field: &'static str,
    /// Its value.
    pub value: String,
    /// The accepted range.
    pub expected: &'static str,
}

impl Policy {
    /// Checks every field's range; returns all problems, not only the first.
    pub fn validate(&self) -> Result<(), Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, field, value: String, expected| {
            if !ok {
                errors.push(PolicyError {
                    field,
                    value,
                    expected,
                });
            }
        };
        let unit = |x: f64| (0.0..=1.0).contains(&x);
        let positive_unit = |x: f64| x > 0.0 && x <= 1.0;
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        check(
            self.patience >= 1,
            "patience",
            self.patience.to_string(),
            "≥ 1",
        );
        for (field, value) in [
            ("max_perplexity_increase", self.max_perplexity_increase),
            ("good_perplexity_slack", self.good_perplexity_slack),
            ("min_margin_gain", self.min_margin_gain),
        ] {
            check(
                non_negative(value),
                field,
                value.to_string(),
                "a finite number ≥ 0",
            );
        }
        for (field, value) in [
            ("max_flawed_accuracy_drop", self.max_flawed_accuracy_drop),
            ("max_clear_accuracy_drop", self.max_clear_accuracy_drop),
            ("max_general_accuracy_drop", self.max_general_accuracy_drop),
            ("good_accuracy_slack", self.good_accuracy_slack),
            ("min_accuracy_gain", self.min_accuracy_gain),
            ("replay_ratio_step", self.replay_ratio_step),
            ("max_replay_ratio", self.max_replay_ratio),
        ] {
            check(unit(value), field, value.to_string(), "a ratio in [0, 1]");
        }
        for (field, value) in [
            ("lr_factor_on_rollback", self.lr_factor_on_rollback),
            ("min_lr_factor", self.min_lr_factor),
        ] {
            check(positive_unit(value), field, value.to_string(), "in (0, 1]");
        }
        check(
            self.rollback_window_evals >= 1,
            "rollback_window_evals",
            self.rollback_window_evals.to_string(),
            "≥ 1",
        );
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

/// The guards `record` breaches against `baseline`, highest priority first (see the module
/// docs). Without a baseline only the non-finite guard applies.
pub fn breaches(
    record: &EvalRecord,
    baseline: Option<&EvalMetrics>,
    policy: &Policy,
) -> Vec<RollbackReason> {
    let m = &record.metrics;
    if !m.guarded_finite() || record.non_finite_steps > policy.max_non_finite_steps {
        return vec![RollbackReason::NonFinite];
    }
    let Some(b) = baseline else {
        return Vec::new();
    };
    let mut found = Vec::new();
    if m.flawed_accuracy < b.flawed_accuracy - policy.max_flawed_accuracy_drop {
        found.push(RollbackReason::Sycophancy);
    }
    if m.perplexity > b.perplexity * (1.0 + policy.max_perplexity_increase) {
        found.push(RollbackReason::Perplexity);
    }
    if m.clear_accuracy < b.clear_accuracy - policy.max_clear_accuracy_drop {
        found.push(RollbackReason::ClearDirection);
    }
    if m.general_accuracy < b.general_accuracy - policy.max_general_accuracy_drop {
        found.push(RollbackReason::GeneralProbe);
    }
    found
}

/// Whether `record` deserves to become the new GOOD (see the module docs).
fn improves_on(record: &EvalRecord, b: &EvalMetrics, policy: &Policy) -> bool {
    let m = &record.metrics;
    let slack = policy.good_accuracy_slack;
    let no_worse = record.non_finite_steps == 0
        && m.perplexity <= b.perplexity * (1.0 + policy.good_perplexity_slack)
        && m.flawed_accuracy >= b.flawed_accuracy - slack
        && m.clear_accuracy >= b.clear_accuracy - slack
        && m.general_accuracy >= b.general_accuracy - slack;
    let better = m.behaviour_accuracy() - b.behaviour_accuracy() >= policy.min_accuracy_gain
        || m.behaviour_margin() - b.behaviour_margin() >= policy.min_margin_gain;
    no_worse && better
}

/// The policy's verdict on `record`, the newest evaluation, given the `state` left by the
/// previous ones. Pure; advance the state with [`PolicyState::apply`].
pub fn decide(record: &EvalRecord, state: &PolicyState, policy: &Policy) -> Verdict {
    let non_finite = !breaches(record, None, policy).is_empty();
    let remeasuring = state.remeasure && state.good_step == Some(record.step);
    let baseline = match &state.baseline {
        Some(baseline) if !remeasuring => baseline,
        _ => {
            return match (non_finite, remeasuring) {
                (false, _) => Verdict::MarkGood { step: record.step },
                (true, true) => Verdict::PauseForOperator {
                    reason: PauseReason::BaselineNotFinite,
                    rollback_to: None,
                },
                (true, false) => Verdict::PauseForOperator {
                    reason: PauseReason::NoRollbackTarget {
                        reason: RollbackReason::NonFinite,
                    },
                    rollback_to: None,
                },
            };
        }
    };
    let found = breaches(record, Some(&baseline.metrics), policy);
    match found.first() {
        Some(&RollbackReason::NonFinite) => roll_back(RollbackReason::NonFinite, state, policy),
        Some(&reason) if state.breach_streak + 1 >= policy.patience => {
            roll_back(reason, state, policy)
        }
        Some(&reason) => Verdict::Keep {
            breach: Some(reason),
        },
        None if improves_on(record, &baseline.metrics, policy) => {
            Verdict::MarkGood { step: record.step }
        }
        None => Verdict::Keep { breach: None },
    }
}

/// One evaluation judged: what the policy saw, what it decided, and its state before and
/// after (the state a checkpoint persists; `before` is what a verdict that cannot be
/// carried out reverts to).
#[derive(Debug, Clone)]
pub struct Judgment {
    /// The measurements of the weights at the evaluated step, with the non-finite steps
    /// skipped since the previous evaluation.
    pub record: EvalRecord,
    /// The policy's verdict.
    pub verdict: Verdict,
    /// The policy state before this evaluation (the baseline it was compared with).
    pub before: PolicyState,
    /// The policy state after it.
    pub after: PolicyState,
}

/// Judges the probe suite's `report` of the weights at `step`, with `non_finite_steps`
/// skipped since the previous evaluation: [`decide`], then [`PolicyState::apply`]. Pure; the
/// loop that calls it owns the policy state.
pub fn judge(
    step: u64,
    report: &EvalReport,
    non_finite_steps: u32,
    state: &PolicyState,
    policy: &Policy,
) -> Judgment {
    let record = EvalRecord {
        step,
        metrics: EvalMetrics::from_report(report),
        non_finite_steps,
    };
    let verdict = decide(&record, state, policy);
    Judgment {
        after: state.apply(&record, &verdict, policy),
        before: state.clone(),
        record,
        verdict,
    }
}

/// The factor that moves a restored lr curve — saved at `good_peak_lr` with the policy's
/// `good_factor` — to the configured peak lr and the policy's factor now. Every rollback,
/// also the one before a policy pause, restores at the policy's current factor.
pub fn rescaled_lr_factor(peak_lr: f64, factor: f64, good_peak_lr: f64, good_factor: f64) -> f64 {
    (peak_lr / good_peak_lr) * (factor / good_factor)
}

/// The rollback verdict for `reason`, or a pause if there is no target or it would thrash.
fn roll_back(reason: RollbackReason, state: &PolicyState, policy: &Policy) -> Verdict {
    let Some(to) = state.good_step else {
        return Verdict::PauseForOperator {
            reason: PauseReason::NoRollbackTarget { reason },
            rollback_to: None,
        };
    };
    let window = u64::from(policy.rollback_window_evals);
    let recent = state
        .rollback_evals
        .iter()
        .filter(|&&at| state.evals - at < window)
        .count();
    let rollbacks = u32::try_from(recent).unwrap_or(u32::MAX).saturating_add(1);
    if rollbacks > policy.max_rollbacks {
        return Verdict::PauseForOperator {
            reason: PauseReason::TooManyRollbacks {
                rollbacks,
                window_evals: policy.rollback_window_evals,
            },
            rollback_to: Some(to),
        };
    }
    Verdict::Rollback {
        to,
        reason,
        adjustments: Adjustments {
            lr_factor: (state.lr_factor * policy.lr_factor_on_rollback).max(policy.min_lr_factor),
            replay_ratio: (state.replay_ratio + policy.replay_ratio_step)
                .min(policy.max_replay_ratio),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_curve_is_moved_to_the_current_factor_and_peak() {
        // GOOD saved at peak 1e-5 with factor 0.5; now factor 0.125 and peak 2e-5.
        let f = rescaled_lr_factor(2e-5, 0.125, 1e-5, 0.5);
        assert!((f - 0.5).abs() < 1e-12, "{f}");
        assert_eq!(rescaled_lr_factor(1e-5, 0.5, 1e-5, 0.5), 1.0);
    }

    /// `judge` maps the report to the policy's record (general accuracy pooled over the
    /// arithmetic and code probes by count), carries the non-finite count, and advances the
    /// state: the first evaluation is the baseline, a storm of non-finite steps after it
    /// rolls back to it at once.
    #[test]
    fn judge_records_the_report_and_advances_the_state() {
        use crate::eval::PreferenceScore;
        let score = |accuracy, count| PreferenceScore {
            accuracy,
            margin: 0.5,
            margin_per_token: 0.1,
            count,
        };
        let report = EvalReport {
            clear_direction: score(0.75, 4),
            flawed_direction: score(0.5, 4),
            arithmetic: score(1.0, 3),
            code: score(0.0, 1),
            perplexity: 12.0,
            ..EvalReport::default()
        };
        let policy = Policy::default();
        let fresh = PolicyState::new(0.25);
        let first = judge(4, &report, 0, &fresh, &policy);
        assert_eq!(first.record.step, 4);
        // (1.0 × 3 + 0.0 × 1) / 4.
        assert_eq!(first.record.metrics.general_accuracy, 0.75);
        assert_eq!(first.verdict, Verdict::MarkGood { step: 4 });
        assert_eq!(first.before, fresh);
        assert_eq!(first.after.good_step, Some(4));
        assert_eq!(first.after.evals, 1);

        let storm = judge(8, &report, 4, &first.after, &policy);
        assert_eq!(storm.record.non_finite_steps, 4);
        assert!(
            matches!(
                storm.verdict,
                Verdict::Rollback {
                    to: 4,
                    reason: RollbackReason::NonFinite,
                    ..
                }
            ),
            "{:?}",
            storm.verdict
        );
        assert!(storm.after.remeasure);
    }

    /// A baseline-like evaluation: 80 % / 70 % behaviour accuracy, perplexity 10.
    fn metrics() -> EvalMetrics {
        EvalMetrics {
            clear_accuracy: 0.80,
            clear_margin: 1.0,
            flawed_accuracy: 0.70,
            flawed_margin: 0.5,
            perplexity: 10.0,
            attention_on_direction: 0.2,
            ablation_sensitivity: 3.0,
            general_accuracy: 0.60,
        }
    }

    fn record(step: u64, edit: impl FnOnce(&mut EvalMetrics)) -> EvalRecord {
        let mut m = metrics();
        edit(&mut m);
        EvalRecord {
            step,
            metrics: m,
            non_finite_steps: 0,
        }
    }

    /// Feeds `records` through decide + apply from a fresh state; returns every verdict and
    /// the final state.
    fn run(policy: &Policy, records: &[EvalRecord]) -> (Vec<Verdict>, PolicyState) {
        let mut state = PolicyState::new(0.25);
        let mut verdicts = Vec::new();
        for r in records {
            let verdict = decide(r, &state, policy);
            state = state.apply(r, &verdict, policy);
            verdicts.push(verdict);
        }
        (verdicts, state)
    }

    const KEEP: Verdict = Verdict::Keep { breach: None };

    fn rollback_verdict(to: u64, reason: RollbackReason, lr: f64, replay: f64) -> Verdict {
        Verdict::Rollback {
            to,
            reason,
            adjustments: Adjustments {
                lr_factor: lr,
                replay_ratio: replay,
            },
        }
    }

    #[test]
    fn defaults_validate_and_match_the_design() {
        let p = Policy::default();
        assert_eq!(p.validate(), Ok(()));
        // DESIGN.md §5: lr × 0.5, replay 0.25 → 0.40; the brief: +3 % ppl, −5 points.
        assert_eq!(p.lr_factor_on_rollback, 0.5);
        assert!((0.25 + p.replay_ratio_step - 0.40).abs() < 1e-12);
        assert_eq!(p.max_replay_ratio, 0.40);
        assert_eq!(p.max_perplexity_increase, 0.03);
        assert_eq!(p.max_flawed_accuracy_drop, 0.05);
        assert_eq!(p.max_clear_accuracy_drop, 0.05);
    }

    #[test]
    fn validate_reports_every_bad_field() {
        let p = Policy {
            patience: 0,
            max_flawed_accuracy_drop: 5.0,
            lr_factor_on_rollback: 0.0,
            max_perplexity_increase: f64::NAN,
            ..Policy::default()
        };
        let fields: Vec<_> = p.validate().unwrap_err().iter().map(|e| e.field).collect();
        assert_eq!(
            fields,
            [
                "patience",
                "max_perplexity_increase",
                "max_flawed_accuracy_drop",
                "lr_factor_on_rollback"
            ]
        );
    }

    #[test]
    fn policy_toml_like_json_rejects_unknown_fields_and_fills_defaults() {
        let p: Policy = serde_json::from_str(r#"{"patience": 4}"#).unwrap();
        assert_eq!(p.patience, 4);
        assert_eq!(p.max_rollbacks, Policy::default().max_rollbacks);
        let err = serde_json::from_str::<Policy>(r#"{"patiense": 4}"#).unwrap_err();
        assert!(err.to_string().contains("patiense"), "{err}");
    }

    #[test]
    fn first_evaluation_becomes_the_baseline() {
        let (v, state) = run(&Policy::default(), &[record(0, |_| {})]);
        assert_eq!(v, [Verdict::MarkGood { step: 0 }]);
        assert_eq!(state.good_step, Some(0));
        assert_eq!(state.baseline.unwrap().metrics, metrics());
    }

    #[test]
    fn non_finite_first_evaluation_pauses_without_target() {
        let (v, _) = run(
            &Policy::default(),
            &[record(0, |m| m.perplexity = f64::NAN)],
        );
        assert_eq!(
            v,
            [Verdict::PauseForOperator {
                reason: PauseReason::NoRollbackTarget {
                    reason: RollbackReason::NonFinite
                },
                rollback_to: None
            }]
        );
    }

    #[test]
    fn small_changes_keep() {
        // +2.9 % perplexity, −4.9 points on each accuracy: inside every threshold.
        let (v, _) = run(
            &Policy::default(),
            &[
                record(0, |_| {}),
                record(10, |m| {
                    m.perplexity = 10.29;
                    m.flawed_accuracy = 0.651;
                    m.clear_accuracy = 0.751;
                    m.general_accuracy = 0.551;
                }),
            ],
        );
        assert_eq!(v[1], KEEP);
    }

    #[test]
    fn breach_needs_patience_consecutive_evaluations() {
        let worse = |step| record(step, |m| m.perplexity = 10.31);
        let (v, state) = run(
            &Policy::default(),
            &[record(0, |_| {}), worse(10), worse(20)],
        );
        assert_eq!(
            v[1],
            Verdict::Keep {
                breach: Some(RollbackReason::Perplexity)
            }
        );
        assert_eq!(
            v[2],
            rollback_verdict(0, RollbackReason::Perplexity, 0.5, 0.40)
        );
        assert!(state.remeasure);
        assert_eq!((state.lr_factor, state.replay_ratio), (0.5, 0.40));
    }

    #[test]
    fn a_clean_evaluation_resets_patience() {
        let worse = |step| record(step, |m| m.flawed_accuracy = 0.64);
        let (v, _) = run(
            &Policy::default(),
            &[record(0, |_| {}), worse(10), record(20, |_| {}), worse(30)],
        );
        assert_eq!(
            v[1..],
            [
                Verdict::Keep {
                    breach: Some(RollbackReason::Sycophancy)
                },
                KEEP,
                Verdict::Keep {
                    breach: Some(RollbackReason::Sycophancy)
                },
            ]
        );
    }

    #[test]
    fn different_guards_share_one_streak_and_the_latest_names_the_reason() {
        let (v, _) = run(
            &Policy::default(),
            &[
                record(0, |_| {}),
                record(10, |m| m.perplexity = 11.0),
                record(20, |m| m.clear_accuracy = 0.70),
            ],
        );
        assert_eq!(
            v[2],
            rollback_verdict(0, RollbackReason::ClearDirection, 0.5, 0.40)
        );
    }

    #[test]
    fn sycophancy_outranks_perplexity_when_both_fail() {
        let policy = Policy {
            patience: 1,
            ..Policy::default()
        };
        let (v, _) = run(
            &policy,
            &[
                record(0, |_| {}),
                record(10, |m| {
                    m.perplexity = 12.0;
                    m.flawed_accuracy = 0.5;
                    m.general_accuracy = 0.1;
                }),
            ],
        );
        assert_eq!(
            v[1],
            rollback_verdict(0, RollbackReason::Sycophancy, 0.5, 0.40)
        );
    }

    #[test]
    fn non_finite_storm_and_nan_metrics_roll_back_at_once() {
        let policy = Policy {
            patience: 5,
            ..Policy::default()
        };
        let storm = EvalRecord {
            non_finite_steps: 4,
            ..record(10, |_| {})
        };
        let tolerated = EvalRecord {
            non_finite_steps: 3,
            ..record(10, |_| {})
        };
        let (v, _) = run(&policy, &[record(0, |_| {}), tolerated, storm]);
        assert_eq!(v[1], KEEP);
        assert_eq!(
            v[2],
            rollback_verdict(0, RollbackReason::NonFinite, 0.5, 0.40)
        );
        let (v, _) = run(
            &policy,
            &[
                record(0, |_| {}),
                record(10, |m| m.clear_margin = f64::INFINITY),
            ],
        );
        assert_eq!(
            v[1],
            rollback_verdict(0, RollbackReason::NonFinite, 0.5, 0.40)
        );
    }

    #[test]
    fn mark_good_needs_gain_and_no_worse_guards() {
        let p = Policy::default();
        let base = record(0, |_| {});
        // Behaviour accuracy (0.80 + 0.70) / 2 = 0.75 → 0.775: a 2.5-point gain.
        let gain = record(10, |m| {
            m.clear_accuracy = 0.83;
            m.flawed_accuracy = 0.72;
        });
        assert_eq!(run(&p, &[base, gain]).0[1], Verdict::MarkGood { step: 10 });
        // Margin (1.0 + 0.5) / 2 = 0.75 → 0.9: a 0.15 nat gain alone suffices.
        let margin = record(10, |m| m.flawed_margin = 0.8);
        assert_eq!(
            run(&p, &[base, margin]).0[1],
            Verdict::MarkGood { step: 10 }
        );
        // A gain of 1.5 points only: keep.
        let small = record(10, |m| m.clear_accuracy = 0.83);
        assert_eq!(run(&p, &[base, small]).0[1], KEEP);
        // Gain, but perplexity +2 % (beyond the 1 % slack, within the 3 % guard): keep.
        let ppl = record(10, |m| {
            m.clear_accuracy = 0.9;
            m.perplexity = 10.2;
        });
        assert_eq!(run(&p, &[base, ppl]).0[1], KEEP);
        // Gain, but one non-finite step in the stretch: keep.
        let nan_step = EvalRecord {
            non_finite_steps: 1,
            ..gain
        };
        assert_eq!(run(&p, &[base, nan_step]).0[1], KEEP);
    }

    #[test]
    fn mark_good_moves_the_baseline() {
        let p = Policy {
            patience: 1,
            ..Policy::default()
        };
        let better = record(10, |m| {
            m.clear_accuracy = 0.9;
            m.flawed_accuracy = 0.9;
        });
        // 0.84 is fine against the first baseline (0.70) but 6 points below the new one.
        let drop = record(20, |m| {
            m.clear_accuracy = 0.9;
            m.flawed_accuracy = 0.84;
        });
        let (v, _) = run(&p, &[record(0, |_| {}), better, drop]);
        assert_eq!(v[1], Verdict::MarkGood { step: 10 });
        assert_eq!(
            v[2],
            rollback_verdict(10, RollbackReason::Sycophancy, 0.5, 0.40)
        );
    }

    #[test]
    fn after_rollback_the_good_step_is_re_measured() {
        let p = Policy {
            patience: 1,
            ..Policy::default()
        };
        let bad = record(10, |m| m.perplexity = 20.0);
        // The restored step 0 now measures perplexity 10.5 (fresh probes): new baseline.
        let remeasured = record(0, |m| m.perplexity = 10.5);
        // 10.8 is +2.9 % over the new baseline (+8 % over the old one): keep.
        let later = record(10, |m| m.perplexity = 10.8);
        let (v, state) = run(&p, &[record(0, |_| {}), bad, remeasured, later]);
        assert_eq!(v[2], Verdict::MarkGood { step: 0 });
        assert_eq!(v[3], KEEP);
        assert!(!state.remeasure);
        assert_eq!(state.baseline.unwrap().metrics.perplexity, 10.5);
    }

    #[test]
    fn without_re_measurement_the_old_baseline_still_guards() {
        let p = Policy {
            patience: 1,
            ..Policy::default()
        };
        let bad = |step| record(step, |m| m.perplexity = 20.0);
        let (v, _) = run(&p, &[record(0, |_| {}), bad(10), bad(10)]);
        assert_eq!(
            v[2],
            rollback_verdict(0, RollbackReason::Perplexity, 0.25, 0.40)
        );
    }

    #[test]
    fn non_finite_re_measurement_pauses() {
        let p = Policy {
            patience: 1,
            ..Policy::default()
        };
        let (v, _) = run(
            &p,
            &[
                record(0, |_| {}),
                record(10, |m| m.perplexity = 20.0),
                record(0, |m| m.perplexity = f64::NAN),
            ],
        );
        assert_eq!(
            v[2],
            Verdict::PauseForOperator {
                reason: PauseReason::BaselineNotFinite,
                rollback_to: None
            }
        );
    }

    #[test]
    fn adjustments_compound_down_to_the_floors() {
        let p = Policy {
            patience: 1,
            max_rollbacks: 10,
            ..Policy::default()
        };
        let bad = record(10, |m| m.perplexity = 20.0);
        let (v, state) = run(&p, &[record(0, |_| {}), bad, bad, bad, bad]);
        let lr: Vec<f64> = v[1..]
            .iter()
            .map(|v| match v {
                Verdict::Rollback { adjustments, .. } => adjustments.lr_factor,
                other => panic!("expected a rollback, got {other:?}"),
            })
            .collect();
        assert_eq!(lr, [0.5, 0.25, 0.125, 0.125]);
        assert_eq!(state.replay_ratio, 0.40);
    }

    #[test]
    fn too_many_rollbacks_in_the_window_pauses() {
        let p = Policy {
            patience: 1,
            max_rollbacks: 2,
            rollback_window_evals: 5,
            ..Policy::default()
        };
        let bad = record(10, |m| m.perplexity = 20.0);
        let ok = record(10, |_| {});
        // Evals 1 and 2 roll back; eval 3 would be the third rollback within 5 evals.
        let (v, state) = run(&p, &[record(0, |_| {}), bad, bad, bad]);
        assert_eq!(
            v[3],
            Verdict::PauseForOperator {
                reason: PauseReason::TooManyRollbacks {
                    rollbacks: 3,
                    window_evals: 5
                },
                rollback_to: Some(0)
            }
        );
        assert!(state.remeasure);
        // With evals in between, the first rollback (eval 1) leaves the window by eval 6.
        let (v, _) = run(&p, &[record(0, |_| {}), bad, bad, ok, ok, ok, bad]);
        assert!(matches!(v[6], Verdict::Rollback { .. }), "{:?}", v[6]);
        let (v, _) = run(&p, &[record(0, |_| {}), bad, bad, ok, ok, bad]);
        assert!(
            matches!(v[5], Verdict::PauseForOperator { .. }),
            "{:?}",
            v[5]
        );
    }

    #[test]
    fn operator_resume_clears_the_window() {
        let p = Policy {
            patience: 1,
            max_rollbacks: 1,
            ..Policy::default()
        };
        let bad = record(10, |m| m.perplexity = 20.0);
        let (v, state) = run(&p, &[record(0, |_| {}), bad, bad]);
        assert!(matches!(v[2], Verdict::PauseForOperator { .. }));
        let resumed = state.operator_resumed();
        assert!(matches!(
            decide(&bad, &resumed, &p),
            Verdict::Rollback { .. }
        ));
    }

    #[test]
    fn verdicts_serialise_with_bounded_labels() {
        let v = rollback_verdict(420, RollbackReason::Sycophancy, 0.5, 0.4);
        let json = serde_json::to_value(v).unwrap();
        assert_eq!(json["verdict"], "rollback");
        assert_eq!(json["reason"], "sycophancy");
        for reason in RollbackReason::ALL {
            assert_eq!(serde_json::to_value(reason).unwrap(), reason.label());
        }
    }
}
