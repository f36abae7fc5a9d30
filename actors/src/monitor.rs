//! The monitor actor: evaluates the weights on the held-out probes and asks the rollback
//! policy what to do.
//!
//! It counts the non-finite steps the trainer skipped since the last evaluation, has the
//! trainer thread evaluate its current weights (a forward-only copy, in step order), maps the
//! [`EvalReport`] to the policy's [`EvalRecord`], runs the pure [`decide`] and advances the
//! [`PolicyState`]. The verdict goes back to the loop, which carries it out with the
//! checkpointer and the trainer (so the order of effects reads in one place, `supervisor.rs`).

use std::time::Duration;

use anyhow::anyhow;
use dreamloop::eval::EvalReport;
use dreamloop::rollback::{decide, EvalMetrics, EvalRecord, Policy, PolicyState, Verdict};
use ractor::{call_t, Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::trainer::TrainerMsg;

/// Registered name of the trainer actor.
pub const TRAINER: &str = "trainer";

/// One evaluation and the policy's answer.
#[derive(Debug, Clone)]
pub struct Evaluation {
    /// The probe suite's numbers.
    pub report: EvalReport,
    /// What the policy saw.
    pub record: EvalRecord,
    /// What the policy decided.
    pub verdict: Verdict,
    /// The policy state before this evaluation (the baseline it was compared with).
    pub before: PolicyState,
}

/// Messages of the monitor actor.
pub enum MonitorMsg {
    /// A step was skipped as non-finite.
    NonFiniteStep,
    /// Evaluate the trainer's weights, which are at `step`.
    Evaluate(u64, RpcReplyPort<Result<Evaluation, String>>),
    /// New thresholds (SIGHUP).
    SetPolicy(Policy),
    /// The replay ratio the policy starts its next adjustment from (SIGHUP).
    SetReplayRatio(f64),
    /// An operator resumed after a policy pause: the rollback window starts over.
    OperatorResumed,
    /// The policy state, for checkpoints and status.
    State(RpcReplyPort<PolicyState>),
    /// The last verdict could not be carried out (its GOOD checkpoint could not be
    /// written): the policy goes back to the state it had before that evaluation.
    Revert(PolicyState),
}

/// Start-up arguments.
pub struct MonitorArgs {
    /// The thresholds.
    pub policy: Policy,
    /// The state of the checkpoint resumed from, or a fresh one.
    pub state: PolicyState,
    /// Timeout of the evaluation call.
    pub call_timeout: Duration,
}

/// The actor state.
pub struct MonitorState {
    policy: Policy,
    state: PolicyState,
    non_finite_steps: u32,
    call_timeout: Duration,
}

/// The monitor actor (see the module docs).
pub struct MonitorActor;

/// The policy's view of a probe report. General accuracy pools arithmetic and code probes.
pub fn eval_metrics(r: &EvalReport) -> EvalMetrics {
    let general_count = (r.arithmetic.count + r.code.count).max(1) as f64;
    EvalMetrics {
        clear_accuracy: r.clear_direction.accuracy,
        clear_margin: r.clear_direction.margin,
        flawed_accuracy: r.flawed_direction.accuracy,
        flawed_margin: r.flawed_direction.margin,
        perplexity: r.perplexity,
        attention_on_direction: r.attention_on_direction,
        ablation_sensitivity: r.ablation_sensitivity,
        general_accuracy: (r.arithmetic.accuracy * r.arithmetic.count as f64
            + r.code.accuracy * r.code.count as f64)
            / general_count,
    }
}

impl Actor for MonitorActor {
    type Msg = MonitorMsg;
    type State = MonitorState;
    type Arguments = MonitorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<MonitorMsg>,
        args: MonitorArgs,
    ) -> Result<MonitorState, ActorProcessingErr> {
        Ok(MonitorState {
            policy: args.policy,
            state: args.state,
            non_finite_steps: 0,
            call_timeout: args.call_timeout,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<MonitorMsg>,
        msg: MonitorMsg,
        state: &mut MonitorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            MonitorMsg::NonFiniteStep => state.non_finite_steps += 1,
            MonitorMsg::Evaluate(step, reply) => {
                let result = evaluate(state, step).await;
                let _ = reply.send(result.map_err(|e| format!("{e:#}")));
            }
            MonitorMsg::SetPolicy(policy) => state.policy = policy,
            MonitorMsg::SetReplayRatio(ratio) => state.state.replay_ratio = ratio,
            MonitorMsg::OperatorResumed => state.state = state.state.operator_resumed(),
            MonitorMsg::State(reply) => {
                let _ = reply.send(state.state.clone());
            }
            MonitorMsg::Revert(before) => state.state = before,
        }
        Ok(())
    }
}

async fn evaluate(state: &mut MonitorState, step: u64) -> anyhow::Result<Evaluation> {
    let trainer: ActorRef<TrainerMsg> = ractor::registry::where_is(TRAINER)
        .map(ActorRef::from)
        .ok_or_else(|| anyhow!("the trainer is not running"))?;
    let report = call_t!(
        trainer,
        TrainerMsg::Evaluate,
        state.call_timeout.as_millis() as u64
    )?;
    let record = EvalRecord {
        step,
        metrics: eval_metrics(&report),
        non_finite_steps: state.non_finite_steps,
    };
    let verdict = decide(&record, &state.state, &state.policy);
    let before = state.state.clone();
    state.state = state.state.apply(&record, &verdict, &state.policy);
    state.non_finite_steps = 0;
    Ok(Evaluation {
        report,
        record,
        verdict,
        before,
    })
}
