//! Supervision: [`SupervisorActor`] spawns the pipeline's actors in order and restarts a
//! failed one within a budget.
//!
//! ractor has no restart strategies, so the supervisor matches `SupervisionEvent`s itself: a
//! failed child is spawned again (same registered name, so callers find it) while it has
//! failed at most `[supervisor] max_restarts` times in `window_seconds`; a restarted trainer
//! starts from the checkpoint store's verified resume point. A failure that is not a crash
//! (a call that timed out, a transient error answer) is counted against the same budget
//! ([`SupervisorMsg::CountFailure`], from the step driver). When a budget is spent the
//! supervisor tells the loop ([`News::BudgetSpent`]), which stops: checkpoint if the trainer
//! still answers, an `alarm` event, exit status 70.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use dreamloop::config::DreamConfig;
use dreamloop::events::{Event, EventLog};
use dreamloop::mix::MixerState;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::watch;

use crate::call;
use crate::checkpointer::{CheckpointerActor, CheckpointerArgs, CheckpointerMsg, CHECKPOINTER};
use crate::dreamer::{DreamerActor, DreamerArgs, DREAMER};
use crate::faults::Faults;
use crate::generator::{GeneratorActor, GeneratorArgs, GENERATOR};
use crate::labeler::{LabelerActor, LabelerArgs, LABELER};
use crate::mixer::{MixerActor, MixerArgs, MIXER};
use crate::telemetry;
use crate::trainer::{Start, TrainerActor, TrainerArgs, TRAINER};

/// The actors in pipeline order (spawn order); the dreamer only with a `[dream]` table.
pub const PIPELINE: [&str; 6] = [DREAMER, GENERATOR, LABELER, MIXER, TRAINER, CHECKPOINTER];
/// Registered name of the supervisor actor.
pub const SUPERVISOR: &str = "supervisor";

/// What the supervisor tells the loop.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum News {
    /// Nothing yet.
    Quiet,
    /// Restarts so far (the loop re-syncs with a restarted trainer).
    Restarted(u32),
    /// An actor failed once too often.
    BudgetSpent {
        /// Its registered name.
        actor: String,
        /// Its last failure.
        reason: String,
    },
}

/// What a restarted actor starts from, kept current by the loop.
#[derive(Debug, Clone)]
pub(crate) struct Shared {
    /// The mixer's carries and replay ratio at the last checkpoint (or the resumed one).
    pub mixer: Option<(MixerState, f64)>,
}

/// Start-up arguments of the supervisor.
pub(crate) struct SupervisorArgs {
    /// Handed to every actor.
    pub config: Arc<DreamConfig>,
    /// What restarted actors start from.
    pub shared: Arc<Mutex<Shared>>,
    /// `events.jsonl`: restarts are recorded.
    pub events: Arc<Mutex<EventLog>>,
    /// Restarts and a spent budget, to the loop.
    pub news: watch::Sender<News>,
    /// `[supervisor] call_timeout_seconds`, for the actors' own calls.
    pub timeout: Duration,
    /// Where the first trainer starts (restarts start from the verified resume point).
    pub first_start: Start,
    /// Handed to every trainer: cancels its evaluation in progress.
    pub cancel_eval: Arc<AtomicBool>,
    /// Fault-injecting parts, handed to the trainer and the checkpointer (and again to
    /// restarted ones).
    pub faults: Faults,
}

/// Messages of the supervisor (besides the supervision events of its children).
pub(crate) enum SupervisorMsg {
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
pub(crate) struct SupervisorState {
    args: SupervisorArgs,
    /// Failure times per actor within the window.
    failures: HashMap<String, VecDeque<Instant>>,
    restarts: u32,
    /// Set once a budget is spent: later terminations are not failures to act on.
    gave_up: bool,
}

/// Spawns and restarts the pipeline's actors (see the module docs).
pub(crate) struct SupervisorActor;

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
            if name == DREAMER && state.args.config.dream.is_none() {
                continue;
            }
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
            dreamloop::checkpoint::latest_named(state_dir).map_or(Start::Fresh, Start::Restore)
        }
    }
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
        DREAMER => Actor::spawn_linked(
            Some(name.into()),
            DreamerActor,
            DreamerArgs {
                config,
                events: args.events.clone(),
            },
            supervisor,
        )
        .await
        .map(|(a, _)| a.get_cell()),
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
                    faults: args.faults.clone(),
                },
                supervisor,
            )
            .await
            .map(|(a, _)| a.get_cell())
        }
        CHECKPOINTER => Actor::spawn_linked(
            Some(name.into()),
            CheckpointerActor,
            CheckpointerArgs {
                config,
                call_timeout: timeout,
                faults: args.faults.clone(),
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
