//! The trainer actor and the OS thread that owns the model.
//!
//! burn steps block for as long as the step takes, so the weights, the optimizer and the
//! probe suite live on one dedicated OS thread (`dreamloop-trainer`), never on the async
//! runtime. The [`TrainerActor`] feeds that thread through a bounded `crossbeam-channel`
//! (`[queues] trainer` jobs) and awaits each job's answer on a oneshot channel; the thread
//! answers [`Job`]s strictly in order, so "evaluate after step N" evaluates step N's weights.
//!
//! If the thread panics (a burn assertion, an injected fault) its reply sender is dropped, the
//! actor's job fails, the actor fails, and the supervisor restarts it: `pre_start` starts a
//! fresh thread from the LATEST checkpoint (or the starting weights).
//!
//! Fault injection for the runtime tests: [`TrainerArgs::faults`] (see `faults.rs`) can make
//! the thread panic about to take a step, skip steps as non-finite, or slow every
//! evaluation (waited in slices that honour a cancel). The binary injects none.
//!
//! An evaluation can be cancelled (a shutdown must not wait for it): the loop sets the
//! shared `cancel_eval` flag, the probe suite's progress callback sees it after the batch
//! in flight and unwinds out of the evaluation with [`std::panic::resume_unwind`] (no panic
//! hook, no message), which the thread catches; the evaluation ran on a frozen copy, so the
//! trainer is untouched, and the job answers `None`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Context};
use dreamloop::checkpoint::PendingCheckpoint;
use dreamloop::config::{Backend, DreamConfig};
use dreamloop::eval::generations;
use dreamloop::eval::{EvalReport, ProbeSuite};
use dreamloop::example::{Example, Message};
use dreamloop::model::{default_device, Device, Model, Tokenizer};
use dreamloop::train::dataset::{tokenize_example, Item};
use dreamloop::train::rebase;
use dreamloop::train::reference::{Reference, StreamedReference};
use dreamloop::train::trainer::{Batch, StepReport, TrainError, Trainer};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::oneshot;

use crate::call::ReplyError;
use crate::faults::{Faults, StepFault};
use crate::telemetry;

/// Registered name of the trainer actor.
pub const TRAINER: &str = "trainer";

/// What one training job produced.
#[derive(Debug, Clone)]
pub enum StepOutcome {
    /// The step was taken.
    Trained(StepReport),
    /// The step was skipped (non-finite loss or gradient, repeated example, untokenizable
    /// batch); weights untouched. The text says why.
    Skipped {
        /// The trainer's error as text.
        reason: String,
        /// Whether it was a non-finite loss or gradient (the rollback policy counts those).
        non_finite: bool,
    },
}

/// Where the trainer thread starts from.
#[derive(Debug, Clone)]
pub enum Start {
    /// The configured starting weights.
    Fresh,
    /// A checkpoint directory written by `Trainer::save` (through the checkpointer).
    Restore(PathBuf),
}

/// One request to the trainer thread.
enum Job {
    Step(Vec<Example>, oneshot::Sender<StepOutcome>),
    Evaluate(oneshot::Sender<Option<EvalReport>>),
    Save(Box<PendingCheckpoint>, oneshot::Sender<SaveAnswer>),
    Digest(oneshot::Sender<Result<String, ReplyError>>),
    Restore(PathBuf, oneshot::Sender<Result<u64, ReplyError>>),
    ScaleLr(f64, oneshot::Sender<f64>),
    Position(oneshot::Sender<(u64, f64)>),
    Precompute(
        Vec<Example>,
        oneshot::Sender<Result<Vec<Example>, ReplyError>>,
    ),
    Sample(
        Vec<Vec<Message>>,
        usize,
        oneshot::Sender<Vec<Result<String, String>>>,
    ),
    SetPhase(f64, f64, oneshot::Sender<()>),
    Rebase(PathBuf, oneshot::Sender<Result<(), ReplyError>>),
}

/// The answer to a save: the checkpoint handed back (to commit or abandon) and whether
/// every file was written.
pub type SaveAnswer = (Box<PendingCheckpoint>, Result<(), ReplyError>);

/// Messages of the trainer actor; each forwards one [`Job`] and answers when it is done.
pub enum TrainerMsg {
    /// Take one optimizer step on these examples.
    TrainOn(Vec<Example>, RpcReplyPort<StepOutcome>),
    /// Evaluate the probe suite on the current weights (forward-only copy); `None` when
    /// the evaluation was cancelled through `TrainerArgs::cancel_eval`.
    Evaluate(RpcReplyPort<Option<EvalReport>>),
    /// Write weights, optimizer and trainer state into a checkpoint being written; answers
    /// it back with the outcome (errors: persistent).
    SaveInto(Box<PendingCheckpoint>, RpcReplyPort<SaveAnswer>),
    /// The digest of the current weights (`Trainer::weights_digest`; errors: persistent).
    WeightsDigest(RpcReplyPort<Result<String, ReplyError>>),
    /// Replace weights, optimizer and schedule with a checkpoint's; answers its step
    /// (errors: persistent).
    RestoreFrom(PathBuf, RpcReplyPort<Result<u64, ReplyError>>),
    /// Multiply the lr curve; answers the lr of the next step.
    ScaleLr(f64, RpcReplyPort<f64>),
    /// The step count and the lr of the next step.
    Position(RpcReplyPort<(u64, f64)>),
    /// The reference log-probs of these DPO pairs in one pass
    /// (`Trainer::precompute_reference`), stored in each pair's `Example::reference` and
    /// answered back; SFT examples, untokenizable ones and pairs of a resident reference come
    /// back as they were (errors: persistent, and the steps compute their pairs).
    PrecomputeReference(Vec<Example>, RpcReplyPort<Result<Vec<Example>, ReplyError>>),
    /// The current weights' greedy reply to each prompt (chat template, at most the given
    /// number of new tokens, stopping at end-of-sequence), on a forward-only copy; a prompt
    /// that cannot be tokenized answers its error.
    Sample(
        Vec<Vec<Message>>,
        usize,
        RpcReplyPort<Vec<Result<String, String>>>,
    ),
    /// The phase's β and DPO-loss weight (`controller::PhaseSettings`), kept across
    /// restores of checkpoints saved under another phase.
    SetPhase(f64, f64, RpcReplyPort<()>),
    /// The DPO reference becomes the model in this directory (a pinned re-based reference,
    /// `dreamloop::train::rebase`; errors: persistent).
    Rebase(PathBuf, RpcReplyPort<Result<(), ReplyError>>),
}

/// Start-up arguments.
pub struct TrainerArgs {
    /// The whole config (model, train, eval sections are read).
    pub config: Arc<DreamConfig>,
    /// Weights to start from.
    pub start: Start,
    /// Set by the loop to cancel the evaluation in progress (it clears it before asking
    /// for the next one).
    pub cancel_eval: Arc<AtomicBool>,
    /// Injected faults (tests); none in the binary.
    pub faults: Faults,
}

/// The actor state: the sending half of the job channel.
pub struct TrainerState {
    /// Bounded: a producer blocks when the thread is `[queues] trainer` jobs behind.
    jobs: crossbeam_channel::Sender<Job>,
}

/// The trainer actor (see the module docs).
pub struct TrainerActor;

impl Actor for TrainerActor {
    type Msg = TrainerMsg;
    type State = TrainerState;
    type Arguments = TrainerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<TrainerMsg>,
        args: TrainerArgs,
    ) -> Result<TrainerState, ActorProcessingErr> {
        let (jobs, inbox) = crossbeam_channel::bounded(args.config.queues.trainer);
        crate::telemetry::set_queue_capacity("trainer", args.config.queues.trainer);
        let (ready_tx, ready_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name("dreamloop-trainer".into())
            .spawn(move || thread_main(args, inbox, ready_tx))
            .context("spawning the trainer thread")?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(TrainerState { jobs }),
            Ok(Err(e)) => Err(anyhow!("trainer thread could not start: {e}").into()),
            Err(_) => Err(anyhow!("trainer thread died while starting").into()),
        }
    }

    async fn handle(
        &self,
        _myself: ActorRef<TrainerMsg>,
        msg: TrainerMsg,
        state: &mut TrainerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TrainerMsg::TrainOn(examples, reply) => {
                forward(state, |tx| Job::Step(examples, tx), reply).await
            }
            TrainerMsg::Evaluate(reply) => forward(state, Job::Evaluate, reply).await,
            TrainerMsg::SaveInto(pending, reply) => {
                forward(state, |tx| Job::Save(pending, tx), reply).await
            }
            TrainerMsg::WeightsDigest(reply) => forward(state, Job::Digest, reply).await,
            TrainerMsg::RestoreFrom(dir, reply) => {
                forward(state, |tx| Job::Restore(dir, tx), reply).await
            }
            TrainerMsg::ScaleLr(f, reply) => forward(state, |tx| Job::ScaleLr(f, tx), reply).await,
            TrainerMsg::Position(reply) => forward(state, Job::Position, reply).await,
            TrainerMsg::PrecomputeReference(examples, reply) => {
                forward(state, |tx| Job::Precompute(examples, tx), reply).await
            }
            TrainerMsg::Sample(prompts, max_new_tokens, reply) => {
                forward(state, |tx| Job::Sample(prompts, max_new_tokens, tx), reply).await
            }
            TrainerMsg::SetPhase(beta, weight, reply) => {
                forward(state, |tx| Job::SetPhase(beta, weight, tx), reply).await
            }
            TrainerMsg::Rebase(dir, reply) => {
                forward(state, |tx| Job::Rebase(dir, tx), reply).await
            }
        }
    }
}

/// Sends one job to the thread, awaits its answer, passes it on. A dead thread is this
/// actor's failure (the supervisor restarts it with a new thread).
async fn forward<T: Send + 'static>(
    state: &TrainerState,
    job: impl FnOnce(oneshot::Sender<T>) -> Job,
    reply: RpcReplyPort<T>,
) -> Result<(), ActorProcessingErr> {
    let (tx, rx) = oneshot::channel();
    let jobs = state.jobs.clone();
    let job = job(tx);
    // `send` blocks when the bounded queue is full: do it off the async workers.
    // Counted before the send so that depth (pushed − popped) is never negative.
    crate::telemetry::queue_pushed("trainer");
    tokio::task::spawn_blocking(move || jobs.send(job))
        .await
        .map_err(|e| anyhow!("trainer queue task failed: {e}"))?
        .map_err(|_| anyhow!("the trainer thread has stopped"))?;
    let answer = rx
        .await
        .map_err(|_| anyhow!("the trainer thread died during a job"))?;
    // The caller may have timed out and gone; that is its business, not a failure here.
    let _ = reply.send(answer);
    Ok(())
}

/// The device of `[model] backend`.
pub fn device(backend: Backend) -> anyhow::Result<Device> {
    if let Some(problem) = backend_problem(backend) {
        return Err(anyhow!("model.backend: {problem}"));
    }
    Ok(match backend {
        Backend::Cpu => dreamloop::model::cpu(),
        Backend::Cuda => default_device(),
    })
}

/// The names under which cudarc looks for the NVIDIA driver's library (it loads it at run
/// time: the binary links no CUDA library).
const CUDA_DRIVER_LIBRARIES: [&std::ffi::CStr; 2] = [c"libcuda.so.1", c"libcuda.so"];

/// Why `[model] backend` cannot run in this process, if it cannot: a CPU-only build asked
/// for CUDA, or a CUDA build on a machine without the NVIDIA driver. `run` and
/// `validate-config` check this before anything starts (exit 78, like any bad setting):
/// cudarc loads the driver lazily and would otherwise panic inside the trainer thread,
/// which the supervisor can only report as an actor that panicked during start-up.
pub fn backend_problem(backend: Backend) -> Option<String> {
    match backend {
        Backend::Cpu => None,
        Backend::Cuda if !cfg!(feature = "cuda") => Some(
            "\"cuda\" needs a build with --features cuda (this binary is CPU-only; \
             see the README's development section, or set backend = \"cpu\")"
                .into(),
        ),
        Backend::Cuda => load_any_library(&CUDA_DRIVER_LIBRARIES).err().map(|why| {
            format!(
                "\"cuda\" needs the NVIDIA driver, and its library could not be loaded \
                 ({why}); install the driver (it provides libcuda.so.1) or set backend = \"cpu\""
            )
        }),
    }
}

/// Loads (and unloads again) the first of `names` that the dynamic linker finds; the
/// error lists what `dlerror` said for each.
fn load_any_library(names: &[&std::ffi::CStr]) -> Result<(), String> {
    let mut errors = Vec::new();
    for name in names {
        // SAFETY: dlopen with a NUL-terminated name; the handle is closed right away and no
        // symbol of it is used. dlerror returns a thread-local C string or null.
        unsafe {
            let handle = libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL);
            if !handle.is_null() {
                libc::dlclose(handle);
                return Ok(());
            }
            let err = libc::dlerror();
            errors.push(if err.is_null() {
                format!("{} not found", name.to_string_lossy())
            } else {
                std::ffi::CStr::from_ptr(err).to_string_lossy().into_owned()
            });
        }
    }
    Err(errors.join("; "))
}

/// The tokenizer of a restored run, without loading the starting model's weights: the
/// starting directory's own files, a preset's (tiny: built in memory), or else the
/// checkpoint's copy (a GGUF's tokenizer is saved with every checkpoint).
fn restored_tokenizer(
    spec: &str,
    checkpoint: &Path,
    plain: &Device,
) -> anyhow::Result<Option<Tokenizer>> {
    let base = Path::new(spec);
    let from = if base.join("tokenizer.json").is_file() {
        base
    } else if dreamloop::model::preset::PRESETS.contains(&spec) && !base.is_dir() {
        return Ok(Model::open(spec, plain)?.tokenizer);
    } else if checkpoint.join("tokenizer.json").is_file() {
        checkpoint
    } else {
        return Ok(None);
    };
    Ok(Some(Tokenizer::from_dir(from).with_context(|| {
        format!("loading the tokenizer of {}", from.display())
    })?))
}

/// Everything the thread owns.
struct Worker {
    trainer: Trainer,
    /// The DPO reference (the starting model, or a re-based one), kept to rebuild the
    /// trainer on restore.
    reference: Reference,
    /// The phase's β and DPO-loss weight, once set: a restored checkpoint keeps its saved
    /// ones otherwise.
    phase: Option<(f64, f64)>,
    tokenizer: dreamloop::model::Tokenizer,
    probes: ProbeSuite,
    /// The generation probes' prompts (`[eval] generation_prompts`; empty: off).
    generation_probes: Vec<generations::GenProbe>,
    /// Autodiff device of the policy weights.
    device: Device,
    /// The dtype of the weights (`[model] dtype`), for restores.
    precision: dreamloop::model::Precision,
    /// The config, whose `[train]` settings a restored trainer takes where it can.
    config: Arc<DreamConfig>,
    /// Injected faults (tests only).
    faults: Faults,
    /// Cancels the evaluation in progress.
    cancel_eval: Arc<AtomicBool>,
}

/// Applies the `[train]` settings a restored trainer can take from the config (the
/// operator's fix after an out-of-memory: `max_grad_norm`, `max_seq_len`, `recompute`,
/// `logits_chunk`) and logs each. Changes it cannot take were refused before the actors
/// started (`startup::refused_train_changes`); one that shows up here all the same (a
/// rollback to a GOOD saved under other settings) is logged and left as saved.
fn take_configured_settings(trainer: &mut Trainer, config: &DreamConfig) {
    let pad = trainer.settings().pad_id;
    let reconciled = trainer.reconcile_settings(&config.trainer_config(pad));
    for c in &reconciled.applied {
        tracing::info!(
            field = c.field,
            checkpoint = %c.saved,
            configured = %c.configured,
            "A [train] setting changed since the checkpoint; applied."
        );
    }
    for c in &reconciled.refused {
        tracing::warn!(
            field = c.field,
            checkpoint = %c.saved,
            configured = %c.configured,
            "A [train] setting changed since the checkpoint cannot be applied to it; kept as saved."
        );
    }
}

/// The DPO reference of `spec` (a preset or a model directory): resident on `device`, or
/// streamed from its files with `[model] stream_reference`.
fn open_reference(config: &DreamConfig, spec: &str, device: &Device) -> anyhow::Result<Reference> {
    let precision = config.model.dtype;
    Ok(if config.model.stream_reference {
        Reference::Streamed(
            StreamedReference::open_as(Path::new(spec), device, precision)
                .with_context(|| format!("opening the streamed reference `{spec}`"))?,
        )
    } else {
        Reference::Resident(
            Model::open_as(spec, device, precision)
                .with_context(|| format!("loading reference `{spec}`"))?
                .lm,
        )
    })
}

/// The payload that unwinds out of a cancelled evaluation (see the module docs).
struct EvalCancelled;

fn thread_main(
    args: TrainerArgs,
    inbox: crossbeam_channel::Receiver<Job>,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let mut worker = match Worker::start(&args) {
        Ok(w) => {
            let _ = ready.send(Ok(()));
            w
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}")));
            return;
        }
    };
    while let Ok(job) = inbox.recv() {
        crate::telemetry::queue_popped("trainer");
        worker.run(job);
    }
}

impl Worker {
    fn start(args: &TrainerArgs) -> anyhow::Result<Worker> {
        let config = &args.config;
        let plain = device(config.model.backend)?;
        let device = plain.clone().autodiff();
        let spec = &config.model.spec;
        let precision = config.model.dtype;
        let open_reference = |spec: &str| open_reference(config, spec, &plain);
        let (trainer, reference, tokenizer) = match &args.start {
            Start::Fresh => {
                let model = Model::open_as(spec, &device, precision)
                    .with_context(|| format!("loading model `{spec}` in {precision}"))?;
                let reference = match (&config.model.reference, config.model.stream_reference) {
                    (None, false) => Reference::Resident(model.frozen()),
                    (r, _) => open_reference(r.as_deref().unwrap_or(spec))?,
                };
                let pad = model.config.pad_id();
                let Model {
                    config: model_config,
                    lm,
                    tokenizer,
                    dtypes,
                    origin,
                    ..
                } = model;
                let trainer = Trainer::with_reference(
                    model_config,
                    lm,
                    reference.clone(),
                    config.trainer_config(pad),
                )?
                .with_files(dtypes, tokenizer.as_ref())
                .with_origin(origin);
                (trainer, reference, tokenizer)
            }
            Start::Restore(dir) => {
                // The policy comes from the checkpoint alone: the starting model is read
                // again only as the reference (not at all when it is streamed), unless a
                // phase re-based the reference (its pinned files).
                let reference = match rebase::pinned(&config.state_dir) {
                    Some((step, pinned)) => {
                        tracing::info!(step, dir = %pinned.display(), "The DPO reference is the re-based one.");
                        open_reference(&pinned.to_string_lossy())?
                    }
                    None => open_reference(config.model.reference.as_deref().unwrap_or(spec))?,
                };
                let mut trainer =
                    Trainer::restore_as(dir, reference.clone(), &device, precision)
                        .with_context(|| format!("restoring the trainer from {}", dir.display()))?;
                take_configured_settings(&mut trainer, config);
                telemetry::checkpoint_restored();
                (trainer, reference, restored_tokenizer(spec, dir, &plain)?)
            }
        };
        let pad = trainer.config.pad_id();
        let tokenizer = tokenizer.ok_or_else(|| anyhow!("model `{spec}` has no tokenizer.json"))?;
        let probes =
            ProbeSuite::from_config(&config.eval, &config.data.scenarios_dir, &tokenizer, pad)?;
        let generation_probes = generations::from_config(&config.eval, &config.data.scenarios_dir)
            .with_context(|| {
                format!(
                    "loading the probe templates of {}",
                    config.data.scenarios_dir.display()
                )
            })?;
        Ok(Worker {
            trainer,
            reference,
            phase: None,
            tokenizer,
            probes,
            generation_probes,
            device,
            precision,
            config: config.clone(),
            faults: args.faults.clone(),
            cancel_eval: args.cancel_eval.clone(),
        })
    }

    fn run(&mut self, job: Job) {
        match job {
            Job::Step(examples, reply) => {
                let _ = reply.send(self.step(&examples));
            }
            Job::Evaluate(reply) => {
                let _ = reply.send(self.evaluate());
            }
            Job::Save(mut pending, reply) => {
                let written = self
                    .trainer
                    .save_into(pending.as_mut())
                    .map_err(ReplyError::persistent);
                let _ = reply.send((pending, written));
            }
            Job::Digest(reply) => {
                let _ = reply.send(
                    self.trainer
                        .weights_digest()
                        .map_err(ReplyError::persistent),
                );
            }
            Job::Restore(dir, reply) => {
                let restored =
                    Trainer::restore_as(&dir, self.reference.clone(), &self.device, self.precision)
                        .map(|mut t| {
                            take_configured_settings(&mut t, &self.config);
                            if let Some((beta, weight)) = self.phase {
                                t.set_phase_settings(beta, weight);
                            }
                            telemetry::checkpoint_restored();
                            self.trainer = t;
                            self.trainer.step_count()
                        });
                let _ =
                    reply
                        .send(restored.map_err(|e| {
                            ReplyError::persistent(format!("{}: {e}", dir.display()))
                        }));
            }
            Job::ScaleLr(factor, reply) => {
                self.trainer.scale_lr(factor);
                let _ = reply.send(self.trainer.current_lr());
            }
            Job::Position(reply) => {
                let _ = reply.send((self.trainer.step_count(), self.trainer.current_lr()));
            }
            Job::Precompute(examples, reply) => {
                let _ = reply.send(self.precompute(examples));
            }
            Job::Sample(prompts, max_new_tokens, reply) => {
                let _ = reply.send(self.sample(&prompts, max_new_tokens));
            }
            Job::SetPhase(beta, weight, reply) => {
                self.phase = Some((beta, weight));
                self.trainer.set_phase_settings(beta, weight);
                let _ = reply.send(());
            }
            Job::Rebase(dir, reply) => {
                let plain = self.device.clone().inner();
                let opened =
                    open_reference(&self.config, &dir.to_string_lossy(), &plain).map(|reference| {
                        self.reference = reference.clone();
                        self.trainer.set_reference(reference);
                    });
                let _ = reply.send(opened.map_err(|e| ReplyError::persistent(format!("{e:#}"))));
            }
        }
    }

    /// See [`TrainerMsg::PrecomputeReference`]: all the pairs in one pass.
    fn precompute(&self, mut examples: Vec<Example>) -> Result<Vec<Example>, ReplyError> {
        let mut at = Vec::new();
        let mut pairs = Vec::new();
        for (i, example) in examples.iter().enumerate() {
            if let Ok(Item::Dpo(item)) = tokenize_example(&self.tokenizer, example) {
                at.push(i);
                pairs.push(item);
            }
        }
        let started = Instant::now();
        let computed = self
            .trainer
            .precompute_reference(&mut pairs, 0)
            .map_err(ReplyError::persistent)?;
        if computed > 0 {
            tracing::info!(
                pairs = computed,
                seconds = started.elapsed().as_secs_f64(),
                "Reference log-probs computed ahead of their steps."
            );
        }
        for (i, pair) in at.into_iter().zip(pairs) {
            examples[i].reference = pair.reference;
        }
        Ok(examples)
    }

    /// The generation probes answered by the current weights, judged and measured.
    fn generate_probes(&self) -> generations::GenerationReport {
        let frozen = self.trainer.frozen();
        let stop = generations::stop_tokens(&self.trainer.config, &self.tokenizer);
        generations::answer(
            &frozen,
            &self.tokenizer,
            &stop,
            &self.generation_probes,
            self.config.eval.generation_tokens,
        )
    }

    /// See [`TrainerMsg::Sample`].
    fn sample(
        &self,
        prompts: &[Vec<Message>],
        max_new_tokens: usize,
    ) -> Vec<Result<String, String>> {
        let frozen = self.trainer.frozen();
        let stop = generations::stop_tokens(&self.trainer.config, &self.tokenizer);
        generations::replies(&frozen, &self.tokenizer, &stop, prompts, max_new_tokens)
    }

    /// The probe suite on a frozen copy of the weights; `None` if cancelled.
    fn evaluate(&mut self) -> Option<EvalReport> {
        let frozen = self.trainer.frozen();
        let cancel = self.cancel_eval.clone();
        let check = move || {
            if cancel.load(Ordering::SeqCst) {
                std::panic::resume_unwind(Box::new(EvalCancelled));
            }
        };
        let (faults, probes) = (&self.faults, &self.probes);
        let cancel = &*self.cancel_eval;
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            faults.delay_eval(cancel);
            check();
            // A long evaluation is still a live daemon: feed systemd's watchdog from it.
            probes.evaluate(&frozen, &mut |done, total| {
                tracing::debug!(done, total, "Evaluating.");
                let _ = crate::systemd::watchdog();
                check();
            })
        }));
        match run {
            Ok(mut report) => {
                faults.after_eval(&mut report);
                if !self.generation_probes.is_empty() {
                    report.generations = Some(self.generate_probes());
                }
                Some(report)
            }
            Err(payload) if payload.is::<EvalCancelled>() => {
                tracing::info!("Evaluation cancelled.");
                None
            }
            Err(payload) => std::panic::resume_unwind(payload),
        }
    }

    fn step(&mut self, examples: &[Example]) -> StepOutcome {
        let next = self.trainer.step_count() + 1;
        match self.faults.before_step(next) {
            StepFault::None => {}
            StepFault::Panic => {
                panic!("injected fault: the trainer panics about to take step {next}")
            }
            StepFault::NonFinite => {
                return StepOutcome::Skipped {
                    reason: format!("injected fault: non-finite loss at step {next}"),
                    non_finite: true,
                }
            }
        }
        let mut batch = Batch::default();
        for example in examples {
            match tokenize_example(&self.tokenizer, example) {
                Ok(Item::Sft(item)) => batch.sft.push(item),
                Ok(Item::Dpo(item)) => batch.dpo.push(item),
                Err(reason) => {
                    tracing::warn!(provenance = %example.provenance, %reason, "Example could not be tokenized; dropped from the batch.");
                }
            }
        }
        match self.trainer.step(&batch) {
            Ok(report) => {
                let computed = report.dpo_pairs - report.reference_stored;
                if computed > 0 && matches!(self.reference, Reference::Streamed(_)) {
                    tracing::info!(
                        pairs = computed,
                        step = report.step,
                        "Reference log-probs computed in the step (a pass over the reference's files)."
                    );
                }
                StepOutcome::Trained(report)
            }
            Err(e) => StepOutcome::Skipped {
                non_finite: matches!(
                    e,
                    TrainError::NonFiniteLoss { .. } | TrainError::NonFiniteGradient
                ),
                reason: e.to_string(),
            },
        }
    }
}

#[cfg(test)]
mod backend_tests {
    use super::*;

    #[test]
    fn a_missing_library_is_named_in_the_error() {
        let err = load_any_library(&[c"libdreamloop-no-such-driver.so.1"]).unwrap_err();
        assert!(err.contains("libdreamloop-no-such-driver.so.1"), "{err}");
    }

    #[test]
    fn a_present_library_loads() {
        // The C library is loaded in every Linux process.
        assert_eq!(
            load_any_library(&[c"libdreamloop-missing.so", c"libc.so.6"]),
            Ok(())
        );
    }

    #[test]
    fn cpu_always_runs_and_cuda_needs_the_feature() {
        assert_eq!(backend_problem(Backend::Cpu), None);
        if !cfg!(feature = "cuda") {
            let problem = backend_problem(Backend::Cuda).expect("a CPU-only build refuses cuda");
            assert!(problem.contains("--features cuda"), "{problem}");
        }
    }
}
