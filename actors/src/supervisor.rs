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
//! Every call between actors goes through `call.rs` with `[supervisor]
//! call_timeout_seconds`; a failure is transient (retried, counted against the restart
//! budget) or persistent (the loop stops cleanly, exit 78). A failed final checkpoint exits
//! 74; a pause ordered by the rollback policy is kept in `paused-by-policy.json` across
//! restarts.

use std::collections::{HashMap, VecDeque};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use dreamloop::checkpoint::{
    step_dir_name, CheckpointStore, RetentionPolicy, CHECKPOINTS_DIR, LATEST_POINTER,
};
use dreamloop::config::{DreamConfig, OnWriteError};
use dreamloop::events::{rfc3339_utc, Event, EventLog};
use dreamloop::example::Example;
use dreamloop::label::Phase;
use dreamloop::mix::MixerState;
use dreamloop::model::weights::WeightsDigest;
use dreamloop::rollback::{rescaled_lr_factor, Policy, PolicyState, Verdict};
use dreamloop::train::resume::{reconcile, SettingChange};
use dreamloop::train::trainer::TrainerState;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::{mpsc, watch};

use crate::call::{self, CallError, Pending, ReplyError, Severity};
use crate::checkpointer::{
    read_run_state, CheckpointerActor, CheckpointerArgs, CheckpointerMsg, SaveInfo,
};
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
/// Exit status when the final checkpoint could not be written (EX_IOERR): the steps since
/// LATEST are lost.
pub const EXIT_FINAL_CHECKPOINT_FAILED: u8 = 74;
/// Exit status after a persistent error (EX_CONFIG, as for a refused setting): the operator
/// must fix its cause (see `call.rs` for which errors are persistent).
pub const EXIT_PERSISTENT: u8 = 78;
/// Registered name of the supervisor actor.
pub const SUPERVISOR: &str = "supervisor";
/// `<state_dir>/paused-by-policy.json`: present while the rollback policy's pause waits for
/// an operator, so that a restart stays paused (removed by `dreamloop resume`).
pub const POLICY_PAUSE_FILE: &str = "paused-by-policy.json";

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
    if let Some(c) = &resume {
        let refused = refused_train_changes(&config, &c.path)?;
        if !refused.is_empty() {
            for change in &refused {
                tracing::error!(
                    field = change.field,
                    checkpoint = %change.saved,
                    configured = %change.configured,
                    "This [train] setting cannot change on resume."
                );
            }
            let fields: Vec<&str> = refused.iter().map(|c| c.field).collect();
            tracing::error!(
                step = c.step,
                path = %c.path.display(),
                fields = %fields.join(", "),
                "Not starting: the checkpoint was trained with other values of settings that are \
                 bound to its state. Set them back to the checkpoint's values, or start from a \
                 fresh state directory."
            );
            return Ok(EXIT_PERSISTENT);
        }
    }
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
    let cancel_eval = Arc::new(AtomicBool::new(false));
    let sup_args = SupervisorArgs {
        cancel_eval: cancel_eval.clone(),
        config: config.clone(),
        shared: shared.clone(),
        events: events.clone(),
        news: news_tx,
        timeout,
        first_start: resume
            .as_ref()
            .map_or(Start::Fresh, |c| Start::Restore(c.path.clone())),
    };
    let (supervisor, handle) = Actor::spawn(Some(SUPERVISOR.into()), SupervisorActor, sup_args)
        .await
        .map_err(|e| anyhow!("starting the actors: {e}"))?;

    let resumed_step = resume.as_ref().map_or(0, |c| c.step);
    let policy_paused = state_dir.join(POLICY_PAUSE_FILE).exists();
    if policy_paused {
        tracing::warn!(
            path = %state_dir.join(POLICY_PAUSE_FILE).display(),
            "The rollback policy paused training before this start; still paused. \
             `dreamloop resume` continues."
        );
    }
    let mut driver = Driver {
        trained: TrainedLog::open(
            &state_dir,
            resumed_step,
            config.supervisor.trained_segment_bytes,
        )?,
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
        paused_by_policy: policy_paused,
        lr: 0.0,
        last_eval: None,
        last_rollback: None,
        restarts: 0,
        skipped: 0,
        non_finite_since_eval: 0,
        last_status_line: Instant::now(),
        tty: std::io::stderr().is_terminal(),
        last_loss: None,
        checkpoint_soon: false,
        deferred: VecDeque::new(),
        control_closed: false,
        stopping: false,
        cancel_eval,
        paused_ping: systemd::watchdog_interval()
            .map(|d| d / 2)
            .unwrap_or(Duration::from_secs(5))
            .min(Duration::from_secs(5)),
    };
    driver.paused = driver.opts.paused || policy_paused;
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

/// The `[train]` changes since the checkpoint in `dir` that a resume cannot make (see
/// `dreamloop::train::resume`); the applicable ones are applied and logged by the trainer.
fn refused_train_changes(config: &DreamConfig, dir: &Path) -> anyhow::Result<Vec<SettingChange>> {
    let path = dir.join("trainer_state.json");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let saved: TrainerState =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let configured = config.trainer_config(saved.config.pad_id);
    Ok(reconcile(&saved.config, &configured).refused)
}

/// Why a step (or what it carries out) failed.
#[derive(Debug, thiserror::Error)]
enum StepError {
    /// A call to an actor failed (transient or persistent, see `call.rs`).
    #[error(transparent)]
    Call(#[from] CallError),
    /// The loop's own work failed (`trained.jsonl`, a restore that is not bit-exact):
    /// persistent.
    #[error("{0:#}")]
    Local(anyhow::Error),
}

impl StepError {
    fn severity(&self) -> Severity {
        match self {
            StepError::Call(e) => e.severity(),
            StepError::Local(_) => Severity::Persistent,
        }
    }
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
    /// Non-finite steps skipped since the last evaluation (a storm triggers one).
    non_finite_since_eval: u32,
    last_status_line: Instant,
    tty: bool,
    last_loss: Option<f64>,
    /// Set by a rollback: checkpoint after the next step instead of waiting for the cadence.
    /// The rollback's lr, replay ratio and policy memory live in the trainer and the actors
    /// until a checkpoint carries them; a crash before it resumes from GOOD with GOOD's
    /// settings (the quarantine is on disk already), so that window is kept to one step.
    checkpoint_soon: bool,
    /// Control that arrived while the loop waited on an actor, for the next step boundary.
    deferred: VecDeque<Control>,
    /// The control channel has no sender any more (a Shutdown was deferred for it).
    control_closed: bool,
    /// Set by a shutdown: a failed checkpoint is then final, not a reason to pause.
    stopping: bool,
    /// Cancels the trainer's evaluation in progress (set by a Shutdown while waiting).
    cancel_eval: Arc<AtomicBool>,
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
    async fn run_loop(&mut self) -> Result<u8, StepError> {
        self.sync_position().await?;
        let abandoned = self.trained.take_abandoned();
        if !abandoned.is_empty() {
            self.requeue(abandoned).await?;
            self.trained.rewind(self.step).map_err(StepError::Local)?;
        }
        self.apply_configured_lr().await?;
        let needs_baseline = {
            let shared = self.shared.lock().expect("shared state lock");
            shared.policy_state.baseline.is_none() || shared.policy_state.remeasure
        };
        if needs_baseline {
            // The verdict's checkpoint (MarkGood) is written by the evaluation itself.
            if let Err(e) = self.evaluate_and_act().await {
                if let Some(code) = self.recover(e).await? {
                    return Ok(code);
                }
            }
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
            if let Err(e) = self.one_step().await {
                if let Some(code) = self.recover(e).await? {
                    return Ok(code);
                }
            }
        }
    }

    /// Acts on a failed step by the rule in `call.rs`: a persistent error stops cleanly; a
    /// crashed actor is waited for (the supervisor restarts it); any other transient
    /// failure counts against the actor's restart budget and the step is tried again.
    /// `Some(code)` when the loop must stop.
    async fn recover(&mut self, error: StepError) -> Result<Option<u8>, StepError> {
        let news = self.news.borrow().clone();
        if let News::BudgetSpent { actor, reason } = news {
            return self.budget_spent(&actor, &reason).await.map(Some);
        }
        if error.severity() == Severity::Persistent {
            return self.stop_persistent(&error).await.map(Some);
        }
        match &error {
            StepError::Call(CallError::NotRunning { .. } | CallError::Gone { .. }) => {
                tracing::warn!(error = %error, "A step failed; waiting for the supervisor.");
                self.await_recovery().await
            }
            StepError::Call(e) => {
                let actor = e.actor();
                if self.count_failure(actor, &e.to_string()).await {
                    tracing::warn!(error = %e, "A step failed on a transient error; counted against the restart budget, trying again.");
                    Ok(None)
                } else {
                    let reason = e.to_string();
                    self.budget_spent(actor, &reason).await.map(Some)
                }
            }
            StepError::Local(_) => unreachable!("local errors are persistent"),
        }
    }

    /// Stops after a persistent error: alarm, final checkpoint if it can be written, exit 78.
    async fn stop_persistent(&mut self, error: &StepError) -> Result<u8, StepError> {
        tracing::error!(
            error = %error,
            "Stopping: this error is persistent, retrying would repeat it. Fix its cause and start again."
        );
        self.record(Event::Alarm {
            name: "persistent_error".into(),
            message: error.to_string(),
        });
        let _ = systemd::stopping();
        self.stopping = true;
        if self.latest != Some(self.step) {
            match self.checkpoint().await {
                Ok(true) => {}
                Ok(false) => tracing::error!("The final checkpoint failed as well."),
                Err(e) => tracing::error!(error = %e, "The final checkpoint failed as well."),
            }
        }
        self.write_status("failed");
        Ok(EXIT_PERSISTENT)
    }

    /// The next control: one that arrived while the loop waited on an actor first.
    fn try_control(&mut self) -> Option<Option<Control>> {
        if let Some(c) = self.deferred.pop_front() {
            return Some(Some(c));
        }
        if self.control_closed {
            return Some(None);
        }
        match self.control.try_recv() {
            Ok(c) => Some(Some(c)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
        }
    }

    /// Handles control and supervisor news at a step boundary; blocks while paused. Every
    /// pending control is handled before a step is taken, so a Resume that follows a
    /// Shutdown (a stop sends SIGTERM then SIGCONT) cannot start one.
    async fn boundary(&mut self) -> Result<Flow, StepError> {
        let news = self.news.borrow().clone();
        if let News::BudgetSpent { actor, reason } = news {
            return self.budget_spent(&actor, &reason).await.map(Flow::Stop);
        }
        loop {
            let control = match self.try_control() {
                Some(c) => c,
                None if !self.paused => return Ok(Flow::Continue),
                None => {
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
                        let marker = self.config.state_dir.join(POLICY_PAUSE_FILE);
                        if let Err(e) = std::fs::remove_file(&marker) {
                            tracing::warn!(path = %marker.display(), error = %e, "Could not remove the policy-pause marker.");
                        }
                    }
                    if self.paused {
                        tracing::info!(step = self.step, "Resumed.");
                    }
                    self.paused = false;
                    self.paused_by_policy = false;
                    self.write_status("running");
                }
                Control::Checkpoint => match self.checkpoint().await {
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "Checkpoint on request failed."),
                },
                Control::Reload => self.reload().await,
                Control::Shutdown => return self.shutdown().await.map(Flow::Stop),
            }
        }
    }

    /// Waits until the supervisor restarted the failed actor (then re-syncs) or gave up.
    async fn await_recovery(&mut self) -> Result<Option<u8>, StepError> {
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
                Ok(Err(_)) => return Err(StepError::Local(anyhow!("the supervisor has stopped"))),
                Err(_) => {
                    return Err(StepError::Local(anyhow!(
                        "no actor was restarted within {:?} of a failed step",
                        self.timeout
                    )))
                }
            }
        }
    }

    /// Counts a failure that is not a crash against `actor`'s restart budget; false when
    /// the budget is spent (the supervisor has then sent `BudgetSpent`).
    async fn count_failure(&self, actor: &'static str, reason: &str) -> bool {
        let reason = reason.to_string();
        call::call(SUPERVISOR, self.timeout, |reply| {
            SupervisorMsg::CountFailure {
                actor,
                reason,
                reply,
            }
        })
        .await
        .unwrap_or(false)
    }

    /// Keeps a control that arrived during a call for the next step boundary; a Shutdown
    /// also cancels an evaluation in progress, so that it is acted on promptly.
    fn defer(&mut self, control: Option<Control>) {
        let control = control.unwrap_or_else(|| {
            self.control_closed = true;
            Control::Shutdown
        });
        if control == Control::Shutdown {
            self.cancel_eval.store(true, Ordering::SeqCst);
        }
        self.deferred.push_back(control);
    }

    /// Awaits a sent request's answer in slices of the call timeout. A slice without an
    /// answer is a transient failure counted against the callee's restart budget; the
    /// wait goes on while the budget lasts (a slow evaluation on a loaded machine is not
    /// fatal), and ends with `Timeout` once it is spent. Control arriving meanwhile is kept
    /// for the next step boundary.
    async fn wait<T>(&mut self, mut pending: Pending<T>) -> Result<T, CallError> {
        enum Woke<T> {
            Answer(Option<T>),
            Slice,
            Control(Option<Control>),
        }
        let actor = pending.actor;
        let mut waited = Duration::ZERO;
        let mut slice_end = tokio::time::Instant::now() + self.timeout;
        loop {
            let listen = !self.control_closed;
            let woke = tokio::select! {
                answer = &mut pending.answer => Woke::Answer(answer.ok()),
                _ = tokio::time::sleep_until(slice_end) => Woke::Slice,
                c = self.control.recv(), if listen => Woke::Control(c),
            };
            match woke {
                Woke::Answer(Some(answer)) => return Ok(answer),
                Woke::Answer(None) => return Err(CallError::Gone { actor }),
                Woke::Control(c) => self.defer(c),
                Woke::Slice => {
                    waited += self.timeout;
                    let reason = format!("no answer within {waited:?}");
                    tracing::warn!(
                        actor,
                        ?waited,
                        "A call is slow; counted against the restart budget, still waiting."
                    );
                    if !self.count_failure(actor, &reason).await {
                        return Err(CallError::Timeout {
                            actor,
                            timeout: waited,
                        });
                    }
                    slice_end = tokio::time::Instant::now() + self.timeout;
                }
            }
        }
    }

    /// Calls the actor registered as `name` (lookup, send, [`Driver::wait`]).
    async fn ask<M: ractor::Message, T: Send + 'static>(
        &mut self,
        name: &'static str,
        build: impl FnOnce(RpcReplyPort<T>) -> M,
    ) -> Result<T, CallError> {
        let pending = call::send(name, build)?;
        self.wait(pending).await
    }

    /// [`Driver::ask`] for an actor that answers `Result<T, ReplyError>`.
    async fn try_ask<M: ractor::Message, T: Send + 'static>(
        &mut self,
        name: &'static str,
        build: impl FnOnce(RpcReplyPort<Result<T, ReplyError>>) -> M,
    ) -> Result<T, CallError> {
        let answer = self.ask(name, build).await;
        call::flatten(name, answer)
    }

    /// Reads the trainer's step and lr (after start-up or a trainer restart).
    async fn sync_position(&mut self) -> Result<(), StepError> {
        let (step, lr) = self.ask(TRAINER, TrainerMsg::Position).await?;
        if step != self.step {
            tracing::warn!(from = self.step, to = step, "The trainer restarted from an earlier checkpoint; the examples of the steps since are queued again.");
            let abandoned = self
                .trained
                .roll_back(step, self.step)
                .map_err(StepError::Local)?;
            self.requeue(abandoned).await?;
            self.trained.rewind(step).map_err(StepError::Local)?;
        }
        self.step = step;
        self.lr = lr;
        Ok(())
    }

    /// Queues the examples of `steps` again (see [`LabelerMsg::Requeue`]).
    async fn requeue(&mut self, steps: Vec<TrainedStep>) -> Result<(), StepError> {
        let examples: Vec<Example> = steps.into_iter().flat_map(|s| s.examples).collect();
        if examples.is_empty() {
            return Ok(());
        }
        let n = examples.len();
        let queued = self
            .try_ask(LABELER, |reply| LabelerMsg::Requeue(examples, reply))
            .await?;
        tracing::info!(
            examples = n,
            queued,
            "Examples of steps lost with the weights are queued again."
        );
        Ok(())
    }

    /// A changed `train.lr` since the checkpoint applies as a scale of the restored curve.
    async fn apply_configured_lr(&mut self) -> Result<(), StepError> {
        let wanted = self.config.train.lr;
        if (wanted - self.peak_lr).abs() > f64::EPSILON * wanted {
            let factor = wanted / self.peak_lr;
            self.lr = self
                .ask(TRAINER, |reply| TrainerMsg::ScaleLr(factor, reply))
                .await?;
            tracing::info!(
                from = self.peak_lr,
                to = wanted,
                "train.lr changed since the checkpoint; applied."
            );
            self.peak_lr = wanted;
        }
        Ok(())
    }

    async fn one_step(&mut self) -> Result<(), StepError> {
        let batch = self.try_ask(MIXER, MixerMsg::NextBatch).await?;
        let examples = batch.examples;
        let sent = examples.clone();
        let outcome = self
            .ask(TRAINER, |reply| TrainerMsg::TrainOn(sent, reply))
            .await?;
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
                        rewind: false,
                    })
                    .map_err(StepError::Local)?;
                self.status_line(&report);
            }
            StepOutcome::Skipped { reason, non_finite } => {
                self.skipped += 1;
                tracing::warn!(step = self.step + 1, %reason, "Step skipped.");
                if non_finite {
                    telemetry::record_non_finite_step();
                    self.tell(MONITOR, MonitorMsg::NonFiniteStep);
                    // A skipped step does not advance the count, so a storm would never
                    // reach the next scheduled evaluation: judge the weights as soon as it is
                    // one (the policy's non-finite rule rolls back).
                    self.non_finite_since_eval += 1;
                    let bound = self
                        .shared
                        .lock()
                        .expect("shared state lock")
                        .policy
                        .max_non_finite_steps;
                    if self.non_finite_since_eval > bound {
                        tracing::warn!(
                            steps = self.non_finite_since_eval,
                            "A storm of non-finite steps: evaluating now."
                        );
                        self.evaluate_and_act().await?;
                    }
                }
                return Ok(());
            }
        }
        self.write_status("running");
        // Evaluate before the cadence checkpoint: a MarkGood writes this step's checkpoint
        // with the verdict in its state.json, and the cadence checkpoint is then done.
        if self.step % self.eval_every == 0 {
            self.evaluate_and_act().await?;
        }
        let due = self.step % self.config.checkpoint.every_n_steps == 0 || self.checkpoint_soon;
        if due && self.latest != Some(self.step) {
            self.checkpoint_soon = false;
            self.checkpoint().await?;
        }
        Ok(())
    }

    /// Sends without waiting (the target may be restarting; then the message is lost,
    /// which every such message tolerates).
    fn tell<M: ractor::Message>(&self, name: &'static str, msg: M) {
        if let Ok(a) = call::lookup::<M>(name) {
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
    /// `Ok(false)`: it could not be written (the disk refused; logged, an event, and a pause
    /// if `[checkpoint] on_write_error = "pause"` and the loop is not stopping); the previous
    /// checkpoints are intact. `Err`: an actor could not be reached.
    async fn checkpoint(&mut self) -> Result<bool, StepError> {
        match self.write_checkpoint().await {
            Ok(info) => {
                telemetry::record_checkpoint_write(Some(info.bytes), info.seconds);
                self.latest = Some(self.step);
                tracing::info!(
                    step = self.step,
                    bytes = info.bytes,
                    seconds = info.seconds,
                    "Checkpoint written."
                );
                Ok(true)
            }
            Err(e) if e.severity() == Severity::Transient => Err(e),
            Err(e) => {
                let error = e.to_string();
                telemetry::record_checkpoint_write(None, 0.0);
                tracing::error!(step = self.step, %error, "Checkpoint failed; the previous ones are intact.");
                self.record(Event::CheckpointFailed { error });
                if self.config.checkpoint.on_write_error == OnWriteError::Pause
                    && !self.paused
                    && !self.stopping
                {
                    tracing::error!(
                        step = self.step,
                        "Paused after the failed checkpoint ([checkpoint] on_write_error = \"pause\"); \
                         `dreamloop resume` continues once the disk is fixed."
                    );
                    self.paused = true;
                }
                Ok(false)
            }
        }
    }

    /// Gathers the run state from the actors and has the checkpointer save it with the
    /// weights. A failed write of the ledger or the cursor is a failed checkpoint.
    async fn write_checkpoint(&mut self) -> Result<SaveInfo, StepError> {
        let persistent = |actor: &'static str, e: String| {
            StepError::Call(CallError::Replied {
                actor,
                error: ReplyError::persistent(e),
            })
        };
        let ledger_position = self
            .ask(GENERATOR, GeneratorMsg::Sync)
            .await?
            .map_err(|e| persistent(GENERATOR, e))?;
        self.ask(LABELER, LabelerMsg::SaveCursor)
            .await?
            .map_err(|e| persistent(LABELER, e))?;
        let (mixer, replay_ratio) = self.ask(MIXER, MixerMsg::State).await?;
        let policy = self.ask(MONITOR, MonitorMsg::State).await?;
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
        Ok(self
            .try_ask(CHECKPOINTER, |reply| {
                CheckpointerMsg::Save(Box::new(run), reply)
            })
            .await?)
    }

    /// Evaluates the current weights and carries out the verdict; after a rollback the
    /// restored GOOD weights are evaluated again (the policy re-measures its baseline).
    async fn evaluate_and_act(&mut self) -> Result<(), StepError> {
        self.non_finite_since_eval = 0;
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
            let step = self.step;
            let ev: Evaluation = self
                .ask(MONITOR, |reply| {
                    MonitorMsg::Judge(step, Box::new(report), reply)
                })
                .await?;
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
            let after = ev.after.clone();
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
            self.shared.lock().expect("shared state lock").policy_state = after.clone();
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
                        self.tell(MONITOR, MonitorMsg::Revert(ev.before.clone()));
                        self.shared.lock().expect("shared state lock").policy_state = ev.before;
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
    async fn roll_back(
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
            let factor = hot.lr / self.peak_lr;
            match self
                .ask(TRAINER, |reply| TrainerMsg::ScaleLr(factor, reply))
                .await
            {
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
        let ratio = hot.replay_ratio;
        match self
            .try_ask(MIXER, |reply| MixerMsg::SetReplayRatio(ratio, reply))
            .await
        {
            Ok(()) => self.tell(MONITOR, MonitorMsg::SetReplayRatio(hot.replay_ratio)),
            Err(e) => tracing::error!(error = %e, "Reload: the replay ratio was not changed."),
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

    /// Checkpoints and stops: exit 0, or 74 when the final checkpoint could not be
    /// written (the steps since LATEST would be lost; the operator must know).
    async fn shutdown(&mut self) -> Result<u8, StepError> {
        let _ = systemd::stopping();
        self.stopping = true;
        self.write_status("stopping");
        if self.latest != Some(self.step) && !self.checkpoint().await? {
            tracing::error!(
                step = self.step,
                latest = ?self.latest,
                "Stopped, but the final checkpoint could not be written: the steps after LATEST \
                 are lost. Fix the disk; the next start resumes from LATEST."
            );
            self.write_status("failed");
            return Ok(EXIT_FINAL_CHECKPOINT_FAILED);
        }
        self.write_status("stopped");
        tracing::info!(step = self.step, "Stopped cleanly.");
        Ok(0)
    }

    async fn budget_spent(&mut self, actor_name: &str, reason: &str) -> Result<u8, StepError> {
        tracing::error!(actor = actor_name, %reason, "Restart budget spent; stopping.");
        self.record(Event::Alarm {
            name: "restart_budget_spent".into(),
            message: format!(
                "{actor_name} failed more than {} times in {} s: {reason}",
                self.config.supervisor.max_restarts, self.config.supervisor.window_seconds
            ),
        });
        self.stopping = true;
        if actor_name != TRAINER && self.latest != Some(self.step) {
            match self.checkpoint().await {
                Ok(true) => {}
                Ok(false) => tracing::error!("Final checkpoint failed."),
                Err(e) => tracing::error!(error = %e, "Final checkpoint failed."),
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
    /// Handed to every trainer: cancels its evaluation in progress.
    cancel_eval: Arc<AtomicBool>,
}

/// Messages of the supervisor (besides the supervision events of its children).
pub enum SupervisorMsg {
    /// A failure that is not a crash (a call that timed out, a transient error answer):
    /// counted against `actor`'s restart budget like a crash. Answers whether the budget
    /// still holds; when it does not, `BudgetSpent` news goes out as for a crash.
    CountFailure {
        /// Registered name of the actor.
        actor: &'static str,
        /// What failed.
        reason: String,
        /// Whether the budget still holds.
        reply: RpcReplyPort<bool>,
    },
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

impl SupervisorState {
    /// Records a failure of `name` in its window; false once the budget is spent (the
    /// news has then gone out).
    fn count(&mut self, name: &str, reason: &str) -> bool {
        let cfg = &self.args.config.supervisor;
        let window = Duration::from_secs(cfg.window_seconds);
        let now = Instant::now();
        let history = self.failures.entry(name.to_string()).or_default();
        history.retain(|t| now.duration_since(*t) < window);
        history.push_back(now);
        if history.len() as u32 > cfg.max_restarts {
            self.give_up(name, reason.to_string());
            return false;
        }
        true
    }

    fn give_up(&mut self, name: &str, reason: String) {
        self.gave_up = true;
        let _ = self.args.news.send(News::BudgetSpent {
            actor: name.to_string(),
            reason,
        });
    }
}

impl Actor for SupervisorActor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
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

    async fn handle(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::CountFailure {
                actor,
                reason,
                reply,
            } => {
                let holds = !state.gave_up && state.count(actor, &reason);
                let _ = reply.send(holds);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
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
        if !state.count(&name, &reason) {
            return Ok(());
        }
        let attempt = state.failures.get(&name).map_or(1, |h| h.len() as u32);
        if let Err(e) = spawn_child(&name, &state.args, myself.get_cell(), false).await {
            state.give_up(&name, format!("restart failed: {e}"));
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

/// Where a restarted trainer starts: the checkpoint store's resume point (LATEST if its
/// manifest verifies, else the newest that does), asked of the checkpointer, which owns the
/// store. Before, a restart loaded whatever LATEST named, unverified. If the checkpointer
/// does not answer, LATEST as named (the trainer's load fails on a torn one, which counts
/// against the restart budget).
async fn restart_point(state_dir: &Path, timeout: Duration) -> Start {
    let answer = call::call(CHECKPOINTER, timeout, CheckpointerMsg::ResumePoint).await;
    match call::flatten(CHECKPOINTER, answer) {
        Ok(point) => point.map_or(Start::Fresh, Start::Restore),
        Err(e) => {
            tracing::warn!(error = %e, "No verified resume point; the trainer restarts from LATEST as named.");
            latest_checkpoint(state_dir).map_or(Start::Fresh, Start::Restore)
        }
    }
}

/// The checkpoint LATEST names, if any.
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
                restart_point(&state_dir, args.timeout).await
            };
            Actor::spawn_linked(
                Some(name.into()),
                TrainerActor,
                TrainerArgs {
                    config,
                    start,
                    cancel_eval: args.cancel_eval.clone(),
                },
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
