//! The generator actor: fresh scenarios and general replay examples, never repeating.
//!
//! Wraps [`dreamloop::scenario::Generator`] (templates + the persistent never-repeat ledger
//! in `<state_dir>/ledger/`) and [`dreamloop::general::GeneralReplay`]. The ledger is the one
//! never-repeat set of the daemon, so examples from other sources (general replay,
//! conversation logs) are admitted through it too ([`GeneratorMsg::Admit`]): an example whose
//! hash is already there is dropped before it can reach the trainer.
//!
//! With `[dream]` on, a draw takes up to `[dream] share` of its scenarios from the dreamer's
//! queue first (`dreamer.rs`), each admitted through the ledger like a rendering; templates
//! fill the rest.
//!
//! Every error answer is persistent (exhausted templates or replay sources, a ledger that
//! cannot be written): a retry would repeat it.
//!
//! RNG state across restarts: the scenario stream is chosen by the ledger position (see the
//! core generator's docs) and the replay stream is seeded from `[data] seed` and the same
//! position, so a restarted daemon draws new examples instead of re-drawing old ones.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use dreamloop::config::DreamConfig;
use dreamloop::example::{Example, Kind, Scenario};
use dreamloop::general::{Corpus, GeneralReplay};
use dreamloop::scenario::{Generator, GeneratorConfig, Ledger, LedgerPolicy, Library};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::call::{self, ReplyError};
use crate::dreamer::{DreamerMsg, DREAMER};
use crate::telemetry;

/// Registered name of the generator actor.
pub const GENERATOR: &str = "generator";

/// How long a draw waits for the dreamer's queue (it answers from memory at once).
const DREAM_TAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Draws per request before giving up on replay duplicates (arithmetic repeats sometimes).
const REPLAY_ATTEMPTS: usize = 1000;

/// Messages of the generator actor.
pub enum GeneratorMsg {
    /// `n` fresh train scenarios of `kind`.
    Draw(Kind, usize, RpcReplyPort<Result<Vec<Scenario>, ReplyError>>),
    /// `n` fresh general replay examples.
    Replay(usize, RpcReplyPort<Result<Vec<Example>, ReplyError>>),
    /// Records each hash in the ledger; answers, per hash, whether it was new.
    Admit(Vec<u64>, RpcReplyPort<Result<Vec<bool>, ReplyError>>),
    /// Answers, per hash, whether the ledger holds it (records nothing): the labeler
    /// queues log examples durably between this check and [`GeneratorMsg::Admit`].
    Known(Vec<u64>, RpcReplyPort<Vec<bool>>),
    /// fsync the ledger (before a checkpoint); answers its position.
    Sync(RpcReplyPort<Result<u64, ReplyError>>),
    /// The general sources' relative weights from now on (targeted replay).
    SetReplayWeights([f64; 4], RpcReplyPort<()>),
}

/// Start-up arguments.
pub struct GeneratorArgs {
    /// `[data]` is read.
    pub config: Arc<DreamConfig>,
    /// `<state_dir>/ledger`.
    pub ledger_dir: PathBuf,
}

/// The actor state.
pub struct GeneratorState {
    /// Scenario generator; owns the ledger.
    generator: Generator,
    /// General replay stream.
    replay: GeneralReplay,
    /// `[dream] share` when dreaming is on.
    dream_share: Option<f64>,
    /// Dreamed scenarios owed to the draws so far (the fraction carried between draws).
    dream_credit: f64,
}

/// The generator actor (see the module docs).
pub struct GeneratorActor;

impl Actor for GeneratorActor {
    type Msg = GeneratorMsg;
    type State = GeneratorState;
    type Arguments = GeneratorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<GeneratorMsg>,
        args: GeneratorArgs,
    ) -> Result<GeneratorState, ActorProcessingErr> {
        let data = &args.config.data;
        let library = load_library(&args.config)?;
        let (ledger, recovery) = Ledger::open(&args.ledger_dir, LedgerPolicy::default())
            .with_context(|| format!("opening the ledger in {}", args.ledger_dir.display()))?;
        if recovery.repaired() {
            tracing::warn!(
                ?recovery,
                "The never-repeat ledger was repaired after a crash."
            );
        }
        let position = ledger.position();
        let generator = Generator::new(
            library,
            ledger,
            GeneratorConfig {
                seed: data.seed,
                probe_samples: args.config.eval.probe_samples,
                ..GeneratorConfig::default()
            },
        )?;
        let corpus = Corpus::load_train(&data.scenarios_dir).with_context(|| {
            format!(
                "loading the general corpus of {}",
                data.scenarios_dir.display()
            )
        })?;
        let seed = data.seed ^ position.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let replay = GeneralReplay::new(corpus, seed, args.config.general_config());
        tracing::info!(
            ledger_entries = generator.ledger().len(),
            position,
            "Generator ready."
        );
        telemetry::set_ledger_entries(generator.ledger().len());
        Ok(GeneratorState {
            generator,
            replay,
            dream_share: args.config.dream.as_ref().map(|d| d.share),
            dream_credit: 0.0,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<GeneratorMsg>,
        msg: GeneratorMsg,
        state: &mut GeneratorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GeneratorMsg::Draw(kind, n, reply) => {
                let dreamed = match take_dreams(state, kind, n).await {
                    Ok(dreamed) => dreamed,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Ok(());
                    }
                };
                let skipped = state.generator.duplicates_skipped();
                let rendered: Result<Vec<Scenario>, _> = (dreamed.len()..n)
                    .map(|_| state.generator.next_of(kind))
                    .collect();
                let new = rendered.as_ref().map_or(0, Vec::len);
                let duplicates = state.generator.duplicates_skipped() - skipped;
                telemetry::record_generated(kind.as_str(), new, duplicates);
                telemetry::set_ledger_entries(state.generator.ledger().len());
                let drawn = rendered.map(|rendered| dreamed.into_iter().chain(rendered).collect());
                let _ = reply.send(drawn.map_err(ReplyError::persistent));
            }
            GeneratorMsg::SetReplayWeights(weights, reply) => {
                state.replay.set_weights(weights);
                telemetry::set_replay_weights(weights);
                let _ = reply.send(());
            }
            GeneratorMsg::Replay(n, reply) => {
                let _ = reply.send(replay(state, n));
                telemetry::set_ledger_entries(state.generator.ledger().len());
            }
            GeneratorMsg::Admit(hashes, reply) => {
                let ledger = state.generator.ledger_mut();
                let admitted: Result<Vec<bool>, _> = hashes
                    .into_iter()
                    .map(|h| ledger.insert(dreamloop::example::ExampleHash(h)))
                    .collect();
                telemetry::set_ledger_entries(ledger.len());
                let _ = reply.send(admitted.map_err(ReplyError::persistent));
            }
            GeneratorMsg::Known(hashes, reply) => {
                let ledger = state.generator.ledger();
                let known = hashes
                    .into_iter()
                    .map(|h| ledger.contains(dreamloop::example::ExampleHash(h)))
                    .collect();
                let _ = reply.send(known);
            }
            GeneratorMsg::Sync(reply) => {
                let ledger = state.generator.ledger_mut();
                let _ = reply.send(
                    ledger
                        .sync()
                        .map(|()| ledger.position())
                        .map_err(ReplyError::persistent),
                );
            }
        }
        Ok(())
    }
}

/// The template library of `[data] scenarios_dir` (the generator's and the dreamer's).
pub fn load_library(config: &DreamConfig) -> anyhow::Result<Library> {
    let dir = &config.data.scenarios_dir;
    Library::load_dir(dir)
        .with_context(|| format!("loading scenario templates from {}", dir.display()))
}

/// Up to `[dream] share` of `n` scenarios of `kind` from the dreamer's queue (an exact carry
/// across draws, so single draws get their share too), each admitted through the ledger;
/// none when dreaming is off or the dreamer has none ready. A dreamer that does not answer
/// (restarting, busy) costs nothing but its dreams: the templates fill in.
async fn take_dreams(
    state: &mut GeneratorState,
    kind: Kind,
    n: usize,
) -> Result<Vec<Scenario>, ReplyError> {
    let Some(share) = state.dream_share else {
        return Ok(Vec::new());
    };
    state.dream_credit += n as f64 * share;
    let want = (state.dream_credit.floor() as usize).min(n);
    state.dream_credit -= want as f64;
    if want == 0 {
        return Ok(Vec::new());
    }
    let offered = call::call(DREAMER, DREAM_TAKE_TIMEOUT, |reply| {
        DreamerMsg::Take(kind, want, reply)
    })
    .await
    .unwrap_or_default();
    let mut admitted = Vec::with_capacity(offered.len());
    for scenario in offered {
        let key = scenario.ledger_key();
        if state
            .generator
            .ledger_mut()
            .insert(key)
            .map_err(ReplyError::persistent)?
        {
            admitted.push(scenario);
        } else {
            telemetry::record_dream_rejected("exact_duplicate");
        }
    }
    Ok(admitted)
}

/// `n` replay examples whose hashes were new to the ledger (counted as `general` scenarios;
/// the draws the ledger already held as skipped duplicates).
fn replay(state: &mut GeneratorState, n: usize) -> Result<Vec<Example>, ReplyError> {
    let mut out = Vec::with_capacity(n);
    let mut attempts = 0;
    let drawn = loop {
        if out.len() == n {
            break Ok(());
        }
        attempts += 1;
        if attempts > REPLAY_ATTEMPTS + n {
            break Err(ReplyError::persistent(format!(
                "general replay produced {REPLAY_ATTEMPTS} duplicates; the sources are exhausted"
            )));
        }
        let example = state.replay.next_example();
        match state.generator.ledger_mut().insert(example.hash()) {
            Ok(true) => out.push(example),
            Ok(false) => {}
            Err(e) => break Err(ReplyError::persistent(e)),
        }
    };
    let duplicates = attempts.saturating_sub(out.len()) as u64;
    telemetry::record_generated(Kind::General.as_str(), out.len(), duplicates);
    drawn.map(|()| out)
}
