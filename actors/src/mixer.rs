//! The mixer actor: labeled examples → one batch per optimizer step at the replay ratio.
//!
//! Wraps [`dreamloop::mix::Mixer`] (the decision: how many of each class, from exact
//! carries) and its [`Pools`]. On [`MixerMsg::NextBatch`] it asks the labeler for exactly
//! what the next batch lacks ([`Mixer::lacking`]), so the pools never
//! hold more than one batch of each class plus what the labeler over-delivered: the queue
//! between labeler and trainer is bounded by construction, and nothing is produced before
//! the trainer asks for it (backpressure).

use std::sync::Arc;
use std::time::Duration;

use dreamloop::config::DreamConfig;
use dreamloop::mix::{Batch, BatchPlan, MixError, Mixer, MixerState, Pools};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::call::{self, ReplyError};
use crate::labeler::{LabelerMsg, LABELER};

/// Registered name of the mixer actor.
pub const MIXER: &str = "mixer";

/// Messages of the mixer actor.
pub enum MixerMsg {
    /// The next batch. A failed call to the labeler, and the labeler's error answer, are
    /// passed on with their severity (a generator that timed out is transient; missing logs,
    /// exhausted templates, a full ledger are persistent); a short delivery is persistent.
    NextBatch(RpcReplyPort<Result<Batch, ReplyError>>),
    /// Changes the replay ratio from the next batch on (rollback, SIGHUP); a refused ratio
    /// is persistent.
    SetReplayRatio(f64, RpcReplyPort<Result<(), ReplyError>>),
    /// The carries and the replay ratio, for a checkpoint.
    State(RpcReplyPort<(MixerState, f64)>),
}

/// Start-up arguments.
pub struct MixerArgs {
    /// `[train] batch_size`, `[data]` shares are read.
    pub config: Arc<DreamConfig>,
    /// Carries and replay ratio of the checkpoint resumed from, if any.
    pub resume: Option<(MixerState, f64)>,
    /// Timeout of calls to the labeler.
    pub call_timeout: Duration,
}

/// The actor state.
pub struct MixerActorState {
    mixer: Mixer,
    pools: Pools,
    call_timeout: Duration,
}

/// The mixer actor (see the module docs).
pub struct MixerActor;

impl Actor for MixerActor {
    type Msg = MixerMsg;
    type State = MixerActorState;
    type Arguments = MixerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<MixerMsg>,
        args: MixerArgs,
    ) -> Result<MixerActorState, ActorProcessingErr> {
        let mut config = args.config.mix_config();
        let mut mixer_state = MixerState::default();
        if let Some((state, ratio)) = args.resume {
            config.replay_ratio = ratio;
            mixer_state = state;
        }
        let mixer = Mixer::new(config)?.with_state(mixer_state);
        Ok(MixerActorState {
            mixer,
            pools: Pools::default(),
            call_timeout: args.call_timeout,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<MixerMsg>,
        msg: MixerMsg,
        state: &mut MixerActorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MixerMsg::NextBatch(reply) => {
                let _ = reply.send(next_batch(state).await);
            }
            MixerMsg::SetReplayRatio(ratio, reply) => {
                let _ = reply.send(
                    state
                        .mixer
                        .set_replay_ratio(ratio)
                        .map_err(ReplyError::persistent),
                );
            }
            MixerMsg::State(reply) => {
                let _ = reply.send((state.mixer.state(), state.mixer.replay_ratio()));
            }
        }
        Ok(())
    }
}

async fn next_batch(state: &mut MixerActorState) -> Result<Batch, ReplyError> {
    let missing = state.mixer.lacking(&state.pools);
    if missing != BatchPlan::default() {
        let examples = call::call(LABELER, state.call_timeout, |reply| {
            LabelerMsg::Fill(missing, reply)
        })
        .await
        .map_err(ReplyError::from_call)?
        .map_err(|e| ReplyError {
            severity: e.severity,
            message: format!("the labeler: {e}"),
        })?;
        for example in examples {
            state.pools.push(example);
        }
    }
    match state.mixer.next_batch(&mut state.pools) {
        Ok(batch) => Ok(batch),
        Err(e @ MixError::Short { .. }) => Err(ReplyError::persistent(format!(
            "the labeler delivered less than asked: {e}"
        ))),
        Err(e) => Err(ReplyError::persistent(e)),
    }
}
