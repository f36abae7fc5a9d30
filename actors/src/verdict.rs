//! Verdict handling: the loop evaluates the weights, judges the report with the rollback
//! policy (the pure [`judge`]; the loop is the one owner of the policy state) and carries
//! out the verdict with the checkpointer and the trainer, so that the order of effects reads
//! in one place:
//!
//! - `Keep`: nothing.
//! - `MarkGood`: this step's checkpoint is written with the verdict in its `state.json`,
//!   then GOOD moves to it (a checkpoint that cannot be written is not marked, and the
//!   policy forgets the verdict).
//! - `Rollback`: the abandoned steps' examples are quarantined, GOOD is restored bit for bit
//!   (checked by weights digest), lr and replay ratio move to the policy's, an event; the
//!   restored weights are evaluated again (the policy re-measures its baseline).
//! - `PauseForOperator`: the rollback if there is one, persisted, then a pause kept in
//!   `paused-by-policy.json` across restarts.

use std::path::Path;
use std::sync::atomic::Ordering;

use anyhow::{anyhow, Context};
use dreamloop::eval::EvalReport;
use dreamloop::events::{rfc3339_utc, Event};
use dreamloop::model::weights::WeightsDigest;
use dreamloop::rollback::{judge, rescaled_lr_factor, Judgment, PolicyState, Verdict};

use crate::checkpointer::{CheckpointerMsg, CHECKPOINTER};
use crate::driver::{Driver, StepError};
use crate::mixer::{MixerMsg, MIXER};
use crate::startup::{Control, POLICY_PAUSE_FILE};
use crate::status::{LastEval, LastRollback};
use crate::trainer::{TrainerMsg, TRAINER};
use crate::{systemd, telemetry};

impl Driver {
    /// Evaluates the current weights and carries out the verdict, then the experiment
    /// controller's decisions (`experiment.rs`).
    pub(crate) async fn evaluate_and_act(&mut self) -> Result<(), StepError> {
        self.evaluate_and_judge().await?;
        self.carry_out_controls().await
    }

    /// Evaluates the current weights and carries out the verdict; after a rollback the
    /// restored GOOD weights are evaluated again (the policy re-measures its baseline).
    async fn evaluate_and_judge(&mut self) -> Result<(), StepError> {
        // The non-finite steps since the last evaluation count in this one's record; the
        // re-evaluation of restored weights after a rollback starts from none.
        let mut non_finite = std::mem::take(&mut self.non_finite_since_eval);
        loop {
            self.cancel_eval.store(false, Ordering::SeqCst);
            if self.deferred.contains(&Control::Shutdown) {
                tracing::info!(step = self.step, "Evaluation skipped: shutting down.");
                return Ok(());
            }
            tracing::info!(step = self.step, "Evaluating the weights.");
            let Some(report) = self.ask(TRAINER, TrainerMsg::Evaluate).await? else {
                tracing::warn!(
                    step = self.step,
                    "Evaluation cancelled by a shutdown; this step is not judged."
                );
                return Ok(());
            };
            let ev = judge(
                self.step,
                &report,
                std::mem::take(&mut non_finite),
                &self.policy_state,
                &self.policy,
            );
            tracing::info!(
                step = self.step,
                clear = ev.record.metrics.clear_accuracy,
                flawed = ev.record.metrics.flawed_accuracy,
                perplexity = ev.record.metrics.perplexity,
                verdict = ?ev.verdict,
                "Evaluated."
            );
            self.last_eval = Some(LastEval {
                step: self.step,
                metrics: ev.record.metrics,
                verdict: ev.verdict,
                seconds: report.seconds,
            });
            let after = ev.after.clone();
            record_telemetry(&report, &ev);
            let _ = systemd::watchdog();
            self.policy_state = after.clone();
            self.control_after_eval(&report, &ev);
            match ev.verdict {
                Verdict::Keep { .. } => return Ok(()),
                Verdict::MarkGood { step } => {
                    // The checkpoint of `step` is written now, after the verdict, so that its
                    // state.json names it GOOD with its baseline (a checkpoint of this step
                    // written before the evaluation is replaced): a resume from it rolls
                    // back to a checkpoint that exists.
                    if !self.checkpoint().await? {
                        // Its checkpoint could not be written (disk): the GOOD on disk
                        // stays the rollback target, and the policy forgets this verdict.
                        tracing::warn!(
                            step,
                            "Not marked GOOD: its checkpoint could not be written."
                        );
                        self.policy_state = ev.before;
                        return Ok(());
                    }
                    self.try_ask(CHECKPOINTER, |reply| CheckpointerMsg::MarkGood(step, reply))
                        .await?;
                    self.record(Event::MarkGood {
                        metrics: ev.record.metrics,
                    });
                    self.write_status("running");
                    return Ok(());
                }
                Verdict::Rollback {
                    to,
                    reason,
                    adjustments,
                } => {
                    let (quarantined, restored_digest) = self.roll_back(to, &after).await?;
                    self.last_rollback = Some(LastRollback {
                        from: ev.record.step,
                        to,
                        reason,
                        quarantined,
                        lr: self.lr,
                        replay_ratio: adjustments.replay_ratio,
                        restored_digest,
                        ts: rfc3339_utc(std::time::SystemTime::now()),
                    });
                    self.record(Event::Rollback {
                        from: ev.record.step,
                        to,
                        reason,
                        metrics: ev.record.metrics,
                        baseline: ev.before.baseline.map(|b| b.metrics),
                        adjustments,
                    });
                    tracing::warn!(
                        from = ev.record.step,
                        to,
                        reason = reason.label(),
                        quarantined,
                        lr = self.lr,
                        replay_ratio = adjustments.replay_ratio,
                        "Rolled back."
                    );
                    // Loop: evaluate the restored weights (baseline re-measurement).
                }
                Verdict::PauseForOperator {
                    reason,
                    rollback_to,
                } => {
                    if let Some(to) = rollback_to {
                        self.roll_back(to, &after).await?;
                        // The restored weights at the policy's lr, persisted before the
                        // pause: a restart resumes them, not GOOD's own lr.
                        self.checkpoint_soon = false;
                        self.checkpoint().await?;
                    }
                    self.record(Event::PauseByPolicy {
                        reason,
                        rolled_back_to: rollback_to,
                    });
                    let marker = self.config.state_dir.join(POLICY_PAUSE_FILE);
                    let note = serde_json::json!({
                        "reason": reason.label(),
                        "step": self.step,
                        "rolled_back_to": rollback_to,
                        "ts": rfc3339_utc(std::time::SystemTime::now()),
                    });
                    crate::status::write_atomic(&marker, note.to_string().as_bytes())
                        .with_context(|| format!("writing {}", marker.display()))
                        .map_err(StepError::Local)?;
                    tracing::error!(
                        reason = reason.label(),
                        "The rollback policy paused training; `dreamloop resume` continues."
                    );
                    self.paused = true;
                    self.paused_by_policy = true;
                    return Ok(());
                }
            }
        }
    }

    /// Restores GOOD `to` bit for bit, brings lr and replay ratio to what `policy` (the
    /// policy state after the verdict) says, quarantines the abandoned steps' examples;
    /// answers how many were quarantined and the restored weights' sha256.
    pub(crate) async fn roll_back(
        &mut self,
        to: u64,
        policy: &PolicyState,
    ) -> Result<(usize, String), StepError> {
        let from = self.step;
        // The abandoned steps' examples are quarantined, and the rewind recorded, before
        // LATEST moves: a crash in between must not find them after the restored step, where
        // they would count as steps a crash lost (those are queued again; these must not be).
        let gone = self.trained.roll_back(to, from).map_err(StepError::Local)?;
        let count = self
            .try_ask(CHECKPOINTER, |reply| {
                CheckpointerMsg::Quarantine(gone, from, to, reply)
            })
            .await?;
        self.trained.rewind(to).map_err(StepError::Local)?;
        let (dir, good_run) = self
            .try_ask(CHECKPOINTER, |reply| CheckpointerMsg::RollbackTo(to, reply))
            .await?;
        let restore = dir.clone();
        let step = self
            .try_ask(TRAINER, |reply| TrainerMsg::RestoreFrom(restore, reply))
            .await?;
        self.step = step;
        self.latest = Some(step);
        let restored_digest = self.verify_restore(&dir).await?;
        // The restored curve carries the GOOD checkpoint's peak lr and policy factor; move
        // it to the policy's factor now and to any lr reloaded since.
        let factor = rescaled_lr_factor(
            self.peak_lr,
            policy.lr_factor,
            good_run.peak_lr,
            good_run.policy.lr_factor,
        );
        let ratio = policy.replay_ratio;
        self.try_ask(MIXER, |reply| MixerMsg::SetReplayRatio(ratio, reply))
            .await?;
        self.lr = self
            .ask(TRAINER, |reply| TrainerMsg::ScaleLr(factor, reply))
            .await?;
        self.checkpoint_soon = true;
        Ok((count, restored_digest))
    }

    /// Compares the digest of the restored weights in the trainer's memory with the GOOD
    /// checkpoint's weight files' ([`WeightsDigest`]): a mismatch means the restore was not
    /// bit-exact. Nothing is written; each side is read one tensor at a time.
    async fn verify_restore(&mut self, good_dir: &Path) -> Result<String, StepError> {
        let restored = self.try_ask(TRAINER, TrainerMsg::WeightsDigest).await?;
        let good = WeightsDigest::of_dir(good_dir).map_err(|e| StepError::Local(e.into()))?;
        if restored != good {
            return Err(StepError::Local(anyhow!(
                "restored weights differ from the GOOD checkpoint {} (weights digest {restored} ≠ {good})",
                good_dir.display()
            )));
        }
        Ok(restored)
    }
}

/// Exports one evaluation: the policy's metrics, the general probes, attention per layer,
/// the verdict.
fn record_telemetry(report: &EvalReport, ev: &Judgment) {
    telemetry::record_eval(&ev.record.metrics, report.seconds);
    telemetry::record_probe(
        "arithmetic",
        report.arithmetic.accuracy,
        report.arithmetic.margin,
    );
    telemetry::record_probe("code", report.code.accuracy, report.code.margin);
    if let Some(g) = &report.generations {
        telemetry::record_generations(&g.measures);
    }
    for (i, ratio) in report.attention_per_layer.iter().enumerate() {
        let layer = report.attention_layers.get(i).copied().unwrap_or(i);
        telemetry::record_layer_attention(layer, *ratio);
    }
    telemetry::record_verdict(&ev.verdict, &ev.after);
}
