//! The monitor actor: the one owner of the rollback policy's state. It judges each
//! evaluation — maps the [`EvalReport`] to the policy's [`EvalRecord`] (with the non-finite
//! steps the trainer skipped since the last evaluation), runs the pure [`decide`] and
//! advances the [`PolicyState`] — and answers at once: it never calls another actor.
//!
//! The loop asks the trainer for the report itself (an evaluation can outlast the call
//! timeout, and a shutdown must be able to cancel it), then asks the monitor for the
//! verdict and carries it out with the checkpointer and the trainer (so the order of
//! effects reads in one place, `supervisor.rs`).

use dreamloop::eval::EvalReport;
use dreamloop::rollback::{decide, EvalMetrics, EvalRecord, Policy, PolicyState, Verdict};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

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
    /// The policy state after it (what the next checkpoint persists).
    pub after: PolicyState,
}

/// Messages of the monitor actor.
pub enum MonitorMsg {
    /// A step was skipped as non-finite.
    NonFiniteStep,
    /// Judge this report of the weights at `step`.
    Judge(u64, Box<EvalReport>, RpcReplyPort<Evaluation>),
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
}

/// The actor state.
pub struct MonitorState {
    policy: Policy,
    state: PolicyState,
    non_finite_steps: u32,
}

/// The monitor actor (see the module docs).
pub struct MonitorActor;

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
            MonitorMsg::Judge(step, report, reply) => {
                let _ = reply.send(judge(state, step, *report));
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

fn judge(state: &mut MonitorState, step: u64, report: EvalReport) -> Evaluation {
    let record = EvalRecord {
        step,
        metrics: EvalMetrics::from_report(&report),
        non_finite_steps: state.non_finite_steps,
    };
    let verdict = decide(&record, &state.state, &state.policy);
    let before = state.state.clone();
    state.state = state.state.apply(&record, &verdict, &state.policy);
    state.non_finite_steps = 0;
    Evaluation {
        report,
        record,
        verdict,
        before,
        after: state.state.clone(),
    }
}
