//! The experiment controller: the upward half of the operator's loop (SEED.md), beside the
//! rollback policy's downward half. One evaluation (or one trained step) in, a list of
//! [`Action`]s out. A pure function of plain data, like [`crate::rollback`]: no I/O, no
//! clock, so every rule is tested with numbers.
//!
//! # The rules
//!
//! - **Phases as a schedule.** `[[phase]]` entries run in order, each with its own kind
//!   (sft / dpo / mixed), lr, β and the condition that ends it ([`Advance`]): a number of
//!   steps trained in the phase, or probe criteria: the flawed-direction margin per token
//!   has risen by at least `flawed_margin_gain` nats since the phase began, with `clean_evals`
//!   evaluations in a row without a breach. Whichever is met first advances; the last phase
//!   runs for ever. Entering a phase resets the lr boost and the stall window, and, for a
//!   dpo or mixed phase with `rebase_reference` (the default), re-bases the DPO reference on
//!   the weights that enter it (what TRL's iterative DPO does: the SFT result is the
//!   reference of the DPO that follows it).
//! - **lr that rises.** When the continuous signals are flat — the behaviour margin per
//!   token `(clear + flawed) / 2` and the attention on the direction each moved less than
//!   `stall_margin` / `stall_attention` over the last `stall_evals` evaluations, none of which
//!   breached a guard — the phase's lr is raised by `lr_raise_factor`, up to the phase's
//!   `max_lr` (by default 10× its lr: the seed's 1e-5 → 1e-4). A raise starts a new window.
//!   The rollback policy still lowers lr on its own factor; a rollback also empties the
//!   window (the weights it measured are gone).
//! - **Targeted replay.** A general probe that breaches its guard against the baseline of the
//!   last GOOD evaluation (arithmetic or code accuracy down more than `[rollback]
//!   max_general_accuracy_drop`, perplexity up more than `max_perplexity_increase`) multiplies
//!   the weight of its own replay source (arithmetic, code, corpus text) by
//!   `targeted_replay_factor`, not only the overall replay ratio; the weight is restored when
//!   an evaluation of trained weights (not the re-measurement of restored GOOD weights) finds
//!   the probe back within its guard.
//!
//! What it does not know: how an action is carried out (the daemon's driver), how the
//! numbers were measured (`eval/`), and the rollback verdict's reasons beyond "a guard was
//! breached".

use serde::{Deserialize, Serialize};

use crate::label::Phase;
use crate::rollback::{EvalMetrics, Policy};

/// Replay sources, in the order of `[data] general_weights`.
pub const REPLAY_SOURCES: [&str; 4] = ["arithmetic", "code", "reasoning", "text"];

/// When a phase ends (`[[phase]] until = { … }`); whichever condition is met first.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Advance {
    /// Steps trained in the phase.
    #[serde(default)]
    pub steps: Option<u64>,
    /// Rise of the flawed-direction margin per token (nats) since the phase began.
    #[serde(default)]
    pub flawed_margin_gain: Option<f64>,
    /// With `flawed_margin_gain`: evaluations in a row without a breach (≥ 1).
    #[serde(default = "default_clean_evals")]
    pub clean_evals: u32,
}

fn default_clean_evals() -> u32 {
    2
}

/// One `[[phase]]` entry as written; absent settings come from `[train]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseEntry {
    /// `sft`, `dpo` or `mixed`.
    pub kind: Phase,
    /// Peak lr of the phase (mixed: of the SFT loss); absent: `[train] lr`.
    #[serde(default)]
    pub lr: Option<f64>,
    /// Mixed only: the lr the DPO loss trains at; absent: `lr`. The step runs at `lr` with
    /// the DPO loss weighted `dpo_lr / lr` (see [`PhaseSettings::dpo_weight`]).
    #[serde(default)]
    pub dpo_lr: Option<f64>,
    /// DPO β; absent: `[train] beta`.
    #[serde(default)]
    pub beta: Option<f64>,
    /// Ceiling of the stall raises; absent: 10 × lr.
    #[serde(default)]
    pub max_lr: Option<f64>,
    /// dpo / mixed: the reference becomes the weights that enter the phase (default true);
    /// false keeps the reference the run started with.
    #[serde(default)]
    pub rebase_reference: Option<bool>,
    /// When the phase ends; required on every phase but the last.
    #[serde(default)]
    pub until: Option<Advance>,
}

/// A phase with every setting resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PhaseSettings {
    /// SFT, DPO or mixed.
    pub kind: Phase,
    /// Peak lr the schedule follows in this phase.
    pub lr: f64,
    /// Weight of the DPO loss in a mixed step (`dpo_lr / lr`): Adam-family updates are
    /// invariant to the overall scale of the loss, so per-loss learning rates in one step
    /// can only be their ratio — the DPO loss's share of the update, not an absolute size.
    /// 1 outside mixed phases.
    pub dpo_weight: f64,
    /// DPO β.
    pub beta: f64,
    /// Ceiling of stall raises.
    pub max_lr: f64,
    /// Re-base the reference on entry.
    pub rebase_reference: bool,
    /// The end condition (`None`: the last phase).
    pub until: Option<Advance>,
}

impl PhaseEntry {
    /// Resolves absent settings from `[train] lr` and `beta`.
    pub fn resolve(&self, train_lr: f64, train_beta: f64) -> PhaseSettings {
        let lr = self.lr.unwrap_or(train_lr);
        let dpo_weight = match self.kind {
            Phase::Mixed => self.dpo_lr.map_or(1.0, |d| d / lr),
            Phase::Sft | Phase::Dpo => 1.0,
        };
        PhaseSettings {
            kind: self.kind,
            lr,
            dpo_weight,
            beta: self.beta.unwrap_or(train_beta),
            max_lr: self.max_lr.unwrap_or(10.0 * lr),
            rebase_reference: self.kind != Phase::Sft && self.rebase_reference.unwrap_or(true),
            until: self.until,
        }
    }
}

/// `[controller]`: the stall and targeted-replay rules' settings. Off by default in code
/// (`stall_evals = 0`, `targeted_replay_factor = 1`); the shipped configs turn them on.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControllerSection {
    /// Flat evaluations in a row that make a stall (0: lr never rises).
    pub stall_evals: u32,
    /// Largest range (max − min, nats per token) of the behaviour margin over the window
    /// that is flat.
    pub stall_margin: f64,
    /// Largest range of the attention on the direction over the window that is flat.
    pub stall_attention: f64,
    /// Multiplier of each raise (> 1).
    pub lr_raise_factor: f64,
    /// Multiplier of a breached probe's replay weight (1: off).
    pub targeted_replay_factor: f64,
}

impl Default for ControllerSection {
    fn default() -> Self {
        ControllerSection {
            stall_evals: 0,
            stall_margin: 0.005,
            stall_attention: 0.002,
            lr_raise_factor: 2.0,
            targeted_replay_factor: 1.0,
        }
    }
}

/// The general probes' numbers at the last GOOD evaluation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProbeBaseline {
    /// Arithmetic probe accuracy.
    pub arithmetic: f64,
    /// Code probe accuracy.
    pub code: f64,
    /// Held-out perplexity.
    pub perplexity: f64,
}

/// What the controller remembers; persisted with each checkpoint (`state.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerState {
    /// Index of the phase in force.
    pub phase_index: usize,
    /// Steps trained since the phase began (never rewinds: a rolled-back step was trained).
    pub phase_steps: u64,
    /// The flawed-direction margin per token when the phase began (the last evaluation
    /// before it); `None` until an evaluation is seen.
    pub phase_start_flawed_margin: Option<f64>,
    /// Evaluations in a row, in this phase, without a breach.
    pub clean_evals: u32,
    /// The latest evaluation's flawed-direction margin per token.
    pub last_flawed_margin: Option<f64>,
    /// Multiplier of the phase's lr from stall raises.
    pub lr_boost: f64,
    /// `(behaviour margin per token, attention on direction)` of the evaluations since the last
    /// change (phase, lr, rollback), newest last, at most `stall_evals` long.
    pub window: Vec<(f64, f64)>,
    /// Multiplier of each replay source's weight (targeted replay), in [`REPLAY_SOURCES`]
    /// order.
    pub replay_boost: [f64; 4],
    /// General probes at the last GOOD evaluation.
    pub probe_baseline: Option<ProbeBaseline>,
    /// The step whose weights are the DPO reference, once re-based.
    pub reference_step: Option<u64>,
}

impl Default for ControllerState {
    fn default() -> Self {
        ControllerState {
            phase_index: 0,
            phase_steps: 0,
            phase_start_flawed_margin: None,
            clean_evals: 0,
            last_flawed_margin: None,
            lr_boost: 1.0,
            window: Vec::new(),
            replay_boost: [1.0; 4],
            probe_baseline: None,
            reference_step: None,
        }
    }
}

/// One evaluation as the controller sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// The policy's metrics.
    pub metrics: EvalMetrics,
    /// Clear-direction margin per token (nats): summed margins grow with the length of the
    /// replies, so the controller's thresholds are per token.
    pub clear_per_token: f64,
    /// Flawed-direction margin per token (nats).
    pub flawed_per_token: f64,
    /// Arithmetic probe accuracy.
    pub arithmetic: f64,
    /// Code probe accuracy.
    pub code: f64,
    /// What the rollback policy decided.
    pub outcome: Outcome,
}

/// The rollback verdict, reduced to what the controller acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Kept, no guard breached.
    Clean,
    /// Kept with a breach within patience.
    Breached,
    /// Marked GOOD: the evaluation is the new baseline.
    Good,
    /// Marked GOOD as the re-measurement of weights restored by a rollback.
    Remeasured,
    /// Rolled back or paused: the weights measured are gone.
    RolledBack,
}

/// Why the controller acted; the `reason` of its events and of the lr metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Why {
    /// The phase's step count was reached.
    Steps,
    /// The flawed-direction margin rose enough with clean evaluations.
    Criteria,
    /// The continuous signals were flat.
    Stall,
    /// A general probe breached its guard.
    ProbeBreach,
    /// The probe is back within its guard.
    ProbeRecovered,
}

impl Why {
    /// The metric label value (same spelling as the serde form).
    pub fn label(self) -> &'static str {
        match self {
            Why::Steps => "steps",
            Why::Criteria => "criteria",
            Why::Stall => "stall",
            Why::ProbeBreach => "probe_breach",
            Why::ProbeRecovered => "probe_recovered",
        }
    }
}

/// What the driver is to carry out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Enter phase `index` (its settings from [`Controller::phase`]); `rebase`: the
    /// reference becomes the current weights.
    EnterPhase {
        /// The phase entered.
        index: usize,
        /// Why the previous one ended.
        why: Why,
    },
    /// The lr boost moved from `from` to `to` (the lr scales by `to / from`).
    SetLrBoost {
        /// Boost before.
        from: f64,
        /// Boost after.
        to: f64,
        /// Why.
        why: Why,
    },
    /// Replay source `source` ([`REPLAY_SOURCES`] index) is weighted `boost` × its
    /// configured weight from now on.
    SetReplayBoost {
        /// The source.
        source: usize,
        /// The multiplier.
        boost: f64,
        /// Why.
        why: Why,
    },
}

/// The schedule and the rules' settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Controller {
    /// The phases, resolved; at least one.
    pub phases: Vec<PhaseSettings>,
    /// `[controller]`.
    pub settings: ControllerSection,
    /// The rollback guards the targeted replay reuses.
    pub guards: Policy,
}

impl Controller {
    /// The settings of phase `index` (clamped to the last phase).
    pub fn phase(&self, index: usize) -> &PhaseSettings {
        &self.phases[index.min(self.phases.len() - 1)]
    }

    /// The peak lr in force: the phase's lr times the stall boost.
    pub fn peak_lr(&self, state: &ControllerState) -> f64 {
        self.phase(state.phase_index).lr * state.lr_boost
    }

    /// `[data] general_weights` with the targeted-replay boosts applied.
    pub fn replay_weights(&self, configured: [f64; 4], state: &ControllerState) -> [f64; 4] {
        std::array::from_fn(|i| configured[i] * state.replay_boost[i])
    }

    /// A trained step: counts it, and advances the phase when its step count is reached.
    pub fn after_step(&self, state: &ControllerState) -> (ControllerState, Vec<Action>) {
        let mut next = state.clone();
        next.phase_steps += 1;
        let until = self.phase(state.phase_index).until;
        let reached = until
            .and_then(|u| u.steps)
            .is_some_and(|n| next.phase_steps >= n);
        if reached && state.phase_index + 1 < self.phases.len() {
            return self.enter(next, Why::Steps);
        }
        (next, Vec::new())
    }

    /// An evaluation: phase criteria, stall, targeted replay, in that order (a phase change
    /// resets the stall window, so it is not also a raise).
    pub fn after_eval(
        &self,
        state: &ControllerState,
        obs: &Observation,
    ) -> (ControllerState, Vec<Action>) {
        let mut next = state.clone();
        let mut actions = Vec::new();
        let m = &obs.metrics;
        next.last_flawed_margin = Some(obs.flawed_per_token);
        if next.phase_start_flawed_margin.is_none() {
            next.phase_start_flawed_margin = Some(obs.flawed_per_token);
        }
        let breached = matches!(obs.outcome, Outcome::Breached | Outcome::RolledBack);
        next.clean_evals = if breached { 0 } else { next.clean_evals + 1 };

        // Targeted replay (before the baseline moves to this evaluation).
        actions.extend(self.targeted_replay(&mut next, obs));
        if matches!(obs.outcome, Outcome::Good | Outcome::Remeasured) {
            next.probe_baseline = Some(ProbeBaseline {
                arithmetic: obs.arithmetic,
                code: obs.code,
                perplexity: m.perplexity,
            });
        }

        // Phase criteria.
        let phase = self.phase(state.phase_index);
        if let (Some(until), true) = (phase.until, state.phase_index + 1 < self.phases.len()) {
            if let (Some(gain), Some(start)) =
                (until.flawed_margin_gain, next.phase_start_flawed_margin)
            {
                if obs.flawed_per_token - start >= gain
                    && next.clean_evals >= until.clean_evals.max(1)
                {
                    let (entered, mut more) = self.enter(next, Why::Criteria);
                    actions.append(&mut more);
                    return (entered, actions);
                }
            }
        }

        // Stall.
        // A breach, a rollback or a re-measurement of restored weights starts the window over.
        if breached || obs.outcome == Outcome::Remeasured {
            next.window.clear();
        } else if self.settings.stall_evals > 0 {
            next.window.push((
                (obs.clear_per_token + obs.flawed_per_token) / 2.0,
                m.attention_on_direction,
            ));
            let k = self.settings.stall_evals as usize;
            if next.window.len() > k {
                next.window.remove(0);
            }
            if next.window.len() == k && self.flat(&next.window) {
                let from = next.lr_boost;
                let ceiling = phase.max_lr / phase.lr;
                let to = (from * self.settings.lr_raise_factor).min(ceiling);
                next.window.clear();
                if to > from * (1.0 + 1e-9) {
                    next.lr_boost = to;
                    actions.push(Action::SetLrBoost {
                        from,
                        to,
                        why: Why::Stall,
                    });
                }
            }
        }
        (next, actions)
    }

    /// Whether both signals' ranges over `window` are within the stall thresholds. An
    /// undefined attention (a model without full-attention layers) counts as flat.
    fn flat(&self, window: &[(f64, f64)]) -> bool {
        let range = |values: &mut dyn Iterator<Item = f64>| {
            let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
                (lo.min(x), hi.max(x))
            });
            hi - lo
        };
        let margin = range(&mut window.iter().map(|w| w.0));
        let finite: Vec<f64> = window
            .iter()
            .map(|w| w.1)
            .filter(|x| x.is_finite())
            .collect();
        let attention = if finite.len() < 2 {
            0.0
        } else {
            range(&mut finite.into_iter())
        };
        margin.is_finite()
            && margin <= self.settings.stall_margin
            && attention <= self.settings.stall_attention
    }

    /// Boosts or restores each probed replay source.
    fn targeted_replay(&self, next: &mut ControllerState, obs: &Observation) -> Vec<Action> {
        let factor = self.settings.targeted_replay_factor;
        let Some(base) = next.probe_baseline else {
            return Vec::new();
        };
        if factor == 1.0 {
            return Vec::new();
        }
        let g = &self.guards;
        let probes = [
            (
                0,
                base.arithmetic - obs.arithmetic > g.max_general_accuracy_drop,
            ),
            (1, base.code - obs.code > g.max_general_accuracy_drop),
            (
                3,
                obs.metrics.perplexity > base.perplexity * (1.0 + g.max_perplexity_increase),
            ),
        ];
        let mut actions = Vec::new();
        for (source, breached) in probes {
            let boosted = next.replay_boost[source] != 1.0;
            if breached && !boosted {
                next.replay_boost[source] = factor;
                actions.push(Action::SetReplayBoost {
                    source,
                    boost: factor,
                    why: Why::ProbeBreach,
                });
            } else if !breached
                && boosted
                && !matches!(obs.outcome, Outcome::Remeasured | Outcome::RolledBack)
            {
                next.replay_boost[source] = 1.0;
                actions.push(Action::SetReplayBoost {
                    source,
                    boost: 1.0,
                    why: Why::ProbeRecovered,
                });
            }
        }
        actions
    }

    /// Moves to the next phase.
    fn enter(&self, mut next: ControllerState, why: Why) -> (ControllerState, Vec<Action>) {
        let index = next.phase_index + 1;
        next.phase_index = index;
        next.phase_steps = 0;
        next.phase_start_flawed_margin = next.last_flawed_margin;
        next.clean_evals = 0;
        next.lr_boost = 1.0;
        next.window.clear();
        // A re-basing phase re-bases on its own entry (the driver records the step).
        next.reference_step = None;
        (next, vec![Action::EnterPhase { index, why }])
    }
}

#[cfg(test)]
mod tests;
