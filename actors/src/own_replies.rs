//! The policy's own replies (`[on_policy]`, [`dreamloop::dream::on_policy`]): before every
//! `every_n_steps`-th step the driver asks the trainer thread for the current weights' greedy
//! replies to up to `samples` behaviour prompts of the batch about to be trained (fresh to
//! those weights), judges each for its kind, counts it
//! (`dreamloop_dream_on_policy_replies_total{kind,judged}`), keeps it in
//! `<state_dir>/on-policy.jsonl` (segmented like `trained.jsonl`), and, in the `dpo` and
//! `mixed` phases, offers the DPO pairs of the wrong ones to the labeler, which queues them
//! durably and admits them to the never-repeat ledger like conversation-log pairs: they train
//! once, in a later batch, and are quarantined with their batch like any example.
//!
//! Sampling is an observation, never a reason to stop: a failed call, an untokenizable
//! prompt or an unwritable record is logged and the step goes on. The time it takes is not
//! step time, so it shows in the duty cycle.

use dreamloop::dream::on_policy::{self, Assessment, Sample};
use dreamloop::example::Example;
use dreamloop::label::Phase;
use dreamloop::segmented::SegmentedLog;

use crate::driver::Driver;
use crate::labeler::{LabelerMsg, LABELER};
use crate::telemetry;
use crate::trainer::{TrainerMsg, TRAINER};

/// The stem of the on-policy log: `<state_dir>/on-policy.jsonl`.
pub const ON_POLICY_STEM: &str = "on-policy";

impl Driver {
    /// Samples, judges and pairs the policy's replies to `batch` when the step about to be
    /// taken is due (see the module docs).
    pub(crate) async fn sample_own_replies(&mut self, batch: &[Example]) {
        let settings = self.config.on_policy;
        let next = self.step + 1;
        if settings.every_n_steps == 0 || next % settings.every_n_steps != 0 {
            return;
        }
        let picked = on_policy::pick(batch, settings.samples);
        if picked.is_empty() {
            return;
        }
        let prompts = picked.iter().map(|&i| batch[i].prompt.clone()).collect();
        let started = std::time::Instant::now();
        let replies = match self
            .ask(TRAINER, |reply| {
                TrainerMsg::Sample(prompts, settings.max_new_tokens, reply)
            })
            .await
        {
            Ok(replies) => replies,
            Err(e) => {
                tracing::warn!(error = %e, step = next, "The policy's own replies were not sampled.");
                return;
            }
        };
        let pair_phase = self.phase() != Phase::Sft;
        let mut samples = Vec::new();
        // The pairs, each with the index of its sample.
        let mut pairs: Vec<(usize, Example)> = Vec::new();
        for (&i, reply) in picked.iter().zip(replies) {
            let example = &batch[i];
            let reply = match reply {
                Ok(reply) => reply,
                Err(reason) => {
                    tracing::warn!(provenance = %example.provenance, %reason, "No on-policy reply to this prompt.");
                    continue;
                }
            };
            let Some((judged, judgement)) = on_policy::assess(example.kind, &reply) else {
                continue;
            };
            telemetry::record_on_policy_reply(example.kind.as_str(), judged.label());
            let pair = if judged == Assessment::Wrong && pair_phase {
                on_policy::pair(example, &reply, next)
            } else {
                None
            };
            pairs.extend(pair.map(|p| (samples.len(), p)));
            samples.push(Sample {
                step: next,
                kind: example.kind,
                source: example.provenance.clone(),
                reply,
                verdict: judgement.verdict,
                scores: (judgement.push_back, judgement.accept),
                judged,
                // Set below for the pairs the labeler queued (not one the ledger knew).
                paired: false,
            });
        }
        let mut queued = 0;
        if !pairs.is_empty() {
            let offered = pairs.len();
            let (at, examples): (Vec<usize>, Vec<Example>) = pairs.into_iter().unzip();
            match self
                .try_ask(LABELER, |reply| LabelerMsg::Offer(examples, reply))
                .await
            {
                Ok(answers) => {
                    for (i, was_queued) in at.into_iter().zip(answers) {
                        samples[i].paired = was_queued;
                        queued += usize::from(was_queued);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, pairs = offered, "On-policy pairs were not queued.");
                }
            }
        }
        telemetry::record_on_policy_pairs(queued);
        let right = samples
            .iter()
            .filter(|s| s.judged == Assessment::Right)
            .count();
        tracing::info!(
            step = next,
            replies = samples.len(),
            right,
            pairs = queued,
            seconds = started.elapsed().as_secs_f64(),
            "The policy's own replies judged."
        );
        self.keep_samples(&samples);
    }

    /// Appends `samples` to `on-policy.jsonl` (opened on first use).
    fn keep_samples(&mut self, samples: &[Sample]) {
        if self.on_policy_log.is_none() {
            match SegmentedLog::open(
                &self.config.state_dir,
                ON_POLICY_STEM,
                self.config.supervisor.trained_segment_bytes,
            ) {
                Ok(log) => self.on_policy_log = Some(log),
                Err(e) => {
                    tracing::warn!(error = %e, "on-policy.jsonl could not be opened; replies not kept.");
                    return;
                }
            }
        }
        let log = self.on_policy_log.as_mut().expect("opened above");
        for s in samples {
            if let Err(e) = log.append(s) {
                tracing::warn!(error = %e, "An on-policy reply was not kept in on-policy.jsonl.");
                return;
            }
        }
    }
}
