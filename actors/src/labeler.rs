//! The labeler actor: scenarios and conversation logs → training examples.
//!
//! Wraps [`dreamloop::label::Labeler`], [`dreamloop::convo::ConvoReader`] and
//! [`dreamloop::pending::PendingQueue`]. On each [`LabelerMsg::Fill`] it first polls the log
//! directory (new files and appended lines), labels what it found, and keeps the examples
//! that neither the ledger nor the queue holds in the pending queue. The order is what
//! makes a log line trained once, never lost: the queue is written to
//! `<state_dir>/convo-pending.json` first, then the cursor to `<state_dir>/convo-cursor.json`,
//! then the hashes are admitted to the generator's ledger (see `src/pending.rs`). Then it
//! answers the mixer's request, class by class, from that queue first and from freshly
//! drawn scenarios (or general replay) for the rest.
//!
//! At start-up the queue comes back from disk, the examples of the batch that was in
//! flight are re-queued unless `trained.jsonl` shows them trained, and every queued hash is
//! admitted to the ledger again (idempotent) before the first batch.
//!
//! General examples are half general-kind scenarios, half replay (corpus text, arithmetic,
//! code, reasoning), so both sources of `[data]` are used.
//!
//! With a streamed DPO reference, the answer's pairs get their reference log-probs from
//! the trainer in blocks before they are handed on ([`precompute_references`]): a block is
//! the batch's pairs, queued pairs, and scenarios drawn ahead for the next batches, which
//! wait in the same durable queue (labeled in the phase of the moment they were drawn).

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use dreamloop::config::DreamConfig;
use dreamloop::convo::{ConvoConfig, ConvoReader};
use dreamloop::example::{Example, Kind, PairReference, Target};
use dreamloop::label::{LabelConfig, Labeler, Phase};
use dreamloop::metrics::names;
use dreamloop::mix::BatchPlan;
use dreamloop::pending::PendingQueue;
use dreamloop::segmented::read_newest_first;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::call::{self, ReplyError};
use crate::generator::{GeneratorMsg, GENERATOR};
use crate::status::{TrainedStep, TRAINED_FILE, TRAINED_STEM};
use crate::telemetry;
use crate::trainer::{TrainerMsg, TRAINER};

/// Registered name of the labeler actor.
pub const LABELER: &str = "labeler";

/// The pending queue's file name, beside the cursor.
pub const PENDING_FILE: &str = "convo-pending.json";

/// Messages of the labeler actor.
pub enum LabelerMsg {
    /// Examples for the classes of the plan, exactly as many of each.
    Fill(BatchPlan, RpcReplyPort<Result<Vec<Example>, ReplyError>>),
    /// Label later scenarios for another phase.
    SetPhase(Phase),
    /// Persist the log cursor (at a checkpoint).
    SaveCursor(RpcReplyPort<Result<(), ReplyError>>),
    /// Queue these examples again, durably: they were trained only in steps a crash or a
    /// trainer restart abandoned (the weights that learned them are gone). Answers how many
    /// were not queued already.
    Requeue(Vec<Example>, RpcReplyPort<Result<usize, ReplyError>>),
    /// Queue these new examples (the policy's own wrong replies as DPO pairs) like
    /// conversation-log examples: those the ledger knows are dropped, the rest are queued
    /// durably and then admitted to the ledger. Answers, per example, whether it was queued.
    Offer(Vec<Example>, RpcReplyPort<Result<Vec<bool>, ReplyError>>),
}

/// Start-up arguments.
pub struct LabelerArgs {
    /// `phase`, `[data] logs_dir`, `[queues] examples` are read.
    pub config: Arc<DreamConfig>,
    /// `<state_dir>/convo-cursor.json`; the pending queue and `trained.jsonl` are read
    /// beside it.
    pub cursor_path: PathBuf,
    /// Timeout of calls to the generator.
    pub call_timeout: Duration,
}

/// The actor state.
pub struct LabelerState {
    labeler: Labeler,
    /// `None` when `[data] logs_dir` is not set.
    reader: Option<ConvoReader>,
    /// Labeled log examples (and scenarios drawn ahead) waiting for a batch, durable
    /// (polling stops while it holds `[queues] examples` or more).
    from_logs: PendingQueue,
    /// Whether the queue's hashes still have to be (re)admitted to the ledger: true after
    /// start-up, when the previous process may have died between queueing and admitting.
    readmit: bool,
    capacity: usize,
    call_timeout: Duration,
    /// `[train] reference_block` with a streamed reference, else 0 (see
    /// [`precompute_references`]).
    reference_block: usize,
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
        let dir = args.cursor_path.parent().unwrap_or(Path::new("."));
        let pending_path = dir.join(PENDING_FILE);
        let (mut from_logs, in_flight) = PendingQueue::open(&pending_path)?;
        if !in_flight.is_empty() {
            let trained = trained_among(dir, &in_flight)?;
            let untrained: Vec<Example> = in_flight
                .into_iter()
                .filter(|e| !trained.contains(&e.hash().0))
                .collect();
            let n = from_logs.requeue(untrained);
            if n > 0 {
                tracing::info!(
                    examples = n,
                    "Log examples of a batch that was not trained before the restart are queued again."
                );
            }
        }
        from_logs.save()?;
        if !from_logs.is_empty() {
            tracing::info!(
                examples = from_logs.len(),
                path = %pending_path.display(),
                "Pending conversation-log examples restored."
            );
        }
        crate::telemetry::set_queue_capacity("examples", args.config.queues.examples);
        Ok(LabelerState {
            labeler: Labeler::new(&LabelConfig {
                phase: args.config.phase.first(),
                ..LabelConfig::default()
            }),
            reader,
            from_logs,
            readmit: true,
            capacity: args.config.queues.examples,
            call_timeout: args.call_timeout,
            reference_block: if args.config.model.stream_reference {
                args.config.train.reference_block
            } else {
                0
            },
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
                let _ = reply.send(filled);
            }
            LabelerMsg::SetPhase(phase) => state.labeler.set_phase(phase),
            LabelerMsg::Requeue(examples, reply) => {
                let queued = state.from_logs.requeue(examples);
                let saved = state.from_logs.save().map_err(ReplyError::persistent);
                if saved.is_ok() {
                    for _ in 0..queued {
                        telemetry::queue_pushed("examples");
                    }
                }
                let _ = reply.send(saved.map(|()| queued));
            }
            LabelerMsg::Offer(examples, reply) => {
                let hashes: Vec<u64> = examples.iter().map(|e| e.hash().0).collect();
                let queued = match readmit(state).await {
                    Ok(()) => enqueue_fresh(state, examples, |_| Ok(())).await,
                    Err(e) => Err(e),
                };
                let _ = reply.send(queued.map(|q| hashes.iter().map(|h| q.contains(h)).collect()));
            }
            LabelerMsg::SaveCursor(reply) => {
                // The queue first, for the same reason as in `poll_logs`.
                let saved = match &state.reader {
                    Some(r) => state
                        .from_logs
                        .save()
                        .map_err(ReplyError::persistent)
                        .and_then(|()| r.save_cursor().map_err(ReplyError::persistent)),
                    None => Ok(()),
                };
                let _ = reply.send(saved);
            }
        }
        Ok(())
    }
}

/// A call to the generator that it answers with a result: a failed call keeps its severity
/// (a timeout, or a generator being restarted, is transient); its error answer (exhausted
/// templates, a full ledger) is persistent.
async fn ask_generator<T: Send + 'static>(
    timeout: Duration,
    build: impl FnOnce(RpcReplyPort<Result<T, ReplyError>>) -> GeneratorMsg,
) -> Result<T, ReplyError> {
    call::call(GENERATOR, timeout, build)
        .await
        .map_err(ReplyError::from_call)?
        .map_err(|e| ReplyError {
            severity: e.severity,
            message: format!("the generator: {e}"),
        })
}

/// A call to the generator that always answers.
async fn ask_generator_plain<T: Send + 'static>(
    timeout: Duration,
    build: impl FnOnce(RpcReplyPort<T>) -> GeneratorMsg,
) -> Result<T, ReplyError> {
    call::call(GENERATOR, timeout, build)
        .await
        .map_err(ReplyError::from_call)
}

/// Records `trained.jsonl` is searched back for the in-flight examples. In flight means
/// handed to the latest batch, which was trained (if at all) after every earlier hand-out's
/// batch, so its record is the newest one; the rest is margin for batches queued ahead of
/// the trainer (`[queues] trainer`).
const IN_FLIGHT_LOOKBACK: usize = 16;

/// Which of `examples` the newest records of `trained.jsonl` show trained (read newest first,
/// stopping once all are found or [`IN_FLIGHT_LOOKBACK`] records were read; only the hashes
/// asked about are kept). A missing log shows none.
fn trained_among(state_dir: &Path, examples: &[Example]) -> anyhow::Result<HashSet<u64>> {
    let wanted: HashSet<u64> = examples.iter().map(|e| e.hash().0).collect();
    let mut found = HashSet::new();
    let mut read = 0;
    // A torn last line (a crash mid-append) is not a record: read_newest_first skips it.
    read_newest_first(state_dir, TRAINED_STEM, |record: TrainedStep| {
        read += 1;
        found.extend(
            record
                .examples
                .iter()
                .map(|e| e.hash().0)
                .filter(|h| wanted.contains(h)),
        );
        if found.len() == wanted.len() || read >= IN_FLIGHT_LOOKBACK {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })
    .with_context(|| format!("reading {}", state_dir.join(TRAINED_FILE).display()))?;
    Ok(found)
}

/// The `kind` label of `labeler_examples_total`.
fn format_label(e: &Example) -> &'static str {
    match e.target {
        Target::Sft { .. } => "sft",
        Target::Dpo { .. } => "dpo",
    }
}

/// Admits every queued hash to the ledger once after start-up: the previous process may
/// have queued them (durably) and died before admitting them.
async fn readmit(state: &mut LabelerState) -> Result<(), ReplyError> {
    if !state.readmit {
        return Ok(());
    }
    let hashes: Vec<u64> = state.from_logs.hashes().collect();
    if !hashes.is_empty() {
        ask_generator(state.call_timeout, |r| GeneratorMsg::Admit(hashes, r)).await?;
    }
    state.readmit = false;
    Ok(())
}

/// Polls the logs into the queue while it has room.
async fn poll_logs(state: &mut LabelerState) -> Result<(), ReplyError> {
    let Some(reader) = state.reader.as_mut() else {
        return Ok(());
    };
    if state.from_logs.len() >= state.capacity {
        return Ok(());
    }
    let poll = reader.poll().map_err(ReplyError::persistent)?;
    telemetry::counter(names::CONVO_LINES_READ_TOTAL, &[])
        .increment((poll.conversations.len() + poll.malformed.len()) as u64);
    telemetry::counter(names::CONVO_LINES_MALFORMED_TOTAL, &[])
        .increment(poll.malformed.len() as u64);
    for bad in &poll.malformed {
        tracing::warn!(%bad, "Conversation log line skipped.");
    }
    let mut examples = Vec::new();
    let mut seen = HashSet::new();
    for conversation in &poll.conversations {
        let labeled = state.labeler.conversation(conversation);
        for skipped in &labeled.skipped {
            tracing::info!(%skipped, "Conversation signal not used.");
        }
        for e in labeled.examples {
            telemetry::counter(names::LABELER_EXAMPLES_TOTAL, &[("kind", format_label(&e))])
                .increment(1);
            let h = e.hash().0;
            if seen.insert(h) && !state.from_logs.contains(h) {
                examples.push(e);
            }
        }
    }
    enqueue_fresh(state, examples, |state| {
        state
            .reader
            .as_ref()
            .map_or(Ok(()), |r| r.save_cursor().map_err(ReplyError::persistent))
    })
    .await
    .map(|_| ())
}

/// Queues the `examples` the ledger does not know yet, durably, then admits them to the
/// ledger; `after_save` runs once the queue is on disk and before the ledger learns the
/// hashes (the log cursor moves there). Answers the hashes queued.
async fn enqueue_fresh(
    state: &mut LabelerState,
    examples: Vec<Example>,
    after_save: impl FnOnce(&LabelerState) -> Result<(), ReplyError>,
) -> Result<HashSet<u64>, ReplyError> {
    let timeout = state.call_timeout;
    let fresh = if examples.is_empty() {
        Vec::new()
    } else {
        let hashes = examples.iter().map(|e| e.hash().0).collect();
        let known = ask_generator_plain(timeout, |r| GeneratorMsg::Known(hashes, r)).await?;
        examples
            .into_iter()
            .zip(known)
            .filter_map(|(e, known)| (!known).then_some(e))
            .collect()
    };
    let hashes: Vec<u64> = fresh.iter().map(|e| e.hash().0).collect();
    let queued = state.from_logs.requeue(fresh);
    // Durable before the cursor moves past these lines and before the ledger learns their
    // hashes: a crash in between re-reads the lines and finds them queued, never lost.
    state.from_logs.save().map_err(ReplyError::persistent)?;
    after_save(state)?;
    if hashes.is_empty() {
        return Ok(HashSet::new());
    }
    let admitted = ask_generator(timeout, |r| GeneratorMsg::Admit(hashes.clone(), r)).await?;
    // Only a scenario drawn since the check can have taken a hash; that copy wins.
    let taken: HashSet<u64> = hashes
        .iter()
        .zip(admitted)
        .filter_map(|(&h, new)| (!new).then_some(h))
        .collect();
    if !taken.is_empty() {
        state.from_logs.remove(&taken);
        state.from_logs.save().map_err(ReplyError::persistent)?;
    }
    for _ in 0..queued - taken.len() {
        telemetry::queue_pushed("examples");
    }
    Ok(hashes.into_iter().filter(|h| !taken.contains(h)).collect())
}

async fn fill(state: &mut LabelerState, plan: BatchPlan) -> Result<Vec<Example>, ReplyError> {
    readmit(state).await?;
    poll_logs(state).await?;
    let wanted = [
        (Kind::ClearDirection, plan.accept),
        (Kind::FlawedDirection, plan.push_back),
        (Kind::General, plan.general),
    ];
    // The previous batch was trained (or abandoned) before this request: the loop asks
    // for one batch at a time. These become the in-flight batch on disk.
    let logged = state.from_logs.take(&wanted);
    state.from_logs.save().map_err(ReplyError::persistent)?;
    match fill_rest(state, &wanted, &logged).await {
        Ok(out) => {
            for _ in logged.iter().flatten() {
                telemetry::queue_popped("examples");
            }
            Ok(precompute_references(state, &wanted, out).await)
        }
        Err(e) => {
            // Not handed on: back to the queue, so the next request takes them again.
            state
                .from_logs
                .requeue(logged.into_iter().flatten().collect());
            state.from_logs.save().map_err(ReplyError::persistent)?;
            Err(e)
        }
    }
}

/// With a streamed DPO reference, each pass over its files is made for a block of pairs
/// (`[train] reference_block`): when the batch about to be trained has pairs without
/// reference log-probs, they go to the trainer together with queued pairs that have none,
/// and, if the block still has room and scenarios are labeled as pairs, with scenarios
/// drawn now for the next batches and queued. The sums come back stored with each pair
/// (`Example::reference`), in the batch and, durably, in the queue. A failed pass only costs
/// time: the steps compute their pairs themselves.
async fn precompute_references(
    state: &mut LabelerState,
    wanted: &[(Kind, usize)],
    mut out: Vec<Example>,
) -> Vec<Example> {
    let lacking = |e: &Example| matches!(e.target, Target::Dpo { .. }) && e.reference.is_none();
    if state.reference_block == 0 || !out.iter().any(lacking) {
        return out;
    }
    let mut block: Vec<Example> = out.iter().filter(|e| lacking(e)).cloned().collect();
    let room = state.reference_block.saturating_sub(block.len());
    block.extend(state.from_logs.lacking_reference(room));
    let room = state.reference_block.saturating_sub(block.len());
    match draw_ahead(state, wanted, room).await {
        Ok(ahead) => block.extend(ahead),
        Err(e) => {
            tracing::warn!(error = %format!("{e:#}"), "Scenarios for the next batches were not drawn ahead.")
        }
    }
    let pairs = block.len();
    let timeout = state.call_timeout;
    let done = call::call(TRAINER, timeout, |reply| {
        TrainerMsg::PrecomputeReference(block, reply)
    })
    .await;
    let done = match done
        .map_err(ReplyError::from_call)
        .and_then(|answer| answer)
    {
        Ok(done) => done,
        Err(e) => {
            tracing::warn!(error = %e, pairs, "Reference log-probs not precomputed; the steps compute them.");
            return out;
        }
    };
    let references: HashMap<u64, PairReference> = done
        .iter()
        .filter_map(|e| e.reference.map(|r| (e.hash().0, r)))
        .collect();
    for e in &mut out {
        if let Some(r) = references.get(&e.hash().0) {
            e.reference = Some(*r);
        }
    }
    state.from_logs.set_references(&references);
    if let Err(e) = state.from_logs.save() {
        tracing::warn!(error = %e, "The pending queue's reference log-probs were not saved; they are computed again after a restart.");
    }
    out
}

/// Scenarios for the batches after this one, labeled and queued, so that their pairs share
/// the current pass over the reference: as many whole batches' worth of the behavioural
/// classes in `wanted` as `room` pairs allow, within the queue's capacity. Nothing when the
/// phase labels scenarios as SFT. Answers the queued pairs.
async fn draw_ahead(
    state: &mut LabelerState,
    wanted: &[(Kind, usize)],
    room: usize,
) -> Result<Vec<Example>, ReplyError> {
    let per_batch: usize = wanted
        .iter()
        .filter(|(kind, _)| *kind != Kind::General)
        .map(|&(_, n)| n)
        .sum();
    let free = state.capacity.saturating_sub(state.from_logs.len());
    if state.labeler.phase() == Phase::Sft || per_batch == 0 {
        return Ok(Vec::new());
    }
    let batches = room.min(free) / per_batch;
    if batches == 0 {
        return Ok(Vec::new());
    }
    let timeout = state.call_timeout;
    let mut drawn = Vec::new();
    for &(kind, n) in wanted.iter().filter(|(kind, _)| *kind != Kind::General) {
        if n == 0 {
            continue;
        }
        let scenarios =
            ask_generator(timeout, |r| GeneratorMsg::Draw(kind, n * batches, r)).await?;
        drawn.extend(scenarios.iter().map(|s| state.labeler.scenario(s)));
    }
    let pairs: Vec<Example> = drawn
        .iter()
        .filter(|e| matches!(e.target, Target::Dpo { .. }))
        .cloned()
        .collect();
    let queued = state.from_logs.requeue(drawn);
    // Durable before they are used: drawn scenarios are already in the ledger, so one lost
    // here is never trained (as one lost with the mixer's pools at a crash).
    state.from_logs.save().map_err(ReplyError::persistent)?;
    for _ in 0..queued {
        telemetry::queue_pushed("examples");
    }
    Ok(pairs)
}

/// The batch: the log examples taken, topped up with scenarios and replay per class.
async fn fill_rest(
    state: &mut LabelerState,
    wanted: &[(Kind, usize)],
    logged: &[Vec<Example>],
) -> Result<Vec<Example>, ReplyError> {
    let timeout = state.call_timeout;
    let mut out = Vec::with_capacity(wanted.iter().map(|&(_, n)| n).sum());
    for (&(kind, n), logged) in wanted.iter().zip(logged) {
        let mut missing = n - logged.len();
        out.extend(logged.iter().cloned());
        if kind == Kind::General {
            let replayed = missing - missing / 2;
            if replayed > 0 {
                out.extend(ask_generator(timeout, |r| GeneratorMsg::Replay(replayed, r)).await?);
            }
            missing /= 2;
        }
        if missing > 0 {
            let scenarios =
                ask_generator(timeout, |r| GeneratorMsg::Draw(kind, missing, r)).await?;
            out.extend(scenarios.iter().map(|s| state.labeler.scenario(s)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::call::Severity;

    /// A generator that answers `Draw` with an error and never answers `Replay`.
    struct FakeGenerator;

    impl Actor for FakeGenerator {
        type Msg = GeneratorMsg;
        type State = ();
        type Arguments = ();

        async fn pre_start(
            &self,
            _myself: ActorRef<GeneratorMsg>,
            _args: (),
        ) -> Result<(), ActorProcessingErr> {
            Ok(())
        }

        async fn handle(
            &self,
            _myself: ActorRef<GeneratorMsg>,
            msg: GeneratorMsg,
            _state: &mut (),
        ) -> Result<(), ActorProcessingErr> {
            match msg {
                GeneratorMsg::Draw(_, _, reply) => {
                    let _ = reply.send(Err(ReplyError::persistent("the templates are exhausted")));
                }
                // Held, never answered: the caller times out.
                GeneratorMsg::Replay(_, reply) => std::mem::forget(reply),
                _ => {}
            }
            Ok(())
        }
    }

    /// The labeler used to answer every failure as a `String`, which the mixer took as
    /// persistent: a generator that only timed out stopped the daemon with exit 78. Now a
    /// failed call is transient (retried against the restart budget) and only the
    /// generator's own error answer is persistent.
    #[tokio::test]
    async fn a_generator_timeout_is_transient_and_its_error_answer_persistent() {
        let timeout = Duration::from_millis(200);
        let missing = ask_generator(timeout, |r| GeneratorMsg::Replay(1, r))
            .await
            .unwrap_err();
        assert_eq!(missing.severity, Severity::Transient, "{missing}");
        let (actor, handle) = Actor::spawn(Some(GENERATOR.into()), FakeGenerator, ())
            .await
            .expect("spawn the fake generator");
        let slow = ask_generator(timeout, |r| GeneratorMsg::Replay(1, r))
            .await
            .unwrap_err();
        assert_eq!(slow.severity, Severity::Transient, "{slow}");
        let refused = ask_generator(timeout, |r| GeneratorMsg::Draw(Kind::General, 1, r))
            .await
            .unwrap_err();
        assert_eq!(refused.severity, Severity::Persistent, "{refused}");
        assert!(refused.message.contains("exhausted"), "{refused}");
        actor.stop(None);
        handle.await.expect("the fake generator stops");
    }
}
