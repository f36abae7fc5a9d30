//! `run()`: start the actors in pipeline order, drive the loop one step at a time, restart
//! failed actors within a budget, and stop cleanly.
//!
//! Reading [`run`] top to bottom is reading the data flow: resume point → actors
//! (generator → labeler → mixer → trainer → monitor → checkpointer, each a thin wrapper of
//! one core module) → the step loop ([`Driver::run_loop`]): control at the step boundary,
//! `mixer.NextBatch` → `trainer.TrainOn` → `trained.jsonl`, a checkpoint every
//! `[checkpoint] every_n_steps`, an evaluation every `[eval] every_n_steps` whose verdict
//! is carried out here (MarkGood → checkpoint + GOOD; Rollback → restore GOOD bit for bit,
//! lr × factor, replay ratio raised, quarantine, event, baseline re-evaluation; Pause).
//!
//! ractor has no restart strategies, so [`SupervisorActor`] matches `SupervisionEvent`s
//! itself: a failed child is spawned again (same registered name, so callers find it) while
//! it has failed at most `[supervisor] max_restarts` times in `window_seconds`; a restarted
//! trainer starts from LATEST. When a budget is spent the loop stops: checkpoint if the
//! trainer still answers, an `alarm` event, exit status 70.
//!
//! Every call between actors is a `call_t!` with `[supervisor] call_timeout_seconds`.

use std::collections::{HashMap, VecDeque};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use dreamloop::checkpoint::{
    step_dir_name, CheckpointStore, RetentionPolicy, CHECKPOINTS_DIR, LATEST_POINTER,
};
use dreamloop::config::{DreamConfig, OnWriteError};
use dreamloop::model::weights::WeightsDigest;
use dreamloop::events::{rfc3339_utc, Event, EventLog};
use dreamloop::label::Phase;
use dreamloop::mix::MixerState;
use dreamloop::rollback::{Adjustments, Policy, PolicyState, Verdict};
use ractor::{call_t, Actor, ActorCell, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::{mpsc, watch};

use crate::checkpointer::{read_run_state, CheckpointerActor, CheckpointerArgs, CheckpointerMsg};
use crate::generator::{GeneratorActor, GeneratorArgs, GeneratorMsg};
use crate::labeler::{LabelerActor, LabelerArgs, LabelerMsg, GENERATOR};
use crate::mixer::{MixerActor, MixerArgs, MixerMsg, LABELER};
use crate::monitor::{Evaluation, MonitorActor, MonitorArgs, MonitorMsg, TRAINER};
use crate::status::{
    LastEval, LastRollback, RunState, Status, TrainedLog, TrainedStep, RUN_STATE_FILE,
};
use crate::trainer::{Start, StepOutcome, TrainerActor, TrainerArgs, TrainerMsg};
use crate::{systemd, telemetry};

/// Registered name of the mixer actor.
pub const MIXER: &str = "mixer";
/// Registered name of the monitor actor.
pub const MONITOR: &str = "monitor";
/// Registered name of the checkpointer actor.
pub const CHECKPOINTER: &str = "checkpointer";
/// The actors in pipeline order (spawn order).
pub const PIPELINE: [&str; 6] = [GENERATOR, LABELER, MIXER, TRAINER, MONITOR, CHECKPOINTER];

/// Exit status when a restart budget was spent (EX_SOFTWARE).
pub const EXIT_BUDGET_SPENT: u8 = 70;

/// What an operator (through `signals.rs`) or a test asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// Stop taking steps at the next step boundary (metrics keep being served).
    Pause,
    /// Take steps again (also ends a pause ordered by the rollback policy).
    Resume,
    /// Write a checkpoint at the next step boundary.
    Checkpoint,
    /// Re-read the config file and apply its hot settings.
    Reload,
    /// Finish the step, checkpoint, exit 0.
    Shutdown,
}

/// Process settings of `dreamloop run` (the loop's settings are in the config).
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// The config file, re-read on `Reload`; `None`: reload is refused.
    pub config_path: Option<PathBuf>,
    /// Start paused.
    pub paused: bool,
    /// Stop (checkpoint, exit 0) once this many steps are reached.
    pub max_steps: Option<u64>,
}

/// What the supervisor tells the loop.
#[derive(Debug, Clone, PartialEq)]
enum News {
    /// Nothing yet.
    Quiet,
    /// Restarts so far (the loop re-syncs with a restarted trainer).
    Restarted(u32),
    /// An actor failed once too often.
    BudgetSpent { actor: String, reason: String },
}

/// What a restarted actor starts from, kept current by the loop.
#[derive(Debug, Clone)]
struct Shared {
    policy: Policy,
    policy_state: PolicyState,
    mixer: Option<(MixerState, f64)>,
}

/// Runs the daemon until `Shutdown`, `max_steps`, or a spent restart budget. Returns the
/// process exit status: 0 after a clean stop, 70 when a budget was spent, 1 on a start-up
/// or unrecoverable error (logged).
pub async fn run(config: DreamConfig, control: mpsc::Receiver<Control>, opts: RunOptions) -> u8 {
    match run_inner(config, control, opts).await {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "The daemon stopped on an error.");
            1
        }
    }
}

async fn run_inner(
    config: DreamConfig,
    control: mpsc::Receiver<Control>,
    opts: RunOptions,
) -> anyhow::Result<u8> {
    let state_dir = config.state_dir.clone();
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating {}", state_dir.display()))?;
    let _pid = crate::pidfile::PidLock::acquire(&state_dir)?;
    let events = Arc::new(Mutex::new(EventLog::open(&state_dir)?));
    let addr: std::net::SocketAddr = config
        .metrics_addr
        .parse()
        .context("metrics_addr (validated)")?;
    telemetry::install(addr).with_context(|| format!("starting the metrics exporter on {addr}"))?;
    tracing::info!(%addr, "Serving /metrics.");

    // Where to resume: LATEST if its manifest verifies, else the newest that does.
    let resume = {
        let retention = RetentionPolicy {
            keep_last: config.checkpoint.keep_last,
            mirror_dir: None,
        };
        let (store, _) = CheckpointStore::open(&state_dir, retention)?;
        let (point, warnings) = store.resume_point()?;
        for w in warnings {
            tracing::warn!(?w, "Resume: a checkpoint was passed over.");
        }
        point
    };
    let run_state = match &resume {
        Some(c) => Some(read_run_state(&c.file(RUN_STATE_FILE))?),
        None => None,
    };
    let config = Arc::new(config);
    let timeout = Duration::from_secs(config.supervisor.call_timeout_seconds);
    let shared = Arc::new(Mutex::new(Shared {
        policy: config.rollback.clone(),
        policy_state: run_state
            .as_ref()
            .map(|r| r.policy.clone())
            .unwrap_or_else(|| PolicyState::new(config.data.replay_ratio)),
        mixer: run_state.as_ref().map(|r| (r.mixer, r.replay_ratio)),
    }));
    match &resume {
        Some(c) => {
            tracing::info!(step = c.step, path = %c.path.display(), "Resuming from checkpoint.")
        }
        None => tracing::info!("No checkpoint: starting fresh."),
    }

    let (news_tx, news_rx) = watch::channel(News::Quiet);
    let sup_args = SupervisorArgs {
        config: config.clone(),
        shared: shared.clone(),
        events: events.clone(),
        news: news_tx,
        timeout,
        first_start: resume
            .as_ref()
            .map_or(Start::Fresh, |c| Start::Restore(c.path.clone())),
    };
    let (supervisor, handle) = Actor::spawn(Some("supervisor".into()), SupervisorActor, sup_args)
        .await
        .map_err(|e| anyhow!("starting the actors: {e}"))?;

    let resumed_step = resume.as_ref().map_or(0, |c| c.step);
    let good = run_state.as_ref().and_then(|r| r.policy.good_step);
    let mut driver = Driver {
        trained: TrainedLog::open(&state_dir, good, resumed_step)?,
        config: config.clone(),
        opts,
        control,
        news: news_rx,
        events,
        shared,
        timeout,
        step: resumed_step,
        latest: resume.as_ref().map(|c| c.step),
        peak_lr: run_state.as_ref().map_or(config.train.lr, |r| r.peak_lr),
        phase: run_state.as_ref().map_or(config.phase, |r| r.phase),
        eval_every: run_state
            .as_ref()
            .map_or(config.eval.every_n_steps, |r| r.eval_every_n_steps),
        paused: false,
        paused_by_policy: false,
        lr: 0.0,
        last_eval: None,
        last_rollback: None,
        restarts: 0,
        skipped: 0,
        last_status_line: Instant::now(),
        tty: std::io::stderr().is_terminal(),
        last_loss: None,
        checkpoint_soon: false,
        paused_ping: systemd::watchdog_interval()
            .map(|d| d / 2)
            .unwrap_or(Duration::from_secs(5))
            .min(Duration::from_secs(5)),
    };
    driver.paused = driver.opts.paused;
    let code = driver.run_loop().await;
    let code = match code {
        Ok(code) => code,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "The loop stopped on an error.");
            driver.write_status("failed");
            1
        }
    };
    supervisor.stop(Some("daemon stopping".into()));
    let _ = handle.await;
    Ok(code)
}

/// A failed call to an actor: either the actor answered with an error, or the call itself
/// failed (timeout, actor gone), which the supervisor is dealing with.
#[derive(Debug)]
enum CallError {
    /// The actor is down or did not answer in time.
    Down(String),
    /// The actor answered with an error.
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Down(e) => write!(f, "actor down: {e}"),
            CallError::Failed(e) => f.write_str(e),
        }
    }
}

fn actor<M: ractor::Message>(name: &str) -> Result<ActorRef<M>, CallError> {
    ractor::registry::where_is(name)
        .map(ActorRef::from)
        .ok_or_else(|| CallError::Down(format!("{name} is not running")))
}

/// `call_t!` to the actor registered as `$name`, mapping both failure layers to [`CallError`].
macro_rules! ask {
    ($self:ident, $name:expr, $msg:expr $(, $arg:expr)*) => {{
        match actor($name) {
            Ok(a) => match call_t!(a, $msg, $self.timeout.as_millis() as u64 $(, $arg)*) {
                Ok(v) => Ok(v),
                Err(e) => Err(CallError::Down(format!("{}: {e}", $name))),
            },
            Err(e) => Err(e),
        }
    }};
}

/// The step loop and everything it carries out (see the module docs).
struct Driver {
    config: Arc<DreamConfig>,
    opts: RunOptions,
    control: mpsc::Receiver<Control>,
    news: watch::Receiver<News>,
    events: Arc<Mutex<EventLog>>,
    shared: Arc<Mutex<Shared>>,
    timeout: Duration,
    trained: TrainedLog,
    /// Steps the weights have taken.
    step: u64,
    /// LATEST checkpoint's step.
    latest: Option<u64>,
    /// The configured peak lr the schedule follows (SIGHUP changes it by scaling).
    peak_lr: f64,
    phase: Phase,
    eval_every: u64,
    paused: bool,
    paused_by_policy: bool,
    lr: f64,
    last_eval: Option<LastEval>,
    last_rollback: Option<LastRollback>,
    restarts: u32,
    skipped: u64,
    last_status_line: Instant,
    tty: bool,
    last_loss: Option<f64>,
    /// Set by a rollback: checkpoint after the next step instead of waiting for the cadence.
    /// The rollback's lr, replay ratio and policy memory live in the trainer and the actors
    /// until a checkpoint carries them; a crash before it resumes from GOOD with GOOD's
    /// settings (the quarantine is on disk already), so that window is kept to one step.
    checkpoint_soon: bool,
    /// How often a paused loop feeds systemd's watchdog (and re-writes status.json): half
    /// of WatchdogSec, at most 5 s.
    paused_ping: Duration,
}

/// How one pass of the loop ended.
enum Flow {
    Continue,
    Stop(u8),
}

impl Driver {
    async fn run_loop(&mut self) -> anyhow::Result<u8> {
        self.sync_position().await?;
        self.apply_configured_lr().await?;
        let needs_baseline = {
            let shared = self.shared.lock().expect("shared state lock");
            shared.policy_state.baseline.is_none() || shared.policy_state.remeasure
        };
        if needs_baseline {
            if self.latest != Some(self.step) {
                self.checkpoint().await?;
            }
            self.evaluate_and_act().await?;
        }
        self.write_status(if self.paused { "paused" } else { "running" });
        let _ = systemd::ready();
        tracing::info!(
            step = self.step,
            lr = self.lr,
            paused = self.paused,
            "Loop started."
        );
        loop {
            match self.boundary().await? {
                Flow::Stop(code) => return Ok(code),
                Flow::Continue => {}
            }
            if self.paused {
                continue;
            }
            if self.opts.max_steps.is_some_and(|max| self.step >= max) {
                tracing::info!(step = self.step, "Reached --max-steps.");
                return self.shutdown().await;
            }
            match self.one_step().await {
                Ok(()) => {}
                Err(CallError::Failed(e)) => return Err(anyhow!(e)),
                Err(CallError::Down(e)) => {
                    tracing::warn!(error = %e, "A step failed; waiting for the supervisor.");
                    if let Some(code) = self.await_recovery().await? {
                        return Ok(code);
                    }
                }
            }
        }
    }

    /// Handles control and supervisor news at a step boundary; blocks while paused.
    async fn boundary(&mut self) -> anyhow::Result<Flow> {
        let news = self.news.borrow().clone();
        if let News::BudgetSpent { actor, reason } = news {
            return self.budget_spent(&actor, &reason).await.map(Flow::Stop);
        }
        loop {
            let control = if self.paused {
                self.write_status("paused");
                tokio::select! {
                    c = self.control.recv() => c,
                    // Paused is alive: keep systemd's watchdog fed.
                    _ = tokio::time::sleep(self.paused_ping) => {
                        let _ = systemd::watchdog();
                        continue;
                    }
                    _ = self.news.changed() => {
                        let news = self.news.borrow().clone();
                        if let News::BudgetSpent { actor, reason } = news {
                            return self.budget_spent(&actor, &reason).await.map(Flow::Stop);
                        }
                        continue;
                    }
                }
            } else {
                match self.control.try_recv() {
                    Ok(c) => Some(c),
                    Err(mpsc::error::TryRecvError::Empty) => return Ok(Flow::Continue),
                    Err(mpsc::error::TryRecvError::Disconnected) => None,
                }
            };
            let Some(control) = control else {
                // Nobody can send Shutdown any more: stop as if asked to.
                return self.shutdown().await.map(Flow::Stop);
            };
            match control {
                Control::Pause => {
                    if !self.paused {
                        tracing::info!(step = self.step, "Paused.");
                    }
                    self.paused = true;
                }
                Control::Resume => {
                    if self.paused_by_policy {
                        self.tell(MONITOR, MonitorMsg::OperatorResumed);
                    }
                    if self.paused {
                        tracing::info!(step = self.step, "Resumed.");
                    }
                    self.paused = false;
                    self.paused_by_policy = false;
                    self.write_status("running");
                    return Ok(Flow::Continue);
                }
                Control::Checkpoint => {
                    if let Err(e) = self.checkpoint().await {
                        tracing::error!(error = %e, "Checkpoint on request failed.");
                    }
                }
                Control::Reload => self.reload().await,
                Control::Shutdown => return self.shutdown().await.map(Flow::Stop),
            }
            if !self.paused {
                return Ok(Flow::Continue);
            }
        }
    }

    /// Waits until the supervisor restarted the failed actor (then re-syncs) or gave up.
    async fn await_recovery(&mut self) -> anyhow::Result<Option<u8>> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let news = self.news.borrow().clone();
            match news {
                News::BudgetSpent { actor, reason } => {
                    return self.budget_spent(&actor, &reason).await.map(Some)
                }
                News::Restarted(n) if n > self.restarts => {
                    self.restarts = n;
                    self.sync_position().await?;
                    return Ok(None);
                }
                _ => {}
            }
            match tokio::time::timeout_at(deadline, self.news.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(anyhow!("the supervisor has stopped")),
                Err(_) => {
                    return Err(anyhow!(
                        "no actor was restarted within {:?} of a failed step",
                        self.timeout
                    ))
                }
            }
        }
    }

    /// Reads the trainer's step and lr (after start-up or a trainer restart).
    async fn sync_position(&mut self) -> anyhow::Result<()> {
        let (step, lr) = ask!(self, TRAINER, TrainerMsg::Position).map_err(|e| anyhow!("{e}"))?;
        if step != self.step {
            tracing::warn!(from = self.step, to = step, "The trainer restarted from an earlier checkpoint; steps since are redone with new examples.");
        }
        self.step = step;
        self.lr = lr;
        Ok(())
    }

    /// A changed `train.lr` since the checkpoint applies as a scale of the restored curve.
    async fn apply_configured_lr(&mut self) -> anyhow::Result<()> {
        let wanted = self.config.train.lr;
        if (wanted - self.peak_lr).abs() > f64::EPSILON * wanted {
            self.lr = ask!(self, TRAINER, TrainerMsg::ScaleLr, wanted / self.peak_lr)
                .map_err(|e| anyhow!("{e}"))?;
            tracing::info!(
                from = self.peak_lr,
                to = wanted,
                "train.lr changed since the checkpoint; applied."
            );
            self.peak_lr = wanted;
        }
        Ok(())
    }

    async fn one_step(&mut self) -> Result<(), CallError> {
        let batch = ask!(self, MIXER, MixerMsg::NextBatch)?.map_err(CallError::Down)?;
        let examples = batch.examples;
        let outcome = ask!(self, TRAINER, TrainerMsg::TrainOn, examples.clone())?;
        match outcome {
            StepOutcome::Trained(report) => {
                telemetry::record_step(&report);
                let _ = systemd::watchdog();
                self.step = report.step;
                self.last_loss = Some(report.loss);
                self.lr = report.lr;
                self.trained
                    .append(TrainedStep {
                        step: report.step,
                        examples,
                    })
                    .map_err(|e| CallError::Failed(format!("{e:#}")))?;
                self.status_line(&report);
            }
            StepOutcome::Skipped { reason, non_finite } => {
                self.skipped += 1;
                tracing::warn!(step = self.step + 1, %reason, "Step skipped.");
                if non_finite {
                    telemetry::record_non_finite_step();
                    self.tell(MONITOR, MonitorMsg::NonFiniteStep);
                }
                return Ok(());
            }
        }
        self.write_status("running");
        if self.step % self.config.checkpoint.every_n_steps == 0 || self.checkpoint_soon {
            self.checkpoint_soon = false;
            self.checkpoint()
                .await
                .map_err(|e| CallError::Down(format!("{e:#}")))?;
        }
        if self.step % self.eval_every == 0 {
            self.evaluate_and_act()
                .await
                .map_err(|e| CallError::Down(format!("{e:#}")))?;
        }
        Ok(())
    }

    /// Sends without waiting (the target may be restarting; then the message is lost,
    /// which every such message tolerates).
    fn tell<M: ractor::Message>(&self, name: &str, msg: M) {
        if let Ok(a) = actor::<M>(name) {
            let _ = a.cast(msg);
        }
    }

    fn record(&self, event: Event) {
        let mut log = self.events.lock().expect("event log lock");
        if let Err(e) = log.record(self.step, event) {
            tracing::error!(error = %e, "Could not record an event.");
        }
    }

    /// Writes a checkpoint of the current weights with everything the loop resumes with.
    async fn checkpoint(&mut self) -> anyhow::Result<()> {
        let ledger_position = ask!(self, GENERATOR, GeneratorMsg::Sync)
            .map_err(|e| anyhow!("{e}"))?
            .map_err(|e| anyhow!(e))?;
        ask!(self, LABELER, LabelerMsg::SaveCursor)
            .map_err(|e| anyhow!("{e}"))?
            .map_err(|e| anyhow!(e))?;
        let (mixer, replay_ratio) =
            ask!(self, MIXER, MixerMsg::State).map_err(|e| anyhow!("{e}"))?;
        let policy = ask!(self, MONITOR, MonitorMsg::State).map_err(|e| anyhow!("{e}"))?;
        let cursor_path = self.config.state_dir.join("convo-cursor.json");
        let convo_cursor = std::fs::read(&cursor_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let run = RunState {
            step: self.step,
            mixer,
            replay_ratio,
            policy: policy.clone(),
            peak_lr: self.peak_lr,
            phase: self.phase,
            eval_every_n_steps: self.eval_every,
            ledger_position,
            convo_cursor,
        };
        {
            let mut shared = self.shared.lock().expect("shared state lock");
            shared.policy_state = policy;
            shared.mixer = Some((mixer, replay_ratio));
        }
        match ask!(self, CHECKPOINTER, CheckpointerMsg::Save, Box::new(run))
            .map_err(|e| anyhow!("{e}"))?
        {
            Ok(info) => {
                telemetry::record_checkpoint_write(Some(info.bytes), info.seconds);
                self.latest = Some(self.step);
                tracing::info!(
                    step = self.step,
                    bytes = info.bytes,
                    seconds = info.seconds,
                    "Checkpoint written."
                );
                Ok(())
            }
            Err(error) => {
                telemetry::record_checkpoint_write(None, 0.0);
                tracing::error!(step = self.step, %error, "Checkpoint failed; the previous ones are intact.");
                self.record(Event::CheckpointFailed { error });
                if self.config.checkpoint.on_write_error == OnWriteError::Pause && !self.paused {
                    tracing::error!(
                        step = self.step,
                        "Paused after the failed checkpoint ([checkpoint] on_write_error = \"pause\"); \
                         `dreamloop resume` continues once the disk is fixed."
                    );
                    self.paused = true;
                }
                Ok(())
            }
        }
    }

    /// Evaluates the current weights and carries out the verdict; after a rollback the
    /// restored GOOD weights are evaluated again (the policy re-measures its baseline).
    async fn evaluate_and_act(&mut self) -> anyhow::Result<()> {
        loop {
            let ev: Evaluation = ask!(self, MONITOR, MonitorMsg::Evaluate, self.step)
                .map_err(|e| anyhow!("{e}"))?
                .map_err(|e| anyhow!(e))?;
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
                seconds: ev.report.seconds,
            });
            let after = ev.before.apply(
                &ev.record,
                &ev.verdict,
                &self.shared.lock().expect("lock").policy,
            );
            telemetry::record_eval(&ev.record.metrics, ev.report.seconds);
            telemetry::record_probe(
                "arithmetic",
                ev.report.arithmetic.accuracy,
                ev.report.arithmetic.margin,
            );
            telemetry::record_probe("code", ev.report.code.accuracy, ev.report.code.margin);
            for (i, ratio) in ev.report.attention_per_layer.iter().enumerate() {
                let layer = ev.report.attention_layers.get(i).copied().unwrap_or(i);
                telemetry::record_layer_attention(layer, *ratio);
            }
            telemetry::record_verdict(&ev.verdict, &after);
            let _ = systemd::watchdog();
            self.shared.lock().expect("shared state lock").policy_state = after;
            match ev.verdict {
                Verdict::Keep { .. } => return Ok(()),
                Verdict::MarkGood { step } => {
                    if self.latest != Some(step) {
                        self.checkpoint().await?;
                    }
                    if self.latest != Some(step) {
                        // Its checkpoint could not be written (disk): the GOOD on disk
                        // stays the rollback target, and the policy forgets this verdict.
                        tracing::warn!(
                            step,
                            "Not marked GOOD: its checkpoint could not be written."
                        );
                        self.tell(MONITOR, MonitorMsg::Revert(ev.before.clone()));
                        self.shared.lock().expect("shared state lock").policy_state = ev.before;
                        return Ok(());
                    }
                    ask!(self, CHECKPOINTER, CheckpointerMsg::MarkGood, step)
                        .map_err(|e| anyhow!("{e}"))?
                        .map_err(|e| anyhow!(e))?;
                    self.trained.mark_good(step);
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
                    let (quarantined, restored_digest) =
                        self.roll_back(to, Some(adjustments)).await?;
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
                        self.roll_back(to, None).await?;
                    }
                    self.record(Event::PauseByPolicy {
                        reason,
                        rolled_back_to: rollback_to,
                    });
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

    /// Restores GOOD `to` bit for bit, applies the adjustments, quarantines the abandoned
    /// steps' examples; answers how many were quarantined and the restored weights' sha256.
    async fn roll_back(
        &mut self,
        to: u64,
        adjustments: Option<Adjustments>,
    ) -> anyhow::Result<(usize, String)> {
        let from = self.step;
        let (dir, good_run) = ask!(self, CHECKPOINTER, CheckpointerMsg::RollbackTo, to)
            .map_err(|e| anyhow!("{e}"))?
            .map_err(|e| anyhow!(e))?;
        let step = ask!(self, TRAINER, TrainerMsg::RestoreFrom, dir.clone())
            .map_err(|e| anyhow!("{e}"))?
            .map_err(|e| anyhow!(e))?;
        self.step = step;
        self.latest = Some(step);
        let restored_digest = self.verify_restore(&dir).await?;
        // The restored curve carries the GOOD checkpoint's multiplier; move it to the
        // policy's new factor and to any lr reloaded since.
        let mut factor = self.peak_lr / good_run.peak_lr;
        if let Some(adj) = adjustments {
            factor *= adj.lr_factor / good_run.policy.lr_factor;
            ask!(self, MIXER, MixerMsg::SetReplayRatio, adj.replay_ratio)
                .map_err(|e| anyhow!("{e}"))?
                .map_err(|e| anyhow!(e))?;
        }
        self.lr = ask!(self, TRAINER, TrainerMsg::ScaleLr, factor).map_err(|e| anyhow!("{e}"))?;
        self.checkpoint_soon = true;
        let gone = self.trained.roll_back(to);
        let count = ask!(
            self,
            CHECKPOINTER,
            CheckpointerMsg::Quarantine,
            gone,
            from,
            to
        )
        .map_err(|e| anyhow!("{e}"))?
        .map_err(|e| anyhow!(e))?;
        Ok((count, restored_digest))
    }

    /// Compares the digest of the restored weights in the trainer's memory with the GOOD
    /// checkpoint's weight files' ([`WeightsDigest`]): a mismatch means the restore was not
    /// bit-exact. Nothing is written; each side is read one tensor at a time.
    async fn verify_restore(&self, good_dir: &Path) -> anyhow::Result<String> {
        let restored = ask!(self, TRAINER, TrainerMsg::WeightsDigest)
            .map_err(|e| anyhow!("{e}"))?
            .map_err(|e| anyhow!(e))?;
        let good = WeightsDigest::of_dir(good_dir)?;
        if restored != good {
            anyhow::bail!(
                "restored weights differ from the GOOD checkpoint {} (weights digest {restored} ≠ {good})",
                good_dir.display()
            );
        }
        Ok(restored)
    }

    /// Re-reads the config file and applies its hot settings.
    async fn reload(&mut self) {
        let Some(path) = self.opts.config_path.clone() else {
            tracing::warn!("Reload requested, but the daemon was started without --config; nothing to re-read.");
            return;
        };
        let new = match DreamConfig::load(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "Reload: the config file is invalid; keeping the current settings.");
                return;
            }
        };
        let cold = new.cold_differences(&self.config);
        if !cold.is_empty() {
            tracing::warn!(sections = ?cold, "Reload: these settings need a restart and were not applied.");
        }
        let hot = new.hot();
        if (hot.lr - self.peak_lr).abs() > f64::EPSILON * hot.lr {
            match ask!(self, TRAINER, TrainerMsg::ScaleLr, hot.lr / self.peak_lr) {
                Ok(lr) => {
                    tracing::info!(
                        from = self.peak_lr,
                        to = hot.lr,
                        next_lr = lr,
                        "Reload: learning rate changed."
                    );
                    self.peak_lr = hot.lr;
                    self.lr = lr;
                }
                Err(e) => {
                    tracing::error!(error = %e, "Reload: could not change the learning rate.")
                }
            }
        }
        match ask!(self, MIXER, MixerMsg::SetReplayRatio, hot.replay_ratio) {
            Ok(Ok(())) => self.tell(MONITOR, MonitorMsg::SetReplayRatio(hot.replay_ratio)),
            Ok(Err(e)) | Err(CallError::Failed(e)) => {
                tracing::error!(error = %e, "Reload: replay ratio refused.")
            }
            Err(e) => tracing::error!(error = %e, "Reload: could not change the replay ratio."),
        }
        self.eval_every = hot.eval_every_n_steps;
        self.tell(MONITOR, MonitorMsg::SetPolicy(hot.rollback.clone()));
        self.shared.lock().expect("shared state lock").policy = hot.rollback;
        if hot.phase != self.phase {
            self.tell(LABELER, LabelerMsg::SetPhase(hot.phase));
            self.record(Event::PhaseChange {
                from: format!("{:?}", self.phase).to_lowercase(),
                to: format!("{:?}", hot.phase).to_lowercase(),
            });
            self.phase = hot.phase;
        }
        tracing::info!(
            lr = self.peak_lr,
            eval_every = self.eval_every,
            "Reloaded hot settings."
        );
        self.write_status(if self.paused { "paused" } else { "running" });
    }

    async fn shutdown(&mut self) -> anyhow::Result<u8> {
        let _ = systemd::stopping();
        self.write_status("stopping");
        if self.latest != Some(self.step) {
            self.checkpoint().await?;
        }
        self.write_status("stopped");
        tracing::info!(step = self.step, "Stopped cleanly.");
        Ok(0)
    }

    async fn budget_spent(&mut self, actor_name: &str, reason: &str) -> anyhow::Result<u8> {
        tracing::error!(actor = actor_name, %reason, "Restart budget spent; stopping.");
        self.record(Event::Alarm {
            name: "restart_budget_spent".into(),
            message: format!(
                "{actor_name} failed more than {} times in {} s: {reason}",
                self.config.supervisor.max_restarts, self.config.supervisor.window_seconds
            ),
        });
        if actor_name != TRAINER && self.latest != Some(self.step) {
            if let Err(e) = self.checkpoint().await {
                tracing::error!(error = %e, "Final checkpoint failed.");
            }
        }
        self.write_status("failed");
        Ok(EXIT_BUDGET_SPENT)
    }

    fn write_status(&self, state: &str) {
        let (good, replay_ratio) = {
            let shared = self.shared.lock().expect("shared state lock");
            (
                shared.policy_state.good_step,
                shared.policy_state.replay_ratio,
            )
        };
        let status = Status {
            state: state.into(),
            pid: std::process::id(),
            step: self.step,
            phase: self.phase,
            paused: self.paused,
            paused_by_policy: self.paused_by_policy,
            lr: self.lr,
            replay_ratio,
            good_step: good,
            latest_step: self.latest,
            last_eval: self.last_eval.clone(),
            last_rollback: self.last_rollback.clone(),
            restarts: self.restarts,
            skipped_steps: self.skipped,
            updated: rfc3339_utc(std::time::SystemTime::now()),
        };
        if let Err(e) = status.write(&self.config.state_dir) {
            tracing::warn!(error = %e, "Could not write status.json.");
        }
        telemetry::set_paused(self.paused, self.paused_by_policy);
        let _ = systemd::status(&format!(
            "{state}: step {} lr {:.2e} replay {:.2}",
            self.step, self.lr, replay_ratio
        ));
    }

    fn status_line(&mut self, report: &dreamloop::train::trainer::StepReport) {
        let line = format!(
            "step {} loss {:.4} lr {:.2e} grad_norm {:.3} {:.0} tok/s",
            report.step,
            report.loss,
            report.lr,
            report.grad_norm,
            report.tokens as f64 / report.seconds.max(1e-9)
        );
        if self.tty {
            eprint!("\r{line}\x1b[K");
        }
        if self.last_status_line.elapsed()
            >= Duration::from_secs(self.config.supervisor.status_every_seconds)
        {
            self.last_status_line = Instant::now();
            if self.tty {
                eprintln!();
            }
            tracing::info!(
                step = report.step,
                loss = self.last_loss,
                lr = report.lr,
                paused = self.paused,
                restarts = self.restarts,
                "Status."
            );
        }
    }
}

/// Start-up arguments of the supervisor.
pub struct SupervisorArgs {
    config: Arc<DreamConfig>,
    shared: Arc<Mutex<Shared>>,
    events: Arc<Mutex<EventLog>>,
    news: watch::Sender<News>,
    timeout: Duration,
    /// Where the first trainer starts (restarts start from LATEST).
    first_start: Start,
}

/// The supervisor's state: its arguments plus the restart history per actor.
pub struct SupervisorState {
    args: SupervisorArgs,
    /// Failure times per actor within the window.
    failures: HashMap<String, VecDeque<Instant>>,
    restarts: u32,
    /// Set once a budget is spent: later terminations are not failures to act on.
    gave_up: bool,
}

/// Spawns and restarts the pipeline's actors (see the module docs).
pub struct SupervisorActor;

impl Actor for SupervisorActor {
    type Msg = ();
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let state = SupervisorState {
            args,
            failures: HashMap::new(),
            restarts: 0,
            gave_up: false,
        };
        for name in PIPELINE {
            spawn_child(name, &state.args, myself.get_cell(), true).await?;
        }
        Ok(state)
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, error) => (cell, format!("{error}")),
            _ => return Ok(()),
        };
        let name = cell.get_name().unwrap_or_else(|| "unnamed".into());
        if state.gave_up {
            return Ok(());
        }
        tracing::error!(actor = %name, %reason, "Actor failed.");
        let cfg = &state.args.config.supervisor;
        let window = Duration::from_secs(cfg.window_seconds);
        let now = Instant::now();
        let history = state.failures.entry(name.clone()).or_default();
        history.retain(|t| now.duration_since(*t) < window);
        history.push_back(now);
        let attempt = history.len() as u32;
        if attempt > cfg.max_restarts {
            state.gave_up = true;
            let _ = state.args.news.send(News::BudgetSpent {
                actor: name,
                reason,
            });
            return Ok(());
        }
        if let Err(e) = spawn_child(&name, &state.args, myself.get_cell(), false).await {
            state.gave_up = true;
            let _ = state.args.news.send(News::BudgetSpent {
                actor: name,
                reason: format!("restart failed: {e}"),
            });
            return Ok(());
        }
        state.restarts += 1;
        telemetry::actor_restarted(&name);
        {
            let mut log = state.args.events.lock().expect("event log lock");
            let _ = log.record(
                0,
                Event::Restart {
                    actor: name.clone(),
                    attempt,
                    reason: reason.clone(),
                },
            );
        }
        tracing::warn!(actor = %name, attempt, "Actor restarted.");
        let _ = state.args.news.send(News::Restarted(state.restarts));
        Ok(())
    }
}

/// The checkpoint LATEST names, if any (a restarted trainer resumes from it).
fn latest_checkpoint(state_dir: &Path) -> Option<PathBuf> {
    let dir = state_dir.join(CHECKPOINTS_DIR);
    let text = std::fs::read_to_string(dir.join(LATEST_POINTER)).ok()?;
    let name = text.trim();
    let step = dreamloop::checkpoint::parse_step_dir_name(name)?;
    let path = dir.join(step_dir_name(step));
    path.is_dir().then_some(path)
}

/// Spawns the actor `name`, linked to the supervisor, with the arguments it (re)starts with.
async fn spawn_child(
    name: &str,
    args: &SupervisorArgs,
    supervisor: ActorCell,
    first: bool,
) -> anyhow::Result<()> {
    let config = args.config.clone();
    let timeout = args.timeout;
    let state_dir = config.state_dir.clone();
    let shared = args.shared.lock().expect("shared state lock").clone();
    let spawned = match name {
        GENERATOR => Actor::spawn_linked(
            Some(name.into()),
            GeneratorActor,
            GeneratorArgs {
                config,
                ledger_dir: state_dir.join("ledger"),
            },
            supervisor,
        )
        .await
        .map(|(a, _)| a.get_cell()),
        LABELER => Actor::spawn_linked(
            Some(name.into()),
            LabelerActor,
            LabelerArgs {
                config,
                cursor_path: state_dir.join("convo-cursor.json"),
                call_timeout: timeout,
            },
            supervisor,
        )
        .await
        .map(|(a, _)| a.get_cell()),
        MIXER => Actor::spawn_linked(
            Some(name.into()),
            MixerActor,
            MixerArgs {
                config,
                resume: shared.mixer,
                call_timeout: timeout,
            },
            supervisor,
        )
        .await
        .map(|(a, _)| a.get_cell()),
        TRAINER => {
            let start = if first {
                args.first_start.clone()
            } else {
                latest_checkpoint(&state_dir).map_or(Start::Fresh, Start::Restore)
            };
            Actor::spawn_linked(
                Some(name.into()),
                TrainerActor,
                TrainerArgs { config, start },
                supervisor,
            )
            .await
            .map(|(a, _)| a.get_cell())
        }
        MONITOR => Actor::spawn_linked(
            Some(name.into()),
            MonitorActor,
            MonitorArgs {
                policy: shared.policy,
                state: shared.policy_state,
                call_timeout: timeout,
            },
            supervisor,
        )
        .await
        .map(|(a, _)| a.get_cell()),
        CHECKPOINTER => Actor::spawn_linked(
            Some(name.into()),
            CheckpointerActor,
            CheckpointerArgs {
                config,
                call_timeout: timeout,
            },
            supervisor,
        )
        .await
        .map(|(a, _)| a.get_cell()),
        other => return Err(anyhow!("no actor named {other}")),
    };
    spawned
        .map(|_| ())
        .map_err(|e| anyhow!("spawning {name}: {e}"))
}
