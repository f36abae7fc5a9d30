//! The checkpointer actor: owns the [`CheckpointStore`] and the [`Quarantine`].
//!
//! A save starts a checkpoint in the store ([`CheckpointStore::begin`]) and hands it to the
//! trainer thread, which writes its files straight into it (weights in HF names streamed
//! tensor by tensor or linked while unchanged, `optimizer.bpk`, `trainer_state.json`,
//! `seen.bin`; each hashed on its way to disk, none staged or copied). The checkpointer adds
//! the loop's [`RunState`] as `state.json` and commits: the store's protocol (files fsynced,
//! `MANIFEST.json` last, rename, `LATEST` replaced atomically) makes a checkpoint either
//! complete or invisible.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use dreamloop::checkpoint::{CheckpointStore, FileSource, Quarantine, RetentionPolicy};
use dreamloop::config::DreamConfig;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::call::{self, ReplyError};
use crate::faults::Faults;
use crate::status::{RunState, TrainedStep, RUN_STATE_FILE};
use crate::trainer::{TrainerMsg, TRAINER};

/// Registered name of the checkpointer actor.
pub const CHECKPOINTER: &str = "checkpointer";

/// What a save wrote.
#[derive(Debug, Clone)]
pub struct SaveInfo {
    /// Bytes of all files.
    pub bytes: u64,
    /// Seconds it took, from the first file to the commit.
    pub seconds: f64,
}

/// Messages of the checkpointer actor. Errors are persistent (the store or the disk
/// refused), except a failed call to the trainer, which keeps its severity.
pub enum CheckpointerMsg {
    /// Checkpoint the trainer's current weights (at `RunState::step`).
    Save(Box<RunState>, RpcReplyPort<Result<SaveInfo, ReplyError>>),
    /// Make `step` the rollback target.
    MarkGood(u64, RpcReplyPort<Result<(), ReplyError>>),
    /// Restore the timeline to `step`: answers the checkpoint directory and its run state.
    RollbackTo(u64, RpcReplyPort<Result<(PathBuf, RunState), ReplyError>>),
    /// Quarantines these steps' examples (rolled back from `from` to `to`).
    Quarantine(
        Vec<TrainedStep>,
        u64,
        u64,
        RpcReplyPort<Result<usize, ReplyError>>,
    ),
    /// The checkpoint a restarted trainer resumes from: LATEST if its manifest verifies,
    /// else the newest that does (`CheckpointStore::resume_point`), none before the first.
    ResumePoint(RpcReplyPort<Result<Option<PathBuf>, ReplyError>>),
}

/// Start-up arguments.
pub struct CheckpointerArgs {
    /// `state_dir`, `[checkpoint]` are read.
    pub config: Arc<DreamConfig>,
    /// Timeout of calls to the trainer.
    pub call_timeout: Duration,
    /// Injected faults (tests): a disk that fills; none in the binary.
    pub faults: Faults,
}

/// The actor state.
pub struct CheckpointerState {
    store: CheckpointStore,
    quarantine: Quarantine,
    call_timeout: Duration,
}

/// The checkpointer actor (see the module docs).
pub struct CheckpointerActor;

impl Actor for CheckpointerActor {
    type Msg = CheckpointerMsg;
    type State = CheckpointerState;
    type Arguments = CheckpointerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<CheckpointerMsg>,
        args: CheckpointerArgs,
    ) -> Result<CheckpointerState, ActorProcessingErr> {
        let state_dir = &args.config.state_dir;
        let retention = RetentionPolicy {
            keep_last: args.config.checkpoint.keep_last,
            mirror_dir: args.config.checkpoint.mirror_dir.clone(),
        };
        let (mut store, warnings) = CheckpointStore::open(state_dir, retention)?;
        if let Some(hook) = args.faults.disk_hook() {
            tracing::warn!("Fault injection: the checkpoint store's disk is faulty.");
            store = store.with_fault_hook(hook);
        }
        for w in warnings {
            tracing::warn!(?w, "Checkpoint store: recovered from an interrupted write.");
        }
        // Earlier versions staged each save here before the store copied it.
        let staging = state_dir.join(".staging");
        if staging.exists() {
            std::fs::remove_dir_all(&staging)
                .with_context(|| format!("removing the old {}", staging.display()))?;
        }
        Ok(CheckpointerState {
            store,
            quarantine: Quarantine::open(state_dir)?,
            call_timeout: args.call_timeout,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<CheckpointerMsg>,
        msg: CheckpointerMsg,
        state: &mut CheckpointerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            CheckpointerMsg::Save(run, reply) => {
                let _ = reply.send(save(state, &run).await);
            }
            CheckpointerMsg::MarkGood(step, reply) => {
                let marked = state.store.mark_good(step).map(|warnings| {
                    for w in warnings {
                        tracing::warn!(?w, "Marking GOOD: warning.");
                    }
                });
                let _ = reply.send(marked.map_err(ReplyError::persistent));
            }
            CheckpointerMsg::RollbackTo(step, reply) => {
                let _ = reply.send(roll_back(state, step).map_err(ReplyError::persistent));
            }
            CheckpointerMsg::ResumePoint(reply) => {
                let point = state.store.resume_point().map(|(point, warnings)| {
                    for w in warnings {
                        tracing::warn!(?w, "Trainer restart: a checkpoint was passed over.");
                    }
                    point.map(|c| c.path)
                });
                let _ = reply.send(point.map_err(ReplyError::persistent));
            }
            CheckpointerMsg::Quarantine(steps, from, to, reply) => {
                let mut count = 0;
                let mut result = Ok(());
                'outer: for s in steps {
                    for example in s.examples {
                        if let Err(e) = state.quarantine.append(s.step, from, to, example) {
                            result = Err(ReplyError::persistent(e));
                            break 'outer;
                        }
                        count += 1;
                    }
                }
                let _ = reply.send(result.map(|()| count));
            }
        }
        Ok(())
    }
}

async fn save(state: &mut CheckpointerState, run: &RunState) -> Result<SaveInfo, ReplyError> {
    let started = Instant::now();
    let pending = state
        .store
        .begin(run.step)
        .map_err(ReplyError::persistent)?;
    // The trainer thread owns the pending checkpoint while it writes, and hands it back
    // with its verdict either way, so a failed save leaves no temporary directory behind.
    // If the call itself fails (timeout, trainer gone), the directory is debris that the
    // next save of this step, or the next start, removes.
    let (mut pending, written) = call::call(TRAINER, state.call_timeout, |reply| {
        TrainerMsg::SaveInto(Box::new(pending), reply)
    })
    .await
    .map_err(ReplyError::from_call)?;
    let run_json = serde_json::to_vec_pretty(run).expect("run state serialises");
    let added = written.and_then(|()| {
        pending
            .add(RUN_STATE_FILE, FileSource::Bytes(&run_json))
            .map_err(ReplyError::persistent)
    });
    if let Err(e) = added {
        state.store.abandon(*pending);
        return Err(e);
    }
    let saved = state
        .store
        .commit(*pending)
        .map_err(ReplyError::persistent)?;
    for w in saved.warnings {
        tracing::warn!(?w, "Checkpoint saved with a warning.");
    }
    let bytes = saved.checkpoint.manifest.files.iter().map(|f| f.size).sum();
    Ok(SaveInfo {
        bytes,
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn roll_back(state: &mut CheckpointerState, step: u64) -> anyhow::Result<(PathBuf, RunState)> {
    let (checkpoint, warnings) = state.store.rollback_to(step)?;
    for w in warnings {
        tracing::warn!(?w, "Rollback: warning.");
    }
    let run = read_run_state(&checkpoint.file(RUN_STATE_FILE))?;
    Ok((checkpoint.path, run))
}

/// Reads a checkpoint's `state.json`.
pub fn read_run_state(path: &std::path::Path) -> anyhow::Result<RunState> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}
