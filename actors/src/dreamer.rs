//! The dreamer actor: scenarios written by a model behind an OpenAI-compatible server
//! (`[dream]`), produced in the background into a bounded queue per kind, from which the
//! generator takes them before it renders templates.
//!
//! Wraps [`dreamloop::dream::Dreamer`] (seeds from the template library, the request,
//! validation, the near-duplicate filter) and [`ChatClient`]. Up to `[dream] concurrency`
//! requests are in flight at once, each on a blocking thread; an answer comes back to the
//! actor as [`DreamerMsg::Answered`], is validated, and a valid dream is queued for its kind
//! (at most `[queues] examples` per kind; a full kind is not requested). [`DreamerMsg::Take`]
//! answers at once from the queue, with fewer scenarios than asked (none) when the server is
//! slow or down: the step never waits on the server, and the templates fill the rest.
//!
//! A failed request (refused connection, timeout, HTTP error, malformed body) is counted by
//! kind and backed off (1 s doubling to 5 min); the first failure after a success is an event
//! and a warning, the first success after failures another. Queued dreams are not in the
//! ledger until the generator takes them, so a restart loses none that could have trained:
//! they are dreamed anew. The near-duplicate window starts empty after a restart (the ledger
//! still refuses exact repeats).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use dreamloop::config::DreamConfig;
use dreamloop::dream::{
    provenance, Backoff, ChatClient, ClientError, Completion, Dreamer, ResponseFormat, Seed,
};
use dreamloop::events::{Event, EventLog};
use dreamloop::example::{Kind, Scenario};
use dreamloop::scenario::probe_scenarios;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use crate::telemetry;

/// Registered name of the dreamer actor.
pub const DREAMER: &str = "dreamer";

/// The first back-off after a failed request.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// The longest back-off: a server down for hours is asked every 5 minutes.
const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Messages of the dreamer actor.
pub enum DreamerMsg {
    /// Up to `n` dreamed scenarios of `kind` from the queue, at once (possibly none).
    Take(Kind, usize, RpcReplyPort<Vec<Scenario>>),
    /// A request's outcome, sent by the request's own thread.
    Answered(Box<Seed>, Result<Completion, ClientError>),
    /// Send more requests if there is room (after an answer or a back-off).
    Wake,
}

/// Start-up arguments.
pub struct DreamerArgs {
    /// `[dream]` (present: the supervisor spawns no dreamer otherwise), `[data]`, `[eval]`.
    pub config: Arc<DreamConfig>,
    /// `events.jsonl`: the server going down and coming back.
    pub events: Arc<Mutex<EventLog>>,
}

/// The actor state.
pub struct DreamerState {
    /// The server's client, shared with the request threads.
    client: Arc<ChatClient>,
    /// Seeds, requests, validation, near-duplicates.
    dreamer: Dreamer,
    /// JSON mode or plain text.
    format: ResponseFormat,
    /// Valid dreams per kind, in [`KINDS`] order.
    queues: [VecDeque<Scenario>; 3],
    /// Requests in flight per kind.
    in_flight: [usize; 3],
    /// Most dreams queued (plus in flight) per kind.
    capacity: usize,
    /// Most requests in flight.
    concurrency: usize,
    /// Delay before the next request after failures.
    backoff: Backoff,
    /// A back-off is running: no request until its `Wake`.
    backing_off: bool,
    /// The last request failed (the server counts as down until one succeeds).
    down: bool,
    /// `events.jsonl`.
    events: Arc<Mutex<EventLog>>,
}

/// The kinds in queue order.
const KINDS: [Kind; 3] = [Kind::ClearDirection, Kind::FlawedDirection, Kind::General];

fn slot(kind: Kind) -> usize {
    KINDS
        .iter()
        .position(|&k| k == kind)
        .expect("KINDS holds every kind")
}

/// The dreamer actor (see the module docs).
pub struct DreamerActor;

impl Actor for DreamerActor {
    type Msg = DreamerMsg;
    type State = DreamerState;
    type Arguments = DreamerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<DreamerMsg>,
        args: DreamerArgs,
    ) -> Result<DreamerState, ActorProcessingErr> {
        let dream = args
            .config
            .dream
            .as_ref()
            .context("the dreamer runs only with a [dream] table")?;
        let data = &args.config.data;
        let library = crate::generator::load_library(&args.config)?;
        let probes = probe_scenarios(&library, args.config.eval.probe_samples);
        let client = ChatClient::new(dream.client_settings())
            .with_context(|| format!("the dream server {}", dream.server))?;
        // A fresh sampling stream per start: a restarted dreamer must not re-ask the seeds
        // it asked before (the ledger would refuse the same answers anyway).
        let stream = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let dreamer = Dreamer::new(
            library,
            &probes,
            dream.dreamer_config(data.seed, stream),
            provenance(client.model(), client.server()),
        );
        tracing::info!(
            server = client.server(),
            model = client.model(),
            concurrency = dream.concurrency,
            "Dreamer ready."
        );
        telemetry::set_dream_server_up(true);
        let _ = myself.cast(DreamerMsg::Wake);
        Ok(DreamerState {
            client: Arc::new(client),
            dreamer,
            format: if dream.json_mode {
                ResponseFormat::JsonObject
            } else {
                ResponseFormat::Text
            },
            queues: Default::default(),
            in_flight: [0; 3],
            capacity: args.config.queues.examples.max(1),
            concurrency: dream.concurrency.max(1),
            backoff: Backoff::new(BACKOFF_BASE, BACKOFF_MAX),
            backing_off: false,
            down: false,
            events: args.events,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<DreamerMsg>,
        msg: DreamerMsg,
        state: &mut DreamerState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            DreamerMsg::Take(kind, n, reply) => {
                let queue = &mut state.queues[slot(kind)];
                let taken: Vec<Scenario> = queue.drain(..n.min(queue.len())).collect();
                let _ = reply.send(taken);
                request_more(&myself, state);
            }
            DreamerMsg::Answered(seed, answer) => {
                state.in_flight[slot(seed.kind)] -= 1;
                match answer {
                    Ok(completion) => answered(state, &seed, &completion),
                    Err(error) => {
                        failed(state, &error);
                        state.backing_off = true;
                        myself.send_after(state.backoff.fail(), || DreamerMsg::Wake);
                        return Ok(());
                    }
                }
                request_more(&myself, state);
            }
            DreamerMsg::Wake => {
                state.backing_off = false;
                request_more(&myself, state);
            }
        }
        Ok(())
    }
}

/// A successful answer: validated, queued or counted as refused.
fn answered(state: &mut DreamerState, seed: &Seed, completion: &Completion) {
    state.backoff.succeed();
    if state.down {
        state.down = false;
        telemetry::set_dream_server_up(true);
        tracing::info!(
            server = state.client.server(),
            "The dream server answers again; dreaming resumes."
        );
        record(
            state,
            Event::Alarm {
                name: "dream_server_back".into(),
                message: format!("{} answers again", state.client.server()),
            },
        );
    }
    match state.dreamer.accept(seed, &completion.content) {
        Ok(scenario) => {
            telemetry::record_dream(scenario.kind.as_str());
            state.queues[slot(scenario.kind)].push_back(scenario);
        }
        Err(rejection) => {
            tracing::debug!(%rejection, kind = seed.kind.as_str(), "A dream was refused.");
            telemetry::record_dream_rejected(rejection.label());
        }
    }
}

/// A failed request: counted; the first failure after a success is an event.
fn failed(state: &mut DreamerState, error: &ClientError) {
    telemetry::record_dream_error(error.label());
    if !state.down {
        state.down = true;
        telemetry::set_dream_server_up(false);
        tracing::warn!(
            server = state.client.server(),
            %error,
            "The dream server failed; backing off, templates fill the batches meanwhile."
        );
        record(
            state,
            Event::Alarm {
                name: "dream_server_down".into(),
                message: format!("{}: {error}", state.client.server()),
            },
        );
    } else {
        tracing::debug!(%error, failures = state.backoff.failures(), "The dream server failed again.");
    }
}

fn record(state: &DreamerState, event: Event) {
    let mut log = state.events.lock().expect("event log lock");
    if let Err(e) = log.record(0, event) {
        tracing::error!(error = %e, "Could not record an event.");
    }
}

/// Sends requests while fewer than `concurrency` are in flight and the next kind's queue has
/// room; each runs on a blocking thread and answers with [`DreamerMsg::Answered`].
fn request_more(myself: &ActorRef<DreamerMsg>, state: &mut DreamerState) {
    if state.backing_off {
        return;
    }
    while state.in_flight.iter().sum::<usize>() < state.concurrency {
        let kind = state.dreamer.next_kind();
        let i = slot(kind);
        if state.queues[i].len() + state.in_flight[i] >= state.capacity {
            // The kind the balance wants next is full: wait for a Take.
            break;
        }
        let seed = match state.dreamer.seed() {
            Ok(seed) => seed,
            Err(e) => {
                tracing::error!(error = %e, "No dream can be seeded; dreaming stops.");
                return;
            }
        };
        let messages = state.dreamer.request(&seed);
        state.in_flight[i] += 1;
        let (client, format, reply_to) = (state.client.clone(), state.format, myself.clone());
        tokio::task::spawn_blocking(move || {
            let answer = client.complete(&messages, format);
            let _ = reply_to.cast(DreamerMsg::Answered(Box::new(seed), answer));
        });
    }
    for (kind, queue) in KINDS.iter().zip(&state.queues) {
        telemetry::set_dream_queue_depth(kind.as_str(), queue.len());
    }
}
