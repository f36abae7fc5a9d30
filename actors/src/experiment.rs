//! The experiment controller, carried out: the driver asks the pure
//! [`dreamloop::controller::Controller`] after each trained step and each judged evaluation,
//! and carries out its actions with the actors:
//!
//! - a phase change: the labeler's phase, the trainer's β and DPO-loss weight, the phase's
//!   lr (a scale of the schedule), and for a phase that re-bases its reference: a checkpoint
//!   of the weights entering it, pinned as `<state_dir>/reference/`
//!   ([`dreamloop::train::rebase`]) and loaded as the trainer's reference; an event;
//! - an lr raise: a scale of the schedule, an event;
//! - a replay weight: the generator's general-replay weights, an event.
//!
//! What the actors hold in memory (phase, β, lr, replay weights, reference) is re-applied at
//! start-up and after an actor restart from the controller state, which every checkpoint
//! carries, so a SIGKILL between a decision and its checkpoint resumes the same settings.
//! Every evaluation is appended to `evals.jsonl` ([`dreamloop::history`]).

use anyhow::anyhow;
use dreamloop::checkpoint::step_dir_name;
use dreamloop::config::PhaseSpec;
use dreamloop::controller::{Action, Observation, Outcome, REPLAY_SOURCES};
use dreamloop::eval::EvalReport;
use dreamloop::events::{rfc3339_utc, Event};
use dreamloop::history::{EvalEntry, EvalLog, GenerationsEntry};
use dreamloop::label::Phase;
use dreamloop::rollback::{Judgment, Verdict};
use dreamloop::train::rebase;

use crate::driver::{Driver, StepError};
use crate::generator::{GeneratorMsg, GENERATOR};
use crate::labeler::{LabelerMsg, LABELER};
use crate::telemetry;
use crate::trainer::{TrainerMsg, TRAINER};

/// A phase's name in events and logs.
fn phase_name(phase: Phase) -> String {
    format!("{phase:?}").to_lowercase()
}

impl Driver {
    /// A step was trained on `examples` examples: counts it, and carries out a phase change
    /// its step count calls for.
    pub(crate) async fn control_after_step(&mut self, examples: usize) -> Result<(), StepError> {
        self.examples_trained += examples as u64;
        let (next, actions) = self.controller.after_step(&self.controller_state);
        self.controller_state = next;
        self.controller_actions.extend(actions);
        self.carry_out_controls().await
    }

    /// A judged evaluation: recorded in `evals.jsonl`; the controller's actions are queued
    /// for [`Driver::carry_out_controls`] (after the verdict is carried out).
    pub(crate) fn control_after_eval(&mut self, report: &EvalReport, ev: &Judgment) {
        let outcome = match ev.verdict {
            Verdict::Keep { breach: None } => Outcome::Clean,
            Verdict::Keep { breach: Some(_) } => Outcome::Breached,
            Verdict::MarkGood { .. } if ev.before.remeasure => Outcome::Remeasured,
            Verdict::MarkGood { .. } => Outcome::Good,
            Verdict::Rollback { .. } | Verdict::PauseForOperator { .. } => Outcome::RolledBack,
        };
        let observation = Observation {
            metrics: ev.record.metrics,
            clear_per_token: report.clear_direction.margin_per_token,
            flawed_per_token: report.flawed_direction.margin_per_token,
            arithmetic: report.arithmetic.accuracy,
            code: report.code.accuracy,
            outcome,
        };
        let (next, actions) = self
            .controller
            .after_eval(&self.controller_state, &observation);
        self.controller_state = next;
        self.controller_actions.extend(actions);
        self.append_eval(report, ev);
    }

    /// Appends one evaluation to `evals.jsonl`; a failure is logged (the history is not
    /// worth stopping the loop for).
    fn append_eval(&mut self, report: &EvalReport, ev: &Judgment) {
        let now = std::time::SystemTime::now();
        let unix = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let entry = EvalEntry {
            ts: rfc3339_utc(now),
            run_id: self.run.run_id.clone(),
            wall_seconds: unix - self.run.started_unix as f64,
            step: ev.record.step,
            verdict: ev.verdict,
            metrics: ev.record.metrics,
            margin_per_token: [
                report.clear_direction.margin_per_token,
                report.flawed_direction.margin_per_token,
            ],
            arithmetic: [report.arithmetic.accuracy, report.arithmetic.margin],
            code: [report.code.accuracy, report.code.margin],
            attention_per_layer: report
                .attention_per_layer
                .iter()
                .enumerate()
                .map(|(i, r)| (report.attention_layers.get(i).copied().unwrap_or(i), *r))
                .collect(),
            eval_seconds: report.seconds,
            lr: self.lr,
            peak_lr: self.peak_lr,
            lr_factor: self.policy_state.lr_factor,
            lr_boost: self.controller_state.lr_boost,
            replay_ratio: self.policy_state.replay_ratio,
            replay_weights: self.replay_weights(),
            phase: self.phase(),
            phase_index: self.controller_state.phase_index,
            examples_trained: self.examples_trained,
            duty_cycle: self.last_duty,
            generation: report.generations.as_ref().map(|g| g.measures),
        };
        if self.evals.is_none() {
            match EvalLog::open(&self.config.state_dir) {
                Ok(log) => self.evals = Some(log),
                Err(e) => tracing::error!(error = %e, "Could not open evals.jsonl."),
            }
        }
        if let Some(log) = &mut self.evals {
            if let Err(e) = log.append(&entry) {
                tracing::error!(error = %e, "Could not append to evals.jsonl.");
            }
            if let Some(g) = &report.generations {
                let written = log.append_generations(&GenerationsEntry {
                    ts: entry.ts.clone(),
                    run_id: entry.run_id.clone(),
                    step: entry.step,
                    measures: g.measures,
                    generations: g.generations.clone(),
                });
                if let Err(e) = written {
                    tracing::error!(error = %e, "Could not append to generations.jsonl.");
                }
            }
        }
    }

    /// The general replay weights in force.
    pub(crate) fn replay_weights(&self) -> [f64; 4] {
        self.controller
            .replay_weights(self.config.data.general_weights, &self.controller_state)
    }

    /// Carries out the controller's queued actions, in order.
    pub(crate) async fn carry_out_controls(&mut self) -> Result<(), StepError> {
        let actions = std::mem::take(&mut self.controller_actions);
        if actions.is_empty() {
            return Ok(());
        }
        for action in actions {
            match action {
                Action::EnterPhase { index, why } => {
                    let from = self.phase();
                    self.apply_controller_settings().await?;
                    let to = self.phase();
                    telemetry::record_phase_change(why.label());
                    self.record(Event::PhaseChange {
                        from: phase_name(from),
                        to: phase_name(to),
                        index: Some(index),
                        reason: Some(why),
                        lr: Some(self.peak_lr),
                        reference_step: self.controller_state.reference_step,
                    });
                    tracing::info!(
                        step = self.step,
                        index,
                        from = %phase_name(from),
                        to = %phase_name(to),
                        reason = why.label(),
                        peak_lr = self.peak_lr,
                        reference_step = ?self.controller_state.reference_step,
                        "Phase changed."
                    );
                }
                Action::SetLrBoost { from, to, why } => {
                    let before = self.peak_lr;
                    self.set_peak_lr(self.controller.peak_lr(&self.controller_state))
                        .await?;
                    telemetry::record_lr_raise();
                    self.record(Event::LrRaised {
                        from: before,
                        to: self.peak_lr,
                        reason: why,
                    });
                    tracing::info!(
                        step = self.step,
                        from = before,
                        to = self.peak_lr,
                        boost_from = from,
                        boost_to = to,
                        "Learning rate raised: the signals were flat."
                    );
                }
                Action::SetReplayBoost { source, boost, why } => {
                    let weights = self.replay_weights();
                    self.ask(GENERATOR, |reply| {
                        GeneratorMsg::SetReplayWeights(weights, reply)
                    })
                    .await?;
                    self.record(Event::ReplayWeight {
                        source: REPLAY_SOURCES[source].to_string(),
                        boost,
                        reason: why,
                    });
                    tracing::info!(
                        step = self.step,
                        source = REPLAY_SOURCES[source],
                        boost,
                        reason = why.label(),
                        ?weights,
                        "Replay weights changed."
                    );
                }
            }
        }
        telemetry::set_phase(
            self.controller_state.phase_index,
            self.controller_state.lr_boost,
        );
        self.write_status(if self.paused { "paused" } else { "running" });
        Ok(())
    }

    /// Brings the actors' in-memory settings to the controller state's: the phase (a
    /// schedule's; a fixed phase is the operator's), β and DPO-loss weight, the peak lr, the
    /// replay weights, and the re-based reference. Idempotent: run at start-up, after an actor
    /// restart and on each phase change.
    pub(crate) async fn apply_controller_settings(&mut self) -> Result<(), StepError> {
        let index = self.controller_state.phase_index;
        let p = *self.controller.phase(index);
        if let PhaseSpec::Schedule(_) = self.config.phase {
            self.set_phase(p.kind);
        }
        self.tell(LABELER, LabelerMsg::SetPhase(self.phase()));
        self.ask(TRAINER, |reply| {
            TrainerMsg::SetPhase(p.beta, p.dpo_weight, reply)
        })
        .await?;
        self.set_peak_lr(self.controller.peak_lr(&self.controller_state))
            .await?;
        let weights = self.replay_weights();
        self.ask(GENERATOR, |reply| {
            GeneratorMsg::SetReplayWeights(weights, reply)
        })
        .await?;
        telemetry::set_phase(index, self.controller_state.lr_boost);
        // The first phase's reference is the starting model already.
        if p.rebase_reference && index > 0 {
            let pinned = rebase::pinned(&self.config.state_dir).map(|(step, _)| step);
            match self.controller_state.reference_step {
                None => self.rebase_reference().await?,
                Some(step) if pinned != Some(step) => self.pin_reference(step).await?,
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Moves the schedule's peak lr to `wanted` (a scale of the trainer's curve).
    pub(crate) async fn set_peak_lr(&mut self, wanted: f64) -> Result<(), StepError> {
        if (wanted - self.peak_lr).abs() > f64::EPSILON * wanted.abs() {
            let factor = wanted / self.peak_lr;
            self.lr = self
                .ask(TRAINER, |reply| TrainerMsg::ScaleLr(factor, reply))
                .await?;
            tracing::info!(
                from = self.peak_lr,
                to = wanted,
                next_lr = self.lr,
                "Peak learning rate set."
            );
            self.peak_lr = wanted;
        }
        Ok(())
    }

    /// The reference becomes the current weights: checkpointed (with the controller state
    /// naming this step), pinned, loaded. A checkpoint that cannot be written leaves the
    /// reference as it was (an alarm; the next start tries again).
    async fn rebase_reference(&mut self) -> Result<(), StepError> {
        let step = self.step;
        self.controller_state.reference_step = Some(step);
        if self.latest != Some(step) && !self.checkpoint().await? {
            self.controller_state.reference_step = None;
            self.record(Event::Alarm {
                name: "reference_not_rebased".into(),
                message: format!(
                    "the checkpoint of step {step} could not be written; the DPO reference stays the previous one"
                ),
            });
            return Ok(());
        }
        self.pin_reference(step).await
    }

    /// Pins checkpoint `step`'s weights as the reference and has the trainer load them.
    async fn pin_reference(&mut self, step: u64) -> Result<(), StepError> {
        let state_dir = self.config.state_dir.clone();
        let checkpoint = state_dir.join("checkpoints").join(step_dir_name(step));
        let pinned = rebase::pin(&state_dir, &checkpoint, step).map_err(|e| {
            StepError::Local(anyhow!(
                "pinning {} as the DPO reference: {e}",
                checkpoint.display()
            ))
        })?;
        self.try_ask(TRAINER, |reply| TrainerMsg::Rebase(pinned, reply))
            .await?;
        tracing::info!(
            step,
            "The DPO reference is re-based on the weights of this step."
        );
        Ok(())
    }
}
