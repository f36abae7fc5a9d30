//! The step driver: the loop that takes one step at a time and everything it carries out
//! between steps.
//!
//! [`Driver::run_loop`]: control and supervisor news at the step boundary (pause, resume,
//! checkpoint, reload, shutdown; a spent restart budget), `mixer.NextBatch` →
//! `trainer.TrainOn` → `trained.jsonl`, an evaluation every `[eval] every_n_steps` (its
//! verdict is carried out in `verdict.rs`), a checkpoint every `[checkpoint]
//! every_n_steps`. A failed step is handled by the rule in `call.rs`: a crashed actor is
//! waited for (the supervisor restarts it and the loop re-syncs with the trainer), a
//! transient failure counts against the restart budget and the step is tried again, a
//! persistent one stops cleanly (exit 78).
//!
//! The driver is the one owner of the rollback policy's state ([`PolicyState`]): it judges
//! each evaluation with the pure [`dreamloop::rollback::judge`], and a checkpoint persists
//! the state in its `state.json`.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use dreamloop::config::{DreamConfig, OnWriteError, PhaseSpec};
use dreamloop::controller::{Action, Controller, ControllerState};
use dreamloop::events::{rfc3339_utc, Event, EventLog};
use dreamloop::example::Example;
use dreamloop::history::{EvalLog, RunInfo};
use dreamloop::label::Phase;
use dreamloop::rollback::{Policy, PolicyState};
use ractor::RpcReplyPort;
use tokio::sync::{mpsc, watch};

use crate::call::{self, CallError, Pending, ReplyError, Severity};
use crate::checkpointer::{CheckpointerMsg, SaveInfo, CHECKPOINTER};
use crate::generator::{GeneratorMsg, GENERATOR};
use crate::labeler::{LabelerMsg, LABELER};
use crate::mixer::{MixerMsg, MIXER};
use crate::startup::{
    Control, RunOptions, EXIT_BUDGET_SPENT, EXIT_FINAL_CHECKPOINT_FAILED, EXIT_PERSISTENT,
    POLICY_PAUSE_FILE,
};
use crate::status::{LastEval, LastRollback, RunState, Status, TrainedLog, TrainedStep};
use crate::supervisor::{News, Shared, SupervisorMsg, SUPERVISOR};
use crate::trainer::{StepOutcome, TrainerMsg, TRAINER};
use crate::{systemd, telemetry};

/// Why a step (or what it carries out) failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StepError {
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

/// Where the loop starts: what start-up found on disk and set up.
pub(crate) struct DriverStart {
    /// The validated config.
    pub config: Arc<DreamConfig>,
    /// Process settings (`--paused`, `--max-steps`, the config path for reloads).
    pub opts: RunOptions,
    /// Control from signals or a test.
    pub control: mpsc::Receiver<Control>,
    /// News from the supervisor (restarts, a spent budget).
    pub news: watch::Receiver<News>,
    /// `events.jsonl`, shared with the supervisor.
    pub events: Arc<Mutex<EventLog>>,
    /// What restarted actors start from; the loop keeps it current.
    pub shared: Arc<Mutex<Shared>>,
    /// `trained.jsonl`, opened at the resumed step.
    pub trained: TrainedLog,
    /// The resumed checkpoint's step and run state, if any.
    pub resumed: Option<(u64, RunState)>,
    /// Whether the rollback policy's pause is still in force (`paused-by-policy.json`).
    pub policy_paused: bool,
    /// Shared with every trainer: cancels its evaluation in progress.
    pub cancel_eval: Arc<AtomicBool>,
}

/// The step loop and everything it carries out (see the module docs).
pub(crate) struct Driver {
    /// The config the daemon started with (a reload applies only its hot settings).
    pub(crate) config: Arc<DreamConfig>,
    /// Process settings.
    pub(crate) opts: RunOptions,
    /// Control from signals or a test, read at step boundaries and while waiting.
    control: mpsc::Receiver<Control>,
    /// News from the supervisor.
    news: watch::Receiver<News>,
    /// `events.jsonl`.
    events: Arc<Mutex<EventLog>>,
    /// What restarted actors start from (the mixer's carries and ratio).
    shared: Arc<Mutex<Shared>>,
    /// `[supervisor] call_timeout_seconds`: one slice of a wait.
    timeout: Duration,
    /// `trained.jsonl`: which examples each step trained, rewinds, quarantine input.
    pub(crate) trained: TrainedLog,
    /// Steps the weights have taken.
    pub(crate) step: u64,
    /// LATEST checkpoint's step.
    pub(crate) latest: Option<u64>,
    /// The configured peak lr the schedule follows (SIGHUP changes it by scaling).
    pub(crate) peak_lr: f64,
    /// SFT, DPO or mixed (a hot setting).
    phase: Phase,
    /// `on-policy.jsonl`, opened on the first on-policy sample (`own_replies.rs`).
    pub(crate) on_policy_log: Option<dreamloop::segmented::SegmentedLog>,
    /// Evaluate every this many steps (a hot setting).
    eval_every: u64,
    /// The rollback policy's thresholds (a hot setting).
    pub(crate) policy: Policy,
    /// The rollback policy's state: baseline, GOOD, lr factor, replay ratio, patience.
    pub(crate) policy_state: PolicyState,
    /// No steps are taken while set.
    pub(crate) paused: bool,
    /// The pause was ordered by the rollback policy (only an operator's resume ends it).
    pub(crate) paused_by_policy: bool,
    /// The lr of the next step.
    pub(crate) lr: f64,
    /// The last evaluation, for status.json.
    pub(crate) last_eval: Option<LastEval>,
    /// The last rollback, for status.json.
    pub(crate) last_rollback: Option<LastRollback>,
    /// Actor restarts so far (the supervisor's count).
    restarts: u32,
    /// Steps the trainer skipped.
    skipped: u64,
    /// Non-finite steps skipped since the last evaluation (a storm triggers one; the next
    /// judgment counts them).
    pub(crate) non_finite_since_eval: u32,
    /// When the last periodic status line was logged.
    last_status_line: Instant,
    /// stderr is a terminal: a live status line is drawn.
    tty: bool,
    /// The last step's loss, for the status line.
    last_loss: Option<f64>,
    /// Set by a rollback: checkpoint after the next step instead of waiting for the cadence.
    /// The rollback's lr, replay ratio and policy memory live in the trainer and the actors
    /// until a checkpoint carries them; a crash before it resumes from GOOD with GOOD's
    /// settings (the quarantine is on disk already), so that window is kept to one step.
    pub(crate) checkpoint_soon: bool,
    /// Control that arrived while the loop waited on an actor, for the next step boundary.
    pub(crate) deferred: VecDeque<Control>,
    /// The control channel has no sender any more (a Shutdown was deferred for it).
    control_closed: bool,
    /// Set by a shutdown: a failed checkpoint is then final, not a reason to pause.
    stopping: bool,
    /// Cancels the trainer's evaluation in progress (set by a Shutdown while waiting).
    pub(crate) cancel_eval: Arc<AtomicBool>,
    /// How often a paused loop feeds systemd's watchdog (and re-writes status.json): half
    /// of WatchdogSec, at most 5 s.
    paused_ping: Duration,
    /// The share of wall time spent in steps.
    duty: DutyCycle,
    /// The last duty-cycle reading, for `evals.jsonl`.
    pub(crate) last_duty: f64,
    /// The experiment controller: phases, lr raises, targeted replay (`experiment.rs`).
    pub(crate) controller: Controller,
    /// Its memory, persisted with each checkpoint.
    pub(crate) controller_state: ControllerState,
    /// Its decisions not yet carried out.
    pub(crate) controller_actions: Vec<Action>,
    /// `evals.jsonl`, opened at the first evaluation.
    pub(crate) evals: Option<EvalLog>,
    /// The run (`run.json`).
    pub(crate) run: RunInfo,
    /// Examples trained in this run (rolled-back ones included).
    pub(crate) examples_trained: u64,
}

/// How long a duty-cycle window runs before it starts over.
const DUTY_WINDOW: Duration = Duration::from_secs(60);

/// The share of wall time the loop spends in optimizer steps, over a window of a minute
/// that starts over after a pause: what is left is waiting for batches (the producers),
/// evaluating and checkpointing.
struct DutyCycle {
    /// Start of the window.
    since: Instant,
    /// Time spent in steps in the window.
    busy: Duration,
}

impl DutyCycle {
    fn new() -> DutyCycle {
        DutyCycle {
            since: Instant::now(),
            busy: Duration::ZERO,
        }
    }

    /// Adds a step that took `took`; answers the window's share so far (then starts a new
    /// window if this one has run its minute).
    fn add(&mut self, took: Duration) -> f64 {
        self.busy += took;
        let elapsed = self.since.elapsed();
        let ratio = (self.busy.as_secs_f64() / elapsed.as_secs_f64().max(1e-9)).min(1.0);
        if elapsed >= DUTY_WINDOW {
            *self = DutyCycle::new();
        }
        ratio
    }
}

/// How one pass of the loop ended.
enum Flow {
    Continue,
    Stop(u8),
}

impl Driver {
    /// The loop at the resumed step (or 0), with the resumed checkpoint's settings.
    pub(crate) fn new(start: DriverStart) -> Driver {
        let DriverStart {
            config,
            opts,
            control,
            news,
            events,
            shared,
            trained,
            resumed,
            policy_paused,
            cancel_eval,
        } = start;
        let run = resumed.as_ref().map(|(_, run)| run);
        let controller = config.controller();
        let controller_state = run.map(|r| r.controller.clone()).unwrap_or_default();
        let phase = match config.phase {
            PhaseSpec::Fixed(first) => run.map_or(first, |r| r.phase),
            PhaseSpec::Schedule(_) => controller.phase(controller_state.phase_index).kind,
        };
        let run_info = RunInfo::load_or_create(&config.state_dir).unwrap_or_else(|e| {
            tracing::error!(error = %e, "Could not write run.json; this run's id is not kept.");
            RunInfo {
                run_id: "unsaved".into(),
                started_unix: 0,
            }
        });
        telemetry::set_run_id(&run_info.run_id);
        Driver {
            timeout: Duration::from_secs(config.supervisor.call_timeout_seconds),
            trained,
            step: resumed.as_ref().map_or(0, |(step, _)| *step),
            latest: resumed.as_ref().map(|(step, _)| *step),
            peak_lr: run.map_or(controller.peak_lr(&controller_state), |r| r.peak_lr),
            phase,
            examples_trained: run.map_or(0, |r| r.examples_trained),
            last_duty: 0.0,
            controller,
            controller_state,
            controller_actions: Vec::new(),
            evals: None,
            run: run_info,
            on_policy_log: None,
            eval_every: run.map_or(config.eval.every_n_steps, |r| r.eval_every_n_steps),
            policy: config.rollback.clone(),
            policy_state: run.map_or_else(
                || PolicyState::new(config.data.replay_ratio),
                |r| r.policy.clone(),
            ),
            paused: opts.paused || policy_paused,
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
            duty: DutyCycle::new(),
            paused_ping: systemd::watchdog_interval()
                .map(|d| d / 2)
                .unwrap_or(Duration::from_secs(5))
                .min(Duration::from_secs(5)),
            config,
            opts,
            control,
            news,
            events,
            shared,
        }
    }

    pub(crate) async fn run_loop(&mut self) -> Result<u8, StepError> {
        self.sync_position().await?;
        let abandoned = self.trained.take_abandoned();
        if !abandoned.is_empty() {
            self.requeue(abandoned).await?;
            self.trained.rewind(self.step).map_err(StepError::Local)?;
        }
        self.apply_controller_settings().await?;
        let needs_baseline = self.policy_state.baseline.is_none() || self.policy_state.remeasure;
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
            self.final_checkpoint().await;
        }
        self.write_status("failed");
        Ok(EXIT_PERSISTENT)
    }

    /// The checkpoint of a loop that stops on a failure: its own failure is only logged.
    async fn final_checkpoint(&mut self) {
        match self.checkpoint().await {
            Ok(true) => {}
            Ok(false) => tracing::error!("The final checkpoint failed as well."),
            Err(e) => tracing::error!(error = %e, "The final checkpoint failed as well."),
        }
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
                    self.duty = DutyCycle::new();
                    if self.paused_by_policy {
                        self.policy_state = self.policy_state.operator_resumed();
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
                    // A restarted actor starts from the config: the controller's settings
                    // again.
                    self.apply_controller_settings().await?;
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
    pub(crate) async fn ask<M: ractor::Message, T: Send + 'static>(
        &mut self,
        name: &'static str,
        build: impl FnOnce(RpcReplyPort<T>) -> M,
    ) -> Result<T, CallError> {
        let pending = call::send(name, build)?;
        self.wait(pending).await
    }

    /// [`Driver::ask`] for an actor that answers `Result<T, ReplyError>`.
    pub(crate) async fn try_ask<M: ractor::Message, T: Send + 'static>(
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

    /// SFT, DPO or mixed, as in force now.
    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    /// Sets the phase in force (the controller's schedule; the labeler is told by the
    /// caller).
    pub(crate) fn set_phase(&mut self, phase: Phase) {
        self.phase = phase;
    }

    async fn one_step(&mut self) -> Result<(), StepError> {
        let batch = self.try_ask(MIXER, MixerMsg::NextBatch).await?;
        let examples = batch.examples;
        self.sample_own_replies(&examples).await;
        let sent = examples.clone();
        let started = Instant::now();
        let outcome = self
            .ask(TRAINER, |reply| TrainerMsg::TrainOn(sent, reply))
            .await?;
        self.last_duty = self.duty.add(started.elapsed());
        telemetry::set_duty_cycle(self.last_duty);
        match outcome {
            StepOutcome::Trained(report) => {
                telemetry::record_step(&report);
                let _ = systemd::watchdog();
                self.step = report.step;
                self.last_loss = Some(report.loss);
                self.lr = report.lr;
                let trained = examples.len();
                self.trained
                    .append(TrainedStep {
                        step: report.step,
                        examples,
                        rewind: false,
                        loss: Some(report.loss),
                        lr: Some(report.lr),
                    })
                    .map_err(StepError::Local)?;
                self.status_line(&report);
                self.control_after_step(trained).await?;
            }
            StepOutcome::Skipped { reason, non_finite } => {
                self.skipped += 1;
                let (at, attempted) = (self.step, self.step + 1);
                tracing::warn!(step = attempted, %reason, "Step skipped.");
                // Its examples were not trained, and may be what made it fail: quarantined
                // (as a step rolled back before it was applied), not dropped.
                let skipped = vec![TrainedStep {
                    step: attempted,
                    examples,
                    rewind: false,
                    loss: None,
                    lr: None,
                }];
                let quarantined = self
                    .try_ask(CHECKPOINTER, |reply| {
                        CheckpointerMsg::Quarantine(skipped, attempted, at, reply)
                    })
                    .await?;
                tracing::info!(
                    step = attempted,
                    examples = quarantined,
                    "The skipped step's examples are quarantined."
                );
                if non_finite {
                    telemetry::record_non_finite_step();
                    // A skipped step does not advance the count, so a storm would never
                    // reach the next scheduled evaluation: judge the weights as soon as it is
                    // one (the policy's non-finite rule rolls back).
                    self.non_finite_since_eval += 1;
                    if self.non_finite_since_eval > self.policy.max_non_finite_steps {
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
    pub(crate) fn tell<M: ractor::Message>(&self, name: &'static str, msg: M) {
        if let Ok(a) = call::lookup::<M>(name) {
            let _ = a.cast(msg);
        }
    }

    pub(crate) fn record(&self, event: Event) {
        let mut log = self.events.lock().expect("event log lock");
        if let Err(e) = log.record(self.step, event) {
            tracing::error!(error = %e, "Could not record an event.");
        }
    }

    /// Writes a checkpoint of the current weights with everything the loop resumes with.
    /// `Ok(false)`: it could not be written (the disk refused; logged, an event, and a pause
    /// if `[checkpoint] on_write_error = "pause"` and the loop is not stopping); the previous
    /// checkpoints are intact. `Err`: an actor could not be reached.
    pub(crate) async fn checkpoint(&mut self) -> Result<bool, StepError> {
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
        let ledger_position = self.try_ask(GENERATOR, GeneratorMsg::Sync).await?;
        self.try_ask(LABELER, LabelerMsg::SaveCursor).await?;
        let (mixer, replay_ratio) = self.ask(MIXER, MixerMsg::State).await?;
        let cursor_path = self.config.state_dir.join("convo-cursor.json");
        let convo_cursor = std::fs::read(&cursor_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let run = RunState {
            step: self.step,
            mixer,
            replay_ratio,
            policy: self.policy_state.clone(),
            peak_lr: self.peak_lr,
            phase: self.phase,
            eval_every_n_steps: self.eval_every,
            ledger_position,
            convo_cursor,
            controller: self.controller_state.clone(),
            examples_trained: self.examples_trained,
        };
        self.shared.lock().expect("shared state lock").mixer = Some((mixer, replay_ratio));
        Ok(self
            .try_ask(CHECKPOINTER, |reply| {
                CheckpointerMsg::Save(Box::new(run), reply)
            })
            .await?)
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
        // A fixed phase's lr is the operator's (times the controller's stall boost); a
        // schedule's phases set theirs, and a change to them needs a restart.
        if let PhaseSpec::Fixed(_) = self.config.phase {
            let first = &mut self.controller.phases[0];
            first.lr = hot.lr;
            first.max_lr = 10.0 * hot.lr;
            let wanted = self.controller.peak_lr(&self.controller_state);
            if let Err(e) = self.set_peak_lr(wanted).await {
                tracing::error!(error = %e, "Reload: could not change the learning rate.");
            }
        }
        self.controller.guards = hot.rollback.clone();
        let ratio = hot.replay_ratio;
        match self
            .try_ask(MIXER, |reply| MixerMsg::SetReplayRatio(ratio, reply))
            .await
        {
            Ok(()) => self.policy_state.replay_ratio = hot.replay_ratio,
            Err(e) => tracing::error!(error = %e, "Reload: the replay ratio was not changed."),
        }
        self.eval_every = hot.eval_every_n_steps;
        self.policy = hot.rollback;
        if let Some(phase) = hot.phase.filter(|p| *p != self.phase) {
            self.tell(LABELER, LabelerMsg::SetPhase(phase));
            self.record(Event::PhaseChange {
                from: format!("{:?}", self.phase).to_lowercase(),
                to: format!("{phase:?}").to_lowercase(),
                index: None,
                reason: None,
                lr: None,
                reference_step: None,
            });
            self.phase = phase;
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
            self.final_checkpoint().await;
        }
        self.write_status("failed");
        Ok(EXIT_BUDGET_SPENT)
    }

    pub(crate) fn write_status(&self, state: &str) {
        let (good, replay_ratio) = (self.policy_state.good_step, self.policy_state.replay_ratio);
        let status = Status {
            state: state.into(),
            pid: std::process::id(),
            step: self.step,
            phase: self.phase,
            phase_index: self.controller_state.phase_index,
            lr_boost: self.controller_state.lr_boost,
            replay_weights: self.replay_weights(),
            run_id: self.run.run_id.clone(),
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
