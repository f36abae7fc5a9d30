//! The labeler actor: scenarios and conversation logs → training examples.
//!
//! Wraps [`dreamloop::label::Labeler`] and [`dreamloop::convo::ConvoReader`]. On each
//! [`LabelerMsg::Fill`] it first polls the log directory (new files and appended lines; the
//! cursor lives in `<state_dir>/convo-cursor.json` and is saved at every checkpoint), labels
//! what it found, admits the examples through the generator's ledger (so a log line is
//! never trained twice, even after a restart re-reads it), and keeps them in a bounded
//! queue. Then it answers the mixer's request, class by class, from that queue first and
//! from freshly drawn scenarios (or general replay) for the rest.
//!
//! General examples are half general-kind scenarios, half replay (corpus text, arithmetic,
//! code, reasoning), so both sources of `[data]` are used.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use dreamloop::config::DreamConfig;
use dreamloop::convo::{ConvoConfig, ConvoReader};
use dreamloop::example::{Example, Kind};
use dreamloop::label::{LabelConfig, Labeler, Phase};
use dreamloop::mix::BatchPlan;
use ractor::{call_t, Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::generator::GeneratorMsg;

/// Registered name of the generator actor (looked up on every request, so a restarted
/// generator is found).
pub const GENERATOR: &str = "generator";

/// Messages of the labeler actor.
pub enum LabelerMsg {
    /// Examples for the classes of the plan, exactly as many of each.
    Fill(BatchPlan, RpcReplyPort<Result<Vec<Example>, String>>),
    /// Label later scenarios for another phase.
    SetPhase(Phase),
    /// Persist the log cursor (at a checkpoint).
    SaveCursor(RpcReplyPort<Result<(), String>>),
}

/// Start-up arguments.
pub struct LabelerArgs {
    /// `phase`, `[data] logs_dir`, `[queues] examples` are read.
    pub config: Arc<DreamConfig>,
    /// `<state_dir>/convo-cursor.json`.
    pub cursor_path: PathBuf,
    /// Timeout of calls to the generator.
    pub call_timeout: Duration,
}

/// The actor state.
pub struct LabelerState {
    labeler: Labeler,
    /// `None` when `[data] logs_dir` is not set.
    reader: Option<ConvoReader>,
    /// Labeled log examples waiting for a batch (bounded by `[queues] examples`).
    from_logs: VecDeque<Example>,
    capacity: usize,
    call_timeout: Duration,
}

/// The labeler actor (see the module docs).
pub struct LabelerActor;

impl Actor for LabelerActor {
    type Msg = LabelerMsg;
    type State = LabelerState;
    type Arguments = LabelerArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<LabelerMsg>,
        args: LabelerArgs,
    ) -> Result<LabelerState, ActorProcessingErr> {
        let reader = match &args.config.data.logs_dir {
            Some(dir) => Some(
                ConvoReader::open(dir, Some(&args.cursor_path), ConvoConfig::default())
                    .with_context(|| format!("opening conversation logs in {}", dir.display()))?,
            ),
            None => None,
        };
        crate::telemetry::set_queue_capacity("examples", args.config.queues.examples);
        Ok(LabelerState {
            labeler: Labeler::new(&LabelConfig {
                phase: args.config.phase,
                ..LabelConfig::default()
            }),
            reader,
            from_logs: VecDeque::new(),
            capacity: args.config.queues.examples,
            call_timeout: args.call_timeout,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<LabelerMsg>,
        msg: LabelerMsg,
        state: &mut LabelerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            LabelerMsg::Fill(plan, reply) => {
                let filled = fill(state, plan).await;
                let _ = reply.send(filled.map_err(|e| format!("{e:#}")));
            }
            LabelerMsg::SetPhase(phase) => state.labeler.set_phase(phase),
            LabelerMsg::SaveCursor(reply) => {
                let saved = match &state.reader {
                    Some(r) => r.save_cursor().map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                let _ = reply.send(saved);
            }
        }
        Ok(())
    }
}

fn generator() -> anyhow::Result<ActorRef<GeneratorMsg>> {
    ractor::registry::where_is(GENERATOR)
        .map(ActorRef::from)
        .ok_or_else(|| anyhow!("the generator is not running"))
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Polls the logs into the queue while it has room.
async fn poll_logs(state: &mut LabelerState) -> anyhow::Result<()> {
    let Some(reader) = state.reader.as_mut() else {
        return Ok(());
    };
    if state.from_logs.len() >= state.capacity {
        return Ok(());
    }
    let poll = reader.poll()?;
    for bad in &poll.malformed {
        tracing::warn!(%bad, "Conversation log line skipped.");
    }
    let mut examples = Vec::new();
    for conversation in &poll.conversations {
        let labeled = state.labeler.conversation(conversation);
        for skipped in &labeled.skipped {
            tracing::info!(%skipped, "Conversation signal not used.");
        }
        examples.extend(labeled.examples);
    }
    if examples.is_empty() {
        return Ok(());
    }
    let hashes = examples.iter().map(|e| e.hash().0).collect();
    let timeout = ms(state.call_timeout);
    let fresh =
        call_t!(generator()?, GeneratorMsg::Admit, timeout, hashes)?.map_err(|e| anyhow!(e))?;
    for (example, new) in examples.into_iter().zip(fresh) {
        if new {
            state.from_logs.push_back(example);
            crate::telemetry::queue_pushed("examples");
        }
    }
    Ok(())
}

/// Takes up to `n` queued log examples of `kind`.
fn take_logged(queue: &mut VecDeque<Example>, kind: Kind, n: usize) -> Vec<Example> {
    let mut out = Vec::new();
    let mut rest = VecDeque::with_capacity(queue.len());
    while let Some(e) = queue.pop_front() {
        if out.len() < n && e.kind == kind {
            out.push(e);
        } else {
            rest.push_back(e);
        }
    }
    *queue = rest;
    out
}

async fn fill(state: &mut LabelerState, plan: BatchPlan) -> anyhow::Result<Vec<Example>> {
    poll_logs(state).await?;
    let timeout = ms(state.call_timeout);
    let gen = generator()?;
    let mut out = Vec::with_capacity(plan.general + plan.accept + plan.push_back);
    for (kind, n) in [
        (Kind::ClearDirection, plan.accept),
        (Kind::FlawedDirection, plan.push_back),
        (Kind::General, plan.general),
    ] {
        let logged = take_logged(&mut state.from_logs, kind, n);
        for _ in &logged {
            crate::telemetry::queue_popped("examples");
        }
        let mut missing = n - logged.len();
        out.extend(logged);
        if kind == Kind::General {
            let replayed = missing - missing / 2;
            if replayed > 0 {
                out.extend(
                    call_t!(gen, GeneratorMsg::Replay, timeout, replayed)?
                        .map_err(|e| anyhow!(e))?,
                );
            }
            missing /= 2;
        }
        if missing > 0 {
            let scenarios = call_t!(gen, GeneratorMsg::Draw, timeout, kind, missing)?
                .map_err(|e| anyhow!(e))?;
            out.extend(scenarios.iter().map(|s| state.labeler.scenario(s)));
        }
    }
    Ok(out)
}
