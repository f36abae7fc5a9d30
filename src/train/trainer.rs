//! The one-step online trainer: take this batch, take one optimizer step, report.
//!
//! The loop never ends and never repeats an example, so there are no epochs here: a
//! [`Trainer`] holds the policy weights (autodiff), a frozen reference copy (no autodiff;
//! DPO only), the optimizer, the schedule position and the hashes of every example it has
//! trained on. [`Trainer::step`] reads as the recipe:
//!
//! 1. refuse any example seen before;
//! 2. forward: SFT log-probs (one padded batch) and DPO policy log-probs of chosen and
//!    rejected (one padded batch, as TRL concatenates them), reference log-probs forward-only;
//! 3. loss = SFT loss + DPO loss (whichever the batch has);
//! 4. guard: a non-finite loss or gradient skips the step and touches nothing;
//! 5. global grad-norm clipping, optimizer step at the scheduled lr;
//! 6. record the hashes, advance the step, report.
//!
//! The trainer draws no random numbers itself (APOLLO's projection seeds live in the
//! optimizer state), so a resumed run is bit-identical to an uninterrupted one as long as
//! weights, optimizer state, schedule and step are restored: see [`Trainer::save`].

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::{Module, ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::clip::{clip_grad_norm, grad_norm, grads_finite};
use super::loss::{dpo_loss, sft_loss, DpoStats, DpoVariant};
use super::optim::{ModelOptimizer, OptimError, OptimizerConfig, Rounding};
use super::recompute::{Segmented, Tape};
use super::reference::{pair_key, Reference, StreamedReference};
use super::resume::{reconcile, Reconciled};
use super::schedule::LrSchedule;
use crate::example::PairReference;
use crate::model::logprobs::{logprobs, LogProbs, ScoredSeq};
use crate::model::weights::{WeightsDigest, MAX_SHARD_BYTES};
use crate::model::{
    CausalLm, Device, DiskDtype, ModelConfig, ModelError, ModelFiles, Precision, Tokenizer,
    WeightOrigin,
};
use crate::sink::{put_bytes, DirSink, FileSink};

/// A tokenized SFT example: the loss covers `completion` only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SftItem {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    /// Content hash (the never-repeat key).
    pub hash: u64,
}

/// A tokenized DPO pair sharing one prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DpoItem {
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
    pub hash: u64,
    /// Reference log-probs computed ahead of the step ([`Trainer::precompute_reference`]);
    /// the step computes a pair that has none, or whose key is not its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<PairReference>,
}

/// One optimizer step's worth of examples.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub sft: Vec<SftItem>,
    pub dpo: Vec<DpoItem>,
}

impl Batch {
    fn hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.sft
            .iter()
            .map(|e| e.hash)
            .chain(self.dpo.iter().map(|e| e.hash))
    }
    pub fn is_empty(&self) -> bool {
        self.sft.is_empty() && self.dpo.is_empty()
    }
}

/// How the trainer trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerConfig {
    pub optimizer: OptimizerConfig,
    pub schedule: LrSchedule,
    /// Global L2 clipping threshold over all gradients; 0 disables clipping.
    pub max_grad_norm: f64,
    /// DPO temperature β.
    pub beta: f64,
    /// Weight of the DPO loss in a step that has SFT examples too (a mixed phase's
    /// `dpo_lr / lr`, see `controller::PhaseSettings::dpo_weight`); 1 otherwise.
    #[serde(default = "one")]
    pub dpo_weight: f64,
    pub dpo_variant: DpoVariant,
    /// Parameter-name globs (`*`, `?`) that get no gradient and no optimizer state.
    pub freeze: Vec<String>,
    /// If non-empty, only parameters matching one of these globs train.
    pub train_only: Vec<String>,
    /// Padding id for batches (masked, so any valid id works).
    pub pad_id: u32,
    /// Longest sequence trained, in tokens (prompt + completion); 0 = no limit. Longer
    /// examples are cut as TRL cuts them (`max_length`, `truncation_mode = "keep_end"`): the
    /// prompt keeps its end, each completion its start, and a completion keeps at least half
    /// the budget. Attention memory grows with the square of the length: on SmolLM2-135M one
    /// batch with a ~2k-token example needed > 20 GB for its backward pass.
    #[serde(default)]
    pub max_seq_len: usize,
    /// Keep only each decoder layer's input through the forward pass and recompute the layer
    /// during backward ([`super::recompute`]): activation memory of one layer instead of all.
    #[serde(default)]
    pub recompute: bool,
    /// Target positions per chunk of the LM head's logits, forward and backward (0 = all at
    /// once): `[tokens × vocab]` logits never exist whole.
    #[serde(default)]
    pub logits_chunk: usize,
}

fn one() -> f64 {
    1.0
}

impl TrainerConfig {
    /// How gradients are computed.
    fn segmented(&self) -> Segmented {
        Segmented {
            recompute: self.recompute,
            logits_chunk: self.logits_chunk,
        }
    }
}

/// Why a step was not taken. Weights and optimizer state are unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("example {hash:016x} was trained on before; the loop never repeats an example")]
    Repeated { hash: u64 },
    #[error("the batch is empty")]
    EmptyBatch,
    #[error("an example has no completion tokens (prompt-only SFT item or empty DPO response)")]
    EmptyCompletion,
    #[error("the loss is not finite ({value}); step skipped")]
    NonFiniteLoss { value: f64 },
    #[error("a gradient is not finite; step skipped")]
    NonFiniteGradient,
    #[error(transparent)]
    Optimizer(#[from] OptimError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {reason}")]
    State { path: PathBuf, reason: String },
}

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// Steps taken so far, this one included.
    pub step: u64,
    pub loss: f64,
    pub sft_loss: Option<f64>,
    pub dpo: Option<DpoStats>,
    /// Global gradient L2 norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// Tokens in the forward passes (prompt + completion, padding excluded).
    pub tokens: usize,
    pub sft_examples: usize,
    pub dpo_pairs: usize,
    /// Sequences cut to `max_seq_len` in this step.
    #[serde(default)]
    pub truncated: usize,
    /// DPO pairs whose reference log-probs were computed ahead of the step
    /// ([`Trainer::precompute_reference`]); the rest were computed in it.
    #[serde(default)]
    pub reference_stored: usize,
    pub seconds: f64,
}

/// Everything besides weights and optimizer moments that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: u64,
    pub schedule: LrSchedule,
    pub config: TrainerConfig,
}

/// The online trainer.
pub struct Trainer {
    /// Architecture and the `config.json` to write back on save.
    pub config: ModelConfig,
    /// Policy weights on an autodiff device. `None` only transiently inside `step`.
    model: Option<CausalLm>,
    /// The DPO reference: frozen weights in memory, or the starting model's files.
    reference: Reference,
    optim: ModelOptimizer,
    schedule: LrSchedule,
    step: u64,
    seen: HashSet<u64>,
    settings: TrainerConfig,
    /// Disk dtypes, tokenizer and extra files, so saved weights are a complete HF directory.
    dtypes: HashMap<String, DiskDtype>,
    tokenizer_files: Vec<(String, Vec<u8>)>,
    /// The weight files the policy was loaded from, while no step has changed it: a save
    /// then links them instead of writing the weights again (the step-0 baseline of a
    /// 54 GB model costs no copy).
    origin: Option<WeightOrigin>,
}

impl Trainer {
    /// A trainer for `model`, which must live on an autodiff device. The reference for DPO
    /// is a frozen copy of these starting weights unless `reference` names other weights.
    pub fn new(
        config: ModelConfig,
        model: CausalLm,
        reference: Option<CausalLm>,
        settings: TrainerConfig,
    ) -> Result<Self, TrainError> {
        let reference = Reference::Resident(reference.unwrap_or_else(|| model.valid()));
        Self::with_reference(config, model, reference, settings)
    }

    /// [`Trainer::new`] with the DPO reference given as a [`Reference`].
    pub fn with_reference(
        config: ModelConfig,
        model: CausalLm,
        reference: Reference,
        settings: TrainerConfig,
    ) -> Result<Self, TrainError> {
        let optim = ModelOptimizer::new(settings.optimizer.clone())?;
        let model = apply_freeze(model, &settings.freeze, &settings.train_only);
        Ok(Trainer {
            config,
            model: Some(model),
            reference,
            optim,
            schedule: settings.schedule,
            step: 0,
            seen: HashSet::new(),
            settings,
            dtypes: HashMap::new(),
            tokenizer_files: Vec::new(),
            origin: None,
        })
    }

    /// Reads the DPO reference from `reference`'s files layer by layer at each DPO step
    /// instead of keeping it in memory (the resident copy is dropped).
    pub fn with_streamed_reference(mut self, reference: StreamedReference) -> Self {
        self.reference = Reference::Streamed(reference);
        self
    }

    /// Keeps the tokenizer files and disk dtypes of the source checkpoint for saving.
    pub fn with_files(
        mut self,
        dtypes: HashMap<String, DiskDtype>,
        tokenizer: Option<&Tokenizer>,
    ) -> Self {
        self.dtypes = dtypes;
        self.tokenizer_files = tokenizer.map(|t| t.files.clone()).unwrap_or_default();
        self
    }

    /// Names the weight files the policy was loaded from (`Model::origin`); the first step
    /// forgets them.
    pub fn with_origin(mut self, origin: Option<WeightOrigin>) -> Self {
        self.origin = origin;
        self
    }

    /// Writes the updates of bf16 parameters back with `rounding` (default: stochastic; a
    /// restored trainer takes the rounding and its counter from the state file).
    pub fn with_rounding(mut self, rounding: Rounding) -> Self {
        self.optim = self.optim.with_rounding(rounding);
        self
    }

    /// The policy weights (autodiff).
    pub fn model(&self) -> &CausalLm {
        self.model
            .as_ref()
            .expect("model is only absent inside step()")
    }

    /// A forward-only copy of the current weights, for probes.
    pub fn frozen(&self) -> CausalLm {
        self.model().valid()
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The lr the next step will use.
    pub fn current_lr(&self) -> f64 {
        self.schedule.lr_at(self.step)
    }

    /// The settings the trainer trains with.
    pub fn settings(&self) -> &TrainerConfig {
        &self.settings
    }

    /// Applies the configured settings a restored trainer can take (see
    /// [`super::resume`]) and answers what changed; the refused changes are left as saved.
    pub fn reconcile_settings(&mut self, configured: &TrainerConfig) -> Reconciled {
        let reconciled = reconcile(&self.settings, configured);
        self.settings = reconciled.settings.clone();
        reconciled
    }

    /// The phase's DPO settings (the experiment controller's phase change): β and the DPO
    /// loss's weight in a mixed step.
    pub fn set_phase_settings(&mut self, beta: f64, dpo_weight: f64) {
        self.settings.beta = beta;
        self.settings.dpo_weight = dpo_weight;
    }

    /// Replaces the DPO reference (a phase that re-bases it on the weights entering it).
    /// Pairs whose reference log-probs were stored under the old one no longer match its
    /// key and are computed again.
    pub fn set_reference(&mut self, reference: Reference) {
        self.reference = reference;
    }

    /// Multiplies the lr curve (a rollback lowers it).
    pub fn scale_lr(&mut self, factor: f64) {
        self.schedule.scale(factor);
    }

    pub fn has_seen(&self, hash: u64) -> bool {
        self.seen.contains(&hash)
    }

    /// Optimizer state bytes (for metrics and benchmarks).
    pub fn optimizer(&self) -> &ModelOptimizer {
        &self.optim
    }

    /// One optimizer step on `batch`.
    pub fn step(&mut self, batch: &Batch) -> Result<StepReport, TrainError> {
        let started = Instant::now();
        if batch.is_empty() {
            return Err(TrainError::EmptyBatch);
        }
        let mut in_batch = HashSet::new();
        for hash in batch.hashes() {
            if self.seen.contains(&hash) || !in_batch.insert(hash) {
                return Err(TrainError::Repeated { hash });
            }
        }
        let (mut report, mut grads) = match self.gradients(batch) {
            Ok(done) => done,
            Err(e) => {
                // A non-finite example is consumed: retrying it would fail the same way.
                if matches!(
                    e,
                    TrainError::NonFiniteLoss { .. } | TrainError::NonFiniteGradient
                ) {
                    self.seen.extend(batch.hashes());
                }
                return Err(e);
            }
        };
        let model = self.model();
        report.grad_norm = if self.settings.max_grad_norm > 0.0 {
            clip_grad_norm(model, &mut grads, self.settings.max_grad_norm)
        } else {
            grad_norm(model, &grads)
        };
        report.lr = self.schedule.lr_at(self.step);
        let current = self
            .model
            .take()
            .expect("model is only absent inside step()");
        let backup = current.clone();
        match self.optim.step(report.lr, current, grads) {
            Ok(updated) => {
                self.model = Some(updated);
                self.origin = None;
            }
            Err(e) => {
                self.model = Some(backup);
                return Err(e.into());
            }
        }
        self.seen.extend(batch.hashes());
        self.step += 1;
        report.step = self.step;
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// The loss of `batch` and its gradients (before clipping), touching nothing: the
    /// forward passes, the loss and the backward pass of [`Trainer::step`]. The report has
    /// the losses, token counts and truncations; `grad_norm`, `lr` and `step` are the step's.
    pub fn gradients(&self, batch: &Batch) -> Result<(StepReport, GradientsParams), TrainError> {
        let pad = self.settings.pad_id;
        let model = self.model();
        let segmented = self.settings.segmented();
        let mut report = StepReport {
            sft_examples: batch.sft.len(),
            dpo_pairs: batch.dpo.len(),
            ..StepReport::default()
        };
        // Forward: the plain path keeps the whole graph; the segmented one keeps tapes and
        // returns log-probs as leaves (`tapes` pairs each leaf with its tape).
        let mut tapes: Vec<(Tensor<2>, Tape)> = Vec::new();
        let mut forward = |seqs: &[ScoredSeq]| -> LogProbs {
            if segmented.is_plain() {
                logprobs(model, seqs, pad)
            } else {
                let (lp, tape) = segmented.forward(model, seqs, pad);
                tapes.push((lp.token.clone(), tape));
                lp
            }
        };

        let mut loss: Option<Tensor<1>> = None;
        if !batch.sft.is_empty() {
            let max = self.settings.max_seq_len;
            let seqs: Vec<ScoredSeq> = batch
                .sft
                .iter()
                .map(|e| {
                    let (p, c) = fit(e.prompt.len(), e.completion.len(), max);
                    report.truncated += usize::from(p + c < e.prompt.len() + e.completion.len());
                    joined(&e.prompt[e.prompt.len() - p..], &e.completion[..c])
                })
                .collect();
            check_completions(&seqs)?;
            report.tokens += seqs.iter().map(|s| s.ids.len()).sum::<usize>();
            let l = sft_loss(&forward(&seqs));
            report.sft_loss = Some(scalar(&l));
            loss = Some(l);
        }
        if !batch.dpo.is_empty() {
            let (chosen, rejected, cut) = self.dpo_sequences(&batch.dpo);
            report.truncated += cut;
            check_completions(&chosen)?;
            check_completions(&rejected)?;
            report.tokens += chosen
                .iter()
                .chain(&rejected)
                .map(|s| s.ids.len())
                .sum::<usize>();
            let pairs = chosen.len();
            let both: Vec<ScoredSeq> = chosen.iter().chain(&rejected).cloned().collect();
            let (pol_c, pol_r) = split_rows(forward(&both), pairs);
            let (ref_c, ref_r, stored) = self.reference_sums(&batch.dpo, &chosen, &rejected)?;
            report.reference_stored = stored;
            let (l, stats) = dpo_loss(
                &pol_c,
                &pol_r,
                &ref_c,
                &ref_r,
                self.settings.beta,
                self.settings.dpo_variant,
            );
            report.dpo = Some(stats);
            loss = Some(match loss {
                // Mixed: the DPO loss at its own share of the update.
                Some(s) if self.settings.dpo_weight != 1.0 => s + l * self.settings.dpo_weight,
                Some(s) => s + l,
                None => l,
            });
        }
        let loss = loss.expect("a non-empty batch has SFT or DPO items");
        report.loss = scalar(&loss);
        if !report.loss.is_finite() {
            return Err(TrainError::NonFiniteLoss { value: report.loss });
        }

        // Backward: through the whole graph, or through the loss to the log-prob leaves and
        // then segment by segment.
        let grads = if tapes.is_empty() {
            GradientsParams::from_grads(loss.backward(), model)
        } else {
            let mut loss_grads = loss.backward();
            let mut grads = GradientsParams::new();
            for (leaf, tape) in tapes {
                let g = leaf
                    .grad_remove(&mut loss_grads)
                    .expect("the loss depends on every forward's log-probs");
                segmented.backward(model, tape, g, &mut grads);
            }
            grads
        };
        if !grads_finite(model, &grads) {
            return Err(TrainError::NonFiniteGradient);
        }
        Ok((report, grads))
    }

    /// Computes the reference log-probs of every pair in `items` that has none stored, or
    /// whose stored key is not its own, `block` pairs per pass over the reference (0: all in
    /// one pass), and stores them with the pair ([`DpoItem::reference`]). This is TRL's
    /// `precompute_ref_log_probs`, made online: the daemon calls it for a block of queued
    /// pairs before they are trained, so that a streamed reference is read once per block,
    /// not once per step. Returns how many pairs were computed. A resident reference (or
    /// none) stores nothing: the step computes its pairs in one forward without reading any
    /// file.
    pub fn precompute_reference(
        &self,
        items: &mut [DpoItem],
        block: usize,
    ) -> Result<usize, TrainError> {
        let Some(fingerprint) = self.reference.fingerprint() else {
            return Ok(0);
        };
        let (chosen, rejected, _) = self.dpo_sequences(items);
        let keys: Vec<u64> = chosen
            .iter()
            .zip(&rejected)
            .map(|(c, r)| pair_key(fingerprint, c, r))
            .collect();
        let missing: Vec<usize> = (0..items.len())
            .filter(|&i| items[i].reference.map(|r| r.key) != Some(keys[i]))
            .collect();
        let block = if block == 0 {
            missing.len().max(1)
        } else {
            block
        };
        for part in missing.chunks(block) {
            let sums = self.reference_pass(&chosen, &rejected, part)?;
            for (&i, (c, r)) in part.iter().zip(sums) {
                items[i].reference = Some(PairReference {
                    chosen: c,
                    rejected: r,
                    key: keys[i],
                });
            }
        }
        Ok(missing.len())
    }

    /// The reference's summed log-probs of the pairs `rows` (indices into `chosen` and
    /// `rejected`), in one pass: `(chosen, rejected)` per row.
    fn reference_pass(
        &self,
        chosen: &[ScoredSeq],
        rejected: &[ScoredSeq],
        rows: &[usize],
    ) -> Result<Vec<(f64, f64)>, TrainError> {
        let seqs: Vec<ScoredSeq> = rows
            .iter()
            .map(|&i| chosen[i].clone())
            .chain(rows.iter().map(|&i| rejected[i].clone()))
            .collect();
        check_completions(&seqs)?;
        let sums = self
            .reference
            .sums(&seqs, self.settings.pad_id, self.settings.logits_chunk)
            .map_err(ModelError::from)?;
        let (c, r) = sums.split_at(rows.len());
        Ok(c.iter().copied().zip(r.iter().copied()).collect())
    }

    /// The chosen and rejected sequences of `pairs` as the step scores them, and how many
    /// pairs were cut to `max_seq_len`: one prompt cut for both completions, so the pair
    /// stays a pair.
    fn dpo_sequences(&self, pairs: &[DpoItem]) -> (Vec<ScoredSeq>, Vec<ScoredSeq>, usize) {
        let max = self.settings.max_seq_len;
        let mut chosen = Vec::with_capacity(pairs.len());
        let mut rejected = Vec::with_capacity(pairs.len());
        let mut truncated = 0;
        for e in pairs {
            let longer = e.chosen.len().max(e.rejected.len());
            let (p, c) = fit(e.prompt.len(), longer, max);
            truncated += usize::from(p < e.prompt.len() || c < longer);
            let prompt = &e.prompt[e.prompt.len() - p..];
            chosen.push(joined(prompt, &e.chosen[..e.chosen.len().min(c)]));
            rejected.push(joined(prompt, &e.rejected[..e.rejected.len().min(c)]));
        }
        (chosen, rejected, truncated)
    }

    /// The reference sums of a step's pairs: a pair's stored ones when their key is its
    /// own, the others computed now in one pass. Also answers how many were stored.
    fn reference_sums(
        &self,
        pairs: &[DpoItem],
        chosen: &[ScoredSeq],
        rejected: &[ScoredSeq],
    ) -> Result<(Vec<f64>, Vec<f64>, usize), TrainError> {
        let n = pairs.len();
        let stored: Vec<Option<PairReference>> = match self.reference.fingerprint() {
            Some(f) => (0..n)
                .map(|i| {
                    let key = pair_key(f, &chosen[i], &rejected[i]);
                    pairs[i].reference.filter(|r| r.key == key)
                })
                .collect(),
            None => vec![None; n],
        };
        let missing: Vec<usize> = (0..n).filter(|&i| stored[i].is_none()).collect();
        let (mut ref_c, mut ref_r) = (vec![0.0; n], vec![0.0; n]);
        if !missing.is_empty() {
            let sums = self.reference_pass(chosen, rejected, &missing)?;
            for (&i, (c, r)) in missing.iter().zip(sums) {
                ref_c[i] = c;
                ref_r[i] = r;
            }
        }
        for (i, r) in stored.iter().enumerate() {
            if let Some(r) = r {
                ref_c[i] = r.chosen;
                ref_r[i] = r.rejected;
            }
        }
        Ok((ref_c, ref_r, n - missing.len()))
    }

    /// Writes everything a resumed run needs into `dir`: the weights as a Hugging Face
    /// directory, `optimizer.bpk`, `trainer_state.json` and `seen.bin` (u64 LE hashes).
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let mut sink = DirSink::create(dir).map_err(|e| TrainError::State {
            path: dir.to_path_buf(),
            reason: e.to_string(),
        })?;
        self.save_into(&mut sink)
    }

    /// [`save`](Self::save) into any [`FileSink`] (the checkpoint being written): the
    /// weights stream tensor by tensor (sharded beyond 5 GB, as transformers saves), or
    /// are linked from the files they were loaded from while no step has changed them. The
    /// optimizer state is encoded in memory first (burnpack has no streaming writer; with
    /// APOLLO-Mini it is a few MB even for the 27B).
    pub fn save_into(&self, sink: &mut dyn FileSink) -> Result<(), TrainError> {
        let parts = ModelFiles {
            config: &self.config,
            lm: self.model(),
            dtypes: &self.dtypes,
            tokenizer: None,
            extra_files: &self.tokenizer_files,
            origin: self.origin.as_ref(),
        };
        crate::model::save_into(sink, &parts, MAX_SHARD_BYTES)?;
        let put = |sink: &mut dyn FileSink, name: &str, bytes: &[u8]| {
            put_bytes(sink, name, bytes).map_err(|e| TrainError::State {
                path: PathBuf::from(name),
                reason: e.to_string(),
            })
        };
        put(sink, "optimizer.bpk", &self.optim.to_bytes()?)?;
        let state = TrainerState {
            step: self.step,
            schedule: self.schedule,
            config: self.settings.clone(),
        };
        let json = serde_json::to_vec_pretty(&state).expect("state serialises");
        put(sink, "trainer_state.json", &json)?;
        let mut seen: Vec<u64> = self.seen.iter().copied().collect();
        seen.sort_unstable();
        let bytes: Vec<u8> = seen.iter().flat_map(|h| h.to_le_bytes()).collect();
        put(sink, "seen.bin", &bytes)
    }

    /// A digest of the policy's weights as a save would write them
    /// ([`WeightsDigest`]): equal to [`WeightsDigest::of_dir`] of a checkpoint holding the
    /// same weights, whatever its sharding. Reads one tensor at a time.
    pub fn weights_digest(&self) -> Result<String, TrainError> {
        let tensors = self.model().outgoing(&self.dtypes);
        Ok(WeightsDigest::of_outgoing(&tensors).map_err(ModelError::from)?)
    }

    /// Restores a trainer saved by [`Trainer::save`] onto `device` (autodiff for training).
    /// The DPO reference is `reference` (the run's starting model).
    pub fn restore(dir: &Path, reference: Reference, device: &Device) -> Result<Self, TrainError> {
        Self::restore_as(dir, reference, device, Precision::F32)
    }

    /// [`restore`](Self::restore) with the weights in `precision` (a bf16 run resumes in
    /// bf16: its weights, saved as bf16, load back bit for bit).
    pub fn restore_as(
        dir: &Path,
        reference: Reference,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, TrainError> {
        let model = crate::model::Model::load_as(dir, device, precision)?;
        let state_path = dir.join("trainer_state.json");
        let bad = |reason: String| TrainError::State {
            path: state_path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&state_path).map_err(|e| bad(e.to_string()))?;
        let state: TrainerState = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let seen_path = dir.join("seen.bin");
        let seen_bytes = std::fs::read(&seen_path).map_err(|e| TrainError::State {
            path: seen_path.clone(),
            reason: e.to_string(),
        })?;
        if seen_bytes.len() % 8 != 0 {
            return Err(TrainError::State {
                path: seen_path,
                reason: format!(
                    "{} bytes is not a whole number of u64 hashes",
                    seen_bytes.len()
                ),
            });
        }
        let mut trainer = Trainer::with_reference(model.config, model.lm, reference, state.config)?
            .with_files(model.dtypes, model.tokenizer.as_ref())
            .with_origin(model.origin);
        trainer.optim.load(&dir.join("optimizer.bpk"), device)?;
        trainer.schedule = state.schedule;
        trainer.step = state.step;
        trainer.seen = seen_bytes
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("chunks of 8")))
            .collect();
        Ok(trainer)
    }
}

/// How many prompt and completion tokens fit in `max` (0 = no limit): the completion keeps
/// at least half the budget (more when the prompt is short), the prompt the rest.
fn fit(prompt: usize, completion: usize, max: usize) -> (usize, usize) {
    if max == 0 || prompt + completion <= max {
        return (prompt, completion);
    }
    let c = completion.min(max.saturating_sub(prompt).max(max / 2));
    (prompt.min(max - c), c)
}

fn joined(prompt: &[u32], completion: &[u32]) -> ScoredSeq {
    let mut ids = prompt.to_vec();
    ids.extend_from_slice(completion);
    ScoredSeq {
        ids,
        score_from: prompt.len().max(1),
    }
}

fn check_completions(seqs: &[ScoredSeq]) -> Result<(), TrainError> {
    if seqs
        .iter()
        .any(|s| s.ids.len() < 2 || s.score_from >= s.ids.len())
    {
        return Err(TrainError::EmptyCompletion);
    }
    Ok(())
}

fn scalar(t: &Tensor<1>) -> f64 {
    t.clone().into_scalar::<f32>() as f64
}

/// Splits a `[2·pairs, seq]` log-prob batch into its chosen and rejected halves.
fn split_rows(
    lp: crate::model::logprobs::LogProbs,
    pairs: usize,
) -> (
    crate::model::logprobs::LogProbs,
    crate::model::logprobs::LogProbs,
) {
    use crate::model::logprobs::LogProbs;
    let [_, width] = lp.token.dims();
    let half = |start: usize| LogProbs {
        token: lp.token.clone().narrow(0, start, pairs),
        mask: lp.mask.clone().narrow(0, start, pairs),
        mask_host: lp.mask_host[start..start + pairs].to_vec(),
    };
    debug_assert!(width > 0);
    (half(0), half(pairs))
}

/// `*` matches any run of characters (dots included), `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Turns off gradients of frozen parameters (by name), so they get no optimizer state.
struct Freezer<'a> {
    path: Vec<String>,
    freeze: &'a [String],
    train_only: &'a [String],
}

impl ModuleMapper for Freezer<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.join(".");
        let frozen = self.freeze.iter().any(|p| glob_match(p, &name))
            || (!self.train_only.is_empty()
                && !self.train_only.iter().any(|p| glob_match(p, &name)));
        if frozen {
            param.set_require_grad(false)
        } else {
            param
        }
    }
}

fn apply_freeze(model: CausalLm, freeze: &[String], train_only: &[String]) -> CausalLm {
    if freeze.is_empty() && train_only.is_empty() {
        return model;
    }
    model.map(&mut Freezer {
        path: Vec::new(),
        freeze,
        train_only,
    })
}

#[cfg(test)]
mod fit_tests {
    use super::fit;

    #[test]
    fn long_examples_are_cut_to_the_budget() {
        // Fits: unchanged. No limit: unchanged.
        assert_eq!(fit(10, 20, 64), (10, 20));
        assert_eq!(fit(5000, 5000, 0), (5000, 5000));
        // A long completion after a short prompt keeps the whole prompt.
        assert_eq!(fit(10, 100, 64), (10, 54));
        // A long prompt gives way to the completion, which keeps at least half.
        assert_eq!(fit(100, 20, 64), (44, 20));
        assert_eq!(fit(100, 100, 64), (32, 32));
        assert_eq!(fit(1, 3000, 1024), (1, 1023));
    }
}
